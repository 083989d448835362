"""eval.py --project / --mem-project and the differentiable-generate contract (SamplerBase.differentiable,
proj_init / proj_generate) on the tiny random-weight checkpoints of test_eval_images (DISP's warmed up so that its
spectral norms and BatchNorm statistics are not at their random init, where tanh saturates and nothing moves)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as E
from common.output import save_grid
from common.run import UserError
from common.sampling import SamplerBase
from test_eval_images import tiny_ckpts

METHODS = ["fastgan", "insgen", "adafm", "disp"]
OPTS = {"fastgan": {"noise": "const", "bn": "recompute"}, "insgen": {"noise": "const"}, "adafm": {"noise": "const"},
        "disp": {}}  # the deterministic modes --project uses (fastgan: recompute, for images that move with z)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    import disp
    d = tmp_path_factory.mktemp("tinyckpts")
    out = tiny_ckpts(d)
    c = torch.load(out["disp"], weights_only=True)
    G = disp.build_models(argparse.Namespace(**c["args"]), 6)[0]
    G.load_state_dict(c["G_ema"])
    G.train()
    torch.manual_seed(1)
    with torch.no_grad():  # power iterations and BN statistics, as a trained G_ema has them
        for _ in range(20):
            G(torch.randn(16, 8), c["priors"][torch.randint(10, (16,))])
    c["G_ema"], c["args"]["max_images"] = G.state_dict(), 100  # disp --max-images 100: digits 100.. are held out
    torch.save(c, out["disp"])
    return out


def sampler(ck, **opts):
    c = torch.load(ck, weights_only=True)
    return E.load_sampler(E.import_method(c, ck), c, torch.device("cpu"), opts)


@pytest.mark.parametrize("method", METHODS)
def test_projection_recovers_a_generated_image(ckpts, method):
    s = sampler(ckpts[method], **OPTS[method])
    target = s.generate(s.latents(2, 1234))
    r = E.project(s, target, steps=80, lr=0.1, n_init=8, seed=0)
    assert r["v"].shape == s.proj_init(s.latents(2, 0)).shape  # InsGen: W [2, 512]; others the latents
    assert (r["mse"] < 0.5 * r["init_mse"]).all(), (r["init_mse"], r["mse"])
    assert r["mse"].mean() < 0.3 * r["init_mse"].mean(), (r["init_mse"], r["mse"])
    assert r["snapshots"].shape[:2] == (2, 8) and torch.equal(r["snapshots"][:, -1], r["img"])
    with torch.no_grad(), s.differentiable():
        again = s.proj_generate(r["v"])
    torch.testing.assert_close(((again - target) ** 2).mean((1, 2, 3)), r["mse"], rtol=1e-4, atol=1e-7)


def test_generate_is_differentiable_only_inside_differentiable(ckpts):
    for m in METHODS:
        s = sampler(ckpts[m], **OPTS[m])
        z = s.latents(2, 0).requires_grad_(True)
        assert not s.generate(z).requires_grad, m  # every existing caller: no graph, as @torch.no_grad()
        with s.differentiable():
            img = s.generate(z)
            with torch.no_grad():
                assert not s.generate(z).requires_grad, m
        assert img.requires_grad and not s._grad, m
        img.sum().backward()
        assert z.grad.abs().sum() > 0, m
    s = sampler(ckpts["insgen"], noise="const")
    w = s.proj_init(s.latents(2, 0))
    assert w.shape == (2, 512) and not w.requires_grad and s.proj_space == "W"
    with torch.no_grad(), s.differentiable():  # W broadcast to every layer = what the latents themselves give
        torch.testing.assert_close(s.proj_generate(w), s.generate(s.latents(2, 0)))

    class NoGrad(SamplerBase):  # a method whose generate is still @torch.no_grad(): one clear line
        res, G = 4, torch.nn.Linear(2, 48)

        def latents(self, n, seed):
            return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))

        @torch.no_grad()
        def generate(self, z):
            return self.G(z).view(-1, 3, 4, 4).tanh()

    with pytest.raises(UserError, match="not differentiable.*SamplerBase.sampler_grad"):
        E.project(NoGrad(), torch.zeros(1, 3, 4, 4), steps=2, n_init=2)


def test_project_cli(ckpts, tmp_path, capsys):
    s = sampler(ckpts["insgen"], noise="const")
    save_grid(s.generate(s.latents(1, 77)), str(tmp_path / "a.png"))
    save_grid(s.generate(s.latents(1, 78)), str(tmp_path / "b.png"))
    out = tmp_path / "o"
    written = E.main([ckpts["insgen"], "--metrics", "none", "--project", str(tmp_path / "a.png"),
                      str(tmp_path / "b.png"), "--steps", "40", "--proj-init", "8", "--out", str(out)])
    assert "projection loss: pixel MSE only (LPIPS off: no local weights" in capsys.readouterr().out
    assert [os.path.basename(w) for w in written] == ["insgen-project.png", "insgen-project-latents.pt",
                                                      "insgen-project.json"]
    js = json.load(open(out / "insgen-project.json"))
    assert js["loss"] == "mse" and js["space"] == "W" and js["sampler_opts"] == {"noise": "const"} and js["steps"] == 40
    assert [r["image"] for r in js["images"]] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert all(r["mse"] < 0.5 * r["init_mse"] for r in js["images"]) and "lpips" not in js["images"][0]
    grid = np.asarray(Image.open(out / "insgen-project.png"))  # 2 rows x (target, start, 6 steps, end) of 16 px + 2 pad
    assert grid.shape[:2] == (2 * 18 + 2, 9 * 18 + 2)
    lat = torch.load(out / "insgen-project-latents.pt", weights_only=True)
    with torch.no_grad():
        rec = s.proj_generate(lat["v"])
    assert lat["space"] == "W" and np.allclose([float(((rec[i:i + 1] - E.read_targets([str(tmp_path / f"{c}.png")], 16,
                                                "squash")[0]) ** 2).mean()) for i, c in enumerate("ab")],
                                               [r["mse"] for r in js["images"]], rtol=1e-3, atol=1e-7)
    with pytest.raises(UserError, match="--project .*no images found|cannot read"):
        E.main([ckpts["insgen"], "--metrics", "none", "--project", str(tmp_path / "nothing"), "--out", str(out)])
    with pytest.raises(UserError, match="bn=recompute or bn=copy"):
        E.main([ckpts["fastgan"], "--metrics", "none", "--sampler-opt", "bn=batch", "--project",
                str(tmp_path / "a.png")])
    with pytest.raises(UserError, match="--holdout is the held-out set of --mem-project"):
        E.main([ckpts["insgen"], "--metrics", "none", "--holdout", str(tmp_path)])
    with pytest.raises(UserError, match="--vgg-weights .*no such file"):  # a given LPIPS file must exist
        E.main([ckpts["insgen"], "--metrics", "none", "--project", str(tmp_path / "a.png"), "--vgg-weights",
                str(tmp_path / "none.pth")])


def test_project_with_lpips_when_weights_are_local(ckpts, tmp_path, monkeypatch, capsys):
    """The LPIPS branch with a stand-in network (the real VGG16 weights are not on this machine): the files load by
    LPIPS' key names, the loss is mse + lpips, and both are reported."""
    import common.weights

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.lins = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.nn.ModuleList(
                [torch.nn.Conv2d(4, 1, 1, bias=False)])

        def forward(self, x, y):
            return self.lins[0]((self.features(x) - self.features(y)) ** 2).mean((1, 2, 3)).abs()

    monkeypatch.setattr(common.weights, "LPIPS", Tiny)
    t = Tiny()
    torch.save({f"features.{k}": v for k, v in t.features.state_dict().items()}, tmp_path / "vgg.pth")
    torch.save({"lin0.model.1.weight": t.lins[0].weight.detach()}, tmp_path / "lin.pth")
    s = sampler(ckpts["adafm"], noise="const")
    save_grid(s.generate(s.latents(1, 5)), str(tmp_path / "a.png"))
    E.main([ckpts["adafm"], "--metrics", "none", "--project", str(tmp_path / "a.png"), "--steps", "3",
            "--proj-init", "2", "--vgg-weights", str(tmp_path / "vgg.pth"), "--lpips-weights",
            str(tmp_path / "lin.pth"), "--out", str(tmp_path / "o")])
    assert "projection loss: pixel MSE + LPIPS (LPIPS v0.1 VGG16 from" in capsys.readouterr().out
    row = json.load(open(tmp_path / "o" / "adafm-project.json"))["images"][0]
    assert json.load(open(tmp_path / "o" / "adafm-project.json"))["loss"] == "mse+lpips"
    assert row["loss"] == pytest.approx(row["mse"] + row["lpips"], rel=1e-4) and row["lpips"] > 0


def test_mem_project(ckpts, tmp_path, capsys):
    held = tmp_path / "held"  # 3 images the insgen model was not trained on (it was: digits)
    held.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((16, 16, 3)) * 255).astype(np.uint8)).save(held / f"{i}.png")
    written = E.main([ckpts["insgen"], "--metrics", "none", "--mem-project", "3", "--holdout", str(held),
                      "--steps", "5", "--proj-init", "4", "--out", str(tmp_path / "o")])
    assert [os.path.basename(w) for w in written] == ["insgen-memproj.png", "insgen-memproj.json"]
    js = json.load(open(tmp_path / "o" / "insgen-memproj.json"))
    assert js["train"]["n"] == 3 and js["heldout"]["n"] == 3 and js["train"]["data"] == "digits"
    assert js["train"]["mean_mse"] == pytest.approx(np.mean([r["mse"] for r in js["train"]["images"]]), rel=1e-5)
    assert js["heldout_over_train"] == pytest.approx(js["heldout"]["mean_loss"] / js["train"]["mean_loss"], rel=1e-6)
    assert "held-out / train mse" in capsys.readouterr().out
    assert np.asarray(Image.open(written[0])).shape[:2] == (4 * 18 + 2, 3 * 18 + 2)  # 4 rows of 3
    # disp --max-images 100: train among digits 0..99, held out among 100..; no --holdout needed
    E.main([ckpts["disp"], "--metrics", "none", "--mem-project", "4", "--steps", "2", "--proj-init", "2",
            "--out", str(tmp_path / "d")])
    js = json.load(open(tmp_path / "d" / "disp-memproj.json"))
    assert max(js["train"]["index"]) < 100 <= min(js["heldout"]["index"]) and js["space"] == "[z ; prior]"
