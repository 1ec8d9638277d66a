"""Spatial pyramid pooling: every rule of the family on one screen.

Three spellings reach one fused op, `fxfuse::spp`:
- same-size pyramids: a feature map concatenated on channels with stride-1, same-padded max pools of it
  (YOLOv3/v5 SPP, YOLOv7 SPPCSPC) or with a chain of them (SPPF: max with -inf padding composes, so
  pool5∘pool5 == pool9 exactly);
- SPPNet pyramids: adaptive max pools at several bin counts (or max pools whose computed windows are the
  adaptive ones at the captured size), each flattened, concatenated.
Everything else — zero padding (F.pad then pool), dilation, strides, average pools, pools of different
inputs — is left alone, with the reason in the report when it looked like a pyramid. (ceil_mode is fine at
stride 1: it changes neither the output size nor any window there.)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from fxfuse.backends import resolve
from fxfuse.passes.site import Rejection, Site

aten = torch.ops.aten
_FLATTENS = (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _pair(v, default) -> tuple[int, int]:
    v = default if v is None or v == [] else v
    return (v, v) if isinstance(v, int) else (tuple(v) * 2 if len(v) == 1 else tuple(v))


def _val(node: object):
    return node.meta.get("val") if isinstance(node, Node) else None


@dataclass(frozen=True)
class Pool:
    """A max_pool2d's parameters, defaults filled in as ATen defines them (stride [] means kernel)."""

    node: Node
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool

    @staticmethod
    def of(node: Node) -> Pool | None:
        if node.op != "call_function" or node.target is not aten.max_pool2d.default:
            return None
        a = list(node.args) + [None] * (6 - len(node.args))
        kw = node.kwargs
        kernel = _pair(a[1] if a[1] is not None else kw.get("kernel_size"), None)
        stride = _pair(a[2] if a[2] is not None else kw.get("stride"), kernel)
        padding = _pair(a[3] if a[3] is not None else kw.get("padding"), 0)
        dilation = _pair(a[4] if a[4] is not None else kw.get("dilation"), 1)
        ceil_mode = bool(a[5] if a[5] is not None else kw.get("ceil_mode", False))
        return Pool(node, kernel, stride, padding, dilation, ceil_mode)

    def same_size_problem(self) -> str | None:
        """Why this pool is not a stride-1, -inf-padded, same-size window (None when it is)."""
        k = self.kernel
        if k[0] != k[1]:
            return f"non-square kernel {k}"
        if k[0] % 2 == 0:
            return f"even kernel {k[0]} (no same-size padding)"
        if self.stride != (1, 1):
            # ceil_mode is only checked here: at stride 1 it changes neither the output size nor a window
            return f"stride {self.stride}{', ceil_mode' if self.ceil_mode else ''}: not a same-size pyramid"
        if self.dilation != (1, 1):
            return f"dilation {self.dilation}"
        if self.padding != (k[0] // 2, k[1] // 2):
            return f"padding {self.padding} with kernel {k[0]}: output size changes"
        return None


def _cat(node: Node) -> tuple[list[Node], int] | None:
    if node.op != "call_function" or node.target is not aten.cat.default:
        return None
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    val = _val(node)
    if val is None or not all(isinstance(t, Node) for t in tensors):
        return None
    return list(tensors), dim % val.dim()


def _sppf_chain(t: Node) -> tuple[Node, int, list[Pool]] | str:
    """Follow same-size pools back from `t`: (root, effective kernel, pools top-down) or a reason."""
    pools: list[Pool] = []
    while (pool := Pool.of(t)) is not None:
        problem = pool.same_size_problem()
        src = pool.node.args[0]
        if problem and src.op == "call_function" and src.target in (aten.pad.default, aten.constant_pad_nd.default):
            return "an input zero-padded with F.pad (the fused pyramid pads with -inf)"
        if problem:
            return problem
        pools.append(pool)
        t = pool.node.args[0]
    size = 1 + sum(p.kernel[0] - 1 for p in pools)
    return t, size, pools


def _site(
    anchor: Node, root: Node, sizes: list[int], mode: str, chained: bool, variant: str, backend: str, extra: list[Node]
) -> Site:
    def emit(graph: Graph, inputs: list[Node]) -> Node:
        import fxfuse.fusion.spp  # noqa: F401  registers torch.ops.fxfuse.spp

        return graph.call_function(torch.ops.fxfuse.spp.default, (inputs[0], sizes, mode, chained, backend))

    device = _val(root).device
    return Site("spp", variant, anchor, anchor, [root], emit, backend=resolve(backend, device), extra_region=extra)


def match_same_size(cat: Node, backend: str) -> Site | Rejection | None:
    """cat([x, pool5(x), pool9(x), pool13(x)], channels) or the SPPF chain -> spp(x, [1, 5, 9, 13])."""
    parsed = _cat(cat)
    if parsed is None or _val(cat).dim() != 4 or parsed[1] != 1:
        return None
    tensors, _ = parsed
    chains = [_sppf_chain(t) for t in tensors]
    if not any(isinstance(c, str) or c[2] for c in chains):
        return None  # no pool at all: an ordinary concatenation
    for c in chains:
        if isinstance(c, str):
            return Rejection("spp", "same-size pyramid", cat, f"a pool has {c}")
    roots = {c[0] for c in chains}
    if len(roots) != 1:
        return Rejection(
            "spp",
            "same-size pyramid",
            cat,
            "the concatenated tensors are not all max-pooled from the same input "
            "(zero padding via F.pad, another branch, or an average pool)",
        )
    root = roots.pop()
    if not (isinstance(_val(root), torch.Tensor) and _val(root).dtype.is_floating_point):
        return None
    sizes = [c[1] for c in chains]
    distinct = sorted(set(sizes))
    parent_size = {s: (distinct[i - 1] if i else None) for i, s in enumerate(distinct)}
    pools = [p for c in chains for p in c[2]]
    size_of = {c[2][i].node: c[1] - sum(p.kernel[0] - 1 for p in c[2][:i]) for c in chains for i in range(len(c[2]))}
    size_of[root] = 1
    parallel = all(p.node.args[0] is root for p in pools)
    chained = all(size_of.get(p.node.args[0]) == parent_size[size_of[p.node]] for p in pools)
    if not (parallel or chained):
        # Forward values would match, but max-pool gradients at ties follow the original's structure.
        return Rejection("spp", f"same-size {sizes}", cat, "mixes chained and parallel pools")
    variant = f"sizes {'/'.join(map(str, sizes))}, {'parallel' if parallel else 'chained (SPPF)'}"
    return _site(cat, root, sizes, "same", chained and not parallel, variant, backend, [])


def _adaptive_bins(node: Node, hw: tuple[int, int]) -> tuple[Node, int, list[Node]] | str | None:
    """A pyramid level: (input, bins n, dead index outputs) for an adaptive max pool or a max pool whose
    windows are exactly the adaptive ones at the captured size `hw` (SPPNet's computed windows)."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        pool = node.args[0]
        if pool.op == "call_function" and pool.target is aten.adaptive_max_pool2d.default:
            out = _pair(pool.args[1], None)
            if out[0] != out[1]:
                return f"non-square bins {out}"
            dead = [u for u in pool.users if u is not node and not u.users]
            return (pool.args[0], out[0], dead) if len(dead) == len(pool.users) - 1 else "pool indices are used"
        return None
    pool = Pool.of(node)
    if pool is None:
        return None
    out = tuple(_val(node).shape[-2:])
    if out[0] != out[1] or pool.dilation != (1, 1) or pool.ceil_mode:
        return "pool windows are not an n×n pyramid"
    n = out[0]
    for axis in (0, 1):
        size, k, s, p = hw[axis], pool.kernel[axis], pool.stride[axis], pool.padding[axis]
        mine = [(max(i * s - p, 0), min(i * s - p + k, size)) for i in range(n)]
        adaptive = [((i * size) // n, -((-(i + 1) * size) // n)) for i in range(n)]
        if mine != adaptive:
            return f"pool windows at size {size} are not the adaptive {n}-bin windows"
    return pool.node.args[0], n, []


def match_adaptive(cat: Node, backend: str) -> Site | Rejection | None:
    """cat([adaptive_max_pool2d(x, n).flatten(1) for n in bins], 1) -> spp(x, bins, "adaptive")."""
    parsed = _cat(cat)
    if parsed is None or _val(cat).dim() != 2 or parsed[1] != 1:
        return None
    levels = []
    for t in parsed[0]:
        if t.op != "call_function" or t.target not in _FLATTENS:
            return None
        pooled = t.args[0]
        pv, tv = _val(pooled), _val(t)
        if pv is None or pv.dim() != 4 or tuple(tv.shape) != (pv.shape[0], pv[0].numel()):
            return None
        levels.append(pooled)
    roots = {lvl.args[0].args[0] if lvl.target is operator.getitem else lvl.args[0] for lvl in levels}
    root = next(iter(roots)) if len(roots) == 1 else None
    if root is None or _val(root) is None:
        return None
    hw = tuple(_val(root).shape[-2:])
    found = [_adaptive_bins(lvl, hw) for lvl in levels]
    if all(f is None for f in found):
        return None
    for f in found:
        if f is None or isinstance(f, str):
            return Rejection("spp", "pyramid", cat, f or "a level is not a max pool")
    if any(f[0] is not root for f in found):
        return Rejection("spp", "pyramid", cat, "levels pool different inputs")
    bins = [f[1] for f in found]
    dead = [d for f in found for d in f[2]]
    return _site(cat, root, bins, "adaptive", False, f"bins {'/'.join(map(str, bins))}", backend, dead)


RULES = (match_same_size, match_adaptive)


def find_spp(gm: GraphModule, backend: str) -> list[Site | Rejection]:
    """Every SPP site (or near miss) anchored on a concatenation."""
    found = []
    for node in gm.graph.nodes:
        for rule in RULES:
            result = rule(node, backend)
            if result is not None:
                found.append(result)
                break
    return found
