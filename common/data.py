"""Data loading for every method: a folder of images or a dataset NAME -> an infinite, seeded batch iterator.

- `digits`: the embedded default, the 1,797 real 8x8 images of `sklearn.datasets.load_digits`, rendered as RGB
  (white ink on black) at the requested resolution (bicubic). No download, used by the README and the tests.
- The papers' few-shot names resolve to <data-root>/<name> (images may sit in a nested `img/` folder).
- Any folder: searched recursively for jpg/jpeg/png/webp/bmp (any case). Every image becomes RGB (grayscale,
  palette, CMYK, 16-bit, RGBA composited on white); unreadable files are skipped with one warning that counts them.
- Resize: `squash` to res x res (the official FastGAN code), or `center` crop a square then resize. Values in [-1, 1].
- Small sets (<= IN_MEMORY_BYTES at the target size) are decoded once and held in memory as uint8; larger ones stream
  through a DataLoader with workers. Either way the batch at iteration i is a pure function of (seed, i, rank):
  resuming at iteration i gives the same batches as an uninterrupted run, and torchrun ranks get disjoint slices.
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image

from common.run import UserError

IMG_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
IN_MEMORY_BYTES = 4 * 1024**3
GPU_RESIDENT_BYTES = 2 * 1024**3  # an in-memory uint8 set up to this size is kept on the GPU (CUDA runs)
FEW_SHOT = {  # name -> image count in the FastGAN authors' few-shot-image-datasets zip
    "100-shot-obama": 100, "100-shot-grumpy_cat": 100, "100-shot-panda": 100, "AnimalFace-cat": 160,
    "AnimalFace-dog": 389, "pokemon": 833, "art-painting": 1000, "anime-face": 120, "skulls": 97, "shells": 64,
    "moongate": 136, "fauvism-still-life": 124, "flat-colored": 36,
}
SOURCE = ("the FastGAN authors' 'few-shot-image-datasets' zip (linked from the FastGAN README; mirrored on the "
          "Hugging Face hub as huggan/few-shot-<name>)")


def list_images(folder):
    """All image files under `folder`, recursively, sorted (any-case jpg/jpeg/png/webp/bmp)."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files)
                if os.path.splitext(f)[1].lower() in IMG_EXTS and not f.startswith(".")]
    return out


def resolve_folder(data, data_root="data"):
    """A folder path, or a dataset NAME under data_root. Raises UserError with where-to-get-it when absent."""
    if os.path.isdir(data):
        return data
    name_dir = os.path.join(data_root or "data", data)
    if os.path.isdir(name_dir):
        return name_dir
    if data in FEW_SHOT:
        raise UserError(f"dataset {data!r} not found at {name_dir}: download {SOURCE} and unpack it so the images "
                        f"are under {name_dir}/ (or pass --data-root / set GAN_DATA_ROOT)")
    raise UserError(f"--data {data!r} is neither a folder nor a known dataset name (digits, {', '.join(FEW_SHOT)})")


def to_rgb(img):
    """Any PIL image -> 8-bit RGB. Alpha is composited on white; 16-bit and float images are rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F" and a.max() <= 1.0:
            peak = 1.0
        img = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def resize(img, res, crop="squash"):
    if crop == "center":
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((res, res), Image.BILINEAR)


def load_image(path, res, crop="squash"):
    """Decode one file -> uint8 tensor [3, res, res]. Raises OSError/ValueError for unreadable files."""
    with Image.open(path) as im:
        im.load()
        img = resize(to_rgb(im), res, crop)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def digits_images(res):
    """sklearn's 1,797 handwritten digits (8x8, values 0..16) as uint8 RGB [N, 3, res, res]."""
    from sklearn.datasets import load_digits
    d = load_digits().images.astype(np.float32) * (255.0 / 16.0)
    out = np.empty((len(d), res, res), dtype=np.uint8)
    for i, im in enumerate(d):
        out[i] = np.asarray(Image.fromarray(im.astype(np.uint8), "L").resize((res, res), Image.BICUBIC))
    return torch.from_numpy(out)[:, None].expand(-1, 3, -1, -1).contiguous()


class ImageFiles(torch.utils.data.Dataset):
    """Streams files; an unreadable file is replaced by the next readable one and counted."""

    def __init__(self, paths, res, crop):
        self.paths, self.res, self.crop = paths, res, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        for k in range(len(self.paths)):
            try:
                return load_image(self.paths[(i + k) % len(self.paths)], self.res, self.crop)
            except (OSError, ValueError, SyntaxError):
                if k == 0:
                    warnings.warn(f"skipping unreadable image {self.paths[i]}")
        raise UserError("no readable image in the dataset")


class Dataset:
    """`images` (uint8 [N,3,res,res]) when held in memory, else `files` (an ImageFiles) to stream."""

    def __init__(self, name, res, images=None, files=None):
        self.name, self.res, self.images, self.files = name, res, images, files

    def __len__(self):
        return len(self.images) if self.images is not None else len(self.files)

    def uint8(self, idx):
        if self.images is not None:
            return self.images[idx]
        return torch.stack([self.files[int(i)] for i in idx])


def load_dataset(data, res, data_root="data", crop="squash", in_memory=None, workers=0):
    """`data` is 'digits', a folder, or a dataset name under data_root. Returns a Dataset."""
    if data == "digits":
        return Dataset("digits", res, images=digits_images(res))
    folder = resolve_folder(data, data_root)
    paths = list_images(folder)
    if not paths:
        raise UserError(f"no images (jpg/jpeg/png/webp/bmp) found under {folder}: put the training images there")
    name = os.path.basename(os.path.normpath(folder))
    files = ImageFiles(paths, res, crop)
    if in_memory is None:
        in_memory = len(paths) * 3 * res * res <= IN_MEMORY_BYTES
    if not in_memory:
        return Dataset(name, res, files=files)
    imgs, bad = [], 0
    for p in paths:
        try:
            imgs.append(load_image(p, res, crop))
        except (OSError, ValueError, SyntaxError):
            bad += 1
    if bad:
        warnings.warn(f"skipped {bad} unreadable image file(s) of {len(paths)} under {folder}")
    if not imgs:
        raise UserError(f"none of the {len(paths)} image files under {folder} could be read: check the files")
    return Dataset(name, res, images=torch.stack(imgs))


def batch_indices(n, batch, seed, step, rank=0, world=1):
    """Indices of rank `rank`'s batch at iteration `step`: consecutive slices of per-epoch permutations
    (epoch e uses a torch.Generator seeded with seed*1_000_003 + e), so any step can be recomputed directly."""
    start = (step * world + rank) * batch
    idx, pos = [], start
    while pos < start + batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = perm[off: off + start + batch - pos]
        idx.append(take)
        pos += len(take)
    return torch.cat(idx)


def to_device(t, device):
    """A CPU tensor onto `device` without a host sync on CUDA (pinned staging from torch's caching host allocator,
    non_blocking copy); `t` itself elsewhere."""
    if torch.device(device).type != "cuda" or t.is_cuda:
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def to_float(x_uint8, device, flip_gen=None):
    """uint8 [B,3,H,W] -> float [-1,1] on device; random horizontal flip per sample when flip_gen is given."""
    x = to_device(x_uint8, device).float() / 127.5 - 1.0
    if flip_gen is not None:
        m = to_device(torch.rand(x.shape[0], generator=flip_gen) < 0.5, device)
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


class _BatchSampler:
    def __init__(self, n, batch, seed, start, rank, world):
        self.args = n, batch, seed, start, rank, world

    def __iter__(self):
        n, batch, seed, step, rank, world = self.args
        while True:
            yield batch_indices(n, batch, seed, step, rank, world).tolist()
            step += 1


def infinite_batches(ds, batch, seed=0, start_step=0, flip=True, rank=0, world=1, workers=2, device="cpu"):
    """Yields float [-1,1] batches [batch,3,res,res] on `device` forever, starting at iteration `start_step`.
    `batch` is the per-process batch; the flips of iteration i are drawn from a generator seeded by (seed, i, rank)."""
    step = start_step

    def flip_gen(i):
        return torch.Generator().manual_seed(seed * 7_919 + i * 104_729 + rank) if flip else None

    if ds.images is not None:
        images = ds.images
        if torch.device(device).type == "cuda" and images.nbytes <= GPU_RESIDENT_BYTES:
            images = images.to(device)  # uint8 on the GPU once: batches are gathered there, no copy per iteration
        while True:
            idx = to_device(batch_indices(len(ds), batch, seed, step, rank, world), images.device)
            yield to_float(images[idx], device, flip_gen(step))
            step += 1
    loader = torch.utils.data.DataLoader(ds.files, batch_sampler=_BatchSampler(len(ds), batch, seed, start_step, rank, world),
                                         num_workers=workers, pin_memory=str(device).startswith("cuda"),
                                         persistent_workers=workers > 0)
    for xb in loader:
        yield to_float(xb, device, flip_gen(step))
        step += 1
