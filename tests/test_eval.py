"""eval.py end to end with a tiny generator module written here (the method-script contract: `ckpt["method"]` names
an importable module with `load_for_sampling(ckpt, device, **opts)` -> Sampler), the stand-in TorchScript
'Inception' of test_metrics, and a folder of images (--fake-dir). Checks the images numerically (PNG tiles), the
metrics JSON, and that user errors are one clear line with exit code 2."""
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common.metrics as M
from common.run import UserError

import eval as E  # eval.py at the repo root (tests/conftest.py puts the root on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINYGAN = '''
import torch
from common.sampling import SamplerBase


class G(torch.nn.Module):
    def __init__(self, zdim=8, res=8):
        super().__init__()
        self.res = res
        self.fc = torch.nn.Linear(zdim, 3 * res * res)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, self.res, self.res)


class Sampler(SamplerBase):
    def __init__(self, g, device, psi):
        self.g, self.device, self.psi, self.res = g.to(device).eval(), device, psi, g.res

    def latents(self, n, seed):
        return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)).to(self.device)

    @torch.no_grad()
    def generate(self, z):
        return self.g(z * self.psi)

    @torch.no_grad()
    def style_mix(self, a, b):  # "coarse" = the first half of the latent
        return self.generate(torch.cat([a[:, :4], b[:, 4:]], 1))


def load_for_sampling(ckpt, device, psi=1.0):
    g = G(res=ckpt["args"]["res"])
    g.load_state_dict(ckpt["G_ema"])
    return Sampler(g, device, psi)
'''

NOMIX = '''
import tinygan_test


class Sampler(tinygan_test.Sampler):
    style_mix = None


def load_for_sampling(ckpt, device):
    s = tinygan_test.load_for_sampling(ckpt, device)
    s.__class__ = Sampler
    return s
'''


class StandIn(torch.nn.Module):
    """Same contract as inception-2015-12-05.pt: uint8 NCHW of any size in, resized inside, features out."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, dim, 3, stride=2)

    def forward(self, x, return_features: bool = False):
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        x = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        return F.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tinygan_test.py + tinygan_nomix.py, run dirs with checkpoints, and the stand-in net file."""
    d = tmp_path_factory.mktemp("evalworld")
    (d / "tinygan_test.py").write_text(TINYGAN)
    (d / "tinygan_nomix.py").write_text(NOMIX)
    sys.path.insert(0, str(d))
    import tinygan_test
    torch.manual_seed(0)
    state = tinygan_test.G().state_dict()
    args = {"data": "digits", "res": 8, "data_root": "data", "crop": "squash"}
    for name, method in (("run", "tinygan_test"), ("nomix", "tinygan_nomix"), ("alien", "no_such_method_xyz")):
        os.makedirs(d / name / "ckpt")
        ckpt = {"format": 2, "method": method, "args": args, "step": 5, "G_ema": state}
        torch.save(ckpt, d / name / "ckpt" / "last.pt")
    torch.save({**ckpt, "method": "tinygan_test", "step": 9}, d / "run" / "ckpt" / "best.pt")
    os.makedirs(d / "old" / "ckpt")  # an older checkpoint format (no "format" entry): refused in one line
    old = {k: v for k, v in ckpt.items() if k != "format"} | {"method": "tinygan_test"}
    torch.save(old, d / "old" / "ckpt" / "last.pt")
    os.makedirs(d / "empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(StandIn()).save(str(d / "tiny.pt"))
    yield d
    sys.path.remove(str(d))


def tiles(png, res, nrow, pad=2):
    """Split a torchvision grid PNG back into uint8 tiles [n, res, res, 3]."""
    a = np.asarray(Image.open(png).convert("RGB"))
    rows, cols = (a.shape[0] - pad) // (res + pad), (a.shape[1] - pad) // (res + pad)
    assert cols == nrow and a.shape == (rows * (res + pad) + pad, cols * (res + pad) + pad, 3)
    step = res + pad
    return np.stack([a[pad + r * step:pad + r * step + res, pad + c * step:pad + c * step + res]
                     for r in range(rows) for c in range(cols)]).astype(np.int16)


def png_u8(x):
    """What save_grid writes for [-1,1] images: make_grid normalises to [0,1], save_image does x*255+0.5."""
    u8 = ((x.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).numpy().astype(np.int16)


@pytest.mark.slow
def test_cli_end_to_end_metrics_and_images(world, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(world), ROOT]), "TORCH_HOME": str(tmp_path / "th"),
           "GAN_INCEPTION_URL": "none"}
    env.pop("GAN_INCEPTION", None)
    out = tmp_path / "out"
    cmd = [sys.executable, "eval.py", str(world / "run"), "--metrics", "fid,kid,pr", "--n", "200", "--pr-k", "10,40",
           "--inception", str(world / "tiny.pt"), "--cache-dir", str(tmp_path / "stats"), "--mem-grid",
           "--grid", "--grid-n", "16", "--interp", "--mix", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "protocol custom:tiny.pt/stylegan2-ada" in r.stdout
    res = json.load(open(out / "best-metrics.json"))  # run dir -> ckpt/best.pt
    assert res["step"] == 9 and res["method"] == "tinygan_test" and res["n_fake"] == 200 and res["n_real"] == 1797
    assert res["protocol"] == "custom:tiny.pt/stylegan2-ada" and res["pr_k"] == [10, 40] and res["res"] == 8
    for k in ("fid", "kid", "precision", "recall", "mem_ratio", "mem_frac_close", "mem_real_nn_mean"):
        assert np.isfinite(res[k]), k
    assert res["fid"] > 0 and 0 <= res["precision"] <= 1 and len(res["mem_grid_rows"]) == 8
    assert tiles(out / "best-grid.png", 8, 4).shape[0] == 16
    assert tiles(out / "best-interp.png", 8, 8).shape[0] == 6 * 8
    assert tiles(out / "best-mix.png", 8, 7).shape[0] == 5 * 7
    assert tiles(out / "best-mem.png", 8, 4).shape[0] == 8 * 4


def test_interp_mix_psi_tiles_are_the_right_images(world, tmp_path, monkeypatch, clean_env):
    monkeypatch.setattr(M, "find_inception", lambda *a, **k: pytest.fail("--metrics none must not look for weights"))
    ck = str(world / "run" / "ckpt" / "last.pt")
    written = E.main([ck, "--metrics", "none", "--grid", "--grid-n", "9", "--interp", "--interp-rows", "2",
                      "--interp-steps", "3", "--mix", "--seed", "4", "--out", str(tmp_path)])
    assert sorted(os.path.basename(w) for w in written) == ["last-grid.png", "last-interp.png", "last-mix.png"]
    import tinygan_test
    s = tinygan_test.load_for_sampling(torch.load(ck, weights_only=True), torch.device("cpu"))
    grid = tiles(tmp_path / "last-grid.png", 8, 3)
    assert np.abs(grid - png_u8(s.generate(s.latents(9, 4)))).max() <= 1
    z = s.latents(4, 4)  # rows: z[0] -> z[2], z[1] -> z[3]
    want = [s.generate(((1 - t) * z[r] + t * z[r + 2])[None]) for r in range(2) for t in (0.0, 0.5, 1.0)]
    assert np.abs(tiles(tmp_path / "last-interp.png", 8, 3) - png_u8(torch.cat(want))).max() <= 1
    mix = tiles(tmp_path / "last-mix.png", 8, 7)
    za, zb = s.latents(6, 4), s.latents(4, 5)
    assert (mix[0] == 255).all()  # blank corner
    assert np.abs(mix[1:7] - png_u8(s.generate(za))).max() <= 1
    assert np.abs(mix[7 * 2 + 3] - png_u8(s.style_mix(za[2:3], zb[1:2]))[0]).max() <= 1  # row b1, column a2
    E.main([ck, "--metrics", "none", "--grid", "--grid-n", "4", "--psi", "0", "--out", str(tmp_path / "psi0")])
    g0 = tiles(tmp_path / "psi0" / "last-grid.png", 8, 2)
    assert (g0 == g0[:1]).all() and np.abs(grid[0] - grid[1]).max() > 10  # psi=0: every latent gives one image


def test_fake_dir(world, tmp_path, clean_env):
    from common.data import load_dataset
    reals = load_dataset("digits", 8).images
    noise = torch.Generator().manual_seed(0)
    for name, imgs in (("copies", reals[::9][:150]), ("noise", torch.randint(0, 256, (150, 3, 8, 8), generator=noise))):
        os.makedirs(tmp_path / name)
        for i, im in enumerate(imgs):
            Image.fromarray(im.permute(1, 2, 0).numpy().astype(np.uint8)).save(tmp_path / name / f"{i:04d}.png")
    out = {}
    for name in ("copies", "noise"):
        E.main(["--fake-dir", str(tmp_path / name), "--data", "digits", "--metrics", "fid,kid", "--inception",
                str(world / "tiny.pt"), "--cache-dir", str(tmp_path / "stats"), "--grid", "--grid-n", "4",
                "--mem-grid"])
        out[name] = json.load(open(tmp_path / f"{name}_eval" / "fakes-metrics.json"))
        assert out[name]["n_fake"] == 150 and out[name]["n_real"] == 1797 and out[name]["res"] == 8
    c, n = out["copies"], out["noise"]
    assert n["fid"] > 10 * c["fid"] and n["kid"] > 10 * max(c["kid"], 1e-4)
    # every 'copy' is a training image: nearest-neighbour distance 0, all closer than the real-real 5th percentile
    assert c["mem_fake_nn_mean"] < 1e-5 and c["mem_frac_close"] == 1.0 and c["mem_ratio"] < 1e-4
    assert n["mem_ratio"] > 1.0 and n["mem_frac_close"] == 0.0
    mem = tiles(tmp_path / "copies_eval" / "fakes-mem.png", 8, 4)  # rows: fake, then its 3 nearest training images
    assert mem.shape[0] == 32 and all((mem[4 * r] == mem[4 * r + 1]).all() for r in range(8))
    assert all(row["nn"][0] == 9 * row["fake"] or row["dist"][0] < 1e-5 for row in c["mem_grid_rows"])
    grid = tiles(tmp_path / "copies_eval" / "fakes-grid.png", 8, 2)
    assert (grid == png_u8(reals[:4 * 9:9].float() / 127.5 - 1)).all()
    with pytest.raises(UserError, match="--interp and --mix need a checkpoint"):
        E.main(["--fake-dir", str(tmp_path / "noise"), "--metrics", "none", "--interp"])


def test_errors_are_one_clear_line(world, tmp_path, monkeypatch, clean_env):
    run = str(world / "run")
    cases = [([str(tmp_path / "nope.pt")], "does not exist"),
             ([str(world / "empty")], "holds no checkpoint"),
             ([str(world / "alien")], "no_such_method_xyz"),
             ([str(world / "old")], "has format 1, this code reads format 2"),
             ([str(world / "nomix"), "--metrics", "none", "--mix"], "no style_mix"),
             ([str(world / "nomix"), "--metrics", "none", "--grid", "--psi", "0.5"], "truncation"),
             ([run, "--metrics", "fid,is"], "unknown is"),
             ([run, "--metrics", "fid", "--grid"], "inception-2015-12-05.pt not found")]
    for argv, msg in cases:
        t = time.time()
        with pytest.raises(UserError, match=msg) as e:
            E.main(argv + ["--out", str(tmp_path / "o")])
        assert "\n" not in str(e.value) and time.time() - t < 10, argv
    assert not os.path.exists(tmp_path / "o" / "last-grid.png")  # the weights check comes before any work
    # the CLI turns it into one 'error:' line and exit code 2
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th"), "GAN_INCEPTION_URL": "none"}
    env.pop("GAN_INCEPTION", None)
    r = subprocess.run([sys.executable, "eval.py", str(tmp_path / "nope")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: checkpoint"), r.stderr


def fastgan_ckpt(path, res=32):
    """A random-init FastGAN checkpoint (minimal widths) whose reference data is digits."""
    import fastgan as fg
    torch.manual_seed(0)
    a = vars(fg.parse_args(["--data", "digits", "--res", str(res), "--ngf", "4", "--ndf", "4", "--nz", "8"]))
    torch.save({"format": 2, "method": "fastgan", "args": a, "step": 1, "G_ema": fg.Generator(res, 4, 8).state_dict()},
               path)
    return str(path)


def test_mem_grid_shows_the_measured_fakes_when_images_depend_on_their_batch(world, tmp_path, monkeypatch, clean_env):
    """bn=batch: an image depends on its batch companions, so each mem-grid fake is remade in its batch of the
    metrics (--batch 8: fakes 0-7, 8-15, 16-19): the tiles are the images the features were measured on."""
    measured, features = [], M.Evaluator.features
    monkeypatch.setattr(M.Evaluator, "features", lambda self, batches: features(
        self, (measured.append(b) or b if b.dtype != torch.uint8 else b for b in batches)))  # the fakes, not the reals
    ck = fastgan_ckpt(tmp_path / "fg.pt")
    E.main([ck, "--metrics", "mem", "--mem-grid", "--n", "20", "--batch", "8", "--sampler-opt", "bn=batch",
            "--inception", str(world / "tiny.pt"), "--cache-dir", str(tmp_path / "stats"),
            "--out", str(tmp_path / "o")])
    measured = torch.cat(measured)
    rows = [r["fake"] for r in json.load(open(tmp_path / "o" / "fg-metrics.json"))["mem_grid_rows"]]
    assert measured.shape == (20, 3, 32, 32) and len(rows) == 8
    mem = tiles(tmp_path / "o" / "fg-mem.png", 32, 4)  # rows: fake, then its 3 nearest training images
    assert np.abs(mem[::4] - png_u8(measured[rows])).max() <= 1
    c = torch.load(ck, weights_only=True)
    s = E.load_sampler(E.import_method(c, ck), c, torch.device("cpu"), {"bn": "batch"})
    together = s.generate(s.latents(20, 0)[rows])  # the 8 rows remade as one batch: other images
    assert np.abs(png_u8(together) - png_u8(measured[rows])).max() > 10


def test_project_targets_are_at_the_generator_resolution(tmp_path, clean_env):
    """--res 16 (the reference data's resolution) on a 32 px generator: the --project and --mem-project targets are
    read at the generator's 32 px."""
    ck = fastgan_ckpt(tmp_path / "fg.pt")
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    E.main([ck, "--metrics", "none", "--res", "16", "--project", str(tmp_path / "photo.png"), "--mem-project", "2",
            "--steps", "2", "--proj-init", "2", "--sampler-opt", "bn=copy", "--out", str(tmp_path / "o")])
    proj = tiles(tmp_path / "o" / "fg-project.png", 32, 4)  # the target, then steps 0, 1, 2
    assert proj.shape[0] == 4 and np.abs(proj[0] - 200).max() <= 1
    assert tiles(tmp_path / "o" / "fg-memproj.png", 32, 2).shape[0] == 4  # rows: 2 targets, 2 projections
    assert json.load(open(tmp_path / "o" / "fg-memproj.json"))["res"] == 32
