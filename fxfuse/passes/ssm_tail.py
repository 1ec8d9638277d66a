"""The Mamba block's tail after a scan's readout y: the D skip y + u * D and the silu(z) gate, moved into
`fxfuse::selective_scan` when y (then the skipped y) is theirs alone (`skip_and_gate`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch.fx import Graph, Node

from fxfuse.passes.canonicalize import EXACT_WIDENING
from fxfuse.passes.ssm_labels import PASS_THROUGH, shape

aten = torch.ops.aten


def _call(graph: Graph, target, *args) -> Node:
    return graph.call_function(target, args)


@dataclass
class Tail:
    """What of the Mamba block's (y + u * D) * silu(z) follows a scan's stacked readout y and moves into the op."""

    output: Node  # the last node absorbed (y itself when none): its users read the op's output
    u: Node | None = None  # the skip's input, laid out as y
    D: Node | None = None  # the per-channel weight, broadcast over batch and time
    z: Node | None = None  # the gate's input, laid out as y
    casts: dict = field(default_factory=dict)  # "u" / "D" / "z" -> the dtype it is cast to after being read

    @property
    def inputs(self) -> list[Node]:
        return [n for n in (self.u, self.D, self.z) if n is not None]

    def reading(self, leaves: list[Node]) -> Tail:
        """This tail with each input that is a cast (or copy) of a scan leaf read from that leaf and cast again
        in the emitted graph. Verification draws every region input on its own: a cast drawn apart from its
        source (mamba_ssm's `u = u.float()`, read by the scan as u and by the skip as its cast) would not hold
        the numbers the scan reads, and the fused site would fail against the original for nothing."""
        found, casts = {}, dict(self.casts)
        for name in ("u", "D", "z"):
            node = base = getattr(self, name)
            while _exact_copy(base):
                base = base.args[0]
            if node is not None and base is not node and base in leaves:
                found[name], casts[name] = base, node.meta["val"].dtype
        return replace(self, **found, casts=casts) if found else self

    @property
    def parts(self) -> list[str]:
        return (["D skip"] if self.D is not None else []) + (["silu(z) gate"] if self.z is not None else [])

    def op_args(self, graph: Graph, env: dict, stacked: tuple, sizes: dict) -> list[Node | None]:
        """The op's (D [D], z, u [B, D, L]) arguments; none for a bare scan."""
        if not self.inputs:
            return []
        read = {}
        for name in ("u", "D", "z"):
            node = getattr(self, name)
            read[name] = None if node is None else env[node]
            if name in self.casts:
                read[name] = graph.call_function(aten._to_copy.default, (read[name],), {"dtype": self.casts[name]})
        D = _call(graph, aten.reshape.default, read["D"], [sizes["d"]]) if self.D is not None else None
        z, u = (_from_layout(graph, read[n], stacked, sizes) if read[n] is not None else None for n in ("z", "u"))
        return [D, z, u]


def _exact_copy(node: object) -> bool:
    """A copy or cast of its input that keeps every value (same dtype, or an exact widening): a chain of them
    equals one cast of its source to the last dtype. `u.half().float()` rounds, so it is not skipped."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in PASS_THROUGH):
        return False
    source, val = node.args[0], node.meta.get("val")
    before = source.meta.get("val") if isinstance(source, Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(before, torch.Tensor):
        return False
    return before.dtype == val.dtype or (before.dtype, val.dtype) in EXACT_WIDENING


def skip_and_gate(y: Node, stacked: tuple, sizes: dict) -> Tail:
    """The D skip y + u * D and then the gate y * silu(z) after the readout y (labels `stacked`), each taken
    when it is the only use of what comes before it (through float casts): otherwise that value is needed."""
    tail = Tail(y)
    if sorted(lab for lab in stacked if lab is not None) != ["b", "d", "l"]:
        return tail
    skip = _skip(_past_casts(y), stacked.index("d"), sizes["d"])
    if skip is not None:
        tail.output, tail.u, tail.D = skip
    gate = _gate(_past_casts(tail.output))
    if gate is not None:
        tail.output, tail.z = gate
    return tail


def _only_user(node: Node) -> Node | None:
    user = next(iter(node.users)) if len(node.users) == 1 else None
    return user if user is not None and user.op == "call_function" and _is_float(user) else None


def _is_float(node: object) -> bool:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _past_casts(node: Node) -> Node:
    """The last of the float casts and copies that are all `node`'s uses, one after the other."""
    while (user := _only_user(node)) is not None and user.target in PASS_THROUGH:
        node = user
    return node


def _skip(y: Node, channel: int, channels: int) -> tuple[Node, Node, Node] | None:
    """y + u * D (either operand order), D per channel and u shaped as y -> (the add, u, D)."""
    add = _only_user(y)
    if add is None or add.target is not aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or shape(add) != shape(y):
        return None
    prod = add.args[1] if add.args[0] is y else add.args[0]
    if prod is y or not isinstance(prod, Node) or prod.target is not aten.mul.Tensor or len(prod.users) != 1:
        return None
    for u, D in (prod.args, prod.args[::-1]):
        if _is_float(u) and _is_float(D) and shape(u) == shape(y) and _per_channel(shape(D), len(shape(y)), channel,
                                                                                     channels):  # fmt: skip
            return add, u, D
    return None


def _per_channel(d_shape: tuple, rank: int, channel: int, channels: int) -> bool:
    """Whether a tensor of d_shape broadcasts against rank-`rank` y along its channel axis only."""
    if len(d_shape) > rank:
        return False
    aligned = (1,) * (rank - len(d_shape)) + d_shape
    return aligned[channel] == channels and all(s == 1 for k, s in enumerate(aligned) if k != channel)


def _gate(y: Node) -> tuple[Node, Node] | None:
    """y * silu(z), silu spelled F.silu or z * sigmoid(z), z shaped as y -> (the product, z)."""
    mul = _only_user(y)
    if mul is None or mul.target is not aten.mul.Tensor or shape(mul) != shape(y):
        return None
    g = mul.args[1] if mul.args[0] is y else mul.args[0]
    if g is y or not isinstance(g, Node) or len(g.users) != 1:
        return None
    z = None
    if g.target is aten.silu.default:
        z = g.args[0]
    elif g.target is aten.mul.Tensor:
        for x, s in (g.args, g.args[::-1]):
            if isinstance(s, Node) and s.target is aten.sigmoid.default and s.args[0] is x and len(s.users) == 1:
                z = x
    return (mul, z) if _is_float(z) and shape(z) == shape(y) else None


def _from_layout(graph: Graph, x: Node, have: tuple, sizes: dict) -> Node:
    """x laid out as the stacked readout (labels `have`, None = size 1) -> [B, D, L]."""
    kept = [lab for lab in have if lab is not None]
    if len(kept) != len(have):
        x = _call(graph, aten.reshape.default, x, [sizes[lab] for lab in kept])
    order = [kept.index(lab) for lab in "bdl"]
    return x if order == [0, 1, 2] else _call(graph, aten.permute.default, x, order)
