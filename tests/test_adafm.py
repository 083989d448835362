"""Tests for adafm.py (CPU, tiny widths). Reference numbers: the authors' parameter counts (spec adafm.md)."""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adafm
from common.output import load_checkpoint
from common.run import UserError
from conftest import blob_sets, nearest_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "digits", "--res", "32", "--nf", "4", "--z-dim", "16", "--w-dim", "16", "--batch", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run(args, check=True, timeout=120):
    # one thread: these models are tiny, so threading only adds overhead (and contention on a shared CPU)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "adafm.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def write_authors_ckpt(path, nf=4, res=32, nlabels=10, seed=0):
    """A checkpoint in the GAN_stability format: generator / discriminator / generator_test, 'module.' prefixes."""
    torch.manual_seed(seed)
    G, D = adafm.Generator(res, nf, 16, "gp", None, nlabels, 8), adafm.Discriminator(res, nf, nlabels)
    pre = lambda sd: {"module." + k: v.clone() for k, v in sd.items()}  # noqa: E731
    ema = {k: torch.zeros_like(v) for k, v in pre(G.state_dict()).items()}   # must NOT be the one transferred
    torch.save({"generator": pre(G.state_dict()), "discriminator": pre(D.state_dict()), "generator_test": ema}, path)
    return G.state_dict(), D.state_dict()


def target(mode, nf=4, res=32):
    a = adafm.parse_args(["--mode", mode, "--nf", str(nf), "--res", str(res), "--z-dim", "16", "--w-dim", "16"])
    a.nlabels = 0
    return a, *adafm.build(a)


def counts(model, general, freeze):
    return [sum(p.numel() for p in ps) for ps in adafm.split_params(model, general, freeze)]


def test_parameter_counts_match_the_authors():
    with torch.device("meta"):
        G, D = adafm.Generator(128, 64, 256, "gp", None, 1000, 256), adafm.Discriminator(128, 64, 1000)
        assert sum(p.numel() for p in G.parameters()) == 100_535_747   # GP-GAN ImageNet 128 generator
        assert sum(p.numel() for p in D.parameters()) == 108_260_776   # ... and discriminator (1000 classes)
        a = adafm.parse_args([])   # paper defaults: --mode adafm --res 128 --nf 64 --z-dim 256
        a.nlabels = 0
        G, D = adafm.build(a)
        frozen, ada, head = counts(G, adafm.G_GENERAL, True)
        assert (frozen, ada) == (4_046_275, 860_160)          # frozen G4; AdaFM on the 12 frozen 3x3 convs
        assert head == 25_185_793 - 1   # authors' 25,185,793 includes an unused nn.Embedding(1, 1) (docstring)
        assert counts(D, adafm.D_GENERAL, True)[0] == 194_624   # frozen D2
        assert D.fc.weight.shape == (1, 16384)                  # new unconditional fc
        a.mode = "fs"
        G = adafm.build(a)[0]
        # FS: gamma, beta in R^{C_out}, 4 convs per group
        assert counts(G, adafm.G_GENERAL, True)[1] == 2 * 4 * (256 + 128 + 64)


def test_adafm_identity_hand_computed_and_fs_is_rank_one():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 6)
    conv = adafm.ModConv2d(5, 7, "adafm")
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.equal(conv(x), ref)    # gamma = 1, beta = 0: exactly the plain frozen conv
    with torch.no_grad():
        conv.gamma.normal_()
        conv.beta.normal_()
    w = torch.empty_like(conv.weight)   # eq. 2 element by element
    for i in range(7):
        for j in range(5):
            w[i, j] = conv.gamma[i, j, 0, 0] * conv.weight[i, j] + conv.beta[i, j, 0, 0]
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, padding=1))
    fs = adafm.ModConv2d(5, 7, "fs")
    fs.weight.data.copy_(conv.weight)
    fs.bias.data.copy_(conv.bias)
    g_hat, b_hat = torch.randn(7), torch.randn(7)
    fs.gamma.data.copy_(g_hat[:, None, None, None])
    fs.beta.data.copy_(b_hat[:, None, None, None])
    assert fs.gamma.shape == (7, 1, 1, 1)
    conv.gamma.data.copy_(torch.outer(g_hat, torch.ones(5))[:, :, None, None])   # gamma = gamma_hat 1^T
    conv.beta.data.copy_(torch.outer(b_hat, torch.ones(5))[:, :, None, None])
    torch.testing.assert_close(fs(x), conv(x))


def noise_maps(G):
    """Forward hooks recording each Noise layer's maps [B, H*W] ((out - in) / weight, largest-weight channel)."""
    maps = {}

    def hook(m, inp, out):
        c = m.weight.abs().flatten().argmax()
        maps.setdefault(id(m), []).append(((out - inp[0])[:, c] / m.weight.flatten()[c]).flatten(1))
    hs = [m.register_forward_hook(hook) for m in G.modules() if isinstance(m, adafm.Noise)]
    return maps, hs


def test_sampling_noise_is_per_sample_and_batch_independent():
    """SamplerBase.sample chunks the latents: the same 40 latents must give the same images in chunks of 7 and of 32,
    and no two samples may share a noise map. The old rule (torch seeded with 0 in every generate call) fails both:
    checked here on a replica of it."""
    class OldRule(adafm.Sampler):
        def generate(self, z, styles=None):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                return self.G(z, None, styles).float()

    torch.manual_seed(0)
    G = adafm.Generator(32, 4, 16, "style", "adafm", w_dim=16)
    for cls, ok in ((adafm.Sampler, True), (OldRule, False)):
        s = cls(G, 32, "cpu")
        maps, hs = noise_maps(G)
        x7 = s.sample(40, seed=3, batch=7)
        for h in hs:
            h.remove()
        x32 = s.sample(40, seed=3, batch=32)
        assert len(maps) == 4 and all(len(v) == 6 for v in maps.values())   # 4 noise layers, 6 chunks of <= 7
        dmin = min(torch.cdist(m, m).add(torch.eye(40) * 1e9).min().item()
                   for m in (torch.cat(v) for v in maps.values()))   # closest pair of samples' maps, per layer
        same = (x7 - x32).abs().max().item()
        assert (dmin > 1e-3 and same < 1e-5) == ok, (cls.__name__, dmin, same)
    assert not any(m.noise_source for m in G.modules() if isinstance(m, adafm.Noise))   # restored after sampling
    assert torch.equal(adafm.Sampler(G, 32, "cpu").sample(5, seed=3), adafm.Sampler(G, 32, "cpu").sample(5, seed=3))
    # a conditional GP-GAN source: the class is a function of the latent too, so chunking changes nothing
    cond = adafm.Sampler(adafm.Generator(32, 4, 16, "gp", None, 10, 8), 32, "cpu")
    torch.testing.assert_close(cond.sample(12, seed=1, batch=5), cond.sample(12, seed=1, batch=32), atol=1e-5, rtol=0)


def test_no_batchnorm_or_buffers_in_the_networks():
    """EMA sampling cannot depend on batch statistics: the generator has no BatchNorm and no buffers at all; nor has D,
    so the DDP wraps leave broadcast_buffers at its default (nothing to broadcast), conditional sources included."""
    for mode in adafm.MODES:
        for nlabels in (0, 3):
            a = target(mode)[0]
            a.nlabels = nlabels
            for net in adafm.build(a):
                assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()), mode
                assert not list(net.buffers()), (mode, nlabels, type(net).__name__)


def test_style_init_and_adain_gradient_clamp_match_the_authors():
    """Authors' EqualLinear: N(0, 0.1) weights, bias 0, for the mapping and AdaIN. Measured with their module at
    z = w = 256 (512 z): w RMS 2.84, gamma std 4.42 (our old init: 1.05 / 0.60). AdaIN's gradient to x goes through
    clamp(gamma, -1, 1)."""
    stats = {}
    for init in ("authors", "he"):
        torch.manual_seed(0)
        G = adafm.Generator(32, 4, 256, "style", None, w_dim=256, style_init=init)
        with torch.no_grad():
            w = G.style(torch.randn(512, 256))
            gamma = G.small_block_0.adain_0.style(w)[:, :32]
        stats[init] = (w.pow(2).mean().sqrt().item(), gamma.std().item())
        lin = G.mapping[2]
        if init == "authors":
            assert abs(lin.weight.std().item() - 0.1) < 0.002 and not lin.bias.any()
    assert 2.3 < stats["authors"][0] < 3.4 and 3.5 < stats["authors"][1] < 5.5, stats
    assert 0.7 < stats["he"][0] < 1.4 and 0.4 < stats["he"][1] < 0.8, stats
    torch.manual_seed(0)
    ada = adafm.AdaIN(6, 8)
    with torch.no_grad():
        ada.style.bias[:6] = torch.tensor([3.0, -2.0, 0.5, -0.5, 1.5, 0.0])
    x, w = torch.randn(2, 6, 5, 5, requires_grad=True), torch.randn(2, 8)
    g_out = torch.randn(2, 6, 5, 5)
    out = ada(x, w)
    gamma, beta = ada.style(w)[:, :, None, None].chunk(2, 1)
    torch.testing.assert_close(out, gamma * F.instance_norm(x) + beta)        # the value is plain AdaIN
    gx, gw = torch.autograd.grad((out * g_out).sum(), (x, ada.style.weight))
    x2 = x.detach().requires_grad_(True)
    ref_gx, = torch.autograd.grad((gamma.detach().clamp(-1, 1) * F.instance_norm(x2) * g_out).sum(), x2)
    torch.testing.assert_close(gx, ref_gx)                                     # d/dx through clamp(gamma, -1, 1)
    g2, b2 = ada.style(w)[:, :, None, None].chunk(2, 1)
    ref_gw, = torch.autograd.grad(((g2 * F.instance_norm(x.detach()) + b2) * g_out).sum(), ada.style.weight)
    torch.testing.assert_close(gw, ref_gw)                                     # gamma's own gradient unclamped
    assert not torch.allclose(gx, torch.autograd.grad((gamma.detach() * F.instance_norm(x2) * g_out).sum(), x2)[0])


def test_g_step_runs_first_and_d_trains_on_its_detached_fakes():
    """Authors' loop: gloss, x_fake = generator_trainstep(y, z); dloss = discriminator_trainstep(x_real, y, x_fake)
    with x_fake = G(z).detach() from before the G update. --mode pretrain (GAN_stability's train.py): the D step
    first, on fresh fakes, then the G step on a new z. D sees the reals, then the fakes (two calls, issue 26)."""
    for mode, order in (("smallhead", "g_first"), ("pretrain", "d_first")):
        a, G, D = target(mode)
        log, fakes, d_in = [], [], []

        def rec(name, f, store=None):
            def call(x, y=None, *rest):
                out = f(x, y, *rest)
                log.append(name)
                if store is not None:
                    store.append(out.detach().clone())
                return out
            return call
        G_run, G_nograd = rec("G_run", G, fakes), rec("G", G, fakes)
        D_loss, D_run = rec("D", D), rec("D_run", lambda x, y=None: d_in.append(x.detach().clone()) or D(x, y))
        opt_G, opt_D = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
        x = torch.rand(4, 3, 32, 32) * 2 - 1
        nets = (G_nograd, D_loss, G_run, D_run, list(D.parameters()))
        adafm.train_step(a, nets, (opt_G, opt_D, torch.device("cpu")), x, None)
        assert len(d_in[0]) == len(d_in[1]) == 4   # reals, then fakes: never one concatenated batch
        if order == "g_first":
            assert log == ["G_run", "D", "D_run", "D_run"]
            assert torch.equal(d_in[1], fakes[0])    # D's fakes = the G step's own output
        else:
            assert log == ["G", "D_run", "D_run", "G_run", "D"]
            assert torch.equal(d_in[1], fakes[0]) and not torch.equal(fakes[0], fakes[1])


def concatenated_train_step(args, nets, opts, x, y):
    """train_step as it was before issue 26: reals and fakes through D as one concatenated batch, so R1's double
    backward ran over all 2B samples (fp32, no autocast)."""
    G, D, G_run, D_run, D_train = nets
    opt_G, opt_D, device = opts
    z = torch.randn(x.shape[0], args.z_dim, device=device)
    x = (x + torch.rand_like(x) / 128).requires_grad_(True)

    def g_step(z):
        adafm.requires_grad(D_train, False)
        fake = G_run(z, y)
        loss_g = F.softplus(-D(fake, y).float()).mean()
        opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_G.step()
        return loss_g.detach(), fake.detach()

    if args.mode != "pretrain":
        loss_g, fake = g_step(z)
    else:
        with torch.no_grad():
            fake = G(z, y)
    adafm.requires_grad(D_train, True)
    d = D_run(torch.cat([x, fake.to(x.dtype)]), None if y is None else torch.cat([y, y])).float()
    d_real, d_fake = d.chunk(2)
    grad, = torch.autograd.grad(d_real.sum(), x, create_graph=True)
    r1 = grad.float().pow(2).flatten(1).sum(1).mean()
    loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean() + args.r1 / 2 * r1
    opt_D.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_D.step()
    adafm.requires_grad(D_train, False)
    if args.mode == "pretrain":
        loss_g, _ = g_step(torch.randn_like(z))
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "r1": r1.detach(),
            "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}


@pytest.mark.parametrize("mode", ["pretrain", "adafm"])
def test_d_step_on_reals_and_fakes_apart_equals_the_concatenated_batch(mode):
    """Issue 26: R1's double backward covers only the real half now that reals (with R1) and fakes go through D
    separately (as GAN_stability does); one step of a conditional source (--mode pretrain, labels) and of the AdaFM
    target (frozen G4D2, AdaFM on) gives the same losses, gradients and updated weights as the old concatenated
    formula, to float rounding. --r1 2e7 makes R1 weigh as much as the GAN loss at this toy size (R1 term 0.3-1.2,
    loss_d 1.7-2.6). Measured over 3 seeds per mode: losses equal, gradients within 2.0e-5 of each tensor's largest
    gradient, weights within 5e-6 of each tensor's largest value; bound 1e-4 (5x margin)."""
    a = adafm.parse_args(TINY + ["--mode", mode, "--embed-dim", "8", "--r1", "2e7"])
    a.nlabels = 10 if mode == "pretrain" else 0
    y = torch.randint(10, (4,), generator=torch.Generator().manual_seed(0)) if a.nlabels else None
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    runs = []
    for step in (adafm.train_step, concatenated_train_step):
        torch.manual_seed(0)
        G, D, opt_G, opt_D, G_ada, D_tr = adafm.build_target(a, torch.device("cpu"))
        adafm.requires_grad(G_ada, True)
        torch.manual_seed(1)
        losses = step(a, (G, D, G, D, D_tr), (opt_G, opt_D, torch.device("cpu")), x, y)
        runs.append((losses, G, D))
    (new, G1, D1), (old, G0, D0) = runs
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=1e-5, atol=1e-6)
    assert a.r1 / 2 * float(new["r1"]) > 0.1 * float(new["loss_d"])   # R1 weighs in the D gradients compared below
    for m1, m0 in ((G1, G0), (D1, D0)):
        for (n, p1), p0 in zip(m1.named_parameters(), m0.parameters()):
            assert (p1.grad is None) == (p0.grad is None), n
            if p0.grad is not None:   # relative to the tensor's largest gradient
                assert (p1.grad - p0.grad).abs().max() <= 1e-4 * p0.grad.abs().max() + 1e-12, n
            assert (p1 - p0).abs().max() <= 1e-4 * p0.abs().max() + 1e-9, n


def test_reals_get_dequantization_noise_and_center_crop_by_default():
    """GAN_stability data: centre crop (paper), and D sees x + U[0, 1/128) (not x itself) in the D step."""
    assert adafm.parse_args([]).crop == "center"
    a, G, D = target("adafm")
    seen = []
    D_run = lambda x, y=None: seen.append(x.detach().clone()) or D(x, y)   # noqa: E731
    opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    adafm.train_step(a, (G, D, G, D_run, list(D.parameters())), (opt_G, opt_D, torch.device("cpu")), x, None)
    noise = seen[0][:4] - x
    assert noise.min() >= 0 and noise.max() < 1 / 128 and noise.std() > 1 / 128 / 4   # uniform on [0, 1/128)


def test_gradients_reach_gamma_beta_but_never_the_frozen_weights(tmp_path):
    G_sd, D_sd = write_authors_ckpt(tmp_path / "src.pt")
    a, G, D = target("adafm")
    adafm.transfer(G, D, *adafm.source_state_dicts(load_checkpoint(tmp_path / "src.pt"))[:2])
    G_fro, G_ada, G_tr = adafm.split_params(G, adafm.G_GENERAL, True)
    D_fro, _, D_tr = adafm.split_params(D, adafm.D_GENERAL, True)
    adafm.requires_grad(G_fro + D_fro + G_ada, False)   # before --adafm-start
    before = {id(p): p.detach().clone() for p in G_fro + D_fro + G_ada + G_tr}
    opt_G = torch.optim.Adam(G_tr + G_ada, lr=1e-2, betas=(0.0, 0.99))
    opt_D = torch.optim.Adam(D_tr, lr=1e-2, betas=(0.0, 0.99))
    nets, opts, x = (G, D, G, D, D_tr), (opt_G, opt_D, torch.device("cpu")), torch.rand(4, 3, 32, 32) * 2 - 1
    adafm.train_step(a, nets, opts, x, None)
    assert all(torch.equal(p, before[id(p)]) for p in G_ada)          # AdaFM off: gamma/beta untouched
    assert any(not torch.equal(p, before[id(p)]) for p in G_tr)       # ... while the head trains
    adafm.requires_grad(G_ada, True)                                  # the switch
    for _ in range(2):
        adafm.train_step(a, nets, opts, x, None)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G_ada)
    assert all(p.grad is None for p in G_fro + D_fro)
    assert all(torch.equal(p, before[id(p)]) for p in G_fro + D_fro)   # frozen values bit-identical
    assert all(not torch.equal(p, before[id(p)]) for p in G_ada)
    assert torch.equal(G.resnet_4_0.conv_1.weight, G_sd["resnet_4_0.conv_1.weight"])


def test_authors_format_transfers_exactly_the_authors_layers(tmp_path):
    G_sd, D_sd = write_authors_ckpt(tmp_path / "imagenet-8c505f47.pt")
    path = str(tmp_path / "imagenet-8c505f47.pt")
    src_G, src_D, desc = adafm.source_state_dicts(load_checkpoint(path), path)
    assert "GAN_stability" in desc
    for mode, g_loaded in [("adafm", 7), ("smallhead", 7), ("fs", 7), ("gphead", 13), ("transfergan", 13)]:
        a, G, D = target(mode)
        rep = adafm.transfer(G, D, src_G, src_D, path)
        # G4 (6 blocks + conv_img), or + the head's groups 0-2
        assert len({k.split(".")[0] for k in rep["G_loaded"]}) == g_loaded
        new = {"*." + k.split(".")[-1] if k.endswith(("gamma", "beta")) else k.split(".")[0] for k in rep["G_new"]}
        head = {"mapping", "small_fc", "small_block_0", "small_block_1", "small_norm", "scale", "shift"}
        assert new == {"adafm": head | {"*.gamma", "*.beta"}, "fs": head | {"*.gamma", "*.beta"}, "smallhead": head,
                       "gphead": {"fc"}, "transfergan": {"fc"}}[mode], (mode, new)
        assert "fc.weight" in G_sd and "fc.weight" in D_sd   # same-named source fc layers exist, never transferred
        assert rep["D_new"] == ["fc.weight", "fc.bias"]
        for k in rep["G_loaded"]:
            assert torch.equal(G.state_dict()[k], G_sd[k]), k       # from `generator`, not generator_test
        for k in rep["D_loaded"]:
            assert torch.equal(D.state_dict()[k], D_sd[k]), k
    a, G, D = target("adafm")
    adafm.transfer(G, D, src_G, src_D, path)
    adafm.calibrate_head(G, src_G)   # rescaling: new head features get the source head's per-channel std
    src = adafm.Generator(32, 4, 16, "gp", None, 10, 8)
    src.load_state_dict(src_G)
    with torch.no_grad():
        f = src.head_features(torch.randn(64, 16), torch.randint(10, (64,)))
        h = G.head_features(torch.randn(64, 16))
    ratio = h.std(dim=(0, 2, 3)) / f.std(dim=(0, 2, 3))
    assert 0.7 < ratio.median() < 1.4, ratio


def test_mismatched_checkpoint_fails_with_one_clear_line(tmp_path, monkeypatch, one_line_error):
    write_authors_ckpt(tmp_path / "nf8.pt", nf=8)
    src_G, src_D, _ = adafm.source_state_dicts(load_checkpoint(tmp_path / "nf8.pt"))
    a, G, D = target("adafm")
    with pytest.raises(UserError, match=r"first mismatching key 'generator\.resnet_3_0\.conv_0\.weight'"):
        adafm.transfer(G, D, src_G, src_D)
    write_authors_ckpt(tmp_path / "ok.pt")
    ck = torch.load(tmp_path / "ok.pt")
    ck["discriminator"]["module.resnet_2_1.conv_s.weight"] = torch.zeros(3, 3, 1, 1)
    src_G, src_D, _ = adafm.source_state_dicts(ck)
    with pytest.raises(UserError, match=r"'discriminator\.resnet_2_1\.conv_s\.weight' has shape \[3, 3, 1, 1\]"):
        adafm.transfer(*target("adafm")[1:], src_G, src_D)
    del ck["discriminator"]["module.resnet_2_1.conv_s.weight"]
    with pytest.raises(UserError, match=r"'discriminator\.resnet_2_1\.conv_s\.weight' is missing"):
        adafm.transfer(*target("adafm")[1:], *adafm.source_state_dicts(ck)[:2])
    with pytest.raises(UserError, match="not a GP-GAN source"):
        adafm.source_state_dicts({"state": {}})

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)   # no --source, no cached copy, offline
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    err = one_line_error(adafm.main, TINY + ["--out", str(tmp_path / "offline")])
    assert re.search(r"cannot download .*--source PATH", err), err
    err = one_line_error(adafm.main, TINY + ["--source", str(tmp_path / "nf8.pt"), "--out", str(tmp_path / "bad")])
    assert "first mismatching key 'generator.resnet_3_0" in err   # exit 2, one line, no traceback (one_line_error)
    with pytest.raises(SystemExit) as e:
        adafm.main(TINY + ["--res", "16"])
    assert e.value.code == 2


@pytest.mark.slow
def test_pretrain_then_adafm_end_to_end_resume_and_switch(tmp_path):
    pre = tmp_path / "pre"
    run(TINY + ["--mode", "pretrain", "--labels", "auto", "--embed-dim", "8", "--iters", "2", "--out", str(pre)])
    ck = load_checkpoint(pre / "ckpt" / "last.pt")
    assert ck["args"]["nlabels"] == 10 and ck["G"]["embedding.weight"].shape == (10, 8)   # conditional source
    common = TINY + ["--source", str(pre / "ckpt" / "last.pt"), "--adafm-start", "2", "--log-every", "1",
                     "--style-mix", "2"]
    full = run(common + ["--iters", "4", "--out", str(tmp_path / "a")])
    assert "AdaFM/FS parameters switched on at iteration 2" in full.stdout
    assert "frozen 884" in full.stdout and "AdaFM/FS 3,360" in full.stdout   # nf=4: D2 and AdaFM sizes
    for f in ["samples/000004.png", "samples/style_mix.png", "ckpt/last.pt", "transfer.json", "args.json"]:
        assert (tmp_path / "a" / f).is_file(), f
    m = metrics(tmp_path / "a")
    assert [r["iter"] for r in m] == [1, 2, 3, 4]
    assert m[0]["adafm_dev"] == m[1]["adafm_dev"] == 0 < m[2]["adafm_dev"] < m[3]["adafm_dev"]
    rep = json.load(open(tmp_path / "a" / "transfer.json"))
    assert rep["G_frozen"] == rep["G_loaded"] and len(rep["D_frozen"]) == 11
    src = load_checkpoint(pre / "ckpt" / "last.pt")["G"]
    ck = load_checkpoint(tmp_path / "a" / "ckpt" / "last.pt")
    assert all(torch.equal(ck["G"][k], src[k]) for k in rep["G_frozen"])   # still the source values after 4 steps
    src_D = load_checkpoint(pre / "ckpt" / "last.pt")["D"]
    assert all(torch.equal(ck["D"][k], src_D[k]) for k in rep["D_frozen"])   # frozen D2 too (optimizer set-up)
    assert any(not torch.equal(ck["D"][k], src_D[k]) for k in ck["D"] if k.startswith("resnet_1"))   # D1.. fine-tune
    run(common + ["--iters", "2", "--out", str(tmp_path / "b")])
    run(common + ["--iters", "4", "--out", str(tmp_path / "b"), "--resume", "auto"])
    assert metrics(tmp_path / "b") == m            # 2 + 2 resumed == 4 uninterrupted (losses and AdaFM drift)
    ckb = load_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")
    assert all(torch.equal(ck["G_ema"][k], ckb["G_ema"][k]) for k in ck["G_ema"])   # EMA restored exactly too
    s = adafm.load_for_sampling(ck, "cpu")
    za, zb = s.latents(3, 0), s.latents(3, 1)
    img = s.generate(za)
    assert img.shape == (3, 3, 32, 32) and torch.equal(img, s.generate(za))   # deterministic
    assert torch.equal(s.style_mix(za, zb, block=2), img)    # all styles from a
    assert torch.equal(s.style_mix(za, za), img)
    assert not torch.allclose(s.style_mix(za, zb), img)      # block 1 takes b's style
    with pytest.raises(UserError, match="has format 1"):   # an older checkpoint is refused in one line
        adafm.load_for_sampling({**ck, "format": 1}, "cpu")


@pytest.mark.slow
def test_learning_check_transfer_draws_digit_like_samples(tmp_path):
    """Statistics over 256 EMA samples vs the digits at 32 px, as tests/test_disp.py's: nn = mean over samples of the
    RMS pixel distance to the nearest of the first 256 digits (a digit-shaped sample is near one) and ms = |mean(G) -
    mean(data)| + |std(G) - std(data)| over all pixels. After 600 AdaFM iterations from a (random-weight) source,
    --ema 0.99: nn < 0.85 x its value at initialisation and < 0.8 x the lowest nn of four sets of smooth colour blobs
    (4x4 noise upsampled; colour, grey, and both shifted/scaled to the digits' pixel mean/std, which ms alone cannot
    tell from digits); ms < 0.5 x init.
    Measured with these flags, --seed 0-4 (one thread each; another seed = another float trajectory, as on another
    machine): nn 0.443 / 0.425 / 0.430 / 0.493 / 0.415 (mean 0.441, sd 0.031), ms 0.016-0.072; init nn 0.704-0.706,
    ms 0.92. Bound min(0.85 x 0.705, 0.8 x 0.743) = 0.594: the worst seed passes by 0.10 (3 sd), and every control
    fails by >= 0.11: blobs nn 0.822 / grey 0.743 / brightness-matched 0.874, 0.803 (ms 0.000), the initial G 0.705,
    G loss sign flipped 1.301. Held-out digits: nn 0.310. The raw G (--ema 0) oscillates: nn 0.47-0.65 after 300
    iterations over seeds 0-2, so the check samples the EMA."""
    write_authors_ckpt(tmp_path / "src.pt")
    args = ["--data", "digits", "--res", "32", "--nf", "4", "--z-dim", "32", "--w-dim", "32", "--batch", "8",
            "--adafm-start", "0", "--lr", "1e-3", "--ema", "0.99", "--log-every", "100", "--sample-every", "1000",
            "--style-mix", "0", "--source", str(tmp_path / "src.pt")]
    from common.data import load_dataset
    x = load_dataset("digits", 32).images.float() / 127.5 - 1

    def stats(g):
        return nearest_distance(g, x[:256]), (abs(g.mean() - x.mean()) + abs(g.std() - x.std())).item()

    blobs = blob_sets(x)
    blob_nn = min(stats(b)[0] for b in blobs)
    assert max(stats(b)[1] for b in blobs[2:]) < 1e-4   # pixel mean/std alone would pass the matched blobs
    run(args + ["--iters", "0", "--out", str(tmp_path / "init")])
    run(args + ["--iters", "600", "--out", str(tmp_path / "trained")], timeout=900)

    def sample(out):
        return stats(adafm.load_for_sampling(load_checkpoint(out / "ckpt" / "last.pt"), "cpu").sample(256, seed=7))

    (nn0, ms0), (nn1, ms1) = sample(tmp_path / "init"), sample(tmp_path / "trained")
    assert nn0 > 0.6 and ms0 > 0.5, (nn0, ms0)
    bound = min(0.85 * nn0, 0.8 * blob_nn)
    assert all(stats(b)[0] > bound for b in blobs)   # every blob control fails the check
    assert nn1 < bound and ms1 < 0.5 * ms0, (nn1, nn0, blob_nn, ms1, ms0)


def test_benchmark_flag_prints_seconds_per_iteration(capsys):
    """--bench N: common.run.bench on one step() (train_step + EMA) of a fixed random batch; nothing written."""
    sec = adafm.main(["--bench", "1", "--mode", "transfergan", "--res", "32", "--nf", "4", "--z-dim", "16",
                      "--batch", "4"])
    out = capsys.readouterr().out
    assert "bench: 32 px, nf 4, device cpu batch 4" in out, out
    assert re.search(r"bench: adafm --mode transfergan +[0-9.]+ s/iteration", out), out
    assert list(sec) == ["adafm --mode transfergan"] and sec["adafm --mode transfergan"] > 0


def test_flags_and_resume_are_checked_before_the_data_is_read(tmp_path, monkeypatch, one_line_error):
    """`--res 4096 --data digits` used to decode 28 GiB of digits and die with a MemoryError traceback: every flag
    (and a --resume checkpoint, a --source path) is checked before load_dataset, with one 'error:' line, exit 2."""
    def no_data(*a, **k):
        raise AssertionError("load_dataset was called before the flags were checked")

    def error(argv):
        return one_line_error(adafm.main, argv)

    monkeypatch.setattr(adafm, "load_dataset", no_data)
    out = tmp_path / "run"
    assert "error: --res 4096 is not supported" in error(["--data", "digits", "--res", "4096", "--out", str(out)])
    assert "--res 16 is not supported" in error(TINY + ["--res", "16", "--out", str(out)])
    assert not out.exists()
    assert "--source " + str(tmp_path / "nope.pt") + ": no such file" in error(
        TINY + ["--source", str(tmp_path / "nope.pt"), "--out", str(out)])
    last = out / "ckpt" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(os.urandom(1000))
    resume = TINY + ["--mode", "scratch", "--out", str(out), "--resume", "auto"]
    assert "cannot read checkpoint" in error(resume)
    torch.save({"format": 2, "method": "disp", "args": {}}, last)
    assert "written by 'disp', not 'adafm'" in error(resume)
    a = vars(adafm.parse_args(TINY + ["--mode", "scratch"]))
    torch.save({"format": 2, "method": "adafm", "args": {**a, "nf": 8, "nlabels": 0}}, last)
    assert "trained with --nf 8, this run asks for 4" in error(resume)


def test_labels_auto_needs_every_image_in_a_class_folder(tmp_path, one_line_error):
    """--labels auto: a class is a first-level folder, whatever its name (dots included); an image at the top level of
    --data has no class and fails with one line (it used to get label 0 silently, as did every dotted folder's)."""
    from PIL import Image

    def image(rel):
        (tmp_path / "set" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "set" / rel)

    for rel in ("a.v1/0.png", "a.v1/1.png", "b/0.png", "b/sub/1.png"):
        image(rel)
    a = SimpleNamespace(data=str(tmp_path / "set"), data_root=None)
    assert adafm.dataset_labels(a, 4).tolist() == [0, 0, 1, 1]   # b/sub/1.png: class b
    image("top.png")
    with pytest.raises(UserError, match="needs all images in class subfolders"):
        adafm.dataset_labels(a, 5)
    args = ["--mode", "pretrain", "--labels", "auto", "--data", a.data, "--res", "32", "--nf", "4", "--out",
            str(tmp_path / "run")]
    assert "--labels auto needs all images in class subfolders" in one_line_error(adafm.main, args)


def test_load_for_sampling_refuses_other_checkpoints_in_one_readable_line():
    with pytest.raises(UserError, match=r"^checkpoint given to adafm\.load_for_sampling has format 1, this code"):
        adafm.load_for_sampling({"format": 1, "method": "adafm", "args": {}}, "cpu")
    with pytest.raises(UserError, match=r"given to adafm\.load_for_sampling was written by 'disp', not 'adafm'"):
        adafm.load_for_sampling({"format": 2, "method": "disp", "args": {}}, "cpu")


def test_ctrl_c_during_set_up_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt before the training loop: one line, exit 130, no traceback. Inside the loop (where
    StopOnInterrupt turns a second Ctrl-C into KeyboardInterrupt: abort at once) it still passes through."""
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    args = TINY + ["--mode", "scratch", "--iters", "2", "--style-mix", "0", "--out", str(tmp_path / "run")]
    with monkeypatch.context() as m:
        m.setattr(adafm, "load_dataset", interrupt)
        with pytest.raises(SystemExit) as e:
            adafm.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 130
    assert err == "interrupted during set-up (before the first training step; rerun the same command)\n"
    monkeypatch.setattr(adafm, "train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        adafm.main(args)
    assert "interrupted during set-up" not in capsys.readouterr().err
