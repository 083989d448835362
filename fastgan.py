"""FastGAN: "Towards Faster and Stabilized GAN Training for High-fidelity Few-shot Image Synthesis"
(Liu, Zhu, Song, Elgammal, ICLR 2021), a single-file port of the authors' code (odegeasslbc/FastGAN-pytorch).

Implemented (paper section / figure / equation in brackets)
- Skip-layer excitation [3.1, eq. 1]: G's SLEs 4->64, 8->128, 16->256, 32->512, and the three SLEs of D's big branch.
- Self-supervised D [3.2, eq. 2]: three simple decoders (the 8x8 big feature, the 8x8 small-branch feature, a random
  quadrant of the 16x16 feature) reconstruct the real image; LPIPS reconstruction loss on reals only, as the authors.
- G [Fig. 3]: UpBlock / UpBlockComp (noise), GLU, spectral norm, big and 128 px outputs; D [Fig. 4]: two branches.
- Losses [eqs. 3-4]: hinge D loss with the authors' random margin 0.8 + 0.2 U per logit (--hinge plain: eq. 3),
  G loss -mean D(G(z)); DiffAugment color,translation on every D input; EMA of G; one D step, then one G step.
- Parameter counts as the authors' at 256/512/1024 px: G 29,127,846/29,174,392/29,176,512, D 11,526,160/11,526,496/
  11,528,192 (tests/test_fastgan.py). Style mixing [Fig. 7]: a's layout with b's SLE inputs (eval.py --mix).
- Table 2 ablations: --no-sle ("Baseline+decode": G without SLEs), --no-recon ("Baseline+Skip": D without decoders).
Deviations (each explained beside its code; docs/fastgan.md)
- Also 32, 64 and 128 px (the authors' code needs >= 256): the authors' modules at the levels <= res, the rest dropped.
- tanh on both outputs at every resolution (the authors apply it only at 1024 px).
- Decoder widths scale with --ndf (the authors fix them at 32 = ndf/2 for their ndf 64).
- --recon mse: per-image mean squared error instead of LPIPS, needs no weights (the default is LPIPS).
- Speed, same function: fused upsample+conv, spectral-norm sigma from the power iteration, channels-last GLU backward.
- EMA warm-up: decay min(0.999, (1+t)/(10+t)) at iteration t (--no-ema-warmup: the authors' constant 0.999).
- Sampling: spectral norm in eval mode, noise drawn per sample from its latent, BN statistics recomputed for G_ema.
- Under torchrun each process keeps its own BatchNorm statistics (no SyncBN) and draws its own quadrant.
- Images with transparency are composited on white (the authors' .convert('RGB') drops alpha).
Run
  python fastgan.py --data shells --res 1024          # the paper's 1024 px model (GPU; LPIPS weights through torch.hub)
  python fastgan.py --data digits --res 32 --ngf 16 --ndf 16 --iters 800 --batch 8 --sample-every 100 --recon mse
  torchrun --nproc_per_node 4 fastgan.py --data pokemon --res 256 --batch 32 --amp --compile   # compiles G and D
  python fastgan.py --bench 3 --res 256 --batch 8 [--amp]   # seconds per iteration on this device, random data
  python fastgan.py --data AnimalFace-dog --res 256 --no-sle  # ablation "Baseline+decode"; --no-recon: "Baseline+Skip"
  python eval.py runs/<run>/ckpt/best.pt --mix  # FID/KID, style mixing; --sampler-opt bn=batch: the authors' BN
"""
import argparse
import copy
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import infinite_batches, load_dataset
from common.diffaug import check_policy, diff_augment
from common.ema import ema_update, make_ema
from common.metrics import training_evaluator
from common.output import (check_checkpoint, checkpoint_state, log_metrics, prepare_run_dir, Progress, read_resume,
                           resume, save_checkpoint, save_grid)
from common.run import (add_common_args, autocast, bench as bench_steps, check_finite, compiled, count_params,
                        Distributed, seed_everything, SetupInterrupt, StopOnInterrupt, user_errors, UserError)
from common.sampling import (batch_stat_bn, BN_MODES, check_bn_mode, check_noise_mode, per_sample_noise,
                             recompute_bn_stats, SamplerBase, save_style_mix)
from common.weights import load_lpips

METHOD = "fastgan"
RESOLUTIONS = (32, 64, 128, 256, 512, 1024)
ARCH_FLAGS = ("res", "ngf", "ndf", "nz", "no_sle", "no_recon")  # fix the networks: --resume and eval.py check them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, res=1024, batch=8, iters=50000, lr=2e-4, sample_every=1000, ckpt_every=1000, log_every=100)
    g = p.add_argument_group("algorithm specific")
    g.add_argument("--ngf", type=int, default=64, help="generator width (authors: 64)")
    g.add_argument("--ndf", type=int, default=64, help="discriminator width (authors: 64)")
    g.add_argument("--nz", type=int, default=256, help="latent size, z ~ N(0, I)")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (G and D)")
    g.add_argument("--beta2", type=float, default=0.999, help="Adam beta2 (G and D)")
    g.add_argument("--policy", default="color,translation", help="DiffAugment policy ('' for none)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of G's parameters")
    g.add_argument("--no-ema-warmup", action="store_true", help="the authors' constant decay; else the warm-up "
                   "min(ema, (1+t)/(10+t)) at iteration t, equal from t=8990")
    g.add_argument("--hinge", choices=["random", "plain"], default="random",
                   help="random: the authors' margin 0.8+0.2U per logit; plain: paper eq. 3 (margin 1)")
    g.add_argument("--recon", choices=["lpips", "mse"], default="lpips", help="D reconstruction loss: lpips (paper, "
                   "authors; needs the VGG16 and LPIPS weights) or mse (no weights, offline)")
    g.add_argument("--vgg-weights", metavar="PATH", help="vgg16-397923af.pth; else the torch.hub cache or a download")
    g.add_argument("--lpips-weights", metavar="PATH", help="LPIPS v0.1 vgg.pth; else the lpips package, torch.hub")
    g.add_argument("--no-sle", action="store_true", help="ablation, Table 2 'Baseline+decode': G without SLE modules")
    g.add_argument("--no-recon", action="store_true", help="ablation, Table 2 'Baseline+Skip': D without decoders")
    g.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="NHWC layout (auto: on)")
    g.add_argument("--n-sample", type=int, default=16, help="images in each sample grid (fixed latents)")
    g.add_argument("--sample-bn", choices=BN_MODES, default="recompute",
                   help="BatchNorm of G_ema in sample grids, FID and eval.py: recompute (statistics for the EMA "
                   "weights, on 512 latents), batch (each sampling batch's, the authors' rule), copy (the live G's)")
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
    """SimpleDecoder [3.2]: (avgpool 8) -> up blocks in->4b->2b->2b->b (the first log2(out/8)) -> SN conv3x3 -> tanh."""

    def __init__(self, cin, out_res=128, b=32):  # b = ndf/2; the authors hard-code 32 (= their ndf 64 / 2)
        super().__init__()
        chain = [cin, 4 * b, 2 * b, 2 * b, b][: int(math.log2(out_res // 8)) + 1]
        ups = [up_block(a, b, False) for a, b in zip(chain, chain[1:])]
        self.main = nn.Sequential(*ups, SNConv(chain[-1], 3, 3, pad=1), nn.Tanh())

    def forward(self, x):
        return self.main(F.adaptive_avg_pool2d(x, 8) if x.shape[-1] != 8 else x)


def crop_part(x, part):
    """Quadrant `part` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of an NCHW map, as the authors."""
    h = x.shape[2] // 2
    return x[:, :, (part // 2) * h:(part // 2 + 1) * h, (part % 2) * h:(part % 2 + 1) * h]


# ----------------------------------------------------------------------- losses: reconstruction [eq. 2], hinge [3-4]
def recon_loss(rec, target, percept=None):
    """Sum over the batch of LPIPS (`percept`) or MSE per image, the target resized (nearest, as the authors)."""
    target = F.interpolate(target, size=rec.shape[-1]) if target.shape[-1] != rec.shape[-1] else target
    rec, target = rec.float(), target.float()
    if percept is None:
        return (rec - target).pow(2).mean((1, 2, 3)).sum()
    return percept(rec, target).sum()


def d_hinge(pred, real, plain=False, u=None):
    """Authors: mean(relu(0.8 + 0.2U -/+ D(x))), U ~ U[0,1) per logit, for real/fake; plain: eq. 3, margin 1."""
    margin = 1.0 if plain else 0.8 + 0.2 * (torch.rand_like(pred) if u is None else u)
    return F.relu(margin - pred).mean() if real else F.relu(margin + pred).mean()


def g_loss(pred):
    return -pred.mean()  # eq. 4


# --------------------------------------------------------------------- the backbone: generator [Fig. 3], D [Fig. 4]
# Below 256 px (the authors' code needs >= 256) every module works at one spatial level: a model keeps exactly the
# authors' modules and widths at the levels <= res and drops the rest; the "128" images are min(res, 128) pixels.
# D's down_from_big is then the 256 model's conv3x3 s1 at level res; G's to_big and to_128 read the res-level map.
G_MULT = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}  # authors' nfc_multi, G
D_MULT = {4: 16, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}  # ... and D (differs at 8-32)
G_COMP = {8, 32, 128, 512}  # levels built by UpBlockComp (two convs, noise); the others use UpBlock
G_SLE = ((4, 64), (8, 128), (16, 256), (32, 512))  # (source, target) levels of the SLEs that fit: at 32 px none, so
D_SLE = ((256, 32), (128, 16), (64, 8))  # G gets one 4->32 and D one 32->8 (the module kept, and style mixing)


def widths(n, mult=G_MULT):
    return {k: int(v * n) for k, v in mult.items()}


def levels(lo, hi):
    return [2 ** i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]


def bn(c):  # the authors' init: weight N(1, 0.02), bias 0
    m = nn.BatchNorm2d(c)
    nn.init.normal_(m.weight, 1.0, 0.02)
    return m


class NoiseInjection(nn.Module):
    """x + w * N(0, 1)[B, 1, H, W], scalar w initialised to 0. Sampling sets `noise_source` (per_sample_noise)."""
    noise_source = None

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if self.noise_source is not None:
            return x + self.weight * self.noise_source(x)
        return x + self.weight * torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)


def up_block(cin, cout, comp):
    """UpBlock: up x2, SN conv3x3 (cin -> 2 cout), BN, GLU. UpBlockComp adds noise and a second conv3x3 stage."""
    layers = [SNConv(cin, 2 * cout, 3, up=True)] + ([NoiseInjection()] if comp else []) + [bn(2 * cout), GLU()]
    if comp:
        layers += [SNConv(cout, 2 * cout, 3, pad=1), NoiseInjection(), bn(2 * cout), GLU()]
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """sle=False: the --no-sle ablation, no SLE modules (nor their multiplications)."""

    def __init__(self, res=1024, ngf=64, nz=256, sle=True):
        super().__init__()
        nfc = widths(ngf)
        self.res, self.small = res, min(res, 128)
        self.init = nn.Sequential(SNConv(nz, 2 * nfc[4], 4, transpose=True), bn(2 * nfc[4]), GLU())
        self.ups = nn.ModuleDict({str(r): up_block(nfc[r // 2], nfc[r], r in G_COMP) for r in levels(8, res)})
        pairs = ([(s, t) for s, t in G_SLE if t <= res] or [(4, res)]) if sle else []
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

    def forward(self, z, style=None):
        """(big, small) images. style: style_features of another latent as SLE inputs (Fig. 7)."""
        f = self.features(z, style)
        # tanh on both outputs at every resolution: the authors apply it only at 1024 px and call this a leftover
        return torch.tanh(self.to_big(f[self.res])), torch.tanh(self.to_128(f[self.small]))


class DownBlockComp(nn.Module):
    """(main + direct) / 2: main = conv4x4 s2, BN, LReLU, conv3x3, BN, LReLU; direct = avgpool2, conv1x1, BN, LReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.main = nn.Sequential(SNConv(cin, cout, 4, 2, 1), bn(cout), nn.LeakyReLU(0.2),
                                  SNConv(cout, cout, 3, 1, 1), bn(cout), nn.LeakyReLU(0.2))
        self.direct = nn.Sequential(nn.AvgPool2d(2, 2), SNConv(cin, cout, 1), bn(cout), nn.LeakyReLU(0.2))

    def forward(self, x):
        return (self.main(x) + self.direct(x)) / 2


class Discriminator(nn.Module):
    """decoders=False: --no-recon, no decoders; forward() then takes no `part`."""

    def __init__(self, res=1024, ndf=64, decoders=True):
        super().__init__()
        nfc = widths(ndf, D_MULT)  # the width at spatial level L is nfc[2L] in the big branch, nfc[4L] in the small one
        self.res, self.small, top = res, min(res, 128), min(res, 256)
        if res == 1024:
            self.down_from_big = nn.Sequential(SNConv(3, nfc[1024], 4, 2, 1), nn.LeakyReLU(0.2),
                                               SNConv(nfc[1024], nfc[512], 4, 2, 1), bn(nfc[512]), nn.LeakyReLU(0.2))
        elif res == 512:
            self.down_from_big = nn.Sequential(SNConv(3, nfc[512], 4, 2, 1), nn.LeakyReLU(0.2))
        else:
            self.down_from_big = nn.Sequential(SNConv(3, nfc[2 * res], 3, 1, 1), nn.LeakyReLU(0.2))
        self.downs = nn.ModuleDict({str(r): DownBlockComp(nfc[4 * r], nfc[2 * r]) for r in levels(8, top // 2)[::-1]})
        self.rf_big = nn.Sequential(SNConv(nfc[16], nfc[8], 1), bn(nfc[8]), nn.LeakyReLU(0.2), SNConv(nfc[8], 1, 4))
        pairs = [(s, t) for s, t in D_SLE if s <= res] or [(res, 8)]
        self.sle = nn.ModuleDict({str(t): SLE(nfc[2 * s], nfc[2 * t]) for s, t in pairs})
        self.src = {t: s for s, t in pairs}
        small = [SNConv(3, nfc[2 * self.small], 4, 2, 1), nn.LeakyReLU(0.2)]
        small += [nn.Sequential(SNConv(nfc[8 * r], nfc[4 * r], 4, 2, 1), bn(nfc[4 * r]), nn.LeakyReLU(0.2))  # DownBlock
                  for r in levels(8, self.small // 4)[::-1]]
        self.down_from_small = nn.Sequential(*small)
        self.rf_small = SNConv(nfc[32], 1, 4)
        self.decoders = decoders
        if decoders:  # widths scale with ndf (the authors' b = 32 = ndf / 2 at their ndf 64)
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
    """[O,I,3,3] -> K [I,O,4,4]: conv_transpose2d(x, K, stride 2, padding 1) == conv2d(up_nearest_x2(x), w, padding 1),
    2.25x fewer FLOPs. Per axis an even output row is x[i-1]w0 + x[i](w1+w2), an odd one x[i](w0+w1) + x[i+1]w2."""
    m = w.new_tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
    return torch.einsum("ak,oikl,bl->ioab", m, w, m)


class SNConv(nn.Module):
    """Conv with torch.nn.utils.spectral_norm's arithmetic (a power iteration per training forward), init N(0, 0.02),
    no bias. up=True: nearest x2 upsample followed by this 3x3 conv, computed as one transposed conv (up_kernel)."""

    def __init__(self, cin, cout, k, stride=1, pad=0, transpose=False, up=False):
        super().__init__()
        self.stride, self.pad, self.transpose, self.up = stride, pad, transpose, up
        shape = (cin, cout, k, k) if transpose else (cout, cin, k, k)
        self.weight_orig = nn.Parameter(torch.randn(shape) * 0.02)
        self.register_buffer("weight_u", F.normalize(torch.randn(cout), dim=0, eps=1e-12))
        self.register_buffer("weight_v", F.normalize(torch.randn(cin * k * k), dim=0, eps=1e-12))

    def sn_weight(self):
        """weight_orig / sigma in float32 (autocast off)."""
        w = self.weight_orig.float()
        mat = (w.transpose(0, 1) if self.transpose else w).reshape(self.weight_u.numel(), -1)
        with torch.autocast(w.device.type, enabled=False):
            if self.training:
                with torch.no_grad():
                    self.weight_v.copy_(F.normalize(torch.mv(mat.t(), self.weight_u), dim=0, eps=1e-12))
                wv = torch.mv(mat, self.weight_v.clone())  # with grad; reused: sigma = u.(Wv), u = Wv/|Wv| (torch's)
                with torch.no_grad():
                    self.weight_u.copy_(F.normalize(wv.detach(), dim=0, eps=1e-12))
            else:
                wv = torch.mv(mat, self.weight_v)
            sigma = torch.dot(self.weight_u.clone(), wv)
        return w / sigma

    def forward(self, x):
        w = self.sn_weight()
        if self.up and x.shape[-1] >= 8:  # the fused form loses on 4x4 inputs (oneDNN), wins from 8x8 up
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


# ---------------------------------------------------------------------------------------------- one iteration
def train_step(G, D, opt_G, opt_D, real, args, device, percept=None, D_plain=None):
    """The authors' iteration: D step (augmented reals and their reconstructions, then the detached fakes), G step on
    the same augmented fakes. D_plain: D without DDP/compile wrappers. Returns detached losses (no host sync)."""
    D_plain, plain = D_plain or D, args.hinge == "plain"
    z = torch.randn(real.shape[0], args.nz, device=device)
    with autocast(device, args.amp):
        fakes = G(z)
    real = diff_augment(real, args.policy)
    fakes = [diff_augment(f, args.policy) for f in fakes]
    opt_D.zero_grad(set_to_none=True)
    part = None if args.no_recon else int(torch.randint(4, (1,)))  # --no-recon: no decoders, no quadrant drawn
    with autocast(device, args.amp):
        pred_r, recs = (D(real), []) if part is None else D(real, part=part)
    loss_real, rec = d_hinge(pred_r.float(), True, plain), 0
    if recs:  # eq. 2 on the reals: the whole image from the big and the small feature, quadrant `part` from its own
        rec = sum(recon_loss(r, t, percept) for r, t in zip(recs, (real, real, crop_part(real, part))))
    (loss_real + rec).backward()
    with autocast(device, args.amp):
        pred_f = D(fakes[0].detach(), fakes[1].detach())
    loss_fake = d_hinge(pred_f.float(), False, plain)
    loss_fake.backward()
    opt_D.step()
    opt_G.zero_grad(set_to_none=True)
    D_plain.requires_grad_(False)  # the G step needs no D weight gradients (the authors compute and discard them)
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
    """EMA decay after iteration t = it + 1: min(ema, (1+t)/(10+t)) (a short run samples less of the init) or ema."""
    t = it + 1
    return args.ema if args.no_ema_warmup else min(args.ema, (1 + t) / (10 + t))


# ------------------------------------------------------------------------------------------------- training run
# main -> check_args -> bench | run. run() is the four scripts' shared text, except the lines marked `# method`.
def check_args(args):
    """Every flag, before any data is read or network built."""
    if args.res not in RESOLUTIONS:
        raise UserError(f"--res {args.res} is not supported: use one of {', '.join(map(str, RESOLUTIONS))}")
    if min(args.ngf, args.ndf) < 8 or args.ngf % 8 or args.ndf % 8:
        raise UserError("--ngf and --ndf must be positive multiples of 8 (the narrowest layers are width/8)")
    check_policy(args.policy, "--policy")


def perceptual(args, device):
    """--recon lpips: LPIPS v0.1 VGG16 with the real weights (common.weights.load_lpips); --recon mse: None."""
    if args.recon != "lpips" or args.no_recon:
        return None
    try:
        return load_lpips(args.vgg_weights, args.lpips_weights).to(device)
    except UserError as e:
        raise UserError(f"--recon lpips (the default) needs the VGG16 and LPIPS v0.1 weights: pass --vgg-weights PATH "
                        f"--lpips-weights PATH, or train with --recon mse ({e})") from None


def build(args, device):
    """G, D and their Adams; the last value: whether they run channels-last."""
    check_args(args)
    G = Generator(args.res, args.ngf, args.nz, sle=not args.no_sle).to(device)
    D = Discriminator(args.res, args.ndf, decoders=not args.no_recon).to(device)
    cl = args.channels_last != "off"
    if cl:  # with _GLUFn's backward, faster on CPU (oneDNN) and CUDA
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    return G, D, opt_G, opt_D, cl


def bench(args):
    """--bench N: common.run.bench of one training iteration + EMA on a fixed random batch; no data, no files."""
    device = Distributed(args.device).device
    seed_everything(args.seed)
    G, D, opt_G, opt_D, cl = build(args, device)
    G_ema, percept = make_ema(G), perceptual(args, device)
    real = torch.rand(args.batch, 3, args.res, args.res, device=device) * 2 - 1
    real = real.contiguous(memory_format=torch.channels_last) if cl else real
    G_run, D_run = compiled(G, args.compile), compiled(D, args.compile)

    def step():
        train_step(G_run, D_run, opt_G, opt_D, real, args, device, percept, D)
        ema_update(G_ema, G, args.ema)

    what = f"fastgan res {args.res} amp {args.amp} channels-last {cl} recon {args.recon},"
    return bench_steps({"fastgan": step}, args.bench, device, args.batch, what)


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
    seed_everything(args.seed + ddp.rank)
    percept = perceptual(args, device)  # method: the LPIPS weights (or one error line) before the data is read
    ds = load_dataset(args.data, args.res, args.data_root, args.crop)
    out = prepare_run_dir(args, METHOD, ddp.is_main)
    G, D, opt_G, opt_D, cl = build(args, device)  # method
    G_ema = make_ema(G)
    saved = {"G": G, "D": D, "G_ema": G_ema, "opt_G": opt_G, "opt_D": opt_D}  # checkpoint entry -> its object
    start, best = resume(ck, path, saved, ddp, args) if ck else (0, float("inf"))
    G_run, D_run = ddp.wrap(G), ddp.wrap(D, find_unused_parameters=True)  # method: D (no quadrant decoder)
    G_run, D_run = compiled(G_run, args.compile), compiled(D_run, args.compile)  # method: no double backward here

    def state(step, **extra):
        return checkpoint_state(METHOD, args, step, saved, best_fid=best, **extra)

    def ema_sampler():  # G_ema as eval.py samples it
        G_s = copy.deepcopy(G_ema) if args.sample_bn == "recompute" else G_ema  # method: --sample-bn recompute: a copy
        return Sampler(G_s, args.nz, device, args.sample_bn)  # method

    fixed_z = Sampler(G_ema, args.nz, device).latents(args.n_sample, args.seed + 12345)  # method
    evaluator = training_evaluator(ds, device, args, ddp.is_main)
    batches = infinite_batches(ds, batch, args.seed, start, flip=not args.no_flip, rank=ddp.rank, world=ddp.world,
                               workers=args.workers, device=device)
    if cl:  # method
        batches = (x.contiguous(memory_format=torch.channels_last) for x in batches)
    progress = Progress(args.iters, start, args.log_every, ddp.is_main, out)
    if ddp.is_main:
        print(f"{METHOD}: res {args.res} data {ds.name} ({len(ds)} images) G {count_params(G):,} D {count_params(D):,} "
              f"params, recon {args.recon}, device {device}, world {ddp.world}, out {out}", flush=True)  # method
    stop = StopOnInterrupt(ddp.is_main)  # Ctrl-C: finish the iteration, save last.pt, exit 130
    if setup:
        setup.done()
    step, sampler = start, None
    try:
        for it in range(start, args.iters):  # it: the iterations done before this one
            step, last = it + 1, it + 1 == args.iters
            real = next(batches)
            losses = train_step(G_run, D_run, opt_G, opt_D, real, args, device, percept, D)  # method
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
            if eval_now:
                m = evaluator(sampler.sample)
                log_metrics(out, {"iter": step, **m})
                print(f"eval it {step}: fid {m['fid']:.2f} kid {m['kid']:.4f} ({m['protocol']})", flush=True)
                if m["fid"] < best:
                    best = m["fid"]
                    save_checkpoint(state(step, metrics=m), os.path.join(out, "ckpt", "best.pt"))
            if step % args.ckpt_every == 0 and not last:
                save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
        if ddp.is_main:  # the end: last.pt (with --iters 0: the initial networks) and the style-mixing grid
            save_checkpoint(state(step), os.path.join(out, "ckpt", "last.pt"))
            if not args.no_sle:  # method: --no-sle has no SLE inputs to mix
                save_style_mix(sampler or ema_sampler(), os.path.join(out, "samples", "style_mix.png"), args.seed)
            print(f"done: {out} (samples/, ckpt/last.pt)", flush=True)
    finally:
        stop.restore()
        ddp.close()


# -------------------------------------------------------------------------------------- sampling (eval.py contract)
BN_SEED, BN_N, BN_CHUNK = 2_147_483_647, 512, 64  # bn=recompute: latent seed (far from eval.py's), count, chunk


class Sampler(SamplerBase):
    """G_ema, spectral norm in eval mode. noise=random: one stream per latent (the authors: torch.randn of the batch);
    const: one fixed map per layer (eval.py --export). bn: recompute = running statistics recomputed for these weights
    on BN_N latents; batch = each generate() call's statistics (the authors'); copy = G_ema's buffers."""
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
    def generate(self, z, z_style=None):  # z_style: the SLE inputs of z_style (style_mix)
        with batch_stat_bn(self.G, self.bn == "batch"):
            style = None
            if z_style is not None:
                with per_sample_noise(self.G, z_style, NoiseInjection, self.noise):  # the style pass: z_style's noise
                    style = self.G.style_features(z_style)
            with per_sample_noise(self.G, z, NoiseInjection, self.noise):
                return self.G(z, style=style)[0].float()

    def style_mix(self, lat_a, lat_b):
        """Paper Fig. 7: the main path (layout, content) of a, the SLE inputs x_low (style) of b, pairwise."""
        if not self.G.sle:
            raise UserError("style mixing swaps the SLE inputs: this generator, trained with --no-sle, has none")
        return self.generate(lat_a, lat_b)


def load_for_sampling(ckpt, device, bn=None, noise="random"):
    """Sampler for ckpt["G_ema"]; bn (eval.py --sampler-opt bn=...) defaults to the run's --sample-bn."""
    check_checkpoint(ckpt, f"given to {METHOD}.load_for_sampling", METHOD)
    a = ckpt["args"]
    G = Generator(a["res"], a["ngf"], a["nz"], sle=not a["no_sle"]).to(device)
    G.load_state_dict(ckpt["G_ema"])
    return Sampler(G, a["nz"], device, bn or a.get("sample_bn", "recompute"), noise)  # the Sampler checks bn


if __name__ == "__main__":
    main()
