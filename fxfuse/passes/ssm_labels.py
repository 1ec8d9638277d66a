"""Axis labels: which tensor axis is batch, channel, time or state, followed through the ops of a scan.

A label tuple names each dim of a node's value ("b", "d", "l", "n", a provisional name, or None for a size-1
dim that broadcasts). `factors` writes a tensor as a product of leaves, each with its own labels: the
per-step decay exp(Δ_t ⊗ A) becomes leaves Δ (b, d, l) and A (d, n) whether the graph multiplies
[B, D, L, N] tensors before the loop and selects step t inside it, or multiplies per-step slices inside it.
Leaves are where the walk stops (softplus, a parameter, a projection); the time axis "l" appears where a
select (or a one-wide slice) takes step t of a loop-invariant tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import Node

aten = torch.ops.aten
Labels = tuple

PASS_THROUGH = (aten.alias.default, aten.clone.default, aten.contiguous.default, aten._to_copy.default,
                 aten.to.dtype, aten.lift_fresh_copy.default)  # fmt: skip
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class NotAScan(Exception):
    """The loop is not a selective scan this pass can fuse; the message says why."""


def shape(node: Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise NotAScan(f"{node.name} has no tensor metadata")
    return tuple(int(s) for s in val.shape)


@dataclass
class Product:
    """leaf_1 * leaf_2 * ... * const, each leaf with the labels of its own dims."""

    leaves: list[tuple[Node, Labels]] = field(default_factory=list)
    const: float = 1.0


# time_index(node) -> (tensor, dim) when `node` takes step t of a loop-invariant tensor along dim, else None
TimeIndex = Callable[[Node], "tuple[Node, int] | None"]


def _dim(d: int, rank: int) -> int:
    return d % rank if rank else 0


def _broadcast_operand(out: Labels, operand: Node) -> Labels:
    """Labels of an operand of a broadcasting op whose result has labels `out` (right-aligned)."""
    sizes = shape(operand)
    aligned = out[len(out) - len(sizes) :]
    return tuple(None if s == 1 else lab for s, lab in zip(sizes, aligned))


def _view_labels(src: tuple, dst: tuple, dst_labels: Labels) -> Labels:
    """Labels of a view's input when the view only inserts or removes size-1 dims."""
    if [s for s in src if s != 1] != [s for s in dst if s != 1]:
        raise NotAScan(f"a reshape {list(src)} -> {list(dst)} mixes axes")
    kept = iter([lab for s, lab in zip(dst, dst_labels) if s != 1])
    return tuple(None if s == 1 else next(kept) for s in src)


def _einsum_letters(node: Node) -> tuple[list[str], str]:
    equation = node.args[0].replace(" ", "")
    if "..." in equation or "->" not in equation:
        raise NotAScan(f"einsum '{equation}' without explicit output or with '...'")
    inputs, output = equation.split("->")
    return inputs.split(","), output


def input_labels(node: Node, out: Labels, time_index: TimeIndex) -> list[tuple[Node, Labels]] | None:
    """For an op that only moves axes (views, permutes, casts, time selects): its tensor input and that
    input's labels, given the labels of the op's result. None for ops that compute."""
    t = node.target
    if node.op != "call_function":
        return None
    found = time_index(node)
    if found is not None:
        src, dim = found
        labels = list(out)
        if t is aten.select.int:
            labels.insert(dim, "l")
        else:
            labels[dim] = "l"
        return [(src, tuple(labels))]
    if t in PASS_THROUGH:
        return [(node.args[0], out)]
    x = node.args[0] if node.args else None
    if not isinstance(x, Node):
        return None
    if t is aten.unsqueeze.default:
        d = _dim(node.args[1], len(out))
        return [(x, out[:d] + out[d + 1 :])]
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default) or t in _VIEWS:
        return [(x, _view_labels(shape(x), shape(node), out))]
    if t is aten.expand.default:
        return [(x, _broadcast_operand(out, x))]
    if t is aten.permute.default:
        labels = [None] * len(out)
        for j, p in enumerate(node.args[1]):
            labels[_dim(p, len(out))] = out[j]
        return [(x, tuple(labels))]
    if t is aten.transpose.int:
        d0, d1 = _dim(node.args[1], len(out)), _dim(node.args[2], len(out))
        labels = list(out)
        labels[d0], labels[d1] = out[d1], out[d0]
        return [(x, tuple(labels))]
    if t is aten.select.int and shape(x)[_dim(node.args[1], len(out) + 1)] == 1:
        d = _dim(node.args[1], len(out) + 1)
        return [(x, out[:d] + (None,) + out[d:])]
    return None


def output_labels(node: Node, inp: Labels) -> Labels | None:
    """The inverse of `input_labels` for the shape-only ops a readout passes through (forward direction)."""
    t, out_shape = node.target, shape(node)
    if t in PASS_THROUGH:
        return inp
    if t is aten.unsqueeze.default:
        d = _dim(node.args[1], len(out_shape))
        return inp[:d] + (None,) + inp[d:]
    if t is aten.select.int:
        d = _dim(node.args[1], len(inp))
        if shape(node.args[0])[d] != 1 or inp[d] is not None:
            return None
        return inp[:d] + inp[d + 1 :]
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default) or t in _VIEWS:
        return _view_labels(out_shape, shape(node.args[0]), inp)
    if t is aten.permute.default:
        return tuple(inp[_dim(p, len(inp))] for p in node.args[1])
    if t is aten.transpose.int:
        d0, d1 = _dim(node.args[1], len(inp)), _dim(node.args[2], len(inp))
        labels = list(inp)
        labels[d0], labels[d1] = inp[d1], inp[d0]
        return tuple(labels)
    return None


def factors(node: Node, labels: Labels, time_index: TimeIndex, stop: Callable[[Node], bool]) -> Product:
    """`node` (with `labels`) as a product of leaves; `stop(n)` marks nodes that must not be looked into."""
    product = Product()
    todo = [(node, labels)]
    while todo:
        n, labs = todo.pop()
        if len(labs) != len(shape(n)):
            raise NotAScan(f"lost track of the axes at {n.name}")
        moved = None if stop(n) else input_labels(n, labs, time_index)
        if moved is not None:
            todo.extend(moved)
            continue
        t = n.target if n.op == "call_function" and not stop(n) else None
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            x, y = n.args[0], n.args[1]
            if not isinstance(x, Node):
                raise NotAScan(f"{n.name} multiplies a number by a tensor in an unexpected order")
            todo.append((x, _broadcast_operand(labs, x)))
            if isinstance(y, Node):
                if t is aten.div.Tensor:
                    raise NotAScan(f"{n.name} divides by a tensor")
                todo.append((y, _broadcast_operand(labs, y)))
            else:
                product.const *= float(y) if t in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / float(y)
            continue
        if t is aten.einsum.default:
            operands, output = _einsum_letters(n)
            letter = dict(zip(output, labs))
            for op_letters, operand in zip(operands, n.args[1]):
                if any(c not in letter for c in op_letters) or len(set(op_letters)) != len(op_letters):
                    raise NotAScan(f"einsum '{n.args[0]}' sums over an axis inside a per-step factor")
                todo.append((operand, tuple(letter[c] for c in op_letters)))
            continue
        if len([lab for lab in labs if lab is not None]) != len(set(lab for lab in labs if lab is not None)):
            raise NotAScan(f"{n.name} repeats an axis")
        product.leaves.append((n, labs))
    return product


def strip_moves(node: Node, labels: Labels, time_index: TimeIndex) -> tuple[Node, Labels]:
    """Follow shape-only ops (and the time select) from `node` back to the op that computes it."""
    while True:
        moved = input_labels(node, labels, time_index)
        if moved is None:
            return node, labels
        node, labels = moved[0]
