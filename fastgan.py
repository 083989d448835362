"""FastGAN: "Towards Faster and Stabilized GAN Training for High-fidelity Few-shot Image Synthesis"
(Liu, Zhu, Song, Elgammal, ICLR 2021), a single-file port of the authors' code (odegeasslbc/FastGAN-pytorch).

Implemented (paper section / figure in brackets)
- Generator [Fig. 3]: init block (SN ConvTranspose 4x4, BN, GLU), UpBlock and UpBlockComp (with noise injection),
  GLU everywhere, the four skip-layer excitation (SLE) modules 4->64, 8->128, 16->256, 32->512 [eq. 1], the `to_128`
  and `to_big` outputs; spectral norm on every conv; the authors' init (conv N(0, .02), BN weight N(1, .02), bias 0).
- Discriminator [Fig. 4]: `down_from_big` per resolution, DownBlockComp, the big branch (with its three SLEs) and the
  128 branch, 5x5 logits each, three decoders (8x8 big feature, 8x8 small feature, one random quadrant of the 16x16
  big feature) and the reconstruction loss on real images only [eq. 2].
- Losses as in the authors' code: D hinge with a random margin 0.8 + 0.2 U per logit, reconstruction terms summed
  over the batch for each of the three decoders; G: -mean D(G(z)) [eq. 4]. `--hinge plain` gives paper eq. 3.
- DiffAugment `color,translation` on every D input (the real batch once, each fake output independently), EMA of G
  (0.999, parameters; buffers from the live G), one D step then one G step per iteration, the same fakes for both.
- Parameter counts equal the authors' code: G 29,127,846 / 29,174,392 / 29,176,512 and D 11,526,160 / 11,526,496 /
  11,528,192 at 256 / 512 / 1024 (tests/test_fastgan.py checks them).
- Module ablations of paper Table 2 ("Baseline+Skip", "Baseline+decode"; Appendix A, Fig. 8 for SLE at 1024 px):
  --no-sle builds G without its SLE modules (no parameters, no multiplications; D keeps the SLEs of the authors'
  D, the paper's "skip" being the G module of section 3.1); --no-recon builds D without the three decoders and
  drops the reconstruction loss ("recon" is then absent from the logs; no quadrant is drawn). Both flags are saved
  in the checkpoint's args and rebuild the same networks on resume / load_for_sampling (older checkpoints, without
  the keys, are the full model). Style mixing needs SLE inputs: with --no-sle Sampler.style_mix raises a one-line
  UserError (eval.py --mix then stops with it) and training writes no style_mix.png.
Deviations (from the authors' code unless said)
- Resolutions 32, 64, 128 (the authors' code crashes below 256). Rule: every module works at one spatial level; a
  model for res < 256 keeps exactly the authors' modules and channel widths at levels <= res and drops the rest.
  G: blocks up to level res; `to_big` (3x3) and `to_128` (1x1) both read the res-level map; SLEs whose target is
  <= res. D: `down_from_big` is the 256 model's conv3x3 s1, now at level res, followed by the DownBlockComps from res
  to 8; D SLEs whose source is <= res. The "128" inputs (G's small output, D's small branch, decoder outputs and
  targets) are min(res, 128) pixels; the small branch starts with its conv4x4 s2 at that level, the decoders keep
  their first log2(min(res,128)/8) up blocks. Decoder widths scale with --ndf (authors: fixed, = ndf/2 at ndf 64).
  At res 32 no authors' SLE fits, so G gets one SLE 4->32 and D one 32->8 (kept for the module, and for style
  mixing, in the smallest model).
- tanh on both outputs at every resolution (the authors apply it only at 1024; they call this a leftover).
- Reconstruction: `--recon mse` (default) = per-image mean squared error summed over the batch, no downloads;
  `--recon lpips` = LPIPS v0.1 VGG16 "net-lin" exactly as the authors' bundled lpips (summed over the batch), which
  needs the ImageNet VGG16 and the LPIPS linear weights (torch.hub download or --vgg-weights / --lpips-weights).
  mse is the default because it runs offline and at half the CPU cost; use --recon lpips to reproduce the paper.
- Speed, same function (885 -> 565 GFLOP per 256 px batch-8 iteration): nearest-x2 upsample + conv3x3 is one
  stride-2 transposed conv with a 4x4 kernel derived from the 3x3 one (2.25x fewer FLOPs, equal up to float rounding;
  inputs >= 8x8); the G step runs D without D weight gradients (the authors compute and discard them); the
  spectral-norm sigma reuses the power iteration's W v; channels-last with a format-preserving GLU backward; fused Adam.
  Seconds per iteration (--bench) against the authors' code: README, Results. On CUDA also (common/): cuDNN autotuner,
  the in-memory images kept on the GPU, pinned non-blocking copies, host syncs only at --log-every steps; --compile
  (torch.compile) takes G and D (no double backward in FastGAN's losses). One H200 (README "Measured on one H200"):
  256 px batch 8 0.118 s/iteration (paper: 0.36 on an RTX 2080 Ti), 1024 px 0.143 (channels-last) -- launch-bound;
  --amp no faster; --compile not measured there yet.
- EMA warm-up: decay min(0.999, (1+t)/(10+t)) at iteration t (TensorFlow's num_updates rule), the authors' 0.999
  from t = 8,990 on; without it short runs sample mostly the random init (0.999^300 = 74 % of it at t = 300).
  --no-ema-warmup restores the authors' schedule.
- Sampling (Sampler, eval.py): EMA generator, spectral norm in eval mode (the u, v copied from the live G; the
  authors' train-mode sampling also runs one power iteration per batch). Noise maps: one torch.Generator per sample,
  seeded by a hash of its latent (common.utils.per_sample_noise), so an image is a function of its latent whatever
  the batch, and no two samples share noise (the authors: torch.randn of the batch). BatchNorm, sampler option bn
  (eval.py --sampler-opt bn=...; --sample-bn for the training grids and --eval-every FID): recompute (default) =
  eval mode with running statistics recomputed for the EMA weights: exact pooled mean / unbiased variance of every
  BN input over 512 fixed latents (chunks of 64, batch-statistic BN, per-sample noise); batch = the authors' rule
  (their eval.py and training grids run G in train mode): statistics of each generate() batch, running buffers
  untouched; copy = eval mode with the running statistics in G_ema, which the EMA copies from the live G (our rule
  before). Measured on the README quick-start run (digits 32 px, ngf=ndf 16, 1,500 its), 2,000 samples vs the
  1,797 digits: FID copy 54.66 / batch 47.38 / recompute 46.85 (KID 0.0606 / 0.0500 / 0.0492): the live G's
  statistics do not fit the averaged weights; recompute is as good as the authors' per-batch rule and, unlike it,
  gives each latent one image whatever the batch. Resizes to 128 are nearest
  (F.interpolate default), as in the authors' code.
- Style mixing (paper Fig. 7, Sampler.style_mix): the layout of sample a, the SLE inputs of sample b; the end of a
  run writes samples/style_mix.png, the grid of eval.py --mix (common.utils.save_style_mix).
- Under torchrun each process has its own BN statistics (no SyncBN) and its own random quadrant.
- Images with transparency are composited on white (common.data); the authors' .convert('RGB') drops alpha, which
  turns transparent areas into whatever colour the file stores there (often black).
Run
  python fastgan.py --data shells --res 1024                       # the paper's 1024 model (GPU)
  python fastgan.py --data digits --res 32 --iters 800 --ngf 16 --ndf 16 --batch 8 --sample-every 100
      # a few minutes on a CPU (speed: README); blurry digits from ~500 iterations in runs/.../samples/
  torchrun --nproc_per_node 4 fastgan.py --data pokemon --res 256 --batch 32 --amp
  python fastgan.py --bench 3 --res 256 --batch 8 [--amp]           # seconds/iteration on this device, random data
  python fastgan.py --data AnimalFace-dog --res 256 --no-sle         # Table 2 ablations: "Baseline+decode",
  python fastgan.py --data AnimalFace-dog --res 256 --no-recon       # ... "Baseline+Skip"
  python eval.py runs/<run>/ckpt/best.pt --mix                      # Sampler.style_mix: layout of a, SLE inputs of b
  python eval.py runs/<run> --sampler-opt bn=batch                  # BN at sampling: recompute (default), batch, copy
"""
import argparse
import copy
import math
import os
import socket
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import infinite_batches, load_dataset
from common.diffaug import check_policy, diff_augment
from common.ema import ema_update, make_ema
from common.metrics import training_evaluator
from common.output import (FORMAT, log_metrics, prepare_run_dir, Progress, read_resume, resume, rng_state,
                           save_checkpoint, save_grid)
from common.run import (add_common_args, autocast, check_finite, compiled, count_params, Distributed, seed_everything,
                        SetupInterrupt, StopOnInterrupt, time_steps, user_errors, UserError)
from common.sampling import (batch_stat_bn, BN_MODES, check_bn_mode, check_noise_mode, per_sample_noise,
                             recompute_bn_stats, SamplerBase, save_style_mix)

METHOD = "fastgan"
RESOLUTIONS = (32, 64, 128, 256, 512, 1024)
ARCH_FLAGS = ("res", "ngf", "ndf", "nz", "no_sle", "no_recon")  # fix the networks: --resume and eval.py use them
OLD_ARCH = {"no_sle": False, "no_recon": False}  # checkpoints from before the ablation flags: the full model
TRAIN_FLAGS = ("batch", "lr", "beta1", "beta2", "policy", "ema", "no_ema_warmup", "hinge", "recon")  # warned on resume
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, res=1024, batch=8, iters=50000, lr=2e-4, sample_every=1000, ckpt_every=1000, log_every=100)
    g = p.add_argument_group("algorithm specific")
    g.add_argument("--ngf", type=int, default=64, help="generator width (authors: 64)")
    g.add_argument("--ndf", type=int, default=64, help="discriminator width (authors: 64)")
    g.add_argument("--nz", type=int, default=256, help="latent size, z ~ N(0, I)")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (G and D)")
    g.add_argument("--beta2", type=float, default=0.999, help="Adam beta2 (G and D)")
    g.add_argument("--policy", default="color,translation", help="DiffAugment policy ('' for none)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of G's parameters")
    g.add_argument("--no-ema-warmup", action="store_true",
                   help="plain decay from iteration 1 (authors); default: min(ema, (1+t)/(10+t)), equal from t=8990")
    g.add_argument("--hinge", choices=["random", "plain"], default="random",
                   help="random: authors' margin 0.8+0.2U per logit; plain: paper eq. 3 (margin 1)")
    g.add_argument("--recon", choices=["mse", "lpips"], default="mse",
                   help="D reconstruction loss: mse (offline default) or lpips (authors, needs VGG16 weights)")
    g.add_argument("--vgg-weights", default=None, help="local vgg16-397923af.pth for --recon lpips (else torch.hub)")
    g.add_argument("--lpips-weights", default=None, help="local LPIPS v0.1 vgg.pth (else lpips package / torch.hub)")
    g.add_argument("--no-sle", action="store_true",
                   help="ablation (paper Table 2 'Baseline+decode'): G without its skip-layer excitation modules")
    g.add_argument("--no-recon", action="store_true",
                   help="ablation (paper Table 2 'Baseline+Skip'): D without its 3 decoders, no reconstruction loss")
    g.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="NHWC memory format (auto: on; measured faster on CPU oneDNN and CUDA)")
    g.add_argument("--n-sample", type=int, default=16, help="images in each sample grid (fixed latents)")
    g.add_argument("--sample-bn", choices=BN_MODES, default="recompute",
                   help="BatchNorm of the EMA generator in sample grids, FID and eval.py: recompute (statistics "
                   "recomputed for the EMA weights on 512 latents; best FID, see the docstring), batch (per sampling "
                   "batch, the authors' rule) or copy (the live G's running statistics)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ the paper's contribution: SLE [eq. 1], decoders
class SLE(nn.Module):
    """Skip-layer excitation [eq. 1]: big * sigmoid(conv1x1(swish(conv4x4(avgpool4(small)))))."""

    def __init__(self, c_small, c_big):
        super().__init__()
        self.main = nn.Sequential(nn.AdaptiveAvgPool2d(4), SNConv(c_small, c_big, 4), nn.SiLU(),
                                  SNConv(c_big, c_big, 1), nn.Sigmoid())

    def forward(self, small, big):
        return big * self.main(small)


class Decoder(nn.Module):
    """SimpleDecoder: (avgpool 8) -> up blocks in->4b->2b->2b->b (first log2(out/8) of them) -> SN conv3x3 -> tanh.
    b = ndf/2: the authors hard-code b = 32 (= 64/2, their ndf)."""

    def __init__(self, cin, out_res=128, b=32):
        super().__init__()
        chain = [cin, 4 * b, 2 * b, 2 * b, b][: int(math.log2(out_res // 8)) + 1]
        self.main = nn.Sequential(*[up_block(a, b, False) for a, b in zip(chain, chain[1:])], SNConv(chain[-1], 3, 3, pad=1), nn.Tanh())

    def forward(self, x):
        return self.main(F.adaptive_avg_pool2d(x, 8) if x.shape[-1] != 8 else x)


def crop_part(x, part):
    """Quadrant `part` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of an NCHW map, as the authors."""
    h = x.shape[2] // 2
    return x[:, :, (part // 2) * h:(part // 2 + 1) * h, (part % 2) * h:(part % 2 + 1) * h]


# ----------------------------------------------------------------------- losses: reconstruction [eq. 2], hinge [3-4]
def recon_loss(rec, target, percept=None):
    """Sum over the batch of a per-image distance to the target resized (nearest, as the authors) to rec's size."""
    target = F.interpolate(target, size=rec.shape[-1]) if target.shape[-1] != rec.shape[-1] else target
    rec, target = rec.float(), target.float()
    if percept is None:
        return (rec - target).pow(2).mean((1, 2, 3)).sum()
    return percept(rec, target).sum()


def d_hinge(pred, real, plain=False, u=None):
    """Authors: mean(relu(0.8 + 0.2U - D(real))) / mean(relu(0.8 + 0.2U + D(fake))), U ~ U[0,1) per logit.
    plain=True: paper eq. 3, margin 1."""
    margin = 1.0 if plain else 0.8 + 0.2 * (torch.rand_like(pred) if u is None else u)
    return F.relu(margin - pred).mean() if real else F.relu(margin + pred).mean()


def g_loss(pred):
    return -pred.mean()  # eq. 4


# --------------------------------------------------------------------- the backbone: generator [Fig. 3], D [Fig. 4]
G_MULT = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}  # authors' nfc_multi, G
D_MULT = {4: 16, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}  # ... and D (differs at 8-32)
G_COMP = {8, 32, 128, 512}  # levels built by UpBlockComp (two convs, noise); the others use UpBlock


def widths(n, mult=G_MULT):
    return {k: int(v * n) for k, v in mult.items()}


def levels(lo, hi):
    return [2 ** i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]


def bn(c):
    m = nn.BatchNorm2d(c)
    nn.init.normal_(m.weight, 1.0, 0.02)
    nn.init.zeros_(m.bias)
    return m


class LReLU(nn.Module):
    def forward(self, x):
        return F.leaky_relu(x, 0.2)


class NoiseInjection(nn.Module):
    """feat + w * N(0, 1)[B, 1, H, W], scalar w initialised to 0. The noise is torch.randn (training), or
    `self.noise_source(x)` when that is set (sampling: common.utils.per_sample_noise, one stream per latent)."""
    noise_source = None

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if self.noise_source is not None:
            noise = self.noise_source(x)
        else:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        return x + self.weight * noise


def up_block(cin, cout, comp):
    """UpBlock: up x2, SN conv3x3 (cin -> 2 cout), BN, GLU. UpBlockComp adds noise and a second conv3x3 stage."""
    layers = [SNConv(cin, 2 * cout, 3, up=True)] + ([NoiseInjection()] if comp else []) + [bn(2 * cout), GLU()]
    if comp:
        layers += [SNConv(cout, 2 * cout, 3, pad=1), NoiseInjection(), bn(2 * cout), GLU()]
    return nn.Sequential(*layers)


def g_sle_pairs(res):
    pairs = [(s, t) for s, t in ((4, 64), (8, 128), (16, 256), (32, 512)) if t <= res]
    return pairs or [(4, res)]


def d_sle_pairs(res):
    pairs = [(s, t) for s, t in ((256, 32), (128, 16), (64, 8)) if s <= res]
    return pairs or [(res, 8)]


class Generator(nn.Module):
    """sle=False: the --no-sle ablation, no SLE modules (nor their multiplications); everything else unchanged."""

    def __init__(self, res=1024, ngf=64, nz=256, sle=True):
        super().__init__()
        nfc = widths(ngf)
        self.res, self.small = res, min(res, 128)
        self.init = nn.Sequential(SNConv(nz, 2 * nfc[4], 4, transpose=True), bn(2 * nfc[4]), GLU())
        self.ups = nn.ModuleDict({str(r): up_block(nfc[r // 2], nfc[r], r in G_COMP) for r in levels(8, res)})
        pairs = g_sle_pairs(res) if sle else []
        self.sle = nn.ModuleDict({str(t): SLE(nfc[s], nfc[t]) for s, t in pairs})
        self.src = {t: s for s, t in pairs}
        self.to_128 = SNConv(nfc[self.small], 3, 1)
        self.to_big = SNConv(nfc[res], 3, 3, pad=1)

    def features(self, z, style=None, upto=None):
        """Feature maps per level. `style`: dict level -> map used as the SLE input instead of our own (Fig. 7)."""
        feats = {4: self.init(z.reshape(z.shape[0], -1, 1, 1))}
        x = feats[4]
        for r in levels(8, upto or self.res):
            x = self.ups[str(r)](x)
            if r in self.src:
                x = self.sle[str(r)]((style or feats)[self.src[r]], x)
            feats[r] = x
        return feats

    def style_features(self, z_style):
        """The maps that feed the SLEs (levels up to the highest SLE source), for style mixing."""
        if not self.src:
            raise ValueError("this generator has no SLE modules (--no-sle): there are no SLE inputs to mix")
        return self.features(z_style, upto=max(self.src.values()))

    def forward(self, z, z_style=None, style=None):
        """(big, small) images. z_style (or its precomputed style_features `style`): SLE inputs from another latent."""
        if z_style is not None:
            style = self.style_features(z_style)
        f = self.features(z, style)
        return torch.tanh(self.to_big(f[self.res])), torch.tanh(self.to_128(f[self.small]))


class DownBlockComp(nn.Module):
    """(main + direct) / 2: main = SN conv4x4 s2, BN, LReLU, SN conv3x3, BN, LReLU; direct = avgpool2, SN conv1x1, BN, LReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.main = nn.Sequential(SNConv(cin, cout, 4, 2, 1), bn(cout), LReLU(), SNConv(cout, cout, 3, 1, 1), bn(cout), LReLU())
        self.direct = nn.Sequential(nn.AvgPool2d(2, 2), SNConv(cin, cout, 1), bn(cout), LReLU())

    def forward(self, x):
        return (self.main(x) + self.direct(x)) / 2


def down_block(cin, cout):
    return nn.Sequential(SNConv(cin, cout, 4, 2, 1), bn(cout), LReLU())


class Discriminator(nn.Module):
    """decoders=False: the --no-recon ablation, no decoders (the rest unchanged); forward() then takes no `part`."""

    def __init__(self, res=1024, ndf=64, decoders=True):
        super().__init__()
        nfc = widths(ndf, D_MULT)  # the width at spatial level L is nfc[2L] in the big branch, nfc[4L] in the small one
        self.res, self.small, top = res, min(res, 128), min(res, 256)
        if res == 1024:
            self.down_from_big = nn.Sequential(SNConv(3, nfc[1024], 4, 2, 1), LReLU(), SNConv(nfc[1024], nfc[512], 4, 2, 1), bn(nfc[512]), LReLU())
        elif res == 512:
            self.down_from_big = nn.Sequential(SNConv(3, nfc[512], 4, 2, 1), LReLU())
        else:
            self.down_from_big = nn.Sequential(SNConv(3, nfc[2 * res], 3, 1, 1), LReLU())
        self.downs = nn.ModuleDict({str(r): DownBlockComp(nfc[4 * r], nfc[2 * r]) for r in levels(8, top // 2)[::-1]})
        self.rf_big = nn.Sequential(SNConv(nfc[16], nfc[8], 1), bn(nfc[8]), LReLU(), SNConv(nfc[8], 1, 4))
        self.sle = nn.ModuleDict({str(t): SLE(nfc[2 * s], nfc[2 * t]) for s, t in d_sle_pairs(res)})
        self.src = {t: s for s, t in d_sle_pairs(res)}
        small = [SNConv(3, nfc[2 * self.small], 4, 2, 1), LReLU()]
        small += [down_block(nfc[8 * r], nfc[4 * r]) for r in levels(8, self.small // 4)[::-1]]
        self.down_from_small = nn.Sequential(*small)
        self.rf_small = SNConv(nfc[32], 1, 4)
        self.decoders = decoders
        if decoders:
            self.decoder_big = Decoder(nfc[16], self.small, ndf // 2)
            self.decoder_part = Decoder(nfc[32], self.small, ndf // 2)
            self.decoder_small = Decoder(nfc[32], self.small, ndf // 2)

    def forward(self, big, small=None, part=None):
        """Logits (5x5 per branch, flattened, big branch first); with `part` (real images) also the three
        reconstructions [from the 8x8 big feature, from the small branch, from quadrant `part` of the 16x16 feature]."""
        if small is None:
            small = F.interpolate(big, size=self.small) if self.small != big.shape[-1] else big
        feats = {min(self.res, 256): self.down_from_big(big)}
        x = feats[min(self.res, 256)]
        for r in levels(8, min(self.res, 256) // 2)[::-1]:
            x = self.downs[str(r)](x)
            if r in self.src:
                x = self.sle[str(r)](feats[self.src[r]], x)
            feats[r] = x
        fs = self.down_from_small(small)
        logits = torch.cat([self.rf_big(x).flatten(), self.rf_small(fs).flatten()])
        if part is None:
            return logits
        if not self.decoders:
            raise ValueError("this discriminator has no decoders (--no-recon): call it without `part`")
        return logits, [self.decoder_big(x), self.decoder_small(fs), self.decoder_part(crop_part(feats[16], part))]


# ------------------------------------------------- speed, same function: fused up-conv, spectral norm, GLU backward
def up_kernel(w):
    """3x3 conv weight [O,I,3,3] -> conv_transpose2d weight [I,O,4,4] (stride 2, padding 1) with
    conv_transpose2d(x, K) == conv2d(upsample_nearest_x2(x), w, padding=1): per axis the even output row sees
    x[i-1]*w0 + x[i]*(w1+w2), the odd one x[i]*(w0+w1) + x[i+1]*w2."""
    m = w.new_tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
    return torch.einsum("ak,oikl,bl->ioab", m, w, m)


class SNConv(nn.Module):
    """Conv with spectral norm, the same arithmetic as torch.nn.utils.spectral_norm (one power iteration per
    training-mode forward, eps 1e-12; dim 1 for transposed convs) and the authors' init N(0, 0.02), no bias.
    up=True: nearest x2 upsample followed by this 3x3 conv, computed as one transposed conv (see up_kernel)."""

    def __init__(self, cin, cout, k, stride=1, pad=0, transpose=False, up=False):
        super().__init__()
        self.stride, self.pad, self.transpose, self.up = stride, pad, transpose, up
        shape = (cin, cout, k, k) if transpose else (cout, cin, k, k)
        self.weight_orig = nn.Parameter(torch.randn(shape) * 0.02)
        h, w = (cout, cin * k * k)
        self.register_buffer("weight_u", F.normalize(torch.randn(h), dim=0, eps=1e-12))
        self.register_buffer("weight_v", F.normalize(torch.randn(w), dim=0, eps=1e-12))

    def sn_weight(self):
        """weight_orig / sigma in float32 (autocast off)."""
        w = self.weight_orig.float()
        mat = (w.transpose(0, 1) if self.transpose else w).reshape(self.weight_u.numel(), -1)
        with torch.autocast(w.device.type, enabled=False):
            if self.training:
                with torch.no_grad():
                    v = F.normalize(torch.mv(mat.t(), self.weight_u), dim=0, eps=1e-12)
                    self.weight_v.copy_(v)
                wv = torch.mv(mat, self.weight_v.clone())  # with grad; sigma = u.(Wv) where u = Wv/|Wv| (torch's formula)
                with torch.no_grad():
                    self.weight_u.copy_(F.normalize(wv.detach(), dim=0, eps=1e-12))
            else:
                wv = torch.mv(mat, self.weight_v)
            sigma = torch.dot(self.weight_u.clone(), wv)
        return w / sigma

    def forward(self, x):
        w = self.sn_weight()
        if self.up and x.shape[-1] >= 8:  # measured: the fused form loses on 4x4 inputs (oneDNN), wins from 8x8 up
            with torch.autocast(x.device.type, enabled=False):
                k = up_kernel(w)
            return F.conv_transpose2d(x, k, stride=2, padding=1)
        if self.up:
            return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)
        if self.transpose:
            return F.conv_transpose2d(x, w, stride=self.stride, padding=self.pad)
        return F.conv2d(x, w, stride=self.stride, padding=self.pad)


class _GLUFn(torch.autograd.Function):
    """F.glu over channels, with a backward that keeps the input's memory format (aten's glu_backward returns NCHW
    for a channels-last input, which sends the next BatchNorm backward down a ~10x slower mixed-format path)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.glu(x, 1)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        c = g.shape[1]
        a, s = x[:, :c], torch.sigmoid(x[:, c:])
        gx = torch.empty_like(x)
        ga, gb = gx[:, :c], gx[:, c:]
        torch.mul(g, s, out=ga)  # d/da = sigmoid(b)
        torch.mul(ga, a, out=gb)  # d/db = a * sigmoid(b) * (1 - sigmoid(b))
        gb.mul_(s.neg_().add_(1))
        return gx


class GLU(nn.Module):  # first half * sigmoid(second half), over channels
    def forward(self, x):
        return F.glu(x, 1) if torch.jit.is_tracing() else _GLUFn.apply(x)  # eval.py --export: no Python op


# ---------------------------------------------------------------------- --recon lpips: the authors' reconstruction
class LPIPSVGG(nn.Module):
    """LPIPS v0.1 'net-lin' on VGG16 (Zhang et al. 2018), as the lpips copy in the authors' repo: inputs in [-1, 1],
    scaling layer, relu1_2/2_2/3_3/4_3/5_3 features, unit-normalised over channels, squared difference, non-negative
    1x1 linear weights, spatial mean, sum over the five layers -> one distance per image. Frozen."""
    SHIFT, SCALE, TAPS, CH = (-.030, -.088, -.188), (.458, .448, .450), (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers
        self.features = make_layers(cfgs["D"])[:30]  # torchvision's VGG16 .features (no classifier to allocate)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CH)
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def taps(self, x):
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x, y):
        return sum(lin((a - b) ** 2).mean((2, 3)) for lin, a, b in zip(self.lins, self.taps(x), self.taps(y))).flatten()

    def train(self, mode=True):  # always eval (the authors' dropout is off at eval)
        return super().train(False)


def load_lpips(args):
    """LPIPSVGG with the real weights: --vgg-weights / --lpips-weights, else the lpips package's file (if
    installed) and the torch.hub cache, else a download. Any failure -> one UserError line."""
    import importlib.util
    net = LPIPSVGG()
    try:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            if args.vgg_weights:
                vgg = torch.load(args.vgg_weights, map_location="cpu", weights_only=True)
            else:
                vgg = torch.hub.load_state_dict_from_url(VGG_URL, progress=False, check_hash=True, map_location="cpu")
            lin_path = args.lpips_weights
            spec = importlib.util.find_spec("lpips") if not lin_path else None
            if spec and spec.origin and os.path.isfile(os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth")):
                lin_path = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth")
            if lin_path:
                lin = torch.load(lin_path, map_location="cpu", weights_only=True)
            else:
                lin = torch.hub.load_state_dict_from_url(LIN_URL, progress=False, file_name="lpips_v0.1_vgg.pth", map_location="cpu")
        finally:
            socket.setdefaulttimeout(old)
        net.features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")})
        net.lins.load_state_dict({f"{k[3]}.weight": v for k, v in lin.items() if k.endswith("model.1.weight")})
    except Exception as e:
        raise UserError(f"--recon lpips needs the ImageNet VGG16 weights ({VGG_URL}) and the LPIPS v0.1 linear weights "
                        f"({LIN_URL}); could not load them ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). "
                        "Pass --vgg-weights PATH --lpips-weights PATH, put them in the torch.hub cache, or use --recon mse")
    return net


# ---------------------------------------------------------------------------------------------- one iteration
def train_step(G, D, opt_G, opt_D, real, args, device, percept=None, D_plain=None):
    """One iteration of the authors' train.py: fakes, D step (real with reconstructions, then detached fakes),
    G step on the same augmented fakes. Returns detached loss tensors (no host sync)."""
    D_plain = D_plain or D
    plain = args.hinge == "plain"
    z = torch.randn(real.shape[0], args.nz, device=device)
    with autocast(device, args.amp):
        fakes = G(z)
    real = diff_augment(real, args.policy)
    fakes = [diff_augment(f, args.policy) for f in fakes]
    opt_D.zero_grad(set_to_none=True)
    if args.no_recon:  # ablation: no decoders, no reconstruction loss (and no quadrant drawn)
        with autocast(device, args.amp):
            pred_r = D(real)
        loss_real = d_hinge(pred_r.float(), True, plain)
        loss_real.backward()
    else:
        part = int(torch.randint(4, (1,)))
        with autocast(device, args.amp):
            pred_r, recs = D(real, part=part)
        rec = (recon_loss(recs[0], real, percept) + recon_loss(recs[1], real, percept)
               + recon_loss(recs[2], crop_part(real, part), percept))
        loss_real = d_hinge(pred_r.float(), True, plain)
        (loss_real + rec).backward()
    with autocast(device, args.amp):
        pred_f = D(fakes[0].detach(), fakes[1].detach())
    loss_fake = d_hinge(pred_f.float(), False, plain)
    loss_fake.backward()
    opt_D.step()
    opt_G.zero_grad(set_to_none=True)
    D_plain.requires_grad_(False)  # the G step needs no D weight gradients
    with autocast(device, args.amp):
        pred_g = D_plain(fakes[0], fakes[1])
    lg = g_loss(pred_g.float())
    lg.backward()
    D_plain.requires_grad_(True)
    opt_G.step()
    recon = {} if args.no_recon else {"recon": rec.detach()}  # --no-recon: absent from progress lines and metrics
    return {"loss_d": (loss_real + loss_fake).detach(), "loss_g": lg.detach(), **recon,
            "d_real": pred_r.detach().float().mean(), "d_fake": pred_f.detach().float().mean()}


def ema_beta(args, it):
    """EMA decay after iteration it + 1 = t: min(ema, (1+t)/(10+t)) (warm-up), or the authors' constant ema."""
    t = it + 1
    return args.ema if args.no_ema_warmup else min(args.ema, (1 + t) / (10 + t))


# ------------------------------------------------------------------------------------------------- training run
# main -> check_args -> bench | run. run() is the same text in fastgan.py, insgen.py, adafm.py and disp.py except
# the lines marked `# method`: data, networks, resume, DDP, sampler and evaluator, then the loop (batch, train_step,
# EMA, progress, Ctrl-C, samples, evaluation, checkpoint), then last.pt and the style-mixing grid.
def check_args(args):
    """Every flag, before any data is read or network built."""
    if args.res not in RESOLUTIONS:
        raise UserError(f"--res {args.res} is not supported: use one of {', '.join(map(str, RESOLUTIONS))}")
    if min(args.ngf, args.ndf) < 8 or args.ngf % 8 or args.ndf % 8:
        raise UserError("--ngf and --ndf must be positive multiples of 8 (the narrowest layers are width/8)")
    check_policy(args.policy, "--policy")


def build(args, device):
    """G, D and their Adams; the last value: whether they run channels-last."""
    check_args(args)
    G = Generator(args.res, args.ngf, args.nz, sle=not args.no_sle).to(device)
    D = Discriminator(args.res, args.ndf, decoders=not args.no_recon).to(device)
    cl = args.channels_last != "off"
    if cl:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    return G, D, opt_G, opt_D, cl


def bench(args):
    """--bench N: seconds per iteration (train_step + EMA) on a random batch at --res/--batch; writes nothing."""
    device = Distributed(args.device).device
    seed_everything(args.seed)
    G, D, opt_G, opt_D, cl = build(args, device)
    G_ema = make_ema(G)
    percept = load_lpips(args).to(device) if args.recon == "lpips" else None
    real = torch.rand(args.batch, 3, args.res, args.res, device=device) * 2 - 1
    real = real.contiguous(memory_format=torch.channels_last) if cl else real

    G_run, D_run = compiled(G, args.compile), compiled(D, args.compile)

    def step():
        losses = train_step(G_run, D_run, opt_G, opt_D, real, args, device, percept, D)
        ema_update(G_ema, G, args.ema)
        float(losses["loss_d"])

    times = time_steps(step, args.bench, device)
    t = sorted(times[1:])[len(times[1:]) // 2]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench: res {args.res} batch {args.batch} amp {args.amp} channels_last {cl} recon {args.recon} "
          f"device {device} threads {torch.get_num_threads()} load {load:.2f}: {t:.3f} s/iteration "
          f"(median of {args.bench}; all {', '.join(f'{x:.2f}' for x in times)})", flush=True)
    return t


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
    seed_everything(args.seed + dist.rank)
    ds = load_dataset(args.data, args.res, args.data_root, args.crop)
    out = prepare_run_dir(args, METHOD, dist.is_main)
    G, D, opt_G, opt_D, cl = build(args, device)  # method
    G_ema = make_ema(G)
    percept = load_lpips(args).to(device) if args.recon == "lpips" else None  # method
    saved = {"G": G, "D": D, "G_ema": G_ema, "opt_G": opt_G, "opt_D": opt_D}  # checkpoint entry -> its object
    start, best = resume(ck, path, saved, dist, args) if ck else (0, float("inf"))
    changed = [f"--{k.replace('_', '-')} {ck['args'].get(k)} -> {getattr(args, k)}" for k in TRAIN_FLAGS
               if ck['args'].get(k) != getattr(args, k)] if ck else []  # method
    if changed and dist.is_main:  # method
        print(f"warning: resuming with changed training flags: {'; '.join(changed)}", flush=True)
    G_run, D_run = dist.wrap(G), dist.wrap(D, find_unused_parameters=True)  # method: D (no quadrant decoder)
    G_run, D_run = compiled(G_run, args.compile), compiled(D_run, args.compile)  # method: no double backward here

    def state(step, **extra):  # the checkpoint: `saved`, the RNGs, the best FID (resume() loads the same entries)
        return {"format": FORMAT, "method": METHOD, "args": vars(args), "step": step, "rng": rng_state(), "best_fid": best,
                **{k: v.state_dict() for k, v in saved.items()}, **extra}

    def ema_sampler():  # G_ema as eval.py samples it
        G_s = copy.deepcopy(G_ema) if args.sample_bn == "recompute" else G_ema  # method: --sample-bn recompute: a copy
        return Sampler(G_s, args.nz, device, args.sample_bn)  # method

    fixed_z = Sampler(G_ema, args.nz, device).latents(args.n_sample, args.seed + 12345)  # method
    evaluator = training_evaluator(ds, device, args, dist.is_main)
    batches = infinite_batches(ds, batch, args.seed, start, flip=not args.no_flip, rank=dist.rank, world=dist.world,
                               workers=args.workers, device=device)
    if cl:  # method
        batches = (x.contiguous(memory_format=torch.channels_last) for x in batches)
    progress = Progress(args.iters, start, args.log_every, dist.is_main, out)
    if dist.is_main:
        print(f"{METHOD}: res {args.res} data {ds.name} ({len(ds)} images) G {count_params(G):,} D {count_params(D):,} "
              f"params, device {device}, world {dist.world}, out {out}", flush=True)  # method
    stop = StopOnInterrupt(dist.is_main)  # Ctrl-C: finish the iteration, save last.pt, exit 130
    if setup:
        setup.done()
    step, sampler = start, None
    try:
        for it in range(start, args.iters):  # it: the iterations done before this one
            step, last = it + 1, it + 1 == args.iters
            real = next(batches)
            losses = train_step(G_run, D_run, opt_G, opt_D, real, args, device, percept, D)  # method
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
            if not args.no_sle:  # method: --no-sle has no SLE inputs to mix
                save_style_mix(sampler or ema_sampler(), os.path.join(out, "samples", "style_mix.png"), args.seed)
            print(f"done: {out} (samples/, ckpt/last.pt)", flush=True)
    finally:
        stop.restore()
        dist.close()


# -------------------------------------------------------------------------------------- sampling (eval.py contract)
BN_SEED, BN_N, BN_CHUNK = 2_147_483_647, 512, 64  # bn=recompute: latent seed (far from eval.py's), count, chunk


class Sampler(SamplerBase):
    """EMA generator, no grad, spectral norm in eval mode (the stored u, v; no power iteration). Noise: one stream
    per latent (common.utils.per_sample_noise), so an image depends on its latent only, whatever the batch.
    BatchNorm (`bn`): copy = eval mode with the running statistics in G (copied from the live G during training);
    batch = batch statistics of each generate() call, as the authors sample (train-mode BN), running buffers untouched;
    recompute = eval mode with running statistics recomputed for this generator on BN_N latents
    (common.utils.recompute_bn_stats). noise=const (sampler option): one fixed map per noise layer, shared by
    all samples (common.utils.FixedNoise; what eval.py --export bakes in)."""
    export_opts = {"noise": "const"}

    def __init__(self, G, nz, device, bn="copy", noise="random"):
        self.G, self.nz, self.device, self.res = G.eval(), nz, torch.device(device), G.res
        self.bn, self.noise = check_bn_mode(bn), check_noise_mode(noise)
        if bn == "recompute":
            recompute_bn_stats(G, self.latents(BN_N, BN_SEED), self._forward_with_noise, BN_CHUNK)

    def latent_doc(self):
        return f"z [n, {self.nz}] ~ N(0, I) (float32)"

    def _forward_with_noise(self, z):
        with per_sample_noise(self.G, z, NoiseInjection, self.noise):
            return self.G(z)

    def latents(self, n, seed):
        return torch.randn(n, self.nz, generator=torch.Generator().manual_seed(int(seed))).to(self.device)

    @SamplerBase.sampler_grad
    def _run(self, z, z_style=None):
        with batch_stat_bn(self.G, self.bn == "batch"):
            style = None
            if z_style is not None:
                with per_sample_noise(self.G, z_style, NoiseInjection, self.noise):  # the style pass: z_style's noise
                    style = self.G.style_features(z_style)
            with per_sample_noise(self.G, z, NoiseInjection, self.noise):
                return self.G(z, style=style)[0].float()

    def generate(self, latents):
        return self._run(latents)

    def style_mix(self, lat_a, lat_b):
        """Paper Fig. 7: the main path (layout, content) of a, the SLE inputs x_low (style) of b, pairwise."""
        if not self.G.sle:
            raise UserError("style mixing swaps the SLE inputs, and this generator was trained with --no-sle "
                            "(it has no SLE): no style-mixing grid for it")
        return self._run(lat_a, lat_b)


def arch_args(a):
    """The flags that define the networks, from a checkpoint's args (older checkpoints: the full model)."""
    return {k: a.get(k, OLD_ARCH.get(k)) for k in ARCH_FLAGS}


def load_for_sampling(ckpt, device, bn=None, noise="random"):
    """Sampler for ckpt["G_ema"]. bn (eval.py --sampler-opt bn=...): recompute (default: the run's --sample-bn, else
    recompute), batch or copy; noise: random (per sample) or const (fixed maps); see Sampler."""
    a = arch_args(ckpt["args"])
    bn = check_bn_mode(bn or ckpt["args"].get("sample_bn") or "recompute")
    G = Generator(a["res"], a["ngf"], a["nz"], sle=not a["no_sle"]).to(device)
    G.load_state_dict(ckpt["G_ema"])
    return Sampler(G, a["nz"], device, bn, noise)


if __name__ == "__main__":
    main()
