"""Speed report for a GPU machine: every method's --bench at its paper configuration, fp32 vs --amp (FastGAN also
channels-last on/off), s/iteration, s/kimg and peak GPU memory, with the GPU's name and the torch/CUDA versions.

    python tools/gpu_report.py --out gpu-report          # ~6-8 min on one H200 (2026-11-30: the FastGAN rows and
                                                         # InsGen auto fp32, at 32 iterations then, took 300 s)
    python tools/gpu_report.py --out /tmp/r --quick      # the same code at toy sizes (CPU: ~1 min)

Writes <out>/gpu_report.json and <out>/gpu_report.md. Each row calls the script's own bench(args) in this process
(the function behind `--bench N`: a fixed random batch, no data, no files; one warm-up iteration excluded):
FastGAN reports the median over N iterations, InsGen the median of 16-iteration block means (one block at N = 16)
for InsGen, InsGen --query shared and ADA (--no-insgen) side by side, AdaFM and DISP the mean. Anchors printed with
the table:
FastGAN 256 px batch 8 took 0.36 s/iteration on one RTX 2080 Ti (paper: 1 h per 10k iterations); StyleGAN2-ADA
`--cfg auto` at 256 px on one A100 takes 12.5 s/kimg (its README).
"""
import argparse
import importlib
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (label, method, flags, N): paper configurations; --quick swaps in TOY
PAPER = [
    ("fastgan 1024 px, batch 8", "fastgan", ["--res", "1024", "--batch", "8", "--recon", "mse"], 20),
    ("fastgan 256 px, batch 8 (paper's speed anchor)", "fastgan", ["--res", "256", "--batch", "8", "--recon", "mse"],
     20),
    ("insgen auto 256 px, batch 16 (1-GPU auto)", "insgen", ["--cfg", "auto", "--res", "256"], 16),
    ("insgen paper256 256 px, batch 32", "insgen", ["--cfg", "paper256", "--res", "256", "--batch", "32"], 16),
    ("adafm 128 px, batch 16", "adafm", ["--res", "128", "--batch", "16"], 20),
    ("disp 128 px, batch 25, 4 D steps", "disp", ["--res", "128", "--batch", "25", "--prior-weights", "random"], 10),
]
TOY = [
    ("fastgan 32 px, batch 4", "fastgan", ["--res", "32", "--batch", "4", "--ngf", "8", "--ndf", "8", "--recon", "mse"],
     2),
    ("insgen auto 16 px, batch 4", "insgen", ["--cfg", "auto", "--res", "16", "--batch", "4", "--cbase", "256",
                                              "--cmax", "32"], 2),
    ("adafm 32 px, batch 4", "adafm", ["--res", "32", "--batch", "4", "--nf", "4", "--z-dim", "16", "--w-dim", "16"], 2),
    ("disp 32 px, batch 4, 2 D steps", "disp", ["--res", "32", "--batch", "4", "--d-steps", "2", "--ch", "4",
                                                "--prior-weights", "random", "--prior-size", "32"], 2),
]


def variants(method, flags):
    """(precision, channels-last, extra flags) per row: fp32 and amp; FastGAN's --channels-last on and off."""
    for amp in (False, True):
        cls = ("on", "off") if method == "fastgan" else (None,)
        for cl in cls:
            yield ("amp" if amp else "fp32"), cl, [*(["--amp"] if amp else []), *(["--channels-last", cl] if cl else [])]


def bench_row(method, flags, n, device):
    mod = importlib.import_module(method)
    args = mod.parse_args([*flags, "--bench", str(n), "--device", device])
    if hasattr(mod, "check_args"):
        mod.check_args(args)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    sec = mod.bench(args)
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    batch = args.batch
    sec = sec if isinstance(sec, dict) else {method: sec}
    return [{"variant": name, "s_per_iter": s, "s_per_kimg": s * 1000 / batch, "batch": batch} for name, s in sec.items()], \
        peak, wall


def environment(device):
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": device, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["gpu"] = f"none (CPU: {platform.processor() or platform.machine()})"
    return env


def markdown(env, rows):
    lines = [f"GPU: {env['gpu']} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN {env.get('cudnn')} | {env['date']}",
             "", "| configuration | variant | precision | channels-last | s/iteration | s/kimg | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['config']} | {r['variant']} | {r['precision']} | {r['channels_last'] or '-'} | "
                     f"{r['s_per_iter']:.3f} | {r['s_per_kimg']:.1f} | {peak} |")
    anchors = [r for r in rows if "anchor" in r["config"] and r["precision"] == "fp32" and r["channels_last"] == "on"]
    if anchors:
        lines += ["", f"FastGAN 256 px batch 8 fp32: {anchors[0]['s_per_iter']:.3f} s/iteration vs the paper's 0.36 on one "
                      "RTX 2080 Ti (1 h per 10k iterations)."]
    ada = [r for r in rows if r["config"].startswith("insgen auto") and r["variant"].startswith("ada")
           and r["precision"] == "fp32"]
    if ada:
        lines += [f"{ada[0]['config']}, ADA (--no-insgen) fp32: {ada[0]['s_per_kimg']:.1f} s/kimg vs StyleGAN2-ADA's "
                  "published 12.5 s/kimg (A100, 1 GPU, --cfg auto, 256 px)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-report", help="folder for gpu_report.json and gpu_report.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes and 2 iterations (checks this script, not speed)")
    p.add_argument("--only", default=None, help="comma list of methods to run (default: all four)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    env, rows = environment(a.device), []
    only = set(a.only.split(",")) if a.only else None
    for config, method, flags, n in (TOY if a.quick else PAPER):
        if only and method not in only:
            continue
        for precision, cl, extra in variants(method, flags):
            print(f"== {config} {precision}{' channels-last ' + cl if cl else ''}", flush=True)
            try:
                got, peak, wall = bench_row(method, [*flags, *extra], n, a.device)
            except Exception as e:  # one failing configuration must not lose the others' numbers
                rows.append({"config": config, "method": method, "variant": f"FAILED {type(e).__name__}: {e}"[:200],
                             "precision": precision, "channels_last": cl, "s_per_iter": float("nan"),
                             "s_per_kimg": float("nan"), "batch": None, "peak_gib": None, "wall_s": None})
                print(f"FAILED: {type(e).__name__}: {e}", flush=True)
            else:
                for g in got:
                    rows.append({"config": config, "method": method, "precision": precision, "channels_last": cl,
                                 "peak_gib": peak, "wall_s": wall, **g})
            write(a.out, env, rows)  # after every row: a run cut short by a time limit keeps what it measured
    md = write(a.out, env, rows)  # (also when --only selected nothing)
    print(md, flush=True)
    return rows


def write(out, env, rows):
    with open(os.path.join(out, "gpu_report.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    md = markdown(env, rows)
    with open(os.path.join(out, "gpu_report.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    main()
