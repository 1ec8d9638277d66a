"""Per-step outputs gathered into a preallocated tensor or a growing `cat`, turned into the one stack / cat
the re-roll reads (run by `passes/canonicalize.py`: both rewrites compute the very same numbers).

Research code often spells a scan's outputs as `ys = torch.empty(...)` (or `zeros`, `full`, `empty_like`, ...) and
`ys[:, :, t] = y_t` inside the loop. Capture records the allocation, then one `select(ys, dim, t)` and
one `copy_` into it per step. When every index along `dim` is written exactly once, nothing reads or views
the buffer before the last write, and each written value has the slot's shape, the buffer after the loop
holds exactly `stack([y_0, ..., y_{L-1}], dim)` (cast to the buffer's dtype, as `copy_` casts): the writes
are replaced by that stack, which `passes/ssm_scan.py` then re-rolls like any other.

Anything else (steps skipped, a slot written twice, the buffer read mid-loop, a write that broadcasts) is
left as captured; when the written values form a recurrence the scan family reports why
(`step_write_rejections`).

`ys = torch.cat([ys, y_t], dim)` captures as a chain of two-operand cats, flattened into one
(`flatten_growing_cats`) unless a piece is written in place before the merged cat would read it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxfuse.passes.canonicalize import opaque_call
from fxfuse.passes.reroll import chained
from fxfuse.passes.site import Rejection

aten = torch.ops.aten
# fresh tensors: once every slot is written, their initial values (if any) no longer matter
_ALLOCS = (
    aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default, aten.empty_strided.default,
    aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.ones.default, aten.ones_like.default,
    aten.full.default, aten.full_like.default, aten.new_full.default,
)  # fmt: skip


class NotStepWrites(Exception):
    """The buffer is not filled slot by slot as a stack would be; the message says why."""


def _candidate(node: Node) -> bool:
    """A cheap first look (graphs hold many allocations): a fresh tensor with >= 3 slots viewed by `select`."""
    if node.op != "call_function" or node.target not in _ALLOCS:
        return False
    return sum(1 for u in node.users if u.target is aten.select.int) >= 3


def _writes(buffer: Node) -> tuple[int, list[Node], list[Node]]:
    """(dim, the value written into each slot in index order, the copy_ nodes) of a buffer filled one
    `select` slot at a time; NotStepWrites otherwise. Raises when fewer than 3 slots are written."""
    val = buffer.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        raise NotStepWrites("not a tensor buffer")
    order = {n: j for j, n in enumerate(buffer.graph.nodes)}
    slots: dict[int, Node] = {}
    copies: list[Node] = []
    dims: set[int] = set()
    readers: list[Node] = []
    for user in buffer.users:
        copy = next(iter(user.users)) if len(user.users) == 1 else None
        if (
            user.target is aten.select.int
            and user.args[0] is buffer
            and copy is not None
            and copy.target is aten.copy_.default
            and copy.args[0] is user
            and not copy.users
            and isinstance(copy.args[1], Node)
        ):
            dim, index = user.args[1] % val.dim(), user.args[2] % val.shape[user.args[1]]
            if index in slots:
                raise NotStepWrites(f"slot {index} along dim {dim} is written twice")
            dims.add(dim)
            slots[index] = copy.args[1]
            copies.append(copy)
        else:
            readers.append(user)
    if len(slots) < 3:
        raise NotStepWrites("fewer than 3 slots written")
    if len(dims) != 1:
        raise NotStepWrites("the slots are written along different dims")
    (dim,) = dims
    if len(slots) != val.shape[dim]:
        raise NotStepWrites(f"{len(slots)} of the {val.shape[dim]} slots along dim {dim} are written "
                            "(the rest keep the buffer's initial values)")  # fmt: skip
    last = max(order[c] for c in copies)
    early = [r for r in readers if order[r] < last]
    if early:
        raise NotStepWrites(f"{early[0].name} ({early[0].target}) reads the buffer before its last write")
    slot_shape = val.shape[:dim] + val.shape[dim + 1 :]
    writer = foreign_writer(buffer.graph)
    if writer is not None:  # a written value's at the stack (after the last write) may differ from at its copy
        raise NotStepWrites(f"{writer.name} ({writer.target}) writes a tensor in place, so the values at each "
                            "write may not be kept until the stack")  # fmt: skip
    for value in slots.values():
        if value.meta.get("val") is None or value.meta["val"].device != val.device:
            raise NotStepWrites(f"{value.name} is written from another device")
        if value.meta["val"].shape != slot_shape:
            raise NotStepWrites(f"{value.name} is broadcast into its slot (shape {tuple(value.meta['val'].shape)} vs "
                                f"{tuple(slot_shape)})")  # fmt: skip
    return dim, [slots[j] for j in range(len(slots))], copies


def _slot_copies(graph) -> set[Node]:
    """Every `copy_` into a `select` slot of a fresh allocation: the writes this module reads."""
    return {
        c
        for n in graph.nodes
        if n.op == "call_function" and n.target in _ALLOCS
        for u in n.users
        if u.target is aten.select.int and u.args[0] is n
        for c in u.users
        if c.target is aten.copy_.default and c.args[0] is u
    }


def foreign_writer(graph) -> Node | None:
    """The first node of `graph`, other than a slot write, that may write a tensor in place (a mutable
    schema: in-place and out= variants, foreach_*_), or whose writes cannot be read off a schema (a
    higher-order op, a Python callable); None when there is none. Any such write could reach a written
    value through a view, so none is allowed: tracing aliases through views proved leaky (unbind, split,
    chunk, out=, lists of tensors)."""
    slots = _slot_copies(graph)
    for node in graph.nodes:
        if node.op != "call_function" or node in slots:
            continue
        schema = getattr(node.target, "_schema", None)
        if opaque_call(node) or (schema is not None and schema.is_mutable):
            return node
    return None


def stack_step_writes(gm: GraphModule) -> bool:
    """Replace every buffer filled slot by slot (see the module docstring) by the stack of what was written;
    True when the graph changed."""
    changed = False
    for buffer in [n for n in gm.graph.nodes if _candidate(n)]:
        try:
            dim, values, copies = _writes(buffer)
        except NotStepWrites:
            continue
        order = {n: j for j, n in enumerate(gm.graph.nodes)}
        last = max(copies, key=order.__getitem__)
        dtype = buffer.meta["val"].dtype
        with gm.graph.inserting_after(last):
            stacked = gm.graph.call_function(aten.stack.default, ([_cast(v, dtype, last) for v in values], dim))
        stacked.meta = dict(last.meta)
        stacked.meta["val"] = torch.stack([_cast_val(v, dtype) for v in values], dim)
        for copy in copies:
            view = copy.args[0]
            gm.graph.erase_node(copy)
            gm.graph.erase_node(view)
        buffer.replace_all_uses_with(stacked)
        gm.graph.erase_node(buffer)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _cast(value: Node, dtype: torch.dtype, before: Node) -> Node:
    """`value` in `dtype` (copy_ casts what it writes to the buffer's dtype)."""
    if value.meta["val"].dtype == dtype:
        return value
    with value.graph.inserting_before(before):
        cast = value.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
    cast.meta = dict(value.meta)
    cast.meta["val"] = _cast_val(value, dtype)
    return cast


def _cast_val(value: Node, dtype: torch.dtype) -> torch.Tensor:
    val = value.meta["val"]
    return val if val.dtype == dtype else val.to(dtype)


def step_write_rejections(gm: GraphModule) -> list[Rejection]:
    """A report row for every buffer still filled slot by slot (after `stack_step_writes`) with values
    that form a recurrence: such a loop is left as written, and the row says why."""
    found = []
    for buffer in gm.graph.nodes:
        if not _candidate(buffer):
            continue
        order = {n: j for j, n in enumerate(gm.graph.nodes)}
        writes = [c for u in buffer.users for c in u.users if c.target is aten.copy_.default and c.args[0] is u]
        values = sorted({c.args[1] for c in writes if isinstance(c.args[1], Node)}, key=order.__getitem__)
        if len(values) < 3 or not chained(values):
            continue
        try:
            _writes(buffer)
            reason = "the preallocated outputs were not turned into a stack"
        except NotStepWrites as exc:
            reason = str(exc)
        found.append(Rejection("ssm_scan", f"{len(values)} steps written into a preallocated tensor", buffer,
                               f"per-step outputs written into a preallocated tensor are fused only when every "
                               f"slot is written once, before any read: {reason}"))  # fmt: skip
    return found


def _cat_dim(node: Node) -> int | None:
    """The normalized dim of a `cat` node, or None for any other node."""
    if node.op != "call_function" or node.target is not aten.cat.default or not isinstance(node.args[0], list):
        return None
    val = node.meta.get("val")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % val.dim() if isinstance(val, torch.Tensor) and val.dim() else None


def flatten_growing_cats(gm: GraphModule) -> bool:
    """`ys = torch.cat([ys, y_t], dim)` in a loop captures as a chain of two-operand cats: each cat whose
    first operand is a cat along the same dim that nothing else reads takes that cat's operands instead
    (concatenation is associative), and operands with no slot along dim and the result's dtype (an empty
    start, `torch.empty(b, d, 0)`) are dropped, so the re-roll sees one cat of the per-step outputs.
    True when the graph changed."""
    changed, writer = False, foreign_writer(gm.graph)
    for node in list(gm.graph.nodes):
        dim = _cat_dim(node)
        if dim is None:
            continue
        tensors = list(node.args[0])
        inner = tensors[0]
        # the merged cat reads the inner operands later: nothing may be written in place in between
        merge = writer is None and isinstance(inner, Node) and _cat_dim(inner) == dim and len(inner.users) == 1
        if merge and _same_kind(inner, node):
            tensors = list(inner.args[0]) + tensors[1:]
        kept = [t for t in tensors if not _empty_slot(t, node, dim)]
        if kept != list(node.args[0]) and kept:
            node.args = (kept, dim, *node.args[2:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dim"}
            if not inner.users:
                gm.graph.erase_node(inner)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _same_kind(a: Node, b: Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    both = isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
    return both and (va.dtype, va.device) == (vb.dtype, vb.device)


def _empty_slot(t: object, cat: Node, dim: int) -> bool:
    """Whether `t` adds nothing to `cat` along dim and dropping it keeps the result's dtype."""
    val, out = getattr(t, "meta", {}).get("val"), cat.meta["val"]
    return (
        isinstance(val, torch.Tensor) and val.dim() == out.dim() and val.shape[dim] == 0 and val.dtype == out.dtype
        and all(s == o for j, (s, o) in enumerate(zip(val.shape, out.shape)) if j != dim)
    )  # fmt: skip
