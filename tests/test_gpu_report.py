"""The GPU check's tools (gpu_report.py, paper_run.py, adafm_source_check.py) end to end at toy sizes on a CPU."""
import json
import math

import pytest

from tools import gpu_report


@pytest.mark.slow
def test_quick_report_writes_one_row_per_variant(tmp_path):
    """Every variant of the --quick table is a row (fastgan eager and compiled, disp --amp), with s/kimg = s/iteration
    x 1000 / batch, and the json and markdown tables hold the same rows."""
    rows = gpu_report.main(["--out", str(tmp_path), "--quick", "--only", "fastgan,disp", "--device", "cpu"])
    assert [(r["method"], r["precision"], r["compile"]) for r in rows] == [
        ("fastgan", "fp32", None), ("fastgan", "fp32", "default"), ("disp", "amp", None)]
    assert all(math.isfinite(r["s_per_iter"]) and r["s_per_iter"] > 0 for r in rows), rows
    assert all(abs(r["s_per_kimg"] - r["s_per_iter"] * 1000 / r["batch"]) < 1e-9 for r in rows)
    saved = json.loads((tmp_path / "gpu_report.json").read_text())
    assert saved["environment"]["torch"] and len(saved["rows"]) == 3
    md = (tmp_path / "gpu_report.md").read_text()
    assert md.count("\n| fastgan 32 px") == 2 and md.count("| default |") == 1 and md.count("\n| disp 32 px") == 1


@pytest.mark.slow
def test_paper_run_quick_trains_for_its_minutes_then_measures_and_draws(tmp_path):
    """tools/paper_run.py (`bash .ci/gpu quality`, then --measure) at toy size: FastGAN for its wall clock, stopped by
    Ctrl-C at a finished iteration, its generator exported in float16 parts; --measure joins them, measures FID/KID
    against the whole folder and draws a grid and a strip of seeds 0-7. The joined float16-rounded generator draws
    the trained one's samples to within one uint8 level."""
    import numpy as np
    import torch
    from PIL import Image
    import fastgan
    from tools import paper_run
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32)).save(data / f"{i}.png")
    back, res = tmp_path / "back", tmp_path / "res"
    info = paper_run.main(["--quick", "--data", str(data), "--minutes", "0.2", "--out", str(back),
                           "--run", str(tmp_path / "run")])
    assert info["step"] > 0 and info["res"] == 32 and "interrupted: saved" in (back / "train.log").read_text()
    m = paper_run.main(["--measure", str(back), "--quick", "--data", str(data), "--out", str(res)])
    assert m["n_fake"] == 64 and m["n_real"] == 12 and m["fid"] > 0 and m["step"] == info["step"] and m["res"] == 32
    assert json.loads((res / "metrics.json").read_text())["kid"] == m["kid"]
    assert Image.open(res / "strip.png").size == (8 * 32, 32)
    assert Image.open(res / "grid.png").size[0] > 8 * 32
    trained = torch.load(tmp_path / "run" / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    joined = torch.load(res / "ckpt.pt", map_location="cpu", weights_only=False)
    samplers = [fastgan.load_for_sampling(c, "cpu", bn="batch") for c in (trained, joined)]
    z = samplers[0].latents(16, 0)
    a, b = [s.generate(z) for s in samplers]
    assert (a - b).abs().max() < 2 / 255, (a - b).abs().max()


def test_paper_run_generator_comes_back_from_a_device_call(tmp_path):
    """The 256 px FastGAN generator in float16 fits what a device call returns (8 files of 16 MiB, 64 MiB together,
    with train.log, last_samples.png and generator.json beside the parts), joins back bit-exact, and a changed part
    is refused in one line."""
    import torch
    import fastgan
    from common.output import FORMAT
    from tools import paper_run
    G = fastgan.Generator(256)
    ck = {"format": FORMAT, "method": "fastgan", "args": {"res": 256}, "step": 7, "G_ema": G.state_dict(), "D": 0}
    torch.save(ck, tmp_path / "last.pt")
    back = tmp_path / "back"
    back.mkdir()
    info = paper_run.export(str(tmp_path / "last.pt"), str(back), train_seconds=1.0)
    sizes = [(back / p).stat().st_size for p in info["parts"]]
    assert max(sizes) <= 16 * 2**20 and len(sizes) + 3 <= 8 and sum(sizes) == info["bytes"] <= 60 * 2**20, sizes
    assert info["bytes"] > 2 * sum(v.numel() for v in G.state_dict().values())  # float16, nothing dropped
    joined, got = paper_run.join(str(back), str(tmp_path / "ckpt.pt"))
    assert got["step"] == 7 and got["train_seconds"] == 1.0 and "D" not in joined
    for k, v in G.state_dict().items():
        w = joined["G_ema"][k]
        assert w.dtype == v.dtype and torch.equal(w, v.half().to(v.dtype) if v.is_floating_point() else v), k
    with open(back / info["parts"][0], "r+b") as f:
        f.write(b"x")
    with pytest.raises(SystemExit, match="^error: .*sha256 differs"):
        paper_run.join(str(back), str(tmp_path / "ckpt2.pt"))


def test_adafm_source_check_quick_records_std_over_z_per_chunk(tmp_path):
    """tools/adafm_source_check.py (the GPU check of whether a GP-GAN source learns) at toy size: one resumed run, a
    row per chunk with the raw G's pixel std over z, a grid per chunk."""
    from tools import adafm_source_check
    rows = adafm_source_check.main(["--out", str(tmp_path), "--quick", "--device", "cpu"])
    assert [r["step"] for r in rows] == [3, 6]
    assert all(0 < r["std_over_z"] < 1 and math.isfinite(r["d_real"]) for r in rows), rows
    assert [json.loads(line)["step"] for line in open(tmp_path / "source_check.jsonl")] == [3, 6]
    assert (tmp_path / "raw_000003.png").is_file() and (tmp_path / "raw_000006.png").is_file()
