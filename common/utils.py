"""Run plumbing shared by every method script: flags, errors, seeding, devices, DDP, run directories,
checkpoints and resume, progress lines, interrupts, image grids (samples, style mixing) and --bench timing.
Nothing here knows about any GAN."""
import functools
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """An error the user can fix (bad path, bad flag, mismatched checkpoint...). Printed as one line, exit code 2."""


@contextmanager
def user_errors():
    """Wrap a script's main: a UserError becomes one 'error: ...' line on stderr and exit code 2, no traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def add_common_args(p, *, res, batch, iters, lr, data="digits", sample_every=1000, ckpt_every=1000,
                    eval_every=0, eval_n=5000, log_every=100):
    """The flags every method script shares, with the same names and meanings. Defaults are the method's paper values."""
    g = p.add_argument_group("common")
    g.add_argument("--data", default=data, help="dataset NAME (digits, shells, pokemon, ...) or a folder of images")
    g.add_argument("--data-root", default=os.environ.get("GAN_DATA_ROOT", "data"),
                   help="where named datasets live: <data-root>/<name> (env GAN_DATA_ROOT)")
    g.add_argument("--res", type=int, default=res, help="image resolution (power of two)")
    g.add_argument("--crop", choices=["squash", "center"], default="squash",
                   help="squash: resize to res x res; center: centre-crop a square, then resize")
    g.add_argument("--no-flip", action="store_true", help="disable random horizontal flips of real images")
    g.add_argument("--batch", type=int, default=batch, help="total batch size (split across torchrun processes)")
    g.add_argument("--iters", type=int, default=iters, help="total training iterations (a resumed run stops at the same total)")
    g.add_argument("--lr", type=float, default=lr, help="learning rate")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--out", default=None, help="run directory (default runs/<method>-<data>-<res>-<seed>-<time>)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--resume", default=None, help="'auto' (continue <out>/ckpt/last.pt if it exists) or a checkpoint path")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA and CPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the networks whose training needs no double backward (R1 / path length do; "
                        "the script's docstring says which); slow first iterations")
    g.add_argument("--workers", type=int, default=2, help="data-loading workers for large (streamed) datasets")
    g.add_argument("--log-every", type=int, default=log_every, help="print a progress line every N iterations")
    g.add_argument("--sample-every", type=int, default=sample_every, help="write samples/<step>.png every N iterations")
    g.add_argument("--ckpt-every", type=int, default=ckpt_every, help="write ckpt/last.pt every N iterations")
    g.add_argument("--eval-every", type=int, default=eval_every, help="FID/KID every N iterations (0: off; needs Inception weights)")
    g.add_argument("--eval-n", type=int, default=eval_n, help="generated images per evaluation")
    g.add_argument("--inception", default=None, help="local path of inception-2015-12-05.pt (env GAN_INCEPTION)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log to TensorBoard under <out>/tb/: every metrics.jsonl value (losses, FID/KID, ADA p, "
                        "...), it/s and the sample grids (needs `pip install tensorboard`)")
    return g


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name="auto", local_rank=0):
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this PyTorch sees no CUDA GPU: use --device cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


class Dist:
    """Process-group facts. Under `torchrun` (any --nproc_per_node, 1 included: the NCCL path can be checked on one GPU)
    this initialises torch.distributed (NCCL on CUDA, gloo on CPU) and `wrap` returns DDP modules. On CUDA it also
    turns on cuDNN's autotuner (fixed shapes in every training loop here)."""

    def __init__(self, device_arg="auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(device_arg, self.local_rank)
        self.ddp = self.world > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if self.ddp and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def per_rank_batch(self, batch):
        if batch % self.world:
            raise UserError(f"--batch {batch} does not split over {self.world} processes: use a multiple of {self.world}")
        return batch // self.world

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def wrap(self, model, **kw):
        """`model` itself in one process; under torchrun DistributedDataParallel(model, **kw) on this rank's device."""
        if not self.ddp:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **kw)

    def close(self):
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def prepare_run_dir(args, method, is_main=True):
    """Fill in args.out, make <out>/samples and <out>/ckpt, write args.json. Returns the run directory.
    Under torchrun every rank gets rank 0's default directory name (the clocks of the ranks may differ)."""
    if args.out is None:
        data = os.path.basename(os.path.normpath(str(args.data)))
        box = [os.path.join("runs", f"{method}-{data}-{args.res}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, 0)
        args.out = box[0]
    if is_main:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        if getattr(args, "tensorboard", False):
            open_tensorboard(os.path.join(args.out, "tb"))
    return args.out


# --tensorboard: one writer per process, opened by prepare_run_dir (main process only) and fed by log_metrics,
# Progress and save_grid, i.e. from the very values metrics.jsonl, the progress line and samples/ get.
_TB = {"writer": None, "step": 0}


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, imported lazily; without the tensorboard package one UserError line."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard (or run without "
                        "--tensorboard)")
    return SummaryWriter


def open_tensorboard(logdir, writer=None):
    """Start logging to TensorBoard in `logdir` (`writer`: an object with add_scalar/add_image/flush/close to use
    instead of a SummaryWriter). Returns the writer."""
    import atexit
    close_tensorboard()
    _TB["writer"] = writer if writer is not None else summary_writer_class()(log_dir=logdir)
    _TB["step"] = 0
    atexit.register(close_tensorboard)
    return _TB["writer"]


def close_tensorboard():
    w, _TB["writer"] = _TB["writer"], None
    if w is not None:
        w.close()


def tb_scalars(record, step=None):
    """Every number of `record` (bools and non-numbers skipped; 'iter'/'step' is the x axis) as a TensorBoard scalar."""
    w = _TB["writer"]
    if w is None:
        return
    step = record.get("iter", record.get("step", _TB["step"])) if step is None else step
    _TB["step"] = int(step)
    for k, v in record.items():
        if k in ("iter", "step") or isinstance(v, bool):
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)):  # bools were skipped above
            w.add_scalar(k, float(v), int(step))


def run_checkpoint(args):
    """<out>/ckpt/last.pt of this run if it exists, else None (also when --out is not set yet)."""
    path = os.path.join(args.out, "ckpt", "last.pt") if getattr(args, "out", None) else None
    return path if path and os.path.isfile(path) else None


def resolve_resume(args):
    """--resume auto -> <out>/ckpt/last.pt if present (else None: fresh start); --resume PATH -> PATH (must exist)."""
    if not args.resume:
        return None
    if args.resume == "auto":
        return run_checkpoint(args)
    if not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such checkpoint file (use --resume auto to start fresh when none exists)")
    return args.resume


def check_flags(ckpt, path, args, names, defaults=None):
    """The flags `names` (they fix the networks' shapes) must be the checkpoint's; one its args lack takes its value
    from `defaults` (older checkpoints), else it is not checked (the state_dicts then must still fit)."""
    defaults = defaults or {}
    for k in names:
        if k not in ckpt["args"] and k not in defaults:
            continue
        old = ckpt["args"].get(k, defaults.get(k))
        if old != getattr(args, k):
            raise UserError(f"checkpoint {path} was trained with --{k.replace('_', '-')} {old}, this run asks for "
                            f"{getattr(args, k)}: the architecture must be the same (use the same flags, or a new "
                            "--out)")


def read_resume(args, method, arch=(), defaults=None):
    """--resume, read and checked before any expensive set-up (data, priors, source weights, networks):
    (checkpoint, path) of a readable checkpoint written by `method` with the flags `arch` unchanged (check_flags);
    (None, None) for a fresh start."""
    if getattr(args, "tensorboard", False):
        summary_writer_class()  # --tensorboard without the package: fail here, before any slow set-up
    path = resolve_resume(args)
    ckpt = None
    if path:
        ckpt = load_checkpoint(path)
        check_method(ckpt, method, path)
        check_flags(ckpt, path, args, arch, defaults)
    mine = run_checkpoint(args)
    if mine and not (path and os.path.samefile(path, mine)):
        # a fresh start (or a resume from elsewhere) would overwrite this run's checkpoint at its first save
        raise UserError(f"--out {args.out} already holds a run ({mine}): add --resume auto to continue it, or pick a "
                        "new --out (nothing was written)")
    return ckpt, path


def load_state_dicts(ckpt, path, saved):
    """obj.load_state_dict(ckpt[k]) for every entry k -> obj of `saved`; a mismatch is one UserError line."""
    try:
        for k, obj in saved.items():
            obj.load_state_dict(ckpt[k])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path} does not match the networks these flags build ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}): use the run's own flags, or a new --out")


def resume(ckpt, path, saved, dist, args):
    """Continue a run: every entry of `saved` (checkpoint key -> object with load_state_dict: networks, optimizers,
    ...) from the checkpoint, then the RNG states (restore_rng). Returns (step, best FID). A run's checkpoint holds
    exactly these entries (its `state`), so what is saved is what is loaded."""
    load_state_dicts(ckpt, path, saved)
    step = ckpt["step"]
    restore_rng(ckpt["rng"], dist.rank, args.seed, step)
    if dist.is_main:
        print(f"resumed from {path} at iteration {step}", flush=True)
    return step, ckpt.get("best_fid", float("inf"))


def save_checkpoint(obj, path):
    """Write to <path>.tmp, then rename: a crash mid-write never corrupts the previous checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist: pass the path of a .pt file or a run directory")
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        "is it a complete file written by this project?")


def check_method(ckpt, method, path=""):
    got = ckpt.get("method") if isinstance(ckpt, dict) else None
    if got != method:
        raise UserError(f"checkpoint {path} was written by {got!r}, not {method!r}: load it with {got}.py")


def rng_state():
    """All RNG states in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    torch.set_rng_state(st["torch"])
    v, s, g = st["python"]
    random.setstate((v, tuple(s), g))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def restore_rng(state, rank, seed, step):
    """Resume. One process: its saved RNG state, exactly (same losses as an uninterrupted run). Under torchrun only
    rank 0's state is saved: ranks > 0 reseed from (seed, rank, step), distinct streams per rank (not rank 0's copy),
    reproducible, but not bit-equal to an uninterrupted multi-process run."""
    set_rng_state(state)
    if rank:
        seed_everything(seed + 1000 * rank + 7919 * step)


def check_finite(losses, step, out=None):
    """Stop with one clear line on NaN/inf instead of silently writing broken checkpoints."""
    for k, v in losses.items():
        if not math.isfinite(float(v)):
            where = f"; the last good checkpoint is {os.path.join(out, 'ckpt', 'last.pt')}" if out else ""
            raise UserError(f"loss {k} became {float(v)} at iteration {step}: lower --lr or run without --amp{where}")


class Progress:
    """Prints 'it 120/50000 | 3.41 it/s | ETA 4h03m | loss_d 0.52 loss_g 1.20' every `every` iterations
    and appends the same numbers as {"iter": it, ...} to <out>/metrics.jsonl when `out` is given (and it/s to
    TensorBoard with --tensorboard). On a terminal (`stream`, default sys.stdout, isatty()) the same text is one live
    line instead, '[#####.....]  42% it ...', rewritten in place with '\r' (every `every` iterations and at most
    every `refresh` seconds in between) and ended with a newline at the last iteration; plain logs get lines."""

    def __init__(self, total, start=0, every=100, enabled=True, out=None, stream=None, refresh=0.5):
        self.total, self.every, self.enabled, self.out = total, every, enabled, out
        self.t0, self.i0 = time.time(), start
        self.stream, self.refresh, self._shown, self._width = stream, refresh, 0.0, 0

    def rate(self, it):
        return (it - self.i0) / max(time.time() - self.t0, 1e-9)

    def line(self, it, r, losses):
        eta = (self.total - it) / max(r, 1e-9)
        h, m = divmod(int(eta) // 60, 60)
        vals = " ".join(f"{k} {float(v):.4g}" for k, v in losses.items())
        return f"it {it}/{self.total} | {r:.3g} it/s | ETA {h}h{m:02d}m | {vals}"

    def __call__(self, it, **losses):
        if not self.enabled:
            return
        stream = self.stream or sys.stdout
        due = not (it % self.every and it != self.total)
        tty = bool(getattr(stream, "isatty", lambda: False)())
        # on a terminal also between log steps, but at most every `refresh` s (float(loss) may wait for the GPU)
        if not due and not (tty and time.time() - self._shown >= self.refresh):
            return
        r = self.rate(it)
        text = self.line(it, r, losses)
        if tty:
            frac = min(max(it / max(self.total, 1), 0.0), 1.0)
            text = f"[{'#' * int(frac * 20):.<20}] {frac * 100:3.0f}% {text}"
            pad = " " * max(self._width - len(text), 0)  # blank what a longer previous bar left
            self._width = len(text)
            stream.write("\r" + text + pad + ("\n" if it >= self.total else ""))
            stream.flush()
            self._shown = time.time()
        else:
            print(text, file=stream, flush=True)
        if due:
            tb_scalars({"it_per_s": r}, it)
            if self.out:
                log_metrics(self.out, {"iter": it, **{k: float(v) for k, v in losses.items()}})


class StopOnInterrupt:
    """First Ctrl-C (SIGINT) only sets `requested`: the training loop finishes the current iteration, saves
    ckpt/last.pt at that completed step and exits 130, so the saved run resumes exactly. A second Ctrl-C raises
    KeyboardInterrupt at once (nothing is saved). `restore()` puts the previous handler back."""

    def __init__(self, verbose=True):
        self.requested, self.verbose, self._old = False, verbose, None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print("Ctrl-C: finishing this iteration, then saving ckpt/last.pt (Ctrl-C again to abort without saving)",
                  flush=True)

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class SetupInterrupt:
    """Wrap a script's set-up (data, priors, source weights, models: minutes before the first iteration): a Ctrl-C
    there (KeyboardInterrupt) becomes one 'interrupted during set-up (...)' line on stderr and exit code 130, no
    traceback; the detail is the KeyboardInterrupt's message when it has one (what was kept). Call `done()` where
    the training loop's StopOnInterrupt takes over: later KeyboardInterrupts (its second Ctrl-C, 'abort at once')
    pass through unchanged."""

    def __init__(self):
        self.active = True

    def done(self):
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if typ is KeyboardInterrupt and self.active:
            detail = str(e) or "before the first training step; rerun the same command"
            print(f"interrupted during set-up ({detail})", file=sys.stderr, flush=True)
            sys.exit(130)
        return False


def log_metrics(out, record):
    """Append one JSON line to <out>/metrics.jsonl (and its numbers to TensorBoard with --tensorboard)."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    tb_scalars(record)


def to_uint8(x):
    """[-1, 1] float NCHW -> uint8 NCHW."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images, path, nrow=None):
    """Save a [-1, 1] NCHW batch as one PNG grid (written to a temp file, then renamed)."""
    import torchvision.utils as vutils
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = vutils.make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1))
    tmp = path + ".tmp.png"
    vutils.save_image(grid, tmp)
    os.replace(tmp, path)
    if _TB["writer"] is not None:  # --tensorboard: samples/<step>.png as image 'samples', others by their name
        stem = os.path.splitext(os.path.basename(path))[0]
        m = re.fullmatch(r"(.*?)_?(\d+)", stem)  # 000100 -> ('samples', 100); mix_000100 -> ('mix', 100)
        tag, step = ((m.group(1) or "samples"), int(m.group(2))) if m else (stem, _TB["step"])
        _TB["writer"].add_image(tag, grid, step)


@torch.no_grad()
def save_style_mix(sampler, path, seed=0, n_a=6, n_b=4, batch=64):
    """The style-mixing grid (eval.py --mix, and samples/style_mix.png at the end of training): a blank corner, the
    top row n_a samples a, the left column n_b samples b, cell (row r, column c) = sampler.style_mix(a_c, b_r)
    (a's coarse part, b's fine part; what each method swaps is in its Sampler.style_mix)."""
    if not callable(getattr(sampler, "style_mix", None)):
        raise UserError(f"{type(sampler).__module__}'s Sampler has no style_mix(lat_a, lat_b): no style-mixing grid")
    za, zb = sampler.latents(n_a, seed), sampler.latents(n_b, seed + 1)
    a_rep, b_rep = za.repeat(n_b, *[1] * (za.dim() - 1)), zb.repeat_interleave(n_a, 0)
    cat = lambda f, *zs: torch.cat([f(*(z[i:i + batch] for z in zs)).float().cpu()  # noqa: E731
                                    for i in range(0, len(zs[0]), batch)])
    ia, ib, mixed = cat(sampler.generate, za), cat(sampler.generate, zb), cat(sampler.style_mix, a_rep, b_rep)
    rows = [torch.cat([torch.ones_like(ia[:1]), ia])]
    rows += [torch.cat([ib[r:r + 1], mixed[r * n_a:(r + 1) * n_a]]) for r in range(n_b)]
    save_grid(torch.cat(rows), path, nrow=n_a + 1)
    return path


def time_steps(step, n, device):
    """--bench: the seconds of each of n + 1 calls of `step()` (the first one is the warm-up), CUDA synchronised."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for _ in range(n + 1):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def compiled(model, on):
    """--compile: torch.compile(model) for the training passes; checkpoints keep saving the plain module. Layers that
    share one forward() at many shapes recompile it per shape: the limit is raised from 8 so none falls back to eager."""
    if not on:
        return model
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model)


def autocast(device, enabled):
    """bf16 autocast on CUDA and CPU when --amp is set."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def latent_seeds(latents):
    """One seed per latent row, a hash of its float32 bytes: the same latent always gets the same seed, whatever
    batch it is in (so a sample is a deterministic function of its latent, i.e. of (seed, index))."""
    rows = latents.detach().float().cpu().contiguous().numpy()
    return [int.from_bytes(hashlib.sha1(r.tobytes()).digest()[:8], "little") >> 1 for r in rows]


class PerSampleNoise:
    """A noise source for a generator's noise-injection layers at sampling time: `noise(x)` returns N(0, 1) maps
    [n, 1, H, W] whose row i comes from row i's own torch.Generator (seeded by `seeds[i]`). The layers are called
    in the same order for every batch, so each sample's noise depends on its own seed only: no two samples share a
    noise map, and the batch size does not change any image."""

    PARALLEL_MIN = 1 << 20  # maps of at least this many values are drawn by torch.get_num_threads() threads

    def __init__(self, seeds):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, x):
        if x.shape[0] != len(self.gens):
            raise RuntimeError(f"PerSampleNoise made for {len(self.gens)} samples got a batch of {x.shape[0]}")
        # drawn on the CPU (the same maps on every device), into pinned memory for an asynchronous copy to a GPU;
        # large batches of large maps (1024 px sampling) in parallel threads, one generator per row: the same values
        maps = torch.empty(len(self.gens), 1, *x.shape[2:], pin_memory=x.device.type == "cuda")
        draw = lambda i: torch.randn(maps.shape[1:], generator=self.gens[i], out=maps[i])  # noqa: E731
        threads = min(torch.get_num_threads(), len(self.gens))
        if threads > 1 and maps.numel() >= self.PARALLEL_MIN:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(draw, range(len(self.gens))))
        else:
            for i in range(len(self.gens)):
                draw(i)
        return maps.to(device=x.device, dtype=x.dtype, non_blocking=True)


@functools.lru_cache(maxsize=512)
def _fixed_map(seed, h, w):
    # numpy, not torch.randn: under torch.jit.trace the map must be a constant, not a recorded (re-drawn) randn
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 1, h, w), dtype=np.float32))


class FixedNoise:
    """Sampler option noise=const for generators with per-sample noise: `noise(x)` is one N(0, 1) map [1, 1, H, W]
    (broadcast over the batch) drawn from `seed` (numpy PCG64), the same for every sample and every call.
    Deterministic, batch-independent and traceable (eval.py --export bakes it in)."""

    def __init__(self, seed):
        self.seed = int(seed)

    def __call__(self, x):
        return _fixed_map(self.seed, int(x.shape[2]), int(x.shape[3])).to(x)  # x's device and dtype


NOISE_MODES = ("random", "const")  # sampler option noise=... of the per-sample-noise generators (fastgan, adafm)
CONST_NOISE_SEED = 2 ** 21  # noise=const: layer i (in G.modules() order) draws its map from seed CONST_NOISE_SEED + i


def check_noise_mode(mode):
    """random: per-sample noise seeded by each latent (PerSampleNoise); const: fixed maps (FixedNoise)."""
    if mode not in NOISE_MODES:
        raise UserError(f"sampler option noise={mode!r}: use random or const")
    return mode


@contextmanager
def per_sample_noise(G, latents, noise_cls, mode="random"):
    """Inside the block every `noise_cls` module of G (which draws `self.noise_source(x)` when it is set, else
    torch.randn) takes its noise from PerSampleNoise(latent_seeds(latents)) (mode 'random'), or, mode 'const', from
    its own FixedNoise(CONST_NOISE_SEED + layer index)."""
    mods = [m for m in G.modules() if isinstance(m, noise_cls)]
    src = PerSampleNoise(latent_seeds(latents)) if mode == "random" else None
    for i, m in enumerate(mods):
        m.noise_source = src or FixedNoise(CONST_NOISE_SEED + i)
    try:
        yield
    finally:
        for m in mods:
            m.noise_source = None


BN_MODES = ("copy", "batch", "recompute")  # BatchNorm at sampling time (sampler option bn=...)


def check_bn_mode(mode):
    """copy: eval mode with the running statistics G carries (an EMA generator's are copied from the live G);
    batch: the statistics of each sampling batch (train-mode BN, as the FastGAN authors sample; an image then
    depends on its batch companions); recompute: running statistics recomputed for THIS generator
    (recompute_bn_stats), then eval mode."""
    if mode not in BN_MODES:
        raise UserError(f"sampler option bn={mode!r} is not one of {', '.join(BN_MODES)}")
    return mode


@contextmanager
def batch_stat_bn(G, on=True):
    """G in eval mode; with on=True its BatchNorms normalise with the statistics of the current batch (train mode)
    and leave their running buffers untouched (track_running_stats off inside the block)."""
    bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if on else []
    G.eval()
    for m in bns:
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.eval()
            m.track_running_stats = True


@torch.no_grad()
def recompute_bn_stats(G, z, forward, chunk=64):
    """Set every BatchNorm's running mean / (unbiased) variance to the mean / variance of its inputs over all
    latents z, from `forward(z_chunk)` (which runs G) in chunks with batch-statistic BN (everything else, spectral
    norm included, in eval mode). Exact pooled moments (per-chunk var_mean combined in float64, Chan et al.), not an
    average of per-chunk variances. G ends in eval mode."""
    bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    acc = {m: [] for m in bns}  # per chunk: (count per channel, mean, biased variance)

    def hook(m, inp):
        v, mu = torch.var_mean(inp[0].detach().float(), dim=(0, 2, 3), correction=0)
        acc[m].append((inp[0].numel() // inp[0].shape[1], mu.double(), v.double()))

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        with batch_stat_bn(G):
            for i in range(0, len(z), chunk):
                forward(z[i:i + chunk])
    finally:
        for h in handles:
            h.remove()
    for m, parts in acc.items():
        n = sum(c for c, _, _ in parts)
        mean = sum(c * mu for c, mu, _ in parts) / n
        m2 = sum(c * (v + (mu - mean) ** 2) for c, mu, v in parts)
        m.running_mean.copy_(mean)
        m.running_var.copy_(m2 / max(n - 1, 1))
    return G.eval()


def sampler_grad(fn):
    """Decorator of a Sampler's generate-like methods: no autograd graph, as @torch.no_grad(), except inside
    `with sampler.differentiable():` (eval.py --project), where gradients reach the latents."""
    @functools.wraps(fn)
    def wrapped(self, *args, **kwargs):
        with torch.set_grad_enabled(torch.is_grad_enabled() and getattr(self, "_grad", False)):
            return fn(self, *args, **kwargs)
    return wrapped


class SamplerBase:
    """The contract eval.py relies on. Each method script defines `load_for_sampling(ckpt, device) -> Sampler`
    where Sampler subclasses this and implements `latents` and `generate` (EMA generator, eval mode, no grad:
    decorate them with @SamplerBase.sampler_grad: @torch.no_grad() outside `differentiable()`).
    Optional: `style_mix(lat_a, lat_b) -> images` (coarse structure from a, the rest from b); `latent_doc()`;
    `export_opts` and `export_check()` (eval.py --export); `proj_init` / `proj_generate` (eval.py --project)."""
    res = None
    sampler_grad = staticmethod(sampler_grad)  # @SamplerBase.sampler_grad in a method's Sampler class body
    export_opts = {}  # sampler options eval.py --export and --project apply (a deterministic mode, e.g. noise=const)
    proj_space = "z"  # what eval.py --project optimises (proj_init's kind), for its outputs
    _grad = False

    @property
    def batch_independent(self):
        """Whether generate() gives each latent the image it gets alone, whatever the other latents of the call
        (eval.py --save-images / --gif batch only then; --export / --project need it). Not with bn=batch (BatchNorm
        with each call's statistics, BN_MODES); a method whose images depend on their batch companions otherwise
        (insgen's noise=random: one noise seed per call) overrides this."""
        return getattr(self, "bn", None) != "batch"

    def latents(self, n, seed):
        """[n, d] latent codes on the device, a deterministic function of `seed`."""
        raise NotImplementedError

    def generate(self, latents):
        """Images in [-1, 1], [n, 3, res, res], for the given latents."""
        raise NotImplementedError

    def latent_doc(self):
        """What generate() expects (shape, distribution): eval.py --export saves it in the export."""
        z = self.latents(1, 0)
        return f"latents [n, {', '.join(map(str, z.shape[1:]))}] as Sampler.latents draws them"

    def export_check(self):
        """Raise UserError (one line) when this sampler's generate() cannot be exported as a function of its latents."""

    def export_extras(self):
        """{name: tensor} stored in the export next to the generator (e.g. DISP's training priors)."""
        return {}

    @contextmanager
    def differentiable(self):
        """Inside the block generate() and proj_generate() build autograd graphs (eval.py --project)."""
        self._grad = True
        try:
            yield self
        finally:
            self._grad = False

    def proj_init(self, latents):
        """The variable eval.py --project optimises, for these latents: the latents themselves (z; DISP [z ; prior])
        unless a method says otherwise (InsGen: W)."""
        return latents.detach().clone()

    def proj_generate(self, v):
        """Images from a projection variable (proj_init's kind), differentiable in v inside differentiable()."""
        return self.generate(v)

    @torch.no_grad()
    def sample(self, n, seed=0, batch=32):
        z = self.latents(n, seed)
        return torch.cat([self.generate(z[i:i + batch]).float() for i in range(0, n, batch)])
