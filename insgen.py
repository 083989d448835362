"""InsGen: data-efficient image generation with instance discrimination, on a plain-PyTorch StyleGAN2-ADA.

Paper: Ceyuan Yang, Yujun Shen, Yinghao Xu, Bolei Zhou, "Data-Efficient Instance Generation from Instance
Discrimination", NeurIPS 2021. Authors' code: github.com/genforce/insgen, built on NVIDIA's stylegan2-ada-pytorch
(Karras et al., "Training Generative Adversarial Networks with Limited Data", NeurIPS 2020).

Implemented:
- InsGen [Sec. 3]: real and fake instance heads on D's pooled 4x4 features, their momentum copies and a momentum
  discriminator D' (m 0.999), MoCo queues, InfoNCE [Eq. 4]; C_D^r [Eq. 5], C_D^f with the perturbed positive
  G(z + 0.15 eps) [Eq. 6-7], C_G^f [Eq. 8-9], weights 1 / 1 / 0.1 [Eq. 10-11]; the authors' optimizer schedule.
- StyleGAN2-ADA as stylegan2-ada-pytorch's paper256 / auto configs (paper256: G 24,767,458 params = mapping
  2,101,248 + synthesis 22,666,210, D 24,001,089; auto at 256 px: G 23,191,522): skip G, resnet D, lazy R1 and
  path-length regularization, style mixing, G EMA (half-life --ema-kimg), ADA 'bgc' on every D input (R1 through it);
  --no-insgen trains it alone: the ablation.

Deviations (the why: docs/insgen.md and the comments at the code):
- Temperature tau 0.2, as in the authors' code (the paper's text says 2).
- Queue length at least 1 (the authors' int(0.05 n) is empty under 20 images); one --queue sets both queues.
- No x-flips unless --mirror, as NVIDIA's and the authors' train.py (the paper's experiments flip).
- D' is updated after the D phases, not at the start of the next iteration: the same sequence of weights.
- D main phase: the two queries run as one 2B D pass, the two keys as one 2B D' pass: the same math, one graph less.
- --query shared (the paper's reading, not the authors' code): the queries are the adversarial passes' features.
- --ada-linear (not in the reference): p = target x the fraction of training done.
- torchrun: gradients averaged by one flat all_reduce per phase instead of DistributedDataParallel.
- --amp: bf16 autocast of the main passes (no fp16 layers); R1, path length, heads and InfoNCE stay fp32.
- Training grids: random noise seeded by the fixed latents, as the metrics sample (--grid-noise const: NVIDIA's).
- Plain-PyTorch ops instead of NVIDIA's CUDA kernels (the same math); --compile is refused (double backward).

Run:
  python insgen.py --data pokemon --res 256 --cfg auto     (1 GPU; --no-insgen: plain StyleGAN2-ADA)
  torchrun --nproc_per_node 8 insgen.py --data DIR --res 256 --cfg paper256
  python insgen.py --data digits --res 16 --cfg auto --cbase 512 --cmax 64 --batch 32 --r1 0.05 --iters 3000   (CPU)
  python insgen.py --bench 16 --res 256 --cfg auto      (s/iteration of InsGen, --query shared and ADA side by side)
  python eval.py RUN_DIR           (metrics and samples; --psi truncation; --mix a style-mixing grid)
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F

from common.data import infinite_batches, load_dataset
from common.ema import ema_update, make_ema, stylegan_ema_beta
from common.metrics import training_evaluator
from common.output import (check_checkpoint, checkpoint_state, log_metrics, prepare_run_dir, Progress, read_resume,
                           resume, save_checkpoint, save_grid)
from common.run import (add_common_args, autocast, bench as bench_steps, check_finite, count_params, Distributed,
                        seed_everything, SetupInterrupt, StopOnInterrupt, user_errors, UserError)
from common.sampling import check_noise_mode, SamplerBase, save_style_mix

METHOD = "insgen"
ARCH_FLAGS = ("res", "cbase", "cmax", "map")  # fix the networks (after the --cfg table): --resume checks them
Z_DIM = W_DIM = 512
G_REG_EVERY, D_REG_EVERY, ADA_EVERY = 4, 16, 4
PL_WEIGHT, PL_DECAY, PL_SHRINK, STYLE_MIX = 2.0, 0.01, 2, 0.9
TAU, MOMENTUM, PERTURB_STD, LAMBDA_REAL, LAMBDA_FAKE, LAMBDA_G = 0.2, 0.999, 0.15, 1.0, 1.0, 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, res=256, batch=None, iters=None, lr=None)  # None: filled by check_args from the --cfg table
    p.set_defaults(no_flip=True)  # stylegan2-ada / insgen train.py: --mirror defaults to off
    g = p.add_argument_group("algorithm specific")
    g.add_argument("--cfg", choices=["paper256", "auto"], default="paper256", help="stylegan2-ada's config table")
    g.add_argument("--cbase", type=int, help="channels = min(cbase/res, cmax) (cfg: 16384; auto at >= 512 px: 32768)")
    g.add_argument("--cmax", type=int, default=512, help="channel_max")
    g.add_argument("--r1", "--gamma", dest="r1", type=float, default=None,
                   help="R1 weight gamma: (gamma / 2) * mean_b sum (dD(x)/dx)^2, as in adafm.py; NVIDIA's --gamma "
                   "(cfg: paper256 1, auto 0.0002*res^2/batch)")
    g.add_argument("--mbstd", type=int, default=None, help="minibatch-std group size (cfg: paper256 8, auto 4)")
    g.add_argument("--map", type=int, default=None, help="mapping layers (cfg: paper256 8, auto 2)")
    g.add_argument("--ema-kimg", type=float, default=None, help="G EMA half-life in kimg (cfg: 20, auto batch*10/32)")
    g.add_argument("--psi", type=float, default=1.0, help="truncation psi for sample grids and eval.py (1 = none)")
    g.add_argument("--aug", choices=["ada", "noaug"], default="ada", help="ADA 'bgc' augmentation or none")
    g.add_argument("--target", type=float, default=0.6, help="ADA target for E[sign(D(real))]")
    g.add_argument("--ada-kimg", type=float, default=500, help="ADA speed: p can go 0 -> 1 in this many kimg")
    g.add_argument("--ada-linear", action="store_true", help="ramp p linearly from 0 to --target over training")
    g.add_argument("--queue", type=int, default=None, help="MoCo queue length (default 5%% of the images, x2 --mirror)")
    g.add_argument("--mirror", dest="no_flip", action="store_false", default=argparse.SUPPRESS,
                   help="random x-flips of the real images (off by default; the paper's experiments use them)")
    g.add_argument("--no-insgen", action="store_true", help="plain StyleGAN2-ADA (no instance discrimination)")
    g.add_argument("--query", choices=["separate", "shared"], default="separate",
                   help="InsGen queries: D passes of their own (the authors') or the adversarial passes' features")
    g.add_argument("--grid-noise", choices=["random", "const"], default="random", help="noise of the training grids")
    g.add_argument("--mix-grid", action="store_true", help="also write samples/mix_<step>.png style-mixing grids")
    return p.parse_args(argv)


# ---------------------------------------------- the paper's contribution: instance heads, MoCo queues, InfoNCE [Sec. 3]
class Head(nn.Module):
    """phi: Linear(C, 512) -> ReLU -> Linear(512, 128) -> L2 normalize, C = D's 4x4 channels (the authors' CLHead)."""

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
            torch.distributed.all_gather(parts, k.contiguous())
            k = torch.cat(parts)
        K = self.keys.shape[1]
        k = k[-K:].to(self.keys.dtype)
        idx = (self.ptr + torch.arange(k.shape[0], device=k.device)) % K  # any batch size: the write wraps around
        self.keys[:, idx] = k.t()
        self.ptr.copy_((self.ptr + k.shape[0]) % K)


def infonce(q, k, queue, tau=TAU):  # tau 0.2 as the authors' code (the paper's text: 2)
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
        self.real_m, self.fake_m = make_ema(self.real), make_ema(self.fake)  # frozen copies, updated by ema_update
        self.real_q, self.fake_q = Queue(128, K), Queue(128, K)

    def contrast(self, kind, feat, key_feat):
        """(InfoNCE of phi(feat) vs the key phi_m(key_feat) and the queue, the key); `kind`: 'real' or 'fake'. phi_m
        <- m phi_m + (1 - m) phi right before its key, as the authors' CLHead.forward (fake: twice an iteration)."""
        q = getattr(self, kind)(feat)
        with torch.no_grad():
            ema_update(getattr(self, kind + "_m"), getattr(self, kind), MOMENTUM)
            k = getattr(self, kind + "_m")(key_feat)
        return infonce(q, k, getattr(self, kind + "_q").keys.clone()), k

    def load_state_dict(self, sd, *a, **kw):  # a resumed run must build queues of the checkpoint's length
        K, Kc = self.real_q.keys.shape[1], sd["real_q.keys"].shape[1]
        if Kc != K:
            raise UserError(f"the checkpoint has MoCo queues of {Kc} keys, this run builds {K}: pass --queue {Kc} to "
                            "resume it (the default is int(5% of the images), x2 with --mirror)")
        return super().load_state_dict(sd, *a, **kw)


# ---------------------------------- the backbone, StyleGAN2-ADA (stylegan2-ada-pytorch): low-level ops (upfirdn2d ref.)
def setup_filter(taps):  # normalized FIR filter: 2-D outer product under 8 taps ([1,3,3,1] -> 4x4), else 1-D
    f = np.asarray(taps, dtype=np.float64)
    f = np.outer(f, f) if f.size < 8 else f
    return torch.tensor(f / f.sum(), dtype=torch.float32)


def upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0, flip=False):
    """NVIDIA's `_upfirdn2d_ref` (upsample by zero insertion, pad (x0, x1, y0, y1; < 0 crops), FIR filter, downsample)
    as depthwise convs: up as a stride-`up` transposed conv (no products with the inserted zeros), down strided."""
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
        # x: the zero-inserted image's full convolution less its last up-1 rows/cols; the output starts at K-1-p0
        K = f.shape[-1]
        x0, y0 = K - 1 - px0, K - 1 - py0
        wo, ho = W * up + px0 + px1 - K + 1, H * up + py0 + py1 - K + 1
        x = F.pad(x, [max(-x0, 0), max(x0 + wo - x.shape[3], 0), max(-y0, 0), max(y0 + ho - x.shape[2], 0)])
        x0, y0 = max(x0, 0), max(y0, 0)
        return x[:, :, y0: y0 + ho, x0: x0 + wo]
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    f = f if flip else f.flip(list(range(f.ndim)))  # conv2d is a correlation: flip to get a convolution
    if f.ndim == 2:  # strided conv == full conv then keeping every `down`-th pixel
        return F.conv2d(x, f[None, None].expand(C, 1, *f.shape), groups=C, stride=down)
    x = F.conv2d(x, f[None, None, None, :].expand(C, 1, 1, -1), groups=C, stride=(1, down))  # separable
    return F.conv2d(x, f[None, None, :, None].expand(C, 1, -1, 1), groups=C, stride=(down, 1))


def upsample2d(x, f, up=2):
    p0, p1 = (f.shape[-1] + up - 1) // 2, (f.shape[-1] - up) // 2
    return upfirdn2d(x, f, up=up, pad=(p0, p1, p0, p1), gain=up * up)


def downsample2d(x, f, down=2, padding=0, flip=False):
    p0, p1 = padding + (f.shape[-1] - down + 1) // 2, padding + (f.shape[-1] - down) // 2
    return upfirdn2d(x, f, down=down, pad=(p0, p1, p0, p1), flip=flip)


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0):  # down: blur, strided conv; up: transposed conv, blur
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


def f32(x):  # half/bf16 -> fp32; fp32/fp64 unchanged (tests run whole pipelines in fp64)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def bias_act(x, b, act="linear", gain=1.0, clamp=None):  # x + b, lrelu(0.2) * sqrt(2), * gain, clamp +-clamp*gain
    if b is not None:
        x = x + (b.reshape(1, -1, 1, 1) if x.ndim == 4 else b).to(x.dtype)
    act_gain = gain * math.sqrt(2) if act == "lrelu" else gain
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
    if act_gain != 1:
        x = x * act_gain
    if clamp is not None:
        x = x.clamp(-clamp * gain, clamp * gain)
    return x


def modulated_conv2d(x, weight, styles, noise=None, up=1, padding=0, f=None, demodulate=True):
    """StyleGAN2 Eq. 1-3, the reference's non-fused path: x * s, conv, / sqrt(sum_{i,k} (w_oik * s_i)^2 + 1e-8)."""
    x = x * styles.to(x.dtype).reshape(x.shape[0], -1, 1, 1)
    x = conv2d_resample(x, weight.to(x.dtype), f, up=up, padding=padding)
    if demodulate:
        dcoefs = (styles.square() @ weight.square().sum([2, 3]).t() + 1e-8).rsqrt()  # [B, O]
        x = x * dcoefs.to(x.dtype).reshape(x.shape[0], -1, 1, 1)
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


class _GridSample(torch.autograd.Function):
    """Bilinear grid_sample with a differentiable backward, for R1 through ADA (NVIDIA's grid_sample_gradfix.py)."""

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
        # grad_x = A^T grad_out (A: the linear sampling operator of the fixed grid): its own backward is A gg_x
        return (_GridSample.apply(gg_x, grid) if ctx.needs_input_grad[0] else None), None, None


grid_sample = _GridSample.apply


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
        r = self.res
        noise = self.noise_const if noise_mode == "const" else torch.randn(len(x), 1, r, r, device=x.device)
        noise = noise * self.noise_strength
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
        if cin == 0:
            self.const = nn.Parameter(torch.randn(cout, res, res))
        else:
            self.conv0 = SynthLayer(cin, cout, res, up=2)
        self.conv1 = SynthLayer(cout, cout, res)
        self.torgb = ToRGB(cout)
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        self.num_conv = 1 if cin == 0 else 2

    def forward(self, x, img, ws, noise_mode):
        if self.num_conv == 1:  # the 4x4 block starts from the learned constant
            x = self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode)
        y = self.torgb(x, ws[:, self.num_conv])
        img = y if img is None else upsample2d(img, self.resample_filter) + y  # 'skip' architecture
        return x, img


class Synthesis(nn.Module):
    def __init__(self, res, cbase, cmax):
        super().__init__()
        rs = [2 ** i for i in range(2, int(math.log2(res)) + 1)]
        ch = lambda r: min(cbase // r, cmax)  # noqa: E731
        self.blocks = nn.ModuleList([SynthBlock(ch(r // 2) if r > 4 else 0, ch(r), r) for r in rs])
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
        self.mapping = Mapping(self.synthesis.num_ws, map_layers)  # G(z) = synthesis(mapping(z))


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
        ch = lambda r: min(cbase // r, cmax)  # noqa: E731
        rs = [2 ** i for i in range(int(math.log2(res)), 2, -1)]
        self.blocks = nn.ModuleList([DBlock(0 if r == res else ch(r), ch(r), ch(r // 2)) for r in rs])
        self.mbstd, self.feat_dim = mbstd, ch(4)
        self.conv = Conv(ch(4) + 1, ch(4), 3, clamp=clamp)
        self.fc = FC(ch(4) * 16, ch(4), "lrelu")
        self.out = FC(ch(4), 1)

    def forward(self, img, feat_only=False):
        """(logits, features): the 4x4 activation before minibatch-std averaged over space (InsGen's d(.), fp32)."""
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
        """G_inv [B,3,3]: output pixel -> input pixel (origin at the centre). Reflect-pad, up 2x, sample, down 2x."""
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
        return downsample2d(grid_sample(images, grid), self.Hz_geom, padding=-hz_pad * 2, flip=True)

    def forward(self, images):
        with torch.autocast(images.device.type, enabled=False):  # augmentation always in fp32 (or fp64)
            images = f32(images)
            B, C, H, W = images.shape
            dev, p = images.device, self.p
            rand = lambda *s: torch.rand(*s, device=dev)  # noqa: E731
            randn = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
            where = lambda v, other, prob=p: torch.where(rand(v.shape[0], *[1] * (v.ndim - 1)) < prob, v, other)  # noqa
            # Geometric: G_inv maps output pixel coords to input pixel coords.
            i = where(torch.floor(rand(B) * 2), torch.zeros(B, device=dev))
            G_inv = scale2d(1 - 2 * i, 1, dev)  # xflip
            i = where(torch.floor(rand(B) * 4), torch.zeros(B, device=dev))
            G_inv = G_inv @ rotate2d(np.pi / 2 * i, dev)  # rotate90
            t = where((rand(B, 2) * 2 - 1) * 0.125, torch.zeros(B, 2, device=dev))
            G_inv = G_inv @ translate2d(-torch.round(t[:, 0] * W), -torch.round(t[:, 1] * H), dev)  # int translation
            s = where(torch.exp2(randn(B) * 0.2), torch.ones(B, device=dev))
            G_inv = G_inv @ scale2d(1 / s, 1 / s, dev)  # isotropic scale
            p_rot = 1 - math.sqrt(min(max(1 - p, 0.0), 1.0))  # P(pre or post rotation) = p
            th = where((rand(B) * 2 - 1) * np.pi, torch.zeros(B, device=dev), p_rot)
            G_inv = G_inv @ rotate2d(th, dev)  # pre-rotation
            s = where(torch.exp2(randn(B) * 0.2), torch.ones(B, device=dev))
            G_inv = G_inv @ scale2d(1 / s, s, dev)  # anisotropic scale
            th = where((rand(B) * 2 - 1) * np.pi, torch.zeros(B, device=dev), p_rot)
            G_inv = G_inv @ rotate2d(th, dev)  # post-rotation
            t = where(randn(B, 2) * 0.125, torch.zeros(B, 2, device=dev))
            G_inv = G_inv @ translate2d(-t[:, 0] * W, -t[:, 1] * H, dev)  # fractional translation

            images = self.geometric(images, G_inv)

            # Colour: a 4x4 homogeneous matrix per sample acting on RGB.
            I4 = torch.eye(4, device=dev)
            b = where(randn(B) * 0.2, torch.zeros(B, device=dev))
            Cm = _matrix([1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1], device=dev)  # brightness
            c = where(torch.exp2(randn(B) * 0.5), torch.ones(B, device=dev))
            Cm = _matrix([c, 0, 0, 0], [0, c, 0, 0], [0, 0, c, 0], [0, 0, 0, 1], device=dev) @ Cm  # contrast
            v = torch.tensor([1.0, 1, 1, 0], device=dev) / math.sqrt(3)  # luma axis
            i = where(torch.floor(rand(B, 1, 1) * 2), torch.zeros(B, 1, 1, device=dev))
            Cm = (I4 - 2 * torch.outer(v, v) * i) @ Cm  # luma flip
            th = where((rand(B) * 2 - 1) * np.pi, torch.zeros(B, device=dev))
            Cm = rotate3d(v, th, dev) @ Cm  # hue rotation
            s = where(torch.exp2(randn(B, 1, 1) * 1.0), torch.ones(B, 1, 1, device=dev))
            Cm = (torch.outer(v, v) + (I4 - torch.outer(v, v)) * s) @ Cm  # saturation
            images = images.reshape(B, C, H * W)
            images = Cm[:, :3, :3] @ images + Cm[:, :3, 3:]
            return images.reshape(B, C, H, W)


class ADA:
    """Adaptive p: every 4 iterations p += sign(E[sign(D(real))] - target) * batch*4 / (ada_kimg*1000), p >= 0."""

    def __init__(self, pipe, target=0.6, kimg=500, linear=False):
        self.pipe, self.target, self.kimg, self.linear = pipe, target, kimg, linear
        self.acc, self.rt = torch.zeros(2), 0.0  # [sum of signs, count] since the last update; E[sign] at it

    def accumulate(self, logits):
        n = torch.tensor(float(logits.numel()), device=logits.device)
        self.acc = self.acc.to(logits.device) + torch.stack([logits.detach().sign().sum().float(), n])

    def update(self, batch, world=1, progress=None):
        acc, self.acc = self.acc, torch.zeros_like(self.acc)
        if world > 1:
            torch.distributed.all_reduce(acc)
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
    """G(z); from a random layer on, the ws of a second latent (p 0.9); moves w_avg with z's w (NVIDIA's run_G)."""
    ws = G.mapping(z, update_w_avg=True)
    cutoff = int(torch.randint(1, ws.shape[1], ())) if float(torch.rand(())) < STYLE_MIX else ws.shape[1]
    z2 = torch.randn_like(z)
    if cutoff < ws.shape[1]:
        ws = torch.cat([ws[:, :cutoff], G.mapping(z2)[:, cutoff:]], 1)
    return G.synthesis(ws), ws


def step_opt(opt, params, world):
    """Average the gradients over ranks, zero NaN/inf, step. One flat all_reduce (NVIDIA's stylegan3 loop), not DDP,
    which does not combine with the double backward of R1 / path length and several D passes per phase."""
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= world
        for g, f in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(f.view_as(g))
    for g in grads:
        torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)
    opt.step()


def train_step(G, D, opt_G, opt_D, real, args, it, pl_mean, ada=None, ins=None, D_ema=None, opt_Hr=None, opt_Hf=None,
               world=1):
    """Iteration `it` (0-based): Gmain, [Gpl], Dmain, [Dr1], each its own backward and step, then D' and ADA. ins,
    D_ema (D'), opt_Hr, opt_Hf: None for --no-insgen; ada: None for --aug noaug; pl_mean: updated in place."""
    B, dev, amp = real.shape[0], real.device, args.amp
    aug = ada.pipe if ada is not None else (lambda x: x)
    z_main, z_pl, z_d, _ = torch.randn(4 * B, Z_DIM, device=dev).split(B)
    L = {}

    # Gmain: non-saturating loss softplus(-D(aug(G(z)))) + lambda_G * C_G^f (Eq. 2, 8-9, 11).
    G.requires_grad_(True)
    opt_G.zero_grad(set_to_none=True)
    with autocast(dev, amp):
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
    if ins is not None:  # the heads also got gradients in the G phase: dropped here
        opt_Hr.zero_grad(set_to_none=True)
        opt_Hf.zero_grad(set_to_none=True)
    shared = ins is not None and args.query == "shared"
    with autocast(dev, amp):
        with torch.no_grad():
            img, _ = run_G(G, z_d)
        logits_f, feat_f = D(aug(img))
        loss_f = F.softplus(logits_f).mean()
    if not shared:  # as the authors: the fake graph goes first (at most 3 batch-B D graphs alive, not 4)
        loss_f.backward()
    with autocast(dev, amp):
        logits_r, feat_r = D(aug(real))
        if ada is not None:
            ada.accumulate(logits_r)
        loss = F.softplus(-logits_r).mean()
        L["loss_D"] = (loss_f + loss).detach()
        if ins is not None:  # queries: D's features of a view of x and of G(z), with gradient into D and heads
            if shared:  # the views the adversarial passes just scored (the authors: views of their own)
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
        ins.real_q.push(k_r, world)
        ins.fake_q.push(enq_f, world)

    # Dr1: R1 = r1/2 ||grad_x D(aug(x))||^2 w.r.t. the un-augmented reals, every 16 steps, loss x interval.
    if it % D_REG_EVERY == 0 and args.r1 > 0:
        opt_D.zero_grad(set_to_none=True)
        x = real.detach().requires_grad_(True)
        logits, _ = D(aug(x))
        if ada is not None:
            ada.accumulate(logits)
        grad, = torch.autograd.grad(logits.sum(), x, create_graph=True)
        r1 = grad.square().sum([1, 2, 3]) * (args.r1 / 2)
        (logits * 0 + r1).mean().mul(D_REG_EVERY).backward()
        step_opt(opt_D, D.parameters(), world)
        L["r1"] = r1.mean().detach()
    D.requires_grad_(False)

    # D' (0.999) once per iteration: the authors update it at the start of the next one, the same sequence of weights
    if ins is not None:
        ema_update(D_ema, D, MOMENTUM)
    if ada is not None and (it + 1) % ADA_EVERY == 0:
        ada.update(B * world, world, progress=(it + 1) / args.iters)
    if ada is not None:
        L["p"] = ada.pipe.p
    return L


def ema_beta(args, it):  # the G EMA's decay after iteration it + 1: half-life --ema-kimg, ramp-up with cfg auto
    return stylegan_ema_beta(args.batch, args.ema_kimg, it * args.batch, args.rampup)


# ------------------------------------------------------------------------------------------------- training run
# main -> check_args -> bench | run; run() is the other scripts' except the lines marked `# method`.
def default_queue(n_data, mirror):  # the authors' train.py: int(0.05 n), x2 with --mirror; at least 1 (theirs: 0)
    return max(1, int(0.05 * n_data)) * (2 if mirror else 1)


def check_args(args, world=None):
    """Every flag, before any data is read: the --cfg table (stylegan2-ada-pytorch's cfg_specs) fills the unset ones."""
    if args.compile:
        raise UserError("--compile is not supported by insgen.py: R1 and path length need double backward; drop it")
    res, world = args.res, world or int(os.environ.get("WORLD_SIZE", "1"))
    if res < 8 or res > 1024 or res & (res - 1):
        raise UserError(f"--res {res} is not supported: use a power of two from 8 to 1024")
    if args.cfg == "paper256":
        c = dict(batch=64, mbstd=8, cbase=16384, r1=1.0, ema_kimg=20.0, rampup=None, map=8, lr=0.0025)
    else:  # 'auto': batch = gpus*min(4096/res, 32) capped at 64, r1 from a heuristic, mbstd fixed at 4
        b = max(min(world * min(4096 // res, 32), 64), world)
        c = dict(batch=b, mbstd=min(b // world, 4), cbase=32768 if res >= 512 else 16384, map=2,
                 r1=0.0002 * res ** 2 / b, ema_kimg=b * 10 / 32, rampup=0.05, lr=0.002 if res >= 1024 else 0.0025)
    for k, v in c.items():  # rampup is not a flag: always the table's
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.iters is None:
        args.iters = 25000 * 1000 // args.batch  # the reference's 25,000 kimg
    if args.queue is not None and args.queue < 1:
        raise UserError(f"--queue {args.queue}: the MoCo queue needs at least 1 key (leave it out for 5% of the data)")
    per_rank = args.batch // world
    if per_rank and args.batch % world == 0 and per_rank % min(args.mbstd, per_rank):
        raise UserError(f"per-process batch {per_rank} is not a multiple of the minibatch-std group --mbstd "
                        f"{args.mbstd}")
    return args


def lazy_adam(params, lr, every, fused=False):  # lazy regularization (StyleGAN2 App. B): lr, betas ** (k/(k+1))
    r = every / (every + 1)
    return torch.optim.Adam(params, lr=lr * r, betas=(0.0 ** r, 0.99 ** r), eps=1e-8, fused=fused)


def build(args, device, n_data, world=1):
    """G, D, Adams, ADA (None: --aug noaug), InsGen, D' and the heads' Adams (None: --no-insgen), same on all ranks."""
    torch.manual_seed(args.seed)
    G = Generator(args.res, args.cbase, args.cmax, args.map).to(device)
    D = Discriminator(args.res, args.cbase, args.cmax, args.mbstd).to(device)
    fused = torch.device(device).type == "cuda"
    opt_G = lazy_adam(G.parameters(), args.lr, G_REG_EVERY, fused)
    opt_D = lazy_adam(D.parameters(), args.lr, D_REG_EVERY, fused)
    ada = ADA(AugmentPipe().to(device), args.target, args.ada_kimg, args.ada_linear) if args.aug == "ada" else None
    ins = D_ema = opt_Hr = opt_Hf = None
    if not args.no_insgen:
        K = args.queue if args.queue is not None else default_queue(n_data, not args.no_flip)
        ins = InsGenModule(D.feat_dim, K).to(device)
        D_ema = make_ema(D)
        # the authors' training_loop: the real head's Adam has D's lazy ratio 16/17, the fake head's G's 4/5
        opt_Hr = lazy_adam(ins.real.parameters(), args.lr, D_REG_EVERY, fused)
        opt_Hf = lazy_adam(ins.fake.parameters(), args.lr, G_REG_EVERY, fused)
    G.requires_grad_(False)
    D.requires_grad_(False)
    if world > 1:
        for t in (t for m in (G, D, ins, D_ema) if m is not None for t in list(m.parameters()) + list(m.buffers())):
            torch.distributed.broadcast(t, 0)
    return G, D, opt_G, opt_D, ada, ins, D_ema, opt_Hr, opt_Hf


BENCH = {"insgen": (False, "separate"), "insgen --query shared": (False, "shared"),  # name: (no_insgen, query)
         "ada (--no-insgen)": (True, "separate")}


def bench(args):
    """--bench N: InsGen, --query shared and plain ADA in turns of 16 iterations (one lazy-regularization cycle)."""
    ddp = Distributed(args.device)
    device, batch = ddp.device, ddp.per_rank_batch(args.batch)
    real = torch.rand(batch, 3, args.res, args.res, device=device) * 2 - 1

    def variant(no_insgen, query):  # one step(): train_step + EMA, the networks built as run() builds them
        a = argparse.Namespace(**{**vars(args), "no_insgen": no_insgen, "query": query})
        G, D, opt_G, opt_D, ada, ins, D_ema, opt_Hr, opt_Hf = build(a, device, 2000, ddp.world)
        G_ema, pl_mean, its = make_ema(G), torch.zeros([], device=device), iter(range(1 << 62))

        def step():
            it = next(its)
            train_step(G, D, opt_G, opt_D, real, a, it, pl_mean, ada, ins, D_ema, opt_Hr, opt_Hf, ddp.world)
            ema_update(G_ema, G, ema_beta(a, it))
        return step

    steps = {name: variant(*v) for name, v in BENCH.items()}
    what = f"res {args.res} cfg {args.cfg} cbase {args.cbase} cmax {args.cmax} {'amp' if args.amp else 'fp32'}"
    return bench_steps(steps, args.bench, device, args.batch, what=what, block=D_REG_EVERY)


def main(argv=None):
    args = parse_args(argv)
    with user_errors(), SetupInterrupt() as setup:  # an error: one line, exit 2; Ctrl-C before the loop: exit 130
        check_args(args)
        if args.bench:
            return bench(args)
        run(args, setup)


def run(args, setup=None):
    ddp = Distributed(args.device)
    device, batch = ddp.device, ddp.per_rank_batch(args.batch)
    ck, path = read_resume(args, METHOD, ARCH_FLAGS)  # readable, same method and networks: checked first
    for key, name, off in (("ins", "InsGen", args.no_insgen), ("ada", "ADA", args.aug == "noaug")):  # method
        if ck and key in ck and off:  # resuming without them would silently drop their state
            raise UserError(f"checkpoint {path} trains with {name}; resuming without it would drop its state: remove "
                            "--no-insgen / --aug noaug, or start a new --out")
    seed_everything(args.seed + ddp.rank)
    ds = load_dataset(args.data, args.res, args.data_root, args.crop)
    out = prepare_run_dir(args, METHOD, ddp.is_main)
    G, D, opt_G, opt_D, ada, ins, D_ema, opt_Hr, opt_Hf = build(args, device, len(ds), ddp.world)  # method
    G_ema = make_ema(G)
    pl_mean = ck["pl_mean"].to(device) if ck else torch.zeros([], device=device)  # method: path-length running mean
    seed_everything(args.seed * ddp.world + ddp.rank)  # method: one RNG stream per rank after the shared init
    saved = {k: v for k, v in dict(G=G, D=D, G_ema=G_ema, opt_G=opt_G, opt_D=opt_D, ada=ada, ins=ins, D_ema=D_ema,
                                   opt_Hr=opt_Hr, opt_Hf=opt_Hf).items() if v is not None}  # checkpoint entry -> object
    start, best = resume(ck, path, saved, ddp, args) if ck else (0, float("inf"))

    def state(step, **extra):  # the checkpoint (resume() loads the same entries)
        return checkpoint_state(METHOD, args, step, saved, best_fid=best, pl_mean=pl_mean.cpu(), **extra)

    def ema_sampler():  # G_ema as eval.py samples it
        return Sampler(G_ema, device, args.psi, noise=args.grid_noise)  # method: truncation psi, grid noise

    fixed_z = Sampler(G_ema, device).latents(64, args.seed + 12345)  # method
    evaluator = training_evaluator(ds, device, args, ddp.is_main)
    batches = infinite_batches(ds, batch, args.seed, start, flip=not args.no_flip, rank=ddp.rank, world=ddp.world,
                               workers=args.workers, device=device)
    progress = Progress(args.iters, start, args.log_every, ddp.is_main, out)
    if ddp.is_main:  # method
        print(f"{METHOD}: {len(ds)} images | res {args.res} cfg {args.cfg} batch {args.batch} r1 {args.r1:g} ema-kimg "
              f"{args.ema_kimg:g} | G {count_params(G):,} D {count_params(D):,} params | aug {args.aug} | x-flips "
              f"{not args.no_flip} | insgen {'off' if ins is None else f'queue {ins.real_q.keys.shape[1]}'} | "
              f"{device} x{ddp.world}", flush=True)
    stop = StopOnInterrupt(ddp.is_main)  # Ctrl-C: finish the iteration, save last.pt, exit 130
    if setup:
        setup.done()
    step, sampler = start, None
    try:
        for it in range(start, args.iters):  # it: the iterations done before this one
            step, last = it + 1, it + 1 == args.iters
            real = next(batches)
            losses = train_step(G, D, opt_G, opt_D, real, args, it, pl_mean, ada, ins, D_ema, opt_Hr, opt_Hf,
                                ddp.world)  # method: no DDP wrapper (step_opt all-reduces the gradients)
            ema_update(G_ema, G, ema_beta(args, it))  # parameters averaged, buffers copied
            if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:
                check_finite(losses, step, out)
            progress(step, **losses)
            if stop.requested:
                if ddp.is_main:
                    save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
                    print(f"interrupted: saved {os.path.join(out, 'ckpt', 'last.pt')} at iteration {step}", flush=True)
                sys.exit(130)
            if not ddp.is_main:
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
        if ddp.is_main:  # the end: last.pt (with --iters 0: the initial networks) and the style-mixing grid
            save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
            save_style_mix(sampler or ema_sampler(), os.path.join(out, "samples", "style_mix.png"), args.seed)
            print(f"done: {out} (samples/, ckpt/last.pt)", flush=True)
    finally:
        stop.restore()
        ddp.close()


# -------------------------------------------------------------------------------------- sampling (eval.py contract)
class Sampler(SamplerBase):
    """noise 'random' (default, as NVIDIA's metrics): seeded by the latents; 'const': the learned constant maps (what
    eval.py --export bakes in). eval.py --project optimises W: one w [n, 512] per image, broadcast to every layer."""
    export_opts = {"noise": "const"}
    proj_space = "W"

    def __init__(self, G, device, psi=1.0, noise="random"):
        self.G, self.device, self.psi, self.res = G.eval(), torch.device(device), psi, G.res
        self.noise = check_noise_mode(noise)

    @property
    def batch_independent(self):  # noise=random: one noise seed per generate() call, from all its latents
        return self.noise != "random"

    def latents(self, n, seed):
        return torch.randn(n, Z_DIM, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def _synth(self, ws, latents):  # G.synthesis(ws) with this sampler's noise, random noise seeded by `latents`
        if self.noise == "const":
            return self.G.synthesis(ws, "const").float().clamp(-1, 1)
        seed = int(torch.as_tensor(latents.detach().float().cpu().numpy().view(np.int32)).sum()) & 0x7FFFFFFF
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.G.synthesis(ws, "random").float().clamp(-1, 1)

    def latent_doc(self):
        return f"z [n, {Z_DIM}] ~ N(0, I) (float32); the mapping network and truncation psi={self.psi} are inside"

    @SamplerBase.sampler_grad
    def generate(self, latents):
        latents = latents.to(self.device)
        return self._synth(self.G.mapping(latents, self.psi), latents)

    @torch.no_grad()
    def proj_init(self, latents):  # W: the (truncated) mapping output, one w [n, 512] per image
        return self.G.mapping(latents.to(self.device), self.psi)[:, 0].clone()

    @SamplerBase.sampler_grad
    def proj_generate(self, w):  # random noise seeded by a constant: fixed while w moves
        return self._synth(w.unsqueeze(1).repeat(1, self.G.synthesis.num_ws, 1), torch.zeros(1))

    @SamplerBase.sampler_grad
    def style_mix(self, lat_a, lat_b, coarse=4):
        """The first 4 ws (4x4 and 8x8 layers) from lat_a, the rest from lat_b (StyleGAN Fig. 3); lat_a's noise."""
        wa = self.G.mapping(lat_a.to(self.device), self.psi)
        wb = self.G.mapping(lat_b.to(self.device), self.psi)
        c = min(coarse, wa.shape[1] - 1)
        return self._synth(torch.cat([wa[:, :c], wb[:, c:]], 1), lat_a)


def build_generator(a):
    return Generator(a["res"], a["cbase"], a["cmax"], a["map"])


def load_for_sampling(ckpt, device, psi=None, noise="random"):
    """The EMA generator of a checkpoint; psi (eval.py --psi) overrides the run's --psi; noise: see Sampler."""
    check_checkpoint(ckpt, f"given to {METHOD}.load_for_sampling", METHOD)  # "checkpoint given to ... has format 1"
    G = build_generator(ckpt["args"]).to(device)
    G.load_state_dict(ckpt["G_ema"])
    return Sampler(G, device, float(psi) if psi is not None else ckpt["args"].get("psi", 1.0), noise)


if __name__ == "__main__":
    main()
