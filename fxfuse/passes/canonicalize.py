"""Canonicalize: fold spellings that compute the very same numbers, before any matcher runs.

This pass runs on the whole graph, so every rule is exact: same values, same NaNs, same dtype. What
is only equal up to rounding (where a scale sits, einsum vs matmul, masked_fill vs adding -inf) is left
to the matchers' analysis, never rewritten here. Rules are data: `RULES` lists (op, rule) pairs; a rule
gets the node and returns the node that replaces it (an existing one, or one it inserted) or None.

A rule that replaces a *copy* (clone, _to_copy, x * 1) by its source changes aliasing, so it applies
only when neither tensor is written in place and the copy is not returned to the caller. An in-place
op on an intermediate that nothing else aliases becomes its functional form.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import has_free_unbacked_symbols
from torch.fx.passes.infra.pass_base import PassResult

aten = torch.ops.aten
# widening casts that every value of the narrow dtype survives exactly
EXACT_WIDENING = {
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
    (torch.bfloat16, torch.float64), (torch.float32, torch.float64),
}  # fmt: skip
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
_PURE_MODULES = ("_operator", "operator", "math", "builtins", "torch")  # SymInt arithmetic, sym_* helpers


def opaque_call(node: Node) -> bool:
    """A call whose writes no schema describes (a higher-order op, a Python callable): it may write any
    tensor it is given. Not getitem, nor the SymInt arithmetic of dynamic shapes."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    has_schema = getattr(node.target, "_schema", None) is not None
    return not has_schema and getattr(node.target, "__module__", None) not in _PURE_MODULES


def _val(x: object) -> torch.Tensor | None:
    """The node's FakeTensor, or None (also when a size is data-dependent: no rule can compare it)."""
    v = x.meta.get("val") if isinstance(x, Node) else None
    if not isinstance(v, torch.Tensor) or has_free_unbacked_symbols((*v.shape, *v.stride())):
        return None
    return v


def _arg(node: Node, name: str, default: object = None) -> object:
    """An argument by its schema name, positional or keyword."""
    for i, spec in enumerate(node.target._schema.arguments):
        if spec.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
    return default


def _same_layout(a: Node, b: Node) -> bool:
    va, vb = _val(a), _val(b)
    return (
        va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype
        and va.device == vb.device and va.stride() == vb.stride()
    )  # fmt: skip


class _Aliasing:
    """Which tensors are written in place (through any view), and which nodes the graph returns.

    Conservative where a schema does not say: a write through a list argument (`_foreach_mul_`) or a
    keyword (`out=`) counts, a piece of `unbind` / `split` / `chunk` is a view of its input, and every
    tensor handed to a callable without a schema (a higher-order op) counts as written."""

    def __init__(self, gm: GraphModule) -> None:
        self.written: set[Node] = set()
        self.returned: set[Node] = set()
        for node in gm.graph.nodes:
            if node.op == "output":
                self.returned.update(node.all_input_nodes)
            if opaque_call(node):
                self.written.update(self.root(x) for x in node.all_input_nodes)
            schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
            for i, spec in enumerate(schema.arguments if schema else ()):
                if spec.alias_info is None or not spec.alias_info.is_write:
                    continue
                arg = node.args[i] if i < len(node.args) else node.kwargs.get(spec.name)
                for x in arg if isinstance(arg, (list, tuple)) else (arg,):
                    if isinstance(x, Node):
                        self.written.add(self.root(x))

    @staticmethod
    def root(node: Node) -> Node:
        """The tensor whose storage `node` shares: followed back through views, pieces of a view that
        returns a list, and in-place ops (which return what they wrote)."""
        while node.op == "call_function":
            if node.target is operator.getitem and isinstance(node.args[0], Node):
                source = node.args[0]
                returns = getattr(source.target, "_schema", None)
                if returns is None or not returns.returns or returns.returns[0].alias_info is None:
                    break
                node = source
                continue
            if not isinstance(node.target, torch._ops.OpOverload):
                break
            schema = node.target._schema
            ret = schema.returns[0].alias_info if len(schema.returns) == 1 else None
            if ret is None or not node.args or not isinstance(node.args[0], Node):
                break
            node = node.args[0]
        return node

    def may_drop_copy(self, copy: Node, source: Node) -> bool:
        return copy not in self.returned and not {self.root(copy), self.root(source)} & self.written


def _identity_view(n: Node, al: _Aliasing) -> Node | None:
    # view/reshape/expand to the shape it already has -> x (these return x's alias with x's strides)
    x = n.args[0]
    return x if _same_layout(n, x) else None


def _view_of_view(n: Node, al: _Aliasing) -> Node | None:
    # view(view(x, s1), s2) -> view(x, s2) when x is contiguous (then every view of it is valid)
    inner = n.args[0]
    if n.target is not aten.view.default or inner.target is not aten.view.default:
        return None
    x = inner.args[0]
    if _val(x) is None or not _val(x).is_contiguous():
        return None
    return _insert(n, aten.view.default, (x, n.args[1]))


def _dropout_identity(n: Node, al: _Aliasing) -> Node | None:
    # dropout(x, p, train=False) and dropout(x, 0, ...) -> x (ATen returns x itself)
    p, train = _arg(n, "p"), _arg(n, "train", True)
    return n.args[0] if p == 0 or not train else None


def _cast_identity(n: Node, al: _Aliasing) -> Node | None:
    # x.to(x.dtype) -> x; _to_copy to the same dtype/device/layout -> x when the copy is not needed
    x = n.args[0]
    if not _same_layout(n, x) or _arg(n, "memory_format") not in (None, torch.preserve_format):
        return None
    if n.target is aten._to_copy.default or _arg(n, "copy", False):
        return x if al.may_drop_copy(n, x) else None
    return x


def _cast_round_trip(n: Node, al: _Aliasing) -> Node | None:
    # x.to(wider).to(x.dtype) -> x when widening is exact (f16 -> f32 -> f16, not f32 -> f16 -> f32)
    mid = n.args[0]
    if not isinstance(mid, Node) or mid.target not in _CASTS or _val(mid) is None:
        return None
    x = mid.args[0]
    if not isinstance(x, Node) or not _same_layout(n, x) or (_val(x).dtype, _val(mid).dtype) not in EXACT_WIDENING:
        return None
    return x if al.may_drop_copy(n, x) else None


def _clone_identity(n: Node, al: _Aliasing) -> Node | None:
    # x.clone() -> x when nothing writes either tensor and the clone is not returned
    x = n.args[0]
    fmt = n.kwargs.get("memory_format")
    ok = fmt in (None, torch.preserve_format) and _same_layout(n, x) and al.may_drop_copy(n, x)
    return x if ok else None


def _type_as_to_cast(n: Node, al: _Aliasing) -> Node | None:
    # x.type_as(y) -> x.to(y.dtype) when both live on one device (type_as is .to(y's dtype and device))
    x, like = n.args[0], n.args[1]
    vx, vl = _val(x), _val(like)
    if vx is None or vl is None or vx.device != vl.device:
        return None
    return _insert(n, aten.to.dtype, (x, vl.dtype))


_INPLACE = {
    aten.div_.Tensor: aten.div.Tensor, aten.div_.Scalar: aten.div.Scalar, aten.mul_.Tensor: aten.mul.Tensor,
    aten.mul_.Scalar: aten.mul.Scalar, aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor,
    aten.masked_fill_.Scalar: aten.masked_fill.Scalar, aten.masked_fill_.Tensor: aten.masked_fill.Tensor,
}  # fmt: skip


def _may_alias(node: Node) -> bool:
    """Whether `node`'s result may share storage with an input (a view op, an in-place op, not ATen)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return True
    schema = node.target._schema
    return schema.is_mutable or any(r.alias_info is not None for r in schema.returns)


def _functional_inplace(n: Node, al: _Aliasing) -> Node | None:
    # s /= c on a fresh intermediate (HF Falcon scales its scores so) -> s2 = s / c, later readers of s
    # read s2. Only when s owns its storage (made by a non-view op), no view of it was taken before the
    # write (it would see the write) and nothing is promoted (the in-place op keeps s's dtype).
    x = n.args[0]
    if not isinstance(x, Node) or x.op != "call_function" or not isinstance(x.target, torch._ops.OpOverload):
        return None
    schema = x.target._schema
    if schema.is_mutable or len(schema.returns) != 1 or schema.returns[0].alias_info is not None:
        return None
    operands = n.args[2:] if n.target in (aten.masked_fill_.Scalar, aten.masked_fill_.Tensor) else n.args[1:]
    tensors = [a for a in (*operands, *n.kwargs.values()) if isinstance(a, Node)]
    if _val(x) is None or _val(n) is None or any(_val(t) is None or _val(t).dtype != _val(x).dtype for t in tensors):
        return None
    # fx nodes compare by their position in the graph
    if any(u < n and _may_alias(u) for u in x.users):
        return None  # an earlier view of s would see the write; an earlier plain read has its value already
    new = _insert(n, _INPLACE[n.target], n.args, n.kwargs)
    for u in [u for u in x.users if u > n]:
        u.replace_input_with(x, new)
    return new


def _t_to_transpose(n: Node, al: _Aliasing) -> Node | None:
    # x.t() -> x.transpose(0, 1) (x itself for 1-D): one spelling of a transpose for the matchers
    x = n.args[0]
    if _val(x) is None:
        return None
    return x if _val(x).dim() < 2 else _insert(n, aten.transpose.int, (x, 0, 1))


def _transpose_pair(n: Node, al: _Aliasing) -> Node | None:
    # x.transpose(i, j).transpose(i, j) -> x; x.permute(identity) -> x
    x = n.args[0]
    if n.target is aten.permute.default:
        rank = _val(x).dim() if _val(x) is not None else -1
        return x if [d % rank for d in n.args[1]] == list(range(rank)) else None
    if x.op != "call_function" or x.target is not aten.transpose.int or _val(x.args[0]) is None:
        return None
    rank = _val(x.args[0]).dim()
    pair = lambda t: sorted(d % rank for d in t.args[1:3])
    return x.args[0] if pair(n) == pair(x) else None


def _full_slice(n: Node, al: _Aliasing) -> Node | None:
    # x[:, 0:size] (step 1), alias(x), x[:, :, None].squeeze(2) -> x: aliases with x's shape and strides
    x = n.args[0]
    return x if _arg(n, "step", 1) == 1 and _same_layout(n, x) else None


def _squeeze_unsqueeze(n: Node, al: _Aliasing) -> Node | None:
    # x.unsqueeze(d).squeeze(d) -> x
    inner, dims = n.args[0], n.args[1]
    dims = [dims] if isinstance(dims, int) else list(dims)
    if inner.target is not aten.unsqueeze.default or _val(inner) is None or len(dims) != 1:
        return None
    rank = _val(inner).dim()
    return inner.args[0] if dims[0] % rank == inner.args[1] % rank else None


def _multiply_by_one(n: Node, al: _Aliasing) -> Node | None:
    # x * 1, x / 1 (float x) and x + 0, x - 0 (integer x) -> x: exact, NaN and -0.0 included
    x, c = n.args[0], n.args[1]
    if not isinstance(x, Node) or isinstance(c, Node) or isinstance(c, bool) or not _same_layout(n, x):
        return None
    if n.target in (aten.add.Tensor, aten.sub.Tensor):
        ok = c == 0 and not _val(x).is_floating_point() and n.kwargs.get("alpha", 1) == 1
    else:
        ok = c == 1 and _val(x).is_floating_point()
    return x if ok and al.may_drop_copy(n, x) else None


def _pool_without_indices(n: Node, al: _Aliasing) -> Node | None:
    # max_pool2d_with_indices(...)[0] with the indices unused -> max_pool2d(...)
    users = list(n.users)
    if any(u.target.__name__ != "getitem" or (u.args[1] == 1 and u.users) for u in users):
        return None
    for u in users:
        if u.args[1] == 0:
            u.replace_all_uses_with(_insert(u, aten.max_pool2d.default, n.args, n.kwargs))
        n.graph.erase_node(u)
    return None


_ARITH = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _unsplit_view(n: Node, al: _Aliasing) -> Node | None:
    # view(view(s, S) + b, shape(s)) -> view(s + reshape(expand(b, S), shape(s)), S), the outer pair then
    # folds away: a term added while s is viewed in another shape (Segment Anything's decomposed relative
    # positions on [B, qh, qw, kh, kw] scores) meets the same element of s either way
    if not any(isinstance(a, Node) and a.target in _RESHAPES for a in n.args[:2]) or n.kwargs.get("alpha", 1) != 1:
        return None
    pos = next(i for i, a in enumerate(n.args[:2]) if isinstance(a, Node) and a.target in _RESHAPES)
    view, other = n.args[pos], n.args[1 - pos]
    x = view.args[0]
    vx, vv, vn = _val(x), _val(view), _val(n)
    if len(view.users) != 1 or vx is None or vv is None or vn is None or vn.shape != vv.shape:
        return None
    if vx.dim() < 2 or vv.dim() < 2 or vx.shape[-2:] == vv.shape[-2:]:
        return None  # a view that only regroups leading dims: the matchers read terms there, broadcast
    if isinstance(other, Node) and (_val(other) is None or _val(other).dim() == 0):
        return None  # a 0-d tensor promotes like a number: reshaping it would change the result's dtype
    if not _views_back(n, tuple(vx.shape)):
        return None
    if isinstance(other, Node):
        grown = _insert_valued(n, aten.expand.default, (other, list(vv.shape)))
        other = _insert_valued(n, aten.reshape.default, (grown, list(vx.shape)))
    args = list(n.args)
    args[pos], args[1 - pos] = x, other
    inner = _insert_valued(n, n.target, tuple(args))
    return _insert_valued(n, aten.view.default, (inner, list(vv.shape)))


def _views_back(n: Node, shape: tuple) -> bool:
    """Whether `n`'s single-user chain of arithmetic ends in a view to `shape`."""
    while len(n.users) == 1:
        n = next(iter(n.users))
        if n.target in _RESHAPES:
            return _val(n) is not None and tuple(_val(n).shape) == shape
        if n.target not in _ARITH:
            return False
    return False


_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device)

RULES = (
    (_VIEWS, _identity_view),
    ((aten.view.default,), _view_of_view),
    ((aten.dropout.default,), _dropout_identity),
    (_CASTS, _cast_identity),
    (_CASTS, _cast_round_trip),
    ((aten.clone.default,), _clone_identity),
    (tuple(_INPLACE), _functional_inplace),
    ((aten.type_as.default,), _type_as_to_cast),
    ((aten.t.default,), _t_to_transpose),
    ((aten.transpose.int, aten.permute.default), _transpose_pair),
    ((aten.slice.Tensor, aten.alias.default, aten.squeeze.dim, aten.squeeze.dims), _full_slice),
    ((aten.squeeze.dim, aten.squeeze.dims), _squeeze_unsqueeze),
    ((aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor), _multiply_by_one),
    ((aten.max_pool2d_with_indices.default,), _pool_without_indices),
    (_ARITH, _unsplit_view),
)


_INDEXED = (aten.max_pool2d_with_indices.default,)  # rules that rewire their own getitems


def _insert(before: Node, target, args: tuple, kwargs: dict | None = None) -> Node:
    """A new node just before `before`, with its value and provenance."""
    graph = before.graph
    with graph.inserting_before(before):
        new = graph.call_function(target, tuple(args), dict(kwargs or {}))
    new.meta = dict(before.meta)
    return new


def _insert_valued(before: Node, target, args: tuple) -> Node:
    """`_insert`, its FakeTensor value computed from the inputs' (the shape may differ from `before`'s)."""
    new = _insert(before, target, args)
    fake = [_val(a) if isinstance(a, Node) else a for a in args]
    new.meta["val"] = target(*fake)
    return new


def canonicalize(gm: GraphModule) -> PassResult:
    """Apply `RULES` until nothing changes; nodes left without users by a rule are erased. Loop outputs
    written into a preallocated tensor slot by slot, or grown by `cat`, first become the one stack / cat
    they equal."""
    from fxfuse.passes.ssm_prealloc import flatten_growing_cats, stack_step_writes

    modified = stack_step_writes(gm) | flatten_growing_cats(gm)
    for _ in range(8):
        changed, al = False, _Aliasing(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or getattr(node, "_erased", False):
                continue
            for targets, rule in RULES:
                if node.target not in targets or not node.args:
                    continue
                new = rule(node, al)
                if new is not None and new is not node:
                    node.replace_all_uses_with(new)
                if not node.users and (new is not None or node.target in _INDEXED):
                    _erase(node)
                    changed = True
                    break
        changed |= _drop_dead(gm)
        modified |= changed
        if not changed:
            break
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def _erase(node: Node) -> None:
    """Erase `node`, then the pure inputs it leaves without users (the inner cast of a round trip)."""
    inputs = node.all_input_nodes
    node.graph.erase_node(node)
    for x in inputs:
        if x.op == "call_function" and not x.users and not x.is_impure():
            _erase(x)


def _drop_dead(gm: GraphModule) -> bool:
    """Erase unused pure nodes (nn.MultiheadAttention's averaged weights that the caller drops). Random
    ops stay: dropping one would shift the random stream of every later one."""
    dead = False
    for node in reversed(list(gm.graph.nodes)):
        seeded = (
            isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags
        )
        if node.op == "call_function" and not node.users and not node.is_impure() and not seeded:
            gm.graph.erase_node(node)
            dead = True
    return dead
