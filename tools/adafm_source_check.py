"""Does a GP-GAN source (adafm.py --mode pretrain) learn, or collapse? One call for a GPU session.

On a 2-core CPU every source recipe tried at 32 px collapses: the raw G draws one blurred shape for every z (pixel
std over z 0.04-0.12 vs 0.41 over the real digits; docs/results.md "Why the source collapses"). The paper's source
is GP-GAN at 128 px, nf 64. This script trains that architecture on digits (upsampled to --res) in chunks of --chunk
iterations (resuming, so it is one run) until --minutes pass, and after each chunk prints and records the raw G's
pixel std over 256 z, the D outputs, s/iteration (the chunk's wall clock, start-up included, / --chunk) and a
grid of 64 raw-G samples:

    python tools/adafm_source_check.py --out $OUT                 # GPU: 128 px, nf 32, batch 64, 8 minutes
    python tools/adafm_source_check.py --out /tmp/s --quick       # the same code at 32 px, nf 4, 2 chunks (CPU)

Writes <out>/source_check.jsonl (one line per chunk), <out>/raw_<step>.png and the run in <out>/run. A source that
learns shows std over z rising towards the data's (printed at the start) and varied digits in the grids.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import adafm  # noqa: E402
from common.data import load_dataset  # noqa: E402
from common.output import load_checkpoint, save_grid  # noqa: E402


def raw_g_stats(ckpt_path, n=256, seed=0):
    """(pixel std over z of the raw, non-EMA G, its 64 first samples) for a --mode pretrain checkpoint."""
    ck = load_checkpoint(ckpt_path)
    G, _ = adafm.build(argparse.Namespace(**ck["args"]))
    G.load_state_dict(ck["G"])
    G.eval()
    z = torch.randn(n, ck["args"]["z_dim"], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = torch.cat([G(c) for c in z.split(64)])
    return x.std(0).mean().item(), x[:64], ck["step"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="adafm-source-check")
    p.add_argument("--minutes", type=float, default=8.0, help="stop after the chunk that passes this wall clock")
    p.add_argument("--chunk", type=int, default=500, help="iterations between measurements")
    p.add_argument("--quick", action="store_true", help="32 px, nf 4, 2 chunks of 3 iterations (checks the script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("flags", nargs="*", help="extra adafm.py flags after --, e.g. -- --r1 2 --nf 64")
    a = p.parse_args(argv)
    if a.quick:
        base = ["--res", "32", "--nf", "4", "--z-dim", "16", "--w-dim", "16", "--batch", "4"]
        a.chunk, chunks = 3, 2
    else:
        base = ["--res", "128", "--nf", "32", "--batch", "64"]
        chunks = 10 ** 6
    run = os.path.join(a.out, "run")
    flags = ["--mode", "pretrain", "--data", "digits", *base, "--device", a.device, "--out", run, "--resume", "auto",
             "--log-every", str(a.chunk), "--sample-every", str(10 ** 9), "--ckpt-every", str(a.chunk),
             "--style-mix", "0", *a.flags]
    os.makedirs(a.out, exist_ok=True)
    res = int(base[base.index("--res") + 1])
    real = load_dataset("digits", res).images[:256].float() / 127.5 - 1
    print(f"real digits at {res} px: pixel std over images {real.std(0).mean():.3f}", flush=True)
    t0, rows = time.time(), []
    for k in range(1, chunks + 1):
        t = time.time()
        adafm.main([*flags, "--iters", str(k * a.chunk)])
        sec = (time.time() - t) / a.chunk
        std, grid, step = raw_g_stats(os.path.join(run, "ckpt", "last.pt"))
        save_grid(grid, os.path.join(a.out, f"raw_{step:06d}.png"), nrow=8)
        row = {"step": step, "std_over_z": round(std, 4), "s_per_iter": round(sec, 4),
               "minutes": round((time.time() - t0) / 60, 2)}
        with open(os.path.join(run, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if '"d_real"' in line]
        if metrics:
            row.update({k: round(metrics[-1][k], 4) for k in ("d_real", "d_fake", "loss_d") if k in metrics[-1]})
        rows.append(row)
        print("source check:", json.dumps(row), flush=True)
        with open(os.path.join(a.out, "source_check.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if time.time() - t0 > a.minutes * 60:
            break
    return rows


if __name__ == "__main__":
    main()
