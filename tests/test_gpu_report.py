"""tools/gpu_report.py (the GPU speed report) runs end to end at toy sizes on the CPU and writes its table."""
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
    """tools/paper_run.py (`bash .ci/gpu quality`) at toy size: FastGAN for its wall clock, stopped by Ctrl-C at a
    finished iteration, then FID/KID of the samples against the whole folder, a grid and a strip of seeds 0-7."""
    import numpy as np
    from PIL import Image
    from tools import paper_run
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32)).save(data / f"{i}.png")
    m = paper_run.main(["--quick", "--data", str(data), "--minutes", "0.2", "--out", str(tmp_path / "out"),
                        "--run", str(tmp_path / "run")])
    assert m["n_fake"] == 64 and m["n_real"] == 12 and m["fid"] > 0 and m["step"] > 0 and m["res"] == 32
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["kid"] == m["kid"]
    assert Image.open(tmp_path / "out" / "strip.png").size == (8 * 32, 32)
    assert Image.open(tmp_path / "out" / "grid.png").size[0] > 8 * 32
    assert "interrupted: saved" in (tmp_path / "out" / "train.log").read_text()


def test_adafm_source_check_quick_records_std_over_z_per_chunk(tmp_path):
    """tools/adafm_source_check.py (the GPU check of whether a GP-GAN source learns) at toy size: one resumed run, a
    row per chunk with the raw G's pixel std over z, a grid per chunk."""
    from tools import adafm_source_check
    rows = adafm_source_check.main(["--out", str(tmp_path), "--quick", "--device", "cpu"])
    assert [r["step"] for r in rows] == [3, 6]
    assert all(0 < r["std_over_z"] < 1 and math.isfinite(r["d_real"]) for r in rows), rows
    assert [json.loads(line)["step"] for line in open(tmp_path / "source_check.jsonl")] == [3, 6]
    assert (tmp_path / "raw_000003.png").is_file() and (tmp_path / "raw_000006.png").is_file()
