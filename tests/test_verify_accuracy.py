"""Verification judges accuracy against a float64 run of the original, not agreement with the original."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
import fxfuse.backends.cpu.attention as cpu_attention
import fxfuse.passes.rewrite as rewrite
from examples.attention_models import HandMHA
from fxfuse.passes.verify import FACTOR, judge, run_cases


def test_more_accurate_than_the_original_is_accepted():
    truth = torch.linspace(1.0, 2.0, 8, dtype=torch.float64)
    want = (truth * (1 + 1e-3)).float()  # the original itself is 1e-3 off
    assert judge((truth * (1 + 5e-4)).float(), want, truth, 1e-5).ok
    assert judge((truth * (1 - 1.5e-3)).float(), want, truth, 1e-5).ok  # within FACTOR of the original
    bad = judge((truth * (1 + 3e-3)).float(), want, truth, 1e-5)
    assert not bad.ok and bad.max_rel_err == pytest.approx(3e-3, rel=1e-3)
    assert bad.original_rel_err == pytest.approx(1e-3, rel=1e-3) and bad.tolerance == 1e-5
    assert "3.00e-03" in bad.reason and "1.00e-03" in bad.reason and "1e-05" in bad.reason


def test_without_truth_the_original_is_the_bar():
    want = torch.linspace(1.0, 2.0, 8)
    assert judge(want * (1 + 5e-6), want, None, 1e-5).ok
    assert not judge(want * (1 + 5e-5), want, None, 1e-5).ok


def test_overflowing_original_waves_nothing_through():
    # An fp16 original overflows to inf on part of its output where the float64 truth is finite. The
    # fused result keeps those infs (positions must match) but is 81 % off elsewhere: that is judged on
    # the entries where the original is finite, so the original's inf error does not excuse it.
    def original(x):
        return x * 1000.0

    def fused(x):
        y = x * 1000.0
        return torch.where(torch.isinf(y), y, y * 0.19)

    def make_inputs(case, seed):
        x = torch.linspace(-100.0, 100.0, 64, dtype=torch.float16)
        return [x]

    c = run_cases(original, fused, make_inputs, 1e-2, cases=[("large", 3)])
    assert not c.ok and c.max_rel_err == pytest.approx(0.81, rel=1e-2), c
    assert math.isfinite(c.original_rel_err)
    assert run_cases(original, original, make_inputs, 1e-2, cases=[("large", 3)]).ok


def test_nan_and_inf_positions_still_exact():
    truth = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    want = torch.tensor([1.0, float("nan"), 3.0])
    assert not judge(torch.tensor([1.0, 2.0, 3.0]), want, truth, 1e-5).ok
    assert judge(torch.tensor([1.0, float("nan"), 3.0]), want, truth, 1e-5).ok
    # gradients of a forward with NaN rows: NaN placement is the formula's, the finite entries still count
    assert judge(torch.tensor([1.0, 2.0, float("nan")]), want, truth, 1e-5, exact_nan=False).ok
    assert not judge(torch.tensor([1.1, 2.0, float("nan")]), want, truth, 1e-5, exact_nan=False).ok


class RoundsToHalf(nn.Module):
    def forward(self, x):
        return (x * 3.0).to(torch.float16).to(torch.float32)


class Times(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_whole_graph_check_accepts_a_more_accurate_rewrite():
    # The captured graph rounds through fp16 (5e-4 off); a rewrite computing x * 3 exactly disagrees with
    # it by more than 1e-4 but is closer to the float64 run, where the fp16 round trip becomes float64.
    original = torch.fx.symbolic_trace(RoundsToHalf())
    x = torch.linspace(1.0, 2.0, 101)
    assert rewrite.check_whole_graph(original, torch.fx.symbolic_trace(Times(3.0)), [x]).ok
    assert not rewrite.check_whole_graph(original, torch.fx.symbolic_trace(Times(3.01)), [x]).ok


class WritesBuffer(nn.Module):
    """Returns x and writes x * factor into its second input in place (a running statistic)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x, buf):
        buf.copy_(x * self.factor)
        return x + 0.0


def test_whole_graph_check_compares_inputs_written_in_place():
    # the outputs agree; only the buffer the graph writes differs
    original = torch.fx.symbolic_trace(WritesBuffer(2.0))
    x, buf = torch.randn(5), torch.zeros(5)
    assert rewrite.check_whole_graph(original, torch.fx.symbolic_trace(WritesBuffer(2.0)), [x, buf]).ok
    assert not rewrite.check_whole_graph(original, torch.fx.symbolic_trace(WritesBuffer(2.5)), [x, buf]).ok
    assert not buf.any()  # the check ran on clones


class BertMHA(nn.Module):
    """BERT-style self-attention: separate projections, scores / sqrt(d), a boolean key-padding mask."""

    def __init__(self, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        d = dim // self.heads
        q, k, v = (f(x).view(b, n, self.heads, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, dim)


class WhisperAttention(nn.Module):
    """Whisper's spelling: q and k each scaled by d^-0.25, k transposed by its permute, float softmax."""

    def __init__(self, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        d = dim // self.heads
        scale = d**-0.25
        q = self.q(x).view(b, n, self.heads, d).permute(0, 2, 1, 3) * scale
        k = self.k(x).view(b, n, self.heads, d).permute(0, 2, 3, 1) * scale
        v = self.v(x).view(b, n, self.heads, d).permute(0, 2, 1, 3)
        w = F.softmax((q @ k).float(), dim=-1).to(q.dtype)
        return (w @ v).permute(0, 2, 1, 3).flatten(2)


def _inputs(with_mask: bool) -> tuple:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 128, generator=gen)
    return (x, torch.rand(2, 256, generator=gen) < 0.8) if with_mask else (x,)


# Both were rejected by agreement with the fp32 original (6.4e-05 and 4.7e-04 > 1e-05 at x100 inputs),
# where the fused result is no further from the float64 truth than the original is.
@pytest.mark.parametrize("model_cls", [BertMHA, WhisperAttention], ids=["bert-padded", "whisper-qk-scaled"])
def test_correct_rewrites_at_n256_d128_are_applied(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    inputs = _inputs(model_cls is BertMHA)
    with torch.no_grad():
        opt = fxfuse.optimize(model, inputs)
        rep = fxfuse.report(opt)
        assert rep.count("attention") == 1, str(rep)
        r = rep.rewrites[0]
        assert r.tolerance == 1e-5 and r.original_rel_err is not None
        assert r.max_rel_err <= max(r.tolerance, FACTOR * r.original_rel_err)
        got, want = opt(*inputs), model(*inputs)
        truth = model.double()(*[x.double() if x.is_floating_point() else x for x in inputs])
    assert (got - truth).abs().max() <= 2 * (want - truth).abs().max() + 1e-6


def test_forward_off_by_1e3_is_rejected(monkeypatch):
    # A fused path 0.1 % off must not ride on the large case's rounding: the normal cases reject it.
    real = cpu_attention.attention_cpu
    monkeypatch.setattr(cpu_attention, "attention_cpu", lambda *args: real(*args) * (1 + 1e-3))
    model, inputs = HandMHA.make()
    with torch.no_grad():
        rep = fxfuse.report(fxfuse.optimize(model, inputs, backend="cpu"))
    assert rep.count() == 0, str(rep)
    r = rep.rewrites[0]
    assert "failed verification" in r.reason and "original's own" in r.reason and "tolerance 1e-05" in r.reason
    assert r.max_rel_err == pytest.approx(1e-3, rel=0.05) and r.original_rel_err < 1e-5


def test_region_without_float64_run_is_judged_against_the_original(monkeypatch):
    def no_double(gm):
        def run(*args):
            raise RuntimeError("no float64 kernel")

        return run

    monkeypatch.setattr(rewrite, "float64_copy", no_double)
    model, inputs = HandMHA.make()
    with torch.no_grad():
        rep = fxfuse.report(fxfuse.optimize(model, inputs))
    assert rep.count() == 1, str(rep)
    r = rep.rewrites[0]
    assert "judged against the original" in r.reason and "no float64 kernel" in r.reason
    assert r.original_rel_err is None and r.max_rel_err < 1e-5
