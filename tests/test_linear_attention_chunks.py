"""Linear attention written as a loop over chunks: the unrolled loop re-rolled into one causal
fxfuse::linear_attention, checked against float64 runs of the original (outputs and gradients); near
misses left exactly as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from examples.chunked_linear_attention import ChunkedLinearLayer, ChunkedNormalisedLayer, ChunkedRetentionLayer


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _check_against_float64(model: nn.Module, x: torch.Tensor, opt: nn.Module) -> None:
    """Outputs and gradients (input and parameters) of `opt` within 1e-4 of the original run in float64."""
    wide = x.double().requires_grad_()
    params64 = {k: p.detach().double().requires_grad_() for k, p in model.named_parameters()}
    want = torch.utils._pytree.tree_leaves(torch.func.functional_call(model, params64, (wide,)))
    mine = x.clone().requires_grad_()
    got = torch.utils._pytree.tree_leaves(opt(mine))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and _rel(g.detach(), w.detach()) < 1e-4
    cotangents = [torch.randn_like(w) for w in want]
    want_grads = torch.autograd.grad(want, [wide, *params64.values()], cotangents)
    got_grads = torch.autograd.grad(got, [mine, *model.parameters()], [c.float() for c in cotangents])
    for g, w in zip(got_grads, want_grads, strict=True):
        assert _rel(g, w) < 1e-4


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


LOOPS = {
    "plain-16": (ChunkedLinearLayer, 16, "chunk loop (4 chunks of 4) → 1 op, φ=relu, no normaliser, causal"),
    "retention-14-ragged": (ChunkedRetentionLayer, 14, "last 2) → 1 op, φ, no normaliser, causal, decay 0.9688/0.9844"),
    "normalised-16": (ChunkedNormalisedLayer, 16, "of 4) → 1 op, φ=elu+1, row-sum + 1e-06, causal"),
    "normalised-13-ragged": (ChunkedNormalisedLayer, 13, "chunk loop (4 chunks of 4, last 1) → 1 op"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LOOPS))
def test_chunk_loop_rerolled_and_verified(name):
    cls, n, phrase = LOOPS[name]
    torch.manual_seed(0)
    model, (x,) = cls.make(n, dim=16, heads=2)
    opt = fxfuse.optimize(model.train(), (x,), patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 1 and len(rep.rewrites) == 1, str(rep)
    assert phrase in rep.rewrites[0].variant, rep.rewrites[0].variant
    _check_against_float64(model, torch.randn_like(x), opt)


def split_einsum_state_from_none(q, k, v, chunk=4):
    # chunks from torch.split, einsum products, the state created by the first chunk (no zeros, no inter term)
    state, outs = None, []
    for qi, ki, vi in zip(q.split(chunk, 2), k.split(chunk, 2), v.split(chunk, 2)):
        c = qi.shape[2]
        scores = torch.einsum("bhnd,bhmd->bhnm", qi, ki) * torch.tril(torch.ones(c, c))
        out = torch.einsum("bhnm,bhme->bhne", scores, vi)
        outs.append(out if state is None else out + torch.einsum("bhnd,bhde->bhne", qi, state))
        kv = torch.einsum("bhmd,bhme->bhde", ki, vi)
        state = kv if state is None else state + kv
    return torch.cat(outs, dim=2)


def view_select_stack(q, k, v, chunk=4):
    # fla-style: the sequence viewed as [N / C, C], chunk i selected, outputs stacked and the rows merged back
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b, h, n // chunk, chunk, t.shape[-1]) for t in (q, k, v))
    state, outs = q.new_zeros(b, h, d, v.shape[-1]), []
    upper = torch.triu(torch.ones(chunk, chunk, dtype=torch.bool), diagonal=1)
    for i in range(n // chunk):
        qi, ki, vi = q[:, :, i], k[:, :, i], v[:, :, i]
        outs.append((qi @ ki.transpose(-1, -2)).masked_fill(upper, 0) @ vi + qi @ state)
        state = state + ki.transpose(-1, -2) @ vi
    return torch.stack(outs, dim=2).reshape(b, h, n, -1)


class Projected(nn.Module):
    """x [B, N, 16] -> q, k, v [B, 2, N, 8] -> core -> [B, N, 16]: parameters whose gradients get checked."""

    def __init__(self, core) -> None:
        super().__init__()
        self.core, self.qkv = core, nn.Linear(16, 48)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 2, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return self.core(q, k, v).transpose(1, 2).reshape(b, n, -1)


def test_view_select_stack_loop_trains():
    torch.manual_seed(0)
    model, x = Projected(view_select_stack), torch.randn(2, 16, 16)
    opt = fxfuse.optimize(model.train(), (x,), patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 1 and "(4 chunks of 4) → 1 op" in rep.rewrites[0].variant, str(rep)
    _check_against_float64(model, torch.randn_like(x), opt)


def test_split_einsum_loop_starting_from_none():
    model = Fn(split_einsum_state_from_none)
    inputs = tuple(torch.randn(2, 2, 18, 8) for _ in range(3))
    opt = fxfuse.optimize(model, inputs, patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 1 and "(5 chunks of 4, last 2) → 1 op" in rep.rewrites[0].variant, rep
    with torch.no_grad():
        got, want = opt(*inputs), model(*(x.double() for x in inputs))
    assert _rel(got, want) < 1e-5


class RetentionReturningState(nn.Module):
    """Chunkwise retention (per-head decay, ragged last chunk) that also returns the state it ends with, as a
    recurrent cache for the next segment: the fused op's output plus that state computed from k and v."""

    def __init__(self, dim: int = 16, heads: int = 2, chunk: int = 4) -> None:
        super().__init__()
        self.heads, self.chunk, self.qkv = heads, chunk, nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        gamma = (1 - torch.exp2(-2 - torch.arange(self.heads, dtype=torch.float32))).view(-1, 1, 1)
        state, outs = q.new_zeros(b, self.heads, q.shape[-1], v.shape[-1]), []
        for i in range(0, n, self.chunk):
            qi, ki, vi = q[:, :, i : i + self.chunk], k[:, :, i : i + self.chunk], v[:, :, i : i + self.chunk]
            c = qi.shape[2]
            r = torch.arange(c, dtype=torch.float32)
            dist = r[:, None] - r[None, :]
            decay = torch.where(dist >= 0, gamma ** dist.clamp(min=0), 0.0)
            outs.append(((qi @ ki.transpose(-1, -2)) * decay) @ vi + (qi @ state) * gamma ** (r + 1).view(c, 1))
            state = state * gamma**c + ki.transpose(-1, -2) @ (vi * gamma ** (c - 1 - r).view(c, 1))
        return torch.cat(outs, dim=2), state


def test_final_state_returned_is_a_second_output():
    torch.manual_seed(0)
    model, x = RetentionReturningState(), torch.randn(2, 14, 16)
    opt = fxfuse.optimize(model.train(), (x,), patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 1 and len(rep.rewrites) == 1, str(rep)
    assert "(4 chunks of 4, last 2) → 1 op, final state" in rep.rewrites[0].variant, rep.rewrites[0].variant
    _check_against_float64(model, torch.randn_like(x), opt)


# --- near misses: recognised as a chunk loop, left exactly as written ---------------------------------


def _loop(q, k, v, chunk=4, *, update=None, mask=None, reset=False, odd_chunk=None, einsum_chunk=None):
    b, h, n, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1])
    mask = torch.tril(torch.ones(chunk, chunk)) if mask is None else mask
    outs = []
    for j, i in enumerate(range(0, n, chunk)):
        if reset:
            state = q.new_zeros(b, h, d, v.shape[-1])
        qi, ki, vi = q[:, :, i : i + chunk], k[:, :, i : i + chunk], v[:, :, i : i + chunk]
        if j == einsum_chunk:  # the same product, spelled differently in one chunk
            scores = torch.einsum("bhnd,bhmd->bhnm", qi, ki)
        else:
            scores = qi @ ki.transpose(-1, -2)
        intra = (scores * mask) @ vi
        if j == odd_chunk:
            intra = intra * 0.5
        outs.append(intra + qi @ state)
        state = state + (ki.transpose(-1, -2) @ vi if update is None else update(qi, ki, vi))
    return torch.cat(outs, dim=2)


def wrong_decay_factor(q, k, v, chunk=4):
    # retention with the update's factor gamma^r instead of gamma^(c - 1 - r)
    b, h, n, d = q.shape
    gamma = (1 - torch.exp2(-2 - torch.arange(h, dtype=torch.float32))).view(h, 1, 1)
    state, outs = q.new_zeros(b, h, d, v.shape[-1]), []
    for i in range(0, n, chunk):
        qi, ki, vi = q[:, :, i : i + chunk], k[:, :, i : i + chunk], v[:, :, i : i + chunk]
        r = torch.arange(chunk, dtype=torch.float32)
        dist = r[:, None] - r[None, :]
        decay = torch.pow(gamma, dist.clamp(min=0)).masked_fill(dist < 0, 0.0)
        outs.append(((qi @ ki.transpose(-1, -2)) * decay) @ vi + (qi @ state) * gamma ** (r + 1).view(chunk, 1))
        state = state * gamma**chunk + ki.transpose(-1, -2) @ (vi * gamma ** r.view(chunk, 1))
    return torch.cat(outs, dim=2)


class StateReadMidLoop(nn.Module):
    """The state after chunk 1 returned with the outputs: only the state the loop ends with is computed."""

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        state, outs, mask, kept = q.new_zeros(b, h, d, v.shape[-1]), [], torch.tril(torch.ones(4, 4)), []
        for i in range(0, n, 4):
            qi, ki, vi = q[:, :, i : i + 4], k[:, :, i : i + 4], v[:, :, i : i + 4]
            outs.append(((qi @ ki.transpose(-1, -2)) * mask) @ vi + qi @ state)
            state = state + ki.transpose(-1, -2) @ vi
            kept.append(state)
        return torch.cat(outs, dim=2), kept[1]


NEAR_MISSES = {
    "state_update_uses_q": (Fn(lambda q, k, v: _loop(q, k, v, update=lambda qi, ki, vi: qi.transpose(-1, -2) @ vi)),
                            "not kᵀv of the chunk's keys and values"),
    "full_ones_intra_mask": (Fn(lambda q, k, v: _loop(q, k, v, mask=torch.ones(4, 4))), "not causal-structured"),
    "state_reset_each_chunk": (Fn(lambda q, k, v: _loop(q, k, v, reset=True)), "reset"),
    "one_chunk_scaled": (Fn(lambda q, k, v: _loop(q, k, v, odd_chunk=2)), "chunk 2"),
    "one_chunk_spelled_differently": (Fn(lambda q, k, v: _loop(q, k, v, einsum_chunk=2)), "bodies differ"),
    "wrong_decay_factor": (Fn(wrong_decay_factor), "decay factor ζ"),
    "state_read_mid_loop": (StateReadMidLoop(), "after the loop reads"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_left_alone(name):
    model, reason = NEAR_MISSES[name]
    inputs = tuple(torch.randn(2, 2, 16, 8) for _ in range(3))
    opt = fxfuse.optimize(model, inputs, patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 0, str(rep)
    (found,) = [r for r in rep.rewrites if r.pattern == "linear_attention"]
    assert found.variant.startswith("chunk loop (4 chunks)") and reason in found.reason, str(rep)
    with torch.no_grad():
        got, want = opt(*inputs), model(*inputs)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        assert torch.equal(g, w)


def test_onnx_export_of_a_rerolled_loop_with_its_final_state_runs_in_onnx_runtime(tmp_path):
    from fxfuse.onnx.check import run_onnx, tensor_leaves
    from fxfuse.passes.verify import compare

    model, inputs = RetentionReturningState().eval(), (torch.randn(2, 14, 16),)
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    assert result.report.count("linear_attention") == 1, str(result.report)
    with torch.no_grad():
        want = tensor_leaves(model(*inputs))
    check = compare(run_onnx(str(tmp_path / "m.onnx"), inputs), want, 1e-5)
    assert check.ok, check.reason


def test_concatenated_independent_branches_are_not_a_chunk_loop():
    # three causal linear attentions over different tensors, concatenated: each one fused on its own
    def branches(q, k, v):
        mask = torch.tril(torch.ones(16, 16))
        return torch.cat([((a @ b.transpose(-1, -2)) * mask) @ c for a, b, c in ((q, k, v), (k, v, q), (v, q, k))], 2)

    model, inputs = Fn(branches), tuple(torch.randn(2, 2, 16, 8) for _ in range(3))
    opt = fxfuse.optimize(model, inputs, patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 3 and not any(r.variant.startswith("chunk loop") for r in rep.rewrites)
