"""eval.py --export (TorchScript generator, loaded in a fresh interpreter without the repository) on the tiny
random-weight checkpoints of test_eval_images."""
import os
import subprocess
import sys

import pytest
import torch

import eval as E
from common.run import UserError
from test_eval_images import tiny_ckpts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["fastgan", "insgen", "adafm", "disp"]

LOADER = r'''
import importlib.util, json, os, sys, torch
root = sys.argv[1]
assert not any(os.path.abspath(p or ".").startswith(root) for p in sys.path), sys.path
assert not os.getcwd().startswith(root)
for name in ("common", "eval", "fastgan", "insgen", "adafm", "disp"):
    assert importlib.util.find_spec(name) is None, name
z, out = torch.load("latents.pt"), {}
for m in sys.argv[2:]:
    extra = {"latent.txt": "", "export.json": ""}
    G = torch.jit.load(m + ".pt", _extra_files=extra)
    out[m] = {"img": G(z[m]), "doc": G.latent_doc, "txt": extra["latent.txt"].decode(),
              "meta": json.loads(extra["export.json"]), "dim": G.latent_dim, "res": G.res, "noise": G.noise,
              "method": G.method, "grad": G(z[m]).requires_grad,
              "priors": G.priors if m == "disp" else None}
torch.save(out, "out.pt")
'''


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_ckpts(tmp_path_factory.mktemp("tinyckpts"))


def sampler(ck, **opts):
    c = torch.load(ck, weights_only=True)
    return E.load_sampler(E.import_method(c, ck), c, torch.device("cpu"), opts)


@pytest.mark.slow
def test_export_equals_generate_in_a_fresh_process(ckpts, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    z, want = {}, {}
    for m in METHODS:
        written = E.main([ckpts[m], "--metrics", "none", "--device", "cpu", "--export", str(work / f"{m}.pt"),
                          "--out", str(tmp_path / "o")])
        assert written == [str(work / f"{m}.pt")]
        s = sampler(ckpts[m], **({} if m == "disp" else {"noise": "const"}))  # the mode the export bakes in
        z[m] = torch.cat([s.latents(4, 7), s.latents(1, 99)])  # 5 rows: not the batch size the trace saw (2)
        want[m] = s.generate(z[m])
        if m != "disp":  # the default (per-sample random) noise gives other images: the export is noise=const
            assert (sampler(ckpts[m]).generate(z[m]) - want[m]).abs().max() > 1e-3
    torch.save(z, work / "latents.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run([sys.executable, "-I", "-c", LOADER, ROOT, *METHODS], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(work / "out.pt", weights_only=False)
    for m in METHODS:
        g = got[m]
        assert g["img"].shape == (5, 3, g["res"], g["res"]) and not g["grad"], m
        torch.testing.assert_close(g["img"], want[m], rtol=0, atol=1e-6, msg=m)
        assert g["method"] == m and g["dim"] == z[m].shape[1] and g["doc"] == g["txt"] == g["meta"]["latent_doc"]
        assert g["meta"]["method"] == m and g["meta"]["noise"] == g["noise"]
        assert g["noise"] == ("none" if m == "disp" else "const") and "N(0, I)" in g["doc"]
    assert got["disp"]["meta"]["sampler_opts"] == {} and got["fastgan"]["meta"]["sampler_opts"] == {"noise": "const"}
    assert "[z ; prior]" in got["disp"]["doc"] and "psi=1.0" in got["insgen"]["doc"]
    torch.testing.assert_close(got["disp"]["priors"], torch.load(ckpts["disp"], weights_only=True)["priors"])


def test_export_refusals(ckpts, tmp_path):
    out = str(tmp_path / "g.pt")
    with pytest.raises(UserError, match="bn=recompute or bn=copy"):
        E.main([ckpts["fastgan"], "--metrics", "none", "--sampler-opt", "bn=batch", "--export", out])
    with pytest.raises(UserError, match="--export uses the sampler option noise=const"
                                        ".*drop --sampler-opt noise=random"):
        E.main([ckpts["insgen"], "--metrics", "none", "--sampler-opt", "noise=random", "--export", out])
    with pytest.raises(UserError, match="need a checkpoint"):
        E.main(["--fake-dir", str(tmp_path), "--metrics", "none", "--export", out])
    assert not os.path.exists(out)
    s = sampler(ckpts["adafm"])
    s.G.nlabels = 3  # a class-conditional source: its class is a hash of the latent, not traceable
    with pytest.raises(UserError, match="class-conditional"):
        E.export_generator(s, out, {})
    with pytest.raises(UserError, match="noise='x'"):
        sampler(ckpts["fastgan"], noise="x")
