"""A full disk (issue 25) in every method script: a write that fails ends the run with one `error:` line naming the
file, the reason and the last good checkpoint (exit 2), the previous checkpoint stays intact and loadable, no temp
file is left, `--resume auto` continues once space is back; a sample grid that cannot be written warns once and
training goes on. Faults are injected by path (monkeypatched open / os.fsync, in process); one end-to-end run goes
into a real tiny tmpfs where the machine allows mounting one."""
import builtins
import errno
import glob
import importlib
import os
import subprocess
import sys

import pytest
import torch

from common.output import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "fastgan": ["--data", "digits", "--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "2", "--recon", "mse"],
    "insgen": ["--data", "digits", "--res", "16", "--cfg", "auto", "--cbase", "256", "--cmax", "32", "--batch", "4"],
    "disp": ["--data", "digits", "--res", "32", "--ch", "4", "--batch", "4", "--d-steps", "1", "--prior-weights",
             "random", "--prior-size", "32", "--max-images", "16"],
    "adafm": ["--data", "digits", "--res", "32", "--nf", "4", "--z-dim", "16", "--w-dim", "16", "--batch", "4",
              "--mode", "scratch"],
}
NOSPACE = os.strerror(errno.ENOSPC).lower()
SLOW = pytest.mark.slow
ALL = [m if m == "fastgan" else pytest.param(m, marks=SLOW) for m in sorted(TINY)]  # fast tier: fastgan's
pytestmark = pytest.mark.usefixtures("one_thread")


def run(method, out, *extra):
    mod = importlib.import_module(method)
    return mod.main([*TINY[method], "--out", str(out), "--log-every", "1", "--sample-every", "1", "--ckpt-every", "2",
                     *extra])


def fail_writes(monkeypatch, match, after=0):
    """Writes (open for 'w'/'a', and os.fsync of a checkpoint) to paths containing `match` raise ENOSPC, after the
    first `after` of them succeed."""
    seen = {"n": 0}
    real_open, real_fsync = builtins.open, os.fsync

    def hit(path):
        if match in os.path.basename(str(path)):
            seen["n"] += 1
            return seen["n"] > after
        return False

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wa") and not str(file).endswith(".pt.tmp") \
                and hit(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *a, **k)

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if path.endswith(".pt.tmp") and hit(path[:-len(".tmp")]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("method", ALL)
def test_checkpoint_write_fails_one_line_previous_intact_then_resumes(method, tmp_path, monkeypatch, one_line_error):
    """The second checkpoint write (iteration 4) fails: one line, exit 2, last.pt still the iteration-2 one, no temp
    file; --resume auto then finishes the run."""
    out = tmp_path / "run"
    fail_writes(monkeypatch, "last.pt", after=1)
    mod = importlib.import_module(method)
    line = one_line_error(mod.main, [*TINY[method], "--out", str(out), "--log-every", "1", "--sample-every", "1",
                                     "--ckpt-every", "2", "--iters", "6"])
    last = out / "ckpt" / "last.pt"
    assert line == (f"error: cannot write {last} ({NOSPACE}); the last good checkpoint is {last} (iteration 2): "
                    "free space and rerun with --resume auto\n")
    monkeypatch.undo()
    assert load_checkpoint(str(last))["step"] == 2
    assert glob.glob(str(out / "**" / "*.tmp*"), recursive=True) == []
    run(method, out, "--iters", "6", "--resume", "auto")
    assert load_checkpoint(str(last))["step"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TINY))
def test_sample_grids_that_cannot_be_written_warn_once(method, tmp_path, monkeypatch, capsys):
    """Every sample grid after the first fails (a picture is not needed to resume): one warning line, the run ends
    normally with its checkpoint."""
    import torchvision.utils as vutils
    real, calls = vutils.save_image, []

    def save_image(grid, fp, *a, **k):
        calls.append(fp)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(grid, fp, *a, **k)
    monkeypatch.setattr(vutils, "save_image", save_image)
    run(method, tmp_path / "run", "--iters", "3")
    err = capsys.readouterr().err
    assert len(calls) >= 3 and err.count("warning: cannot write") == 1 and NOSPACE in err, err
    assert load_checkpoint(str(tmp_path / "run" / "ckpt" / "last.pt"))["step"] == 3
    assert glob.glob(str(tmp_path / "run" / "samples" / "*.tmp*")) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TINY))
def test_args_json_and_metrics_jsonl_are_essential(method, tmp_path, monkeypatch, one_line_error, capsys):
    """args.json (written at start-up) and metrics.jsonl (every --log-every) are needed to read a run: one line each,
    naming the file; nothing was checkpointed yet."""
    mod = importlib.import_module(method)
    argv = [*TINY[method], "--log-every", "1", "--iters", "2"]
    fail_writes(monkeypatch, "args.json")
    line = one_line_error(mod.main, argv + ["--out", str(tmp_path / "a")])
    assert line.startswith(f"error: cannot write {tmp_path / 'a' / 'args.json'} ({NOSPACE}); no checkpoint")
    monkeypatch.undo()
    fail_writes(monkeypatch, "metrics.jsonl")
    line = one_line_error(mod.main, argv + ["--out", str(tmp_path / "m")])
    assert line.startswith(f"error: cannot write {tmp_path / 'm' / 'metrics.jsonl'} ({NOSPACE}); no checkpoint")


@pytest.mark.slow
def test_disp_prior_cache_is_essential(tmp_path, monkeypatch, one_line_error):
    """DISP's prior bank (<out>/priors.pt) that cannot be written: one line naming it."""
    import disp
    fail_writes(monkeypatch, "priors.pt")
    line = one_line_error(disp.main, [*TINY["disp"], "--iters", "2", "--out", str(tmp_path / "p")])
    assert line.startswith(f"error: cannot write {tmp_path / 'p' / 'priors.pt'} ({NOSPACE})")
    assert glob.glob(str(tmp_path / "p" / "*.tmp*")) == []


@pytest.mark.slow
def test_a_real_full_filesystem(tmp_path):
    """fastgan.py into a tmpfs that holds one checkpoint but not a second beside it: one line, exit 2, the first
    checkpoint intact. Skipped where mounting a tmpfs is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    probe = [*TINY["fastgan"], "--iters", "1", "--out", str(tmp_path / "probe")]  # a checkpoint with Adam state
    subprocess.run([sys.executable, "fastgan.py", *probe], cwd=ROOT, check=True, capture_output=True)
    size = os.path.getsize(tmp_path / "probe" / "ckpt" / "last.pt")
    kib = (size * 3 // 2 + 64 * 1024) // 1024  # room for one checkpoint, its grids and logs, not for two
    mount = ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "run"
        r = subprocess.run([sys.executable, "fastgan.py", *TINY["fastgan"], "--iters", "8", "--ckpt-every", "2",
                            "--sample-every", "100", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        last = out / "ckpt" / "last.pt"
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
        assert r.stderr.startswith(f"error: cannot write {last} ({NOSPACE}); the last good checkpoint is {last} "
                                   "(iteration 2)")
        assert torch.load(last, weights_only=True)["step"] == 2
        assert not os.path.exists(str(last) + ".tmp")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
