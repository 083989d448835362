"""Running a method script: user errors (one line, exit 2), the shared flags, seeding, the device and torchrun's
process group, NaN checks, Ctrl-C, --bench timing, autocast and torch.compile."""
import argparse
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed


class UserError(Exception):
    """An error the user can fix (bad path or flag, mismatched checkpoint, full disk...): one line, exit code 2."""


@contextmanager
def user_errors():
    """Wrap a script's main: a UserError becomes one 'error: ...' line on stderr and exit code 2, no traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def error_line(e, limit=200):
    """'Type: first line of the message' of an exception, the line cut to `limit` characters ('Type' if empty)."""
    line = (str(e).splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def positive_int(s):
    """argparse type of the --*-every flags: a whole number >= 1 (the loops divide by it)."""
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {s!r}: pass a whole number >= 1")
    return int(s)


def add_common_args(p, *, res, batch, iters, lr, data="digits", sample_every=1000, ckpt_every=1000,
                    eval_every=0, eval_n=5000, log_every=100):
    """The flags every method script shares, with the same names and meanings; defaults are the method's paper's."""
    g = p.add_argument_group("common")
    g.add_argument("--data", default=data, help="dataset NAME (digits, shells, pokemon, ...) or a folder of images")
    g.add_argument("--data-root", default=os.environ.get("GAN_DATA_ROOT", "data"),
                   help="where named datasets live: <data-root>/<name> (env GAN_DATA_ROOT)")
    g.add_argument("--res", type=int, default=res, help="image resolution (power of two)")
    g.add_argument("--crop", choices=["squash", "center"], default="squash",
                   help="squash: resize to res x res; center: centre-crop a square, then resize")
    g.add_argument("--no-flip", action="store_true", help="disable random horizontal flips of real images")
    g.add_argument("--batch", type=int, default=batch, help="total batch size (split across torchrun processes)")
    g.add_argument("--iters", type=int, default=iters, help="total iterations (a resumed run stops at the same total)")
    g.add_argument("--lr", type=float, default=lr, help="learning rate")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--out", default=None, help="run directory (default runs/<method>-<data>-<res>-<seed>-<time>)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--resume", default=None, help="'auto' (continue <out>/ckpt/last.pt if it exists) or a checkpoint")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA and CPU)")
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the networks without a double backward (the script's docstring says which) "
                   "in this mode (bare --compile: default; reduce-overhead: CUDA graphs); slow first iterations")
    g.add_argument("--workers", type=int, default=2, help="data-loading workers for large (streamed) datasets")
    g.add_argument("--log-every", type=positive_int, default=log_every, help="print a progress line every N iterations")
    g.add_argument("--sample-every", type=positive_int, default=sample_every,
                   help="write samples/<step>.png every N iterations")
    g.add_argument("--ckpt-every", type=positive_int, default=ckpt_every, help="write ckpt/last.pt every N iterations")
    g.add_argument("--eval-every", type=int, default=eval_every, help="FID/KID every N iterations (0: off)")
    g.add_argument("--eval-n", type=int, default=eval_n, help="generated images per evaluation")
    g.add_argument("--inception", default=None, help="local path of inception-2015-12-05.pt (env GAN_INCEPTION)")
    g.add_argument("--tensorboard", action="store_true", help="also log every metrics.jsonl value, it/s and the "
                   "sample grids to TensorBoard under <out>/tb/ (needs `pip install tensorboard`)")
    g.add_argument("--bench", type=int, default=0, help="time N iterations on a fixed random batch at --res/--batch "
                   "after one warm-up, print s/iteration and s/kimg, exit (reads no data, writes nothing)")
    return g


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name="auto", local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this PyTorch sees no CUDA GPU: use --device cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


class Distributed:
    """This process's place in a run. Under `torchrun` (any --nproc_per_node) it initialises torch.distributed (NCCL on
    CUDA, gloo on CPU) and `wrap` gives DDP modules, else `on` is False. CUDA: cuDNN autotuning (fixed shapes)."""

    def __init__(self, device_arg="auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(device_arg, self.local_rank)
        self.on = self.world > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if self.on and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def per_rank_batch(self, batch):
        if batch % self.world:
            raise UserError(f"--batch {batch} does not split over {self.world} processes: use a multiple of "
                            f"{self.world}")
        return batch // self.world

    def barrier(self):
        if self.on:
            torch.distributed.barrier()

    def wrap(self, model, **kw):
        """`model` itself in one process; under torchrun DistributedDataParallel(model, **kw) on this rank's device."""
        if not self.on:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       **kw)

    def close(self):
        if self.on and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_finite(losses, step, out=None):
    """Stop with one clear line on NaN/inf instead of writing broken checkpoints."""
    for k, v in losses.items():
        if not math.isfinite(float(v)):
            last = os.path.join(out or "", "ckpt", "last.pt")
            where = f"the last good checkpoint is {last}" if os.path.isfile(last) else "no checkpoint was written yet"
            raise UserError(f"loss {k} became {float(v)} at iteration {step}: lower --lr or run without --amp"
                            f"{'; ' + where if out else ''}")


class StopOnInterrupt:
    """First Ctrl-C (SIGINT) only sets `requested`: the loop finishes the iteration, saves ckpt/last.pt and exits 130
    (the run resumes exactly); a second raises KeyboardInterrupt at once. `restore()`: the previous handler back."""

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
    """Wrap a script's set-up (data, priors, source weights, networks): a Ctrl-C there is one line 'interrupted during
    set-up (<the KeyboardInterrupt's message>)', exit 130; `done()` hands over to the loop's StopOnInterrupt."""
    active = True

    def done(self):
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if typ is KeyboardInterrupt and self.active:
            detail = str(e) or "before the first training step; rerun the same command"
            print(f"interrupted during set-up ({detail})", file=sys.stderr, flush=True)
            sys.exit(130)


def time_steps(step, n, device):
    """The seconds of each of n + 1 calls of `step()` (the first is the warm-up), CUDA synchronised."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for _ in range(n + 1):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def bench(steps, n, device, batch, what="", block=1):
    """--bench N in every script: `steps` = {name: step()}, one training iteration (and the EMA) on a fixed random batch
    each; after a warm-up each, they take turns in blocks of `block` calls (a burst of other work hits all alike) until
    each ran N. Prints and returns {name: s/iteration} (median block mean), with s/kimg and ratios."""
    for step in steps.values():
        time_steps(step, 0, device)
    means = {name: [] for name in steps}
    for _ in range(math.ceil(n / block)):
        for name, step in steps.items():
            means[name].append(sum(time_steps(step, block - 1, device)) / block)
    sec = {name: float(np.median(m)) for name, m in means.items()}
    first = next(iter(sec.values()))
    print(f"bench: {what} device {device} batch {batch} threads {torch.get_num_threads()}, medians of "
          f"{math.ceil(n / block)} blocks of {block}", flush=True)
    for name, s in sec.items():
        print(f"bench: {name:<24} {s:.3f} s/iteration {s * 1000 / batch:8.1f} s/kimg {s / max(first, 1e-12):5.2f}x",
              flush=True)
    return sec


def compiled(model, mode):
    """--compile MODE: torch.compile(model) for the training passes (checkpoints keep the plain module), else model.
    Recompile limit 8 -> 64: a layer whose forward() sees many shapes recompiles per shape, not falling to eager."""
    if not mode:
        return model
    import torch._dynamo
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(model, mode=None if mode == "default" else mode)


def autocast(device, enabled):
    """bf16 autocast on CUDA and CPU when --amp is set."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
