"""DISP: Data InStance Prior in GANs (Mangla, Kumari, Singh, Krishnamurthy, Balasubramanian, WACV 2022).

A conditional GAN whose condition is the feature C(x) of a real image under a frozen extractor pretrained on a
large source domain (ImageNet VGG16 fc7, ResNet50, or SimCLR ResNet50):
- G: ResNet generator (SNGAN-128 widths), conditional BN fed by [G_emb(C(x)) ; z_k] (BigGAN-style hierarchical z:
  z is split into one chunk for the 4x4 linear layer and one chunk per block); gain = 1 + Linear, bias = Linear.
  The supplementary states the hierarchical latent in the implementation details of its LARGE-SCALE (BigGAN)
  experiments only; for the few-shot SNGAN setting it says nothing. Using it there is our choice (one G design for
  every setting); --no-hier-z feeds all of z to the linear layer like the SNGAN reference.
- D: projection discriminator D(x, y) = D_emb(y) . D_f(x) + D_l(D_f(x)) (Miyato & Koyama 2018; paper Alg. 1 l.6).
- Hinge loss, the fake conditioned on the prior of the SAME real image (Alg. 1): L_D = E[relu(1 - D(x, C(x)))] +
  E[relu(1 + D(G(z|C(x)), C(x)))], L_G = -E[D(G(z|C(x)), C(x))]; --loss ns|wgan are the Table 10 variants.
- Spectral norm in G and D, --d-steps D updates per G update, EMA of G (used for samples / FID / eval.py).
- Priors are computed once for the training set and cached in <out>/priors.pt (an interrupted extraction keeps its
  finished rows in priors.pt.partial; rerunning the same command continues from them). --prior none is the paper's
  baseline: one learned embedding per training image (one-hot "priors" through the same G_emb / D_emb matrices).
- Options the paper combines with DISP: DiffAugment (--diffaug) + consistency regularisation (--cr), FreezeD
  (--freeze-d N), TransferGAN-style initialisation from a GAN checkpoint (--init-from, or --source for BigGAN).
- --arch biggan: BigGAN-PyTorch's G and D (Brock & Andonian; the paper's limited-data and CIFAR networks) with its
  module names, shapes, forward, its own spectral norm (buffers u0, sv0) and BN (stored_mean / stored_var): 128 px is
  its ImageNet model (ch 96, attention at 64 px, shared dim 128, z 120 = 6 x 20, ccbn input [c ; z_k] = 148; G
  70,433,988 / D 87,982,370 params with its class embeddings), loaded by key name from its published "138k"
  checkpoint with --source; 32 px is its CIFAR config arch[32] (ch 64, no attention) with shared dim 128 and
  hierarchical z 120 = 4 x 30. DISP replaces its class embeddings: c = G_emb(C(x)) (128-d) instead of shared(y),
  D_emb(C(x)) (16 * ch = 1536-d at 128 px) instead of embed(y).
- Sampling priors (eval.py --sampler-opt prior_mode=...): mixup (eq. 5, default), gmm (eq. 6), train, image
  (prior_from=IMAGE: variations of one image / "semantic diffusion").

Few-shot setting of the paper (supplementary): 128 px, batch 25, 4 D steps, lr 2e-4 (G and D), z 120, G_emb -> 128,
D feature 1024 (ch 64), 30k steps, EMA G, best-FID checkpoint; FreezeD freezes the first 5 D blocks. These are the
defaults. Resolutions 32, 64, 128, 256. No official code exists; the supplementary is the reference.

Implementation choices and deviations (the paper does not specify these):
- Images are resized to res x res without cropping (--crop squash, the default of every script here and what the
  FastGAN code does with the few-shot sets); the paper does not say how its images were cropped. --crop center
  centre-crops a square first.
- VGG16 prior = fc7 after ReLU, i.e. torchvision classifier[:5] in eval mode (4096-d); --prior-layer fc6|fc7|logits.
  ResNet50 / SimCLR prior = 2048-d global-average-pooled features. Images are resized (bilinear, antialias) from the
  training resolution to --prior-size (224) and normalised with ImageNet mean/std (SimCLR: [0,1], no normalisation).
  Priors are taken of the unflipped image; a flipped real keeps its image's prior.
- G_emb and D_emb are bias-free matrices ("learnable projection matrix"); D_emb, like all of D, is spectrally
  normalised, G_emb is not (BigGAN's shared embedding is not). Orthogonal init (BigGAN).
- Architectures per resolution: 128 is SNGAN-128 (G 1024,1024,512,256,128,64; D 64,128,256,512,1024,1024); 64 and 256
  follow BigGAN's width lists; 32 is BigGAN-CIFAR (4*ch everywhere), so its D feature is 4*ch = 256 at ch 64, not the
  paper's 1024. Global SUM pooling in D. Nearest up-sampling, average-pool down-sampling.
- Adam betas (0, 0.9) as in SNGAN (BigGAN uses (0, 0.999): --betas 0 0.999). EMA decay 0.9999 from step 1000
  (BigGAN / DiffAugment-BigGAN); before that the EMA copies G. BN running stats are copied into the EMA generator;
  samples, FID and eval.py recompute them for the EMA weights on 512 latents (--sample-bn; sampler option
  bn=recompute|batch|copy). Measured on the README toy run (digits 32 px, 300 its), 2,000 samples vs the
  1,797 digits: FID copy 114.7 / batch 112.9 / recompute 110.5 (KID 0.160 / 0.157 / 0.153, std ~0.0016); FastGAN's
  EMA generator shows the same order (54.7 / 47.4 / 46.9). The --prior none baseline is the exception: copy 133.4,
  recompute 151.1 (KID 0.193 / 0.220): its sampling latents are mixups of one-hot "priors", which it never saw in
  training, and statistics taken on them hurt. So --sample-bn auto (default) = recompute with a prior, copy with
  --prior none.
- Alg. 1 draws a new real batch for each D step; the G step reuses the priors of the last D step's batch.
- Consistency regularisation: --cr * mean((D(T1(x)) - D(T2(x)))^2) on reals in the D step, T1, T2 two independent
  DiffAugment draws (T1(x) is the D step's real input).
- GMM (sklearn GaussianMixture): fitted on at most gmm_max=200000 randomly chosen training priors with
  min(gmm_k=1000, N // 10) components; gmm_space=prior (default) fits the raw priors with 'diag' covariance (a full
  4096-d covariance per component does not fit in memory); gmm_space=emb is the paper's eq. 6: a 'full' covariance GMM
  on G_emb(priors) (128-d), mapped back to prior space with pinv(G_emb) so the Sampler latent stays [z ; prior].
- The checkpoint stores the training priors the Sampler needs (a seeded random subset of --ckpt-priors rows when the
  set is larger; eval.py can pass priors=<out>/priors.pt to use all of them).
- The baseline (--prior none) stores an N x N one-hot prior bank, so it is limited to N <= 20000 images.
- --init-from (TransferGAN) loads every tensor of G, D (and G_ema) whose name and shape match; the paper fine-tunes
  an ImageNet SNGAN / BigGAN, whose weights are not available here.
- BigGAN (paper: "G_emb and D_emb as linear transformation matrices"; bias, SN and init unstated): as on SNGAN,
  G_emb bias-free and not SN (BigGAN's `shared`, which it replaces, is not), D_emb bias-free and SN (BigGAN's
  `embed` is), both initialised like the layers they replace (orthogonal at 128 px, N(0, 0.02) at 32 px).
- --source: G and the EMA G start from G_ema.pth (--source-g G: from G.pth), the weights BigGAN-PyTorch evaluated
  and published (G.pth is the raw G of a run "taken just before collapse"; third-party code loads G_ema.pth and
  D.pth too); D from D.pth. Dropped: G shared.weight, D embed.* (class embeddings); everything else,
  BN statistics and SN vectors included, loads; a missing / extra / mis-shaped key is refused.
- FreezeD on BigGAN ("the first 4 layers of discriminator"): --freeze-d 4 freezes D's block groups blocks.0-3
  (blocks.0 with its self-attention blocks.0.1): BigGAN-PyTorch groups D into blocks.k, one residual block each, the
  unit the few-shot text counts ("the first five blocks"); blocks.4-5 (8 and 4 px), linear and D_emb train.
- --prior none on BigGAN is the supplementary's self-modulation baseline (Chen et al. 2019): c = G_emb(z), a
  bias-free linear map of the whole z into the 128-d space, so every ccbn gets [G_emb(z) ; z_k] through the same
  pretrained linears as with DISP (Chen et al. use a one-hidden-layer MLP per BN); D unconditional (no projection).
- --accum K splits every D and G step into K chunks (loss / K, gradients summed, one optimizer step). Equal to one
  big batch: losses, gradients, spectral norms (one power-iteration update per step: chunks 2..K reuse the first
  chunk's sigma) when G's BN uses running statistics (tested). Not equal in training: G's BN normalises each chunk
  with its own statistics and updates its running statistics K times (as BigGAN-PyTorch's own accumulation, with
  which its ImageNet model was trained); DiffAugment draws per chunk (same distribution).
- CUDA speed: fused Adam (CUDA only), cuDNN autotuner, the in-memory images kept on the GPU, pinned non-blocking
  copies, host syncs only at --log-every steps (common/); --compile (torch.compile) takes G and D (no double backward
  in DISP's losses; CR is a plain penalty). One H200, SNGAN 128 px batch 25, 4 D steps: 0.156 s/iteration fp32,
  0.215 --amp (README "Measured on one H200"); --arch biggan not measured on a GPU.
- Style mixing (Sampler.style_mix): the coarse half of G's blocks conditioned on sample a, the fine half on b; the
  end of a run writes samples/style_mix.png, the grid of eval.py --mix (common.utils.save_style_mix).

Run:      python disp.py --data path/to/100-shot-images --out runs/disp-anime          (paper few-shot setting)
          python disp.py --data digits --res 32 --ch 16 --batch 16 --iters 2000 --prior-weights random  (quick, CPU)
          python disp.py ... --diffaug color,translation,cutout --cr 10                    (DiffAugment + DISP)
          torchrun --nproc_per_node 4 disp.py ...                                         (multi-GPU)
Limited data, BigGAN 128 px (supplementary; 138k/ = BigGAN-PyTorch's pretrained ImageNet model from the README of
github.com/ajbrock/BigGAN-PyTorch; DATA e.g. FFHQ2k, Places2.5k, CUB6k; lr 2e-4, z 120, EMA G for evaluation;
Adam betas are unstated: BigGAN-PyTorch's 0 0.999; baseline = the same command with --prior none):
  B="--arch biggan --source 138k/ --data DATA --betas 0 0.999"
  TransferGAN + DISP: python disp.py $B --batch 256 --accum 4 --d-steps 1 --iters 5000 --ema-beta 0.999
  FreezeD + DISP:     python disp.py $B --batch 256 --accum 4 --d-steps 1 --iters 30000 --freeze-d 4
  DiffAugment + DISP: python disp.py $B --batch 32 --d-steps 4 --iters 30000 --diffaug translation,cutout,color --cr 1
  (DiffAugment baseline: --prior none --cr 10. The 128 px text gives CR 10 for DiffAugment; 1 with DISP is its
  CIFAR text. --ema-beta 0.999 for 5k steps: at 0.9999 the EMA would still be 67% the G of step 1000. --accum 4:
  chunks of 64, BN statistics per chunk (see above); whether 64 fits a GPU was not measured here.)
CIFAR, BigGAN 32 px (large-scale text: batch 64, 100k steps; 10%-data runs add DiffAugment, --cr 1 with DISP):
  python disp.py --arch biggan --res 32 --data path/to/cifar10-images --batch 64 --iters 100000 --betas 0 0.999
Sample:   python disp.py --sample runs/x/ckpt/last.pt --prior-mode gmm --out grids/       (or --prior-from img.png)
          python eval.py ... --sampler-opt prior_mode=gmm (mixup|gmm|train|image) --sampler-opt prior_from=img.png
          (other options: gmm_k, gmm_space=prior|emb, gmm_max, priors=<out>/priors.pt, prior_weights=PATH, psi)
Bench:    python disp.py --res 128 --bench 3 --prior-weights random
          (seconds/iteration of the few-shot 128 px setting on random images, and the extractor's seconds per image,
          i.e. the one-off prior extraction of N images takes N times that; writes nothing. Measured: README)
          python disp.py --arch biggan --res 128 --batch 8 --d-steps 1 --bench 3 --prior-weights random
Offline:  pretrained weights cannot be downloaded without internet: pass --prior-weights PATH (a torchvision
          state_dict, or SimCLR resnet50-1x.pth with a 'state_dict' key). --prior-weights random (random-init
          extractor) exists for tests and studies only: its priors carry no source-domain knowledge.
"""
import argparse
import copy
import itertools
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSN, spectral_norm

from common.data import batch_indices, infinite_batches, load_dataset, load_image, to_device, Dataset, ImageFiles
from common.diffaug import check_policy, diff_augment
from common.ema import ema_update, make_ema
from common.metrics import dataset_fingerprint, sha256_file, training_evaluator
from common.output import (FORMAT, check_checkpoint, load_checkpoint, log_metrics, prepare_run_dir, Progress,
                           read_resume, resume, rng_state, save_checkpoint, save_grid)
from common.run import (add_common_args, autocast, check_finite, compiled, count_params, Distributed, pick_device,
                        seed_everything, SetupInterrupt, StopOnInterrupt, time_steps, user_errors, UserError)
from common.sampling import batch_stat_bn, BN_MODES, check_bn_mode, recompute_bn_stats, SamplerBase, save_style_mix

METHOD = "disp"
G_ARCH = {32: [4, 4, 4, 4], 64: [16, 16, 8, 4, 2], 128: [16, 16, 8, 4, 2, 1], 256: [16, 16, 8, 8, 4, 2, 1]}  # x ch
D_ARCH = {32: [4, 4, 4, 4], 64: [1, 2, 4, 8, 16], 128: [1, 2, 4, 8, 16, 16], 256: [1, 2, 4, 8, 8, 16, 16]}
D_DOWN = {32: 2, 64: 4, 128: 5, 256: 6}  # the first D_DOWN[res] D blocks halve the resolution, the rest keep it
BIG_SN_EPS = {128: 1e-6, 32: 1e-8}  # --arch biggan: BigGAN-PyTorch's SN_eps (ImageNet 128 run; CIFAR script default)
PRIOR_LAYERS = {"vgg16": ["fc7", "fc6", "logits"], "resnet50": ["pool", "logits"], "simclr": ["pool", "logits"]}
ARCH_FLAGS = ("arch", "res", "ch", "z_dim", "emb_dim", "no_hier_z", "prior", "freeze_d")  # fix G, D, opt_D shapes
BIGGAN_FILES = ("G.pth", "G_ema.pth", "D.pth")  # BigGAN-PyTorch's pretrained ImageNet 128 px model (README, "138k")
SAMPLER_OPTS = ("prior_mode", "prior_from", "gmm_k", "gmm_space", "gmm_max", "priors", "prior_weights", "psi", "bn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, res=128, batch=25, iters=30000, lr=2e-4, sample_every=1000, ckpt_every=1000)
    g = p.add_argument_group("algorithm specific")
    g.add_argument("--arch", choices=["sngan", "biggan"], default="sngan",
                   help="sngan: SNGAN-128 ResNet (few-shot setting); biggan: BigGAN-PyTorch's G/D (128 px: its "
                   "ImageNet model, loadable with --source; 32 px: its CIFAR config): limited-data and CIFAR runs")
    g.add_argument("--source", nargs="+", default=None, metavar="PATH",
                   help="--arch biggan: start from BigGAN-PyTorch's pretrained ImageNet 128 px model: its folder (the "
                   "'138k' one: G.pth, G_ema.pth, D.pth) or those files; class embeddings are dropped (TransferGAN)")
    g.add_argument("--source-g", choices=["G_ema", "G"], default="G_ema",
                   help="with --source: the file G (and the EMA G) start from")
    g.add_argument("--big-init", choices=["auto", "ortho", "N02"], default="auto", help="--arch biggan weight init: "
                   "orthogonal or N(0, 0.02); auto: ortho at 128 px (ImageNet run), N02 at 32 px (CIFAR script)")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation: each D and G step in K chunks of "
                   "batch / K (one optimizer step per batch; BN sees the chunks, see the docstring)")
    g.add_argument("--prior", choices=["vgg16", "resnet50", "simclr", "none"], default="vgg16",
                   help="frozen extractor C giving the data instance prior; none = baseline, one learned embedding per image")
    g.add_argument("--prior-layer", default="auto",
                   help="vgg16: fc7 (default, after ReLU) | fc6 | logits; resnet50/simclr: pool (default) | logits")
    g.add_argument("--prior-weights", default="default",
                   help="default (torchvision ImageNet weights via the torch.hub cache) | PATH (local state_dict; needed "
                        "for simclr) | random (random-init extractor: for tests and studies only)")
    g.add_argument("--prior-size", type=int, default=224, help="extractor input size (images are resized to it)")
    g.add_argument("--max-images", type=int, default=0, help="use only the first N training images (0: all); e.g. 100-shot")
    g.add_argument("--ch", type=int, default=0, help="channel width multiplier of G and D; 0: 64 (SNGAN-128, "
                   "BigGAN-CIFAR), 96 with --arch biggan --res 128 (BigGAN-PyTorch's ImageNet model)")
    g.add_argument("--z-dim", type=int, default=120, help="latent z dimension")
    g.add_argument("--emb-dim", type=int, default=128, help="G_emb output: generator conditional space")
    g.add_argument("--no-hier-z", action="store_true", help="feed all of z to the 4x4 linear layer (no hierarchical z)")
    g.add_argument("--d-steps", type=int, default=4, help="D updates per G update")
    g.add_argument("--loss", choices=["hinge", "ns", "wgan"], default="hinge", help="GAN loss (supp. Table 10)")
    g.add_argument("--betas", type=float, nargs=2, default=[0.0, 0.9], help="Adam betas (SNGAN 0 0.9; BigGAN 0 0.999)")
    g.add_argument("--ema-beta", type=float, default=0.9999, help="EMA decay of G")
    g.add_argument("--ema-start", type=int, default=1000, help="EMA copies G before this iteration")
    g.add_argument("--sample-bn", choices=("auto",) + BN_MODES, default="auto",
                   help="BatchNorm of the EMA generator in sample grids, FID and eval.py: recompute (statistics "
                   "recomputed for the EMA weights on 512 latents), batch or copy; auto = recompute with a prior, "
                   "copy with --prior none (the best FID of each, see the docstring)")
    g.add_argument("--diffaug", default="", help="DiffAugment policy for every D input, e.g. color,translation,cutout")
    g.add_argument("--cr", type=float, default=0.0, help="consistency regularisation weight; needs --diffaug (paper: 10 for DiffAugment runs, 1 for DISP + "
                        "DiffAugment on CIFAR)")
    g.add_argument("--freeze-d", type=int, default=0, help="FreezeD: freeze the first N D blocks (paper: 5)")
    g.add_argument("--init-from", default=None,
                   help="TransferGAN: initialise G, D from this GAN checkpoint (tensors with matching names and shapes)")
    g.add_argument("--ckpt-priors", type=int, default=10000, help="at most this many training priors stored in checkpoints")
    g.add_argument("--sample", default=None, help="sampling only: write a grid from this checkpoint to --out and exit")
    g.add_argument("--prior-mode", default="mixup", help="with --sample: mixup | gmm | train | image")
    g.add_argument("--prior-from", default=None, help="with --sample: variations of this image (prior_mode image)")
    g.add_argument("--n", type=int, default=36, help="with --sample: number of images")
    a = p.parse_args(argv)
    a.ch = a.ch or (96 if a.arch == "biggan" and a.res == 128 else 64)
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
        x = (x.float() + 1) / 2
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.net(x).flatten(1).float()


def build_extractor(prior, layer="auto", weights="default", size=224):
    """The frozen feature extractor C. Random init is seeded (0) so a checkpoint can rebuild the same C."""
    import torchvision.models as tvm
    layer = PRIOR_LAYERS[prior][0] if layer == "auto" else layer
    if layer not in PRIOR_LAYERS[prior]:
        raise UserError(f"--prior-layer {layer} is not available for {prior}: use one of {PRIOR_LAYERS[prior]}")
    sd = None if weights == "random" else _state_dict(prior, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = tvm.vgg16() if prior == "vgg16" else tvm.resnet50()
    if sd is not None:
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise UserError(f"--prior-weights {weights} does not fit torchvision's {prior}: {' '.join(str(e).split())[:200]}")
    if prior == "vgg16":  # classifier = [fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8]
        k = {"fc6": 2, "fc7": 5, "logits": 7}[layer]
        net = nn.Sequential(net.features, net.avgpool, nn.Flatten(1), net.classifier[:k])
    elif layer == "pool":
        net.fc = nn.Identity()
    return Extractor(net, size, normalize=prior != "simclr")


# --------------------------------------------------------------------------- sampling priors: mixup [eq. 5], GMM [6]
def mixup_priors(priors, n, gen):
    """Vicinal mixup (eq. 5): lam * p_i + (1 - lam) * p_j, lam ~ U[0,1], i, j uniform."""
    i, j = torch.randint(len(priors), (2, n), generator=gen)
    lam = torch.rand(n, 1, generator=gen)
    return lam * priors[i] + (1 - lam) * priors[j]


class PriorGMM:
    """sklearn GaussianMixture on (a subset of) the priors; sampled with a torch Generator (deterministic in seed)."""

    def __init__(self, priors, k=1000, space="prior", max_n=200000, emb=None, seed=0):
        from sklearn.mixture import GaussianMixture
        x = priors.double()
        if len(x) > max_n:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_n]]
        self.back = None
        if space == "emb":  # eq. 6: fit on G_emb(priors); map samples back with pinv(G_emb)
            W = emb.double().cpu()
            x, self.back = x @ W.t(), torch.linalg.pinv(W).t()
        elif space != "prior":
            raise UserError(f"gmm_space={space}: use prior or emb")
        self.cov = "full" if space == "emb" else "diag"
        k = max(1, min(int(k), len(x) // 10))
        gm = GaussianMixture(k, covariance_type=self.cov, random_state=seed, reg_covar=1e-4, max_iter=100).fit(x.numpy())
        self.w, self.mu = torch.from_numpy(gm.weights_), torch.from_numpy(gm.means_)
        cov = torch.from_numpy(gm.covariances_)
        self.scale = cov.sqrt() if self.cov == "diag" else torch.linalg.cholesky(cov)
        self.k = k

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
    """BigGAN-PyTorch's spectral norm, mixed into nn.Conv2d / nn.Linear / nn.Embedding (keys weight, bias, u0, sv0):
    every call does one power step from the buffer u0 [1, n_out]; train mode writes u back to u0 and sigma to sv0
    (logging only), eval mode writes nothing. sn_held (gradient accumulation): reuse the previous call's u, v."""
    sn_held = False

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


class BigEmbedding(nn.Embedding, BigSN):
    def __init__(self, n, dim, eps=1e-6):
        super().__init__(n, dim)
        self.sn_init(eps)

    def forward(self, y):
        return F.embedding(y, self.sn_weight())


class BigBN(nn.modules.batchnorm._BatchNorm):
    """BigGAN-PyTorch's BN: buffers stored_mean / stored_var (no num_batches_tracked), momentum 0.1. With cond_dim its
    ccbn (= CBN: gain = 1 + gain(y), bias = bias(y), SN linears without bias), else its output bn (affine parameters
    gain / bias). A _BatchNorm (running_mean / running_var alias the stored_* buffers), so that the sampler's
    bn=batch|recompute (common.utils) see it; track_running_stats False: batch statistics, buffers left alone."""
    running_mean = property(lambda self: self.stored_mean)
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

    def __init__(self, res, ch, z_dim, prior_dim, emb_dim=128, hier=True):
        super().__init__()
        widths = [m * ch for m in G_ARCH[res]]
        n = len(widths) - 1
        slots = n + 1 if hier else 1
        self.z_sizes = [z_dim - (slots - 1) * (z_dim // slots)] + [z_dim // slots] * (slots - 1)  # rest -> 4x4 slot
        self.hier, self.c0 = hier, widths[0]
        self.emb = nn.Linear(prior_dim, emb_dim, bias=False)  # G_emb
        self.linear = sn_linear(self.z_sizes[0], widths[0] * 16)
        cond = emb_dim + (self.z_sizes[1] if hier else 0)
        self.blocks = nn.ModuleList(GBlock(widths[i], widths[i + 1], cond) for i in range(n))
        self.out = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), sn_conv(widths[-1], 3), nn.Tanh())
        init_weights(self)

    def conds(self, z, prior):
        e = self.emb(prior)
        if not self.hier:
            return z, [e] * len(self.blocks)
        zs = torch.split(z, self.z_sizes, 1)
        return zs[0], [torch.cat([e, zk], 1) for zk in zs[1:]]

    def synth(self, z0, ys):
        h = self.linear(z0).view(z0.shape[0], self.c0, 4, 4)
        for blk, y in zip(self.blocks, ys):
            h = blk(h, y)
        return self.out(h)

    def forward(self, z, prior):
        return self.synth(*self.conds(z, prior))


class BigGenerator(Generator):
    """BigGAN-PyTorch's G with its key names (G.pth / G_ema.pth load by name; 70,433,988 params at 128 px, ch 96, with
    its 1000-class `shared`). Hierarchical z: z_dim / (blocks + 1) per slot, block k gets [c ; z_k]. The condition c:
    G_emb(prior) (DISP, `emb`); with prior_dim 0 G_emb(z) (self-modulated BN, the --prior none baseline); with
    n_classes BigGAN's own shared(y) (y: class labels). Attention after the block whose output is 64 px (128 only)."""

    def __init__(self, res, ch, z_dim, prior_dim, emb_dim=128, n_classes=0, init="auto"):
        nn.Module.__init__(self)
        widths, eps = [m * ch for m in G_ARCH[res]], BIG_SN_EPS[res]
        n = len(widths) - 1
        self.z_sizes, self.c0, self.hier = [z_dim // (n + 1)] * (n + 1), widths[0], True
        if n_classes:
            self.shared = nn.Embedding(n_classes, emb_dim)
        else:
            self.emb = nn.Linear(prior_dim or z_dim, emb_dim, bias=False)  # G_emb
        self.self_mod = not (n_classes or prior_dim)
        self.linear = BigLinear(self.z_sizes[0], widths[0] * 16, eps=eps)
        self.blocks = nn.ModuleList(nn.ModuleList([BigGBlock(widths[i], widths[i + 1], emb_dim + self.z_sizes[1], eps)]
                                                  + ([Attention(widths[i + 1], eps)] if 8 << i == 64 < res else []))
                                    for i in range(n))
        self.output_layer = nn.Sequential(BigBN(widths[-1]), nn.ReLU(), BigConv(widths[-1], 3, eps=eps))
        if init:
            big_init(self, res, init)

    def conds(self, z, prior):
        c = self.shared(prior) if hasattr(self, "shared") else self.emb(z if self.self_mod else prior)
        zs = torch.split(z, self.z_sizes, 1)
        return zs[0], [torch.cat([c, zk], 1) for zk in zs[1:]]

    def synth(self, z0, ys):
        h = self.linear(z0).view(z0.shape[0], self.c0, 4, 4)
        for blk, y in zip(self.blocks, ys):
            for m in blk:
                h = m(h, y)
        return torch.tanh(self.output_layer(h))


class DBlock(nn.Module):  # (ReLU)-conv3-ReLU-conv3-(avgpool), shortcut conv1-(avgpool); optimized: first block
    def __init__(self, cin, cout, down, first=False):
        super().__init__()
        self.conv1, self.conv2, self.down, self.first = sn_conv(cin, cout), sn_conv(cout, cout), down, first
        self.sc = sn_conv(cin, cout, 1) if (cin != cout or down) else None

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        s = x
        if self.first:  # SNGAN OptimizedBlock: avgpool then conv1 on the shortcut
            s = F.avg_pool2d(s, 2) if self.down else s
            return (F.avg_pool2d(h, 2) if self.down else h) + self.sc(s)
        s = self.sc(s) if self.sc is not None else s
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class BigDBlock(DBlock):
    """BigGAN-PyTorch's DBlock (D_wide): DBlock's forward (the first block pools before conv_sc, the preactivation
    ones after) with BigGAN's SN and key names; no conv_sc when the block keeps channels and resolution."""
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
        for b in self.blocks:
            x = b(x)
        return F.relu(x).sum(dim=(2, 3))

    def forward(self, x, prior):
        f = self.features(x)
        return (self.emb(prior) * f).sum(1) + self.l(f).squeeze(1)


class BigDiscriminator(Discriminator):
    """BigGAN-PyTorch's D with its key names (D.pth loads by name; 87,982,370 params at 128 px, ch 96, with its
    1000-class `embed`): linear(D_f(x)) + D_emb(prior) . D_f(x) (DISP, `emb`, SN); BigGAN's own SN embed(y) with
    n_classes; unconditional with prior_dim 0 (the self-modulation baseline). Attention after block 0 (64 px) at 128."""

    def __init__(self, res, ch, prior_dim, n_classes=0, init="auto"):
        nn.Module.__init__(self)
        widths, eps = [3] + [m * ch for m in D_ARCH[res]], BIG_SN_EPS[res]
        self.blocks = nn.ModuleList(nn.ModuleList([BigDBlock(widths[i], widths[i + 1], i < D_DOWN[res], i == 0, eps)]
                                                  + ([Attention(widths[1], eps)] if i == 0 and res == 128 else []))
                                    for i in range(len(widths) - 1))
        self.feat_dim = widths[-1]
        self.linear = BigLinear(widths[-1], 1, eps=eps)  # D_l
        if n_classes:
            self.embed = BigEmbedding(n_classes, widths[-1], eps)
        elif prior_dim:
            self.emb = BigLinear(prior_dim, widths[-1], bias=False, eps=eps)  # D_emb
        if init:
            big_init(self, res, init)

    def features(self, x):  # D_f
        for blk in self.blocks:
            for m in blk:
                x = m(x)
        return F.relu(x).sum(dim=(2, 3))

    def forward(self, x, prior):
        f = self.features(x)
        out = self.linear(f).squeeze(1)
        proj = self.embed(prior) if hasattr(self, "embed") else self.emb(prior) if hasattr(self, "emb") else None
        return out if proj is None else out + (proj * f).sum(1)


def big_init(m, res, kind="auto"):
    """BigGAN-PyTorch's init: the weight (not the bias) of every conv / linear / embedding re-drawn orthogonal
    ('ortho', its 128 px run) or N(0, 0.02) ('N02', its CIFAR script); auto: ortho at 128 px, N02 at 32 px."""
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, nn.Embedding)):
            if kind == "ortho" or kind == "auto" and res == 128:
                nn.init.orthogonal_(mod.weight)
            else:
                nn.init.normal_(mod.weight, 0, 0.02)


def init_weights(m):
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.parametrizations.weight.original if hasattr(mod, "parametrizations") else mod.weight
            nn.init.orthogonal_(w.data.view(w.shape[0], -1))
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


def build_models(args, prior_dim):
    if args.res not in G_ARCH:
        raise UserError(f"--res {args.res} is not supported by disp.py: use one of {sorted(G_ARCH)}")
    if getattr(args, "arch", "sngan") == "biggan":
        init = getattr(args, "big_init", "auto")
        return (BigGenerator(args.res, args.ch, args.z_dim, prior_dim, args.emb_dim, init=init),
                BigDiscriminator(args.res, args.ch, prior_dim, init=init))
    G = Generator(args.res, args.ch, args.z_dim, prior_dim, args.emb_dim, hier=not args.no_hier_z)
    D = Discriminator(args.res, args.ch, prior_dim)
    return G, D


# ----------------------------------------------------- the prior bank: extracted once, cached in <out>/priors.pt
def _state_dict(prior, weights):
    import torchvision.models as tvm
    if weights != "default":
        if not os.path.isfile(weights):
            raise UserError(f"--prior-weights {weights}: no such file (a torchvision {prior} state_dict)")
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read --prior-weights {weights} ({type(e).__name__}): is it a PyTorch state_dict?")
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        return {k.removeprefix("module."): v for k, v in sd.items()}
    if prior == "simclr":
        raise UserError("--prior simclr needs --prior-weights PATH: SimCLR v1 ResNet50-1x converted to PyTorch "
                        "(resnet50-1x.pth, e.g. with github.com/tonylins/simclr-converter)")
    w = tvm.VGG16_Weights.IMAGENET1K_V1 if prior == "vgg16" else tvm.ResNet50_Weights.IMAGENET1K_V1
    try:
        return w.get_state_dict(progress=True)
    except Exception as e:
        raise UserError(f"cannot get the ImageNet {prior} weights ({type(e).__name__}: {str(e)[:120]}): offline? download "
                        f"{w.url} into {os.path.join(torch.hub.get_dir(), 'checkpoints')} or pass --prior-weights PATH "
                        "(--prior-weights random is for tests/studies only)")


def prior_settings(args):
    """The part of prior_key that needs no data (compared with a --resume checkpoint before any data is read)."""
    w = args.prior_weights
    if os.path.isfile(w):
        w = f"{os.path.basename(w)}:{sha256_file(w)[:16]}"
    return {"res": args.res, "prior": args.prior, "layer": args.prior_layer, "weights": w, "size": args.prior_size}


def prior_key(args, ds):
    """What the priors depend on: the images themselves (pixels, or paths+sizes+mtimes), extractor, layer, weights
    (a local file by content), input size. Kept with the cache and in every checkpoint."""
    return {"data": f"{ds.name}:{dataset_fingerprint(ds, range(len(ds)))[:16]}", "n": len(ds), **prior_settings(args)}


PRIOR_SAVE_S = 30.0  # the partial prior cache is rewritten at most this often (and at least 10x its write time apart)


def get_priors(ds, args, device, cache_path, key=None, chunk=64):
    """[N, d] priors C(x) of every training image: loaded from cache_path when its key matches, else computed once,
    `chunk` images per extractor call. The finished rows are kept in <cache_path>.partial (with the key) every
    PRIOR_SAVE_S seconds and when the extraction stops (Ctrl-C, error): a rerun with the same key continues at the
    first missing row, with the same chunk boundaries (the same numbers as an uninterrupted extraction)."""
    key = key or prior_key(args, ds)
    if os.path.isfile(cache_path):
        c = torch.load(cache_path, map_location="cpu", weights_only=True)
        if c.get("key") == key:
            return c["priors"], 0.0
        print(f"priors: {cache_path} was made with other settings; recomputing", flush=True)
    partial = cache_path + ".partial"
    if args.prior == "none" and getattr(args, "arch", "sngan") == "biggan":  # self-modulation: no prior at all
        priors, dt = torch.zeros(len(ds), 0), 0.0
    elif args.prior == "none":  # baseline: one one-hot row per image -> G_emb / D_emb columns are per-image embeddings
        if len(ds) > 20000:
            raise UserError(f"--prior none keeps an N x N one-hot bank: {len(ds)} images is too many (use --max-images)")
        priors, dt = torch.eye(len(ds)), 0.0
    else:
        t0, N, rows = time.time(), len(ds), []
        if os.path.isfile(partial):
            try:
                c = torch.load(partial, map_location="cpu", weights_only=True)
            except Exception:  # unreadable (e.g. a full disk): start over
                c = {}
            if isinstance(c, dict) and c.get("key") == key and len(c["priors"]) <= N:
                rows = [c["priors"]]
                print(f"priors: resuming the extraction at row {len(c['priors'])} of {N} ({partial})", flush=True)
        done = saved = sum(len(r) for r in rows)

        def keep():  # finished rows -> <cache>.partial (temp file + rename)
            nonlocal saved
            save_checkpoint({"key": key, "priors": torch.cat(rows)}, partial)
            saved = done

        try:
            C = build_extractor(args.prior, args.prior_layer, args.prior_weights, args.prior_size).to(device)
            if ds.images is not None:
                chunks = (ds.images[i:i + chunk] for i in range(done, N, chunk))
            else:
                chunks = torch.utils.data.DataLoader(torch.utils.data.Subset(ds.files, range(done, N)),
                                                     batch_size=chunk, num_workers=args.workers)
            t_keep, every = time.time(), PRIOR_SAVE_S
            for xb in chunks:
                rows.append(C(xb.to(device).float() / 127.5 - 1).cpu())
                done += len(xb)
                if done < N and time.time() - t_keep >= every:
                    t = time.time()
                    keep()
                    t_keep, every = time.time(), max(PRIOR_SAVE_S, 10 * (time.time() - t))  # writes <= 10% of the time
                    print(f"priors: {done}/{N} rows (kept in {partial})", flush=True)
        except BaseException as e:  # Ctrl-C or an error: keep the finished rows, a rerun continues from them
            if done > saved:
                keep()
            if isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt(f"prior extraction {done}/{N} rows saved in {partial}; rerun the same "
                                        "command to continue") from None
            raise
        priors = torch.cat(rows)
        dt = time.time() - t0
        layer = PRIOR_LAYERS[args.prior][0] if args.prior_layer == "auto" else args.prior_layer
        print(f"priors: {args.prior} ({layer}, weights {args.prior_weights}) of {len(ds)} images -> "
              f"{tuple(priors.shape)} in {dt:.1f} s (cached at {cache_path})", flush=True)
    save_checkpoint({"key": key, "priors": priors}, cache_path)
    if os.path.isfile(partial):
        os.remove(partial)
    return priors, dt


def check_prior_key(have, want, what):
    """A generator trained on one prior bank must not silently continue/sample with another (same shape, other data)."""
    if have is not None and want is not None and have != want:
        diff = ", ".join(f"{k}: {have.get(k)} vs {want.get(k)}" for k in want if have.get(k) != want.get(k))
        raise UserError(f"{what} were made from other images or another extractor ({diff}): "
                        "use the run's own --data/--prior flags and priors.pt, or start a new --out")


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
    spectral norms of `nets` reuse the sigma of the first chunk (no power-iteration update), as one whole batch would
    (what differs from one batch: BatchNorm in G normalises each chunk with its own statistics and updates its
    running statistics K times, as in BigGAN-PyTorch's own accumulation)."""
    sn = [m for n in nets for m in n.modules() if isinstance(m, (BigSN, TorchSN))] if k else []
    modes = [(m.training, m.sn_held) if isinstance(m, BigSN) else (m.training, None) for m in sn]
    for m in sn:
        if isinstance(m, BigSN):
            m.sn_held = True
        else:
            m.training = False  # torch's spectral norm: eval mode = sigma from the stored u, v (no update)
    try:
        with ddp.no_sync() if k < K - 1 and hasattr(ddp, "no_sync") else nullcontext():
            yield
    finally:
        for m, (training, held) in zip(sn, modes):
            m.training = training
            if held is not None:
                m.sn_held = held


def train_step(G, D, opt_G, opt_D, real, args, device, G_plain=None, D_plain=None):
    """Alg. 1: one D update per (x, p) pair of `real` (--d-steps of them: a real batch x and its priors p = C(x)),
    each with the fake G(z | p) conditioned on the SAME priors (lines 3-10), then one G update with the priors of
    the last pair (lines 11-15). G, D may be DDP wrappers; G_plain, D_plain are the networks themselves (no-grad
    fakes; the G step's D, without gradient sync and without D weight gradients). Returns detached losses."""
    G_plain, D_plain = G_plain or G, D_plain or D
    aug = (lambda x: diff_augment(x, args.diffaug)) if args.diffaug else (lambda x: x)
    d_params = [q for q in D_plain.parameters() if q.requires_grad]  # FreezeD: the frozen blocks stay out
    K = getattr(args, "accum", 1)  # --accum: every step in K chunks, gradients summed (loss / K), one optimizer step
    for x, p in real:
        B = x.shape[0]
        z = torch.randn(B, args.z_dim, device=device)
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
    for q in d_params:
        q.requires_grad_(False)
    z = torch.randn(B, args.z_dim, device=device)
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


def ema_beta(args, it):
    """EMA decay after iteration it + 1: --ema-beta from --ema-start on, 0 (a copy of G) before."""
    return args.ema_beta if it >= args.ema_start else 0.0


# ------------------------------------------------------------------------------------------------- training run
# main -> check_args -> bench | run. run() is the same text in fastgan.py, insgen.py, adafm.py and disp.py except
# the lines marked `# method`: data, networks, resume, DDP, sampler and evaluator, then the loop (batch, train_step,
# EMA, progress, Ctrl-C, samples, evaluation, checkpoint), then last.pt and the style-mixing grid.
def check_args(args):
    """Every flag, before any data is read, prior extracted or network built."""
    if args.res not in G_ARCH:
        raise UserError(f"--res {args.res} is not supported by disp.py: use one of {sorted(G_ARCH)}")
    check_policy(args.diffaug, "--diffaug")
    if args.prior != "none" and args.prior_layer not in ["auto"] + PRIOR_LAYERS[args.prior]:
        raise UserError(f"--prior-layer {args.prior_layer} is not available for {args.prior}: {PRIOR_LAYERS[args.prior]}")
    if args.freeze_d < 0 or args.freeze_d >= len(D_ARCH.get(args.res, [])):
        raise UserError(f"--freeze-d {args.freeze_d}: must be in [0, number of D blocks - 1]")
    if args.arch == "biggan" and args.res not in (32, 128):
        raise UserError(f"--arch biggan --res {args.res}: BigGAN-PyTorch's configs are 128 (ImageNet) and 32 (CIFAR)")
    slots = len(G_ARCH[args.res])
    if args.arch == "biggan" and (args.no_hier_z or args.z_dim % slots):
        raise UserError(f"--arch biggan always splits z into {slots} equal chunks: --z-dim must be a multiple of "
                        f"{slots} (paper: 120), without --no-hier-z")
    if args.source and (args.arch != "biggan" or args.res != 128 or args.init_from):
        raise UserError("--source is BigGAN-PyTorch's ImageNet 128 px model: use it with --arch biggan --res 128 and "
                        "without --init-from (--init-from takes this script's own checkpoints)")
    if args.accum < 1 or args.batch % (args.accum * int(os.environ.get("WORLD_SIZE", 1))):
        raise UserError(f"--accum {args.accum}: must be >= 1 and divide the per-process batch ({args.batch})")
    if args.cr and not args.diffaug:
        raise UserError("--cr compares two DiffAugment views of the reals; without --diffaug it is 0: add e.g. "
                        "--diffaug translation,cutout,color")


def prior_batches(ds, priors, args, batch, start, dist):
    """Per iteration the --d-steps real batches of Alg. 1, each with the priors of its images (rows of `priors`)."""
    xs = infinite_batches(ds, batch, args.seed, start * args.d_steps, not args.no_flip, dist.rank, dist.world,
                          args.workers, dist.device)
    for it in itertools.count(start):
        yield [(next(xs), priors[to_device(batch_indices(len(ds), batch, args.seed, it * args.d_steps + t, dist.rank,
                                                         dist.world), dist.device)]) for t in range(args.d_steps)]


def build(args, prior_dim, device):
    """G, D (the first --freeze-d D blocks frozen: FreezeD) and the Adams of their trainable parameters."""
    G, D = build_models(args, prior_dim)
    G, D = G.to(device), D.to(device)
    for blk in D.blocks[:args.freeze_d]:  # FreezeD
        blk.requires_grad_(False)
    fused = torch.device(device).type == "cuda"  # one kernel per step on CUDA (CPU keeps the for-each Adam)
    opt_G = torch.optim.Adam(G.parameters(), args.lr, betas=tuple(args.betas), fused=fused)
    opt_D = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], args.lr, betas=tuple(args.betas),
                             fused=fused)
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
            raise UserError(f"--init-from {path}: only {len(ok)}/{len(own)} {name} tensors match this architecture "
                            "(same --res and --ch needed)")
        net.load_state_dict(ok, strict=False)
        report.append(f"{name} {len(ok)}/{len(own)}")
    print("init-from:", ", ".join(report), "tensors loaded", flush=True)


def source_files(paths, g_file="G_ema"):
    """--source (a folder, or the files): the paths of the generator file to start from (G_ema.pth or G.pth) and
    D.pth of BigGAN-PyTorch's checkpoint; one error line naming what is missing and where it comes from."""
    found = {}
    for path in paths:
        if os.path.isdir(path):
            found.update({f: os.path.join(path, f) for f in BIGGAN_FILES if os.path.isfile(os.path.join(path, f))})
        elif os.path.isfile(path):
            name = os.path.basename(path)
            role = next((f for f in ("G_ema.pth", "G.pth", "D.pth") if name.endswith(f)), None)
            if role is None:
                raise UserError(f"--source {path}: which of {', '.join(BIGGAN_FILES)} is it? (name it so, or pass "
                                "its folder)")
            found[role] = path
    missing = [f for f in (g_file + ".pth", "D.pth") if f not in found]
    if missing:
        raise UserError(f"--source {' '.join(paths)}: no {' and '.join(missing)} there; --source is BigGAN-PyTorch's "
                        "pretrained ImageNet 128x128 model (the '138k' folder with G.pth, G_ema.pth, D.pth linked from "
                        "the README of github.com/ajbrock/BigGAN-PyTorch): download it and pass its folder")
    return found[g_file + ".pth"], found["D.pth"]


def load_source(paths, g_file, G, D, G_ema):
    """--source: BigGAN-PyTorch's G (into G and G_ema) and D by key name. Its class embeddings (G shared.*, D embed.*)
    are dropped and DISP's G_emb / D_emb (emb.*) keep their init; any other missing, extra or mis-shaped key: one
    error line. Its optimizer and state_dict.pth files are not needed. Returns the report line."""
    report = []
    for name, path, nets, drop in zip("GD", source_files(paths, g_file), ((G, G_ema), (D,)), ("shared.", "embed.")):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = {k.removeprefix("module."): v for k, v in sd.items()}
        except Exception as e:
            raise UserError(f"cannot read --source file {path} ({type(e).__name__}): not a BigGAN-PyTorch {name} "
                            "state_dict")
        own = nets[0].state_dict()
        new, dropped = [k for k in own if k.startswith("emb.")], [k for k in sd if k.startswith(drop)]
        bad = {"missing": [k for k in own if k not in sd and k not in new],
               "extra": [k for k in sd if k not in own and k not in dropped],
               "mis-shaped": [f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in own
                              if k in sd and sd[k].shape != own[k].shape]}
        if any(bad.values()):
            what = "; ".join(f"{len(v)} {w} ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})"
                             for w, v in bad.items() if v)
            raise UserError(f"--source {path} does not fit --arch biggan --res 128 (BigGAN-PyTorch's ImageNet model is "
                            f"--ch 96): {what}")
        for net in nets:
            net.load_state_dict({k: v for k, v in sd.items() if k not in dropped}, strict=False)
        gone = ", ".join(f"{k} {list(sd[k].shape)}" for k in dropped) or "nothing"
        report.append(f"{name} {len(sd) - len(dropped)}/{len(own)} tensors from {path}, dropped {gone}, new "
                      f"{', '.join(new) or 'none'}")
    line = "source: " + "; ".join(report)
    print(line, flush=True)
    return line


def bench(args):
    """--bench N: seconds per iteration (train_step + EMA) on random images at --res/--batch (--d-steps D steps),
    and the extractor's seconds per image (the prior extraction of N images takes N times that); writes nothing."""
    device = Distributed(args.device).device
    seed_everything(args.seed)
    x = torch.rand(args.batch, 3, args.res, args.res, device=device) * 2 - 1
    t_prior = 0.0
    if args.prior == "none":  # one-hot priors of a set of --batch images (BigGAN self-modulation: none)
        p = torch.eye(args.batch, device=device) if args.arch != "biggan" else torch.zeros(args.batch, 0, device=device)
    else:
        C = build_extractor(args.prior, args.prior_layer, args.prior_weights, args.prior_size).to(device)
        t_prior = min(time_steps(lambda: C(x), 1, device)) / args.batch
        p = C(x)
    G, D, opt_G, opt_D = build(args, p.shape[1], device)
    G_ema = make_ema(G)
    real = [(x, p)] * args.d_steps

    G_run, D_run = compiled(G, args.compile), compiled(D, args.compile)

    def step():
        train_step(G_run, D_run, opt_G, opt_D, real, args, device, G, D)
        ema_update(G_ema, G, args.ema_beta)

    dt = sum(time_steps(step, args.bench, device)[1:]) / args.bench
    print(f"bench: {dt:.3f} s/iteration ({args.res}px, batch {args.batch}, {args.d_steps} D steps, ch {args.ch}, "
          f"amp {args.amp}, {device}); prior extraction {t_prior:.4f} s/image ({args.prior} at {args.prior_size}px)",
          flush=True)
    return dt


def main(argv=None):
    args = parse_args(argv)
    with user_errors(), SetupInterrupt() as setup:  # an error: one line, exit 2; Ctrl-C before the loop: exit 130
        if args.sample:
            return sample_only(args)
        check_args(args)
        if args.bench:
            return bench(args)
        run(args, setup)


def sample_only(args):
    dev = pick_device(args.device)
    s = load_for_sampling(load_checkpoint(args.sample), dev, prior_mode=args.prior_mode, prior_from=args.prior_from)
    out = os.path.join(args.out or ".", f"samples_{s.prior_mode}.png")
    save_grid(s.sample(args.n, args.seed), out)
    print("wrote", out)


def run(args, setup=None):
    dist = Distributed(args.device)
    device, batch = dist.device, dist.per_rank_batch(args.batch)
    ck, path = read_resume(args, METHOD, ARCH_FLAGS)  # readable, same method and networks: first
    if not ck and args.source:  # method: the source files exist (before the data and the priors)
        source_files(args.source, args.source_g)
    if ck and ck.get("prior_key"):  # method: the prior settings too (the data part of the key: after loading)
        now = prior_settings(args)
        check_prior_key({k: ck["prior_key"].get(k) for k in now}, now, f"the priors of checkpoint {path}")
    seed_everything(args.seed + dist.rank)
    ds = load_dataset(args.data, args.res, args.data_root, args.crop)
    if args.max_images and args.max_images < len(ds):  # method
        ds = (Dataset(ds.name, ds.res, images=ds.images[:args.max_images]) if ds.images is not None else
              Dataset(ds.name, ds.res, files=ImageFiles(ds.files.paths[:args.max_images], ds.res, args.crop)))
    out = prepare_run_dir(args, METHOD, dist.is_main)
    cache, key = os.path.join(out, "priors.pt"), prior_key(args, ds)  # method: key hashes the images once
    if dist.is_main:  # method: rank 0 extracts (or loads) the priors, the other ranks then load its cache
        priors = get_priors(ds, args, device, cache, key)[0]
    dist.barrier()
    if not dist.is_main:  # method
        priors = get_priors(ds, args, device, cache, key)[0]
    G, D, opt_G, opt_D = build(args, priors.shape[1], device)  # method
    G_ema = make_ema(G)
    saved = {"G": G, "D": D, "G_ema": G_ema, "opt_G": opt_G, "opt_D": opt_D}  # checkpoint entry -> its object
    if ck:  # method
        check_prior_key(ck.get("prior_key"), key, f"the priors of checkpoint {path}")
    start, best = resume(ck, path, saved, dist, args) if ck else (0, float("inf"))
    if not ck and args.init_from:  # method: TransferGAN
        transfer_init(args.init_from, G, D, G_ema)
    elif not ck and args.source:  # method: TransferGAN from BigGAN-PyTorch's ImageNet model
        load_source(args.source, args.source_g, G, D, G_ema)
    elif not ck and args.freeze_d and dist.is_main:  # method
        print(f"warning: --freeze-d {args.freeze_d} without --init-from / --source freezes randomly initialised D "
              "blocks (FreezeD is meant for fine-tuning a pretrained GAN)", flush=True)
    G_run, D_run = dist.wrap(G), dist.wrap(D)
    G_run, D_run = compiled(G_run, args.compile), compiled(D_run, args.compile)  # method: no double backward here
    ckpt_priors = priors if len(ds) <= args.ckpt_priors else \
        priors[torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:args.ckpt_priors]]  # method

    def state(step, **extra):  # the checkpoint: `saved`, the RNGs, the best FID (resume() loads the same entries)
        return {"format": FORMAT, "method": METHOD, "args": vars(args), "step": step, "rng": rng_state(), "best_fid": best,
                **{k: v.state_dict() for k, v in saved.items()}, **extra,
                "prior_dim": priors.shape[1], "priors": ckpt_priors, "prior_key": key}  # method: what sampling needs

    def ema_sampler():  # G_ema as eval.py samples it
        bn = sample_bn(args)  # method: --sample-bn; recompute works on a copy (G_ema keeps G's statistics)
        return Sampler(copy.deepcopy(G_ema) if bn == "recompute" else G_ema, priors, args, device, bn=bn)  # method

    gen = torch.Generator().manual_seed(1234)  # method: fixed latents, z and mixups of training priors
    fixed_z = torch.cat([torch.randn(36, args.z_dim, generator=gen), mixup_priors(priors, 36, gen)], 1).to(device)
    evaluator = training_evaluator(ds, device, args, dist.is_main)
    batches = prior_batches(ds, priors.to(device), args, batch, start, dist)  # method: (x, C(x)) x --d-steps
    progress = Progress(args.iters, start, args.log_every, dist.is_main, out)
    if dist.is_main:
        print(f"{METHOD} | {args.data} ({len(ds)} images) {args.res}px | prior {args.prior} {tuple(priors.shape)} | "
              f"G {count_params(G) / 1e6:.2f}M D {count_params(D) / 1e6:.2f}M params | D feature {D.feat_dim} | "
              f"batch {args.batch} d_steps {args.d_steps} | betas {tuple(args.betas)}", flush=True)  # method
    stop = StopOnInterrupt(dist.is_main)  # Ctrl-C: finish the iteration, save last.pt, exit 130
    if setup:
        setup.done()
    step, sampler = start, None
    try:
        for it in range(start, args.iters):  # it: the iterations done before this one
            step, last = it + 1, it + 1 == args.iters
            real = next(batches)
            losses = train_step(G_run, D_run, opt_G, opt_D, real, args, device, G, D)  # method
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
            save_style_mix(sampler or ema_sampler(), os.path.join(out, "samples", "style_mix.png"), args.seed)
            print(f"done: {out} (samples/, ckpt/last.pt)", flush=True)
    finally:
        stop.restore()
        dist.close()


# -------------------------------------------------------------------------------------- sampling (eval.py contract)
class Sampler(SamplerBase):
    """eval.py contract. latents = [z ; prior] ([n, z_dim + prior_dim]); the prior part is drawn by `prior_mode`
    (settable attribute): mixup (default) | gmm | train | image (needs prior_from). eval.py --project optimises the
    whole [z ; prior] latent."""
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

    def gmm(self):
        if self._gmm is None:
            self._gmm = PriorGMM(self.priors, self.gmm_k, self.gmm_space, self.gmm_max, self.G.emb.weight.detach())
        return self._gmm

    def image_prior(self):
        if self._img is None:
            if not self.prior_from or self.a.prior == "none":
                raise UserError("prior_mode=image needs prior_from=IMAGE and a model trained with a prior (not --prior none)")
            try:
                x = load_image(self.prior_from, self.a.res, self.a.crop)[None]
            except (OSError, ValueError) as e:
                raise UserError(f"prior_from={self.prior_from}: cannot read the image ({type(e).__name__})")
            C = build_extractor(self.a.prior, self.a.prior_layer, self.prior_weights, self.a.prior_size)
            self._img = C(x.float() / 127.5 - 1)
        return self._img

    def sample_priors(self, n, gen):
        m = self.prior_mode
        if m == "mixup":
            return mixup_priors(self.priors, n, gen)
        if m == "train":
            return self.priors[torch.randint(len(self.priors), (n,), generator=gen)]
        if m == "gmm":
            return self.gmm().sample(n, gen)
        if m == "image":
            return self.image_prior().expand(n, -1)
        raise UserError(f"prior_mode={m}: use mixup, gmm, train or image")

    def latents(self, n, seed):
        gen = torch.Generator().manual_seed(int(seed))
        z = torch.randn(n, self.a.z_dim, generator=gen)
        if self.psi:
            z = torch.nn.init.trunc_normal_(z, 0.0, 1.0, -self.psi, self.psi, generator=gen)
        return torch.cat([z, self.sample_priors(n, gen)], 1).to(self.device)

    def latent_doc(self):
        d, pd = self.a.z_dim, self.priors.shape[1]
        return (f"[z ; prior] [n, {d} + {pd}]: z [n, {d}] ~ N(0, I)" + (f" truncated to [-{self.psi}, {self.psi}]"
                if self.psi else "") + f"; prior [n, {pd}]: an image's {self.a.prior} feature, drawn by prior_mode="
                f"{self.prior_mode} (mixup: t * priors[i] + (1 - t) * priors[j], i, j uniform, t ~ U[0, 1]; priors: "
                f"one row per training image, the export's `priors` buffer [{len(self.priors)}, {pd}])")

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
    """The BN rule of --sample-bn (older checkpoints: auto): auto = recompute with a prior, copy with --prior none."""
    bn = getattr(a, "sample_bn", None) or "auto"
    return ("copy" if a.prior == "none" else "recompute") if bn == "auto" else bn


def load_for_sampling(ckpt, device, **opts):
    """Rebuild the EMA generator; opts (eval.py --sampler-opt key=value): prior_mode, prior_from, gmm_k, gmm_space,
    gmm_max, priors (path of a priors.pt cache to use instead of the checkpoint's), prior_weights (extractor path),
    psi (eval.py --psi: truncated z), bn (recompute | batch | copy: BatchNorm statistics at sampling, see
    common.utils.check_bn_mode; default: the run's --sample-bn (auto: recompute, which re-estimates them on 512
    latents of seed 2**20, or copy for --prior none))."""
    bad = set(opts) - set(SAMPLER_OPTS)
    if bad:
        raise UserError(f"unknown sampler option(s) {sorted(bad)}: disp accepts {', '.join(SAMPLER_OPTS)}")
    check_checkpoint(ckpt, "checkpoint", METHOD)
    a = SimpleNamespace(**ckpt["args"])
    G, _ = build_models(a, ckpt["prior_dim"])
    G.load_state_dict(ckpt["G_ema"])
    path = opts.pop("priors", None)
    if path:
        c = load_checkpoint(path)
        check_prior_key(c.get("key"), ckpt.get("prior_key"), f"the priors in {path}")
        priors = c["priors"]
    else:
        priors = ckpt["priors"]
    opts.setdefault("bn", sample_bn(a))
    return Sampler(G.to(device).eval(), priors, a, device, **opts)


if __name__ == "__main__":
    main()
