"""Attention spellings with verification off: only the matcher stands between the user and a wrong number.

Each case runs `fxfuse.optimize(..., verify=False)` and compares with a float64 run of the same model (NaN
exactly where the original has NaN). Near misses must be left alone with the reason in the report.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse

MIN32 = torch.finfo(torch.float32).min


class Scores(nn.Module):
    """`fn(q, k, v, *extra)` on given tensors: the whole model is one attention spelling."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def _unverified(fn, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor, fxfuse.Report]:
    """(optimized output, float64 output of the original, report) with verification off."""
    model = Scores(fn).eval()
    opt = fxfuse.optimize(model, inputs, patterns=["attention"], verify=False)
    wide = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        return opt(*inputs), model(*wide), fxfuse.report(opt)


def _hand_softmax_max_without_keepdim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = q @ k.transpose(-2, -1)
    e = torch.exp(s - s.amax(-1))  # [G, N] broadcasts over [G, N, N]'s last two axes when G == N
    return e / e.sum(-1, keepdim=True) @ v


def test_hand_softmax_with_row_max_without_keepdim_is_left_alone() -> None:
    # the max of row i was subtracted from column i: not a per-row constant, not a softmax (off by 0.65)
    q, k, v = (torch.randn(8, 8, 4) for _ in range(3))
    out, ref, rep = _unverified(_hand_softmax_max_without_keepdim, (q, k, v))
    assert rep.count("attention") == 0, str(rep)
    assert any("keepdim" in r.reason for r in rep.rejected("attention")), str(rep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def _two_fills(fill_a: float, fill_b: float):
    return lambda q, k, v, a, b: (q @ k.transpose(-2, -1)).masked_fill(a, fill_a).masked_fill(b, fill_b).softmax(-1) @ v


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 6, 6, generator=g) < 0.3, torch.rand(2, 1, 6, 6, generator=g) < 0.3
    a[:, :, 0, :3], b[:, :, 0] = True, True  # row 0 fully masked, by both masks
    return a, b


def test_two_different_huge_fills_are_left_alone() -> None:
    # on a fully masked row the softmax is uniform over the positions holding the larger fill (finfo.min / 2
    # beats finfo.min), not over the row: one fill value in the fused op was off by 0.48 there
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    out, ref, rep = _unverified(_two_fills(MIN32, MIN32 / 2), (q, k, v, *_masks()))
    assert rep.count("attention") == 0, str(rep)
    assert any("different values" in r.reason for r in rep.rejected("attention")), str(rep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_two_equal_huge_fills_are_fused() -> None:
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    out, ref, rep = _unverified(_two_fills(MIN32, MIN32), (q, k, v, *_masks()))
    assert rep.count("attention") == 1, str(rep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_scaled_fill_overflowing_half_stays_masked_as_inf() -> None:
    # in float16 masked_fill(-1e4) * 10 is -inf (a fully masked row gives NaN); the fused op computes in
    # float32, where a fill of -1e5 stays finite and the row came out uniform instead of NaN
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g).half() for _ in range(3))
    _, mask = _masks()  # row 0 fully masked
    fn = lambda q, k, v, m: ((q @ k.transpose(-2, -1)).masked_fill(m, -1e4) * 10.0).softmax(-1) @ v
    model = Scores(fn).eval()
    opt = fxfuse.optimize(model, (q, k, v, mask), patterns=["attention"], verify=False)
    assert fxfuse.report(opt).count("attention") == 1, str(fxfuse.report(opt))
    with torch.no_grad():
        out, orig = opt(q, k, v, mask), model(q, k, v, mask)
    assert bool(orig.isnan().any())
    torch.testing.assert_close(out, orig, rtol=1e-2, atol=1e-2, equal_nan=True)


def test_huge_fill_rounded_to_half_before_the_softmax_stays_masked_as_inf() -> None:
    # finfo32.min is -inf in float16: the original's fully masked row is NaN; the fused op kept it finite
    _, mask = _masks()
    fn = lambda q, k, v, m: (q @ k.transpose(-2, -1)).masked_fill(m, MIN32).half().float().softmax(-1) @ v
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    model = Scores(fn).eval()
    opt = fxfuse.optimize(model, (q, k, v, mask), patterns=["attention"], verify=False)
    assert fxfuse.report(opt).count("attention") == 1, str(fxfuse.report(opt))
    with torch.no_grad():
        out, orig = opt(q, k, v, mask), model(q, k, v, mask)
    assert bool(orig.isnan().any())
    torch.testing.assert_close(out, orig, rtol=1e-2, atol=1e-2, equal_nan=True)


def _keys_first(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scores laid out [B, H, Nk, Nq] (k @ q^T): softmax over the keys (dim=-2), then p^T @ v."""
    return s.softmax(-2).transpose(-2, -1) @ v


def _segment_ids(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_q: torch.Tensor, seg_k: torch.Tensor):
    same = seg_k[:, :, None] == seg_q[:, None, :]  # [B, Nk, Nq]
    return _keys_first((k @ q.transpose(-2, -1)).masked_fill(~same[:, None], float("-inf")), v)


_SEGS = (torch.tensor([[0, 0, 0, 1, 1, 1]] * 2), torch.tensor([[0, 1, 1, 1, 1, 2]] * 2))
KEYS_FIRST = {
    # on [Nk, Nq] scores triu(1) masks keys before the query: anti-causal, once read as causal (off by 1.15)
    "triu_fill": (lambda q, k, v: _keys_first(
        (k @ q.transpose(-2, -1)).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf")), v), ()),
    "triu_bias": (lambda q, k, v: _keys_first(
        k @ q.transpose(-2, -1) + torch.full((6, 6), float("-inf")).triu(1), v), ()),
    "segment_ids": (_segment_ids, _SEGS),
}  # fmt: skip


@pytest.mark.parametrize("name", list(KEYS_FIRST))
def test_constant_masks_on_keys_first_scores_keep_their_orientation(name: str) -> None:
    fn, extra = KEYS_FIRST[name]
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    out, ref, rep = _unverified(fn, (q, k, v, *extra))
    assert rep.count("attention") == 1, str(rep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6, equal_nan=True)
