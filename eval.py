"""Evaluate any method's checkpoint or a folder of images: FID / KID / precision-recall / memorisation, sample grids,
interpolations, style mixing, per-seed images, GIF loops, a TorchScript export, projection of images into latents.

TARGET is a run directory (its ckpt/best.pt, else ckpt/last.pt) or a checkpoint .pt; the script of its method
rebuilds the EMA generator: load_for_sampling(ckpt, device, **opts), opts from --sampler-opt KEY=VALUE and --psi.
The real images are the checkpoint's --data at its --res unless given. Files go to --out (default <run dir>/eval,
or <fake dir>_eval) as <tag>-..., tag = the checkpoint's name without .pt ('fakes' for --fake-dir).

Actions (any combination in one call; what each writes: docs/eval.md):
  python eval.py runs/x --metrics fid,kid,pr,mem --n 5000        # metrics -> <tag>-metrics.json
  python eval.py --fake-dir my_samples/ --data pokemon --res 256 # the metrics of a folder of images
  python eval.py runs/x --metrics mem --mem-grid                 # the fakes nearest to training images, beside them
  python eval.py runs/x --metrics none --grid --interp --psi 0.7 # a sample grid, latent interpolation rows
  python eval.py runs/x --metrics none --mix                     # a style-mixing grid
  python eval.py runs/x --metrics none --save-images fakes/ --seeds 0-4999  # fakes/seed0000.png ...
  python eval.py runs/x --metrics none --gif walk.gif --gif-seeds 0-7       # a loop through the latents of seeds
  python eval.py runs/x --metrics none --export g.pt             # torch.jit.load('g.pt')(latents) -> images
  python eval.py runs/x --metrics none --project photo.png --steps 500      # the latent that reproduces photo.png
  python eval.py runs/x --metrics none --mem-project 16 --holdout unseen/   # training vs held-out reconstruction

Protocol: common.metrics' NVIDIA Inception protocol (StyleGAN2-ADA's fid50k_full), its name stored next to every
number; --n generated images (latents of --seed) vs all real images. Details: docs/eval.md, common/metrics.py.
"""
import argparse
import ast
import importlib
import inspect
import io
import json
import os
import re
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from common.output import check_checkpoint, load_checkpoint, save_checkpoint, save_grid, to_uint8, writing
from common.run import UserError, pick_device, user_errors
from common.sampling import save_style_mix
from common.weights import load_lpips

METRICS = ("fid", "kid", "pr", "mem")


def parse_args(argv=None):
    """The flags, checked: args.metrics becomes a list, args.pr_k [KP, KR], args.seeds and args.gif_seeds lists."""
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=doc[0], epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help="run directory (uses ckpt/best.pt, else ckpt/last.pt) or checkpoint .pt")
    p.add_argument("--fake-dir", metavar="DIR", help="evaluate this folder of images instead of a checkpoint")
    p.add_argument("--out", metavar="DIR", help="output folder (default <run dir>/eval or <fake dir>_eval)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents: metrics, grids, projection starts (0)")
    p.add_argument("--batch", type=int, default=64, help="images per generator / Inception / projection batch (64)")
    p.add_argument("--sampler-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword option of the method's load_for_sampling, repeatable (e.g. noise=const, bn=copy)")
    p.add_argument("--psi", type=float, help="truncation psi (the sampler option psi)")
    g = p.add_argument_group("reference data (default: the checkpoint's)")
    g.add_argument("--data", help="dataset NAME or folder of the real images")
    g.add_argument("--data-root", metavar="DIR", help="where named datasets live (else env GAN_DATA_ROOT, else data)")
    g.add_argument("--res", type=int, help="resolution of the real images")
    g.add_argument("--crop", choices=["squash", "center"], help="how real images are resized")
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", default="fid,kid", metavar="LIST", help="fid,kid,pr,mem or a part; none (fid,kid)")
    g.add_argument("--n", type=int, default=5000, help="generated images (5000)")
    g.add_argument("--n-real", type=int, metavar="N", help="real images (default: all of the dataset)")
    g.add_argument("--pr-k", default="3", metavar="K", help="precision/recall k: K, or KP,KR (3; DISP: 10,40)")
    g.add_argument("--mem-grid", action="store_true", help="the fakes nearest to training images, beside them (+mem)")
    g.add_argument("--inception", metavar="PATH", help="inception-2015-12-05.pt (default: env GAN_INCEPTION, cache)")
    g.add_argument("--cache-dir", metavar="DIR", help="where real-image statistics are cached (default <cache>/stats)")
    g = p.add_argument_group("images")
    g.add_argument("--grid", action="store_true", help="a grid of samples")
    g.add_argument("--grid-n", type=int, default=64, metavar="N", help="images in the grid (64)")
    g.add_argument("--interp", action="store_true", help="latent interpolations, linear, one pair of latents a row")
    g.add_argument("--interp-rows", type=int, default=6, metavar="N", help="interpolation rows (6)")
    g.add_argument("--interp-steps", type=int, default=8, metavar="N", help="images per interpolation row (8)")
    g.add_argument("--mix", action="store_true", help="a style-mixing grid (samplers with style_mix)")
    g.add_argument("--save-images", metavar="DIR", help="DIR/seed0042.png = the image of latents(1, 42), for --seeds")
    g.add_argument("--seeds", help="seeds of --save-images: 0-999, 0-3,7,10-12 (default 0 to --n - 1)")
    g.add_argument("--gif", metavar="OUT.gif", help="a GIF looping through the latents of --gif-seeds (linear)")
    g.add_argument("--gif-seeds", default="0-3", metavar="SEEDS", help="seeds the GIF visits, in order (0-3)")
    g.add_argument("--gif-frames", type=int, default=24, metavar="N", help="GIF frames per transition (24)")
    g.add_argument("--gif-fps", type=float, default=24.0, metavar="FPS", help="GIF frames per second (24)")
    g = p.add_argument_group("export")
    g.add_argument("--export", metavar="OUT.pt", help="the generator as TorchScript: torch.jit.load(OUT)(z) -> images")
    g = p.add_argument_group("projection (Adam on z; InsGen W; DISP [z ; prior]; pixel MSE, + LPIPS if local)")
    g.add_argument("--project", nargs="+", metavar="IMAGE", help="the latents that reproduce these images/folders")
    g.add_argument("--mem-project", type=int, default=0, metavar="N", help="project N training and N held-out images")
    g.add_argument("--holdout", metavar="DATA", help="--mem-project: images the model was NOT trained on (as --data)")
    g.add_argument("--steps", type=int, default=300, metavar="N", help="Adam steps (300)")
    g.add_argument("--proj-lr", type=float, default=0.1, metavar="LR", help="peak Adam lr, StyleGAN2 schedule (0.1)")
    g.add_argument("--proj-init", type=int, default=64, metavar="N", help="start: the best of N samples (64)")
    g.add_argument("--vgg-weights", metavar="PATH", help="LPIPS: vgg16-397923af.pth (default: torch.hub cache)")
    g.add_argument("--lpips-weights", metavar="PATH", help="LPIPS v0.1 vgg.pth (default: lpips package, torch.hub)")
    args = p.parse_args(argv)

    args.metrics = [m.strip() for m in args.metrics.lower().split(",") if m.strip() not in ("", "none")]
    bad = [m for m in args.metrics if m not in METRICS]
    if bad:
        raise UserError(f"--metrics: unknown {', '.join(bad)} (choose from {', '.join(METRICS)}, or none)")
    if args.mem_grid and "mem" not in args.metrics:
        args.metrics.append("mem")
    if (args.target is None) == (args.fake_dir is None):
        raise UserError("give either a run directory / checkpoint, or --fake-dir DIR (not both)")
    k = re.fullmatch(r"(\d+)(?:,(\d+))?", args.pr_k.strip())
    if not k:
        raise UserError(f"--pr-k {args.pr_k!r}: expected K or KP,KR (integers)")
    args.pr_k = [int(k[1]), int(k[2] or k[1])]
    args.seeds = parse_seeds(args.seeds) if args.seeds is not None else list(range(args.n))
    args.gif_seeds = parse_seeds(args.gif_seeds, "--gif-seeds")
    if args.gif and (len(args.gif_seeds) < 2 or args.gif_frames < 1 or not args.gif_fps > 0):
        raise UserError("--gif needs at least 2 --gif-seeds, --gif-frames >= 1 and --gif-fps > 0")
    if args.batch < 1 or args.proj_init < 1 or args.steps < 0 or args.mem_project < 0:
        raise UserError("--batch and --proj-init must be at least 1, --steps and --mem-project at least 0")
    if args.holdout and not args.mem_project:
        raise UserError("--holdout is the held-out set of --mem-project N: add --mem-project 8 (say)")
    return args


def parse_seeds(text, flag="--seeds"):
    """'0-3,7,10-12' -> [0, 1, 2, 3, 7, 10, 11, 12] (ranges inclusive, order kept, duplicates dropped)."""
    parts = [re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip()) for part in str(text).split(",")]
    if not all(parts) or any(int(m[2] or m[1]) < int(m[1]) for m in parts):
        raise UserError(f"{flag} {text!r}: expected seeds >= 0 as ranges and lists, like 0-999 or 0-3,7,10-12")
    return list(dict.fromkeys(s for m in parts for s in range(int(m[1]), int(m[2] or m[1]) + 1)))


def import_method(ckpt, path):
    """The method script that wrote the checkpoint (ckpt["method"], checked by common.output.check_checkpoint)."""
    method = check_checkpoint(ckpt, path)
    try:
        mod = importlib.import_module(method)
    except ModuleNotFoundError as e:  # the script, or a package it needs
        raise UserError(f"checkpoint {path} was written by {method}.py, which cannot be imported (no module "
                        f"{e.name!r}): run eval.py from the repository root, or install {e.name}")
    return mod


def load_sampler(mod, ckpt, device, opts):
    params = list(inspect.signature(mod.load_for_sampling).parameters.values())[2:]  # after (ckpt, device)
    names = [p.name for p in params]
    bad = [] if any(p.kind == p.VAR_KEYWORD for p in params) else [k for k in opts if k not in names]
    if bad:
        what = "truncation (--psi)" if bad == ["psi"] else f"the sampler option(s) {', '.join(bad)}"
        raise UserError(f"{mod.__name__}.load_for_sampling does not support {what}; it accepts: "
                        f"{', '.join(names) or 'no options'}")
    return mod.load_for_sampling(ckpt, device, **opts)


def open_source(args):
    """What the actions work on: a checkpoint's sampler (module, checkpoint, options) or the images of --fake-dir,
    the reference data, the output folder and file tag; the Inception weights are checked before any slow work."""
    src = SimpleNamespace(device=pick_device(args.device), sampler=None, ckpt_args={}, info={})
    if args.fake_dir:
        from common.data import list_images, load_image
        from PIL import Image
        if any((args.interp, args.mix, args.save_images, args.gif, args.export, args.project, args.mem_project)):
            raise UserError("--interp and --mix need a checkpoint, not --fake-dir, as do --save-images, --gif, "
                            "--export, --project and --mem-project")
        paths = list_images(args.fake_dir) if os.path.isdir(args.fake_dir) else []
        if not paths:
            raise UserError(f"--fake-dir {args.fake_dir}: no images (jpg/jpeg/png/webp/bmp) found")
        with Image.open(paths[0]) as im:
            fake_res = im.size[0]
        src.paths, src.n, src.tag = paths, min(args.n, len(paths)), "fakes"
        src.fakes = lambda idx: torch.stack([load_image(paths[int(i)], fake_res) for i in idx])  # uint8
        src.out, src.info["fake_dir"] = args.out or os.path.normpath(args.fake_dir) + "_eval", args.fake_dir
    else:
        path = args.target
        if os.path.isdir(path):
            path = next((os.path.join(path, c) for c in ("ckpt/best.pt", "ckpt/last.pt", "best.pt", "last.pt")
                         if os.path.isfile(os.path.join(path, c))), None)
            if path is None:
                raise UserError(f"{args.target} holds no checkpoint: expected "
                                f"{os.path.join(args.target, 'ckpt', 'best.pt')} or last.pt")
        src.ckpt = load_checkpoint(path)
        src.mod = import_method(src.ckpt, path)
        src.ckpt_args, src.n, src.tag = src.ckpt.get("args") or {}, args.n, os.path.splitext(os.path.basename(path))[0]
        run_dir = os.path.dirname(os.path.abspath(path))
        run_dir = os.path.dirname(run_dir) if os.path.basename(run_dir) == "ckpt" else run_dir
        src.out = args.out or os.path.join(run_dir, "eval")
        src.info.update(ckpt=path, method=src.ckpt["method"], step=src.ckpt.get("step"))
    src.data = args.data or src.ckpt_args.get("data")
    src.root = args.data_root or src.ckpt_args.get("data_root") or os.environ.get("GAN_DATA_ROOT", "data")
    src.crop = args.crop or src.ckpt_args.get("crop", "squash")
    if args.metrics:
        from common.metrics import find_inception
        if not src.data:
            raise UserError("--data is needed: the reference dataset of the metrics")
        src.inception = find_inception(args.inception)
    if not args.fake_dir:
        src.opts = {}
        for kv in args.sampler_opt:
            if "=" not in kv:
                raise UserError(f"--sampler-opt {kv!r}: expected KEY=VALUE")
            k, v = kv.split("=", 1)
            try:
                src.opts[k.strip()] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                src.opts[k.strip()] = v
        if args.psi is not None:
            src.opts["psi"] = args.psi
        src.sampler = load_sampler(src.mod, src.ckpt, src.device, src.opts)
        src.info["sampler_opts"] = src.opts
    src.res = args.res or src.ckpt_args.get("res") or (src.sampler.res if src.sampler is not None else fake_res)
    os.makedirs(src.out, exist_ok=True)
    return src


def deterministic_sampler(src, flag):
    """The sampler with the method's Sampler.export_opts added to the user's options (a deterministic mode, e.g.
    noise=const): what --export bakes in and --project optimises through. A clash is a user error."""
    want = src.sampler.export_opts
    for k, v in want.items():
        if k in src.opts and src.opts[k] != v:
            raise UserError(f"{flag} uses the sampler option {k}={v} (deterministic images): drop "
                            f"--sampler-opt {k}={src.opts[k]}")
    opts = {**src.opts, **want}
    s = src.sampler if opts == src.opts else load_sampler(src.mod, src.ckpt, src.device, opts)
    if not s.batch_independent:
        raise UserError(f"{flag} needs images that depend on their own latent only: not BatchNorm with batch "
                        "statistics (use --sampler-opt bn=recompute or bn=copy)")
    return s, opts


@torch.no_grad()
def generate(sampler, z, batch):
    return torch.cat([sampler.generate(z[i:i + batch]).float().cpu() for i in range(0, len(z), batch)])


def generate_each(sampler, z, batch):
    """generate() in chunks of `batch`, or one latent per call where images depend on the batch (bn=batch...)."""
    return generate(sampler, z, batch if sampler.batch_independent else 1)


def seed_latents(sampler, seeds):
    """Row i: the latent of seed seeds[i], sampler.latents(1, seeds[i])."""
    return torch.cat([sampler.latents(1, s) for s in seeds])


def interp_latents(z0, z1, steps, endpoint=True):
    """Row r: z0[r] -> z1[r] in `steps` linear steps, rows concatenated; endpoint=False: t < 1 (for loops)."""
    t = torch.linspace(0, 1, steps if endpoint else steps + 1, device=z0.device)[:steps]
    t = t.view(1, steps, *[1] * (z0.dim() - 1))
    return ((1 - t) * z0[:, None] + t * z1[:, None]).reshape(-1, *z0.shape[1:])


def write_json(path, obj):
    with writing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def sample_grid(args, src):
    """--grid: <tag>-grid.png, --grid-n samples of --seed (the first --fake-dir images)."""
    if src.sampler is None:
        imgs = src.fakes(range(min(args.grid_n, len(src.paths)))).float() / 127.5 - 1
    else:
        imgs = generate(src.sampler, src.sampler.latents(args.grid_n, args.seed), args.batch)
    return [save_grid(imgs, os.path.join(src.out, f"{src.tag}-grid.png"), essential=True)]


def interpolation(args, src):
    """--interp: <tag>-interp.png, row r = latent r -> latent r + --interp-rows of --seed, --interp-steps images."""
    z = src.sampler.latents(2 * args.interp_rows, args.seed)
    zs = interp_latents(z[:args.interp_rows], z[args.interp_rows:], args.interp_steps)
    return [save_grid(generate(src.sampler, zs, args.batch), os.path.join(src.out, f"{src.tag}-interp.png"),
                      nrow=args.interp_steps, essential=True)]


def style_mix(args, src):
    """--mix: <tag>-mix.png, the grid of samples/style_mix.png at the end of training."""
    return [save_style_mix(src.sampler, os.path.join(src.out, f"{src.tag}-mix.png"), args.seed, batch=args.batch,
                           essential=True)]


def save_seed_images(args, src):
    """--save-images DIR: DIR/seed%04d.png, the image of sampler.latents(1, seed), for every seed of --seeds."""
    from PIL import Image
    for i in range(0, len(args.seeds), args.batch):
        chunk = args.seeds[i:i + args.batch]
        imgs = generate_each(src.sampler, seed_latents(src.sampler, chunk), args.batch)
        for s, im in zip(chunk, to_uint8(imgs).permute(0, 2, 3, 1).numpy()):
            with writing(os.path.join(args.save_images, f"seed{s:04d}.png")) as tmp:
                Image.fromarray(im).save(tmp, format="PNG")
    print(f"{len(args.seeds)} images in {args.save_images}", flush=True)
    return [args.save_images]


def save_gif(args, src):
    """--gif OUT.gif: a loop through --gif-seeds and back to the first, --gif-frames linear steps per transition."""
    from PIL import Image
    z = seed_latents(src.sampler, args.gif_seeds)
    zs = interp_latents(z, torch.roll(z, -1, 0), args.gif_frames, endpoint=False)
    imgs = to_uint8(generate_each(src.sampler, zs, args.batch)).permute(0, 2, 3, 1).numpy()
    ims = [Image.fromarray(im) for im in imgs]
    with writing(args.gif) as tmp:  # Pillow: 256 colours per frame, identical consecutive frames merged
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=int(round(1000 / args.gif_fps)),
                    loop=0)
    return [args.gif]


class _Generate(torch.nn.Module):
    """sampler.generate as a module (its G a submodule, so tracing keeps G's weights as parameters)."""

    def __init__(self, sampler):
        super().__init__()
        self.G, self.sampler = sampler.G, sampler

    def forward(self, z):
        return self.sampler.generate(z)


class Exported(torch.nn.Module):
    """What --export writes (scripted): latents [n, latent_dim] -> images [n, 3, res, res] in [-1, 1] on the device
    it was traced on, no autograd; attributes method, res, latent_dim, latent_doc, noise, device (DISP: priors)."""

    def __init__(self, core, method, res, latent_dim, latent_doc, noise, device, extras):
        super().__init__()
        self.core, self.method, self.res, self.latent_dim = core, method, res, latent_dim
        self.latent_doc, self.noise, self.device = latent_doc, noise, device
        for k, v in extras.items():
            self.register_buffer(k, v.detach().float().cpu())

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 2 or latents.size(1) != self.latent_dim:
            raise ValueError("expected latents [n, " + str(self.latent_dim) + "]: " + self.latent_doc)
        with torch.no_grad():
            return self.core(latents.to(torch.device(self.device), torch.float32))


def export_generator(sampler, path, meta):
    """torch.jit.trace of sampler.generate at batch 2, checked against generate() at batch 3, in a scripted Exported,
    saved with extra files latent.txt and export.json (`meta`). Returns (path, the check's max abs difference)."""
    sampler.export_check()
    noise = str(getattr(sampler, "noise", "none"))
    doc = sampler.latent_doc() + (f"; noise={noise} baked in (the images of eval.py --sampler-opt noise={noise})"
                                  if noise != "none" else "")
    z = sampler.latents(2, 0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # checked numerically below
        warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", FutureWarning)
        core = torch.jit.trace(_Generate(sampler), z, check_trace=False)
        m = torch.jit.script(Exported(core, meta.get("method", ""), int(sampler.res), int(z.shape[1]), doc, noise,
                                      str(z.device), sampler.export_extras()))
        z3 = sampler.latents(3, 1)
        err = float((m(z3).float() - sampler.generate(z3).float()).abs().max())
        if not err <= 1e-4:
            raise RuntimeError(f"--export: the traced generator differs from Sampler.generate by {err:.3g} on a new "
                               "batch size (a shape baked into the trace?)")
        meta = {**meta, "latent_dim": int(z.shape[1]), "res": int(sampler.res), "latent_doc": doc, "noise": noise,
                "trace_check_max_abs_diff": err, "torch": torch.__version__, "traced_on": str(z.device)}
        buf = io.BytesIO()  # serialised in memory: a failed write is one OSError line (common.output.writing)
        torch.jit.save(m, buf, _extra_files={"latent.txt": doc, "export.json": json.dumps(meta, indent=1)})
    with writing(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())
    return path, err


def export(args, src):
    """--export OUT.pt: the EMA generator in the deterministic mode (Sampler.export_opts) as TorchScript."""
    ex, opts = deterministic_sampler(src, "--export")
    _, err = export_generator(ex, args.export, {**src.info, "sampler_opts": opts})
    print(f"exported {src.info['method']} generator (latents [n, {ex.latents(1, 0).shape[1]}] -> [n, 3, {ex.res}, "
          f"{ex.res}]; sampler options {opts}; traced, max |export - generate| {err:.2g})", flush=True)
    return [args.export]


def read_targets(paths, res, crop):
    """--project IMAGE...: files, or folders of images, -> ([n, 3, res, res] in [-1, 1], file paths)."""
    from common.data import list_images, load_image
    files = [f for p in paths for f in (list_images(p) if os.path.isdir(p) else [p])]
    if not files:
        raise UserError(f"--project {' '.join(paths)}: no images found")
    out = []
    for f in files:
        try:
            out.append(load_image(f, res, crop))
        except (OSError, ValueError) as e:
            raise UserError(f"--project {f}: cannot read the image ({type(e).__name__}); pass an image file or folder")
    return torch.stack(out).float() / 127.5 - 1, files


def project(sampler, target, steps, lr=0.1, n_init=64, seed=0, lpips=None, batch=64, snaps=6, log=None):
    """v (proj_init's kind) with sampler.proj_generate(v) ~ target [n, 3, res, res]: from the best of n_init latents
    of `seed`, `steps` Adam steps on per-image pixel MSE (+ LPIPS), `batch` targets at a time. Returns on the CPU v,
    img, mse / lpips / loss at the end and the start (init_*), snapshots [n, snaps + 2, 3, res, res]."""
    if len(target) > batch:
        parts = [project(sampler, target[i:i + batch], steps, lr, n_init, seed, lpips, batch, snaps, log)
                 for i in range(0, len(target), batch)]
        return {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}
    dev, t0 = sampler.latents(1, 0).device, time.time()
    target = target.to(dev).float()
    size = min(max(target.shape[-1], 64), 256)  # LPIPS sees the images at 64..256 px
    fit = lambda x: x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear",  # noqa: E731
                                                                antialias=True, align_corners=False)
    with torch.no_grad():
        cand = sampler.latents(n_init, seed)
        imgs = torch.cat([sampler.generate(cand[i:i + batch]).float() for i in range(0, n_init, batch)])
        d = torch.stack([((imgs[j:j + 1] - target) ** 2).mean((1, 2, 3)) for j in range(n_init)])  # [n_init, n]
        v = sampler.proj_init(cand[d.argmin(0)]).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr, betas=(0.9, 0.999))
    at = sorted({round(i * steps / (snaps + 1)) for i in range(1, snaps + 1)})
    shots = []
    with sampler.differentiable():
        for step in range(steps + 1):
            img = sampler.proj_generate(v).float()
            if not img.requires_grad:
                raise UserError(f"{type(sampler).__module__}'s Sampler.generate is not differentiable: decorate it "
                                "with @SamplerBase.sampler_grad instead of @torch.no_grad() (common/sampling.py)")
            mse = ((img - target) ** 2).mean((1, 2, 3))
            lp = None if lpips is None else lpips(fit(img), fit(target))
            loss = mse if lp is None else mse + lp
            r = {"mse": mse, "lpips": lp, "loss": loss}
            if step == 0:
                r0 = {f"init_{k}": x for k, x in r.items()}
            if step in (0, steps) or step in at:
                shots.append(img.detach())
            if log is not None and (step % max(steps // 5, 1) == 0 or step == steps):
                print(f"{log}step {step}/{steps}: mean mse {float(mse.detach().mean()):.4f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
            if step == steps:
                break
            t = step / steps  # StyleGAN2 projector's schedule: 5 % linear warm-up, cosine ramp-down over the last 25 %
            ramp = min(1.0, (1.0 - t) / 0.25)
            opt.param_groups[0]["lr"] = lr * (0.5 - 0.5 * np.cos(ramp * np.pi)) * min(1.0, t / 0.05)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
    out = {**r, **r0, "v": v, "img": shots[-1], "snapshots": torch.stack(shots, 1)}
    return {k: None if x is None else x.detach().cpu() for k, x in out.items()}


def image_rows(r):
    """The per-image numbers of a project() result, for the JSON files."""
    keys = [k for k in ("mse", "lpips", "loss", "init_mse", "init_lpips", "init_loss") if r[k] is not None]
    return [{k: float(f"{float(r[k][i]):.6g}") for k in keys} for i in range(len(r["mse"]))]


def projector(args, src):
    """What --project and --mem-project share (made once): the deterministic sampler, LPIPS if local, settings."""
    if "proj" in vars(src):
        return src.proj
    sampler, opts = deterministic_sampler(src, "--project")
    try:
        lpips = load_lpips(args.vgg_weights, args.lpips_weights, download=False).to(src.device)
        how = f"LPIPS v0.1 VGG16 from {args.vgg_weights or 'torch.hub'} and {args.lpips_weights or 'lpips/torch.hub'}"
    except UserError as e:
        if args.vgg_weights or args.lpips_weights:
            raise
        lpips, how = None, f"LPIPS off: no local weights ({e})"
    kind = "mse" if lpips is None else "mse+lpips"
    print(f"projection loss: {'pixel MSE only' if lpips is None else 'pixel MSE + LPIPS'} ({how}); optimising "
          f"{sampler.proj_space}, {args.steps} Adam steps from the best of {args.proj_init} samples; sampler options "
          f"{opts}", flush=True)
    info = {"loss": kind, "lpips_source": how, "space": sampler.proj_space, "steps": args.steps, "lr": args.proj_lr,
            "n_init": args.proj_init, "seed": args.seed, "sampler_opts": opts, "res": sampler.res,
            "method": src.info["method"], "step": src.info["step"]}
    src.proj = SimpleNamespace(sampler=sampler, kind=kind, info=info, run=lambda target, what: project(
        sampler, target, args.steps, args.proj_lr, args.proj_init, args.seed, lpips, args.batch, log=f"{what}: "))
    return src.proj


def project_images(args, src):
    """--project IMAGE...: <tag>-project.png (a row per image: target, start, 6 steps, reconstruction),
    <tag>-project-latents.pt and <tag>-project.json (losses at the start and the end)."""
    pj = projector(args, src)
    target, files = read_targets(args.project, pj.sampler.res, src.crop)
    r = pj.run(target, "project")
    rows = [{"image": f, **row} for f, row in zip(files, image_rows(r))]
    base = os.path.join(src.out, f"{src.tag}-project")
    grid = torch.cat([torch.cat([target[i:i + 1], r["snapshots"][i]]) for i in range(len(files))])
    save_grid(grid, base + ".png", nrow=r["snapshots"].shape[1] + 1, essential=True)
    save_checkpoint({"space": pj.info["space"], "v": r["v"], "images": files, "sampler_opts": pj.info["sampler_opts"]},
                    base + "-latents.pt")
    write_json(base + ".json", {**pj.info, "images": rows, "mean_mse": float(r["mse"].mean())})
    for row in rows:
        print(f"projected {row['image']}: mse {row['mse']:.4g} (start {row['init_mse']:.4g})"
              + (f", lpips {row['lpips']:.4g}" if "lpips" in row else ""), flush=True)
    return [base + ".png", base + "-latents.pt", base + ".json"]


def mem_project(args, src):
    """--mem-project N: project N training and N held-out images (--holdout, or those after disp's --max-images);
    held-out / train >> 1: training images reproduced much better. <tag>-memproj.png (rows: targets, projections)."""
    from common.data import load_dataset
    pj = projector(args, src)
    ds = load_dataset(src.data, pj.sampler.res, src.root, src.crop)
    n_train = int(src.ckpt_args.get("max_images") or 0) or len(ds)
    pools = {"train": (ds, range(min(n_train, len(ds))), src.data)}
    if args.holdout:
        hd = load_dataset(args.holdout, pj.sampler.res, src.root, src.crop)
        pools["heldout"] = (hd, range(len(hd)), args.holdout)
    elif n_train < len(ds):
        pools["heldout"] = (ds, range(n_train, len(ds)), f"{src.data} images {n_train}.. (after --max-images)")
    sets, grid = {}, []
    for name, (d, pool, what) in pools.items():
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))[:args.mem_project]
        idx = torch.tensor([pool[int(i)] for i in pick])
        target = d.uint8(idx).float() / 127.5 - 1
        r = pj.run(target, f"mem-project {name}")
        sets[name] = {"data": what, "n": len(idx), "index": idx.tolist(), "images": image_rows(r),
                      **{f"mean_{k}": float(r[k].mean()) for k in ("mse", "lpips", "loss") if r[k] is not None}}
        grid += [target, r["img"]]
    result = {**pj.info, **sets}
    line = " | ".join(f"{k} mse {v['mean_mse']:.4g} (n {v['n']})" for k, v in sets.items())
    if "heldout" in sets:
        result["heldout_over_train"] = sets["heldout"]["mean_loss"] / max(sets["train"]["mean_loss"], 1e-12)
        line += f" | held-out / train {pj.kind} {result['heldout_over_train']:.3g} (>> 1: training images copied)"
    else:
        line += " (no held-out set: add --holdout DATA)"
    print(f"--mem-project ({pj.kind}, {args.steps} steps): {line}", flush=True)
    n = max(len(g) for g in grid)  # black padding where the held-out set is smaller
    path = os.path.join(src.out, f"{src.tag}-memproj.png")
    save_grid(torch.cat([torch.cat([g, -torch.ones(n - len(g), *g.shape[1:])]) for g in grid]), path, nrow=n,
              essential=True)
    return [path, write_json(os.path.join(src.out, f"{src.tag}-memproj.json"), result)]


def mem_grid(ds, real_idx, fake_imgs, nn_idx, nn_dist, res, batch):
    """Rows: the 8 fakes closest to the training set, each followed by its nearest training images. Each fake is
    remade within its batch of the metrics, fakes s .. s + batch - 1 (batch 1: images independent of their batch)."""
    rows = np.argsort(nn_dist[:, 0])[:8]
    starts = [int(r) - int(r) % batch for r in rows]
    fk = torch.cat([fake_imgs(range(s, min(s + batch, len(nn_dist))))[r - s:r - s + 1] for r, s in zip(rows, starts)])
    fk = fk.float() / 127.5 - 1 if fk.dtype == torch.uint8 else fk
    fk = fk if fk.shape[-1] == res else F.interpolate(fk, size=(res, res), mode="bilinear", antialias=True)
    nn = real_idx[nn_idx[rows]]  # feature rows -> dataset indices, [n_rows, k]
    reals = ds.uint8(torch.as_tensor(nn.reshape(-1))).float() / 127.5 - 1
    grid = torch.cat([torch.cat([f[None], nns]) for f, nns in zip(fk, reals.chunk(len(rows)))])  # nns: f's k nearest
    info = [{"fake": int(f), "nn": n.tolist(), "dist": nn_dist[f].tolist()} for f, n in zip(rows, nn)]
    return grid, info


def metrics(args, src):
    """--metrics: <tag>-metrics.json (metrics, protocol, image counts, checkpoint step, sampler options); --mem-grid
    also <tag>-mem.png (the 8 fakes nearest to the training set, each followed by its 3 nearest training images)."""
    from common.data import load_dataset
    from common.metrics import Evaluator, memorization
    ds = load_dataset(src.data, src.res, src.root, src.crop)
    ev = Evaluator(ds, src.device, n_gen=src.n, inception=src.inception, cache_dir=args.cache_dir,
                   n_real=args.n_real, batch=args.batch)
    t0 = time.time()
    real = ev.real_stats()
    t1 = time.time()
    if src.sampler is None:
        fake_imgs = src.fakes
    else:
        z = src.sampler.latents(src.n, args.seed)
        fake_imgs = lambda idx: generate(src.sampler, z[torch.as_tensor(idx, device=z.device)], args.batch)  # noqa
    fake = ev.features(fake_imgs(range(i, min(i + args.batch, src.n))) for i in range(0, src.n, args.batch))
    t2 = time.time()
    result = ev.compute(fake, [m for m in args.metrics if m != "mem"], *args.pr_k)
    if "pr" in args.metrics:
        result["pr_k"] = args.pr_k
    written = []
    if "mem" in args.metrics:
        stats, nn_idx, nn_dist = memorization(real["feats"], fake, ev.device)
        result.update(stats)
        if args.mem_grid:
            alone = src.sampler is None or src.sampler.batch_independent  # else bn=batch...: remade in their batches
            grid, result["mem_grid_rows"] = mem_grid(ds, ev.real_indices(), fake_imgs, nn_idx, nn_dist, src.res,
                                                      1 if alone else args.batch)
            written.append(save_grid(grid, os.path.join(src.out, f"{src.tag}-mem.png"), nrow=nn_idx.shape[1] + 1,
                                     essential=True))
    result.update(src.info, data=src.data, res=src.res, n_fake=int(fake.shape[0]), n_real=int(real["feats"].shape[0]),
                  seed=args.seed, protocol=ev.protocol,
                  seconds={"real": round(t1 - t0, 2), "fake": round(t2 - t1, 2), "metrics": round(time.time() - t2, 2)})
    written.append(write_json(os.path.join(src.out, f"{src.tag}-metrics.json"), result))
    keys = ("fid", "kid", "precision", "recall", "mem_ratio", "mem_frac_close")
    nums = " | ".join(f"{k} {result[k]:.6g}" for k in keys if k in result)
    print(f"{nums} | {result['n_fake']} fake vs {result['n_real']} real | protocol {result['protocol']}", flush=True)
    return written


ACTIONS = {"grid": sample_grid, "interp": interpolation, "mix": style_mix, "save_images": save_seed_images,
           "gif": save_gif, "export": export, "project": project_images, "mem_project": mem_project,
           "metrics": metrics}  # flag (args attribute) -> action, run in this order


def main(argv=None):
    """Runs every action asked for; returns the paths written."""
    args = parse_args(argv)
    src = open_source(args)
    written = []
    for flag, action in ACTIONS.items():
        if getattr(args, flag):
            written += action(args, src)
    for w in written:
        print(f"wrote {w}", flush=True)
    return written


if __name__ == "__main__":
    with user_errors():
        main()
