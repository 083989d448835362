"""--tensorboard (common.output: a module-level writer fed by log_metrics, Progress and save_grid) and the Progress
line: plain lines on a non-terminal stream, one live '\\r' bar on a terminal."""
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import common.output as U
from common.output import Progress
from common.run import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "digits", "--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "2", "--seed", "3", "--iters", "4",
        "--log-every", "1", "--sample-every", "2", "--ckpt-every", "1000", "--device", "cpu", "--recon", "mse"]


class FakeWriter:
    """Records what SummaryWriter would get; FakeWriter.last is the latest one made."""
    last = None

    def __init__(self, log_dir=None):
        self.log_dir, self.scalars, self.images, self.closed = log_dir, [], [], False
        FakeWriter.last = self

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, img, step):
        self.images.append((tag, tuple(img.shape), step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture(autouse=True)
def closed_tensorboard(one_thread):
    """One thread (conftest.py); the module-level TensorBoard writer closed after each test."""
    yield
    U.close_tensorboard()


def test_tensorboard_missing_package_is_one_line_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.raises(UserError, match="pip install tensorboard") as e:
        U.summary_writer_class()
    assert "\n" not in str(e.value)
    # the script: exit 2, one 'error:' line, before any set-up (no run directory)
    code = ("import sys, runpy; sys.modules['torch.utils.tensorboard'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path('fastgan.py', run_name='__main__')")
    t = time.time()
    r = subprocess.run([sys.executable, "-c", code, "fastgan.py", *TINY, "--tensorboard", "--out", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip install tensorboard" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "r") and time.time() - t < 60


def test_tensorboard_gets_what_metrics_jsonl_and_samples_get(tmp_path, monkeypatch):
    import fastgan as fg
    monkeypatch.setattr(U, "summary_writer_class", lambda: FakeWriter)
    out = tmp_path / "run"
    fg.main(TINY + ["--tensorboard", "--out", str(out)])
    w = FakeWriter.last
    assert w.log_dir == str(out / "tb") and w.closed is False
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["iter"] for m in lines] == [1, 2, 3, 4]
    want = [(k, v, m["iter"]) for m in lines for k, v in m.items() if k != "iter"]
    got = [s for s in w.scalars if s[0] != "it_per_s"]
    assert got == want  # the same tags, values and steps, in the same order
    assert [s[2] for s in w.scalars if s[0] == "it_per_s"] == [1, 2, 3, 4]
    assert all(s[1] > 0 for s in w.scalars if s[0] == "it_per_s")
    assert [(t, s) for t, _, s in w.images if t == "samples"] == [("samples", 2), ("samples", 4)]
    assert all(shape[0] == 3 for _, shape, _ in w.images)
    # without the flag: no writer, nothing changes
    U.close_tensorboard()
    assert w.closed
    FakeWriter.last = None
    fg.main(TINY + ["--out", str(tmp_path / "plain")])
    assert FakeWriter.last is None and not os.path.exists(tmp_path / "plain" / "tb")
    assert [json.loads(x)["iter"] for x in open(tmp_path / "plain" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_tensorboard_scalars_skip_non_numbers(tmp_path):
    w = U.open_tensorboard(str(tmp_path / "tb"), FakeWriter())
    U.log_metrics(str(tmp_path), {"iter": 10, "fid": 3.5, "kid": 0.01, "protocol": "clean", "p": 0.2,
                                  "best": True})
    assert w.scalars == [("fid", 3.5, 10), ("kid", 0.01, 10), ("p", 0.2, 10)]
    U.close_tensorboard()
    U.log_metrics(str(tmp_path), {"iter": 11, "fid": 3.0})  # no writer: only metrics.jsonl
    assert w.closed and len(w.scalars) == 3 and len(open(tmp_path / "metrics.jsonl").readlines()) == 2


LINE = re.compile(r"it (\d+)/5 \| [0-9.e+]+ it/s \| ETA \dh\d\dm \| loss_d 0\.5 loss_g 1\.25")


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_lines_unchanged_on_a_non_terminal(tmp_path, capsys):
    buf = io.StringIO()
    p = Progress(5, every=2, out=str(tmp_path), stream=buf)
    for it in range(1, 6):
        p(it, loss_d=torch.tensor(0.5), loss_g=1.25)
    lines = buf.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in buf.getvalue()
    assert [int(LINE.fullmatch(x).group(1)) for x in lines[:-1]] == [2, 4, 5]
    assert [json.loads(x) for x in open(tmp_path / "metrics.jsonl")] == [
        {"iter": i, "loss_d": 0.5, "loss_g": 1.25} for i in (2, 4, 5)]
    Progress(2, every=1)(1, loss=1.0)  # the default stream is sys.stdout (pytest's capture: not a terminal)
    assert re.fullmatch(r"it 1/2 \| .* it/s \| ETA 0h00m \| loss 1\n", capsys.readouterr().out)


def test_progress_is_one_live_line_on_a_terminal(tmp_path):
    tty = TTY()
    p = Progress(5, every=2, out=str(tmp_path), stream=tty, refresh=0)
    for it in range(1, 6):
        p(it, loss_d=0.5, loss_g=1.25)
        if it < 5:
            assert "\n" not in tty.getvalue()
    s = tty.getvalue()
    assert s.endswith("\n") and s.count("\n") == 1 and s.count("\r") == 5  # refresh=0: every iteration redrawn
    last = s.rstrip("\n").split("\r")[-1]
    assert last.startswith("[" + "#" * 20 + "] 100% ") and LINE.search(last).group(1) == "5"
    assert "[" + "#" * 8 + "." * 12 + "]  40% it 2/5" in s
    assert [json.loads(x)["iter"] for x in open(tmp_path / "metrics.jsonl")] == [2, 4, 5]  # the log is unchanged
    tty2 = TTY()
    p = Progress(5, every=2, stream=tty2, refresh=3600)  # between log steps: at most every `refresh` seconds
    for it in range(1, 6):
        p(it, loss=1.0)
    assert tty2.getvalue().count("\r") == 4 and tty2.getvalue().endswith("\n")  # it 1 (first), 2, 4, 5
