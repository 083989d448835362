"""AdaFM: "On Leveraging Pretrained GANs for Limited-Data Generation" (Zhao, Cong & Carin, ICML 2020).

Transfer the low-level layers of a GP-GAN pretrained on ImageNet (Mescheder et al. 2018, "resnet2", 128 px) to a
small target set: the general part (G groups 3-5 + conv_img = "G4", D conv_img + group 0 = "D2") is copied and
frozen [Sec. 3.1]; the generator's specific part becomes a small style-based head [Fig. 1(g)]; the frozen 3x3 filters
are modulated by AdaFM, W' = gamma * W + beta with gamma, beta in R^{C_out x C_in} [eq. 2, Fig. 1(b), 1(h)].

Implemented: the source GP-GAN (authors' counts: G 100,535,747 / D 108,260,776 params, 1000 classes); the target G =
8-layer mapping + fc(z) + two style blocks (AdaIN, noise, shortcut) + rescaling + frozen G4 with AdaFM on its 12 3x3
convs (860,160 params); the target D = frozen D2 + source groups 1-5 + a new fc. Non-saturating loss + R1 on reals (the
authors' 10 = --r1 20), Adam(1e-4, betas (0, 0.99)), batch 16, EMA 0.999, 60k iterations, AdaFM from --adafm-start (10k)
[Sec. 4, appendix A]; style mixing [Fig. 12]. --mode: adafm (Fig. 1(h)) | fs (filter selection, 1(d)) | smallhead (1(g))
| gphead (1(f)) | transfergan (all fine-tuned) | scratch (1(h), random init) | gpgan (Table 1) | pretrain (train a
source, GAN_stability's recipe; --labels auto: class-conditional). --source: the authors' imagenet-8c505f47.pt
(downloaded once when not given) or a --mode pretrain checkpoint; its non-EMA G is transferred, fc/embedding skipped.

Deviations and choices (the detail is beside the code and in docs/adafm.md):
- Any resolution 32-1024: the first map is res / 32 (as GAN_stability's resnet2), all six groups kept.
- --head-scale auto: the head's rescaling w_c, b_c = the source head's feature std / mean (authors: w_c ~1000).
- The authors' unused label embedding of the head is left out: 25,185,792 head params (theirs 25,185,793).
- Mapping/AdaIN linears: the authors' N(0, 0.1) init with std x sqrt(256 / w_dim); --style-init he: He init.
- AdaIN sends the gradient to x through clamp(gamma, -1, 1), as the authors' code does.
- Step order: targets G step, then D on its detached fakes (AdaFM code); pretrain D then G (GAN_stability).
- --r1 is gamma of (gamma/2) E|dD/dx|^2 as in insgen: 20 = the authors' 10 x E|dD/dx|^2; below 128 px 20 (res/128)^2.
- scratch uses plain convs (AdaFM on trainable filters is redundant).
- Sampling noise and a conditional source's class are functions of each latent (batch-independent samples).
- FID/KID use common.metrics' protocol (TF Inception, all real images), not the paper's torchvision Inception.
- --compile takes G only (R1 needs D's double backward); --amp is bf16 autocast.

Run (from the repo root; --bench N: s/iteration on random data):
  python adafm.py --data flowers --res 128 --z-dim 64 --source imagenet-8c505f47.pt    # the paper's "Our", 60k its
  python adafm.py --mode pretrain --data digits --res 32 --nf 8 --z-dim 32 --w-dim 32 --batch 32 --iters 6000 \\
                  --out runs/src                                                      # a CPU toy source
  python adafm.py --data digits --res 32 --nf 8 --z-dim 32 --w-dim 32 --batch 16 --iters 3000 --adafm-start 500 \\
                  --r1 1.25 --source runs/src/ckpt/last.pt --out runs/adafm-digits
"""
import argparse
import itertools
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import batch_indices, infinite_batches, list_images, load_dataset, resolve_folder, to_device
from common.ema import ema_update, make_ema
from common.metrics import training_evaluator
from common.output import (check_checkpoint, check_flags, checkpoint_state, load_checkpoint, log_metrics,
                           prepare_run_dir, Progress, read_resume, resume, save_checkpoint, save_grid, writing)
from common.run import (add_common_args, autocast, bench as bench_steps, check_finite, compiled, count_params,
                        Distributed, seed_everything, SetupInterrupt, StopOnInterrupt, user_errors, UserError)
from common.sampling import check_noise_mode, latent_seeds, per_sample_noise, SamplerBase, save_style_mix
from common.weights import fetch, strip_module

METHOD = "adafm"
SOURCE_URL = "https://s3.eu-central-1.amazonaws.com/avg-projects/gan_stability/models/imagenet-8c505f47.pt"
# mode -> (G head, filter modulation, transfer from a source, freeze the G4D2 general part)
MODES = {"adafm": ("style", "adafm", True, True), "fs": ("style", "fs", True, True),
         "smallhead": ("style", None, True, True), "gphead": ("gp", None, True, True),
         "transfergan": ("gp", None, True, False), "scratch": ("style", None, False, False),
         "gpgan": ("gp", None, False, False), "pretrain": ("gp", None, False, False)}
G_CH = [(16, 16), (16, 16), (16, 8), (8, 4), (4, 2), (2, 1)]  # G group k: resnet_k_0 in->out, resnet_k_1 out->out, x nf
D_CH = [(1, 2), (2, 4), (4, 8), (8, 16), (16, 16), (16, 16)]  # D group k: resnet_k_0 in->in, resnet_k_1 in->out, x nf
G_GENERAL = [f"resnet_{k}_{i}" for k in (3, 4, 5) for i in (0, 1)] + ["conv_img"]   # "G4"
D_GENERAL = ["conv_img", "resnet_0_0", "resnet_0_1"]                                  # "D2"
ARCH_FLAGS = ("mode", "res", "nf", "z_dim", "w_dim", "embed_dim")  # they fix the networks (and nlabels, from the data)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, res=128, batch=None, iters=60000, lr=1e-4, sample_every=1000, ckpt_every=1000)
    p.set_defaults(crop="center")  # paper: resize, centre crop
    g = p.add_argument_group("algorithm specific")
    g.add_argument("--mode", choices=list(MODES), default="adafm", help="model/ablation (see the module docstring)")
    g.add_argument("--source", default=None, help="source checkpoint: the authors' imagenet-8c505f47.pt or a --mode "
                   "pretrain checkpoint (default: the official one, downloaded once into <torch hub dir>/checkpoints)")
    g.add_argument("--nf", type=int, default=64, help="channel width unit (GP-GAN: 64; channels nf*16 at the top)")
    g.add_argument("--z-dim", type=int, default=256, help="latent size (paper: 256 CelebA, 64 small sets; source 256)")
    g.add_argument("--w-dim", type=int, default=256, help="style (w) size of the mapping network")
    g.add_argument("--embed-dim", type=int, default=256, help="label embedding size of a conditional source (pretrain)")
    g.add_argument("--labels", choices=["none", "auto"], default="none", help="--mode pretrain: auto = conditional "
                   "on the digits classes or the first-level subfolders of --data")
    g.add_argument("--adafm-start", type=int, default=10000, help="AdaFM/FS gamma, beta train from this iteration on")
    g.add_argument("--r1", type=float, default=20.0, help="R1 weight gamma: (gamma / 2) * mean_b sum (dD(x)/dx)^2 on "
                   "reals, as in insgen.py (the authors' 10 * mean_b sum, set for 128 px: use 20 * (res / 128)^2)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the generator used for samples/eval")
    g.add_argument("--head-scale", default="auto", help="init of the per-channel rescaling w_c: auto (source feature "
                   "std/mean; 1 without a source) or a number (authors: ~1000 for the ImageNet source)")
    g.add_argument("--style-init", choices=["authors", "he"], default="authors", help="mapping/AdaIN linears: "
                   "authors = N(0, std 0.1 * sqrt(256 / w_dim)), bias 0; he = He mapping + PyTorch-default AdaIN")
    g.add_argument("--mix-block", type=int, default=1, help="style mixing: style blocks >= this take sample b's style")
    g.add_argument("--style-mix", type=int, default=5, help="N x N samples/style_mix.png at the end (Fig. 12); 0: off")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 128 if args.mode == "pretrain" else 16   # GAN_stability's source batch; the paper's target batch
    return args


# ------------------------------------------------ the paper's contribution: AdaFM [eq. 2, Fig. 1(b)], the style head
actvn = nn.LeakyReLU(0.2)   # GP-GAN's activation


class ModConv2d(nn.Conv2d):
    """3x3 conv. mod='adafm': W' = gamma * W + beta, gamma/beta [C_out, C_in, 1, 1] (eq. 2, Fig. 1(b));
    mod='fs': the rank-1 case, gamma/beta [C_out, 1, 1, 1] (filter selection, Fig. 1(d)); None: plain conv.
    W and the bias keep GP-GAN's names, so source keys load unchanged; gamma/beta start at 1/0 (identity)."""

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
    """GP-GAN block: x_s + 0.1 * conv_1(lrelu(conv_0(lrelu(x)))), hidden min(fin, fout), 1x1 shortcut if fin != fout."""

    def __init__(self, fin, fout, mod=None):
        super().__init__()
        self.conv_0, self.conv_1 = ModConv2d(fin, min(fin, fout), mod), ModConv2d(min(fin, fout), fout, mod)
        self.conv_s = nn.Conv2d(fin, fout, 1, bias=False) if fin != fout else None

    def forward(self, x):
        xs = x if self.conv_s is None else self.conv_s(x)
        return xs + 0.1 * self.conv_1(actvn(self.conv_0(actvn(x))))


def style_linear(fin, fout, init, w_dim):
    """Linear of the mapping / AdaIN. 'authors': their EqualLinear (its equal_lr is a no-op), N(0, 0.1^2), bias 0, the
    std x sqrt(256 / w_dim) so a narrow --w-dim keeps the per-layer gain; 'he': He (LReLU 0.2); 'torch': default."""
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
        self.style.bias.data = torch.cat([torch.ones(c), torch.zeros(c)])

    def forward(self, x, w):
        gamma, beta = self.style(w)[:, :, None, None].chunk(2, 1)
        n = F.instance_norm(x)
        gc = gamma.clamp(-1.0, 1.0)
        return gc * n + n.detach() * (gamma - gc) + beta


class Noise(nn.Module):
    """x + weight_c * N(0, 1)[B, 1, H, W]; weight init 0.1 * N(0, 1) per channel. The maps come from torch.randn
    (training) or, when set, from `self.noise_source(x)` (the Sampler's per-sample noise, common.sampling)."""
    noise_source = None

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(1, c, 1, 1))

    def forward(self, x):
        if self.noise_source is not None:
            return x + self.weight * self.noise_source(x)
        return x + self.weight * torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)


class StyleBlock(nn.Module):
    """Style block with shortcut (Fig. 1(c)): up(x) + 0.1 AdaIN(noise(conv3(lrelu(AdaIN(noise(convT(lrelu(x))))))))."""

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
    (Fig. 1(g,h)) in front of groups 3-5 + conv_img, whose 3x3 convs are AdaFM/FS-modulated when mod is set. The first
    map is res/32 wide (GAN_stability's resnet2): any resolution keeps all groups, channels and names, so the 128 px
    source transfers to 32 px too. The authors' unused head nn.Embedding(1, 1) (Flowers.yaml) is left out."""

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
            m = mod if k >= 3 else None   # scratch has mod None: AdaFM on trainable filters is redundant
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
    G = Generator(a.res, a.nf, a.z_dim, head, mod, nl, a.embed_dim, a.w_dim, a.style_init)
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
def source_state_dicts(ckpt, path="source"):
    """(G state dict, D state dict, description) from the authors' format or an adafm.py checkpoint."""
    if isinstance(ckpt, dict) and "generator" in ckpt and "discriminator" in ckpt:   # the non-EMA G, as the authors
        return strip_module(ckpt["generator"]), strip_module(ckpt["discriminator"]), "GAN_stability format, 'generator'"
    if isinstance(ckpt, dict) and ckpt.get("method") == METHOD and "G" in ckpt:
        return ckpt["G"], ckpt["D"], "adafm.py --mode {mode} --res {res} --nf {nf}".format(**ckpt["args"])
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
        model.load_state_dict({k: sd[k] for k in want}, strict=False)
        report[f"{name}_loaded"], report[f"{name}_new"] = want, [k for k in own if k not in want]
    return report


@torch.no_grad()
def calibrate_head(G, G_sd, n=32):
    """--head-scale auto: w_c, b_c = per-channel std, mean of the source head's features (fc + groups 0-2), so any
    source is fed at its own scale (the authors' w_c: a constant ~1000 for their ImageNet source)."""
    if "fc.weight" not in G_sd:
        raise UserError("--head-scale auto needs a GP-GAN source generator (with its fc layer): pass --head-scale N")
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
    """The top-level modules of state-dict keys ('resnet_3_0, conv_img, ...') for the transfer report."""
    return ", ".join(dict.fromkeys(k.split(".")[0] + (" gamma/beta" if k.endswith(("gamma", "beta")) else "")
                                   for k in keys)) or "-"


def dataset_labels(args, n):
    """Class labels for a conditional source: digits targets, or the first-level subfolder of each image."""
    if args.data == "digits":
        from sklearn.datasets import load_digits
        return torch.as_tensor(load_digits().target)
    folder = resolve_folder(args.data, args.data_root)
    parts = [os.path.relpath(p, folder).split(os.sep) for p in list_images(folder)]   # [class folder, ..., file]
    classes = sorted({q[0] for q in parts if len(q) > 1})   # any folder name, dots included
    if len(classes) < 2 or len(parts) != n or any(len(q) == 1 for q in parts):   # an image at the top: no class
        raise UserError(f"--labels auto needs all images in class subfolders of {folder} (found {len(classes)} "
                        "class folders) and all files readable: use --labels none")
    return torch.tensor([classes.index(q[0]) for q in parts])


# ------------------------------------------------------------------------------------------------- one iteration
def requires_grad(params, flag):
    for p in params:
        p.requires_grad_(flag)


def train_step(args, nets, opts, x, y):
    """One G step and one D step (non-saturating loss + R1 on the reals); returns detached losses. Targets (AdaFM code):
    the G step on z, then the D step on its fakes (made before the G update), detached. --mode pretrain (GAN_stability):
    the D step on fresh fakes G(z), then the G step on a new z. (The authors' EMA update between them is the same.)"""
    G, D, G_run, D_run, D_train = nets
    opt_G, opt_D, device = opts
    z = torch.randn(x.shape[0], args.z_dim, device=device)
    x = (x + torch.rand_like(x) / 128).requires_grad_(True)   # U[0, 1/128) dequantization (GAN_stability)

    def g_step(z):  # through the plain D: its DDP wrapper would wait for D's gradients, which are off here
        requires_grad(D_train, False)
        with autocast(device, args.amp):
            fake = G_run(z, y)
            loss_g = F.softplus(-D(fake, y).float()).mean()
        opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_G.step()
        return loss_g.detach(), fake.detach()

    if args.mode != "pretrain":
        loss_g, fake = g_step(z)
    else:
        with torch.no_grad(), autocast(device, args.amp):
            fake = G(z, y)   # the plain G: a no-grad pass needs no DDP
    requires_grad(D_train, True)
    with autocast(device, args.amp):   # reals and fakes separately (GAN_stability): R1's double backward sees the reals
        d_real, d_fake = D_run(x, y).float(), D_run(fake.to(x.dtype), y).float()
    grad, = torch.autograd.grad(d_real.sum(), x, create_graph=True)
    r1 = grad.float().pow(2).flatten(1).sum(1).mean()
    loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean() + args.r1 / 2 * r1   # Mescheder et al. eq. 9
    opt_D.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_D.step()
    if args.mode == "pretrain":
        loss_g, _ = g_step(torch.randn_like(z))
    return {"loss_d": loss_d.detach(), "loss_g": loss_g, "r1": r1.detach(), "d_real": d_real.detach().mean(),
            "d_fake": d_fake.detach().mean()}


# ------------------------------------------------------------------------------------------------- training run
# main -> check_args -> bench | run. Lines marked `# method` are AdaFM's; the rest is the loop every script shares.
def check_args(args):
    """Every flag, before any data is read or network built."""
    if args.res < 32 or args.res > 1024 or args.res & (args.res - 1):
        raise UserError(f"--res {args.res} is not supported: use a power of two from 32 to 1024 (128 = paper)")
    if not 0 <= args.mix_block <= 2:
        raise UserError("--mix-block must be 0, 1 or 2 (the head has two style blocks)")
    try:
        float(1 if args.head_scale == "auto" else args.head_scale)
    except ValueError:
        raise UserError(f"--head-scale {args.head_scale!r}: use 'auto' or a number") from None


def build_target(args, device, src=None, out=None):
    """The networks of --mode, ready to train: the general part of the source checkpoint `src` (a path; None: no
    transfer) transferred (report: <out>/transfer.json) and frozen, the head rescaling set, on the device with their
    optimizers. Returns G, D, opt_G, opt_D, the AdaFM/FS parameters and D's trainable parameters."""
    head, mod, transfer_mode, freeze = MODES[args.mode]
    G, D = build(args)
    scale, report = None if args.head_scale == "auto" else float(args.head_scale), None
    if transfer_mode and src:
        G_sd, D_sd, desc = source_state_dicts(load_checkpoint(src), src)
        report = transfer(G, D, G_sd, D_sd, src, desc)
        if head == "style" and scale is None:
            calibrate_head(G, G_sd)
    elif args.source and not transfer_mode and out:
        print(f"note: --source is ignored by --mode {args.mode} (random init)")
    if head == "style" and scale is not None:
        G.scale.data.fill_(scale)
    G_fro, G_ada, G_tr = split_params(G, G_GENERAL, freeze)
    D_fro, _, D_tr = split_params(D, D_GENERAL, freeze)
    requires_grad(G_fro + D_fro, False)
    if out:
        num = lambda ps: f"{sum(p.numel() for p in ps):,}"  # noqa: E731
        ada = f" + AdaFM/FS {num(G_ada)} (trained from iteration {args.adafm_start})" if G_ada else ""
        print(f"mode {args.mode}: G {count_params(G):,} params = trainable {num(G_tr)} + frozen {num(G_fro)}{ada} | "
              f"D {count_params(D):,} = trainable {num(D_tr)} + frozen {num(D_fro)}", flush=True)
    if report and out:
        for n, m in (("G", G), ("D", D)):
            fro = {k for k, p in m.named_parameters() if not p.requires_grad}
            report[n + "_frozen"] = [k for k in report[n + "_loaded"] if k in fro]
            print(f"transfer {n} ({desc}): loaded {len(report[n + '_loaded'])} tensors "
                  f"[{modules(report[n + '_loaded'])}]; frozen [{modules(report[n + '_frozen'])}]; "
                  f"new [{modules(report[n + '_new'])}]")
        report["source"] = src
        with writing(os.path.join(out, "transfer.json")) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=1)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    G, D = G.to(device, memory_format=fmt), D.to(device, memory_format=fmt)

    def opt(params):  # pretrain: GAN_stability's RMSprop; targets: Adam, fused on CUDA (the CPU keeps for-each)
        if args.mode == "pretrain":
            return torch.optim.RMSprop(params, lr=args.lr, alpha=0.99, eps=1e-8)
        return torch.optim.Adam(params, lr=args.lr, betas=(0.0, 0.99), eps=1e-8, fused=device.type == "cuda")
    return G, D, opt(G_tr + G_ada), opt(D_tr), G_ada, D_tr


def labelled_batches(ds, labels, args, batch, start, ddp):
    """Per iteration (real images, their class labels for a conditional source or None); channels-last on CUDA."""
    xs = infinite_batches(ds, batch, seed=args.seed, start_step=start, flip=not args.no_flip, rank=ddp.rank,
                          world=ddp.world, workers=args.workers, device=ddp.device)
    for it, x in zip(itertools.count(start), xs):
        y = None if labels is None else to_device(labels[batch_indices(len(ds), batch, args.seed, it, ddp.rank,
                                                                       ddp.world)], ddp.device)
        yield (x.contiguous(memory_format=torch.channels_last) if ddp.device.type == "cuda" else x), y


def bench(args):
    """--bench N: s/iteration (train_step + EMA) on a fixed random batch at --res/--batch, random weights, AdaFM/FS
    on; no data, no source, writes nothing. Returns {variant: s/iteration}."""
    device = Distributed(args.device).device
    seed_everything(args.seed)
    G, D, opt_G, opt_D, G_ada, D_tr = build_target(args, device)
    requires_grad(G_ada, True)
    G_ema = make_ema(G)
    x = torch.rand(args.batch, 3, args.res, args.res, device=device) * 2 - 1
    G_run = compiled(G, args.compile)

    def step():
        train_step(args, (G, D, G_run, D, D_tr), (opt_G, opt_D, device), x, None)
        ema_update(G_ema, G, args.ema)

    what = f"{args.res} px, nf {args.nf}{', amp' if args.amp else ''},"
    return bench_steps({f"adafm --mode {args.mode}": step}, args.bench, device, args.batch, what)


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
    src = fetch(SOURCE_URL, args.source, "--source") if not ck and MODES[args.mode][2] else None  # method
    seed_everything(args.seed + ddp.rank)
    ds = load_dataset(args.data, args.res, args.data_root, args.crop)
    labels = dataset_labels(args, len(ds)) if args.labels == "auto" and args.mode == "pretrain" else None  # method
    args.nlabels = int(labels.max()) + 1 if labels is not None else 0  # method
    if ck:  # method: the number of classes fixes the networks too
        check_flags(ck, path, args, ["nlabels"])
    out = prepare_run_dir(args, METHOD, ddp.is_main)
    G, D, opt_G, opt_D, G_ada, D_tr = build_target(args, device, src, out if ddp.is_main else None)  # method
    G_ema = make_ema(G)   # G, D have no buffers (no BatchNorm): the EMA averages parameters, DDP broadcasts none
    saved = {"G": G, "D": D, "G_ema": G_ema, "opt_G": opt_G, "opt_D": opt_D}  # checkpoint entry -> its object
    start, best = resume(ck, path, saved, ddp, args) if ck else (0, float("inf"))
    requires_grad(G_ada, start >= args.adafm_start)  # method: AdaFM/FS trains from --adafm-start (before the wrap)
    G_run, D_run = compiled(ddp.wrap(G), args.compile), ddp.wrap(D)  # method: compile G only (R1: D's double backward)

    def state(step, **extra):  # the checkpoint (resume() loads the same entries back)
        return checkpoint_state(METHOD, args, step, saved, best_fid=best, **extra)

    sampler = Sampler(G_ema, args.res, device, args.mix_block)  # method: G_ema as eval.py samples it
    fixed_z = sampler.latents(min(64, max(args.batch, 16)), seed=1234)
    evaluator = training_evaluator(ds, device, args, ddp.is_main)
    batches = labelled_batches(ds, labels, args, batch, start, ddp)  # method: (images, labels or None)
    progress = Progress(args.iters, start, args.log_every, ddp.is_main, out)
    stop = StopOnInterrupt(ddp.is_main)  # Ctrl-C: finish the iteration, save last.pt, exit 130
    if setup:
        setup.done()
    step = start
    try:
        for it in range(start, args.iters):  # it: the iterations done before this one
            step, last = it + 1, it + 1 == args.iters
            if G_ada and it == args.adafm_start:  # method: AdaFM/FS joins the G step: G's DDP wrapper is rebuilt
                requires_grad(G_ada, True)        # (DDP fixes its parameter list at wrap time)
                G_run = compiled(ddp.wrap(G), args.compile)
                if ddp.is_main:
                    print(f"AdaFM/FS parameters switched on at iteration {it}", flush=True)
            losses = train_step(args, (G, D, G_run, D_run, D_tr), (opt_G, opt_D, device), *next(batches))  # method
            ema_update(G_ema, G, args.ema)
            if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:
                if G_ada:  # method: how far AdaFM/FS moved from identity: mean of |gamma - 1|, |beta|
                    dev = [(m.gamma - 1).abs().sum() + m.beta.abs().sum() for m in G.modules() if getattr(m, "mod", 0)]
                    losses["adafm_dev"] = sum(dev).detach() / sum(p.numel() for p in G_ada)
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
            if MODES[args.mode][0] == "style" and args.style_mix > 0:  # method: the style head, an N x N grid
                save_style_mix(sampler, os.path.join(out, "samples", "style_mix.png"), args.seed,
                               args.style_mix, args.style_mix)
            print(f"done: {out} (samples/, ckpt/last.pt)", flush=True)
    finally:
        stop.restore()
        ddp.close()


# -------------------------------------------------------------------------------------- sampling (eval.py contract)
class Sampler(SamplerBase):
    """EMA generator. Each sample's noise maps (and a conditional source's class) are a function of its own latent
    (common.sampling): deterministic, distinct per sample, batch-independent (training draws fresh torch.randn maps).
    noise=const (sampler option): one fixed map per noise layer for all samples (what eval.py --export bakes in)."""
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
    def generate(self, z, styles=None):
        # a conditional source (--mode pretrain --labels auto): class = latent hash mod nlabels
        y = torch.tensor(latent_seeds(z), device=self.device) % self.G.nlabels if self.G.nlabels else None
        with per_sample_noise(self.G, z, Noise, self.noise):
            return self.G(z, y, styles).float()

    @SamplerBase.sampler_grad
    def style_mix(self, lat_a, lat_b, block=None):
        """Paper Fig. 12: z (fc) and styles of blocks < block from a; styles of blocks >= block from b."""
        if self.G.head != "style":
            raise UserError("style mixing needs the style-based head (--mode adafm, fs, smallhead or scratch)")
        block = self.mix_block if block is None else block
        wa, wb = self.G.style(lat_a), self.G.style(lat_b)
        return self.generate(lat_a, [wa if i < block else wb for i in range(2)])


def load_for_sampling(ckpt, device, mix_block=None, noise="random"):
    """The EMA generator of an adafm.py checkpoint; mix_block overrides --mix-block, noise=const picks fixed noise
    maps (eval.py --sampler-opt; see Sampler)."""
    check_checkpoint(ckpt, f"given to {METHOD}.load_for_sampling", METHOD)  # "checkpoint given to ... has format 1"
    a = argparse.Namespace(**ckpt["args"])
    G = build(a)[0]
    G.load_state_dict(ckpt["G_ema"])
    return Sampler(G.to(device), a.res, device, a.mix_block if mix_block is None else int(mix_block), noise)


if __name__ == "__main__":
    main()
