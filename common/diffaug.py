"""DiffAugment (Zhao et al., NeurIPS 2020) as the reference `DiffAugment_pytorch.py`: NCHW in [-1, 1], ops in policy
order, draws per sample, differentiable, no clamping. Apply it to EVERY D input (reals and fakes, D and G steps), with
independent draws. Policies: few-shot `color,translation,cutout`; FastGAN `color,translation`; CIFAR `color,cutout`."""
import torch
import torch.nn.functional as F


def diff_augment(x, policy="color,translation,cutout"):
    """Apply the comma-separated `policy` to the batch `x` (NCHW)."""
    if not policy:
        return x
    nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    for p in policy.split(","):
        p = p.strip()
        if p not in AUGMENT_FNS:
            raise ValueError(f"unknown DiffAugment op {p!r}: use a comma list of {sorted(AUGMENT_FNS)}")
        for f in AUGMENT_FNS[p]:
            x = f(x)
    return x.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)  # keep NHWC input NHWC


def _u(x):  # one U[0,1) draw per sample, broadcastable over CHW
    return torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)


def rand_brightness(x):  # x + (U - 0.5)
    return x + (_u(x) - 0.5)


def rand_saturation(x):  # (x - mean_C) * 2U + mean_C
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * (_u(x) * 2) + m


def rand_contrast(x):  # (x - mean_CHW) * (U + 0.5) + mean_CHW
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (_u(x) + 0.5) + m


def rand_translation(x, ratio=0.125):
    """Integer shift per sample in [-s, s], s = int(H*ratio + 0.5); shifted-in pixels are 0."""
    sx, sy = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    tx = torch.randint(-sx, sx + 1, size=[x.size(0), 1, 1], device=x.device)
    ty = torch.randint(-sy, sy + 1, size=[x.size(0), 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(*[torch.arange(n, device=x.device) for n in x.shape[:1] + x.shape[2:]], indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)  # index 0 / H+1 hit the zero padding
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    return F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0]).permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def rand_cutout(x, ratio=0.5):
    """One zeroed square of side int(H*ratio + 0.5) per sample, uniform offset, clipped at the border."""
    cs = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    ox = torch.randint(0, x.size(2) + (1 - cs[0] % 2), size=[x.size(0), 1, 1], device=x.device)
    oy = torch.randint(0, x.size(3) + (1 - cs[1] % 2), size=[x.size(0), 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(*[torch.arange(n, device=x.device) for n in (x.size(0), *cs)], indexing="ij")
    gx = torch.clamp(gx + ox - cs[0] // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - cs[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


AUGMENT_FNS = {"color": [rand_brightness, rand_saturation, rand_contrast], "translation": [rand_translation],
               "cutout": [rand_cutout]}


def check_policy(policy, flag):
    """Start-up check of a user's policy string: one clear line for an unknown op instead of a crash at iteration 1."""
    bad = [p.strip() for p in policy.split(",") if p.strip() not in AUGMENT_FNS] if policy else []
    if bad:
        from common.run import UserError
        raise UserError(f"{flag} {policy}: unknown DiffAugment op(s) {', '.join(bad)}: use a comma list of "
                        f"{', '.join(sorted(AUGMENT_FNS))}")
