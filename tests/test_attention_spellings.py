"""Generated attention spellings (a fixed-seed sample of `tests/spellings.py`), and five spellings found in
third-party code, each written here from scratch: every one fused with the original's numbers.

The larger run: `python -m tests.spellings --n 2000`.
"""

from __future__ import annotations

import copy
import random

import pytest
import spellings
import torch
from torch import nn

import fxfuse

# The CI sample: every near miss once (layouts rotating) and valid spellings drawn with a fixed seed.
SEED, VALID = 0, 48


def test_generated_spellings_are_fused_and_near_misses_left_alone() -> None:
    rng = random.Random(SEED)
    valid = [spellings.sample(rng) for _ in range(VALID)]
    near = [spellings.Choice(near_miss=k, layout=("bhnd", "bnhd", "merged")[i % 3])
            for i, k in enumerate(spellings.NEAR_MISSES)]  # fmt: skip
    tally = spellings.Tally([spellings.judge(c, SEED) for c in valid + near])
    print("\n" + tally.summary())
    bad = [f"{o.verdict} {o.choice.name}: {o.detail}" for o in tally.outcomes if o.verdict in ("wrong", "touched")]
    missed = [f"{o.choice.name}: {o.detail}" for o in tally.outcomes if o.verdict == "missed"]
    assert not bad, "\n".join(bad)
    assert tally.counts["untouched"] == len(near)
    assert tally.fused_share >= 0.95, "\n".join(missed)


def _f64(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(*(x.double() if x.is_floating_point() else x for x in inputs))


def _fused(model: nn.Module, inputs: tuple, fragments: list[str], absent: tuple[str, ...] = ()) -> fxfuse.Report:
    """Optimize, expect one attention site with `fragments` in its variant, then compare on fresh inputs
    with the float64 truth: no further from it than the original is."""
    torch.manual_seed(0)
    opt = fxfuse.optimize(model.eval(), inputs, patterns=["attention"])
    rep = fxfuse.report(opt)
    assert rep.count("attention") == 1, str(rep)
    (r,) = [r for r in rep.rewrites if r.status == "applied"]
    assert all(f in r.variant for f in fragments) and not any(a in r.variant for a in absent), str(rep)
    fresh = tuple(torch.randn_like(x) if x.is_floating_point() else x for x in inputs)
    truth = _f64(model, fresh)
    with torch.no_grad():
        got, want = opt(*fresh), model(*fresh)
    err = lambda y: ((y.double() - truth).abs().max() / truth.abs().max()).item()
    assert err(got) <= max(1e-5, 2 * err(want)), (err(got), err(want))
    return rep


class DecomposedRelPos(nn.Module):
    """Segment Anything's image-encoder attention: heads folded into the batch, and a relative-position
    bias from q added while the scores are viewed [B*heads, qh, qw, kh, kw]."""

    def __init__(self, dim: int = 32, heads: int = 4, size: int = 4) -> None:
        super().__init__()
        self.heads, hd = heads, dim // heads
        self.scale = hd**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel_h = nn.Parameter(torch.randn(2 * size - 1, hd))
        self.rel_w = nn.Parameter(torch.randn(2 * size - 1, hd))

    @staticmethod
    def _table(rel: torch.Tensor, n: int) -> torch.Tensor:
        i = torch.arange(n)
        return rel[i[:, None] - i[None, :] + n - 1]  # [n, n, hd]: embedding of each query-key offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, qh, qw, c = x.shape
        qkv = self.qkv(x).reshape(b, qh * qw, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, qh * qw, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        r_q = q.reshape(b * self.heads, qh, qw, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self._table(self.rel_h, qh))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self._table(self.rel_w, qw))
        bh = b * self.heads
        attn = (attn.view(bh, qh, qw, qh, qw) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(
            bh, qh * qw, qh * qw
        )
        o = attn.softmax(dim=-1) @ v
        return o.view(b, self.heads, qh, qw, -1).permute(0, 2, 3, 1, 4).reshape(b, qh, qw, c)


class CausalRelu2(nn.Module):
    """Squared-relu attention made causal after the score function: zeroing relu(s)**2 above the diagonal
    is the same as masking the scores (relu² of a masked score is 0)."""

    def __init__(self, dim: int = 32, heads: int = 4, n: int = 8) -> None:
        super().__init__()
        self.heads, self.n = heads, n
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        p = torch.relu(q @ k.transpose(-2, -1) / n) ** 2
        p = p.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), 0)
        return (p @ v).transpose(1, 2).reshape(b, n, c)


class EllipsisEinsum(nn.Module):
    """Both products as einsums over an ellipsis of batch and head axes."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        s = torch.einsum("... i d, ... j d -> ... i j", q, k) * (c // self.heads) ** -0.5
        o = torch.einsum("... i j, ... j d -> ... i d", s.softmax(-1), v)
        return o.transpose(1, 2).reshape(b, n, c)


class PackedLoopMask(nn.Module):
    """Packed variable-length sequences [T, C]: the block-diagonal mask is built in a Python loop that slices
    at the values of cu_seqlens (`.item()`; as a graph break inside a loop, dynamo would skip the frame)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        t, c = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.heads, -1).permute(1, 2, 0, 3)
        mask = torch.zeros(t, t, dtype=torch.bool)
        for i in range(len(cu_seqlens) - 1):
            a, b = cu_seqlens[i].item(), cu_seqlens[i + 1].item()
            mask[a:b, a:b] = True
        s = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        return (s.softmax(-1) @ v).transpose(0, 1).reshape(t, c)


class BlockMaskAdded(nn.Module):
    """A boolean block mask *added* to the scores: a bias of 0 and 1, not a mask."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5 + blocks[:, None]
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def test_sam_decomposed_relative_position_bias() -> None:
    _fused(DecomposedRelPos(), (torch.randn(2, 4, 4, 32),), ["mask additive", "3-D"])


def test_causal_relu2_zeroed_after_the_score_function() -> None:
    _fused(CausalRelu2(), (torch.randn(2, 8, 32),), ["causal", "relu2"])


def test_einsum_with_ellipsis() -> None:
    _fused(EllipsisEinsum(), (torch.randn(2, 8, 32),), ["scale 0.3536"])


def test_packed_varlen_mask_built_in_a_loop() -> None:
    model = PackedLoopMask().eval()
    _fused(model, (torch.randn(12, 32), torch.tensor([0, 3, 7, 12])), ["mask bool"])
    # other boundaries, same shapes: the mask is computed in the captured graph, not frozen at capture
    opt = fxfuse.optimize(model, (torch.randn(12, 32), torch.tensor([0, 3, 7, 12])), patterns=["attention"])
    x, cu = torch.randn(12, 32), torch.tensor([0, 5, 6, 12])
    with torch.no_grad():
        torch.testing.assert_close(opt(x, cu), model(x, cu), rtol=1e-5, atol=1e-6)


def test_boolean_block_mask_added_is_a_bias() -> None:
    blocks = torch.arange(8) // 3
    same = (blocks[:, None] == blocks[None, :]).expand(2, 8, 8).clone()
    _fused(BlockMaskAdded(), (torch.randn(2, 8, 32), same), ["mask additive"], absent=("mask bool", "causal"))


@pytest.mark.parametrize("cls", [DecomposedRelPos, EllipsisEinsum])
def test_third_party_spellings_train(cls) -> None:
    # the fused op carries its own backward: gradients match the original's
    model = cls()
    x = torch.randn(2, 4, 4, 32) if cls is DecomposedRelPos else torch.randn(2, 8, 32)
    opt = fxfuse.optimize(model, (x,), patterns=["attention"])
    assert fxfuse.report(opt).count("attention") == 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    opt(x1).square().sum().backward()
    model(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
