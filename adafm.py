"""AdaFM: "On Leveraging Pretrained GANs for Limited-Data Generation" (Zhao, Cong & Carin, ICML 2020).

Transfer the low-level layers of a GP-GAN pretrained on ImageNet (Mescheder et al. 2018, "resnet2", 128 px) to a
small target set: the general part (G groups 3-5 + conv_img = "G4", D conv_img + group 0 = "D2") is copied and
FROZEN; the generator's specific part is replaced by a small style-based head (Fig. 1(g)); the frozen 3x3 filters
are modulated by AdaFM, W' = gamma * W + beta with gamma, beta in R^{C_out x C_in} (eq. 2, Fig. 1(h)).

Implemented (one file): source GP-GAN G/D (G 100,535,747 / D 108,260,776 params with 1000 classes); the target
G = mapping(8 x Linear+LReLU) + fc(z) + two style blocks (4->8->16, AdaIN + noise + shortcut) + per-channel rescaling
+ frozen G4 with AdaFM on its 12 3x3 convs (860,160 params); target D = frozen D2 + source groups 1-5 (fine-tuned) +
new fc(16384 -> 1). Non-saturating loss + R1 (10 * E||dD(x)/dx||^2), Adam(1e-4, betas (0, 0.99)), batch 16,
EMA 0.999, 60k iterations, AdaFM gamma/beta trained only from iteration --adafm-start (10k). As in the authors'
train loop (GANTransferLimitedData, Flower_[h]our.py + gan_training/train.py) each iteration runs the G step first
and then the D step on that G step's fakes, detached (one z per iteration; --step-order). The generator has no
BatchNorm (GP-GAN blocks have none; the head uses InstanceNorm and LayerNorm, per sample, no running stats), so EMA
samples do not depend on batch statistics and the EMA copies parameters only.
--mode (the paper's comparisons): adafm (Fig. 1(h), default) | fs (filter selection: gamma, beta in R^{C_out}) |
  smallhead (Fig. 1(g), no AdaFM) | gphead (Fig. 1(f): frozen G4D2 + the source's own head, trainable) |
  transfergan (source architecture, everything fine-tuned) | scratch (Fig. 1(h) architecture, random init, all
  trainable) | gpgan (source architecture, random init, Table 1(a)) | pretrain (train a GP-GAN source yourself;
  --labels auto makes it class-conditional; its checkpoint is accepted by --source like the official one).

Source checkpoint: --source PATH (the authors' `imagenet-8c505f47.pt`: keys generator / discriminator /
generator_test with `module.` prefixes, or any adafm.py checkpoint of a GP-GAN-architecture mode, e.g. pretrain);
without --source it is downloaded once from SOURCE_URL into --cache-dir (torch hub dir). As the authors do, the
non-EMA `generator` is transferred and every key of an embedding or fc layer is skipped: a model receives every
resnet_* and conv_img tensor it has (the target's style head and both fc layers are new). The keys loaded / frozen /
new are printed and written to <out>/transfer.json; the first missing or mis-shaped key stops the run with one line.

Resolution reduction (documented, exact at 128): like GAN_stability's resnet2 the first feature map is s0 x s0 with
s0 = res / 32, so every resolution (32 to 1024, powers of 2) keeps ALL six groups, their channels and their names; only
the spatial sizes and the two fc layers change. At 32 px: G 1 -> 2 -> 4 | 8 -> 16 -> 32 (head | general part), the
style head maps 1 -> 2 -> 4 and the LayerNorm acts on 4 x 4; D groups run at 32, 16, 8, 4, 2, 1. Conv shapes do not
depend on s0, so the official 128 px source also transfers to 32/64 px targets. Channel width: --nf (authors 64;
channels are nf x (16,16,8,4,2,1) in G and the head has 8*nf); tests use --nf 4-8 with small --z-dim/--w-dim.

Deviations / choices (all visible in the code):
- Per-channel rescaling before the frozen blocks (authors: LayerNorm([16,16]); out = 0.01 n + n.detach() w_c + b_c,
  w_c init ~1000): --head-scale auto (default) sets w_c / b_c to the per-channel std / mean of the SOURCE head's
  16x16 features (32 random z), so any source (official or --mode pretrain) is fed at its own scale; a number sets
  w_c to it and b_c = 0 (e.g. 1000 for the authors' constant). Without a source (scratch) auto means 1.
- The head uses plain nn.Linear/ConvTranspose layers, as the authors' code does (its equal_lr is a no-op). The 8
  mapping linears and the AdaIN style linears are initialised as the authors' EqualLinear, weight N(0, 0.1^2) and
  bias 0 (AdaIN bias then 1 / 0), with the std scaled by sqrt(256 / w_dim) so that narrow --w-dim keeps the same
  per-layer gain (exactly 0.1 at the paper's 256). At init (z, w 256) this gives w RMS ~2.8 and AdaIN gamma std ~4.4,
  as the authors' module does; --style-init he restores our earlier choice (He mapping, PyTorch-default AdaIN: w RMS
  ~1.05, gamma std ~0.6). AdaIN's value is gamma * IN(x) + beta, but like the authors we send the gradient to x
  through clamp(gamma, -1, 1) (gamma itself gets the full gradient); this is not switchable.
  Our head has 25,185,792 params; the authors' count of 25,185,793 has one more because their G also holds an unused
  label embedding `small_embedding` = nn.Embedding(1, 1) (Flowers.yaml embed_size 1; its output is never used).
- Step order (--step-order): g_first (default for every target mode, AdaFM code): G step, then the D step on the
  G step's detached fakes (generated before the G update). d_first (default for --mode pretrain, GAN_stability's
  train.py): D step on fresh fakes, then the G step on a new z. The EMA update follows both steps (the authors
  update it between them; the D step does not touch G, so it is the same).
- scratch uses plain convs (AdaFM on trainable filters is redundant). fs/adafm's gamma/beta start at 1/0.
- Real data: --crop center (paper), random flip, + U[0, 1/128) dequantization noise (GAN_stability).
- --r1 defaults to the paper's 10, set for 128 px. R1 sums the squared gradient over pixels, so a D that sees the
  same picture at res r has ~(128 / r)^2 times the squared gradient norm, and one weight smooths D ~16x harder at
  32 px. Below 128 px use 10 * (res / 128)^2 (0.625 at 32 px, 2.5 at 64): the 32 px digits target then draws varied
  digits (FID 169.7 at 3,000 iterations) where 10 leaves two modes (225.5; README Results).
- --mode pretrain uses GAN_stability's RMSprop(lr, alpha 0.99, eps 1e-8) and batch 128 by default; the official
  --iters stays 60000 (set it for your source dataset). Real and fake go through D as one batch (no BN, same result).
- Style mixing (Fig. 12): the fc input z and the styles of blocks < --mix-block come from sample a, the styles of
  blocks >= --mix-block from b; --style-mix N: an N x N samples/style_mix.png at the end, the grid of eval.py --mix
  (common.utils.save_style_mix; eval.py --mix [--sampler-opt mix_block=0]).
  Sampling noise: during training the noise maps are fresh torch.randn; when sampling, every sample's maps come
  from its own generator seeded by a hash of its latent (common.utils.per_sample_noise), so an image is a function
  of its latent alone: the same with any batch size (SamplerBase.sample chunks) and no two samples share a noise
  map. A conditional source (--mode pretrain --labels auto) is sampled with class = latent hash mod nlabels.
- FID/KID (--eval-every) use common.metrics' protocol (TF Inception, all real images); the paper's FIDs used
  torchvision's Inception on 10,000 / 8,189 / 8,144 / 7,350 real and as many generated images (CelebA / Flowers /
  Cars / Cathedral, appendix A), so the absolute numbers are not comparable.
- DDP: the G loss calls the unwrapped D and the d_first D step the unwrapped G (no-grad), and G's DDP wrapper is rebuilt
  when AdaFM switches on, so requires_grad toggling is safe; --amp is bf16 autocast; channels_last on CUDA.
- CUDA speed: fused Adam (CUDA only; the CPU keeps the for-each Adam), cuDNN autotuner, the in-memory images kept on
  the GPU, pinned non-blocking copies, host syncs only at --log-every steps (common/); --compile (torch.compile)
  takes G only: R1 differentiates D twice, which torch.compile's autograd does not support. One H200: 128 px batch
  16 0.148 s/iteration fp32, 0.137 --amp (README "Measured on one H200").
- The generator has no buffers (no BatchNorm), so its EMA is an average of the parameters only.

Run (from the repo root):
  python adafm.py --data flowers --res 128 --z-dim 64 --source imagenet-8c505f47.pt   # the paper's "Our" (60k its;
                                                      z 64 for Flowers/Cars/Cathedral, the default 256 for CelebA)
  python adafm.py --mode pretrain --data digits --res 32 --nf 8 --z-dim 32 --w-dim 32 --batch 32 --iters 6000 --out runs/src
  python adafm.py --data digits --res 32 --nf 8 --z-dim 32 --w-dim 32 --batch 16 --iters 3000 --adafm-start 500 \
                  --r1 0.625 --source runs/src/ckpt/last.pt --out runs/adafm-digits
    (the CPU toy, ~42 + 10 min on one thread: varied digit shapes, FID 169.7; --seed 1 / 2: three shapes each, 199.4 /
    174.6; --mode scratch with the same flags collapses to one shape, 332.2: README Results. The source itself stays
    collapsed (one blurred shape for every z, the GAN_stability recipe at any budget or --r1 tried on a CPU) but its
    filters transfer; from other sources (500 iterations; 3,000 at --r1 1 --lr 3e-4) the target collapses too. The EMA
    samples of a run under ~2,000 iterations are mostly the initial G: 0.999^500 = 61 %.)
Benchmark (s/iteration, batch 16, 128 px, random weights, AdaFM on, no data/source needed; measured: README):
  for m in adafm scratch transfergan; do python adafm.py --bench 3 --mode $m; done
  (frozen filters need no weight gradients, so adafm is the cheapest step)
"""
import argparse
import itertools
import json
import math
import os
import socket
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import batch_indices, infinite_batches, list_images, load_dataset, resolve_folder, to_device
from common.ema import ema_update, make_ema
from common.metrics import training_evaluator
from common.output import (FORMAT, check_checkpoint, check_flags, load_checkpoint, log_metrics, prepare_run_dir,
                           Progress, read_resume, resume, rng_state, save_checkpoint, save_grid)
from common.run import (add_common_args, autocast, check_finite, compiled, count_params, Distributed, seed_everything,
                        SetupInterrupt, StopOnInterrupt, time_steps, user_errors, UserError)
from common.sampling import check_noise_mode, latent_seeds, per_sample_noise, SamplerBase, save_style_mix

METHOD = "adafm"
SOURCE_URL = "https://s3.eu-central-1.amazonaws.com/avg-projects/gan_stability/models/imagenet-8c505f47.pt"
# mode -> (G head, filter modulation, transfer from a source, freeze the G4D2 general part)
MODES = {"adafm": ("style", "adafm", True, True), "fs": ("style", "fs", True, True),
         "smallhead": ("style", None, True, True), "gphead": ("gp", None, True, True),
         "transfergan": ("gp", None, True, False), "scratch": ("style", None, False, False),
         "gpgan": ("gp", None, False, False), "pretrain": ("gp", None, False, False)}
G_CH = [(16, 16), (16, 16), (16, 8), (8, 4), (4, 2), (2, 1)]   # G group k: resnet_k_0 in->out, resnet_k_1 out->out (x nf)
D_CH = [(1, 2), (2, 4), (4, 8), (8, 16), (16, 16), (16, 16)]   # D group k: resnet_k_0 in->in, resnet_k_1 in->out (x nf)
G_GENERAL = [f"resnet_{k}_{i}" for k in (3, 4, 5) for i in (0, 1)] + ["conv_img"]   # "G4"
D_GENERAL = ["conv_img", "resnet_0_0", "resnet_0_1"]                                  # "D2"
ARCH_FLAGS = ("mode", "res", "nf", "z_dim", "w_dim", "embed_dim")  # fix the networks (--resume checks them,
# and nlabels once the data is read)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, res=128, batch=None, iters=60000, lr=1e-4, sample_every=1000, ckpt_every=1000)
    p.set_defaults(crop="center")  # paper: resize, centre crop
    g = p.add_argument_group("algorithm specific")
    g.add_argument("--mode", choices=list(MODES), default="adafm", help="model/ablation (see the module docstring)")
    g.add_argument("--source", default=None, help="source checkpoint: the authors' imagenet-8c505f47.pt or a --mode "
                   "pretrain checkpoint (default: download the official one into --cache-dir)")
    g.add_argument("--cache-dir", default=None,
                   help="download cache for the official source (default <torch hub>/checkpoints)")
    g.add_argument("--nf", type=int, default=64, help="channel width unit (GP-GAN: 64; channels nf*16 at the top)")
    g.add_argument("--z-dim", type=int, default=256, help="latent size (paper: 256 CelebA, 64 small sets; source 256)")
    g.add_argument("--w-dim", type=int, default=256, help="style (w) size of the mapping network")
    g.add_argument("--embed-dim", type=int, default=256, help="label embedding size of a conditional source (pretrain)")
    g.add_argument("--labels", choices=["none", "auto"], default="none", help="--mode pretrain: 'auto' = class-"
                   "conditional (digits classes, or the first-level subfolders of --data); 'none' = unconditional")
    g.add_argument("--adafm-start", type=int, default=10000,
                   help="AdaFM/FS gamma, beta are trained from this iteration on")
    g.add_argument("--r1", type=float, default=10.0, help="R1 weight: r1 * mean_b sum (dD(x)/dx)^2 on reals (the "
                   "paper's 10 is for 128 px; smaller images: 10 * (res / 128)^2, see the docstring)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the generator used for samples/eval")
    g.add_argument("--head-scale", default="auto", help="init of the per-channel rescaling w_c: auto (source feature "
                   "std/mean; 1 without a source) or a number (authors: ~1000 for the ImageNet source)")
    g.add_argument("--step-order", choices=["auto", "g_first", "d_first"], default="auto",
                   help="g_first: G step, then the D step on that step's detached fakes (AdaFM code); d_first: D step "
                   "on fresh fakes, then the G step on new z (GAN_stability); auto: d_first for pretrain, else g_first")
    g.add_argument("--style-init", choices=["authors", "he"], default="authors",
                   help="init of the mapping and AdaIN style linears: authors = N(0, std 0.1 * sqrt(256 / w_dim)) "
                   "(exactly the authors' 0.1 at w_dim 256), bias 0; he = He-init mapping + PyTorch-default AdaIN")
    g.add_argument("--mix-block", type=int, default=1, help="style mixing: style blocks >= this take sample b's style")
    g.add_argument("--style-mix", type=int, default=5,
                   help="write samples/style_mix.png (N x N, paper Fig. 12) at the end; 0 = off")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 128 if args.mode == "pretrain" else 16
    return args


# ------------------------------------------------ the paper's contribution: AdaFM [eq. 2, Fig. 1(b)], the style head
def actvn(x):
    return F.leaky_relu(x, 0.2)


class ModConv2d(nn.Conv2d):
    """3x3 conv. mod='adafm': W' = gamma * W + beta, gamma/beta [C_out, C_in, 1, 1] (eq. 2, Fig. 1(b));
    mod='fs': the rank-1 case, gamma/beta [C_out, 1, 1, 1] (filter selection, Fig. 1(d)); None: plain conv.
    W and the bias keep GP-GAN's names, so source keys load unchanged."""

    def __init__(self, cin, cout, mod=None):
        super().__init__(cin, cout, 3, padding=1)
        self.mod = mod
        if mod:
            shape = (cout, cin if mod == "adafm" else 1, 1, 1)
            self.gamma = nn.Parameter(torch.ones(shape))
            self.beta = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        w = self.weight * self.gamma + self.beta if self.mod else self.weight
        return F.conv2d(x, w, self.bias, padding=1)


class ResnetBlock(nn.Module):
    """GP-GAN block: x_s + 0.1 * conv_1(lrelu(conv_0(lrelu(x)))), hidden = min(fin, fout), 1x1 shortcut if fin != fout."""

    def __init__(self, fin, fout, mod=None):
        super().__init__()
        hidden = min(fin, fout)
        self.conv_0, self.conv_1 = ModConv2d(fin, hidden, mod), ModConv2d(hidden, fout, mod)
        self.conv_s = nn.Conv2d(fin, fout, 1, bias=False) if fin != fout else None

    def forward(self, x):
        xs = x if self.conv_s is None else self.conv_s(x)
        return xs + 0.1 * self.conv_1(actvn(self.conv_0(actvn(x))))


def style_linear(fin, fout, init, w_dim):
    """Linear of the mapping / AdaIN. init 'authors': weight N(0, std 0.1 * sqrt(256 / w_dim)), bias 0 (the authors'
    EqualLinear: N(0, 0.1), their equal_lr being a no-op, at style_dim 256); 'he': He (LReLU 0.2), bias 0;
    'torch': PyTorch's default."""
    lin = nn.Linear(fin, fout)
    if init == "authors":
        nn.init.normal_(lin.weight, 0.0, 0.1 * math.sqrt(256 / w_dim))
    elif init == "he":
        nn.init.kaiming_normal_(lin.weight, a=0.2, nonlinearity="leaky_relu")
    if init != "torch":
        nn.init.zeros_(lin.bias)
    return lin


class AdaIN(nn.Module):
    """InstanceNorm (no affine), then gamma * x + beta with [gamma, beta] = Linear(w), bias init gamma=1, beta=0.
    As in the authors' code the value is exactly that, but the gradient reaching x goes through clamp(gamma, -1, 1)
    (gamma itself gets the full gradient): gc * n + n.detach() * (gamma - gc) + beta, gc = clamp(gamma, -1, 1)."""

    def __init__(self, c, w_dim, init="authors"):
        super().__init__()
        self.style = style_linear(w_dim, 2 * c, "torch" if init == "he" else init, w_dim)
        with torch.no_grad():
            self.style.bias[:c].fill_(1.0)
            self.style.bias[c:].zero_()

    def forward(self, x, w):
        gamma, beta = self.style(w)[:, :, None, None].chunk(2, 1)
        n = F.instance_norm(x)
        gc = gamma.clamp(-1.0, 1.0)
        return gc * n + n.detach() * (gamma - gc) + beta


class Noise(nn.Module):
    """x + weight_c * N(0, 1)[B, 1, H, W]; weight init 0.1 * N(0, 1) per channel. The maps come from torch.randn
    (training) or, when set, from `self.noise_source(x)` (the Sampler's per-sample noise, common.utils)."""
    noise_source = None

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(1, c, 1, 1))

    def forward(self, x):
        if self.noise_source is not None:
            return x + self.weight * self.noise_source(x)
        return x + self.weight * torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)


class StyleBlock(nn.Module):
    """Style block with shortcut (Fig. 1(c)): up2(x) + 0.1 * AdaIN(noise(conv3(lrelu(AdaIN(noise(convT(lrelu(x))))))))."""

    def __init__(self, cin, cout, w_dim, init="authors"):
        super().__init__()
        self.shortcut = nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)
        self.up = nn.ConvTranspose2d(cin, cout, 4, 2, 1)
        self.noise_0, self.adain_0 = Noise(cout), AdaIN(cout, w_dim, init)
        self.conv = nn.Conv2d(cout, cout, 3, padding=1)
        self.noise_1, self.adain_1 = Noise(cout), AdaIN(cout, w_dim, init)

    def forward(self, x, w):
        h = self.adain_0(self.noise_0(self.up(actvn(x))), w)
        h = self.adain_1(self.noise_1(self.conv(actvn(h))), w)
        return self.shortcut(x) + 0.1 * h


# --------------------------------------------------------------------- the networks: target (Fig. 1) and GP-GAN source
class Generator(nn.Module):
    """head='gp': the GP-GAN generator ([label embedding,] fc, groups 0-5, conv_img); head='style': the small head
    (Fig. 1(g,h)) in front of groups 3-5 + conv_img, whose 3x3 convs are AdaFM/FS-modulated when mod is set."""

    def __init__(self, res, nf=64, z_dim=256, head="style", mod=None, nlabels=0, embed_dim=256, w_dim=256,
                 style_init="authors"):
        super().__init__()
        s0 = self.s0 = res // 32
        self.nf, self.z_dim, self.head, self.nlabels = nf, z_dim, head, nlabels
        if head == "gp":
            if nlabels:
                self.embedding = nn.Embedding(nlabels, embed_dim)
            self.fc = nn.Linear(z_dim + (embed_dim if nlabels else 0), 16 * nf * s0 * s0)
        else:
            layers = []
            for i in range(8):
                layers += [style_linear(z_dim if i == 0 else w_dim, w_dim, style_init, w_dim), nn.LeakyReLU(0.2)]
            self.mapping = nn.Sequential(*layers)
            self.small_fc = nn.Linear(z_dim, 8 * nf * s0 * s0)
            self.small_block_0 = StyleBlock(8 * nf, 8 * nf, w_dim, style_init)
            self.small_block_1 = StyleBlock(8 * nf, 8 * nf, w_dim, style_init)
            self.small_norm = nn.LayerNorm([4 * s0, 4 * s0])
            self.scale = nn.Parameter(torch.ones(1, 8 * nf, 1, 1))   # w_c
            self.shift = nn.Parameter(torch.zeros(1, 8 * nf, 1, 1))  # b_c
        for k in (range(6) if head == "gp" else range(3, 6)):
            a, b = G_CH[k]
            m = mod if k >= 3 else None
            setattr(self, f"resnet_{k}_0", ResnetBlock(a * nf, b * nf, m))
            setattr(self, f"resnet_{k}_1", ResnetBlock(b * nf, b * nf, m))
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)

    def group(self, k, x):
        return getattr(self, f"resnet_{k}_1")(getattr(self, f"resnet_{k}_0")(x))

    def style(self, z):
        return self.mapping(z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8))  # PixelNorm, 8-layer MLP

    def head_features(self, z, y=None, styles=None):
        """The specific part: [B, C, 4*s0, 4*s0] features fed (after x2 upsampling) to the general part."""
        b = z.shape[0]
        if self.head == "gp":
            if self.nlabels:
                e = self.embedding(y)
                z = torch.cat([z, e / e.norm(dim=1, keepdim=True)], 1)
            x = self.fc(z).view(b, 16 * self.nf, self.s0, self.s0)
            for k in range(3):
                x = self.group(k, F.interpolate(x, scale_factor=2) if k else x)
            return x
        if styles is None:
            styles = [self.style(z)] * 2
        x = self.small_fc(z).view(b, 8 * self.nf, self.s0, self.s0)   # fc on z, not w
        x = self.small_block_1(self.small_block_0(x, styles[0]), styles[1])
        n = self.small_norm(x)
        return 0.01 * n + n.detach() * self.scale + self.shift   # authors' rescaling to the frozen blocks' scale

    def forward(self, z, y=None, styles=None):
        x = self.head_features(z, y, styles)
        for k in range(3, 6):
            x = self.group(k, F.interpolate(x, scale_factor=2))
        return torch.tanh(self.conv_img(actvn(x)))


class Discriminator(nn.Module):
    """GP-GAN discriminator: conv_img, groups 0-5 with avg_pool(3, 2, 1) between them, fc(lrelu(flatten)).
    nlabels > 0: the logit of the given class (source); nlabels = 0: one logit (target, fc new)."""

    def __init__(self, res, nf=64, nlabels=0):
        super().__init__()
        s0, self.nlabels = res // 32, nlabels
        self.conv_img = nn.Conv2d(3, nf, 3, padding=1)
        for k, (a, b) in enumerate(D_CH):
            setattr(self, f"resnet_{k}_0", ResnetBlock(a * nf, a * nf))
            setattr(self, f"resnet_{k}_1", ResnetBlock(a * nf, b * nf))
        self.fc = nn.Linear(16 * nf * s0 * s0, max(nlabels, 1))

    def forward(self, x, y=None):
        x = self.conv_img(x)
        for k in range(6):
            x = F.avg_pool2d(x, 3, stride=2, padding=1) if k else x
            x = getattr(self, f"resnet_{k}_1")(getattr(self, f"resnet_{k}_0")(x))
        out = self.fc(actvn(x.flatten(1)))
        return out[torch.arange(len(out), device=out.device), y] if self.nlabels else out[:, 0]


def build(a):
    """G and D for the args `a` (an argparse.Namespace, also rebuilt from a checkpoint's args)."""
    head, mod, _, _ = MODES[a.mode]
    nl = getattr(a, "nlabels", 0)
    G = Generator(a.res, a.nf, a.z_dim, head, mod, nl, a.embed_dim, a.w_dim, getattr(a, "style_init", "authors"))
    return G, Discriminator(a.res, a.nf, nl)


def split_params(model, general, freeze):
    """(frozen, adafm, trainable) parameter lists: frozen = the transferred general part except gamma/beta."""
    frozen, adafm, train = [], [], []
    for n, p in model.named_parameters():
        if n.rsplit(".", 1)[-1] in ("gamma", "beta"):
            adafm.append(p)
        elif freeze and n.split(".")[0] in general:
            frozen.append(p)
        else:
            train.append(p)
    return frozen, adafm, train


# ----------------------------------------------------------------------------- source checkpoint and transfer
def fetch_source(path=None, cache_dir=None):
    """--source PATH, or the official GP-GAN ImageNet checkpoint downloaded once into the cache."""
    if path:
        return load_checkpoint(path), path
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    dst = os.path.join(cache_dir, os.path.basename(SOURCE_URL))
    if not os.path.isfile(dst):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading the source GP-GAN {SOURCE_URL} -> {dst}", flush=True)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            torch.hub.download_url_to_file(SOURCE_URL, dst, progress=True)
        except Exception as e:
            raise UserError(f"cannot download the source checkpoint ({type(e).__name__}: {str(e)[:120]}): fetch "
                            f"{SOURCE_URL} by hand and pass --source PATH, or train a source with --mode pretrain")
        finally:
            socket.setdefaulttimeout(old)
    return load_checkpoint(dst), dst


def source_state_dicts(ckpt, path="source"):
    """(G state dict, D state dict, description) from the authors' format or an adafm.py checkpoint."""
    strip = lambda sd: {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}  # noqa: E731
    if isinstance(ckpt, dict) and "generator" in ckpt and "discriminator" in ckpt:
        return strip(ckpt["generator"]), strip(ckpt["discriminator"]), "GAN_stability format, key 'generator'"
    if isinstance(ckpt, dict) and ckpt.get("method") == METHOD and "G" in ckpt:
        a = ckpt["args"]
        return ckpt["G"], ckpt["D"], "adafm.py --mode {mode} --res {res} --nf {nf}".format(**a)
    raise UserError(f"{path} is not a GP-GAN source checkpoint: expected the keys generator/discriminator "
                    "(GAN_stability's imagenet-8c505f47.pt) or a checkpoint written by adafm.py --mode pretrain")


def transfer(G, D, G_sd, D_sd, path="source", desc=""):
    """Copy every resnet_*/conv_img tensor the models have (the authors skip embedding and fc keys; AdaFM
    gamma/beta and the style head are new). Returns the report {G,D}_{loaded,new} (lists of keys)."""
    report = {}
    for name, model, sd, top in (("G", G, G_sd, "generator"), ("D", D, D_sd, "discriminator")):
        own = model.state_dict()
        want = [k for k in own if (k.startswith("resnet_") or k.startswith("conv_img"))
                and k.rsplit(".", 1)[-1] not in ("gamma", "beta")]
        for k in want:
            if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape):
                got = "is missing" if k not in sd else f"has shape {list(sd[k].shape)}"
                raise UserError(f"source checkpoint {path} ({desc}) does not fit this model: first mismatching key "
                                f"'{top}.{k}' {got}, expected {list(own[k].shape)} "
                                "(check --nf; sources must be GP-GAN resnet2)")
        with torch.no_grad():
            for k in want:
                own[k].copy_(sd[k])
        report[f"{name}_loaded"], report[f"{name}_new"] = want, [k for k in own if k not in want]
    return report


@torch.no_grad()
def calibrate_head(G, G_sd, n=32):
    """--head-scale auto: w_c, b_c = per-channel std, mean of the source head's features (fc + groups 0-2)."""
    if "fc.weight" not in G_sd:
        raise UserError("--head-scale auto needs a GP-GAN source generator (with its fc layer): pass --head-scale NUMBER")
    nf = G_sd["conv_img.weight"].shape[1]
    nl, emb = G_sd["embedding.weight"].shape if "embedding.weight" in G_sd else (0, 0)
    s0 = max(1, round(math.sqrt(G_sd["fc.weight"].shape[0] / (16 * nf))))
    src = Generator(32 * s0, nf, G_sd["fc.weight"].shape[1] - emb, "gp", None, nl, emb or 256)
    try:
        src.load_state_dict(G_sd)
    except RuntimeError as e:
        raise UserError(f"cannot rebuild the source generator for --head-scale auto ({str(e).splitlines()[0][:150]}): "
                        "pass --head-scale NUMBER")
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(nl, (n,), generator=gen) if nl else None
    f = src.head_features(torch.randn(n, src.z_dim, generator=gen), y)
    G.scale.copy_(f.std(dim=(0, 2, 3))[None, :, None, None])
    G.shift.copy_(f.mean(dim=(0, 2, 3))[None, :, None, None])


def modules(keys):
    out = []
    for k in keys:
        top = k.split(".")[0] + (" gamma/beta" if k.endswith(("gamma", "beta")) else "")
        if top not in out:
            out.append(top)
    return ", ".join(out) or "-"


def dataset_labels(args, n):
    """Class labels for a conditional source: digits targets, or the first-level subfolder of each image."""
    if args.data == "digits":
        from sklearn.datasets import load_digits
        y = torch.as_tensor(load_digits().target)
    else:
        folder = resolve_folder(args.data, args.data_root)
        names = [os.path.relpath(p, folder).split(os.sep)[0] for p in list_images(folder)]
        classes = sorted({c for c in names if not os.path.splitext(c)[1]})
        if len(classes) < 2 or len(names) != n:
            raise UserError(f"--labels auto needs images in class subfolders of {folder} (found {len(classes)} "
                            "class folders) and all files readable: use --labels none")
        y = torch.tensor([classes.index(c) if c in classes else 0 for c in names])
    return y


# ------------------------------------------------------------------------------------------------- one iteration
def requires_grad(params, flag):
    for p in params:
        p.requires_grad_(flag)


def step_order(args):
    """--step-order auto: GAN_stability's D-then-G for the source pretraining, the AdaFM code's G-then-D otherwise."""
    order = getattr(args, "step_order", "auto")
    return ("d_first" if args.mode == "pretrain" else "g_first") if order == "auto" else order


def train_step(args, nets, opts, x, y):
    """One G step and one D step (non-saturating loss + R1 on reals); returns detached losses. g_first (AdaFM code):
    G step on z, then the D step on that step's fakes, detached; d_first (GAN_stability): D step on fresh fakes G(z),
    then the G step on new z."""
    G, D, G_run, D_run, D_train = nets
    opt_G, opt_D, device = opts
    z = torch.randn(x.shape[0], args.z_dim, device=device)
    x = (x + torch.rand_like(x) / 128).requires_grad_(True)   # U[0, 1/128) dequantization (GAN_stability)

    def g_step(z):
        requires_grad(D_train, False)
        with autocast(device, args.amp):
            fake = G_run(z, y)
            loss_g = F.softplus(-D(fake, y).float()).mean()   # non-saturating
        opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_G.step()
        return loss_g.detach(), fake.detach()

    if step_order(args) == "g_first":
        loss_g, fake = g_step(z)
    else:
        with torch.no_grad(), autocast(device, args.amp):
            fake = G(z, y)
    requires_grad(D_train, True)
    with autocast(device, args.amp):
        d = D_run(torch.cat([x, fake.to(x.dtype)]), None if y is None else torch.cat([y, y])).float()
    d_real, d_fake = d.chunk(2)
    grad, = torch.autograd.grad(d_real.sum(), x, create_graph=True)
    r1 = grad.float().pow(2).flatten(1).sum(1).mean()
    loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean() + args.r1 * r1
    opt_D.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_D.step()
    requires_grad(D_train, False)
    if step_order(args) == "d_first":
        loss_g, _ = g_step(torch.randn_like(z))
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "r1": r1.detach(),
            "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}


def ema_beta(args, it):
    """EMA decay of G: --ema at every iteration."""
    return args.ema


# ------------------------------------------------------------------------------------------------- training run
# main -> check_args -> bench | run. run() is the same text in fastgan.py, insgen.py, adafm.py and disp.py except
# the lines marked `# method`: data, networks, resume, DDP, sampler and evaluator, then the loop (batch, train_step,
# EMA, progress, Ctrl-C, samples, evaluation, checkpoint), then last.pt and the style-mixing grid.
def head_scale(args):
    """--head-scale: None for auto, else the number."""
    try:
        return None if args.head_scale == "auto" else float(args.head_scale)
    except ValueError:
        raise UserError(f"--head-scale {args.head_scale!r}: use 'auto' or a number")


def check_args(args):
    """Every flag, before any data is read or network built (--res 4096 once held 28 GiB of digits, then failed)."""
    if args.res < 32 or args.res > 1024 or args.res & (args.res - 1):
        raise UserError(f"--res {args.res} is not supported: use a power of two from 32 to 1024 (128 = paper)")
    if not 0 <= args.mix_block <= 2:
        raise UserError("--mix-block must be 0, 1 or 2 (the head has two style blocks)")
    head_scale(args)


def build_target(args, device, source=True, out=None):
    """The networks of --mode, ready to train: the source's general part transferred (`source`: a fresh run of a
    transfer mode; the report goes to <out>/transfer.json) and frozen, the head rescaling set, then on the device
    (channels-last on CUDA) with their optimizers. Returns G, D, opt_G, opt_D, the AdaFM/FS parameters (trained from
    --adafm-start) and D's trainable parameters."""
    head, mod, transfer_mode, freeze = MODES[args.mode]
    G, D = build(args)
    report = None
    if transfer_mode and source:
        src_ckpt, src_path = fetch_source(args.source, args.cache_dir)
        G_sd, D_sd, desc = source_state_dicts(src_ckpt, src_path)
        report = transfer(G, D, G_sd, D_sd, src_path, desc)
        if head == "style" and head_scale(args) is None:
            calibrate_head(G, G_sd)
        del src_ckpt, G_sd, D_sd
    elif args.source and not transfer_mode and out:
        print(f"note: --source is ignored by --mode {args.mode} (random init)")
    if head == "style" and head_scale(args) is not None:
        G.scale.data.fill_(head_scale(args))
    G_fro, G_ada, G_tr = split_params(G, G_GENERAL, freeze)
    D_fro, _, D_tr = split_params(D, D_GENERAL, freeze)
    requires_grad(G_fro + D_fro, False)
    if out:
        ada = f" + AdaFM/FS {sum(p.numel() for p in G_ada):,} (trained from iteration {args.adafm_start})" if G_ada else ""
        print(f"mode {args.mode}: G {count_params(G):,} params = trainable {sum(p.numel() for p in G_tr):,} + frozen "
              f"{sum(p.numel() for p in G_fro):,}{ada} | D {count_params(D):,} = trainable "
              f"{sum(p.numel() for p in D_tr):,} + frozen {sum(p.numel() for p in D_fro):,}", flush=True)
    if report and out:
        for n, m in (("G", G), ("D", D)):
            fro = {k for k, p in m.named_parameters() if not p.requires_grad}
            report[n + "_frozen"] = [k for k in report[n + "_loaded"] if k in fro]
        report["source"] = src_path
        for n in "GD":
            print(f"transfer {n} ({desc}): loaded {len(report[n + '_loaded'])} tensors "
                  f"[{modules(report[n + '_loaded'])}]; frozen [{modules(report[n + '_frozen'])}]; "
                  f"new [{modules(report[n + '_new'])}]")
        with open(os.path.join(out, "transfer.json"), "w") as f:
            json.dump(report, f, indent=1)
    G, D = G.to(device), D.to(device)
    if device.type == "cuda":
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    if args.mode == "pretrain":   # GAN_stability's source training
        opt_G = torch.optim.RMSprop(G_tr, lr=args.lr, alpha=0.99, eps=1e-8)
        opt_D = torch.optim.RMSprop(D_tr, lr=args.lr, alpha=0.99, eps=1e-8)
    else:
        fused = torch.device(device).type == "cuda"  # one kernel per step on CUDA (CPU keeps the for-each Adam)
        opt_G = torch.optim.Adam(G_tr + G_ada, lr=args.lr, betas=(0.0, 0.99), eps=1e-8, fused=fused)
        opt_D = torch.optim.Adam(D_tr, lr=args.lr, betas=(0.0, 0.99), eps=1e-8, fused=fused)
    return G, D, opt_G, opt_D, G_ada, D_tr


def labelled_batches(ds, labels, args, batch, start, dist):
    """Per iteration (real images, their class labels for a conditional source or None); channels-last on CUDA."""
    xs = infinite_batches(ds, batch, seed=args.seed, start_step=start, flip=not args.no_flip, rank=dist.rank,
                          world=dist.world, workers=args.workers, device=dist.device)
    for it in itertools.count(start):
        x = next(xs)
        y = None if labels is None else to_device(labels[batch_indices(len(ds), batch, args.seed, it, dist.rank,
                                                                       dist.world)], dist.device)
        yield (x.contiguous(memory_format=torch.channels_last) if dist.device.type == "cuda" else x), y


def bench(args):
    """--bench N: seconds per iteration (train_step + EMA) on a random batch at --res/--batch, random weights,
    AdaFM/FS on; no data, no source, writes nothing."""
    dist = Distributed(args.device)
    device, batch = dist.device, dist.per_rank_batch(args.batch)
    seed_everything(args.seed + dist.rank)
    args.nlabels = 0
    G, D, opt_G, opt_D, G_ada, D_tr = build_target(args, device, source=False)
    requires_grad(G_ada, True)
    G_ema = make_ema(G)
    x = torch.rand(batch, 3, args.res, args.res, device=device) * 2 - 1
    G_run = compiled(G, args.compile)

    def step():
        train_step(args, (G, D, G_run, D, D_tr), (opt_G, opt_D, device), x, None)
        ema_update(G_ema, G, ema_beta(args, 0))

    dt = sum(time_steps(step, args.bench, device)[1:]) / args.bench
    print(f"benchmark --mode {args.mode}: {dt:.3f} s/iteration (batch {batch}, {args.res} px, nf {args.nf}, "
          f"{device}{', amp' if args.amp else ''}, {torch.get_num_threads()} threads)", flush=True)
    return dt


def main(argv=None):
    args = parse_args(argv)
    with user_errors(), SetupInterrupt() as setup:  # an error: one line, exit 2; Ctrl-C before the loop: exit 130
        check_args(args)
        if args.bench:
            return bench(args)
        run(args, setup)


def run(args, setup=None):
    dist = Distributed(args.device)
    device, batch = dist.device, dist.per_rank_batch(args.batch)
    ck, path = read_resume(args, METHOD, ARCH_FLAGS)  # readable, same method and networks: checked first
    if ck and "step_order" not in ck["args"] and step_order(args) != "d_first":  # method
        print(f"note: {path} predates --step-order (it trained D step first); continuing with "
              f"{step_order(args)} (pass --step-order d_first to keep the old order)")
    elif not ck and MODES[args.mode][2] and args.source and not os.path.isfile(args.source):  # method
        raise UserError(f"--source {args.source}: no such file (the authors' imagenet-8c505f47.pt or a --mode "
                        "pretrain checkpoint; without --source the official one is downloaded)")
    seed_everything(args.seed + dist.rank)
    ds = load_dataset(args.data, args.res, args.data_root, args.crop)
    labels = dataset_labels(args, len(ds)) if args.labels == "auto" and args.mode == "pretrain" else None  # method
    args.nlabels = int(labels.max()) + 1 if labels is not None else 0  # method
    if ck:  # method: the number of classes fixes the networks too
        check_flags(ck, path, args, ["nlabels"])
    out = prepare_run_dir(args, METHOD, dist.is_main)
    G, D, opt_G, opt_D, G_ada, D_tr = build_target(args, device, not ck, out if dist.is_main else None)  # method
    G_ema = make_ema(G)
    saved = {"G": G, "D": D, "G_ema": G_ema, "opt_G": opt_G, "opt_D": opt_D}  # checkpoint entry -> its object
    start, best = resume(ck, path, saved, dist, args) if ck else (0, float("inf"))
    requires_grad(G_ada, start >= args.adafm_start)  # method: AdaFM/FS trains from --adafm-start (before the wrap)
    G_run, D_run = dist.wrap(G, broadcast_buffers=False), dist.wrap(D, broadcast_buffers=False)  # method
    G_run = compiled(G_run, args.compile)  # method: --compile: G only (R1 needs D's double backward)

    def state(step, **extra):  # the checkpoint: `saved`, the RNGs, the best FID (resume() loads the same entries)
        return {"format": FORMAT, "method": METHOD, "args": vars(args), "step": step, "rng": rng_state(), "best_fid": best,
                **{k: v.state_dict() for k, v in saved.items()}, **extra}

    def ema_sampler():  # G_ema as eval.py samples it
        return Sampler(G_ema, args.res, device, args.mix_block)  # method

    fixed_z = Sampler(G_ema, args.res, device).latents(min(64, max(args.batch, 16)), seed=1234)  # method
    evaluator = training_evaluator(ds, device, args, dist.is_main)
    batches = labelled_batches(ds, labels, args, batch, start, dist)  # method: (images, labels or None)
    progress = Progress(args.iters, start, args.log_every, dist.is_main, out)
    stop = StopOnInterrupt(dist.is_main)  # Ctrl-C: finish the iteration, save last.pt, exit 130
    if setup:
        setup.done()
    step, sampler = start, None
    try:
        for it in range(start, args.iters):  # it: the iterations done before this one
            step, last = it + 1, it + 1 == args.iters
            if G_ada and it == args.adafm_start:  # method: AdaFM/FS joins the G step; G's DDP wrapper is rebuilt
                requires_grad(G_ada, True)
                G_run = compiled(dist.wrap(G, broadcast_buffers=False), args.compile)
                if dist.is_main:
                    print(f"AdaFM/FS parameters switched on at iteration {it}", flush=True)
            real = next(batches)
            losses = train_step(args, (G, D, G_run, D_run, D_tr), (opt_G, opt_D, device), *real)  # method
            ema_update(G_ema, G, ema_beta(args, it))  # parameters averaged, buffers copied (ema_beta: the decay)
            if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:
                if G_ada:  # method: how far AdaFM/FS moved from identity: mean of |gamma - 1|, |beta|
                    losses["adafm_dev"] = sum((p.detach() - float(n.endswith("gamma"))).abs().sum() for n, p
                                              in G.named_parameters() if n.endswith(("gamma", "beta"))) / \
                        sum(p.numel() for p in G_ada)
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
            if eval_now:
                m = evaluator(sampler.sample)
                log_metrics(out, {"iter": step, **m})
                print(f"eval it {step}: fid {m['fid']:.2f} kid {m['kid']:.4f} ({m['protocol']})", flush=True)
                if m["fid"] < best:
                    best = m["fid"]
                    save_checkpoint(state(step, metrics=m), os.path.join(out, "ckpt", "best.pt"))
            if step % args.ckpt_every == 0 and not last:
                save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
        if dist.is_main:  # the end: last.pt (with --iters 0: the initial networks) and the style-mixing grid
            save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
            if MODES[args.mode][0] == "style" and args.style_mix > 0:  # method: the style head, an N x N grid
                save_style_mix(sampler or ema_sampler(), os.path.join(out, "samples", "style_mix.png"), args.seed,
                               args.style_mix, args.style_mix)
            print(f"done: {out} (samples/, ckpt/last.pt)", flush=True)
    finally:
        stop.restore()
        dist.close()


# -------------------------------------------------------------------------------------- sampling (eval.py contract)
class Sampler(SamplerBase):
    """EMA generator. Each sample's noise maps (and, for a conditional source, its class) are a function of its own
    latent (common.utils.per_sample_noise / latent_seeds): deterministic, distinct per sample, batch-independent.
    noise=const (sampler option): one fixed map per noise layer, shared by all samples (common.utils.FixedNoise;
    what eval.py --export bakes in)."""
    export_opts = {"noise": "const"}

    def __init__(self, G, res, device, mix_block=1, noise="random"):
        self.G, self.res, self.device, self.mix_block = G.eval(), res, torch.device(device), mix_block
        self.noise = check_noise_mode(noise)

    def latent_doc(self):
        return f"z [n, {self.G.z_dim}] ~ N(0, I) (float32)"

    def export_check(self):
        if self.G.nlabels:
            raise UserError("this is a class-conditional adafm source (its class is a hash of the latent): --export "
                            "supports unconditional generators (the adapted targets)")

    def latents(self, n, seed):
        return torch.randn(n, self.G.z_dim, generator=torch.Generator().manual_seed(seed)).to(self.device)

    @SamplerBase.sampler_grad
    def _run(self, z, styles=None):
        y = None
        if self.G.nlabels:
            y = torch.tensor(latent_seeds(z), device=self.device) % self.G.nlabels
        with per_sample_noise(self.G, z, Noise, self.noise):
            return self.G(z, y, styles).float()

    def generate(self, latents):
        return self._run(latents)

    @SamplerBase.sampler_grad
    def style_mix(self, lat_a, lat_b, block=None):
        """Paper Fig. 12: z (fc) and styles of blocks < block from a; styles of blocks >= block from b."""
        if self.G.head != "style":
            raise UserError("style mixing needs the style-based head (--mode adafm, fs, smallhead or scratch)")
        block = self.mix_block if block is None else block
        wa, wb = self.G.style(lat_a), self.G.style(lat_b)
        return self._run(lat_a, [wa if i < block else wb for i in range(2)])


def load_for_sampling(ckpt, device, mix_block=None, noise="random"):
    """The EMA generator of an adafm.py checkpoint; mix_block overrides --mix-block, noise=const picks fixed noise
    maps (eval.py --sampler-opt; see Sampler)."""
    check_checkpoint(ckpt, "checkpoint", METHOD)
    a = argparse.Namespace(**ckpt["args"])
    G = build(a)[0]
    G.load_state_dict(ckpt["G_ema"])
    return Sampler(G.to(device), a.res, device, a.mix_block if mix_block is None else int(mix_block), noise)


if __name__ == "__main__":
    main()
