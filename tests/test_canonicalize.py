"""Canonicalize: every rule fires on its spelling and changes no bit (NaN, inf, -0.0 included); the near
misses that would change numbers or aliasing are left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxfuse.passes.canonicalize import canonicalize
from fxfuse.passes.capture import aten_graph

aten = torch.ops.aten


def _nasty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.float64) * 1e3
    flat = x.view(-1)
    flat[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=torch.float64)
    return x.to(dtype)


def _targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _check(fn, inputs: tuple, gone: tuple, kept: tuple = ()) -> None:
    gm = aten_graph(fn, inputs)
    want = fn(*inputs)
    result = canonicalize(gm)
    got = result.graph_module(*inputs)
    got = got[0] if isinstance(got, (list, tuple)) and not isinstance(want, (list, tuple)) else got
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    left = _targets(result.graph_module)
    assert not set(gone) & left, f"{set(gone) & left} should have been folded"
    assert set(kept) <= left, f"{set(kept) - left} should have been kept"
    if gone:
        assert result.modified


POSITIVE = {
    "eval_dropout": (lambda x: F.dropout(x, 0.1, training=False) + 1, (aten.dropout.default,)),
    "zero_dropout_training": (lambda x: F.dropout(x, 0.0, training=True) + 1, (aten.dropout.default,)),
    "same_dtype_to": (lambda x: x.to(torch.float32) + 1, (aten.to.dtype, aten._to_copy.default)),
    "f16_f32_f16_round_trip": (
        lambda x: x.half().float().half() + 1,
        (aten.to.dtype, aten._to_copy.default),
    ),
    "clone": (lambda x: x.clone() * 2, (aten.clone.default,)),
    "view_same_shape": (lambda x: x.view(x.shape) * 2, (aten.view.default,)),
    "reshape_same_shape": (lambda x: x.reshape(4, 6) * 2, (aten.reshape.default, aten.view.default)),
    "expand_same_shape": (lambda x: x.expand(4, 6) * 2, (aten.expand.default,)),
    "type_as_same_dtype": (lambda x: x.type_as(x) * 2, (aten.type_as.default,)),
    "t_alias": (lambda x: x.t() @ x, (aten.t.default,)),
    "transpose_twice": (lambda x: x.transpose(0, 1).transpose(1, 0) * 2, (aten.transpose.int,)),
    "identity_permute": (lambda x: x.permute(0, 1) * 2, (aten.permute.default,)),
    "full_slice": (lambda x: aten.slice.Tensor(x, 1, 0, 6) * 2, (aten.slice.Tensor,)),
    "alias": (lambda x: x[:, 0:6] * 2, (aten.alias.default,)),
    "unsqueeze_squeeze": (lambda x: x[:, :, None].squeeze(2) * 2, (aten.squeeze.dim, aten.unsqueeze.default)),
    "times_one": (lambda x: x * 1.0 + 1, ()),
    "int_plus_zero": (lambda x: (torch.arange(6) + 0) * x, ()),
}


@pytest.mark.parametrize("name", list(POSITIVE))
def test_rule_folds_exactly(name: str) -> None:
    fn, gone = POSITIVE[name]
    x = _nasty(4, 6, dtype=torch.float16 if "f16" in name else torch.float32)
    _check(fn, (x,), gone)


def test_type_as_becomes_a_cast() -> None:
    fn = lambda x, y: x.float().softmax(-1).type_as(y) + y
    x = _nasty(3, 5, dtype=torch.float16)
    _check(fn, (x, x), (aten.type_as.default,), (aten.to.dtype,))


def _scaled_in_place(x):
    s = x @ x.t()
    s /= 8.0
    s.masked_fill_(s > 100, -1.0)
    return s.softmax(-1) + s


def test_in_place_on_fresh_intermediate_becomes_functional() -> None:
    _check(_scaled_in_place, (_nasty(4, 6),), (aten.div_.Scalar, aten.div_.Tensor, aten.masked_fill_.Scalar),
           (aten.div.Tensor,))  # fmt: skip


def _viewed_then_written(x):
    s = x * 2
    row = s[0]  # a view taken before the write sees it
    s.mul_(3.0)
    return row + s


def _input_written(x):
    x.div_(2.0)
    return x + 1


def _promoted(x, y):
    s = x * 2
    s.add_(y)  # float16 += float32 stays float16; s + y would be float32
    return s


@pytest.mark.parametrize("fn", [_viewed_then_written, _input_written, _promoted], ids=lambda f: f.__name__[1:])
def test_in_place_that_aliasing_or_promotion_observes_is_kept(fn) -> None:
    n_args = fn.__code__.co_argcount
    inputs = (_nasty(4, 6, dtype=torch.float16), _nasty(4, 6))[:n_args]
    gm = aten_graph(fn, tuple(t.clone() for t in inputs))
    want = fn(*(t.clone() for t in inputs))
    result = canonicalize(gm).graph_module
    got = result(*(t.clone() for t in inputs))
    got = got[0] if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert any(str(n.target).endswith("_.Scalar") or str(n.target).endswith("_.Tensor") for n in result.graph.nodes)


def test_times_one_is_gone() -> None:
    gm = canonicalize(aten_graph(lambda x: x * 1.0 + 1, (_nasty(3, 3),))).graph_module
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten.add.Tensor]


def test_view_of_view_becomes_one_view() -> None:
    gm = canonicalize(aten_graph(lambda x: x.view(2, 12).view(3, 8) * 2, (_nasty(4, 6),))).graph_module
    assert sum(n.target is aten.view.default for n in gm.graph.nodes) == 1


def test_max_pool_indices_unused_becomes_max_pool() -> None:
    def fn(x):
        out, _idx = F.max_pool2d(x, 3, 1, 1, return_indices=True)
        return out + 1

    x = _nasty(1, 2, 7, 7)
    _check(fn, (x,), (aten.max_pool2d_with_indices.default,), (aten.max_pool2d.default,))


def test_unused_argmax_is_dropped() -> None:
    # not turned into amax: max's gradient goes to one index, amax's is split among ties
    gm = canonicalize(aten_graph(lambda x: x.max(-1, keepdim=True).values * 2, (_nasty(4, 6),))).graph_module
    getitems = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem"]
    assert [n.args[1] for n in getitems] == [0] and aten.max.dim in _targets(gm)


def test_dead_code_is_dropped_but_not_random_ops() -> None:
    def fn(x):
        _unused = (x * 3).sum()  # pure and unused: dropped
        F.dropout(x, 0.5, training=True)  # unused, but it advances the random stream: kept
        return x + 1

    gm = canonicalize(aten_graph(fn, (_nasty(3, 3),))).graph_module
    assert _targets(gm) == {aten.dropout.default, aten.add.Tensor}


def _clone_viewed_then_written(x):
    y = x.clone()
    first = y[0]
    y.add_(1)
    return first * 2


NEGATIVE = {
    # f32 -> f16 -> f32 rounds: not the identity
    "f32_f16_f32_round_trip": (lambda x: x.half().float() + 1, (aten.to.dtype,)),
    # the indices are used: the pool must keep computing them
    "max_pool_indices_used": (
        lambda x: sum(t.float().sum() for t in F.max_pool2d(x[None], 3, 1, 1, return_indices=True)),
        (aten.max_pool2d_with_indices.default,),
    ),
    # the clone is written in place (through a view taken before, so the write stays): dropping the
    # clone would write the input
    "clone_mutated": (_clone_viewed_then_written, (aten.clone.default, aten.add_.Tensor)),
    # a transposed tensor's contiguous() copies: its strides matter to a later view
    "contiguous_of_transposed": (lambda x: x.t().contiguous().view(-1), (aten.contiguous.default,)),
    # dropout in training with p > 0 is not the identity
    "training_dropout": (lambda x: F.dropout(x, 0.5, training=True), (aten.dropout.default,)),
    # float x + 0 turns -0.0 into +0.0
    "float_plus_zero": (lambda x: x + 0.0, (aten.add.Tensor,)),
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_near_miss_is_kept(name: str) -> None:
    fn, kept = NEGATIVE[name]
    x = _nasty(4, 6)
    gm = canonicalize(aten_graph(fn, (x,))).graph_module
    assert set(kept) <= _targets(gm)
    if name != "training_dropout":
        torch.testing.assert_close(gm(x.clone())[0] if isinstance(gm(x.clone()), (list, tuple)) else gm(x.clone()),
                                   fn(x.clone()), rtol=0, atol=0, equal_nan=True)  # fmt: skip


def test_returned_clone_is_kept() -> None:
    gm = canonicalize(aten_graph(lambda x: (x.clone(), x * 2), (_nasty(3, 3),))).graph_module
    assert aten.clone.default in _targets(gm)


def _five_d_sandwich(x, a, b):
    # Segment Anything's decomposed relative positions: terms added while [B, N, M] is viewed [B, qh, qw, kh, kw]
    s = x @ x.transpose(1, 2)
    return (s.view(2, 2, 3, 2, 3) + a[:, :, :, :, None] + b[:, :, :, None, :]).view(2, 6, 6).softmax(-1)


def test_terms_added_in_a_split_view_move_onto_the_unsplit_tensor() -> None:
    inputs = (_nasty(2, 6, 4), _nasty(2, 2, 3, 2), _nasty(2, 2, 3, 3))
    gm = canonicalize(aten_graph(_five_d_sandwich, inputs)).graph_module
    torch.testing.assert_close(gm(*inputs), _five_d_sandwich(*inputs), rtol=0, atol=0, equal_nan=True)
    adds = [n for n in gm.graph.nodes if n.target is aten.add.Tensor]
    assert [tuple(n.meta["val"].shape) for n in adds] == [(2, 6, 6)] * 2  # added to the [B, N, M] scores
    softmax = next(n for n in gm.graph.nodes if n.target is aten.softmax.int)
    assert softmax.args[0] is adds[-1]


@pytest.mark.parametrize(
    "fn",
    [
        # no view back to the original shape: nothing to fold, the 5-D sum stays
        lambda x, a: (x.view(2, 2, 3, 2, 3) + a).sum(-1),
        # a 0-d float64 term promotes like a number; reshaped it would turn the result into float64
        lambda x, a: (x.view(2, 2, 3, 2, 3) + a.sum().double()).view(2, 6, 6),
    ],
    ids=["no_view_back", "zero_dim_term"],
)
def test_split_view_near_miss_is_kept(fn) -> None:
    inputs = (_nasty(2, 6, 6), _nasty(2, 2, 3, 2, 1))
    gm = canonicalize(aten_graph(fn, inputs)).graph_module
    adds = [n for n in gm.graph.nodes if n.target is aten.add.Tensor]
    assert [n.meta["val"].dim() for n in adds] == [5]
    torch.testing.assert_close(gm(*inputs), fn(*inputs), rtol=0, atol=0, equal_nan=True)


# --- writes the schema alias analysis must see: through list arguments, out=, and list-returning views ---
_L = 6


def _foreach_after_clone(x, a):
    h, ys = torch.zeros(2, 4), torch.empty(2, _L, 4)
    for t in range(_L):
        h = h * a + x[:, t]
        g = h.clone()  # dropping the clone would make the foreach write h twice
        ys[:, t] = g
        torch._foreach_mul_([g, h], 2.0)
    return ys


def _out_keyword(x, a):
    h, ys = torch.zeros(2, 4), torch.empty(2, _L, 4)
    for t in range(_L):
        h = h * a + x[:, t]
        ys[:, t] = h
        torch.mul(h, 2.0, out=h)
    return ys


def _unbind_piece(x, a):
    h, ys = torch.zeros(2, 2, 4), torch.empty(2, _L, 4)
    for t in range(_L):
        h.mul_(a).add_(x[:, t].unsqueeze(1))
        y0, _ = h.unbind(1)  # a view of h: its value at the write is gone by the end of the loop
        ys[:, t] = y0
    return ys


def _chunk_piece_cat(x, a):
    h, ys = torch.zeros(2, 8), torch.empty(2, 0, 4)
    for t in range(_L):
        h.mul_(a.repeat(2)).add_(x[:, t].repeat(1, 2))
        y0, _ = h.chunk(2, 1)
        ys = torch.cat([ys, y0.unsqueeze(1)], 1)
    return ys


@pytest.mark.parametrize("fn", [_foreach_after_clone, _out_keyword, _unbind_piece, _chunk_piece_cat],
                         ids=lambda f: f.__name__[1:])  # fmt: skip
def test_writes_through_lists_keywords_and_pieces_keep_every_number(fn) -> None:
    x, a = torch.randn(2, _L, 4), torch.rand(4) + 0.5
    gm = aten_graph(fn, (x, a), copy_loops=False)
    want = fn(x.clone(), a)
    got = canonicalize(gm).graph_module(x.clone(), a)
    torch.testing.assert_close(got[0] if isinstance(got, (list, tuple)) else got, want, rtol=0, atol=0)
