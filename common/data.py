"""Data for every method: 'digits', a folder of images or a dataset NAME -> an infinite, seeded batch iterator (the
batch at iteration i is a pure function of (seed, i, rank): a resumed run gets the batches of an uninterrupted one)."""
import itertools
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
        raise UserError(f"dataset {data!r} not found at {name_dir}: download the FastGAN authors' 'few-shot-image-"
                        "datasets' zip (linked from their README; on the Hugging Face hub as huggan/few-shot-<name>) "
                        f"and unpack it so the images are under {name_dir}/ (or pass --data-root / set GAN_DATA_ROOT)")
    raise UserError(f"--data {data!r} is neither a folder nor a known dataset name (digits, {', '.join(FEW_SHOT)})")


def to_rgb(img):
    """Any PIL image (grayscale, palette, CMYK, 16-bit, float, alpha) -> 8-bit RGB; alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        peak = 1.0 if img.mode == "F" and a.max() <= 1.0 else peak
        img = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "RGBA", "LA", "PA"):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def load_image(path, res, crop="squash"):
    """Decode one file -> uint8 tensor [3, res, res], bilinear; crop squash: resized to res x res (as the official
    FastGAN code), center: a centre-cropped square. Raises OSError/ValueError for unreadable files."""
    with Image.open(path) as im:
        im.load()
        img = to_rgb(im)
    if crop == "center":
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((res, res), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFiles(torch.utils.data.Dataset):
    """Streams files; an unreadable file is replaced by the next readable one, with a warning that names it."""

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
        return self.images[idx] if self.images is not None else torch.stack([self.files[int(i)] for i in idx])


def load_dataset(data, res, data_root="data", crop="squash", in_memory=None):
    """'digits', a folder or a dataset name under data_root -> a Dataset, held as uint8 when <= IN_MEMORY_BYTES at this
    size (unreadable files skipped, one warning counts them), else streamed (ImageFiles: a warning per bad file)."""
    if data == "digits":  # the default, no download: sklearn's 1,797 8x8 digits, white on black, bicubic to res
        from sklearn.datasets import load_digits
        d = load_digits().images.astype(np.float32) * (255.0 / 16.0)
        out = np.empty((len(d), res, res), dtype=np.uint8)
        for i, im in enumerate(d):
            out[i] = np.asarray(Image.fromarray(im.astype(np.uint8), "L").resize((res, res), Image.BICUBIC))
        return Dataset("digits", res, images=torch.from_numpy(out)[:, None].expand(-1, 3, -1, -1).contiguous())
    folder = resolve_folder(data, data_root)
    paths = list_images(folder)
    if not paths:
        raise UserError(f"no images (jpg/jpeg/png/webp/bmp) found under {folder}: put the training images there")
    name = os.path.basename(os.path.normpath(folder))
    if in_memory is None:
        in_memory = len(paths) * 3 * res * res <= IN_MEMORY_BYTES
    if not in_memory:
        return Dataset(name, res, files=ImageFiles(paths, res, crop))
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
        idx.append(perm[off: off + start + batch - pos])
        pos += len(idx[-1])
    return torch.cat(idx)


def to_device(t, device):
    """A CPU tensor onto `device`, on CUDA without a host sync (pinned staging, non_blocking copy)."""
    if torch.device(device).type != "cuda" or t.is_cuda:
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def infinite_batches(ds, batch, seed=0, start_step=0, flip=True, rank=0, world=1, workers=2, device="cpu"):
    """Yields float [-1,1] batches [batch,3,res,res] on `device` forever, starting at iteration `start_step`.
    `batch` is the per-process batch; the flips of iteration i are drawn from a generator seeded by (seed, i, rank)."""
    steps = itertools.count(start_step)
    if ds.images is not None:
        images = ds.images
        if torch.device(device).type == "cuda" and images.nbytes <= GPU_RESIDENT_BYTES:
            images = images.to(device)  # uint8 on the GPU once: batches are gathered there, no copy per iteration
        batches = (images[to_device(batch_indices(len(ds), batch, seed, i, rank, world), images.device)] for i in steps)
    else:
        batches = torch.utils.data.DataLoader(
            ds.files, batch_sampler=(batch_indices(len(ds), batch, seed, i, rank, world).tolist() for i in steps),
            num_workers=workers, pin_memory=str(device).startswith("cuda"), persistent_workers=workers > 0)
    for step, xb in enumerate(batches, start_step):
        x = to_device(xb, device).float() / 127.5 - 1.0
        if flip:  # a random horizontal flip per sample
            gen = torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + rank)
            m = to_device(torch.rand(x.shape[0], generator=gen) < 0.5, device)
            x = torch.where(m[:, None, None, None], x.flip(3), x)
        yield x
