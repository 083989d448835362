"""common/run.py and common/output.py: checkpoints, RNG state, resume resolution, errors, progress log, full disk."""
import argparse
import errno
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.output import (FORMAT, load_checkpoint, prepare_run_dir, Progress, resolve_resume, restore_rng, rng_state,
                           save_checkpoint, set_rng_state)
from common.run import add_common_args, check_finite, Distributed, pick_device, StopOnInterrupt, UserError


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_checkpoint_roundtrip_restores_rng_with_weights_only(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    path = str(tmp_path / "ckpt" / "last.pt")
    save_checkpoint({"format": 2, "method": "x", "step": 7, "rng": rng_state(), "w": torch.ones(2)}, path)
    expected = draws()
    assert not os.path.exists(path + ".tmp")
    ck = load_checkpoint(path)  # weights_only=True inside
    set_rng_state(ck["rng"])
    assert draws() == expected and ck["step"] == 7


def test_bad_checkpoint_is_one_clear_error(tmp_path):
    p = tmp_path / "broken.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(str(p))
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, err):
    """A full disk (or a read-only one, or no permission) while writing a checkpoint: one UserError that names the
    file, the reason and the last good checkpoint with its step; the previous file intact, no temp file left."""
    path = str(tmp_path / "ckpt" / "last.pt")
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def boom(fd):  # the bytes are written, then the disk says no (as a full disk does at write or flush)
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "fsync", boom)
    want = (f"cannot write {path} ({os.strerror(err).lower()}); the last good checkpoint is {path} (iteration 1): "
            "free space and rerun with --resume auto")
    with pytest.raises(UserError) as e:
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert str(e.value) == want
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3)) and os.listdir(tmp_path / "ckpt") == ["last.pt"]


def test_non_essential_writes_warn_once_and_go_on(tmp_path, monkeypatch, capsys):
    """A sample grid that cannot be written warns once (training goes on); metrics.jsonl is essential."""
    from common.output import log_metrics, save_grid

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", boom)
    for _ in range(2):
        save_grid(torch.zeros(4, 3, 8, 8), str(tmp_path / "samples" / "000001.png"))
    err = capsys.readouterr().err
    assert err.count("warning: cannot write") == 1 and "no space left on device" in err
    assert os.listdir(tmp_path / "samples") == []  # the temp file was removed
    monkeypatch.setattr("builtins.open", boom)
    with pytest.raises(UserError, match=r"cannot write .*metrics.jsonl \(no space left on device\)"):
        log_metrics(str(tmp_path), {"iter": 1})


def parse(argv):
    p = argparse.ArgumentParser()
    add_common_args(p, res=32, batch=8, iters=10, lr=2e-4)
    return p.parse_args(argv)


def test_run_dir_and_resume_resolution(tmp_path):
    args = parse(["--out", str(tmp_path / "run"), "--resume", "auto"])
    prepare_run_dir(args, "m")
    assert json.load(open(tmp_path / "run" / "args.json"))["res"] == 32
    assert os.path.isdir(tmp_path / "run" / "samples") and os.path.isdir(tmp_path / "run" / "ckpt")
    assert resolve_resume(args) is None  # auto with nothing saved: fresh start
    save_checkpoint({}, str(tmp_path / "run" / "ckpt" / "last.pt"))
    assert resolve_resume(args) == str(tmp_path / "run" / "ckpt" / "last.pt")
    args.resume = str(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="no such checkpoint"):
        resolve_resume(args)
    default = parse(["--data", "some/folder/shells"])
    prepare_run_dir(default, "fastgan", is_main=False)
    assert os.path.basename(default.out).startswith("fastgan-shells-32-0-")


def test_nan_and_device_and_batch_errors():
    check_finite({"d": 1.0, "g": torch.tensor(2.0)}, 3)
    with pytest.raises(UserError, match="loss g became nan at iteration 3"):
        check_finite({"d": 1.0, "g": float("nan")}, 3)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda")
    assert pick_device("cpu").type == "cpu"
    d = Distributed("cpu")
    assert d.world == 1 and d.per_rank_batch(8) == 8
    d.world = 3
    with pytest.raises(UserError, match="multiple of 3"):
        d.per_rank_batch(8)


def test_progress_prints_and_logs(tmp_path, capsys):
    p = Progress(total=10, every=5, out=str(tmp_path))
    for it in range(1, 11):
        p(it, loss_d=0.5, loss_g=torch.tensor(1.25))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("it 5/10 |") and "it/s" in lines[0] and "ETA" in lines[0]
    assert "loss_g 1.25" in lines[1]
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert recs == [{"iter": 5, "loss_d": 0.5, "loss_g": 1.25}, {"iter": 10, "loss_d": 0.5, "loss_g": 1.25}]


def test_user_errors_print_one_line_and_exit_2():
    code = "from common.run import *\nwith user_errors():\n    raise UserError('bad thing: do X')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stderr == "error: bad thing: do X\n"


def test_torchrun_ranks_share_rank0_run_dir(tmp_path):
    """Under torchrun (gloo on CPU) Distributed sets up the process group and every rank gets rank 0's default --out."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import argparse, time, sys\n"
        "from common.run import Distributed, add_common_args\nfrom common.output import prepare_run_dir\n"
        "d = Distributed('cpu')\n"
        "if d.rank == 1: time.sleep(1.5)  # a different clock second on rank 1\n"
        "p = argparse.ArgumentParser(); add_common_args(p, res=8, batch=2, iters=1, lr=1.0)\n"
        "a = p.parse_args([])\n"
        "prepare_run_dir(a, 'probe', d.is_main)\n"
        "open(f'rank{d.rank}.txt', 'w').write(f'{d.rank} {d.world} {a.out}')  # files, not stdout: torchrun may drop worker output\n"
        "d.barrier(); d.close()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    outs = [(tmp_path / f"rank{k}.txt").read_text().split() for k in range(2) if (tmp_path / f"rank{k}.txt").exists()]
    assert [o[:2] for o in outs] == [["0", "2"], ["1", "2"]] and outs[0][2] == outs[1][2]


def test_stop_on_interrupt_defers_the_first_ctrl_c():
    import signal
    before = signal.getsignal(signal.SIGINT)
    stop = StopOnInterrupt(verbose=False)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # first: only a request, no exception
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # second: abort now
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_restore_rng_exact_on_rank0_distinct_on_other_ranks():
    """Resume: rank 0 (and a single process) continue the saved stream exactly; other ranks under torchrun get their
    own reproducible stream instead of a copy of rank 0's (same z / augmentation on every rank would waste the batch)."""
    torch.manual_seed(5)
    st = rng_state()
    want = torch.rand(4)
    draws = {}
    for rank in (0, 1, 2, 1):
        restore_rng(st, rank, seed=0, step=100)
        draws.setdefault(rank, []).append(torch.rand(4))
    assert torch.equal(draws[0][0], want)
    assert torch.equal(draws[1][0], draws[1][1])  # reproducible
    assert not torch.equal(draws[1][0], want) and not torch.equal(draws[1][0], draws[2][0])


def test_read_resume_and_resume_roundtrip(tmp_path, capsys):
    """The skeleton's checkpoint path: read_resume checks file, format, method and the architecture flags (a flag the
    checkpoint lacks is a mismatch), resume() loads every `saved` entry and the RNGs, a mismatch is one UserError."""
    from types import SimpleNamespace
    from common.output import read_resume, resume
    net = torch.nn.Linear(3, 2)
    saved = {"G": net, "opt_G": torch.optim.Adam(net.parameters())}
    args = argparse.Namespace(out=str(tmp_path), resume="auto", seed=0, res=32, width=8, ablate=False)
    assert read_resume(args, "m", ("res", "width")) == (None, None)  # auto without last.pt: a fresh start
    path = str(tmp_path / "ckpt" / "last.pt")
    torch.manual_seed(5)
    save_checkpoint({"format": FORMAT, "method": "m", "args": {"res": 32, "width": 8, "ablate": False}, "step": 4,
                     "rng": rng_state(), "best_fid": 3.0, **{k: v.state_dict() for k, v in saved.items()}}, path)
    expected = torch.rand(2)
    ck, p = read_resume(args, "m", ("res", "width", "ablate"))
    net2 = torch.nn.Linear(3, 2)
    assert resume(ck, p, {"G": net2, "opt_G": torch.optim.Adam(net2.parameters())},
                  SimpleNamespace(rank=0, is_main=True), args) == (4, 3.0)
    assert torch.equal(net2.weight, net.weight) and torch.equal(torch.rand(2), expected)
    assert "resumed from" in capsys.readouterr().out
    with pytest.raises(UserError, match="trained with --width 8, this run asks for 16: the architecture"):
        read_resume(argparse.Namespace(**{**vars(args), "width": 16}), "m", ("res", "width"))
    with pytest.raises(UserError, match="trained with --ablate False, this run asks for True"):
        read_resume(argparse.Namespace(**{**vars(args), "ablate": True}), "m", ("ablate",))
    with pytest.raises(UserError, match="written by 'm', not 'other'"):
        read_resume(args, "other")
    with pytest.raises(UserError, match="does not match the networks"):
        resume(ck, p, {"G": torch.nn.Linear(3, 5)}, SimpleNamespace(rank=0, is_main=False), args)


def test_style_mix_grid_layout_and_bench_timer(tmp_path):
    """save_style_mix (eval.py --mix and the end of training): white corner, top row a, left column b, cell (r, c) =
    style_mix(a_c, b_r), whatever the chunking; time_steps: n + 1 timed calls."""
    from PIL import Image
    from common.run import time_steps
    from common.sampling import SamplerBase, save_style_mix

    class Toy(SamplerBase):  # image = colour from the latent; style_mix: red from a, green and blue from b
        res = 4

        def latents(self, n, seed):
            return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1

        def generate(self, z):
            return z[:, :, None, None].expand(-1, 3, 4, 4)

        def style_mix(self, a, b):
            return self.generate(torch.cat([a[:, :1], b[:, 1:]], 1))

    s = Toy()
    path = save_style_mix(s, str(tmp_path / "mix.png"), seed=3, n_a=3, n_b=2, batch=2)
    img = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 127.5 - 1
    tile = lambda r, c: img[:, 2 + r * 6: 6 + r * 6, 2 + c * 6: 6 + c * 6]  # noqa: E731  (make_grid padding 2)
    za, zb = s.latents(3, 3), s.latents(2, 4)
    assert (tile(0, 0) == 1).all()  # blank corner
    for c in range(3):
        assert torch.allclose(tile(0, c + 1), s.generate(za[c:c + 1])[0], atol=1 / 127)
        for r in range(2):
            assert torch.allclose(tile(r + 1, c + 1), s.style_mix(za[c:c + 1], zb[r:r + 1])[0], atol=1 / 127)
    calls = []
    times = time_steps(lambda: calls.append(1), 3, "cpu")
    assert len(times) == len(calls) == 4 and min(times) >= 0
    with pytest.raises(UserError, match="no style_mix"):
        save_style_mix(SamplerBase(), str(tmp_path / "x.png"))


def test_bench_interleaves_variants_in_blocks_and_reports_each(capsys):
    """common.run.bench (every script's --bench): one warm-up call per variant, then the variants take turns in
    blocks until each ran n times; one line per variant with s/iteration, s/kimg and the ratio to the first."""
    from common.run import bench
    order = []
    sec = bench({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 4, "cpu", batch=8, what="toy",
                block=2)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2  # warm-ups, then blocks of 2
    assert set(sec) == {"a", "b"} and all(v >= 0 for v in sec.values())
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bench: toy device cpu batch 8") and "medians of 2 blocks of 2" in out[0]
    assert out[1].split()[1:] == ["a", f"{sec['a']:.3f}", "s/iteration", f"{sec['a'] * 125:.1f}", "s/kimg", "1.00x"]
    assert out[2].split()[1] == "b" and len(out) == 3


@pytest.mark.parametrize("n, size", [(5, 8), (8, 512)], ids=["serial", "threaded"])
def test_per_sample_noise_rows_are_their_own_seeds_draws(n, size, monkeypatch):
    """Row i of a PerSampleNoise map is exactly torch.randn from seeds[i]'s own generator, drawn serially for small
    maps and by a thread pool for large ones (2^21 values here), and successive calls continue each row's stream."""
    from common.sampling import PerSampleNoise
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    seeds = [11 * i + 3 for i in range(n)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    src, x = PerSampleNoise(seeds), torch.zeros(n, 4, size, size)
    for _ in range(2):
        want = torch.stack([torch.randn(1, size, size, generator=g) for g in gens])
        assert torch.equal(src(x), want)
    with pytest.raises(RuntimeError, match="made for"):
        src(x[:1])
