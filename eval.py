"""Evaluate any method's checkpoint, or a folder of generated images: FID / KID / precision-recall / memorisation,
sample grids, latent interpolations and style-mixing grids.

    python eval.py runs/fastgan-pokemon-256-0-... --metrics fid,kid,pr --n 5000
    python eval.py runs/x/ckpt/last.pt --metrics none --grid --interp --psi 0.7
    python eval.py --fake-dir my_samples/ --data pokemon --res 256 --metrics fid,kid
    python eval.py runs/x --metrics mem --mem-grid          # nearest training images of the closest fakes
    python eval.py runs/x --metrics none --save-images fakes/ --seeds 0-4999   # fakes/seed0000.png ... (--fake-dir)
    python eval.py runs/x --metrics none --gif walk.gif --gif-seeds 0-7 --gif-frames 30 --gif-fps 30
    python eval.py runs/x --metrics none --export g.pt   # TorchScript: torch.jit.load('g.pt')(z) -> images
    python eval.py runs/x --metrics none --project photo.png --steps 500   # the latent that reproduces photo.png
    python eval.py runs/x --metrics none --mem-project 16 --holdout unseen/   # training vs held-out reconstruction

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

--export OUT.pt: the EMA generator as TorchScript (torch.jit.trace of Sampler.generate, checked against it on another
batch size), loadable without this repository: G = torch.jit.load(OUT.pt); G(latents) -> images [n, 3, res, res] in
[-1, 1], no autograd, on the device it was traced on (--device; the trace holds device constants: export once per
device rather than map_location elsewhere); attributes G.method, G.res, G.latent_dim, G.latent_doc, G.noise,
G.device; extra files latent.txt and export.json (torch.jit.load(..., _extra_files={"export.json": ""})); recent
torch (2.14) calls TorchScript deprecated (it still loads, also from C++). Deterministic and batch-independent:
BatchNorm in eval mode (bn=recompute or copy; bn=batch is refused) and noise=const baked in (fastgan, adafm: one
fixed N(0, 1) map per noise layer, shared by all samples; insgen: the learned constant maps) -- so the export
reproduces `--sampler-opt noise=const` images, not the default per-sample random noise. Latents (float32):
  fastgan  z [n, nz] ~ N(0, I)
  adafm    z [n, z_dim] ~ N(0, I) (unconditional generators only)
  insgen   z [n, 512] ~ N(0, I); the mapping network and truncation (--psi) are inside
  disp     [z ; prior] [n, z_dim + prior_dim]: z ~ N(0, I) (truncated to [-psi, psi] with --psi), prior = an image's
           self-supervised feature; training images' priors ship in the export as G.priors [N, prior_dim]; the
           default sampler draws mixups t * priors[i] + (1 - t) * priors[j], t ~ U[0, 1]

--project IMAGE... [--steps N]: the latent that best reproduces each image (files or folders, resized as the training
set: --res, --crop). Start: the best (pixel MSE) of --proj-init samples of --seed; then N Adam steps (StyleGAN2
projector's learning-rate schedule, peak --proj-lr) on pixel MSE in [-1, 1], plus LPIPS (VGG16 v0.1, images at
64..256 px) when its weights are local (--vgg-weights / --lpips-weights, the torch.hub cache, the lpips package;
never downloaded): a printed line says which loss ran. Optimised (Sampler.proj_init / proj_generate): z for fastgan
and adafm, W for insgen (one w [n, 512], broadcast to every layer), the whole [z ; prior] for disp -- through the
deterministic mode --export uses (noise=const; no bn=batch). Writes <tag>-project.png (a row per image: target, the
start, 6 intermediate steps, the reconstruction), <tag>-project.json (mse, lpips, loss at the start and the end) and
<tag>-project-latents.pt. --mem-project N: the same for N random training images (disp --max-images M: among the
first M) and N held-out ones (--holdout DATA, or disp's images after the first M): mean distances and held-out /
train (a memorising model reproduces its training images much better: ratio >> 1); <tag>-memproj.png (rows: train
targets, reconstructions, held-out targets, reconstructions) and <tag>-memproj.json.
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

from common.output import load_checkpoint, save_grid
from common.run import pick_device, user_errors, UserError
from common.sampling import save_style_mix

METRICS = ("fid", "kid", "pr", "mem")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(q for q in __doc__.split("\n\n")
                                                     if q.startswith(("--export", "--project"))))
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
    p.add_argument("--export", default=None, metavar="OUT.pt",
                   help="write the generator as self-contained TorchScript: torch.jit.load(OUT.pt)(latents) -> images "
                        "[n, 3, res, res] in [-1, 1], no repository needed; the latents of each method: see below (also "
                        "in the export: .latent_doc, extra file latent.txt); noise=const baked in")
    p.add_argument("--project", nargs="+", default=None, metavar="IMAGE",
                   help="find the latent that best reproduces each IMAGE (files or folders; Adam on the method's "
                        "latent: z, InsGen W, DISP [z ; prior]; pixel MSE, plus LPIPS when its weights are local); "
                        "writes <tag>-project.png (rows: target, optimisation steps, reconstruction), .json, -latents.pt")
    p.add_argument("--steps", type=int, default=300, help="--project / --mem-project: Adam steps")
    p.add_argument("--proj-lr", type=float, default=0.1,
                   help="--project: peak Adam learning rate (StyleGAN2 projector's warm-up and cosine ramp-down)")
    p.add_argument("--proj-init", type=int, default=64,
                   help="--project: start from the best (pixel MSE) of this many samples of --seed")
    p.add_argument("--vgg-weights", default=None,
                   help="--project LPIPS: torchvision VGG16 file (default: the torch.hub cache's vgg16-397923af.pth)")
    p.add_argument("--lpips-weights", default=None,
                   help="--project LPIPS: LPIPS v0.1 vgg.pth (default: torch.hub cache lpips_v0.1_vgg.pth or the lpips "
                        "package's); without both files locally the loss is pixel MSE alone (never downloads)")
    p.add_argument("--mem-project", type=int, default=0, metavar="N",
                   help="memorisation by projection (the --mem-grid question without Inception): project N training "
                        "images (and N of --holdout) and compare reconstruction distances; writes <tag>-memproj.png/.json")
    p.add_argument("--holdout", default=None, metavar="DATA",
                   help="--mem-project: images the model was NOT trained on (folder or dataset name, as --data)")
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
    """Whether sampler.generate gives each latent the image it gets alone (SamplerBase.batch_independent, which
    batch-statistic BatchNorm and insgen's noise=random override)."""
    return bool(sampler.batch_independent)


def require_batch_independent(sampler, flag):
    if not batch_independent(sampler):
        raise UserError(f"{flag} needs images that depend on their own latent only: not BatchNorm with batch "
                        "statistics (use --sampler-opt bn=recompute or bn=copy)")


def seed_latents(sampler, seeds):
    """Row i: the latent of seed seeds[i], sampler.latents(1, seeds[i])."""
    return torch.cat([sampler.latents(1, s) for s in seeds])


def generate_each(sampler, z, batch):
    """generate() in chunks of `batch`, or one latent per call where the images would depend on the batch."""
    return generate(sampler, z, batch if batch_independent(sampler) else 1)


def save_seed_images(sampler, seeds, folder, batch):
    """folder/seed%04d.png for every seed: the image of sampler.latents(1, seed). Returns the paths."""
    from PIL import Image
    from common.output import to_uint8
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
    from common.output import to_uint8
    z = seed_latents(sampler, seeds)
    zs = interp_latents(z, torch.roll(z, -1, 0), frames, endpoint=False)
    imgs = to_uint8(generate_each(sampler, zs, batch)).permute(0, 2, 3, 1).numpy()
    ims = [Image.fromarray(im) for im in imgs]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(round(1000 / fps)), loop=0)
    return path


class _Generate(torch.nn.Module):
    """sampler.generate as a module (its G a submodule, so tracing keeps G's weights as parameters)."""

    def __init__(self, sampler):
        super().__init__()
        self.G, self.sampler = sampler.G, sampler

    def forward(self, z):
        return self.sampler.generate(z)


class Exported(torch.nn.Module):
    """What --export writes (scripted): forward(latents [n, latent_dim]) -> images [n, 3, res, res] in [-1, 1] on
    `device` (the device it was traced on; latents are moved there), without autograd; attributes method, res,
    latent_dim, latent_doc, noise, device; DISP also the buffer priors."""
    method: str
    res: int
    latent_dim: int
    latent_doc: str
    noise: str
    device: str

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


def export_opts(mod, opts, flag="--export"):
    """The user's sampler options plus the method's Sampler.export_opts (a deterministic mode, e.g. noise=const:
    what --export bakes in and --project optimises through); a clash is a user error."""
    want = dict(getattr(getattr(mod, "Sampler", None), "export_opts", None) or {})
    for k, v in want.items():
        if k in opts and opts[k] != v:
            raise UserError(f"{flag} uses the sampler option {k}={v} (deterministic images): drop "
                            f"--sampler-opt {k}={opts[k]}")
    return {**opts, **want}


def export_generator(sampler, path, meta):
    """torch.jit.trace of sampler.generate (eval mode, no grad) at batch 2, checked against generate() at batch 3,
    wrapped in a scripted Exported and saved with the latent description and `meta` as extra files latent.txt and
    export.json. Returns (path, the check's max abs difference)."""
    import warnings
    sampler.export_check()
    require_batch_independent(sampler, "--export")
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
    with torch.no_grad():
        err = float((m(z3).float() - sampler.generate(z3).float()).abs().max())
    if not err <= 1e-4:
        raise RuntimeError(f"--export: the traced generator differs from Sampler.generate by {err:.3g} on a new batch "
                           "size (a shape baked into the trace?)")
    meta = {**meta, "latent_dim": int(z.shape[1]), "res": int(sampler.res), "latent_doc": doc, "noise": noise,
            "trace_check_max_abs_diff": err, "torch": torch.__version__, "traced_on": str(z.device)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", FutureWarning)
        torch.jit.save(m, path, _extra_files={"latent.txt": doc, "export.json": json.dumps(meta, indent=1)})
    return path, err


def find_lpips(vgg_path=None, lin_path=None):
    """(LPIPSVGG with real weights, where from) when both weight files are local: the given paths, else the torch.hub
    cache (vgg16-397923af.pth, lpips_v0.1_vgg.pth) and the lpips package's vgg.pth; (None, why not) otherwise. Never
    downloads. A given path that does not load is a user error."""
    import importlib.util
    from fastgan import LIN_URL, VGG_URL, LPIPSVGG
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    vgg = vgg_path or os.path.join(hub, os.path.basename(VGG_URL))
    lins = [lin_path] if lin_path else [os.path.join(hub, "lpips_v0.1_vgg.pth")]
    spec = None if lin_path else importlib.util.find_spec("lpips")
    if spec and spec.origin:
        lins.append(os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth"))
    lin = next((f for f in lins if os.path.isfile(f)), None)
    if not os.path.isfile(vgg) or lin is None:
        if vgg_path or lin_path:
            raise UserError(f"--vgg-weights / --lpips-weights: {vgg if not os.path.isfile(vgg) else lins[0]} does not exist")
        return None, f"LPIPS off: no local weights ({vgg} and {lins[0]}; pass --vgg-weights and --lpips-weights)"
    net = LPIPSVGG()
    try:
        sd = torch.load(vgg, map_location="cpu", weights_only=True)
        net.features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
        sd = torch.load(lin, map_location="cpu", weights_only=True)
        net.lins.load_state_dict({f"{k[3]}.weight": v for k, v in sd.items() if k.endswith("model.1.weight")})
    except Exception as e:
        raise UserError(f"LPIPS weights {vgg} / {lin} do not load ({type(e).__name__}): pass other --vgg-weights / "
                        "--lpips-weights files (torchvision's VGG16 and LPIPS v0.1 vgg.pth)")
    return net, f"LPIPS v0.1 VGG16 from {vgg} and {lin}"


def proj_lr(t):
    """Learning-rate factor at progress t in [0, 1): StyleGAN2's projector schedule (5 % linear warm-up, cosine
    ramp-down over the last 25 %)."""
    r = min(1.0, (1.0 - t) / 0.25)
    return (0.5 - 0.5 * np.cos(r * np.pi)) * min(1.0, t / 0.05)


def project(sampler, target, steps, lr=0.1, n_init=64, seed=0, lpips=None, snaps=6, log=None):
    """Find sampler.proj_init-kind variables v whose proj_generate(v) reproduce `target` ([n, 3, res, res] in [-1, 1]):
    the best of n_init latents (sampler.latents(n_init, seed)) by the loss, then `steps` Adam steps on
    loss = pixel MSE (+ LPIPS when `lpips` is given), images independent (per-image losses summed).
    Returns dict v, img (final), per-image mse / lpips / loss at the start (init_*) and end, snapshots
    [n, snaps + 2, 3, res, res] (the start, snaps steps in between, the end). log: a prefix to print the mean loss
    with, about every steps / 5 steps."""
    dev, t0 = sampler.latents(1, 0).device, time.time()
    target = target.to(dev).float()

    def losses(img):
        mse = ((img.float() - target) ** 2).mean((1, 2, 3))
        if lpips is None:
            return mse, None
        size = min(max(target.shape[-1], 64), 256)
        a, b = (F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                if x.shape[-1] != size else x for x in (img.float(), target))
        lp = lpips(a, b)
        return mse, lp

    with torch.no_grad():  # initial latents: the best of n_init samples for each target (pixel MSE)
        cand = sampler.latents(n_init, seed)
        imgs = generate(sampler, cand, 16).to(dev)
        d = torch.stack([((imgs[j:j + 1] - target) ** 2).mean((1, 2, 3)) for j in range(n_init)])  # [n_init, n]
        v = sampler.proj_init(cand[d.argmin(0)]).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr, betas=(0.9, 0.999))
    at = sorted({round(i * steps / (snaps + 1)) for i in range(1, snaps + 1)})
    shots, first = [], None
    with sampler.differentiable():
        for step in range(steps + 1):
            img = sampler.proj_generate(v)
            if not img.requires_grad:
                raise UserError(f"{type(sampler).__module__}'s Sampler.generate is not differentiable: decorate it "
                                "with @SamplerBase.sampler_grad instead of @torch.no_grad() (common/utils.py)")
            mse, lp = losses(img)
            loss = mse if lp is None else mse + lp
            if step == 0:
                first = {"init_mse": mse.detach().cpu(), "init_lpips": None if lp is None else lp.detach().cpu(),
                         "init_loss": loss.detach().cpu()}
            if step in (0, steps) or step in at:
                shots.append(img.detach().float().cpu())
            if log is not None and (step % max(steps // 5, 1) == 0 or step == steps):
                print(f"{log}step {step}/{steps}: mean mse {float(mse.mean()):.4f} ({time.time() - t0:.0f} s)", flush=True)
            if step == steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr * proj_lr(step / steps)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
    return {"v": v.detach(), "img": shots[-1], "mse": mse.detach().cpu(), "lpips": None if lp is None else lp.detach().cpu(),
            "loss": loss.detach().cpu(), "snapshots": torch.stack(shots, 1), **first}


def read_targets(paths, res, crop):
    """--project IMAGE...: files, or folders of images, -> ([n, 3, res, res] in [-1, 1], file paths)."""
    from common.data import list_images, load_image
    files = []
    for p in paths:
        files += list_images(p) if os.path.isdir(p) else [p]
    if not files:
        raise UserError(f"--project {' '.join(paths)}: no images found")
    out = []
    for f in files:
        try:
            out.append(load_image(f, res, crop))
        except (OSError, ValueError) as e:
            raise UserError(f"--project {f}: cannot read the image ({type(e).__name__}); pass an image file or folder")
    return torch.stack(out).float() / 127.5 - 1, files


def project_all(sampler, target, args, lpips):
    """project() in chunks of --batch; per-image results concatenated."""
    parts = [project(sampler, target[i:i + args.batch], args.steps, args.proj_lr, args.proj_init, args.seed, lpips,
                     log=f"project images {i + 1}-{min(i + args.batch, len(target))} of {len(target)}: ")
             for i in range(0, len(target), args.batch)]
    return {k: None if parts[0][k] is None else torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}


def proj_rows(r, i):
    return {k: float(f"{float(r[k][i]):.6g}") for k in ("mse", "lpips", "loss", "init_mse", "init_lpips", "init_loss")
            if r[k] is not None}


def projections(args, mod, ckpt, ckpt_args, sampler, opts, device, res, out, tag):
    """--project IMAGE... and --mem-project N: returns the files written."""
    p_opts = export_opts(mod, opts, "--project")
    ps = sampler if p_opts == opts else load_sampler(mod, ckpt, device, p_opts)
    require_batch_independent(ps, "--project")
    lp, lp_src = find_lpips(args.vgg_weights, args.lpips_weights)
    if lp is not None:
        lp = lp.to(device)
    kind = "mse+lpips" if lp is not None else "mse"
    print(f"projection loss: {'pixel MSE + LPIPS' if lp is not None else 'pixel MSE only'} ({lp_src}); optimising "
          f"{ps.proj_space}, {args.steps} Adam steps from the best of {args.proj_init} samples; sampler options {p_opts}",
          flush=True)
    crop = args.crop or ckpt_args.get("crop", "squash")
    info = {"loss": kind, "lpips_source": lp_src, "space": ps.proj_space, "steps": args.steps, "lr": args.proj_lr,
            "n_init": args.proj_init, "seed": args.seed, "sampler_opts": p_opts, "res": res, "method": ckpt["method"],
            "step": ckpt.get("step")}
    written = []
    if args.project:
        target, files = read_targets(args.project, res, crop)
        r = project_all(ps, target, args, lp)
        rows = [{"image": f, **proj_rows(r, i)} for i, f in enumerate(files)]
        grid = torch.cat([torch.cat([target[i:i + 1], r["snapshots"][i]]) for i in range(len(files))])
        written.append(os.path.join(out, f"{tag}-project.png"))
        save_grid(grid, written[-1], nrow=r["snapshots"].shape[1] + 1)
        written.append(os.path.join(out, f"{tag}-project-latents.pt"))
        torch.save({"space": ps.proj_space, "v": r["v"], "images": files, "sampler_opts": p_opts}, written[-1])
        written.append(os.path.join(out, f"{tag}-project.json"))
        with open(written[-1], "w") as f:
            json.dump({**info, "images": rows, "mean_mse": float(r["mse"].mean())}, f, indent=1)
        for row in rows:
            print(f"projected {row['image']}: mse {row['mse']:.4g} (start {row['init_mse']:.4g})"
                  + (f", lpips {row['lpips']:.4g}" if "lpips" in row else ""), flush=True)
    if args.mem_project:
        from common.data import load_dataset
        root = args.data_root or ckpt_args.get("data_root") or os.environ.get("GAN_DATA_ROOT", "data")
        data = args.data or ckpt_args.get("data")
        if not data:
            raise UserError("--mem-project needs the training set: --data NAME or folder")
        ds = load_dataset(data, res, root, crop)
        n_train = int(ckpt_args.get("max_images") or 0) or len(ds)  # disp --max-images N: the first N images
        pools = {"train": (ds, range(min(n_train, len(ds))), data)}
        if args.holdout:
            hd = load_dataset(args.holdout, res, root, crop)
            pools["heldout"] = (hd, range(len(hd)), args.holdout)
        elif n_train < len(ds):
            pools["heldout"] = (ds, range(n_train, len(ds)), f"{data} images {n_train}.. (not in --max-images {n_train})")
        res_sets, grid = {}, []
        for name, (d, pool, what) in pools.items():
            pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))[:args.mem_project]
            idx = torch.tensor([pool[int(i)] for i in pick])
            target = d.uint8(idx).float() / 127.5 - 1
            r = project_all(ps, target, args, lp)
            res_sets[name] = {"data": what, "n": len(idx), "index": idx.tolist(), "mean_mse": float(r["mse"].mean()),
                              "mean_loss": float(r["loss"].mean()), "images": [proj_rows(r, i) for i in range(len(idx))]}
            if r["lpips"] is not None:
                res_sets[name]["mean_lpips"] = float(r["lpips"].mean())
            grid += [target, r["img"]]
        result = {**info, **res_sets}
        line = " | ".join(f"{k} mse {v['mean_mse']:.4g} (n {v['n']})" for k, v in res_sets.items())
        if "heldout" in res_sets:
            result["heldout_over_train"] = res_sets["heldout"]["mean_loss"] / max(res_sets["train"]["mean_loss"], 1e-12)
            line += f" | held-out / train {kind} {result['heldout_over_train']:.3g} (>> 1: training images reproduced better)"
        else:
            line += " (no held-out set: add --holdout DATA)"
        print(f"--mem-project ({kind}, {args.steps} steps): {line}", flush=True)
        n = max(len(g) for g in grid)  # rows: train targets, their reconstructions, then held-out ones; black padding
        grid = [torch.cat([g, -torch.ones(n - len(g), *g.shape[1:])]) for g in grid]
        written.append(os.path.join(out, f"{tag}-memproj.png"))
        save_grid(torch.cat(grid), written[-1], nrow=n)
        written.append(os.path.join(out, f"{tag}-memproj.json"))
        with open(written[-1], "w") as f:
            json.dump(result, f, indent=1)
    return written


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
    if (args.project or args.mem_project) and (args.steps < 0 or args.proj_init < 1 or args.mem_project < 0):
        raise UserError("--project / --mem-project need --steps >= 0, --proj-init >= 1 and --mem-project >= 0")
    if args.holdout and not args.mem_project:
        raise UserError("--holdout is the held-out set of --mem-project N: add --mem-project 8 (say)")
    device = pick_device(args.device)

    info, ckpt_args, sampler = {}, {}, None
    if args.fake_dir:
        if args.interp or args.mix:
            raise UserError("--interp and --mix need a checkpoint, not --fake-dir")
        if args.save_images or args.gif or args.export or args.project or args.mem_project:
            raise UserError("--save-images, --gif, --export, --project and --mem-project need a checkpoint, not --fake-dir")
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
    if args.export:
        ex_opts = export_opts(mod, opts)
        ex = sampler if ex_opts == opts else load_sampler(mod, ckpt, device, ex_opts)
        _, err = export_generator(ex, args.export, {**info, "sampler_opts": ex_opts})
        print(f"exported {ckpt['method']} generator (latents [n, {ex.latents(1, 0).shape[1]}] -> [n, 3, {ex.res}, "
              f"{ex.res}]; sampler options {ex_opts}; traced, max |export - generate| {err:.2g})", flush=True)
        written.append(args.export)
    if args.project or args.mem_project:
        written += projections(args, mod, ckpt, ckpt_args, sampler, opts, device, res, out, tag)

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
