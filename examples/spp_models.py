"""Example models with spatial pyramid pooling, written the way the originals spell it.

Each `make_*()` returns (model in eval mode, example_inputs tuple) for the demo, tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBnAct(nn.Module):
    """Conv2d + BatchNorm + SiLU, the YOLOv5 `Conv` block."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SPP(nn.Module):
    """YOLOv3/v5 SPP: parallel max pools at 5, 9, 13 concatenated with their input."""

    def __init__(self, c_in: int, c_out: int, k: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBnAct(c_in, hidden)
        self.cv2 = ConvBnAct(hidden * (len(k) + 1), c_out)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPF(nn.Module):
    """YOLOv5/v8 SPPF: one 5x5 pool applied three times, every intermediate concatenated."""

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBnAct(c_in, hidden)
        self.cv2 = ConvBnAct(hidden * 4, c_out)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class YoloNeck(nn.Module):
    """A small YOLO-style neck: downsampling convs, a pyramid-pooling block, an upsampling path."""

    def __init__(self, pool: type[nn.Module], c: int = 128) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvBnAct(3, c // 4, 3, 2), ConvBnAct(c // 4, c // 2, 3, 2), ConvBnAct(c // 2, c, 3, 2)
        )
        self.pool = pool(c, c)
        self.lateral = ConvBnAct(c, c // 2)
        self.head = nn.Conv2d(c // 2, 18, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool(self.stem(x))
        p = F.interpolate(self.lateral(p), scale_factor=2.0, mode="nearest")
        return self.head(p)


class SPPNetClassifier(nn.Module):
    """SPPNet (He et al. 2014): fixed-length features from any input size via 1/2/4-bin max pools."""

    def __init__(self, bins: tuple[int, ...] = (1, 2, 4), classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(ConvBnAct(3, 32, 3, 2), ConvBnAct(32, 64, 3, 2))
        self.bins = bins
        self.fc = nn.Linear(64 * sum(n * n for n in bins), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        levels = [F.adaptive_max_pool2d(f, n).view(f.size(0), -1) for n in self.bins]
        return self.fc(torch.cat(levels, dim=1))


class PlainCNN(nn.Module):
    """No pattern at all: optimize must return it working, and no slower."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBnAct(3, 32, 3, 2), ConvBnAct(32, 64, 3, 2), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def _ready(model: nn.Module, *inputs: torch.Tensor) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return model.eval(), inputs


def make_yolo_spp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return _ready(YoloNeck(SPP), torch.randn(2, 3, 160, 160))


def make_yolo_sppf() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return _ready(YoloNeck(SPPF), torch.randn(2, 3, 160, 160))


def make_sppnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return _ready(SPPNetClassifier(), torch.randn(4, 3, 64, 64))


def make_plain_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return _ready(PlainCNN(), torch.randn(4, 3, 64, 64))


MODELS = {
    "yolo_spp": make_yolo_spp,
    "yolo_sppf": make_yolo_sppf,
    "sppnet": make_sppnet,
    "plain_cnn": make_plain_cnn,
}
