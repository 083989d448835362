"""tools/gpu_report.py (the GPU speed report) runs end to end at toy sizes on the CPU and writes its table."""
import json
import math

import pytest

from tools import gpu_report


@pytest.mark.slow
def test_quick_report_writes_one_row_per_variant(tmp_path):
    rows = gpu_report.main(["--out", str(tmp_path), "--quick", "--only", "fastgan,disp", "--device", "cpu"])
    # fastgan: fp32/amp x channels-last on/off; disp: fp32/amp
    assert [(r["method"], r["precision"], r["channels_last"]) for r in rows] == [
        ("fastgan", "fp32", "on"), ("fastgan", "fp32", "off"), ("fastgan", "amp", "on"), ("fastgan", "amp", "off"),
        ("disp", "fp32", None), ("disp", "amp", None)]
    assert all(math.isfinite(r["s_per_iter"]) and r["s_per_iter"] > 0 for r in rows), rows
    assert all(abs(r["s_per_kimg"] - r["s_per_iter"] * 1000 / r["batch"]) < 1e-9 for r in rows)
    saved = json.loads((tmp_path / "gpu_report.json").read_text())
    assert saved["environment"]["torch"] and len(saved["rows"]) == 6
    md = (tmp_path / "gpu_report.md").read_text()
    assert md.count("\n| fastgan 32 px") == 4 and md.count("\n| disp 32 px") == 2


def test_adafm_source_check_quick_records_std_over_z_per_chunk(tmp_path):
    """tools/adafm_source_check.py (the GPU check of whether a GP-GAN source learns) at toy size: one resumed run, a
    row per chunk with the raw G's pixel std over z, a grid per chunk."""
    from tools import adafm_source_check
    rows = adafm_source_check.main(["--out", str(tmp_path), "--quick", "--device", "cpu"])
    assert [r["step"] for r in rows] == [3, 6]
    assert all(0 < r["std_over_z"] < 1 and math.isfinite(r["d_real"]) for r in rows), rows
    assert [json.loads(line)["step"] for line in open(tmp_path / "source_check.jsonl")] == [3, 6]
    assert (tmp_path / "raw_000003.png").is_file() and (tmp_path / "raw_000006.png").is_file()
