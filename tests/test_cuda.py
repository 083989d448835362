"""The CUDA path of every method, for a machine with a GPU: `python -m pytest -q tests/test_cuda.py` (`bash .ci/gpu
tests` runs all but the --compile checks, `bash .ci/gpu parity` those).

Skipped without CUDA, so the CPU suite stays green. `GAN_TEST_CUDA_DEVICE=cpu` runs the same tests on the CPU at toy
sizes (a dry run of this file's logic, ~2 min on 2 cores; CI does not run it).

Per method, at its paper configuration (fastgan 1024 px batch 8; insgen paper256 256 px batch 16; adafm 128 px batch 16
from a source checkpoint the test writes; disp 128 px batch 25 with 4 D steps), fp32 and --amp: 2 iterations with
every loss finite (metrics.jsonl), bf16 convolutions with --amp and none without, a sample grid and ckpt/last.pt,
a resume to iteration 3 on the GPU, and eval.py sampling the checkpoint on the GPU. Then: a checkpoint saved on the
CPU resumes on the GPU and that one back on the CPU (toy sizes), and torchrun with one process takes the NCCL path
(DDP) on the GPU, and --compile (default and reduce-overhead) trains like eager mode (fastgan, disp, adafm; toy
sizes, 20 iterations).
"""
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.output import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = os.environ.get("GAN_TEST_CUDA_DEVICE", "cuda")
DRY = DEVICE == "cpu"  # dry run: the same logic on the CPU at toy sizes
pytestmark = pytest.mark.skipif(not DRY and not torch.cuda.is_available(),
                                reason="no CUDA GPU: run `python -m pytest -q tests/test_cuda.py` on a GPU machine "
                                       "(GAN_TEST_CUDA_DEVICE=cpu dry-runs it on the CPU)")

# method -> (res, flags): the paper configuration on a GPU, the toy one for the dry run and the CPU<->GPU round trip
PAPER = {
    "fastgan": (1024, ["--batch", "8", "--recon", "mse"]),  # the GPU machine is offline: no LPIPS weights
    "insgen": (256, ["--cfg", "paper256", "--batch", "16"]),
    "adafm": (128, ["--batch", "16"]),
    "disp": (128, ["--batch", "25", "--d-steps", "4", "--prior-weights", "random"]),
}
TOY = {
    "fastgan": (32, ["--ngf", "8", "--ndf", "8", "--batch", "4", "--recon", "mse"]),
    "insgen": (16, ["--cfg", "auto", "--cbase", "256", "--cmax", "32", "--batch", "4"]),
    "adafm": (32, ["--nf", "4", "--z-dim", "16", "--w-dim", "16", "--batch", "4"]),
    "disp": (32, ["--ch", "4", "--batch", "8", "--d-steps", "2", "--prior-weights", "random", "--prior-size", "32"]),
}
CONFIG = TOY if DRY else PAPER


def module(method):
    import importlib
    return importlib.import_module(method)


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    """24 smooth random RGB images per resolution (upsampled 8x8 noise: real-looking PNG sizes, fast to write)."""
    dirs, rng = {}, np.random.default_rng(0)
    for res in sorted({r for r, _ in CONFIG.values()} | {r for r, _ in TOY.values()}):
        d = tmp_path_factory.mktemp(f"img{res}")
        for i in range(24):
            small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            small.resize((res, res), Image.BICUBIC).save(d / f"{i:02d}.png")
        dirs[res] = str(d)
    return dirs


@pytest.fixture(scope="module")
def sources(tmp_path_factory, image_dirs):
    """adafm's source checkpoints (a 1-iteration --mode pretrain run), per configuration."""
    out = {}
    for name, table in (("cfg", CONFIG), ("toy", TOY)):
        res, flags = table["adafm"]
        d = tmp_path_factory.mktemp(f"adafm-src-{name}")
        module("adafm").main(["--mode", "pretrain", "--data", image_dirs[res], "--res", str(res), *flags, "--iters", "1",
                              "--out", str(d), "--device", DEVICE])
        out[name] = str(d / "ckpt" / "last.pt")
    return out


class ConvDtypes:
    """Records the output dtype of every F.conv2d / F.conv_transpose2d call (autocast casts below these functions)."""

    def __init__(self, monkeypatch):
        self.seen = set()
        for name in ("conv2d", "conv_transpose2d"):
            fn = getattr(F, name)

            def wrapped(*a, _fn=fn, **k):
                y = _fn(*a, **k)
                self.seen.add(y.dtype)
                return y
            monkeypatch.setattr(F, name, wrapped)


def flags_for(method, table, image_dirs, sources, source_key):
    res, flags = table[method]
    args = ["--data", image_dirs[res], "--res", str(res), *flags]
    if method == "adafm":
        args += ["--source", sources[source_key]]
    return args


def losses_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "iter" in r and not any(k.startswith(("fid", "kid")) for k in r)]


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("method", sorted(PAPER))
def test_paper_configuration_trains_resumes_and_samples(method, amp, tmp_path, image_dirs, sources, monkeypatch):
    import eval as eval_mod
    out = str(tmp_path / "run")
    args = flags_for(method, CONFIG, image_dirs, sources, "cfg")
    common = ["--out", out, "--device", DEVICE, "--log-every", "1", "--sample-every", "2", "--ckpt-every", "1000",
              *(["--amp"] if amp else [])]
    if DEVICE != "cpu":
        torch.cuda.reset_peak_memory_stats()
    rec = ConvDtypes(monkeypatch)
    module(method).main([*args, *common, "--iters", "2"])
    rows = losses_of(out)
    assert [r["iter"] for r in rows] == [1, 2]
    bad = {k: v for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, f"non-finite losses: {bad}"
    if amp:
        assert torch.bfloat16 in rec.seen, f"--amp ran no bf16 convolution (saw {rec.seen})"
    else:
        assert rec.seen == {torch.float32}, f"fp32 run used {rec.seen}"
    assert os.path.isfile(os.path.join(out, "samples", "000002.png"))
    ck = load_checkpoint(os.path.join(out, "ckpt", "last.pt"))
    assert ck["step"] == 2 and ck["args"]["device"] == DEVICE
    module(method).main([*args, *common, "--iters", "3", "--resume", "auto"])
    assert load_checkpoint(os.path.join(out, "ckpt", "last.pt"))["step"] == 3
    eval_mod.main([out, "--metrics", "none", "--grid", "--grid-n", "8", "--device", DEVICE])
    assert glob.glob(os.path.join(out, "eval", "*-grid.png"))
    if DEVICE != "cpu":
        print(f"{method} amp={amp}: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        torch.cuda.empty_cache()


@pytest.mark.parametrize("method", sorted(TOY))
def test_checkpoint_moves_between_cpu_and_gpu(method, tmp_path, image_dirs, sources):
    """Saved on the CPU -> resumed on the GPU -> resumed on the CPU; the steps continue and every tensor of the last
    checkpoint is on the CPU (checkpoints are device-free)."""
    out = str(tmp_path / "run")
    args = [*flags_for(method, TOY, image_dirs, sources, "toy"), "--out", out, "--log-every", "1"]
    for iters, device in ((1, "cpu"), (2, DEVICE), (3, "cpu")):
        module(method).main([*args, "--iters", str(iters), "--device", device,
                             *(["--resume", "auto"] if iters > 1 else [])])
        ck = load_checkpoint(os.path.join(out, "ckpt", "last.pt"))
        assert ck["step"] == iters
    devices = {v.device.type for k in ("G", "G_ema") for v in ck[k].values()}
    assert devices == {"cpu"}


def test_torchrun_one_process_takes_the_nccl_path(tmp_path, image_dirs):
    """torchrun --nproc_per_node 1: Distributed initialises the process group (NCCL on CUDA, gloo in the dry run) and
    wraps G and D in DDP; the two-process gloo run is tests/test_torchrun.py."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, torch.distributed as dist, fastgan\n"
        "seen = []\n"
        "init = dist.init_process_group\n"
        "dist.init_process_group = lambda backend=None, **k: (seen.append(backend), init(backend, **k))[1]\n"
        "fastgan.main(sys.argv[1:])\n"
        "print('BACKEND', seen)\n")
    res, flags = TOY["fastgan"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        str(probe), "--data", image_dirs[res], "--res", str(res), *flags, "--iters", "2",
                        "--device", DEVICE, "--out", str(tmp_path / "run")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"BACKEND ['{'gloo' if DRY else 'nccl'}']" in r.stdout
    assert load_checkpoint(str(tmp_path / "run" / "ckpt" / "last.pt"))["step"] == 2


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("method", ["fastgan", "disp", "adafm"])
def test_compile_gives_the_eager_losses(method, mode, tmp_path, image_dirs, sources, monkeypatch):
    """--compile MODE (torch.compile of the networks without double backward; reduce-overhead also captures CUDA
    graphs) trains like eager mode: the same losses over 20 iterations on the GPU (3 in the dry run, where compiling
    dominates) at toy size. Inductor draws its own random numbers (FastGAN's noise injection would differ from
    eager); fallback_random makes it draw eager's. Tolerance: float re-association in fused kernels, compounded over
    the iterations of a GAN."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    iters = 3 if DRY else 20
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", mode])):
        out = str(tmp_path / name)
        module(method).main([*flags_for(method, TOY, image_dirs, sources, "toy"), "--iters", str(iters),
                             "--log-every", "1", "--device", DEVICE, "--out", out, *extra])
        runs[name] = losses_of(out)
    assert len(runs["eager"]) == len(runs["compiled"]) == iters
    worst = 0.0
    for a, b in zip(runs["eager"], runs["compiled"]):
        for k, v in a.items():
            if isinstance(v, float) and k != "iter":
                assert b[k] == pytest.approx(v, rel=2e-2, abs=1e-3), (k, a, b)
                worst = max(worst, abs(b[k] - v) / max(abs(v), 1e-3))
    print(f"{method} --compile {mode}: {iters} iterations, largest relative loss difference {worst:.2e}")
