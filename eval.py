"""Evaluate any method's checkpoint, or a folder of generated images: FID / KID / precision-recall / memorisation,
sample grids, latent interpolations and style-mixing grids.

    python eval.py runs/fastgan-pokemon-256-0-... --metrics fid,kid,pr --n 5000
    python eval.py runs/x/ckpt/last.pt --metrics none --grid --interp --psi 0.7
    python eval.py --fake-dir my_samples/ --data pokemon --res 256 --metrics fid,kid
    python eval.py runs/x --metrics mem --mem-grid          # nearest training images of the closest fakes
    python eval.py runs/x --metrics none --save-images fakes/ --seeds 0-4999   # fakes/seed0000.png ... (--fake-dir)
    python eval.py runs/x --metrics none --gif walk.gif --gif-seeds 0-7 --gif-frames 30 --gif-fps 30

A run directory means <dir>/ckpt/best.pt if present, else <dir>/ckpt/last.pt. The checkpoint names its method
(`ckpt["method"]`, the script name); eval.py imports that script and calls its
`load_for_sampling(ckpt, device, **opts)` (opts from repeated `--sampler-opt key=value`; `--psi X` is the sampler
option psi, truncation) to rebuild the EMA generator. The reference set is the checkpoint's dataset
(`--data`/`--res` default to the checkpoint's args["data"]/args["res"]), all images unless --n-real.

Metrics (protocol string `common.metrics.PROTOCOL`, written next to every number; see common/metrics.py):
- fid, kid: n generated images (--n, default 5000, latents from --seed) vs the real set.
- pr: improved precision/recall (Kynkaanniemi et al. 2019) in Inception space; --pr-k K or KP,KR (DISP: 10,40).
- mem: memorisation. For every generated image, the distance to its nearest training image in Inception feature
  space (d_fake); as reference, every training image's distance to its nearest OTHER training image (leave-one-out,
  d_real; no held-out set needed). A generator that makes new images from the data distribution has d_fake about
  like d_real: mem_ratio = mean(d_fake)/mean(d_real) ~ 1 and mem_frac_close = fraction of fakes with d_fake below
  the 5th percentile of d_real ~ 0.05. Copying training images pushes mem_ratio towards 0 and mem_frac_close towards
  1. --mem-grid writes the 8 fakes with the smallest d_fake, each followed by its 3 nearest training images.

Outputs go to --out (default <run dir>/eval, or <fake dir>_eval): <tag>-metrics.json (metrics, protocol, image
counts, checkpoint step, sampler options), <tag>-grid.png, <tag>-interp.png, <tag>-mix.png, <tag>-mem.png, where tag
is the checkpoint's file name without .pt ('fakes' for --fake-dir). User errors print one line and exit 2.

Per-seed images (--save-images DIR --seeds 0-3,7): DIR/seed0007.png is the image of latent sampler.latents(1, 7),
whatever --batch or the other seeds asked for (samplers whose images depend on their batch companions, insgen's
noise=random and bn=batch, generate one seed per call). --gif OUT.gif: a loop through --gif-seeds, the same linear
interpolation as --interp (DISP: of its [z ; prior] latent), --gif-frames per transition, the last seed back to the
first; one image per frame (Pillow's GIF palette: 256 colours per frame; Pillow merges identical consecutive frames).
"""
import argparse
import ast
import importlib
import inspect
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from common.utils import UserError, load_checkpoint, pick_device, save_grid, save_style_mix, user_errors

METRICS = ("fid", "kid", "pr", "mem")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help="run directory (uses ckpt/best.pt, else ckpt/last.pt) or checkpoint .pt")
    p.add_argument("--fake-dir", default=None, help="evaluate this folder of images instead of a checkpoint")
    p.add_argument("--data", default=None, help="reference dataset NAME or folder (default: the checkpoint's --data)")
    p.add_argument("--data-root", default=None,
                   help="where named datasets live (default: the checkpoint's, env GAN_DATA_ROOT, data)")
    p.add_argument("--res", type=int, default=None, help="resolution of the real images (default: the checkpoint's --res)")
    p.add_argument("--crop", choices=["squash", "center"], default=None,
                   help="how real images are resized (default: the checkpoint's)")
    p.add_argument("--metrics", default="fid,kid", help="comma list of fid, kid, pr, mem; or 'none'")
    p.add_argument("--n", type=int, default=5000, help="generated images for the metrics")
    p.add_argument("--n-real", type=int, default=None, help="real images for the metrics (default: all of the dataset)")
    p.add_argument("--pr-k", default="3",
                   help="precision/recall neighbourhood: K, or KP,KR for precision and recall (DISP: 10,40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents (metrics, grids)")
    p.add_argument("--batch", type=int, default=64, help="images per generator / Inception batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--inception", default=None, help="local path of inception-2015-12-05.pt (env GAN_INCEPTION)")
    p.add_argument("--cache-dir", default=None, help="where real-image statistics are cached (default <cache>/stats)")
    p.add_argument("--sampler-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword option for the method's load_for_sampling (repeatable)")
    p.add_argument("--psi", type=float, default=None, help="truncation psi (passed as sampler option psi)")
    p.add_argument("--grid", action="store_true", help="write a grid of samples")
    p.add_argument("--grid-n", type=int, default=64, help="images in the sample grid")
    p.add_argument("--interp", action="store_true", help="write a latent interpolation strip (linear, row by row)")
    p.add_argument("--interp-rows", type=int, default=6, help="interpolation rows (pairs of latents)")
    p.add_argument("--interp-steps", type=int, default=8, help="images per interpolation row")
    p.add_argument("--mix", action="store_true", help="write a style-mixing grid (samplers with style_mix only)")
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="write one PNG per seed of --seeds to DIR (DIR/seed0042.png), e.g. for --fake-dir or external "
                        "FID tools; --psi and --sampler-opt apply")
    p.add_argument("--seeds", default=None,
                   help="seeds of --save-images: ranges and lists like '0-999' or '0-3,7,10-12' (default 0 to --n - 1)")
    p.add_argument("--gif", default=None, metavar="OUT.gif",
                   help="write an animated GIF looping through the latents of --gif-seeds (linear interpolation)")
    p.add_argument("--gif-seeds", default="0-3", help="seeds visited by --gif, in order ('0-3', '5,2,9'); at least 2")
    p.add_argument("--gif-frames", type=int, default=24, help="--gif frames per transition (seed to next seed)")
    p.add_argument("--gif-fps", type=float, default=24.0, help="--gif frames per second")
    p.add_argument("--mem-grid", action="store_true",
                   help="write the closest fakes next to their nearest training images (implies mem)")
    p.add_argument("--out", default=None, help="output folder (default <run dir>/eval or <fake dir>_eval)")
    return p.parse_args(argv)


def resolve_ckpt(path):
    if os.path.isdir(path):
        for c in ("ckpt/best.pt", "ckpt/last.pt", "best.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, c)):
                return os.path.join(path, c)
        raise UserError(f"{path} holds no checkpoint: expected {os.path.join(path, 'ckpt', 'best.pt')} or last.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: pass a run directory or a .pt file")
    return path


def parse_opts(pairs, psi):
    opts = {}
    for kv in pairs:
        if "=" not in kv:
            raise UserError(f"--sampler-opt {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        try:
            opts[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            opts[k.strip()] = v
    if psi is not None:
        opts["psi"] = psi
    return opts


def import_method(ckpt, path):
    method = ckpt.get("method") if isinstance(ckpt, dict) else None
    if not isinstance(method, str) or not method:
        raise UserError(f"checkpoint {path} names no method (no 'method' entry): was it written by this project?")
    try:
        mod = importlib.import_module(method)
    except ModuleNotFoundError as e:
        if e.name != method:
            raise UserError(f"method {method}.py needs the module {e.name!r}, which is not installed")
        raise UserError(f"checkpoint {path} was written by method {method!r}, but {method}.py is not importable: "
                        "run eval.py from the repository root (or put the script's folder on PYTHONPATH)")
    if not callable(getattr(mod, "load_for_sampling", None)):
        raise UserError(f"{method}.py has no load_for_sampling(ckpt, device): it cannot be evaluated")
    return mod


def load_sampler(mod, ckpt, device, opts):
    sig = inspect.signature(mod.load_for_sampling)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    bad = [k for k in opts if not takes_any and k not in list(sig.parameters)[2:]]
    if bad:
        what = "truncation (--psi)" if bad == ["psi"] else f"the sampler option(s) {', '.join(bad)}"
        raise UserError(f"{mod.__name__}.load_for_sampling does not support {what}; it accepts: "
                        f"{', '.join(list(sig.parameters)[2:]) or 'no options'}")
    return mod.load_for_sampling(ckpt, device, **opts)


@torch.no_grad()
def generate(sampler, z, batch):
    return torch.cat([sampler.generate(z[i:i + batch]).float().cpu() for i in range(0, len(z), batch)])


def parse_seeds(text, flag="--seeds"):
    """'0-3,7,10-12' -> [0, 1, 2, 3, 7, 10, 11, 12] (ranges inclusive, order kept, duplicates dropped)."""
    seeds = []
    for part in str(text).split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo = int(a)
            hi = int(b) if sep else lo
        except ValueError:
            lo = hi = -1
        if lo < 0 or hi < lo:
            raise UserError(f"{flag} {text!r}: expected seeds >= 0 as ranges and lists, like 0-999 or 0-3,7,10-12")
        seeds += range(lo, hi + 1)
    return list(dict.fromkeys(seeds))


def batch_independent(sampler):
    """Whether sampler.generate gives each latent the image it gets alone, whatever the other latents of the call.
    A sampler may say so itself (attribute batch_independent); else: not with batch-statistic BatchNorm (bn=batch:
    fastgan, disp) nor with insgen's noise=random (one noise seed per generate() call, from all its latents)."""
    said = getattr(sampler, "batch_independent", None)
    if said is not None:
        return bool(said)
    return getattr(sampler, "bn", None) != "batch" and getattr(sampler, "noise", None) != "random"


def seed_latents(sampler, seeds):
    """Row i: the latent of seed seeds[i], sampler.latents(1, seeds[i])."""
    return torch.cat([sampler.latents(1, s) for s in seeds])


def generate_each(sampler, z, batch):
    """generate() in chunks of `batch`, or one latent per call where the images would depend on the batch."""
    return generate(sampler, z, batch if batch_independent(sampler) else 1)


def save_seed_images(sampler, seeds, folder, batch):
    """folder/seed%04d.png for every seed: the image of sampler.latents(1, seed). Returns the paths."""
    from PIL import Image
    from common.utils import to_uint8
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(0, len(seeds), batch):
        chunk = seeds[i:i + batch]
        imgs = to_uint8(generate_each(sampler, seed_latents(sampler, chunk), batch)).permute(0, 2, 3, 1).numpy()
        for s, im in zip(chunk, imgs):
            paths.append(os.path.join(folder, f"seed{s:04d}.png"))
            Image.fromarray(im).save(paths[-1])
    return paths


def save_gif(sampler, seeds, path, frames, fps, batch):
    """A closed loop seeds[0] -> seeds[1] -> ... -> seeds[0]: `frames` frames per transition (the next seed's own
    image starts the next transition), interp_latents' linear steps; one image per frame, looping forever."""
    from PIL import Image
    from common.utils import to_uint8
    z = seed_latents(sampler, seeds)
    zs = interp_latents(z, torch.roll(z, -1, 0), frames, endpoint=False)
    imgs = to_uint8(generate_each(sampler, zs, batch)).permute(0, 2, 3, 1).numpy()
    ims = [Image.fromarray(im) for im in imgs]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(round(1000 / fps)), loop=0)
    return path


def interp_latents(z0, z1, steps, endpoint=True):
    """Row r: z0[r] -> z1[r] in `steps` linear steps; rows concatenated (row-major grid). endpoint=False: the steps
    stop one short of z1[r] (t = 0, 1/steps, ...), for loops where z1[r] starts the next row."""
    t = torch.linspace(0, 1, steps if endpoint else steps + 1, device=z0.device)[:steps]
    t = t.view(1, steps, *[1] * (z0.dim() - 1))
    return ((1 - t) * z0[:, None] + t * z1[:, None]).reshape(-1, *z0.shape[1:])


def mem_grid(ds, real_idx, fake_imgs, nn_idx, nn_dist, res, n_rows=8):
    """Rows: the n_rows fakes closest to the training set, each followed by its nearest training images."""
    rows = np.argsort(nn_dist[:, 0])[:n_rows]
    fk = fake_imgs(rows)
    fk = resize_to(fk.float() / 127.5 - 1 if fk.dtype == torch.uint8 else fk, res)
    nn = real_idx[nn_idx[rows]]  # feature rows -> dataset indices, [n_rows, k]
    reals = ds.uint8(torch.as_tensor(nn.reshape(-1))).float() / 127.5 - 1
    k = nn.shape[1]
    grid = torch.cat([torch.cat([fk[r:r + 1], reals[r * k:(r + 1) * k]]) for r in range(len(rows))])
    info = [{"fake": int(f), "nn": [int(j) for j in nn[r]], "dist": [float(d) for d in nn_dist[f]]}
            for r, f in enumerate(rows)]
    return grid, info


def read_fakes(folder):
    from common.data import list_images, load_image
    from PIL import Image
    paths = list_images(folder) if os.path.isdir(folder) else []
    if not paths:
        raise UserError(f"--fake-dir {folder}: no images (jpg/jpeg/png/webp/bmp) found")
    with Image.open(paths[0]) as im:
        res = im.size[0]
    return paths, res, (lambda idx: torch.stack([load_image(paths[int(i)], res) for i in idx]))


def resize_to(x, res):
    return x if x.shape[-1] == res else F.interpolate(x.float(), size=(res, res), mode="bilinear", antialias=True)


def main(argv=None):
    args = parse_args(argv)
    metrics = [m.strip() for m in args.metrics.lower().split(",") if m.strip() not in ("", "none")]
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"--metrics: unknown {', '.join(bad)} (choose from {', '.join(METRICS)}, or none)")
    if args.mem_grid and "mem" not in metrics:
        metrics.append("mem")
    if (args.target is None) == (args.fake_dir is None):
        raise UserError("give either a run directory / checkpoint, or --fake-dir DIR (not both)")
    try:
        pr_k = [int(k) for k in str(args.pr_k).split(",")]
    except ValueError:
        raise UserError(f"--pr-k {args.pr_k!r}: expected K or KP,KR (integers)")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else list(range(args.n))
    gif_seeds = parse_seeds(args.gif_seeds, "--gif-seeds")
    if args.gif and (len(gif_seeds) < 2 or args.gif_frames < 1 or not args.gif_fps > 0):
        raise UserError("--gif needs at least 2 --gif-seeds, --gif-frames >= 1 and --gif-fps > 0")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: expected at least 1")
    device = pick_device(args.device)

    info, ckpt_args, sampler = {}, {}, None
    if args.fake_dir:
        if args.interp or args.mix:
            raise UserError("--interp and --mix need a checkpoint, not --fake-dir")
        if args.save_images or args.gif:
            raise UserError("--save-images and --gif need a checkpoint, not --fake-dir")
        paths, fake_res, load_fakes = read_fakes(args.fake_dir)
        n = len(paths) if args.n is None else min(args.n, len(paths))
        tag, out = "fakes", args.out or os.path.normpath(args.fake_dir) + "_eval"
        info.update(fake_dir=args.fake_dir)
    else:
        path = resolve_ckpt(args.target)
        ckpt = load_checkpoint(path)
        mod = import_method(ckpt, path)
        ckpt_args = ckpt.get("args") or {}
        n = args.n
        tag = os.path.splitext(os.path.basename(path))[0]
        run_dir = os.path.dirname(os.path.abspath(path))
        run_dir = os.path.dirname(run_dir) if os.path.basename(run_dir) == "ckpt" else run_dir
        out = args.out or os.path.join(run_dir, "eval")
        info.update(ckpt=path, method=ckpt["method"], step=ckpt.get("step"))

    data = args.data or ckpt_args.get("data")
    if metrics and not data:
        raise UserError("--data is needed: the reference dataset of the metrics")
    inception = None
    if metrics:  # fail on missing weights before any slow work
        from common.metrics import find_inception
        inception = find_inception(args.inception)
    if not args.fake_dir:
        opts = parse_opts(args.sampler_opt, args.psi)
        sampler = load_sampler(mod, ckpt, device, opts)
        info.update(sampler_opts=opts)
    res = args.res or ckpt_args.get("res") or (sampler.res if sampler is not None else fake_res)
    os.makedirs(out, exist_ok=True)
    written = []

    if args.grid:
        if sampler is not None:
            imgs = generate(sampler, sampler.latents(args.grid_n, args.seed), args.batch)
        else:
            imgs = load_fakes(range(min(args.grid_n, len(paths)))).float() / 127.5 - 1
        written.append(os.path.join(out, f"{tag}-grid.png"))
        save_grid(imgs, written[-1])
    if args.interp:
        z = sampler.latents(2 * args.interp_rows, args.seed)
        zs = interp_latents(z[:args.interp_rows], z[args.interp_rows:], args.interp_steps)
        written.append(os.path.join(out, f"{tag}-interp.png"))
        save_grid(generate(sampler, zs, args.batch), written[-1], nrow=args.interp_steps)
    if args.mix:  # the same grid as samples/style_mix.png at the end of training
        written.append(save_style_mix(sampler, os.path.join(out, f"{tag}-mix.png"), args.seed, batch=args.batch))
    if args.save_images:
        n_img = len(save_seed_images(sampler, seeds, args.save_images, args.batch))
        print(f"{n_img} images (seeds {args.seeds or f'0-{args.n - 1}'}) in {args.save_images}", flush=True)
        written.append(args.save_images)
    if args.gif:
        written.append(save_gif(sampler, gif_seeds, args.gif, args.gif_frames, args.gif_fps, args.batch))

    if metrics:
        from common.data import load_dataset
        from common.metrics import Evaluator, memorization
        root = args.data_root or ckpt_args.get("data_root") or os.environ.get("GAN_DATA_ROOT", "data")
        ds = load_dataset(data, res, root, args.crop or ckpt_args.get("crop", "squash"))
        ev = Evaluator(ds, device, n_gen=n, inception=inception, cache_dir=args.cache_dir, n_real=args.n_real,
                       batch=args.batch)
        t0 = time.time()
        real = ev.real_stats()
        t1 = time.time()
        if sampler is not None:
            z = sampler.latents(n, args.seed)
            fake_imgs = lambda idx: generate(sampler, z[torch.as_tensor(idx, device=z.device)], args.batch)  # noqa: E731
        else:
            fake_imgs = load_fakes
        fake = ev.features(fake_imgs(range(i, min(i + args.batch, n))) for i in range(0, n, args.batch))
        t2 = time.time()
        result = ev.compute(fake, [m for m in metrics if m != "mem"], pr_k[0], pr_k[-1])
        if "pr" in metrics:
            result["pr_k"] = [pr_k[0], pr_k[-1]]
        if "mem" in metrics:
            stats, nn_idx, nn_dist = memorization(real["feats"], fake, ev.device)
            result.update(stats)
            if args.mem_grid:
                grid, result["mem_grid_rows"] = mem_grid(ds, ev.real_indices(), fake_imgs, nn_idx, nn_dist, res)
                written.append(os.path.join(out, f"{tag}-mem.png"))
                save_grid(grid, written[-1], nrow=nn_idx.shape[1] + 1)
        result.update(info, data=data, res=res, n_fake=int(fake.shape[0]), n_real=int(real["feats"].shape[0]),
                      seed=args.seed, protocol=ev.protocol,
                      seconds={"real": round(t1 - t0, 2), "fake": round(t2 - t1, 2), "metrics": round(time.time() - t2, 2)})
        written.append(os.path.join(out, f"{tag}-metrics.json"))
        with open(written[-1], "w") as f:
            json.dump(result, f, indent=1)
        nums = " | ".join(f"{k} {result[k]:.6g}" for k in ("fid", "kid", "precision", "recall", "mem_ratio", "mem_frac_close")
                          if k in result)
        print(f"{nums} | {result['n_fake']} fake vs {result['n_real']} real | protocol {result['protocol']}", flush=True)
    for w in written:
        print(f"wrote {w}", flush=True)
    return written


if __name__ == "__main__":
    with user_errors():
        main()
