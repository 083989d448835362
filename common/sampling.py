"""The sampling contract eval.py relies on (SamplerBase) and what the method Samplers share: per-sample noise (an
image is a function of its latent, whatever the batch), BatchNorm at sampling time, and the style-mixing grid."""
import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from common.output import save_grid
from common.run import UserError


def latent_seeds(latents):
    """One seed per latent row, a hash of its float32 bytes: a sample is a function of its latent, whatever batch."""
    rows = latents.detach().float().cpu().contiguous().numpy()
    return [int.from_bytes(hashlib.sha1(r.tobytes()).digest()[:8], "little") >> 1 for r in rows]


class PerSampleNoise:
    """Noise for noise-injection layers at sampling time: `noise(x)`, N(0, 1) maps [n, 1, H, W], row i from its own
    generator seeded by `seeds[i]` (the layers run in the same order for every batch): the batch changes no image."""
    PARALLEL_MIN = 1 << 20  # maps of at least this many values are drawn by torch.get_num_threads() threads

    def __init__(self, seeds):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, x):
        if x.shape[0] != len(self.gens):
            raise RuntimeError(f"PerSampleNoise made for {len(self.gens)} samples got a batch of {x.shape[0]}")
        # drawn on the CPU (the same maps on every device), into pinned memory for an asynchronous copy to a GPU
        maps = torch.empty(len(self.gens), 1, *x.shape[2:], pin_memory=x.device.type == "cuda")
        draw = lambda i: torch.randn(maps.shape[1:], generator=self.gens[i], out=maps[i])  # noqa: E731
        threads = min(torch.get_num_threads(), len(self.gens))
        if threads > 1 and maps.numel() >= self.PARALLEL_MIN:  # e.g. 1024 px: one generator per row, the same values
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(draw, range(len(self.gens))))
        else:
            list(map(draw, range(len(self.gens))))
        return maps.to(device=x.device, dtype=x.dtype, non_blocking=True)


@functools.lru_cache(maxsize=512)
def _fixed_map(seed, h, w):
    # numpy, not torch.randn: under torch.jit.trace the map must be a constant, not a recorded (re-drawn) randn
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 1, h, w), dtype=np.float32))


def fixed_noise(seed):
    """Sampler option noise=const: a noise source whose one N(0, 1) map [1, 1, H, W] (numpy PCG64, from `seed`) is the
    same for every sample and call: deterministic, batch-independent and traceable (eval.py --export bakes it in)."""
    return lambda x: _fixed_map(int(seed), int(x.shape[2]), int(x.shape[3])).to(x)  # x's device and dtype


NOISE_MODES = ("random", "const")  # sampler option noise=... of the per-sample-noise generators (fastgan, adafm)
CONST_NOISE_SEED = 2 ** 21  # noise=const: layer i (in G.modules() order) draws its map from seed CONST_NOISE_SEED + i


def check_noise_mode(mode):
    """random: per-sample noise seeded by each latent (PerSampleNoise); const: fixed maps (fixed_noise)."""
    if mode not in NOISE_MODES:
        raise UserError(f"sampler option noise={mode!r}: use random or const")
    return mode


@contextmanager
def per_sample_noise(G, latents, noise_cls, mode="random"):
    """Inside the block every `noise_cls` module of G (it draws `self.noise_source(x)` when set) takes its noise from
    PerSampleNoise(latent_seeds(latents)) (mode random), or from fixed_noise(CONST_NOISE_SEED + layer index) (const)."""
    mods = [m for m in G.modules() if isinstance(m, noise_cls)]
    src = PerSampleNoise(latent_seeds(latents)) if mode == "random" else None
    for i, m in enumerate(mods):
        m.noise_source = src or fixed_noise(CONST_NOISE_SEED + i)
    try:
        yield
    finally:
        for m in mods:
            m.noise_source = None


BN_MODES = ("copy", "batch", "recompute")  # BatchNorm at sampling time (sampler option bn=...)


def check_bn_mode(mode):
    """copy: eval mode, G's running statistics (an EMA G's are the live G's); batch: each batch's statistics (train-mode
    BN, as the FastGAN authors sample; an image depends on its batch); recompute: recompute_bn_stats, then eval."""
    if mode not in BN_MODES:
        raise UserError(f"sampler option bn={mode!r} is not one of {', '.join(BN_MODES)}")
    return mode


@contextmanager
def batch_stat_bn(G, on=True):
    """G in eval mode; with on=True its BatchNorms normalise with the statistics of the current batch (train mode)
    and leave their running buffers untouched (track_running_stats off inside the block)."""
    bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if on else []
    G.eval()
    for m in bns:
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.eval()
            m.track_running_stats = True


@torch.no_grad()
def recompute_bn_stats(G, z, forward, chunk=64):
    """Set every BatchNorm's running mean / (unbiased) variance to those of its inputs over all latents z, from
    `forward(z_chunk)` (which runs G) in chunks with batch-statistic BN, the rest (spectral norm too) in eval mode:
    exact pooled moments (per-chunk var_mean combined in float64, Chan et al.). G ends in eval mode."""
    bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    acc = {m: [] for m in bns}  # per chunk: (count per channel, mean, biased variance)

    def hook(m, inp):
        v, mu = torch.var_mean(inp[0].detach().float(), dim=(0, 2, 3), correction=0)
        acc[m].append((inp[0].numel() // inp[0].shape[1], mu.double(), v.double()))
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        with batch_stat_bn(G):
            for i in range(0, len(z), chunk):
                forward(z[i:i + chunk])
    finally:
        for h in handles:
            h.remove()
    for m, parts in acc.items():
        n = sum(c for c, _, _ in parts)
        mean = sum(c * mu for c, mu, _ in parts) / n
        m2 = sum(c * (v + (mu - mean) ** 2) for c, mu, v in parts)
        m.running_mean.copy_(mean)
        m.running_var.copy_(m2 / max(n - 1, 1))
    return G.eval()


class SamplerBase:
    """The contract eval.py relies on: each method script's `load_for_sampling(ckpt, device)` returns a subclass that
    implements `latents` and `generate` (EMA generator, eval mode, @SamplerBase.sampler_grad) and optionally
    `style_mix(lat_a, lat_b) -> images` (coarse structure from a, the rest from b); the other hooks have defaults."""
    res = None
    export_opts = {}  # sampler options eval.py --export and --project apply (a deterministic mode, e.g. noise=const)
    proj_space = "z"  # what eval.py --project optimises (proj_init's kind), for its outputs
    _grad = False

    @staticmethod
    def sampler_grad(fn):
        """Decorator of a Sampler's generate-like methods: no autograd graph, as @torch.no_grad(), except inside
        `with sampler.differentiable():` (eval.py --project), where gradients reach the latents."""
        @functools.wraps(fn)
        def wrapped(self, *args, **kwargs):
            with torch.set_grad_enabled(torch.is_grad_enabled() and getattr(self, "_grad", False)):
                return fn(self, *args, **kwargs)
        return wrapped

    @property
    def batch_independent(self):
        """Whether generate() gives each latent the image it gets alone, whatever the other latents of the call
        (eval.py --save-images / --gif batch only then; --export / --project need it). Not with bn=batch; a method
        whose images depend on their batch companions otherwise (insgen's noise=random) overrides this."""
        return getattr(self, "bn", None) != "batch"

    def latents(self, n, seed):
        """[n, d] latent codes on the device, a deterministic function of `seed`."""
        raise NotImplementedError

    def generate(self, latents):
        """Images in [-1, 1], [n, 3, res, res], for the given latents."""
        raise NotImplementedError

    def latent_doc(self):
        """What generate() expects (shape, distribution): eval.py --export saves it in the export."""
        return f"latents [n, {', '.join(map(str, self.latents(1, 0).shape[1:]))}] as Sampler.latents draws them"

    def export_check(self):
        """Raise UserError (one line) when this sampler's generate() cannot be exported as a function of its latents."""

    def export_extras(self):
        """{name: tensor} stored in the export next to the generator (e.g. DISP's training priors)."""
        return {}

    @contextmanager
    def differentiable(self):
        """Inside the block generate() and proj_generate() build autograd graphs (eval.py --project)."""
        self._grad = True
        try:
            yield self
        finally:
            self._grad = False

    def proj_init(self, latents):
        """The variable eval.py --project optimises for these latents: the latents (z; DISP [z ; prior]; InsGen: W)."""
        return latents.detach().clone()

    def proj_generate(self, v):
        """Images from a projection variable (proj_init's kind), differentiable in v inside differentiable()."""
        return self.generate(v)

    @torch.no_grad()
    def sample(self, n, seed=0, batch=32):
        z = self.latents(n, seed)
        return torch.cat([self.generate(z[i:i + batch]).float() for i in range(0, n, batch)])


@torch.no_grad()
def save_style_mix(sampler, path, seed=0, n_a=6, n_b=4, batch=64, essential=False):
    """The style-mixing grid (eval.py --mix, samples/style_mix.png after training): a blank corner, n_a samples a on
    top, n_b samples b on the left, cell (r, c) = sampler.style_mix(a_c, b_r) (a's coarse part, b's fine part)."""
    if not callable(getattr(sampler, "style_mix", None)):
        raise UserError(f"{type(sampler).__module__}'s Sampler has no style_mix(lat_a, lat_b): no style-mixing grid")
    za, zb = sampler.latents(n_a, seed), sampler.latents(n_b, seed + 1)
    a_rep, b_rep = za.repeat(n_b, *[1] * (za.dim() - 1)), zb.repeat_interleave(n_a, 0)
    cat = lambda f, *zs: torch.cat([f(*(z[i:i + batch] for z in zs)).float().cpu()  # noqa: E731
                                    for i in range(0, len(zs[0]), batch)])
    ia, ib, mixed = cat(sampler.generate, za), cat(sampler.generate, zb), cat(sampler.style_mix, a_rep, b_rep)
    rows = [torch.cat([torch.ones_like(ia[:1]), ia])]
    rows += [torch.cat([ib[r:r + 1], mixed[r * n_a:(r + 1) * n_a]]) for r in range(n_b)]
    return save_grid(torch.cat(rows), path, nrow=n_a + 1, essential=essential)
