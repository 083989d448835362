"""eval.py --save-images / --seeds and --gif on tiny random-weight checkpoints of all four methods (built in-process,
no training): per-seed images are a function of the seed only (batch size, other seeds), the GIF loop's frames,
timing and first frame."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as E
from common.output import to_uint8
from common.run import UserError


def tiny_ckpts(d):
    """{method: checkpoint path}: random-init generators at res 16/32 with minimal widths."""
    import adafm
    import disp
    import fastgan as fg
    import insgen as I
    torch.manual_seed(0)
    out = {}

    def save(method, args, G, **extra):
        path = d / f"{method}.pt"
        torch.save({"format": 2, "method": method, "args": args, "step": 1, "G_ema": G.state_dict(), **extra}, path)
        out[method] = str(path)

    a = vars(fg.parse_args(["--res", "32", "--ngf", "4", "--ndf", "4", "--nz", "8", "--sample-bn", "copy"]))
    G = fg.Generator(32, 4, 8)
    with torch.no_grad():  # non-trivial noise strength and BN statistics
        for m in G.modules():
            if isinstance(m, fg.NoiseInjection):
                m.weight.fill_(0.3)
        G(torch.randn(8, 8))
    save("fastgan", a, G)
    a = {"res": 16, "cbase": 128, "cmax": 16, "map": 2, "psi": 1.0, "data": "digits"}
    G = I.build_generator(a)
    with torch.no_grad():  # noise strengths start at 0: make the (random) noise matter
        for n, p in G.named_parameters():
            if n.endswith("noise_strength"):
                p.fill_(0.5)
    save("insgen", a, G)
    a = vars(adafm.parse_args(["--mode", "scratch", "--res", "32", "--nf", "2", "--z-dim", "8", "--w-dim", "8",
                               "--embed-dim", "8"]))
    save("adafm", a, adafm.build(argparse.Namespace(**a))[0])
    a = vars(disp.parse_args(["--res", "32", "--ch", "4", "--z-dim", "8", "--emb-dim", "8", "--sample-bn", "copy"]))
    save("disp", a, disp.build_models(argparse.Namespace(**a), 6)[0], priors=torch.randn(10, 6), prior_dim=6)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_ckpts(tmp_path_factory.mktemp("tinyckpts"))


def read(folder):
    return {f: np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("method", ["fastgan", "insgen", "adafm", "disp"])
def test_seed_images_do_not_depend_on_batch_or_other_seeds(ckpts, method, tmp_path):
    ck = ckpts[method]
    base = [ck, "--metrics", "none", "--out", str(tmp_path / "o")]
    E.main(base + ["--save-images", str(tmp_path / "a"), "--seeds", "0-2,5", "--batch", "3"])
    a = read(tmp_path / "a")
    assert list(a) == ["seed0000.png", "seed0001.png", "seed0002.png", "seed0005.png"]
    E.main(base + ["--save-images", str(tmp_path / "b"), "--seeds", "5", "--batch", "1"])
    E.main(base + ["--save-images", str(tmp_path / "c"), "--seeds", "9,5,1", "--batch", "3"])
    b, c = read(tmp_path / "b"), read(tmp_path / "c")
    assert list(b) == ["seed0005.png"] and list(c) == ["seed0001.png", "seed0005.png", "seed0009.png"]
    assert np.array_equal(a["seed0005.png"], b["seed0005.png"]) and np.array_equal(a["seed0005.png"], c["seed0005.png"])
    assert np.array_equal(a["seed0001.png"], c["seed0001.png"])
    assert not np.array_equal(a["seed0000.png"], a["seed0005.png"])
    # the file is the image of sampler.latents(1, seed) generated alone
    s = E.load_sampler(E.import_method(torch.load(ck, weights_only=True), ck), torch.load(ck, weights_only=True),
                       torch.device("cpu"), {})
    want = to_uint8(s.generate(s.latents(1, 5)))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(a["seed0005.png"], want)


def test_batch_dependent_samplers_go_one_seed_per_call(ckpts, tmp_path):
    """fastgan bn=batch (batch-statistic BatchNorm) and insgen noise=random: one latent per generate() call."""
    import fastgan as fg
    ck = torch.load(ckpts["fastgan"], weights_only=True)
    s = fg.load_for_sampling(ck, "cpu", bn="batch")
    assert not s.batch_independent and fg.load_for_sampling(ck, "cpu", bn="copy").batch_independent
    z = s.latents(3, 0)
    assert not torch.equal(s.generate(z)[:1], s.generate(z[:1]))  # the reason
    calls = []
    gen = s.generate
    s.generate = lambda z: calls.append(len(z)) or gen(z)
    assert torch.equal(E.generate_each(s, z, 3), torch.cat([gen(z[i:i + 1]) for i in range(3)]))
    assert calls == [1, 1, 1]
    si = E.load_sampler(E.import_method(torch.load(ckpts["insgen"], weights_only=True), "insgen"),
                        torch.load(ckpts["insgen"], weights_only=True), torch.device("cpu"), {})
    z = si.latents(3, 0)
    assert si.noise == "random" and not si.batch_independent
    assert not torch.equal(si.generate(z)[:1], si.generate(z[:1]))  # one noise seed per call, from all its latents
    E.main([ckpts["fastgan"], "--metrics", "none", "--sampler-opt", "bn=batch", "--save-images", str(tmp_path / "a"),
            "--seeds", "3-5", "--batch", "3"])
    E.main([ckpts["fastgan"], "--metrics", "none", "--sampler-opt", "bn=batch", "--save-images", str(tmp_path / "b"),
            "--seeds", "5"])
    assert np.array_equal(read(tmp_path / "a")["seed0005.png"], read(tmp_path / "b")["seed0005.png"])


def test_psi_applies_and_bad_seeds_are_one_line(ckpts, tmp_path):
    ck = ckpts["insgen"]
    E.main([ck, "--metrics", "none", "--psi", "0", "--sampler-opt", "noise=const", "--save-images", str(tmp_path / "p"),
            "--seeds", "0,1"])
    p = read(tmp_path / "p")
    assert np.array_equal(p["seed0000.png"], p["seed0001.png"])  # psi 0: every latent maps to the mean w
    for bad in ["a-b", "3-1", "1,,2", "-4", ""]:
        with pytest.raises(UserError, match="expected seeds >= 0") as e:
            E.main([ck, "--metrics", "none", "--save-images", str(tmp_path / "x"), "--seeds", bad])
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="at least 2 --gif-seeds"):
        E.main([ck, "--metrics", "none", "--gif", str(tmp_path / "x.gif"), "--gif-seeds", "3"])
    assert not os.path.exists(tmp_path / "x")
    assert E.parse_seeds("0-3,7,10-12") == [0, 1, 2, 3, 7, 10, 11, 12]


@pytest.mark.parametrize("method", ["fastgan", "disp"])
def test_gif_loop(ckpts, method, tmp_path):
    ck = ckpts[method]
    gif = tmp_path / "walk.gif"
    written = E.main([ck, "--metrics", "none", "--gif", str(gif), "--gif-seeds", "4,1,7", "--gif-frames", "5",
                      "--gif-fps", "20", "--batch", "4", "--out", str(tmp_path / "o")])
    assert written == [str(gif)]
    im = Image.open(gif)
    assert im.n_frames == 3 * 5 and im.info["loop"] == 0 and im.info["duration"] == 50
    frames = []
    for i in range(im.n_frames):
        im.seek(i)
        frames.append(np.asarray(im.convert("RGB")).astype(np.int16))
    s = E.load_sampler(E.import_method(torch.load(ck, weights_only=True), ck), torch.load(ck, weights_only=True),
                       torch.device("cpu"), {})
    z = E.seed_latents(s, [4, 1, 7])
    for k in range(3):  # frame 5k is seed k's own image (the loop closes: after seed 7 comes seed 4 again)
        want = to_uint8(s.generate(z[k:k + 1]))[0].permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(frames[5 * k] - want).mean() < 3, k
    mid = to_uint8(s.generate((0.6 * z[2:3] + 0.4 * z[0:1])))[0].permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(frames[-3] - mid).mean() < 3  # frame 2 of the last transition: t = 2/5 from seed 7 to seed 4
    assert np.abs(frames[0] - frames[1]).mean() > 0
