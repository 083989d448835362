"""Pretrained weights (`fetch`: a flag's file, else the torch.hub cache, else one download with a timeout; offline, one
UserError line), and LPIPS v0.1 on VGG16 (Zhang et al. 2018) for FastGAN's reconstruction loss and eval.py --project."""
import importlib.util
import os
import socket

import torch
import torch.nn as nn

from common.run import error_line, UserError

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's ImageNet VGG16
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
TIMEOUT = 30  # seconds per connection attempt / read: an offline machine fails at once


def fetch(url, path=None, flag="--weights", file_name=None, download=True):
    """The local file of the weights at `url`: `path` when given (it must exist), else <torch.hub dir>/checkpoints/
    <file_name>, downloaded there once when `download`. A missing file or a failed download: one UserError line."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
        return path
    dst = os.path.join(torch.hub.get_dir(), "checkpoints", file_name or os.path.basename(url))
    if os.path.isfile(dst):
        return dst
    how = f"fetch {url} into {dst} or pass {flag} PATH"
    if not download:
        raise UserError(f"{dst} does not exist: {how}")
    print(f"downloading {url} -> {dst}", flush=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TIMEOUT)
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)  # a hub folder that cannot be made: one UserError too
        torch.hub.download_url_to_file(url, dst, progress=False)
    except Exception as e:
        raise UserError(f"cannot download {url} ({error_line(e, 120)}): offline? {how}") from None
    finally:
        socket.setdefaulttimeout(old)
    return dst


def strip_module(sd):
    """A state dict without the 'module.' prefixes (Data)DistributedDataParallel adds to every key."""
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_state(path, what="weights"):
    """torch.load(weights_only) of a state dict (its 'state_dict' entry when it has one), 'module.' stripped."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}): is it a PyTorch state_dict file?") from None
    return strip_module(sd.get("state_dict", sd))


class LPIPS(nn.Module):
    """LPIPS v0.1 'net-lin' on VGG16 as in the FastGAN authors' repo: [-1, 1] in, scaling layer, relu1_2 ... 5_3 unit-
    normalised over channels, squared difference, 1x1 linear weights, spatial mean, sum over layers. Frozen, eval."""
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


def load_lpips(vgg=None, lin=None, download=True):
    """LPIPS with the real weights: the files given (--vgg-weights / --lpips-weights), else the lpips package's
    vgg.pth when installed and the torch.hub cache, else downloads (when `download`). Failing: one UserError line."""
    spec = importlib.util.find_spec("lpips") if not lin else None
    packaged = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth") if spec and spec.origin else ""
    lin = lin or (packaged if os.path.isfile(packaged) else None)
    vgg = load_state(fetch(VGG16_URL, vgg, "--vgg-weights", download=download), "VGG16 weights")
    lin = load_state(fetch(LPIPS_URL, lin, "--lpips-weights", "lpips_v0.1_vgg.pth", download), "LPIPS weights")
    net = LPIPS()
    try:
        net.features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")})
        net.lins.load_state_dict({f"{k[3]}.weight": v for k, v in lin.items() if k.endswith("model.1.weight")})
    except RuntimeError as e:
        raise UserError(f"the LPIPS weight files do not fit ({error_line(e, 120)}): pass torchvision's "
                        "vgg16-397923af.pth as --vgg-weights and LPIPS v0.1 vgg.pth as --lpips-weights") from None
    return net
