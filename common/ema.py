"""Exponential moving average of a model's weights, and StyleGAN2-ADA's EMA schedule."""
import copy

import torch


def make_ema(model):
    """A frozen deep copy of `model` to hold the running average."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(ema, model, beta, copy_buffers=True):
    """p_ema <- beta * p_ema + (1 - beta) * p (torch.lerp, as torch.optim.swa_utils.get_ema_multi_avg_fn). Buffers
    (BN running stats, w_avg, ...) are copied from `model` when copy_buffers (StyleGAN2-ADA), else left alone."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - beta)
    if copy_buffers:
        for be, b in zip(ema.buffers(), model.buffers()):
            be.copy_(b)


def stylegan_ema_beta(batch, ema_kimg, cur_nimg, rampup=None):
    """StyleGAN2-ADA: beta = 0.5 ** (batch / ema_nimg), a half-life of ema_nimg = min(ema_kimg*1e3, cur_nimg*rampup)."""
    ema_nimg = ema_kimg * 1000
    if rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))
