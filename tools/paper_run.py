"""The first run at a paper's resolution, for a GPU call (`bash .ci/gpu quality`): FastGAN trains on a folder of
images for --minutes of wall clock (then a Ctrl-C, which saves ckpt/last.pt at a finished iteration), eval.py
measures FID/KID of --n samples against the whole folder, writes a sample grid and a strip of per-seed images, and
the small files a person looks at land in --out:

    python tools/paper_run.py --data data/pokemon --res 256 --minutes 5 --out $OUT/quality   # one GPU, ~7 min
    python tools/paper_run.py --quick --out /tmp/q --run /tmp/q_run                          # the same on a CPU

--out gets: train.log, eval.log, metrics.json, grid.png (64 samples), strip.png (seeds 0-7 side by side),
last_samples.png (the last training grid). --quick: 32 px, widths 16, at most 20 seconds, 64 samples, --data digits
unless given.
"""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the files that come back")
    p.add_argument("--run", default="runs/paper_run", help="the training run's directory (checkpoints stay there)")
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


def train(a, run):
    """fastgan.py for a.minutes, then SIGINT: it finishes the iteration, saves ckpt/last.pt and exits 130."""
    cmd = [sys.executable, "fastgan.py", "--data", a.data, "--res", str(a.res), "--batch", str(a.batch),
           "--recon", "mse", "--iters", "10000000", "--sample-every", "500", "--ckpt-every", "1000",
           "--log-every", "100", "--device", a.device, "--out", run, *a.extra]
    with open(os.path.join(a.out, "train.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            proc.wait(timeout=a.minutes * 60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=600)
    if proc.returncode not in (0, 130):
        raise SystemExit(f"fastgan.py failed (exit {proc.returncode}): see {a.out}/train.log")


def evaluate(a, run):
    ev = os.path.join(run, "eval")
    cmd = [sys.executable, "eval.py", os.path.join(run, "ckpt", "last.pt"), "--metrics", "fid,kid", "--n", str(a.n),
           "--grid", "--grid-n", "64", "--save-images", os.path.join(ev, "seeds"), "--seeds", "0-7",
           "--device", a.device, "--out", ev]
    with open(os.path.join(a.out, "eval.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
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


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    run = a.run
    if os.path.exists(run):
        shutil.rmtree(run)  # a fresh run each call
    t0 = time.time()
    train(a, run)
    t_train = time.time() - t0
    ev = evaluate(a, run)
    m = json.load(open(glob.glob(os.path.join(ev, "*-metrics.json"))[0]))
    m.update(train_seconds=round(t_train, 1), eval_seconds=round(time.time() - t0 - t_train, 1))
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    shutil.copy(glob.glob(os.path.join(ev, "*-grid.png"))[0], os.path.join(a.out, "grid.png"))
    strip(sorted(glob.glob(os.path.join(ev, "seeds", "seed*.png"))), os.path.join(a.out, "strip.png"))
    grids = sorted(glob.glob(os.path.join(run, "samples", "[0-9]*.png")))
    if grids:  # the training grid of the last --sample-every step (none before iteration 500)
        shutil.copy(grids[-1], os.path.join(a.out, "last_samples.png"))
    print(json.dumps(m), flush=True)
    return m


if __name__ == "__main__":
    main()
