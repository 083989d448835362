"""Speed report for a GPU machine: every method's --bench at its paper configuration, eager vs --compile
reduce-overhead (torch.compile + CUDA graphs; FastGAN, AdaFM, DISP: InsGen's double backward cannot be compiled) and
fp32 vs --amp, s/iteration, s/kimg and peak GPU memory, with the GPU's name and the torch/CUDA versions. Rows go most
important first and the table is written after every row, so a time limit keeps what was measured.

    python tools/gpu_report.py --out gpu-report          # `bash .ci/gpu speed` cuts it at 300 s: the rows it reaches
    python tools/gpu_report.py --out /tmp/r --quick      # the same code at toy sizes (CPU: ~2 min)

Writes <out>/gpu_report.json and <out>/gpu_report.md. Each row calls the script's own bench(args) in this process
(the function behind `--bench N`, common.run.bench: a fixed random batch, no data, no files, one warm-up iteration;
compiled rows run 3 more so that the first calls, which compile and record the CUDA graphs, fall in the warm-up and
the first block). Anchors printed with the table: FastGAN 256 px batch 8 took 0.36 s/iteration on one RTX 2080 Ti
(paper: 1 h per 10k iterations); StyleGAN2-ADA `--cfg auto` at 256 px on one A100 takes 12.5 s/kimg (its README).
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

# (label, method, flags, N, variants); a variant is (precision, torch.compile mode or None for eager). Most important
# first: each method's fp32 eager vs CUDA graphs, then --amp, then the 8-GPU configuration's per-GPU batch.
FP32, AMP = [("fp32", None), ("fp32", "reduce-overhead")], [("amp", None), ("amp", "reduce-overhead")]
F256 = ("fastgan 256 px, batch 8 (paper's speed anchor)", "fastgan", ["--res", "256", "--batch", "8", "--recon", "mse"])
F1024 = ("fastgan 1024 px, batch 8", "fastgan", ["--res", "1024", "--batch", "8", "--recon", "mse"])
INS = ("insgen auto 256 px, batch 16 (1-GPU auto)", "insgen", ["--cfg", "auto", "--res", "256"])
PAPER = [
    (*F256, 20, FP32),
    (*F1024, 20, FP32),
    (*INS, 16, [("fp32", None)]),
    ("adafm 128 px, batch 16", "adafm", ["--res", "128", "--batch", "16"], 20, FP32),
    ("disp 128 px, batch 25, 4 D steps", "disp", ["--res", "128", "--batch", "25", "--prior-weights", "random"], 10,
     FP32),
    (*F256, 20, AMP),
    (*F1024, 20, AMP),
    (*INS, 16, [("amp", None)]),
    ("insgen paper256 256 px, batch 32", "insgen", ["--cfg", "paper256", "--res", "256", "--batch", "32"], 16,
     [("fp32", None), ("amp", None)]),
]
TOY = [  # --quick: the control flow at toy sizes (one compiled row: CPU compilation takes a minute)
    ("fastgan 32 px, batch 4", "fastgan", ["--res", "32", "--batch", "4", "--ngf", "8", "--ndf", "8", "--recon", "mse"],
     2, [("fp32", None), ("fp32", "default")]),
    ("insgen auto 16 px, batch 4", "insgen", ["--cfg", "auto", "--res", "16", "--batch", "4", "--cbase", "256",
                                              "--cmax", "32"], 2, [("fp32", None)]),
    ("adafm 32 px, batch 4", "adafm", ["--res", "32", "--batch", "4", "--nf", "4", "--z-dim", "16", "--w-dim", "16"],
     2, [("fp32", None)]),
    ("disp 32 px, batch 4, 2 D steps", "disp", ["--res", "32", "--batch", "4", "--d-steps", "2", "--ch", "4",
                                                "--prior-weights", "random", "--prior-size", "32"], 2, [("amp", None)]),
]


def bench_row(method, flags, n, device):
    """[{variant, s_per_iter, s_per_kimg, batch}] of one --bench call, its peak GPU memory (GiB) and wall seconds."""
    mod = importlib.import_module(method)
    args = mod.parse_args([*flags, "--bench", str(n), "--device", device])
    if args.compile:
        args.bench = n + 3
    mod.check_args(args)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    sec = mod.bench(args)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    rows = [{"variant": name, "s_per_iter": s, "s_per_kimg": s * 1000 / args.batch, "batch": args.batch}
            for name, s in sec.items()]
    return rows, peak, time.time() - t0


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
    lines = [f"GPU: {env['gpu']} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN {env.get('cudnn')} | "
             f"{env['date']}", "",
             "| configuration | variant | precision | compile | s/iteration | s/kimg | peak GiB | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        wall = "n/a" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        lines.append(f"| {r['config']} | {r['variant']} | {r['precision']} | {r['compile'] or 'eager'} | "
                     f"{r['s_per_iter']:.3f} | {r['s_per_kimg']:.1f} | {peak} | {wall} |")
    anchors = [r for r in rows if "anchor" in r["config"] and r["precision"] == "fp32" and not r["compile"]]
    if anchors:
        lines += ["", f"FastGAN 256 px batch 8 fp32 eager: {anchors[0]['s_per_iter']:.3f} s/iteration vs the paper's "
                      "0.36 on one RTX 2080 Ti (1 h per 10k iterations)."]
    ada = [r for r in rows if r["config"].startswith("insgen auto") and r["variant"].startswith("ada")
           and r["precision"] == "fp32"]
    if ada:
        lines += [f"{ada[0]['config']}, ADA (--no-insgen) fp32: {ada[0]['s_per_kimg']:.1f} s/kimg vs StyleGAN2-ADA's "
                  "published 12.5 s/kimg (A100, 1 GPU, --cfg auto, 256 px)."]
    return "\n".join(lines) + "\n"


def write(out, env, rows):
    with open(os.path.join(out, "gpu_report.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    md = markdown(env, rows)
    with open(os.path.join(out, "gpu_report.md"), "w") as f:
        f.write(md)
    return md


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
    for config, method, flags, n, variants in (TOY if a.quick else PAPER):
        if only and method not in only:
            continue
        for precision, mode in variants:
            extra = [*(["--amp"] if precision == "amp" else []), *(["--compile", mode] if mode else [])]
            print(f"== {config} {precision} {mode or 'eager'}", flush=True)
            row = {"config": config, "method": method, "precision": precision, "compile": mode}
            try:
                got, peak, wall = bench_row(method, [*flags, *extra], n, a.device)
            except Exception as e:  # one failing configuration must not lose the others' numbers
                rows.append({**row, "variant": f"FAILED {type(e).__name__}: {e}"[:200], "s_per_iter": float("nan"),
                             "s_per_kimg": float("nan"), "batch": None, "peak_gib": None, "wall_s": None})
                print(f"FAILED: {type(e).__name__}: {e}", flush=True)
            else:
                rows.extend({**row, "peak_gib": peak, "wall_s": wall, **g} for g in got)
            write(a.out, env, rows)  # after every row: a run cut short by a time limit keeps what it measured
    md = write(a.out, env, rows)  # (also when --only selected nothing)
    print(md, flush=True)
    return rows


if __name__ == "__main__":
    main()
