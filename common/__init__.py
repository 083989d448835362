"""Small, method-agnostic pieces shared by the method scripts: run (flags, user errors, device, torchrun, Ctrl-C,
--bench), output (run directory, logs, grids, checkpoints, resume), data, diffaug, ema, metrics (FID, KID, ...),
sampling (the Sampler contract eval.py relies on) and weights (pretrained files, LPIPS)."""
