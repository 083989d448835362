"""common/ema.py against torch's AveragedModel and the StyleGAN2-ADA formula."""
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.ema import ema_update, make_ema, stylegan_ema_beta


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def test_matches_averaged_model_bit_for_bit():
    m = net()
    ref = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=False)
    ref.update_parameters(m)  # AveragedModel's first update copies, like make_ema
    ema = make_ema(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        m(torch.randn(16, 4)).square().mean().backward()
        opt.step()
        ref.update_parameters(m)
        ema_update(ema, m, 0.999, copy_buffers=False)
    for a, b in zip(ema.parameters(), ref.module.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(ema.parameters()), next(m.parameters()))
    assert all(not p.requires_grad for p in ema.parameters())


def test_buffers_copied_or_kept():
    m = net()
    ema, ema2 = make_ema(m), make_ema(m)
    m.train()
    m(torch.randn(16, 4) + 3)  # moves the BN running mean
    ema_update(ema, m, 0.9, copy_buffers=True)
    ema_update(ema2, m, 0.9, copy_buffers=False)
    assert torch.equal(ema[1].running_mean, m[1].running_mean)
    assert torch.equal(ema2[1].running_mean, torch.zeros(8))


def test_stylegan_half_life_and_rampup():
    # auto config at 256 px: batch 16, ema_kimg = 16*10/32 = 5, rampup 0.05
    b = stylegan_ema_beta(16, 5, cur_nimg=10**6, rampup=0.05)
    assert abs(b - 0.5 ** (16 / 5000)) < 1e-15
    assert abs(b ** (5000 / 16) - 0.5) < 1e-12  # half-life of ema_kimg*1000 images
    # early in training the ramp-up shortens the half-life to cur_nimg * rampup
    assert abs(stylegan_ema_beta(16, 5, cur_nimg=20_000, rampup=0.05) - 0.5 ** (16 / 1000)) < 1e-15
    assert stylegan_ema_beta(16, 5, cur_nimg=0, rampup=0.05) == 0.0  # copy at the very start
    # paper256: batch 64, ema_kimg 20, no ramp-up
    assert abs(stylegan_ema_beta(64, 20, cur_nimg=0) - 0.5 ** (64 / 20000)) < 1e-15
