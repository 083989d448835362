"""What a run writes and reads back: the run directory and args.json, progress lines and metrics.jsonl (and
TensorBoard), sample grids, checkpoints (versioned, written atomically) and resuming them with the RNG states."""
import atexit
import io
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager, suppress

import numpy as np
import torch
import torch.distributed

from common.run import error_line, UserError, seed_everything

FORMAT = 2  # checkpoint format: older checkpoints are refused (check_checkpoint)
_SAVED = {"path": None, "step": None}  # the last last.pt written, or the one resumed: what a failed write reports
_WARNED = set()


@contextmanager
def writing(path, essential=True, atomic=True):
    """Yield the file name to write `path` through (<path>.tmp, renamed on success if atomic): a failed write never
    corrupts a run. On an OSError the temp file goes; an essential file (checkpoint, args.json, metrics.jsonl) ends the
    run with one UserError line (file, reason, last good checkpoint), another (grids, TensorBoard) warns once."""
    tmp = path + ".tmp" if atomic else path
    made = None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    except OSError as e:
        made = e  # the body's write into the missing folder fails too; this is the reason reported
    try:
        yield tmp
        if atomic:
            os.replace(tmp, path)
    except OSError as e:
        e = made or e
        if atomic:
            with suppress(OSError):
                os.remove(tmp)
        if essential:
            reason = os.strerror(e.errno).lower() if e.errno else str(e)
            safe = (f"the last good checkpoint is {_SAVED['path']} (iteration {_SAVED['step']}): free space and "
                    "rerun with --resume auto" if _SAVED["path"] else
                    "no checkpoint was written yet: free space and rerun")
            raise UserError(f"cannot write {path} ({reason}); {safe}") from None
        warn_once(path, e)


def warn_once(path, e):
    """One warning per folder (samples/, tb/): a run that cannot write its pictures says so once and goes on."""
    if os.path.dirname(path) not in _WARNED:
        _WARNED.add(os.path.dirname(path))
        reason = os.strerror(e.errno).lower() if e.errno else e
        print(f"warning: cannot write {path} ({reason}); going on without it (not needed to resume; further failures "
              "in that folder are not reported)", file=sys.stderr, flush=True)


def prepare_run_dir(args, method, is_main=True):
    """Fill in args.out, make <out>/samples and <out>/ckpt, write args.json. Returns the run directory.
    Under torchrun every rank gets rank 0's default directory name (the clocks of the ranks may differ)."""
    if args.out is None:
        data = os.path.basename(os.path.normpath(str(args.data)))
        box = [os.path.join("runs", f"{method}-{data}-{args.res}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(box, 0)
        args.out = box[0]
    if is_main:
        with writing(os.path.join(args.out, "args.json")) as tmp, open(tmp, "w") as f:
            for sub in ("samples", "ckpt"):
                os.makedirs(os.path.join(args.out, sub), exist_ok=True)
            json.dump(vars(args), f, indent=1)
        if getattr(args, "tensorboard", False):
            open_tensorboard(os.path.join(args.out, "tb"))
    return args.out


# --tensorboard: one writer, opened by prepare_run_dir (main process), fed the values of metrics.jsonl and samples/
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
    """Log to TensorBoard in `logdir`, through `writer` if given (add_scalar/add_image/close). Returns the writer."""
    close_tensorboard()
    _TB.update(writer=writer if writer is not None else summary_writer_class()(log_dir=logdir), step=0)
    atexit.register(close_tensorboard)
    return _TB["writer"]


def close_tensorboard():
    if _TB["writer"] is not None:
        _tb("close")
        _TB["writer"] = None


def _tb(method, *a):
    """One TensorBoard call; a write that fails warns once and training goes on (not essential)."""
    if _TB["writer"] is not None:
        try:
            getattr(_TB["writer"], method)(*a)
        except OSError as e:
            warn_once(os.path.join(getattr(_TB["writer"], "log_dir", "tb"), "events"), e)


def tb_scalars(record, step=None):
    """Every number of `record` (bools and non-numbers skipped; 'iter'/'step' is the x axis) as a TensorBoard scalar."""
    if _TB["writer"] is None:
        return
    step = record.get("iter", record.get("step", _TB["step"])) if step is None else step
    _TB["step"] = int(step)
    for k, v in record.items():
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if k not in ("iter", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
            _tb("add_scalar", k, float(v), int(step))


def log_metrics(out, record):
    """Append one JSON line to <out>/metrics.jsonl (and its numbers to TensorBoard with --tensorboard)."""
    path = os.path.join(out, "metrics.jsonl")
    with writing(path, atomic=False), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    tb_scalars(record)


class Progress:
    """Prints 'it 120/50000 | 3.41 it/s | ETA 4h03m | loss_d 0.52 loss_g 1.20' every `every` iterations and appends
    them as {"iter": it, ...} to <out>/metrics.jsonl if `out` is given (it/s to TensorBoard). On a terminal (`stream`,
    default stdout) it is one live line '[#####.....]  42% it ...', redrawn at most every `refresh` s."""

    def __init__(self, total, start=0, every=100, enabled=True, out=None, stream=None, refresh=0.5):
        self.total, self.every, self.enabled, self.out = total, every, enabled, out
        self.t0, self.i0 = time.time(), start
        self.stream, self.refresh, self._shown, self._width = stream, refresh, 0.0, 0

    def __call__(self, it, **losses):
        if not self.enabled:
            return
        stream = self.stream or sys.stdout
        due = not (it % self.every and it != self.total)
        tty = bool(getattr(stream, "isatty", lambda: False)())
        if not due and not (tty and time.time() - self._shown >= self.refresh):  # float(loss) may wait for the GPU
            return
        r = (it - self.i0) / max(time.time() - self.t0, 1e-9)
        h, m = divmod(int((self.total - it) / max(r, 1e-9)) // 60, 60)
        vals = " ".join(f"{k} {float(v):.4g}" for k, v in losses.items())
        text = f"it {it}/{self.total} | {r:.3g} it/s | ETA {h}h{m:02d}m | {vals}"
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


def to_uint8(x):
    """[-1, 1] float NCHW -> uint8 NCHW."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images, path, nrow=None, essential=False):
    """Save a [-1, 1] NCHW batch as one PNG grid (temp file, then rename); with --tensorboard also as an image
    ('samples' for samples/<step>.png, else the file's stem). A training grid is not essential (see `writing`)."""
    import torchvision.utils as vutils
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = vutils.make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1))
    with writing(path, essential) as tmp:
        vutils.save_image(grid, tmp, format="png")
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.fullmatch(r"(.*?)_?(\d+)", stem)  # 000100 -> ('samples', 100); mix_000100 -> ('mix', 100)
    tag, step = ((m.group(1) or "samples"), int(m.group(2))) if m else (stem, _TB["step"])
    _tb("add_image", tag, grid, step)
    return path


def save_checkpoint(obj, path):
    """torch.save via `writing`, serialised in memory first so a failed write is an OSError with its reason
    (torch.save's own file writer says 'unexpected pos'). A last.pt is recorded as the last good checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with writing(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    if os.path.basename(path) == "last.pt" and isinstance(obj, dict) and "step" in obj:  # what --resume auto loads
        _SAVED.update(path=path, step=obj["step"])


def load_checkpoint(path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist: pass the path of an existing checkpoint .pt file")
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({error_line(e)}): "
                        "is it a complete file written by this project?")


def check_checkpoint(ckpt, path, method=None):
    """A training checkpoint of this project's format FORMAT (written by `method` when given); returns its method."""
    got = ckpt.get("method") if isinstance(ckpt, dict) else None
    if got is None:
        raise UserError(f"{path} is not a checkpoint written by this project's fastgan/insgen/adafm/disp.py")
    if ckpt.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {ckpt.get('format', 1)}, this code reads format {FORMAT}: "
                        "it was written by an older version of the project; retrain, or load it with that version")
    if method is not None and got != method:
        raise UserError(f"checkpoint {path} was written by {got!r}, not {method!r}: load it with {got}.py")
    return got


def checkpoint_state(method, args, step, saved, **extra):
    """The checkpoint of a run: format, method, args, step, RNG states, every entry of `saved` (checkpoint key ->
    object with state_dict(): networks, optimizers, ...) and `extra`. resume() loads the same entries back."""
    return {"format": FORMAT, "method": method, "args": vars(args), "step": step, "rng": rng_state(),
            **{k: v.state_dict() for k, v in saved.items()}, **extra}


def run_checkpoint(args):
    """<out>/ckpt/last.pt of this run if it exists, else None (also when --out is not set yet)."""
    path = os.path.join(args.out, "ckpt", "last.pt") if getattr(args, "out", None) else None
    return path if path and os.path.isfile(path) else None


def resolve_resume(args):
    """--resume auto -> <out>/ckpt/last.pt if present (else None: fresh start); --resume PATH -> PATH (must exist)."""
    if args.resume == "auto":
        return run_checkpoint(args)
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such checkpoint file (use --resume auto to start fresh when none "
                        "exists)")
    return args.resume or None


def check_flags(ckpt, path, args, names):
    """The flags `names` (they fix the networks' shapes) must be the checkpoint's."""
    for k in names:
        if ckpt["args"].get(k) != getattr(args, k):
            raise UserError(f"checkpoint {path} was trained with --{k.replace('_', '-')} {ckpt['args'].get(k)}, this "
                            f"run asks for {getattr(args, k)}: the architecture must be the same (use the same flags, "
                            "or a new --out)")


def read_resume(args, method, arch=()):
    """--resume, checked before any slow set-up: (checkpoint, path) of one written by `method` with the flags `arch`
    (they fix the networks' shapes) unchanged, else (None, None); a fresh start into an --out with a run is refused."""
    if getattr(args, "tensorboard", False):
        summary_writer_class()  # --tensorboard without the package: fail here, before any slow set-up
    _SAVED.update(path=None, step=None)  # a new run (several can run in one process: tests, tools)
    _WARNED.clear()
    path = resolve_resume(args)
    ckpt = None
    if path:
        ckpt = load_checkpoint(path)
        check_checkpoint(ckpt, path, method)
        check_flags(ckpt, path, args, arch)
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
        raise UserError(f"checkpoint {path} does not match the networks these flags build ({error_line(e, 160)}): "
                        "use the run's own flags, or a new --out")


def resume(ckpt, path, saved, ddp, args):
    """Continue a run: every entry of `saved` from the checkpoint, then the RNG states. Returns (step, best FID)."""
    load_state_dicts(ckpt, path, saved)
    step = ckpt["step"]
    restore_rng(ckpt["rng"], ddp.rank, args.seed, step)
    mine = run_checkpoint(args)
    if mine and os.path.samefile(path, mine):  # only this run's last.pt is what --resume auto continues
        _SAVED.update(path=path, step=step)
    if ddp.is_main:
        print(f"resumed from {path} at iteration {step}", flush=True)
    return step, ckpt.get("best_fid", float("inf"))


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
    """One process: its saved RNG state, exactly (the losses of an uninterrupted run). Under torchrun only rank 0's is
    saved: ranks > 0 reseed from (seed, rank, step), distinct per rank, reproducible, not bit-equal to no restart."""
    set_rng_state(state)
    if rank:
        seed_everything(seed + 1000 * rank + 7919 * step)
