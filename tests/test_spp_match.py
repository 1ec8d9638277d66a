"""SPP detection inside larger models: every spelling found and fused exactly, every near miss left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from examples.spp_models import ConvBnAct, make_sppnet, make_yolo_spp, make_yolo_sppf

# --- positive: each a full model around the pyramid --------------------------------------------------


class Wrap(nn.Module):
    """conv -> pyramid (given as a function of the feature map) -> conv, so the site sits mid-graph."""

    def __init__(self, pyramid, c: int = 8, out_mult: int = 4) -> None:
        super().__init__()
        self.pre = ConvBnAct(3, c, 3)
        self.pyramid = pyramid
        self.post = nn.Conv2d(c * out_mult, 4, 1)

    def forward(self, x):
        return self.post(self.pyramid(self.pre(x)))


def yolo_reversed(x):
    # YOLOv3-spp order: largest pool first, input last.
    return torch.cat([F.max_pool2d(x, k, 1, k // 2) for k in (13, 9, 5)] + [x], dim=1)


def sppf_functional(x):
    y1 = F.max_pool2d(x, 5, 1, 2)
    y2 = F.max_pool2d(y1, 5, 1, 2)
    y3 = F.max_pool2d(y2, 5, 1, 2)
    return torch.cat([x, y1, y2, y3], dim=-3)


def sppcspc_pools(x):
    # YOLOv7 SPPCSPC: nn.MaxPool2d modules with tuple arguments, concatenated with the input first.
    pools = [nn.MaxPool2d(kernel_size=(k, k), stride=(1, 1), padding=(k // 2, k // 2)) for k in (5, 9, 13)]
    return torch.cat([x] + [m(x) for m in pools], 1)


def sppf_k3(x):
    # A 3x3 SPPF: sizes 3, 5, 7.
    y1 = F.max_pool2d(x, 3, 1, 1)
    y2 = F.max_pool2d(y1, 3, 1, 1)
    y3 = F.max_pool2d(y2, 3, 1, 1)
    return torch.cat([x, y1, y2, y3], 1)


def ceil_mode_stride_1(x):
    # ceil_mode at stride 1 changes neither the output size nor a window: the same pyramid
    return torch.cat([x] + [F.max_pool2d(x, k, 1, k // 2, ceil_mode=True) for k in (5, 9, 13)], 1)


def with_indices(x):
    y, _ = F.max_pool2d(x, 5, 1, 2, return_indices=True)
    return torch.cat([x, y, F.max_pool2d(x, 9, 1, 4), F.max_pool2d(x, 13, 1, 6)], 1)


POSITIVE = {
    "yolo-reversed-order": (yolo_reversed, "sizes 13/9/5/1, parallel"),
    "sppf-functional-dim-3": (sppf_functional, "sizes 1/5/9/13, chained (SPPF)"),
    "sppcspc-tuple-args": (sppcspc_pools, "sizes 1/5/9/13, parallel"),
    "sppf-kernel3": (sppf_k3, "sizes 1/3/5/7, chained (SPPF)"),
    "ceil-mode-stride-1": (ceil_mode_stride_1, "sizes 1/5/9/13, parallel"),
}


@pytest.mark.parametrize("name", list(POSITIVE))
def test_pyramid_found_and_exact(name):
    pyramid, variant = POSITIVE[name]
    model = Wrap(pyramid).eval()
    x = torch.randn(2, 3, 11, 13)
    opt = fxfuse.optimize(model, (x,))
    rep = fxfuse.report(opt)
    assert rep.count("spp") == 1, str(rep)
    assert rep.rewrites[0].variant == variant
    assert rep.rewrites[0].max_rel_err == 0.0
    x2 = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        assert torch.equal(opt(x2), model(x2))


def test_return_indices_spelling_found_after_canonicalization():
    model = Wrap(with_indices).eval()
    x = torch.randn(1, 3, 9, 9)
    opt = fxfuse.optimize(model, (x,))
    assert fxfuse.report(opt).count("spp") == 1, str(fxfuse.report(opt))
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


@pytest.mark.parametrize("make", [make_yolo_spp, make_yolo_sppf, make_sppnet], ids=["yolo-spp", "yolo-sppf", "sppnet"])
def test_example_models_exact(make):
    model, inputs = make()
    opt = fxfuse.optimize(model, inputs)
    assert fxfuse.report(opt).count("spp") == 1
    fresh = tuple(torch.randn_like(t) for t in inputs)
    with torch.no_grad():
        assert torch.equal(opt(*fresh), model(*fresh))


class ComputedWindowSPP(nn.Module):
    """The original SPPNet code computes window, stride and padding from the feature size."""

    def __init__(self, bins=(4, 2, 1)) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x):
        import math

        b, _, h, w = x.shape
        levels = []
        for n in self.bins:
            kh, kw = math.ceil(h / n), math.ceil(w / n)
            ph, pw = (kh * n - h + 1) // 2, (kw * n - w + 1) // 2
            levels.append(F.max_pool2d(x, (kh, kw), (kh, kw), (ph, pw)).view(b, -1))
        return torch.cat(levels, 1)


def test_sppnet_computed_windows_found_when_they_equal_adaptive_bins():
    model = ComputedWindowSPP().eval()
    x = torch.randn(2, 5, 8, 8)  # 8 divides evenly: the computed windows are the adaptive ones
    opt = fxfuse.optimize(model, (x,))
    rep = fxfuse.report(opt)
    assert rep.count("spp") == 1 and rep.rewrites[0].variant == "bins 4/2/1", str(rep)
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


def test_sppnet_computed_windows_left_alone_when_they_differ():
    model = ComputedWindowSPP(bins=(3,)).eval()
    x = torch.randn(2, 5, 13, 13)  # kernel 5 stride 5 pad 1 at 13: windows [0,4) [4,9) [9,13) vs adaptive
    opt = fxfuse.optimize(model, (x,))
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))
    assert fxfuse.report(opt).count("spp") == 0


# --- near misses: each must be left alone, numbers unchanged ---------------------------------------


def zero_padding(x):
    # F.pad pads with zeros, not -inf: different numbers wherever the input is negative near the border.
    return torch.cat([x] + [F.max_pool2d(F.pad(x, (k // 2,) * 4), k, 1) for k in (5, 9)], 1)


def strided_ceil_mode(x):
    return torch.cat([F.max_pool2d(x, 3, 2, 1, ceil_mode=True), F.max_pool2d(x, 5, 2, 2, ceil_mode=True)], 1)


def dilated(x):
    # ATen forbids padding > kernel/2, so a dilated pool is never same-size; both levels come out H-2.
    return torch.cat([F.max_pool2d(x, 3, 1, 1, dilation=2), F.max_pool2d(x, 5, 1, 1)], 1)


def strided(x):
    return torch.cat([F.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 5, 2, 2)], 1)


def average(x):
    return torch.cat([x] + [F.avg_pool2d(x, k, 1, k // 2) for k in (5, 9, 13)], 1)


class PoolUsedElsewhere(nn.Module):
    def forward(self, x):
        y = F.max_pool2d(x, 5, 1, 2)
        return torch.cat([x, y, F.max_pool2d(x, 9, 1, 4)], 1), y.sum()


class MixedChainParallel(nn.Module):
    def forward(self, x):
        y = F.max_pool2d(x, 5, 1, 2)
        return torch.cat([x, y, F.max_pool2d(x, 13, 1, 6), F.max_pool2d(y, 9, 1, 4)], 1)


def other_input(x):
    return torch.cat([x * 2, F.max_pool2d(x, 5, 1, 2)], 1)


NEAR_MISSES = {
    "zero-padding-F.pad": (lambda: Wrap(zero_padding, out_mult=3), "zero-padded with F.pad"),
    "stride-2-ceil-mode": (lambda: Wrap(strided_ceil_mode, out_mult=2), "ceil_mode"),
    "dilation": (lambda: Wrap(dilated, out_mult=2), "dilation"),
    "stride-2": (lambda: Wrap(strided, out_mult=2), "stride"),
    "average-pools": (lambda: Wrap(average), None),
    "pool-used-elsewhere": (PoolUsedElsewhere, "also used by"),
    "mixed-chain-and-parallel": (lambda: Wrap(MixedChainParallel(), out_mult=4), "mixes chained and parallel"),
    "concat-with-another-tensor": (lambda: Wrap(other_input, out_mult=2), "not all max-pooled from the same input"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_left_alone(name):
    make, reason = NEAR_MISSES[name]
    model = make().eval()
    x = torch.randn(2, 3 if isinstance(model, Wrap) else 6, 11, 11)
    opt = fxfuse.optimize(model, (x,))
    rep = fxfuse.report(opt)
    assert rep.count("spp") == 0, str(rep)
    if reason is not None:
        assert any(reason in r.reason for r in rep.rejected("spp")), str(rep)
    x2 = -torch.rand_like(x)  # negative inputs expose zero-vs--inf padding differences
    with torch.no_grad():
        got, want = opt(x2), model(x2)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)


def test_zero_padding_would_change_numbers():
    # The near miss above matters: a fused -inf-padded pyramid differs from F.pad + pool on negative input.
    x = -torch.rand(1, 2, 7, 7)
    assert not torch.equal(zero_padding(x), torch.cat([x] + [F.max_pool2d(x, k, 1, k // 2) for k in (5, 9)], 1))
