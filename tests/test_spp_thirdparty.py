"""Spatial pyramid pooling as third-party detectors spell it (Ultralytics, YOLOv5, YOLOv7, YOLOX), each block
written here from scratch in the same style: found and bitwise exact; look-alikes left alone and unchanged.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse


class Conv(nn.Module):
    """Conv2d + BatchNorm + SiLU, the detectors' `Conv` block."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class UltralyticsSPPF(nn.Module):
    """Spelled as in Ultralytics ultralytics/nn/modules/block.py SPPF: a list extended by a generator of
    pools of its last element, an optional residual."""

    def __init__(self, c: int = 8, k: int = 5, n: int = 3, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c // 2), Conv(c // 2 * (n + 1), c)
        self.m, self.n, self.add = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2), n, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(self.n))
        y = self.cv2(torch.cat(y, 1))
        return y + x if self.add else y


class Yolov5SPPF(nn.Module):
    """Spelled as in ultralytics/yolov5 models/common.py SPPF: the pools run inside warnings.catch_warnings()
    with simplefilter('ignore') (a filter change dynamo cannot trace)."""

    def __init__(self, c: int = 8, k: int = 5) -> None:
        super().__init__()
        self.cv1, self.cv2, self.m = Conv(c, c // 2), Conv(c // 2 * 4, c), nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Yolov5SPP(nn.Module):
    """Spelled as in ultralytics/yolov5 models/common.py SPP: parallel pools in a comprehension, inside
    warnings.catch_warnings()."""

    def __init__(self, c: int = 8, ks: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c // 2), Conv(c // 2 * (len(ks) + 1), c)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in ks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPCSPC(nn.Module):
    """Spelled as in WongKinYiu/yolov7 models/common.py SPPCSPC: the pyramid on one CSP branch, concatenated
    with the other branch afterwards."""

    def __init__(self, c: int = 8, ks: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        self.cv1, self.cv2, self.cv3 = Conv(c, c), Conv(c, c), Conv(4 * c, c)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in ks)
        self.cv4 = Conv(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.cv1(x)
        y1 = self.cv3(torch.cat([x1] + [m(x1) for m in self.m], 1))
        return self.cv4(torch.cat((y1, self.cv2(x)), dim=1))


class CeilModePools(nn.Module):
    """A YOLOX-style SPPBottleneck (Megvii YOLOX yolox/models/network_blocks.py) whose pools set ceil_mode=True:
    at stride 1 that changes neither the output size nor any window."""

    def __init__(self, c: int = 8, ks: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        self.conv1, self.conv2 = Conv(c, c // 2), Conv(c // 2 * 4, c)
        self.m = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2, ceil_mode=True) for k in ks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [m(x) for m in self.m], dim=1))


POSITIVE = {
    "ultralytics-sppf-extend": (UltralyticsSPPF, "sizes 1/5/9/13, chained (SPPF)"),
    "yolov5-sppf-catch-warnings": (Yolov5SPPF, "sizes 1/5/9/13, chained (SPPF)"),
    "yolov5-spp-catch-warnings": (Yolov5SPP, "sizes 1/5/9/13, parallel"),
    "yolov7-sppcspc": (SPPCSPC, "sizes 1/5/9/13, parallel"),
    "yolox-ceil-mode-stride-1": (CeilModePools, "sizes 1/5/9/13, parallel"),
}


@pytest.mark.parametrize("name", list(POSITIVE))
def test_third_party_pyramid_is_fused_and_exact(name: str) -> None:
    cls, variant = POSITIVE[name]
    torch.manual_seed(0)
    model = cls().eval()
    filters = list(warnings.filters)
    with torch.no_grad():
        opt = fxfuse.optimize(model, (torch.randn(2, 8, 11, 13),), patterns=["spp"])
        rep = fxfuse.report(opt)
        assert rep.count("spp") == 1, str(rep)
        assert [r.variant for r in rep.rewrites if r.status == "applied"][0] == variant
        x = torch.randn(2, 8, 11, 13)
        assert torch.equal(opt(x), model(x))
    assert warnings.filters == filters  # the user's warning filters are as they were


class ValidPools(nn.Module):
    """Pools without same padding (kernel 3 pad 0, kernel 5 pad 1): the levels shrink, not a same-size pyramid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.max_pool2d(x, 3, 1, 0), F.max_pool2d(x, 5, 1, 1)], 1)


class StridedCeilPools(nn.Module):
    """Stride-2 pools with ceil_mode: the windows are not one per position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.max_pool2d(x, 3, 2, 1, ceil_mode=True), F.max_pool2d(x, 5, 2, 2, ceil_mode=True)], 1)


NEAR_MISSES = {
    "valid-padding": (ValidPools, "output size changes"),
    "stride-2-ceil-mode": (StridedCeilPools, "ceil_mode"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_third_party_pool_look_alike_is_left_alone(name: str) -> None:
    cls, reason = NEAR_MISSES[name]
    model = cls().eval()
    x = -torch.rand(2, 8, 11, 13)
    with torch.no_grad():
        opt = fxfuse.optimize(model, (x,), patterns=["spp"])
        rep = fxfuse.report(opt)
        assert rep.count("spp") == 0, str(rep)
        assert any(reason in r.reason for r in rep.rejected("spp")), str(rep)
        assert torch.equal(opt(x), model(x))
