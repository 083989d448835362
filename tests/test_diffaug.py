"""common/diffaug.py against the DiffAugment reference formulas (DiffAugment_pytorch.py)."""
import pytest
import torch
import torch.nn.functional as F

from common.diffaug import diff_augment, rand_brightness, rand_contrast, rand_cutout, rand_saturation, rand_translation


def shifted(x, dx, dy):
    """x shifted by (dx, dy) with zeros shifted in: out[i, j] = x[i - dx, j - dy]."""
    H, W = x.shape[-2:]
    p = F.pad(x, [W, W, H, H])
    return p[..., H - dx: 2 * H - dx, W - dy: 2 * W - dy]


def test_brightness_is_one_offset_in_half_range_per_sample():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    d = rand_brightness(x) - x
    off = d[:, 0, 0, 0]
    assert torch.allclose(d, off[:, None, None, None].expand_as(d), atol=1e-6)
    assert off.min() >= -0.5 and off.max() < 0.5 and off.std() > 0.2  # U[0,1) - 0.5, per-sample draws


def test_saturation_and_contrast_scales():
    torch.manual_seed(0)
    x = torch.rand(256, 3, 4, 4) * 2 - 1
    m = x.mean(1, keepdim=True)
    ratio = ((rand_saturation(x) - m) / (x - m))[:, 0, 0, 0]
    assert ratio.min() >= 0 and ratio.max() < 2 and ratio.max() > 1.9  # 2U in [0, 2)
    mc = x.mean([1, 2, 3], keepdim=True)
    ratio = ((rand_contrast(x) - mc) / (x - mc))[:, 0, 0, 0]
    assert ratio.min() >= 0.5 and ratio.max() < 1.5  # U + 0.5


def test_translation_is_integer_shift_with_zero_fill():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 16, 16) + 1  # strictly positive, so a zero means "shifted in"
    y = rand_translation(x)
    s = int(16 * 0.125 + 0.5)
    seen = set()
    for i in range(32):
        hits = [(dx, dy) for dx in range(-s, s + 1) for dy in range(-s, s + 1)
                if torch.equal(y[i], shifted(x[i], dx, dy))]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 5  # independent draws per sample and per axis


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(0)
    x = torch.ones(64, 3, 16, 16)
    y = rand_cutout(x)
    side = int(16 * 0.5 + 0.5)
    zeros = (y[:, 0] == 0)
    assert torch.equal(zeros, (y == 0).all(1))  # same mask on every channel
    for i in range(64):
        rows, cols = zeros[i].any(1).nonzero().flatten(), zeros[i].any(0).nonzero().flatten()
        assert zeros[i].sum() == len(rows) * len(cols)  # a rectangle
        assert 1 <= len(rows) <= side and 1 <= len(cols) <= side
    assert (zeros.flatten(1).sum(1) == side * side).float().mean() > 0.2  # often the full square (not clipped)


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_gradients_flow(policy):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    diff_augment(x, policy).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_policy_order_and_unknown_op():
    x = torch.randn(2, 3, 8, 8)
    assert diff_augment(x, "") is x
    with pytest.raises(ValueError, match="unknown DiffAugment op 'flip'"):
        diff_augment(x, "color,flip")
    torch.manual_seed(1)
    a = diff_augment(x, "color,translation")
    torch.manual_seed(1)
    b = rand_translation(rand_contrast(rand_saturation(rand_brightness(x))))
    assert torch.equal(a, b)


def test_memory_format_is_kept():
    """A channels-last batch stays channels-last (FastGAN trains NHWC); values equal the NCHW result."""
    x = torch.randn(3, 3, 16, 16)
    torch.manual_seed(0)
    a = diff_augment(x, "color,translation,cutout")
    torch.manual_seed(0)
    b = diff_augment(x.contiguous(memory_format=torch.channels_last), "color,translation,cutout")
    assert a.is_contiguous() and b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
    assert torch.allclose(a, b, atol=1e-6)


def test_check_policy_names_the_bad_op():
    from common.diffaug import check_policy
    from common.run import UserError
    check_policy("", "--policy")
    check_policy("color, translation,cutout", "--policy")
    with pytest.raises(UserError, match=r"--diffaug color,flip: unknown DiffAugment op\(s\) flip: use a comma list"):
        check_policy("color,flip", "--diffaug")
