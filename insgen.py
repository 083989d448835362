"""InsGen: data-efficient image generation with instance discrimination, on a plain-PyTorch StyleGAN2-ADA.

Paper: Ceyuan Yang, Yujun Shen, Yinghao Xu, Bolei Zhou, "Data-Efficient Instance Generation from Instance
Discrimination", NeurIPS 2021 (arXiv 2106.04566). Authors' code: github.com/genforce/insgen, itself built on
NVIDIA's stylegan2-ada-pytorch (Karras et al., "Training GANs with Limited Data", NeurIPS 2020).

What is implemented (one file, no custom CUDA ops, no compile step):
- StyleGAN2 backbone exactly as stylegan2-ada-pytorch's `paper256` / `auto` configs (parameter counts match:
  paper256 G 24,767,458 = mapping 2,101,248 + synthesis 22,666,210, D 24,001,089; auto@256 G 23,191,522):
  equalized learning rate, 8- or 2-layer mapping with lr multiplier 0.01 and w_avg tracking (truncation psi),
  modulated/demodulated 3x3 convs, per-pixel noise, [1,3,3,1] FIR up/down-sampling (upfirdn2d's reference path),
  'skip' generator, 'resnet' discriminator with minibatch-std, conv_clamp 256.
- Non-saturating logistic loss, lazy R1 (every 16 D steps) and path-length regularization (every 4 G steps,
  weight 2, decay 0.01, batch shrink 2), style mixing p 0.9, G EMA with ramp-up, Adam (0, 0.99) with the lazy-reg
  lr/beta adjustment, NaN/inf gradients zeroed before each step (as in the reference training loop).
- ADA 'bgc' pipeline (xflip, rotate90, int translation, iso scale, pre/post rotation, aniso scale, frac translation,
  brightness, contrast, luma flip, hue, saturation) on EVERY discriminator input (real, fake, R1 pass, InsGen passes),
  adaptive p (target 0.6, adjusted every 4 iterations by batch*4/(500 kimg)). R1 is taken through the augmentation,
  which needs the double backward of grid_sample: `grid_sample` below is the reference's custom autograd function.
- InsGen (paper Sec. 3, authors' code): real and fake instance heads phi_r, phi_f (Linear-ReLU-Linear to 128-d,
  L2-normalized) on D's pooled 4x4 features, momentum heads + momentum discriminator D' (m 0.999), MoCo queues,
  InfoNCE (Eq. 4) with tau 0.2; real term C_D^r (Eq. 5), fake term C_D^f with noise perturbation z + 0.15*eps for the
  positive key (Eq. 6-7), generator term C_G^f without perturbation (Eq. 8-9), loss weights 1.0 / 1.0 / 0.1
  (Eq. 10-11). `--no-insgen` turns the script into plain StyleGAN2-ADA for comparison.
  Schedule as in the authors' code: the real head's Adam takes D's lazy-reg settings (lr x16/17, beta2 0.99^(16/17)),
  the fake head's G's (lr x4/5, beta2 0.99^(4/5)); each momentum head is updated right before each key it computes
  (real once per iteration, fake twice: G phase and D phase, ~0.998 per iteration), D' once per iteration; the
  perturbed positive G(z + 0.15 eps) is a G pass of its own (own style-mixing draw, moves w_avg); queue length
  int(0.05 n), x2 with --mirror (n = number of images). No x-flips unless --mirror (NVIDIA's and the authors' default).

Deviations / choices (vs. the paper and the authors' code):
- Temperature tau = 0.2 as in the authors' code; the paper text says 2.
- Queue length: at least 1 before the x2 (the authors' int(0.05 n) is 0, an empty queue, under 20 images); one
  --queue sets both queues (the authors: --rqs, --fqs); any batch size works (the queue write wraps around).
- x-flips: off by default, as NVIDIA's and the authors' train.py; the paper's experiments all flip ("2k" = 2,000
  images mirrored, queue 200): add --mirror to reproduce them.
- D' is updated after the D phases instead of at the start of the next iteration: the same sequence of weights.
  The fake queue receives the momentum fake head applied to the (detached) D features of the fake queries, the
  real queue the real keys (authors' update_q).
- InsGen passes, --query separate (default; the authors' passes): each query is a D pass of its own on an independent
  augmentation draw, each key a D' pass (the G-phase key on G(z) itself); query and key passes stop at the pooled
  features (the authors run the 4x4 epilogue and drop its logits). In the D main phase the two queries run as one 2B
  D pass and the two keys as one 2B D' pass: the features are taken before minibatch-std, so no op mixes samples (the
  adversarial passes stay apart: minibatch-std would group reals with fakes); the fake adversarial graph is
  back-propagated first, as the authors do, so at most 3 batch-B D graphs are alive, not 4. Same random draws in the
  same order, same losses and gradients up to float re-association (tests: test_batched_insgen_passes_keep_the_math).
  Per iteration 6 D fwd+bwd, 3 D' fwd, 3 G fwd, 9 augmentations (ADA: 3, 0, 2, 3): ~1.9x ADA by pass count.
- --query shared (the paper's reading, Sec. 3.3: the heads reuse D's backbone at little extra cost; not the authors'
  code): the queries are the pooled features the three adversarial passes (G phase fake, D phase fake and real)
  already compute, so each query shares its logit's augmentation draw (the authors: an independent draw); the keys
  keep their own D' passes and draws; in the D phase the fake logit and the fake InfoNCE term go back in one backward
  (2 D graphs alive). Per iteration 3 D fwd+bwd, 3 D' fwd, 3 G fwd, 6 augmentations: ~1.3x ADA by pass count.
- Head width: Linear(C, 512) -> ReLU -> Linear(512, 128) where C = D's 4x4 channels (512 at paper settings).
- `--ada-linear`: p = target * (images seen / total images), updated every 4 iterations.
- Runs on one GPU, on CPU and under torchrun (the authors' code always all-gathers and crashes on one GPU). Under
  torchrun gradients are averaged with one flat all_reduce per phase (as NVIDIA's stylegan3 loop does) instead of
  wrapping in DistributedDataParallel, which does not combine with R1/path-length double backward and the several
  D passes per phase; MoCo keys are all-gathered before enqueueing; ADA statistics are all-reduced.
- No fp16 layers: `--amp` runs the main passes under bf16 autocast; R1 and path-length passes, the InsGen heads and
  the InfoNCE logits stay fp32.
- Sampling: metrics (training --eval-every, eval.py) use random per-pixel noise like NVIDIA's metric code, seeded by
  the latents so samples are reproducible. Training grids use the same random noise (--grid-noise random,
  default; fixed latents -> the same maps at every grid), not NVIDIA's constant maps (--grid-noise const): at 16 px
  the 4x4 layer's noise strength grew to 0.28 in a digits run (the others ~0), G drew its digits from that noise
  (pixel std over noise at fixed z 0.40, over z at fixed noise 0.15), and the constant maps showed one '8' in all
  64 cells while the metric samples were varied digits.
  Style mixing (Sampler.style_mix): the coarse styles (4x4, 8x8) of sample a, the rest of b; the end of a run writes
  samples/style_mix.png, the grid of eval.py --mix (common.utils.save_style_mix).
- Everything else (fused modconv, TF32 flags, custom CUDA kernels) is replaced by the mathematically equal
  plain-PyTorch path; conv2d_gradfix is not needed because PyTorch differentiates conv twice natively.
- CUDA speed: fused Adam (CUDA only), cuDNN autotuner, the in-memory images kept on the GPU, pinned non-blocking
  copies (common/); host syncs: the ADA adjustment reads its sign statistic every 4 iterations (as the reference),
  the losses only at --log-every steps. --compile is refused: R1 and path-length regularization differentiate D and
  G twice, which torch.compile's autograd does not support. Measured on one H200 (README "Measured on one H200"):
  --cfg auto 256 px batch 16 fp32, ADA (--no-insgen) 60.0 s/kimg, ~5x NVIDIA's 12.5 on an A100 -- the price of the
  plain-PyTorch ops and no fp16 layers; InsGen's own terms 1.23x ADA (--query shared 1.08x).

Run:       python insgen.py --data pokemon --res 256 --cfg auto            (1 GPU; --cfg paper256 = 8 GPUs, batch 64)
Plain ADA: python insgen.py --data pokemon --res 256 --cfg auto --no-insgen
Multi-GPU: torchrun --nproc_per_node 8 insgen.py --data DIR --res 256 --cfg paper256
Samples:   python eval.py ... (Sampler: truncation --psi, style_mix); --mix-grid also writes style-mixing grids.
CPU toy:   python insgen.py --data digits --res 16 --cfg auto --cbase 512 --cmax 64 --batch 32 --gamma 0.05 --iters 3000
           (--gamma 0.05: the cfg-auto heuristic 0.0002*16^2/32 = 0.0016 let plain ADA collapse to one shape on
           digits at this size; FID and samples of this command: README, Results)
Benchmark: python insgen.py --bench 16 --res 256 --cfg auto  (s/iter and s/kimg of InsGen, InsGen --query shared and
           plain ADA side by side on random images, no files; 16 iterations = one full lazy-regularization cycle.
           InsGen adds 3 D fwd+bwd, 3 D' fwd, 1 G fwd and 6 augmentations per iteration, --query shared 3 D' fwd,
           1 G fwd and 3 augmentations.) Measured on a 2-core CPU shared with other jobs (load average 3-5),
           OMP_NUM_THREADS=1, fp32, batch 16, cbase 2048, cmax 128, medians of 16-iteration blocks:
           OMP_NUM_THREADS=1 python insgen.py --bench 64 --res 32 --cfg auto --batch 16 --cbase 2048 --cmax 128
             32 px: InsGen 2.02 s/it (1.86x ADA), --query shared 1.52 (1.40x), ADA 1.09;
           the same with --bench 48 --res 64: InsGen 5.72 s/it (1.92x), shared 3.97 (1.33x), ADA 2.98.
"""
import argparse
import copy
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.data import infinite_batches, load_dataset
from common.ema import ema_update, make_ema, stylegan_ema_beta
from common.metrics import training_evaluator
from common.output import (FORMAT, check_checkpoint, log_metrics, prepare_run_dir, Progress, read_resume, resume,
                           rng_state, save_checkpoint, save_grid)
from common.run import (add_common_args, autocast, check_finite, count_params, Distributed, seed_everything,
                        SetupInterrupt, StopOnInterrupt, time_steps, user_errors, UserError)
from common.sampling import SamplerBase, save_style_mix

METHOD = "insgen"
ARCH_FLAGS = ("res", "cbase", "cmax", "map")  # fix the networks (after the --cfg table): --resume checks them
Z_DIM = W_DIM = 512
SQRT2 = math.sqrt(2.0)
G_REG_EVERY, D_REG_EVERY, ADA_EVERY = 4, 16, 4
PL_WEIGHT, PL_DECAY, PL_SHRINK, STYLE_MIX = 2.0, 0.01, 2, 0.9
TAU, MOMENTUM, PERTURB_STD, LAMBDA_REAL, LAMBDA_FAKE, LAMBDA_G = 0.2, 0.999, 0.15, 1.0, 1.0, 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, res=256, batch=None, iters=None, lr=None)  # lr None: 0.0025 (0.002 for auto at >= 1024 px)
    p.set_defaults(no_flip=True)  # stylegan2-ada / insgen train.py: --mirror defaults to off
    for a in p._actions:
        if a.option_strings == ["--no-flip"]:
            a.help = "no horizontal flips of real images (the default here; --mirror turns them on)"
    g = p.add_argument_group("algorithm specific")
    g.add_argument("--cfg", choices=["paper256", "auto"], default="paper256",
                   help="stylegan2-ada config: paper256 (batch 64, gamma 1, ema 20, 8 map layers) or auto (1-GPU heuristics)")
    g.add_argument("--cbase", type=int, default=None, help="channel_base: channels = min(cbase/res, cmax) (cfg: 16384)")
    g.add_argument("--cmax", type=int, default=512, help="channel_max")
    g.add_argument("--gamma", type=float, default=None, help="R1 weight (cfg: paper256 1, auto 0.0002*res^2/batch)")
    g.add_argument("--mbstd", type=int, default=None, help="minibatch-std group size (cfg: paper256 8, auto 4)")
    g.add_argument("--map", type=int, default=None, help="mapping layers (cfg: paper256 8, auto 2)")
    g.add_argument("--ema", type=float, default=None, help="G EMA half-life in kimg (cfg: paper256 20, auto batch*10/32)")
    g.add_argument("--psi", type=float, default=1.0, help="truncation psi for sample grids and eval.py (1 = none)")
    g.add_argument("--aug", choices=["ada", "noaug"], default="ada", help="ADA 'bgc' augmentation or none")
    g.add_argument("--target", type=float, default=0.6, help="ADA target for E[sign(D(real))]")
    g.add_argument("--ada-kimg", type=float, default=500, help="ADA speed: p can go 0 -> 1 in this many kimg")
    g.add_argument("--ada-linear", action="store_true", help="ramp p linearly from 0 to --target over training")
    g.add_argument("--queue", type=int, default=None,
                   help="MoCo queue length K (default int(5%% of the images), at least 1; x2 with --mirror)")
    g.add_argument("--mirror", dest="no_flip", action="store_false",
                   help="random horizontal flips of the real images (off by default, as NVIDIA's and the authors' "
                        "--mirror; the paper's experiments use it)")
    g.add_argument("--no-insgen", action="store_true", help="plain StyleGAN2-ADA (no instance discrimination)")
    g.add_argument("--query", choices=["separate", "shared"], default="separate",
                   help="InsGen queries: separate D passes on their own augmentation draws (the authors' code) or "
                        "shared: the features of the adversarial passes (the paper's reading, ~1.3x ADA's passes "
                        "instead of ~1.9x)")
    g.add_argument("--grid-noise", choices=["random", "const"], default="random",
                   help="noise of the training sample grids: random (seeded by the fixed latents, what the metrics see) "
                        "or const (the learned constant maps, NVIDIA's grids)")
    g.add_argument("--mix-grid", action="store_true", help="also write samples/mix_<step>.png style-mixing grids")
    return p.parse_args(argv)


def default_queue(n_data, mirror):
    """The authors' train.py: int(0.05 * dataset size), doubled with --mirror (e.g. 2000 images: 100, mirrored 200;
    70k: 3500). At least 1 before doubling, so sets under 20 images (where the authors' queue would be empty) work."""
    return max(1, int(0.05 * n_data)) * (2 if mirror else 1)


def resolve_cfg(args, world=1):
    """Fill the None flags from the config table (stylegan2-ada-pytorch train.py, cfg_specs)."""
    res = args.res
    if res < 8 or res > 1024 or res & (res - 1):
        raise UserError(f"--res {res} is not supported: use a power of two from 8 to 1024")
    if args.cfg == "paper256":
        c = dict(batch=64, mbstd=8, cbase=16384, gamma=1.0, ema=20.0, rampup=None, map=8)
    else:  # 'auto': batch = gpus*min(4096/res, 32) capped at 64, gamma from a heuristic, mbstd fixed at 4
        b = max(min(world * min(4096 // res, 32), 64), world)
        c = dict(batch=b, mbstd=min(b // world, 4), cbase=32768 if res >= 512 else 16384,
                 gamma=0.0002 * res ** 2 / b, ema=b * 10 / 32, rampup=0.05, map=2)
    for k in ("batch", "mbstd", "cbase", "gamma", "ema", "map"):
        if getattr(args, k) is None:
            setattr(args, k, c[k])
    args.rampup = c["rampup"]
    if args.lr is None:
        args.lr = 0.002 if args.cfg == "auto" and res >= 1024 else 0.0025  # cfg_specs: auto's lrate at >= 1024
    if args.queue is not None and args.queue < 1:
        raise UserError(f"--queue {args.queue}: the MoCo queue needs at least 1 key (leave it out for 5% of the data)")
    if args.iters is None:
        args.iters = 25000 * 1000 // args.batch  # the reference's 25,000 kimg
    return args


# ---------------------------------------------- the paper's contribution: instance heads, MoCo queues, InfoNCE [Sec. 3]
class Head(nn.Module):
    """phi: Linear(C, 512) -> ReLU -> Linear(512, 128) -> L2 normalize (plain nn.Linear init)."""

    def __init__(self, cin, hidden=512, dim=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, feat):  # fp32 even under --amp: features, heads and InfoNCE logits (tau 0.2 amplifies bf16)
        with torch.autocast(feat.device.type, enabled=False):
            return F.normalize(self.net(f32(feat)), dim=1)


class Queue(nn.Module):
    """MoCo FIFO of K keys, stored as columns of a [dim, K] buffer (randn, column-normalized at init)."""

    def __init__(self, dim, K):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("ptr", torch.zeros([], dtype=torch.long))

    @torch.no_grad()
    def push(self, k, world=1):
        if world > 1:  # every rank enqueues the keys of all ranks, in rank order
            parts = [torch.empty_like(k) for _ in range(world)]
            dist.all_gather(parts, k.contiguous())
            k = torch.cat(parts)
        K = self.keys.shape[1]
        k = k[-K:].to(self.keys.dtype)
        idx = (self.ptr + torch.arange(k.shape[0], device=k.device)) % K  # wraps around the end
        self.keys[:, idx] = k.t()
        self.ptr.copy_((self.ptr + k.shape[0]) % K)


def infonce(q, k, queue, tau=TAU):
    """Eq. 4: -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.k_i/tau)); label 0 = the positive."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / tau
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class InsGenModule(nn.Module):
    """The real and fake instance heads phi_r, phi_f, their momentum copies and the two MoCo queues."""

    def __init__(self, feat_dim, K):
        super().__init__()
        self.real, self.fake = Head(feat_dim), Head(feat_dim)
        self.real_m, self.fake_m = copy.deepcopy(self.real), copy.deepcopy(self.fake)
        for p in list(self.real_m.parameters()) + list(self.fake_m.parameters()):
            p.requires_grad_(False)
        self.real_q, self.fake_q = Queue(128, K), Queue(128, K)

    def trainable(self):
        return list(self.real.parameters()) + list(self.fake.parameters())

    @torch.no_grad()
    def momentum_update(self, *heads, m=MOMENTUM):
        """phi_m <- m phi_m + (1 - m) phi for the named heads ('real', 'fake'; none named: both). contrast() calls it
        right before each key computation, as the authors' CLHead.forward does: the real momentum head once per
        iteration, the fake one twice (G phase and D phase)."""
        for h in heads or ("real", "fake"):
            ema_update(getattr(self, h + "_m"), getattr(self, h), m)

    def contrast(self, kind, feat, key_feat):
        """InfoNCE (eq. 4) of the query phi(feat) (`kind` 'real' or 'fake': phi_r or phi_f; feat = D's features of the
        query view, with gradient) against the positive key phi_m(key_feat) (key_feat = D'(another view), no gradient)
        and the kind's queue of negatives; the momentum head is updated right before its key. Returns (loss, key)."""
        q = getattr(self, kind)(feat)
        with torch.no_grad():
            self.momentum_update(kind)
            k = getattr(self, kind + "_m")(key_feat)
        return infonce(q, k, getattr(self, kind + "_q").keys.clone()), k


# ---------------------------------- the backbone, StyleGAN2-ADA (stylegan2-ada-pytorch): low-level ops (upfirdn2d ref.)
def setup_filter(taps):
    """Normalized FIR filter: 2-D outer product for short filters ([1,3,3,1] -> 4x4), 1-D separable for >= 8 taps."""
    f = np.asarray(taps, dtype=np.float64)
    if f.size < 8:
        f = np.outer(f, f)
    return torch.tensor(f / f.sum(), dtype=torch.float32)


def upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0, flip=False):
    """Upsample (zero insertion), pad (x0, x1, y0, y1; negative = crop), FIR filter, downsample: NVIDIA's
    `_upfirdn2d_ref` as depthwise convolutions. Upsampling runs as a stride-`up` transposed conv (the same numbers
    as zero insertion + filtering, without multiplying the inserted zeros); downsampling as a strided conv."""
    B, C, H, W = x.shape
    f = (f * gain ** (f.ndim / 2)).to(x.dtype)
    px0, px1, py0, py1 = pad
    if up > 1:
        assert down == 1
        fc = f.flip(list(range(f.ndim))) if flip else f  # the true-convolution kernel
        if f.ndim == 2:
            x = F.conv_transpose2d(x, fc[None, None].expand(C, 1, *f.shape), stride=up, groups=C)
        else:
            x = F.conv_transpose2d(x, fc[None, None, None, :].expand(C, 1, 1, -1), stride=(1, up), groups=C)
            x = F.conv_transpose2d(x, fc[None, None, :, None].expand(C, 1, -1, 1), stride=(up, 1), groups=C)
        # x is the full convolution of the zero-inserted image minus its last (up-1) zero rows/cols; the reference's
        # valid-mode output starts at offset K-1-p0 of the full convolution.
        K = f.shape[-1]
        x0, y0 = K - 1 - px0, K - 1 - py0
        wo, ho = W * up + px0 + px1 - K + 1, H * up + py0 + py1 - K + 1
        x = F.pad(x, [max(-x0, 0), max(x0 + wo - x.shape[3], 0), max(-y0, 0), max(y0 + ho - x.shape[2], 0)])
        x0, y0 = max(x0, 0), max(y0, 0)
        return x[:, :, y0: y0 + ho, x0: x0 + wo]
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    if not flip:  # conv2d is a correlation: flip to get a convolution
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:  # strided conv == full conv then keeping every `down`-th pixel
        return F.conv2d(x, f[None, None].expand(C, 1, *f.shape), groups=C, stride=down)
    x = F.conv2d(x, f[None, None, None, :].expand(C, 1, 1, -1), groups=C, stride=(1, down))  # separable
    return F.conv2d(x, f[None, None, :, None].expand(C, 1, -1, 1), groups=C, stride=(down, 1))


def upsample2d(x, f, up=2):
    fw = f.shape[-1]
    p0, p1 = (fw + up - 1) // 2, (fw - up) // 2
    return upfirdn2d(x, f, up=up, pad=(p0, p1, p0, p1), gain=up * up)


def downsample2d(x, f, down=2, padding=0, flip=False):
    fw = f.shape[-1]
    p0, p1 = padding + (fw - down + 1) // 2, padding + (fw - down) // 2
    return upfirdn2d(x, f, down=down, pad=(p0, p1, p0, p1), flip=flip)


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0):
    """conv2d_resample's fast paths. down: blur then strided conv. up: stride-2 transposed conv then blur (gain 4)."""
    kw, fw = w.shape[-1], (f.shape[-1] if f is not None else 0)
    if down > 1:
        p0, p1 = padding + (fw - down + 1) // 2, padding + (fw - down) // 2
        return F.conv2d(upfirdn2d(x, f, pad=(p0, p1, p0, p1)), w, stride=down)
    if up > 1:
        p0 = padding + (fw + up - 1) // 2 - (kw - 1)
        p1 = padding + (fw - up) // 2 - (kw - up)
        pt = max(min(-p0, -p1), 0)
        x = F.conv_transpose2d(x, w.transpose(0, 1), stride=up, padding=pt)
        return upfirdn2d(x, f, pad=(p0 + pt, p1 + pt, p0 + pt, p1 + pt), gain=up * up)
    return F.conv2d(x, w, padding=padding)


def f32(x):
    """Half/bf16 -> fp32; fp32/fp64 unchanged (tests run whole pipelines in fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def bias_act(x, b, act="linear", gain=1.0, clamp=None):
    """x + b, then lrelu(0.2) * sqrt(2) (or linear), times gain, clamped to +-clamp*gain (Conv2dLayer/bias_act)."""
    if b is not None:
        x = x + (b.reshape(1, -1, 1, 1) if x.ndim == 4 else b).to(x.dtype)
    act_gain = gain * SQRT2 if act == "lrelu" else gain
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
    if act_gain != 1:
        x = x * act_gain
    if clamp is not None:
        x = x.clamp(-clamp * gain, clamp * gain)
    return x


def modulated_conv2d(x, weight, styles, noise=None, up=1, padding=0, f=None, demodulate=True):
    """StyleGAN2 Eq. 1-3 (the reference's non-fused training path): scale input channels by the style, convolve
    with the shared weight, then divide each output channel by sqrt(sum_{i,k} (w_oik * s_i)^2 + 1e-8)."""
    x = x * styles.to(x.dtype).reshape(x.shape[0], -1, 1, 1)
    x = conv2d_resample(x, weight.to(x.dtype), f, up=up, padding=padding)
    if demodulate:
        dcoefs = (styles.square() @ weight.square().sum([2, 3]).t() + 1e-8).rsqrt()  # [B, O]
        x = x * dcoefs.to(x.dtype).reshape(x.shape[0], -1, 1, 1)
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


class _GridSample(torch.autograd.Function):
    """Bilinear grid_sample (zeros padding, align_corners=False) whose backward is itself differentiable w.r.t. the
    incoming gradient: what R1 through ADA needs (pytorch issue 34704; NVIDIA's grid_sample_gradfix.py)."""

    @staticmethod
    def forward(ctx, x, grid):
        ctx.save_for_backward(x, grid)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    @staticmethod
    def backward(ctx, grad_out):
        x, grid = ctx.saved_tensors
        gx, ggrid = _GridSampleBackward.apply(grad_out, x, grid)
        return gx, (ggrid if ctx.needs_input_grad[1] else None)


class _GridSampleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out, x, grid):
        mask = [True, grid.requires_grad]  # the ADA grid is a constant: skip its gradient
        gx, ggrid = torch.ops.aten.grid_sampler_2d_backward(grad_out, x, grid, 0, 0, False, mask)
        ctx.save_for_backward(grid)
        return gx, ggrid

    @staticmethod
    def backward(ctx, gg_x, gg_grid):
        grid, = ctx.saved_tensors
        if ctx.needs_input_grad[2]:
            raise RuntimeError("second-order gradients w.r.t. the sampling grid are not implemented")
        # grad_x = A^T grad_out with A the (fixed-grid) linear sampling operator, so d grad_x / d grad_out = A^T and
        # its transpose applied to gg_x is A gg_x = grid_sample(gg_x); grad_x does not depend on x (linear op).
        return (_GridSample.apply(gg_x, grid) if ctx.needs_input_grad[0] else None), None, None


def grid_sample(x, grid):
    return _GridSample.apply(x, grid)


# ------------------------------------------------------------------- StyleGAN2 networks (training/networks.py)
class FC(nn.Module):
    """Equalized-lr fully connected layer: weight N(0,1)/lr_mul, runtime gain lr_mul/sqrt(fan_in), bias gain lr_mul."""

    def __init__(self, cin, cout, act="linear", bias_init=0.0, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full([cout], float(bias_init)))
        self.act, self.wg, self.bg = act, lr_mul / math.sqrt(cin), lr_mul

    def forward(self, x):
        return bias_act(F.linear(x, self.weight * self.wg), self.bias * self.bg, self.act)


class Mapping(nn.Module):
    def __init__(self, num_ws, layers=8, lr_mul=0.01, w_avg_beta=0.995):
        super().__init__()
        self.num_ws, self.beta = num_ws, w_avg_beta
        self.fcs = nn.ModuleList([FC(Z_DIM if i == 0 else W_DIM, W_DIM, "lrelu", lr_mul=lr_mul) for i in range(layers)])
        self.register_buffer("w_avg", torch.zeros(W_DIM))

    def forward(self, z, psi=1.0, update_w_avg=False):
        x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()  # normalize_2nd_moment
        for fc in self.fcs:
            x = fc(x)
        if update_w_avg and self.training:  # moving average of w, the truncation centre
            self.w_avg.copy_(x.detach().to(self.w_avg.dtype).mean(0).lerp(self.w_avg, self.beta))
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        return self.w_avg.lerp(x, psi) if psi != 1 else x


class SynthLayer(nn.Module):
    """Modulated 3x3 conv (+ optional x2 up) with demodulation, per-pixel noise x learned strength, bias, lrelu."""

    def __init__(self, cin, cout, res, up=1, clamp=256):
        super().__init__()
        self.affine = FC(W_DIM, cin, bias_init=1)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(res, res))
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        self.res, self.up, self.clamp = res, up, clamp

    def forward(self, x, w, noise_mode="random"):
        noise = None
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.res, self.res, device=x.device) * self.noise_strength
        elif noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, self.affine(w), noise, self.up, 1, self.resample_filter)
        return bias_act(x, self.bias, "lrelu", clamp=self.clamp)


class ToRGB(nn.Module):
    def __init__(self, cin, clamp=256):
        super().__init__()
        self.affine = FC(W_DIM, cin, bias_init=1)
        self.weight = nn.Parameter(torch.randn(3, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(3))
        self.wg, self.clamp = 1 / math.sqrt(cin), clamp

    def forward(self, x, w):
        x = modulated_conv2d(x, self.weight, self.affine(w) * self.wg, demodulate=False)
        return bias_act(x, self.bias, clamp=self.clamp)


class SynthBlock(nn.Module):
    def __init__(self, cin, cout, res):
        super().__init__()
        self.cin = cin
        if cin == 0:
            self.const = nn.Parameter(torch.randn(cout, res, res))
        else:
            self.conv0 = SynthLayer(cin, cout, res, up=2)
        self.conv1 = SynthLayer(cout, cout, res)
        self.torgb = ToRGB(cout)
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        self.num_conv = 1 if cin == 0 else 2

    def forward(self, x, img, ws, noise_mode):
        if self.cin == 0:
            x = self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode)
        y = self.torgb(x, ws[:, self.num_conv])
        img = y if img is None else upsample2d(img, self.resample_filter) + y  # 'skip' architecture
        return x, img


def channels(cbase, cmax, res):
    return min(cbase // res, cmax)


class Synthesis(nn.Module):
    def __init__(self, res, cbase, cmax):
        super().__init__()
        self.res = res
        rs = [2 ** i for i in range(2, int(math.log2(res)) + 1)]
        self.blocks = nn.ModuleList([SynthBlock(channels(cbase, cmax, r // 2) if r > 4 else 0, channels(cbase, cmax, r), r)
                                     for r in rs])
        self.num_ws = sum(b.num_conv for b in self.blocks) + 1

    def forward(self, ws, noise_mode="random"):
        x = img = None
        i = 0
        for b in self.blocks:
            x, img = b(x, img, ws[:, i: i + b.num_conv + 1], noise_mode)
            i += b.num_conv
        return img


class Generator(nn.Module):
    def __init__(self, res, cbase=16384, cmax=512, map_layers=8):
        super().__init__()
        self.res = res
        self.synthesis = Synthesis(res, cbase, cmax)
        self.mapping = Mapping(self.synthesis.num_ws, map_layers)

    def forward(self, z, psi=1.0, noise_mode="random"):
        return self.synthesis(self.mapping(z, psi), noise_mode)


class Conv(nn.Module):
    """Equalized-lr conv (weight gain 1/sqrt(fan_in)), optional blur + stride-2 downsampling, bias_act with clamp."""

    def __init__(self, cin, cout, k, act="lrelu", bias=True, down=1, clamp=256):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        self.wg, self.act, self.down, self.pad, self.clamp = 1 / math.sqrt(cin * k * k), act, down, k // 2, clamp

    def forward(self, x, gain=1.0):
        x = conv2d_resample(x, self.weight * self.wg, self.resample_filter, down=self.down, padding=self.pad)
        return bias_act(x, self.bias, self.act, gain, self.clamp)


class DBlock(nn.Module):
    """'resnet' block: [fromRGB] conv0 3x3, conv1 3x3 down2, skip 1x1 down2 no bias; out = (skip + conv1)*sqrt(.5)."""

    def __init__(self, cin, tmp, cout):
        super().__init__()
        self.fromrgb = Conv(3, tmp, 1) if cin == 0 else None
        self.conv0 = Conv(tmp, tmp, 3)
        self.conv1 = Conv(tmp, cout, 3, down=2)
        self.skip = Conv(tmp, cout, 1, act="linear", bias=False, down=2, clamp=None)

    def forward(self, x, img):
        if self.fromrgb is not None:
            x = self.fromrgb(img)
        y = self.skip(x, gain=math.sqrt(0.5))
        return y + self.conv1(self.conv0(x), gain=math.sqrt(0.5))


def minibatch_std(x, group):
    N, C, H, W = x.shape
    G = min(group, N)
    y = x.reshape(G, -1, 1, C, H, W)          # sample n belongs to group n % (N/G), as in the reference
    y = (y - y.mean(0)).square().mean(0)
    y = (y + 1e-8).sqrt().mean([2, 3, 4])     # [N/G, 1]
    y = y.reshape(-1, 1, 1, 1).repeat(G, 1, H, W)
    return torch.cat([x, y.to(x.dtype)], 1)


class Discriminator(nn.Module):
    def __init__(self, res, cbase=16384, cmax=512, mbstd=4, clamp=256):
        super().__init__()
        ch = lambda r: channels(cbase, cmax, r)  # noqa: E731
        rs = [2 ** i for i in range(int(math.log2(res)), 2, -1)]
        self.blocks = nn.ModuleList([DBlock(0 if r == res else ch(r), ch(r), ch(r // 2)) for r in rs])
        self.mbstd, self.feat_dim = mbstd, ch(4)
        self.conv = Conv(ch(4) + 1, ch(4), 3, clamp=clamp)
        self.fc = FC(ch(4) * 16, ch(4), "lrelu")
        self.out = FC(ch(4), 1)

    def forward(self, img, feat_only=False):
        """Returns (logits [N], features [N, C]); features = the 4x4 activation before minibatch-std, averaged
        over space, fp32 (the InsGen backbone d(.), paper Sec. 3.3)."""
        x = None
        for b in self.blocks:
            x = b(x, img)
        feat = f32(x).mean([2, 3])
        if feat_only:
            return feat
        x = self.conv(minibatch_std(x, self.mbstd))
        return f32(self.out(self.fc(x.flatten(1))).squeeze(1)), feat


# --------------------------------------- ADA: the 'bgc' pipeline (training/augment.py) and the adaptive heuristic
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148]


def _matrix(*rows, device):
    elems = [x for r in rows for x in r]
    ref = next((x for x in elems if torch.is_tensor(x)), None)
    if ref is None:
        return torch.tensor(rows, dtype=torch.get_default_dtype(), device=device)
    elems = [x if torch.is_tensor(x) else torch.full_like(ref, float(x)) for x in elems]
    return torch.stack(elems, -1).reshape(*ref.shape, len(rows), -1)


def translate2d(tx, ty, device):
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], device=device)


def scale2d(sx, sy, device):
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], device=device)


def rotate2d(t, device):
    return _matrix([torch.cos(t), torch.sin(-t), 0], [torch.sin(t), torch.cos(t), 0], [0, 0, 1], device=device)


def rotate3d(v, t, device):
    vx, vy, vz = v[0], v[1], v[2]
    s, c = torch.sin(t), torch.cos(t)
    cc = 1 - c
    return _matrix([vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
                   [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
                   [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0], [0, 0, 0, 1], device=device)


class AugmentPipe(nn.Module):
    """ADA 'bgc': every op applied per sample with probability p (all multipliers 1); p is set by `ADA` below."""

    def __init__(self):
        super().__init__()
        self.p = 0.0
        self.register_buffer("Hz_geom", setup_filter(SYM6))

    def geometric(self, images, G_inv):
        """Apply per-sample inverse pixel transforms G_inv [B,3,3] (output pixel -> input pixel, origin at the image
        centre): reflect-pad enough to cover the transformed corners, upsample 2x (sym6), bilinear-sample, downsample."""
        B, C, H, W = images.shape
        dev = images.device
        cx, cy = (W - 1) / 2, (H - 1) / 2
        cp = _matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=dev)
        cp = G_inv @ cp.t()
        hz_pad = self.Hz_geom.shape[0] // 4
        margin = cp[:, :2, :].permute(1, 0, 2).flatten(1)
        margin = torch.cat([-margin, margin]).max(dim=1).values
        margin = margin + torch.tensor([hz_pad * 2 - cx, hz_pad * 2 - cy] * 2, device=dev)
        margin = margin.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, device=dev, dtype=margin.dtype))
        mx0, my0, mx1, my1 = [int(v) for v in margin.ceil().tolist()]
        images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, dev) @ G_inv
        images = upsample2d(images, self.Hz_geom)
        G_inv = scale2d(2, 2, dev) @ G_inv @ scale2d(0.5, 0.5, dev)
        G_inv = translate2d(-0.5, -0.5, dev) @ G_inv @ translate2d(0.5, 0.5, dev)
        shape = [B, C, (H + hz_pad * 2) * 2, (W + hz_pad * 2) * 2]
        G_inv = (scale2d(2 / images.shape[3], 2 / images.shape[2], dev) @ G_inv
                 @ scale2d(shape[3] / 2, shape[2] / 2, dev))
        grid = F.affine_grid(G_inv[:, :2, :], shape, align_corners=False)
        images = grid_sample(images, grid)
        images = downsample2d(images, self.Hz_geom, padding=-hz_pad * 2, flip=True)
        return images

    def forward(self, images):
        with torch.autocast(images.device.type, enabled=False):  # augmentation always in fp32 (or fp64)
            return self._forward(f32(images))

    def _forward(self, images):
        B, C, H, W = images.shape
        dev, p = images.device, self.p
        rand = lambda *s: torch.rand(*s, device=dev)  # noqa: E731
        randn = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
        where = lambda v, other: torch.where(rand(v.shape[0], *([1] * (v.ndim - 1))) < p, v, other)  # noqa: E731
        # Geometric: G_inv maps output pixel coords to input pixel coords.
        i = where(torch.floor(rand(B) * 2), torch.zeros(B, device=dev))
        G_inv = scale2d(1 - 2 * i, 1, dev)                                                     # xflip
        i = where(torch.floor(rand(B) * 4), torch.zeros(B, device=dev))
        G_inv = G_inv @ rotate2d(np.pi / 2 * i, dev)                                          # rotate90
        t = where((rand(B, 2) * 2 - 1) * 0.125, torch.zeros(B, 2, device=dev))
        G_inv = G_inv @ translate2d(-torch.round(t[:, 0] * W), -torch.round(t[:, 1] * H), dev)  # integer translation
        s = where(torch.exp2(randn(B) * 0.2), torch.ones(B, device=dev))
        G_inv = G_inv @ scale2d(1 / s, 1 / s, dev)                                             # isotropic scale
        p_rot = 1 - math.sqrt(min(max(1 - p, 0.0), 1.0))  # P(pre or post rotation) = p
        th = (rand(B) * 2 - 1) * np.pi
        th = torch.where(rand(B) < p_rot, th, torch.zeros_like(th))
        G_inv = G_inv @ rotate2d(th, dev)                                                      # pre-rotation
        s = where(torch.exp2(randn(B) * 0.2), torch.ones(B, device=dev))
        G_inv = G_inv @ scale2d(1 / s, s, dev)                                                 # anisotropic scale
        th = (rand(B) * 2 - 1) * np.pi
        th = torch.where(rand(B) < p_rot, th, torch.zeros_like(th))
        G_inv = G_inv @ rotate2d(th, dev)                                                      # post-rotation
        t = where(randn(B, 2) * 0.125, torch.zeros(B, 2, device=dev))
        G_inv = G_inv @ translate2d(-t[:, 0] * W, -t[:, 1] * H, dev)                          # fractional translation

        images = self.geometric(images, G_inv)

        # Colour: a 4x4 homogeneous matrix per sample acting on RGB.
        I4 = torch.eye(4, device=dev)
        b = where(randn(B) * 0.2, torch.zeros(B, device=dev))
        Cm = _matrix([1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1], device=dev)      # brightness
        c = where(torch.exp2(randn(B) * 0.5), torch.ones(B, device=dev))
        Cm = _matrix([c, 0, 0, 0], [0, c, 0, 0], [0, 0, c, 0], [0, 0, 0, 1], device=dev) @ Cm  # contrast
        v = torch.tensor([1.0, 1, 1, 0], device=dev) / math.sqrt(3)        # luma axis
        i = where(torch.floor(rand(B, 1, 1) * 2), torch.zeros(B, 1, 1, device=dev))
        Cm = (I4 - 2 * torch.outer(v, v) * i) @ Cm                                            # luma flip
        th = where((rand(B) * 2 - 1) * np.pi, torch.zeros(B, device=dev))
        Cm = rotate3d(v, th, dev) @ Cm                                                        # hue rotation
        s = where(torch.exp2(randn(B, 1, 1) * 1.0), torch.ones(B, 1, 1, device=dev))
        Cm = (torch.outer(v, v) + (I4 - torch.outer(v, v)) * s) @ Cm                          # saturation
        images = images.reshape(B, C, H * W)
        images = Cm[:, :3, :3] @ images + Cm[:, :3, 3:]
        return images.reshape(B, C, H, W)


class ADA:
    """Adaptive p: every 4 iterations p += sign(E[sign(D(real))] - target) * batch*4 / (ada_kimg*1000), p >= 0."""

    def __init__(self, pipe, target=0.6, kimg=500, linear=False):
        self.pipe, self.target, self.kimg, self.linear = pipe, target, kimg, linear
        self.acc = torch.zeros(2)  # [sum of signs, count] since the last update
        self.rt = 0.0

    def accumulate(self, real_logits):
        real_logits = real_logits.detach()
        self.acc = self.acc.to(real_logits.device) + torch.stack(
            [real_logits.sign().sum().float(), torch.tensor(float(real_logits.numel()), device=real_logits.device)])

    def update(self, batch, world=1, progress=None):
        acc = self.acc.clone()
        if world > 1:
            dist.all_reduce(acc)
        self.acc = torch.zeros_like(acc)
        self.rt = float(acc[0] / acc[1].clamp(min=1))
        if self.linear:  # --ada-linear: p = target * fraction of training done
            self.pipe.p = self.target * min(max(progress, 0.0), 1.0)
        else:
            adjust = np.sign(self.rt - self.target) * batch * ADA_EVERY / (self.kimg * 1000)
            self.pipe.p = max(self.pipe.p + float(adjust), 0.0)

    def state_dict(self):  # the checkpoint's 'ada' entry
        return {"p": self.pipe.p, "acc": self.acc.cpu(), "rt": self.rt}

    def load_state_dict(self, st):
        self.pipe.p, self.rt, self.acc = float(st["p"]), float(st["rt"]), st["acc"].clone()


# ------------------------------------------------------------------------------------------------- one iteration
def run_G(G, z):
    """G(z) with style mixing (p 0.9): from a random layer `cutoff` on, use the w of a second latent. Every call
    draws its own mixing and moves w_avg with the w of z (not of the mixing latent), as the reference's run_G."""
    ws = G.mapping(z, update_w_avg=True)
    cutoff = int(torch.randint(1, ws.shape[1], ())) if float(torch.rand(())) < STYLE_MIX else ws.shape[1]
    z2 = torch.randn_like(z)
    if cutoff < ws.shape[1]:
        ws = torch.cat([ws[:, :cutoff], G.mapping(z2)[:, cutoff:]], 1)
    return G.synthesis(ws), ws


def step_opt(opt, params, world):
    """Average gradients over ranks (one flat all_reduce), zero NaN/inf like the reference loop, step."""
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, f in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(f.view_as(g))
    for g in grads:
        torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)
    opt.step()


def train_step(G, D, opt_G, opt_D, real, args, it, pl_mean, ada=None, ins=None, D_ema=None, opt_Hr=None, opt_Hf=None,
               world=1):
    """Iteration `it` (0-based; it fixes the lazy-regularization and ADA phases): Gmain, [Gpl], Dmain, [Dr1] (each its
    own backward + step; Dmain back-propagates its fake adversarial graph first unless --query shared), then D'
    (0.999) and ADA. ins, D_ema (D'), opt_Hr, opt_Hf: InsGen (None: plain StyleGAN2-ADA), args.query: where its
    queries come from; ada: None for --aug noaug; pl_mean: the path-length running mean (updated in place). Returns
    detached losses."""
    amp, dev = args.amp, real.device
    aug = ada.pipe if ada is not None else (lambda x: x)
    B = real.shape[0]
    z_main, z_pl, z_d, _ = torch.randn(4 * B, Z_DIM, device=dev).split(B)
    L = {}

    # Gmain: non-saturating loss softplus(-D(aug(G(z)))) + lambda_G * C_G^f (Eq. 2, 8-9, 11).
    G.requires_grad_(True)
    opt_G.zero_grad(set_to_none=True)
    with autocast(real.device, amp):
        img, _ = run_G(G, z_main)
        logits, feat = D(aug(img))
        loss = F.softplus(-logits).mean()
        L["loss_G"] = loss.detach()
        if ins is not None:  # eq. 9, C_G^f: gradient into G through the query (head, D frozen); key: D'(another view)
            q = feat if args.query == "shared" else D(aug(img), feat_only=True)  # shared: the adversarial view's
            with torch.no_grad():
                k = D_ema(aug(img.detach()), feat_only=True)
            cl_g, _ = ins.contrast("fake", q, k)
            L["cl_G"] = cl_g.detach()
            loss = loss + LAMBDA_G * cl_g
    loss.backward()
    step_opt(opt_G, G.parameters(), world)

    # Gpl: path-length regularization every 4 steps, on half the batch (StyleGAN2 Eq. 4), loss x interval.
    if it % G_REG_EVERY == 0:
        opt_G.zero_grad(set_to_none=True)
        img, ws = run_G(G, z_pl[:max(B // PL_SHRINK, 1)])
        noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
        grad, = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
        lengths = grad.square().sum(2).mean(1).sqrt()
        pl_ema = pl_mean.lerp(lengths.mean(), PL_DECAY)
        pl_mean.copy_(pl_ema.detach())
        pen = (lengths - pl_ema).square() * PL_WEIGHT
        (img[:, 0, 0, 0] * 0 + pen).mean().mul(G_REG_EVERY).backward()
        step_opt(opt_G, G.parameters(), world)
        L["pl"] = pen.mean().detach()
    G.requires_grad_(False)

    # Dmain: softplus(D(aug(G(z)))) + softplus(-D(aug(x))) + C_D^r + C_D^f (Eq. 1, 5-7, 10).
    D.requires_grad_(True)
    opt_D.zero_grad(set_to_none=True)
    if ins is not None:
        opt_Hr.zero_grad(set_to_none=True)
        opt_Hf.zero_grad(set_to_none=True)
        for p in ins.trainable():
            p.requires_grad_(True)
    shared = ins is not None and args.query == "shared"
    with autocast(real.device, amp):
        with torch.no_grad():
            img, _ = run_G(G, z_d)
        logits_f, feat_f = D(aug(img))
        loss_f = F.softplus(logits_f).mean()
    if not shared:  # as the authors: the fake graph goes first (at most 3 batch-B D graphs alive, not 4)
        loss_f.backward()
    with autocast(real.device, amp):
        logits_r, feat_r = D(aug(real))
        if ada is not None:
            ada.accumulate(logits_r)
        loss = F.softplus(-logits_r).mean()
        L["loss_D"] = (loss_f + loss).detach()
        if ins is not None:  # queries: D's features of a view of x and of G(z), with gradient into D and heads
            if shared:  # the views the adversarial passes just scored
                f_r, f_f = feat_r, feat_f
            else:  # new views, one 2B pass: the features are taken before minibatch-std, nothing mixes samples
                f_r, f_f = D(torch.cat([aug(real), aug(img)]), feat_only=True).split(B)
            with torch.no_grad():  # keys, one 2B D' pass: another view of x (eq. 5) and of the perturbed positive
                v_r = aug(real)  # (eq. 6: G(z + 0.15 eps), a G pass of its own: own mixing draw, moves w_avg)
                img_pos, _ = run_G(G, z_d + PERTURB_STD * torch.randn_like(z_d))
                kf_r, kf_f = D_ema(torch.cat([v_r, aug(img_pos)]), feat_only=True).split(B)
            cl_r, k_r = ins.contrast("real", f_r, kf_r)  # eq. 5, C_D^r
            cl_f, _ = ins.contrast("fake", f_f, kf_f)  # eq. 7, C_D^f
            with torch.no_grad():  # the fake queue: the momentum fake head on the queries (authors' update_q)
                enq_f = ins.fake_m(f_f.detach())
            L["cl_real"], L["cl_fake"] = cl_r.detach(), cl_f.detach()
            loss = loss + LAMBDA_REAL * cl_r + LAMBDA_FAKE * cl_f
        if shared:  # the fake adversarial graph holds the fake query: one backward for both
            loss = loss + loss_f
    loss.backward()
    step_opt(opt_D, D.parameters(), world)
    if ins is not None:
        step_opt(opt_Hr, list(ins.real.parameters()), world)
        step_opt(opt_Hf, list(ins.fake.parameters()), world)
        for p in ins.trainable():
            p.requires_grad_(False)
        ins.real_q.push(k_r, world)
        ins.fake_q.push(enq_f, world)

    # Dr1: R1 = gamma/2 ||grad_x D(aug(x))||^2 w.r.t. the un-augmented reals, every 16 steps, loss x interval.
    if it % D_REG_EVERY == 0 and args.gamma > 0:
        opt_D.zero_grad(set_to_none=True)
        x = real.detach().requires_grad_(True)
        logits, _ = D(aug(x))
        if ada is not None:
            ada.accumulate(logits)
        grad, = torch.autograd.grad(logits.sum(), x, create_graph=True)
        r1 = grad.square().sum([1, 2, 3]) * (args.gamma / 2)
        (logits * 0 + r1).mean().mul(D_REG_EVERY).backward()
        step_opt(opt_D, D.parameters(), world)
        L["r1"] = r1.mean().detach()
    D.requires_grad_(False)

    # D': 0.999 once per iteration (the authors' update at the start of the next one; the momentum heads were updated
    # at their calls), then ADA every 4 iterations. G's EMA: the training loop (ema_beta).
    total = B * world
    if ins is not None:
        ema_update(D_ema, D, MOMENTUM)
    if ada is not None and (it + 1) % ADA_EVERY == 0:
        ada.update(total, world, progress=(it + 1) / args.iters)
    if ada is not None:
        L["p"] = ada.pipe.p
    return L


def ema_beta(args, it):
    """EMA decay of G after iteration it + 1: StyleGAN2-ADA's half-life --ema kimg, with ramp-up (cfg auto)."""
    return stylegan_ema_beta(args.batch, args.ema, it * args.batch, args.rampup)


# ------------------------------------------------------------------------------------------------- training run
# main -> check_args -> bench | run. run() is the same text in fastgan.py, insgen.py, adafm.py and disp.py except
# the lines marked `# method`: data, networks, resume, DDP, sampler and evaluator, then the loop (batch, train_step,
# EMA, progress, Ctrl-C, samples, evaluation, checkpoint), then last.pt and the style-mixing grid.
def check_args(args):
    """Every flag (the --cfg table fills the unset ones), before any data is read or network built."""
    if args.compile:
        raise UserError("--compile is not supported by insgen.py: R1 (D) and path-length regularization (G) need "
                        "double backward, which torch.compile's autograd does not support; run without it")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolve_cfg(args, world)
    per_rank = args.batch // world
    if per_rank and args.batch % world == 0 and per_rank % min(args.mbstd, per_rank):
        raise UserError(f"per-process batch {per_rank} is not a multiple of the minibatch-std group --mbstd {args.mbstd}")


def lazy_adam(params, lr, every, fused=False):
    """Lazy regularization (StyleGAN2 App. B): lr * k/(k+1), betas ** (k/(k+1)). fused: one kernel per step (CUDA)."""
    r = every / (every + 1)
    return torch.optim.Adam(params, lr=lr * r, betas=(0.0 ** r, 0.99 ** r), eps=1e-8, fused=fused)


def build(args, device, n_data, world=1):
    """Everything that trains, with the same initial weights on every rank (seeded with --seed, then rank 0's
    broadcast): G, D and their lazy-regularization Adams; the ADA pipe and controller (None for --aug noaug); InsGen's
    heads and queues (queue length from the n_data images), the momentum discriminator D' and the heads' Adams (None
    for --no-insgen)."""
    torch.manual_seed(args.seed)
    G = Generator(args.res, args.cbase, args.cmax, args.map).to(device)
    D = Discriminator(args.res, args.cbase, args.cmax, args.mbstd).to(device)
    fused = torch.device(device).type == "cuda"  # fused Adam on CUDA (CPU keeps the for-each Adam)
    opt_G = lazy_adam(G.parameters(), args.lr, G_REG_EVERY, fused)
    opt_D = lazy_adam(D.parameters(), args.lr, D_REG_EVERY, fused)
    ada = ADA(AugmentPipe().to(device), args.target, args.ada_kimg, args.ada_linear) if args.aug == "ada" else None
    ins = D_ema = opt_Hr = opt_Hf = None
    if not args.no_insgen:
        K = args.queue if args.queue is not None else default_queue(n_data, not args.no_flip)
        ins = InsGenModule(D.feat_dim, K).to(device)
        ins.requires_grad_(False)  # heads train only in the D main phase
        D_ema = make_ema(D)
        # the authors' training_loop: the real head's Adam takes D's settings (lazy ratio 16/17), the fake head's G's
        # (ratio 4/5, although it steps in the D phase with no regularization phase of its own)
        opt_Hr = lazy_adam(ins.real.parameters(), args.lr, D_REG_EVERY, fused)
        opt_Hf = lazy_adam(ins.fake.parameters(), args.lr, G_REG_EVERY, fused)
    G.requires_grad_(False)
    D.requires_grad_(False)
    if world > 1:
        for t in (t for m in (G, D, ins, D_ema) if m is not None for t in list(m.parameters()) + list(m.buffers())):
            dist.broadcast(t, 0)
    return G, D, opt_G, opt_D, ada, ins, D_ema, opt_Hr, opt_Hf


def check_resume(ck, path, args, verbose=True):
    """The method's part of the early --resume check: an InsGen or ADA checkpoint resumed without them would
    silently drop that state; a change of x-flips is said."""
    dropped = [name for k, name, off in (("ins", "InsGen", args.no_insgen), ("ada", "ADA", args.aug == "noaug"))
               if k in ck and off]
    if dropped:
        raise UserError(f"checkpoint {path} trains with {' and '.join(dropped)}; resuming without would silently drop "
                        "that state: remove --no-insgen / --aug noaug, or start a new --out")
    if ck["args"].get("no_flip", True) != args.no_flip and verbose:
        print(f"note: {path} was trained {'with' if not ck['args']['no_flip'] else 'without'} x-flips, this run "
              f"goes on {'without' if args.no_flip else 'with'} them ({'add' if args.no_flip else 'drop'} --mirror "
              "to keep them as they were)", flush=True)


def upgrade_state(ck, path, ada, ins, opt_Hr, opt_Hf):
    """The method's part of --resume, before the state_dicts are loaded (returns the checkpoint to load, the given
    one unchanged): the MoCo queues must have this run's length;
    a checkpoint without ADA state continues ADA from p = 0; checkpoints from before the per-head optimizers hold one
    Adam over both heads ('opt_H', real head's parameters first): its moments move to opt_Hr, opt_Hf, whose own
    lr/betas apply from here on."""
    ck = dict(ck)
    if ada is not None and "ada" not in ck:
        ck["ada"] = ada.state_dict()
    if ins is None or "ins" not in ck:
        return ck
    kc, k = ck["ins"]["real_q.keys"].shape[-1], ins.real_q.keys.shape[1]
    if kc != k:
        raise UserError(f"checkpoint {path} has MoCo queues of {kc} keys, this run builds {k}: pass --queue {kc} "
                        "to resume it (the default is int(5% of the images), x2 with --mirror; runs from before "
                        "that default also flipped by default: add --mirror)")
    if "opt_H" in ck:
        old = torch.optim.Adam(ins.trainable())
        old.load_state_dict(ck.pop("opt_H"))
        for opt in (opt_Hr, opt_Hf):
            for p in opt.param_groups[0]["params"]:
                if p in old.state:
                    opt.state[p] = old.state[p]
        ck["opt_Hr"], ck["opt_Hf"] = opt_Hr.state_dict(), opt_Hf.state_dict()
    return ck


def bench_model(a, device, batch, world):
    """One model of --bench, built as run() builds it (queue for 2k images) on a fixed random batch: returns step(),
    which runs its next iteration (0, 1, ...) and the G EMA."""
    G, D, opt_G, opt_D, ada, ins, D_ema, opt_Hr, opt_Hf = build(a, device, 2000, world)
    G_ema, pl_mean = make_ema(G), torch.zeros([], device=device)
    real = torch.rand(batch, 3, a.res, a.res, device=device) * 2 - 1
    its = iter(range(1 << 62))

    def step():
        it = next(its)
        train_step(G, D, opt_G, opt_D, real, a, it, pl_mean, ada, ins, D_ema, opt_Hr, opt_Hf, world)
        ema_update(G_ema, G, ema_beta(a, it))
    return step


BENCH = {"insgen": (False, "separate"), "insgen --query shared": (False, "shared"), "ada (--no-insgen)": (True, "separate")}


def bench(args):
    """--bench N: seconds per iteration and per kimg (train_step + EMA) on a random batch at --res/--batch, side by
    side for InsGen (--query separate), InsGen --query shared and plain ADA (--no-insgen). After one warm-up iteration
    each (iteration 0: both regularizations) the three take turns in blocks of min(N, 16) iterations until each has
    run N (16 = one lazy-regularization cycle: 4 path-length passes, 1 R1); s/iter = the median over blocks of the
    block's mean, so a burst of other work on the machine hits all three alike. Writes nothing; returns
    {variant: s/iter}."""
    dist_ = Distributed(args.device)
    device, batch = dist_.device, dist_.per_rank_batch(args.batch)
    steps = {}
    for name, (no_insgen, query) in BENCH.items():
        a = copy.copy(args)
        a.no_insgen, a.query = no_insgen, query
        steps[name] = bench_model(a, device, batch, dist_.world)
        time_steps(steps[name], 0, device)  # warm-up
    block = min(args.bench, D_REG_EVERY)
    means = {name: [] for name in steps}
    for _ in range(math.ceil(args.bench / block)):
        for name, step in steps.items():
            means[name].append(sum(time_steps(step, block - 1, device)) / block)  # block calls
    sec = {name: float(np.median(m)) for name, m in means.items()}
    if dist_.is_main:
        ada_s = sec["ada (--no-insgen)"]
        load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        print(f"bench: {device} x{dist_.world} res {args.res} batch {args.batch} cbase {args.cbase} cmax {args.cmax} "
              f"{'amp' if args.amp else 'fp32'}, {torch.get_num_threads()} threads, medians of "
              f"{len(means[name])} blocks of {block} iterations, load average at the end {load}", flush=True)
        for name, s in sec.items():
            print(f"bench: {name:<22} {s:.3f} s/iter {s * 1000 / args.batch:7.1f} s/kimg  {s / ada_s:.2f}x ADA",
                  flush=True)
    return sec


def main(argv=None):
    args = parse_args(argv)
    with SetupInterrupt() as setup:  # Ctrl-C before the loop: exit 130; a UserError: one line from __main__, exit 2
        check_args(args)
        if args.bench:
            return bench(args)
        run(args, setup)


def run(args, setup=None):
    dist = Distributed(args.device)
    device, batch = dist.device, dist.per_rank_batch(args.batch)
    ck, path = read_resume(args, METHOD, ARCH_FLAGS)  # readable, same method and networks: checked first
    if ck:  # method
        check_resume(ck, path, args, dist.is_main)
    seed_everything(args.seed + dist.rank)
    ds = load_dataset(args.data, args.res, args.data_root, args.crop)
    out = prepare_run_dir(args, METHOD, dist.is_main)
    G, D, opt_G, opt_D, ada, ins, D_ema, opt_Hr, opt_Hf = build(args, device, len(ds), dist.world)  # method
    G_ema = make_ema(G)
    pl_mean = torch.zeros([], device=device)  # method: the path-length regularizer's running mean
    seed_everything(args.seed * dist.world + dist.rank)  # method: one RNG stream per rank after the shared init
    saved = {"G": G, "D": D, "G_ema": G_ema, "opt_G": opt_G, "opt_D": opt_D}  # checkpoint entry -> its object
    saved.update({k: v for k, v in (("ada", ada), ("ins", ins), ("D_ema", D_ema), ("opt_Hr", opt_Hr),
                                    ("opt_Hf", opt_Hf)) if v is not None})  # method
    if ck:  # method
        ck = upgrade_state(ck, path, ada, ins, opt_Hr, opt_Hf)
        pl_mean.copy_(ck["pl_mean"])
    start, best = resume(ck, path, saved, dist, args) if ck else (0, float("inf"))
    G_run, D_run = G, D  # method: no DDP wrapper (R1 / path-length double backward): step_opt all-reduces gradients

    def state(step, **extra):  # the checkpoint: `saved`, the RNGs, the best FID (resume() loads the same entries)
        return {"format": FORMAT, "method": METHOD, "args": vars(args), "step": step, "rng": rng_state(), "best_fid": best,
                **{k: v.state_dict() for k, v in saved.items()}, **extra, "pl_mean": pl_mean.cpu()}  # method: pl_mean

    def ema_sampler():  # G_ema as eval.py samples it
        return Sampler(G_ema, device, args.psi, noise=args.grid_noise)  # method: truncation psi, grid noise

    fixed_z = Sampler(G_ema, device).latents(64, args.seed + 12345)  # method
    evaluator = training_evaluator(ds, device, args, dist.is_main)
    batches = infinite_batches(ds, batch, args.seed, start, flip=not args.no_flip, rank=dist.rank, world=dist.world,
                               workers=args.workers, device=device)
    progress = Progress(args.iters, start, args.log_every, dist.is_main, out)
    if dist.is_main:
        K = ins.real_q.keys.shape[1] if ins is not None else 0
        print(f"{METHOD}: {len(ds)} images | res {args.res} cfg {args.cfg} batch {args.batch} gamma {args.gamma:g} "
              f"ema {args.ema:g} kimg map {args.map} mbstd {args.mbstd} | G {count_params(G):,} D {count_params(D):,} "
              f"params | aug {args.aug}, x-flips {'off' if args.no_flip else 'on'} | "
              f"insgen {'off' if ins is None else f'on (queue {K}, tau {TAU})'} | {device} x{dist.world}",
              flush=True)  # method
    stop = StopOnInterrupt(dist.is_main)  # Ctrl-C: finish the iteration, save last.pt, exit 130
    if setup:
        setup.done()
    step, sampler = start, None
    try:
        for it in range(start, args.iters):  # it: the iterations done before this one
            step, last = it + 1, it + 1 == args.iters
            real = next(batches)
            losses = train_step(G_run, D_run, opt_G, opt_D, real, args, it, pl_mean, ada, ins, D_ema, opt_Hr, opt_Hf,
                                dist.world)  # method
            ema_update(G_ema, G, ema_beta(args, it))  # parameters averaged, buffers copied (ema_beta: the decay)
            if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:
                check_finite(losses, step, out)
            progress(step, **losses)
            if stop.requested:
                if dist.is_main:
                    save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
                    print(f"interrupted: saved {os.path.join(out, 'ckpt', 'last.pt')} at iteration {step}", flush=True)
                sys.exit(130)
            if not dist.is_main:
                continue
            sample_now = step % args.sample_every == 0 or last
            eval_now = evaluator is not None and (step % args.eval_every == 0 or last)
            sampler = ema_sampler() if sample_now or eval_now else sampler
            if sample_now:
                save_grid(sampler.generate(fixed_z), os.path.join(out, "samples", f"{step:06d}.png"))
                if args.mix_grid:  # method
                    save_style_mix(sampler, os.path.join(out, "samples", f"mix_{step:06d}.png"), args.seed, 5, 5)
            if eval_now:
                m = evaluator(Sampler(G_ema, device, args.psi).sample)  # method: random noise, as NVIDIA's metrics
                log_metrics(out, {"iter": step, **m})
                print(f"eval it {step}: fid {m['fid']:.2f} kid {m['kid']:.4f} ({m['protocol']})", flush=True)
                if m["fid"] < best:
                    best = m["fid"]
                    save_checkpoint(state(step, metrics=m), os.path.join(out, "ckpt", "best.pt"))
            if step % args.ckpt_every == 0 and not last:
                save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
        if dist.is_main:  # the end: last.pt (with --iters 0: the initial networks) and the style-mixing grid
            save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
            save_style_mix(sampler or ema_sampler(), os.path.join(out, "samples", "style_mix.png"), args.seed)
            print(f"done: {out} (samples/, ckpt/last.pt)", flush=True)
    finally:
        stop.restore()
        dist.close()


# -------------------------------------------------------------------------------------- sampling (eval.py contract)
class Sampler(SamplerBase):
    """noise 'random' (default; what NVIDIA's metrics use): per-pixel noise drawn fresh per image, seeded by the latents
    so the same latents give the same images; 'const': the learned constant noise maps (training grids, smooth
    interpolations: eval.py --sampler-opt noise=const; what eval.py --export bakes in). eval.py --project optimises
    W: one w [n, 512] per image, broadcast to every layer (proj_init / proj_generate)."""
    export_opts = {"noise": "const"}
    proj_space = "W"

    def __init__(self, G, device, psi=1.0, noise="random"):
        if noise not in ("random", "const"):
            raise UserError(f"sampler option noise={noise}: use random or const")
        self.G, self.device, self.psi, self.res, self.noise = G.eval(), torch.device(device), psi, G.res, noise

    @property
    def batch_independent(self):  # noise=random: one noise seed per generate() call, from all its latents
        return self.noise != "random"

    def latents(self, n, seed):
        return torch.randn(n, Z_DIM, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def _synth(self, ws, latents):
        """G.synthesis(ws) with this sampler's noise; random noise is seeded by `latents` (reproducible)."""
        if self.noise == "const":
            return self.G.synthesis(ws, "const").float().clamp(-1, 1)
        seed = int(torch.as_tensor(latents.detach().float().cpu().numpy().view(np.int32)).sum()) & 0x7FFFFFFF
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.G.synthesis(ws, "random").float().clamp(-1, 1)

    def latent_doc(self):
        return (f"z [n, {Z_DIM}] ~ N(0, I) (float32); the mapping network (which normalises z) and truncation psi="
                f"{self.psi} are inside")

    @SamplerBase.sampler_grad
    def generate(self, latents):
        latents = latents.to(self.device)
        return self._synth(self.G.mapping(latents, self.psi), latents)

    @torch.no_grad()
    def proj_init(self, latents):
        """W: the (truncated) mapping output of the latents, one w [n, 512] per image."""
        return self.G.mapping(latents.to(self.device), self.psi)[:, 0].clone()

    @SamplerBase.sampler_grad
    def proj_generate(self, w):
        """Images of w [n, 512] broadcast to every layer; random noise is seeded by a constant (fixed while w moves)."""
        ws = w.unsqueeze(1).repeat(1, self.G.synthesis.num_ws, 1)
        return self._synth(ws, torch.zeros(1))

    @SamplerBase.sampler_grad
    def style_mix(self, lat_a, lat_b, coarse=4):
        """Coarse styles (4x4 and 8x8 layers: the first 4 ws) from lat_a, the rest from lat_b (StyleGAN Fig. 3);
        the noise is lat_a's (random) or the constant maps."""
        wa = self.G.mapping(lat_a.to(self.device), self.psi)
        wb = self.G.mapping(lat_b.to(self.device), self.psi)
        c = min(coarse, wa.shape[1] - 1)
        return self._synth(torch.cat([wa[:, :c], wb[:, c:]], 1), lat_a)


def build_generator(a):
    return Generator(a["res"], a["cbase"], a["cmax"], a["map"])


def load_for_sampling(ckpt, device, psi=None, noise="random"):
    """The EMA generator of an insgen.py checkpoint; psi (eval.py --psi) overrides the run's --psi truncation;
    noise (eval.py --sampler-opt noise=const) picks the noise inputs (see Sampler)."""
    check_checkpoint(ckpt, "checkpoint", "insgen")
    G = build_generator(ckpt["args"]).to(device)
    G.load_state_dict(ckpt["G_ema"])
    return Sampler(G, device, float(psi) if psi is not None else ckpt["args"].get("psi", 1.0), noise)


if __name__ == "__main__":
    with user_errors():
        main()
