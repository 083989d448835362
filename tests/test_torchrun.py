"""Every method trains under `torchrun --nproc_per_node 2` (gloo on CPU) and its ranks stay in sync.

A probe wraps the script's main(): it records every Generator / Discriminator the script builds and, when training
ends, each rank saves the parameters of those networks. With gradients averaged across ranks (DDP, or InsGen's flat
all_reduce) the two ranks must hold bit-identical parameters; ranks that drifted apart (a missing all_reduce, a
network left out of DDP, different initial weights) fail. BN running statistics are per-rank buffers (no SyncBN),
so only parameters are compared.
"""
import os
import subprocess
import sys

import pytest
import torch

from common.output import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import importlib, os, sys, torch
mod = importlib.import_module(sys.argv[1])
built = []
for name in ("Generator", "Discriminator"):
    cls = getattr(mod, name)
    init = cls.__init__
    def wrapped(self, *a, _init=init, _name=name, **k):
        _init(self, *a, **k)
        built.append((_name, self))
    cls.__init__ = wrapped
try:
    mod.main(sys.argv[2:])
except SystemExit as e:
    if e.code:
        raise
rank = int(os.environ["RANK"])
params = {f"{n}{i}.{k}": v.detach().cpu() for i, (n, m) in enumerate(built) for k, v in m.named_parameters()}
out = sys.argv[sys.argv.index("--out") + 1]
torch.save(params, os.path.join(out, f"params_rank{rank}.pt"))
"""

CASES = {
    "fastgan": ["--data", "digits", "--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "4", "--iters", "2",
                "--recon", "mse"],
    "insgen": ["--data", "digits", "--res", "16", "--cfg", "auto", "--cbase", "256", "--cmax", "32", "--batch", "4",
               "--iters", "2"],
    "disp": ["--data", "digits", "--res", "32", "--ch", "4", "--batch", "8", "--d-steps", "2", "--prior-weights",
             "random", "--prior-size", "32", "--max-images", "64", "--iters", "2"],
    "adafm": ["--data", "digits", "--res", "32", "--nf", "4", "--z-dim", "16", "--w-dim", "16", "--batch", "4",
              "--iters", "2", "--adafm-start", "1"],  # AdaFM switches on at iteration 1: G's DDP wrapper is rebuilt
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CASES))
def test_two_process_run_keeps_ranks_in_sync(method, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    args = list(CASES[method])
    if method == "adafm":  # a source model to transfer from: a 1-iteration single-process pretrain
        src = tmp_path / "src"
        r = subprocess.run([sys.executable, "adafm.py", "--mode", "pretrain", *args[:10], "--iters", "1", "--out",
                            str(src)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        args += ["--source", str(src / "ckpt" / "last.pt")]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(probe), method, *args, "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert load_checkpoint(str(out / "ckpt" / "last.pt"))["step"] == 2
    p0, p1 = (torch.load(out / f"params_rank{k}.pt", weights_only=True) for k in range(2))
    assert len(p0) > 10 and p0.keys() == p1.keys()
    assert {k.split(".")[0] for k in p0} >= {"Generator0", "Discriminator1"}
    drift = [k for k in p0 if not torch.equal(p0[k], p1[k])]
    assert not drift, f"{len(drift)} tensors differ between ranks, e.g. {drift[:3]}"
