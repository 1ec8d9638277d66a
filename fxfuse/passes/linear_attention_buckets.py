"""Linear attention already written in buckets: a running sum of per-bucket states, shifted by one bucket.

The sequence is cut into g buckets of c positions (q, k, v viewed as [..., g, c, D]); per bucket the state
kv_g = k_g^T v_g is summed over the buckets before it (cumsum over g shifted by one: F.pad + slice,
cat([zeros, cumsum[:-1]]) or cumsum(kv) - kv) and read by each query of the bucket: inter = q_g @ kv_(<g).
Alone that is block-exclusive
(a token sees no key of its own bucket) -- lucidrains' causal_linear_attn, FLASH's global linear part --
and becomes `fxfuse::linear_attention(causal=True, block=c)` (j // c < i // c: exactly what the buckets
compute, not token-causal). Plus the intra-bucket quadratic part
(q_g k_g^T * tril) @ v_g it is exactly causal linear attention over the whole sequence:

    (inter + intra)[g, i] = sum_{g' < g, j} (q_gi . k_g'j) v_g'j + sum_{j <= i} (q_gi . k_gj) v_gj
                          = sum_{t' <= t} (q_t . k_t') v_t'            t = g c + i

and it becomes one `fxfuse::linear_attention(causal=True)` over [B, H, g c, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from fxfuse.passes.attention_layout import Product, read_product, val
from fxfuse.passes.attention_scores import constant_value, read_chain
from fxfuse.passes.linear_attention_site import PATTERN, Weights, _input_gen, einsum_sides, feature_map, is_call
from fxfuse.passes.site import Rejection, Site

aten = torch.ops.aten
_PADS = (aten.pad.default, aten.constant_pad_nd.default)
ROW_SCALED = (
    "the block-exclusive running sum's rows are scaled by a third einsum operand that is not read as the "
    "op's normaliser"
)


@dataclass
class Buckets:
    """q [..., g, c, d], k [..., g, c, d], v [..., g, c, e] with one role letter per axis (batch axes "b"/"h",
    bucket "g", position "c", features "d"/"e"), and the inter-bucket product's output roles."""

    q: Node
    k: Node
    v: Node
    q_roles: str
    k_roles: str
    v_roles: str
    out_roles: str
    batch: str
    scale: float = 1.0  # a constant factor on the bucket states (FLASH divides them by the bucket size)
    normalised: bool = False  # a third einsum operand scales the output rows
    rows: Node | None = None  # that operand (lucidrains' D_inv)
    rows_roles: str = ""


def _exclusive_prefix(node: Node) -> tuple[Node, int] | str | None:
    """(x, axis) when `node` sums x over `axis` up to the step before each one: cumsum(x) - x, or cumsum(x)
    padded with one zero step in front and its last step dropped; why not when it is shifted otherwise."""
    if any(val(n) is None for n in (node, *node.all_input_nodes)):
        return None
    if is_call(node, aten.sub.Tensor) and node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2:
        c, x = node.args
        if is_call(c, aten.cumsum.default) and c.args[0] is x:
            return x, c.args[1] % val(c).dim()
        return None
    if is_call(node, aten.cat.default):
        return _zero_then_prefix(node)
    if is_call(node, *_PADS):
        pad, axis = node, None  # F.pad(x, (..., 1, -1)): the negative width drops the last step
    elif is_call(node, aten.slice.Tensor) and is_call(node.args[0], *_PADS):
        pad = node.args[0]
        axis, start, _, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
        if step != 1 or start not in (0, None):
            return None
        axis %= val(pad).dim()
    else:
        return None
    c, rank, widths = pad.args[0], val(pad).dim(), list(pad.args[1])
    if val(c) is None:
        return None
    if pad.target is aten.constant_pad_nd.default:
        mode, value = "constant", pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("value", 0)
    else:
        mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
        value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or not is_call(c, aten.cumsum.default) or len(widths) % 2:
        return None
    padded = [rank - 1 - i // 2 for i, w in enumerate(widths) if w]
    if len(set(padded)) != 1 or axis not in (None, padded[0]) or c.args[1] % rank != padded[0]:
        return None
    axis = padded[0]
    before, after = widths[2 * (rank - 1 - axis)], widths[2 * (rank - 1 - axis) + 1]
    if after > 0 or val(node).shape != val(c).shape:
        return None  # the window must keep the first steps, as many as the running sum has
    if before != 1:
        return f"the running sum of bucket states is shifted by {before} buckets, not one"
    return c.args[0], axis


def _zero_then_prefix(node: Node) -> tuple[Node, int] | str | None:
    """cat([zeros, cumsum(x)[:-w]], axis) with w zero steps (flash-linear-attention's naive chunk form)."""
    parts, axis = node.args[0], node.args[1] if len(node.args) > 1 else 0
    if len(parts) != 2 or not all(isinstance(p, Node) and val(p) is not None for p in parts):
        return None
    zeros, kept = parts
    rank = val(node).dim()
    axis %= rank
    if not (is_call(zeros, aten.zeros_like.default, aten.new_zeros.default) or _all_zero(zeros)):
        return None
    if not is_call(kept, aten.slice.Tensor) or not is_call(kept.args[0], aten.cumsum.default):
        return None
    c = kept.args[0]
    k_axis, start, _, step = (list(kept.args[1:]) + [0, None, None, 1][len(kept.args) - 1 :])[:4]
    if k_axis % rank != axis or c.args[1] % rank != axis or start not in (0, None) or step != 1:
        return None
    if val(node).shape != val(c).shape:
        return None
    shift = int(val(zeros).shape[axis])
    if shift != 1:
        return f"the running sum of bucket states is shifted by {shift} buckets, not one"
    return c.args[0], axis


def _all_zero(node: Node) -> bool:
    value = constant_value(node)
    return value is not None and not bool(value.any())


def _scaled(x: Node) -> tuple[float, Node]:
    """(c, y) when x = y * c or y / c with a number c, else (1, x)."""
    if is_call(x, aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
        c = float(x.args[1])
        return (c if x.target is aten.mul.Tensor else 1.0 / c), x.args[0]
    if is_call(x, aten.mul.Tensor) and isinstance(x.args[0], (int, float)):
        return float(x.args[0]), x.args[1]
    return 1.0, x


def _products(node: Node) -> list[tuple[Product, tuple[Node, str] | None]]:
    """`node` read as a product of two tensors, with the third einsum operand (and its labels) that scales
    its rows (lucidrains' `einsum('bhund,bhude,bhun->bhune', q, context, D_inv)`), None without."""
    p = read_product(node)
    if p is not None:
        return [(p, None)]
    spelled = einsum_sides(node) if is_call(node, aten.einsum.default) and len(node.args[1]) == 3 else None
    if spelled is None:
        return []
    (sides, out), found = spelled, []
    for i in range(3):
        (la, lb), (a, b) = [x for j, x in enumerate(sides) if j != i], [t for j, t in enumerate(node.args[1]) if j != i]
        fits = all(c in out for c in sides[i]) and all(c in la + lb for c in out)
        if fits and all(len(set(x)) == len(x) for x in (*sides, out)):
            found.append((Product(node, a, b, la, lb, out), (node.args[1][i], sides[i])))
    return found


def _read_buckets(node: Node) -> Buckets | str | None:
    """`node` as q_g @ (sum of k^T v over the buckets before g), or why it is not."""
    for p, scaled_rows in _products(node):
        found = _read_product_buckets(p)
        if found is not None:
            if isinstance(found, Buckets) and scaled_rows is not None:
                found.normalised, (found.rows, labels) = True, scaled_rows
                found.rows_roles = "".join(found.out_roles[p.out_labels.index(c)] for c in labels)
            return found
    return None


def _read_product_buckets(p: Product) -> Buckets | str | None:
    if p.bias is not None or p.alpha != 1.0:
        return None
    sides = ((p.b, p.b_labels, p.a, p.a_labels), (p.a, p.a_labels, p.b, p.b_labels))
    for kv_node, kv_labels, q_node, q_labels in sides:
        prefix = _exclusive_prefix(kv_node)
        if prefix is None:
            continue
        if isinstance(prefix, str):
            return prefix
        x, axis = prefix
        scale, states = _scaled(x)
        p1 = read_product(states)
        readers = {u for u in x.users if u is not kv_node and is_call(u, aten.cumsum.default)}
        if p1 is None or p1.bias is not None or p1.alpha != 1.0 or set(x.users) - readers - {kv_node}:
            return None
        if states is not x and len(states.users) != 1:
            return None
        kl, vl, out1 = p1.a_labels, p1.b_labels, p1.out_labels
        contracted = [c for c in kl if c in vl and c not in out1]
        d_axis, e_axis = [c for c in kl if c not in vl], [c for c in vl if c not in kl]
        g = out1[axis]
        if len(contracted) != 1 or len(d_axis) != 1 or len(e_axis) != 1 or g not in kl or g not in vl:
            return "the bucket states are not k^T v over the positions of each bucket"
        batch = [c for c in out1 if c in kl and c in vl and c != g]
        if len(batch) > 2 or sorted(out1) != sorted(batch + [g] + d_axis + e_axis):
            return "the bucket states are not [batch, heads, buckets, D, E]"
        role = dict(zip(batch, "bh"[2 - len(batch) :]), **{g: "g", contracted[0]: "c", d_axis[0]: "d", e_axis[0]: "e"})
        kv_role = {c: role[out1[i]] for i, c in enumerate(kv_labels)}
        q_c = [c for c in q_labels if c not in kv_labels]
        dot = [c for c in q_labels if c in kv_labels and c not in p.out_labels]
        if len(q_c) != 1 or len(dot) != 1 or kv_role[dot[0]] != "d":
            return "the queries do not read the bucket states over their feature axis"
        qr = {**kv_role, q_c[0]: "c"}
        q_roles = "".join(qr[c] for c in q_labels)
        out_roles = "".join(qr.get(c, "?") for c in p.out_labels)
        batch_roles = "".join(role[c] for c in batch)
        if sorted(q_roles) != sorted(batch_roles + "gcd") or sorted(out_roles) != sorted(batch_roles + "gce"):
            return "the queries or the output do not fit [batch, heads, buckets, C, D]"
        # k^T @ v: the bucketed k is the transpose's input (the intra part transposes it on its own)
        k_node, k_roles = _untransposed(p1.a, "".join(role[c] for c in kl))
        v_node, v_roles = _untransposed(p1.b, "".join(role[c] for c in vl))
        return Buckets(q_node, k_node, v_node, q_roles, k_roles, v_roles, out_roles, batch_roles, scale)
    return None


def _untransposed(node: Node, roles: str) -> tuple[Node, str]:
    """(x, x's roles) when `node` is a transpose of x, else (node, roles)."""
    if not is_call(node, aten.transpose.int):
        return node, roles
    r = list(roles)
    i, j = (a % len(r) for a in node.args[1:3])
    r[i], r[j] = r[j], r[i]
    return node.args[0], "".join(r)


def _through_transpose(node: Node, roles: dict[Node, str]) -> tuple[Node, str] | None:
    """(bucketed tensor, its roles) for `node` itself or its transpose."""
    if node in roles:
        return node, roles[node]
    if is_call(node, aten.transpose.int) and node.args[0] in roles:
        r = list(roles[node.args[0]])
        i, j = (a % len(r) for a in node.args[1:3])
        r[i], r[j] = r[j], r[i]
        return node.args[0], "".join(r)
    return None


def _intra(node: Node, b: Buckets) -> Weights | None:
    """The weights (a proven tril mask) when `node` is (q_g k_g^T * tril) @ v_g over the same buckets,
    laid out as the inter part; None otherwise."""
    from fxfuse.passes.linear_attention_weights import read_weights

    pv = read_product(node)
    if pv is None or pv.bias is not None or pv.alpha != 1.0 or pv.b is not b.v:
        return None
    where, terms = read_chain(pv.a)
    ps = read_product(where)
    if ps is None or ps.bias is not None or ps.alpha != 1.0:
        return None
    qa = _through_transpose(ps.a, {b.q: b.q_roles})
    kb = _through_transpose(ps.b, {b.k: b.k_roles})
    if qa is None or kb is None or qa[0] is not b.q or kb[0] is not b.k:
        return None
    a_role = dict(zip(ps.a_labels, qa[1].replace("c", "i")))
    b_role = dict(zip(ps.b_labels, kb[1].replace("c", "j")))
    if any(a_role[c] != b_role[c] for c in ps.a_labels if c in b_role):
        return None  # a shared label must play one role on both sides
    contracted = [c for c in ps.a_labels if c in ps.b_labels and c not in ps.out_labels]
    s_roles = "".join({**a_role, **b_role}[c] for c in ps.out_labels)
    if [a_role[c] for c in contracted] != ["d"] or not s_roles.endswith("ij"):
        return None
    if sorted(s_roles) != sorted(b.batch + "gij") or val(pv.a) is None or val(pv.a).shape != val(ps.node).shape:
        return None
    weights = read_weights(terms, "x" * (len(s_roles) - 2) + "nm", 1)
    if isinstance(weights, str) or not weights.causal or weights.decay is not None:
        return None
    w_role = dict(zip(pv.a_labels, s_roles))
    v_role = dict(zip(pv.b_labels, b.v_roles.replace("c", "j")))
    if any(w_role[c] != v_role[c] for c in pv.a_labels if c in v_role):
        return None
    contracted = [c for c in pv.a_labels if c in pv.b_labels and c not in pv.out_labels]
    out = "".join({**v_role, **w_role}.get(c, "?") for c in pv.out_labels).replace("i", "c")
    if [w_role[c] for c in contracted] != ["j"] or out != b.out_roles:
        return None
    return weights


def match_buckets(node: Node, backend: str) -> Site | Rejection | None:
    # inter (shifted running sum of bucket states) + intra (causal within the bucket) -> linear_attention(causal)
    if is_call(node, aten.add.Tensor) and all(isinstance(a, Node) for a in node.args[:2]):
        if node.kwargs.get("alpha", 1) != 1 or val(node) is None:
            return None
        for inter, intra in (node.args[:2], node.args[1::-1]):
            b = _read_buckets(inter)
            if (
                isinstance(b, Buckets)
                and not b.normalised
                and len(inter.users) == 1
                and val(inter).shape == val(node).shape
            ):
                weights = _intra(intra, b) if len(intra.users) == 1 else None
                if weights is not None and abs(weights.scale - b.scale) <= 1e-12 * abs(b.scale):
                    return _site(node, b, weights, backend)
        return None
    b = _read_buckets(node)
    if b is None:
        return None
    if isinstance(b, str):
        return Rejection(PATTERN, "bucketed running sum", node, b)
    user = next(iter(node.users)) if len(node.users) == 1 else None
    if user is not None and isinstance(match_buckets(user, backend), Site):
        return None  # the sum with the intra-bucket part anchors the site
    normalised = ("none", 0.0)
    if b.normalised:
        normalised = _bucket_normaliser(b)
        if normalised is None:
            return Rejection(PATTERN, "bucketed running sum", node, ROW_SCALED)
    return _site(node, b, None, backend, *normalised)  # no intra-bucket part: block-exclusive


def _bucket_normaliser(b: Buckets) -> tuple[str, float] | None:
    """(normalize, eps) when the rows are scaled by 1 / (q_g . ksum_(<g) + eps) or 1 / clamp(..., eps),
    ksum_(<g) the running sum of k summed over each bucket, shifted by one bucket as the states are
    (lucidrains' D_inv); None otherwise."""
    from fxfuse.passes.linear_attention_weights import peel_eps, reciprocal_of

    den = reciprocal_of(b.rows)
    if den is None or len(b.rows.users) != 1 or b.scale != 1.0 or sorted(b.rows_roles) != sorted(b.batch + "gc"):
        return None
    peeled = peel_eps(den)
    if peeled is None:
        return None
    den, mode, eps = peeled
    pd = read_product(den)
    if pd is None or pd.bias is not None or pd.alpha != 1.0 or b.q not in (pd.a, pd.b) or pd.a is pd.b:
        return None
    ql, sl, ksum = (pd.a_labels, pd.b_labels, pd.b) if pd.a is b.q else (pd.b_labels, pd.a_labels, pd.a)
    prefix = _exclusive_prefix(ksum)
    if not isinstance(prefix, tuple):
        return None
    x, axis = prefix
    c_axis = b.k_roles.index("c")
    if not is_call(x, aten.sum.dim_IntList) or x.args[0] is not b.k or (len(x.args) > 2 and x.args[2]):
        return None
    if [d % len(b.k_roles) for d in x.args[1]] != [c_axis]:
        return None  # k summed over the positions of each bucket
    ks_roles = b.k_roles.replace("c", "")
    if ks_roles[axis] != "g":
        return None  # the running sum runs over the buckets
    role = dict(zip(ql, b.q_roles))
    if any(role.get(c, r) != r for c, r in zip(sl, ks_roles)):
        return None  # a shared label must play one role on both sides
    role |= dict(zip(sl, ks_roles))
    contracted = [c for c in ql if c in sl and c not in pd.out_labels]
    if [role[c] for c in contracted] != ["d"] or "".join(role.get(c, "?") for c in pd.out_labels) != b.rows_roles:
        return None
    return mode, eps


def defers_to_buckets(node: Node) -> bool:
    """Whether `node` (a quadratic-form candidate) is the intra-bucket part of a bucketed sum."""
    user = next(iter(node.users)) if len(node.users) == 1 else None
    return user is not None and is_call(user, aten.add.Tensor) and isinstance(match_buckets(user, "auto"), Site)


def _unbucketed(node: Node) -> Node:
    return node.args[0] if is_call(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default) else node


def _site(
    node: Node, b: Buckets, weights: Weights | None, backend: str, normalize: str = "none", eps: float = 0.0
) -> Site | Rejection:
    """One `fxfuse::linear_attention` over the flattened buckets: token-causal with the intra-bucket part
    (`weights`, its proven tril mask), block-exclusive with block = the bucket size without (None)."""
    from fxfuse.fusion.linear_attention import linear_attention_backend

    sizes = {}
    for t, roles in ((b.q, b.q_roles), (b.k, b.k_roles), (b.v, b.v_roles)):
        for r, s in zip(roles, val(t).shape):
            if sizes.setdefault(r, int(s)) != int(s):
                return Rejection(PATTERN, "bucketed running sum", node, f"q, k and v disagree on the {r} axis")
    if len({b.q, b.k, b.v}) != 3:
        return Rejection(PATTERN, "bucketed running sum", node, "q, k and v are not three different tensors")
    lead = 2 - len(b.batch)
    batch_sizes = [sizes[r] for r in b.batch]
    n = sizes["g"] * sizes["c"]
    out_dtype, q_dtype = val(node).dtype, val(b.q).dtype
    block = 0 if weights is not None else sizes["c"]

    def flat(graph: Graph, x: Node, roles: str, feat: str) -> Node:
        x = graph.call_function(aten.permute.default, (x, [roles.index(r) for r in b.batch + "gc" + feat]))
        x = graph.call_function(aten.reshape.default, (x, [*batch_sizes, n, sizes[feat]]))
        for _ in range(lead):
            x = graph.call_function(aten.unsqueeze.default, (x, 0))
        return x

    def emit(graph: Graph, nodes: list[Node]) -> Node:
        import fxfuse.fusion.linear_attention  # noqa: F401  (registers torch.ops.fxfuse.linear_attention)

        q, k, v = (flat(graph, x, r, f) for x, r, f in zip(nodes, (b.q_roles, b.k_roles, b.v_roles), "dde"))
        out = graph.call_function(
            torch.ops.fxfuse.linear_attention.default, (q, k, v, b.scale, True, None, normalize, eps, backend, block)
        )
        if lead:
            out = graph.call_function(aten.squeeze.dims, (out, list(range(lead))))
        out = graph.call_function(aten.reshape.default, (out, [*batch_sizes, sizes["g"], sizes["c"], sizes["e"]]))
        out = graph.call_function(aten.permute.default, (out, [(b.batch + "gce").index(r) for r in b.out_roles]))
        if out_dtype != q_dtype:
            out = graph.call_function(aten._to_copy.default, (out,), {"dtype": out_dtype})
        return out

    if block:
        variant = (
            f"bucketed running sum (buckets of {block}) → 1 op, block-exclusive (not token-causal), "
            f"{feature_map(_unbucketed(b.q))}, "
        ) + (f"normaliser {'+ eps' if normalize == 'eps' else 'clamp(min=eps)'}" if b.normalised else "no normaliser")
    else:
        variant = (
            f"bucketed running sum + intra-bucket part (buckets of {sizes['c']}) = one causal pass, "
            f"{feature_map(_unbucketed(b.q))}, no normaliser, causal"
        )
    variant += f", scale {b.scale:.4g}" if b.scale != 1.0 else ""
    name = linear_attention_backend(backend, val(b.q).device, q_dtype, sizes["d"], sizes["e"], block)[0]
    folded = weights.constants if weights is not None else {}
    constants = dict(enumerate(folded.values(), start=3))  # the tril mask, folded

    gen = _input_gen(constants, normalize != "none")
    inputs = [b.q, b.k, b.v, *folded]
    # a tril mask read from a buffer is folded: the compiled graph guards that buffer per call
    buffers = list(weights.buffers) if weights is not None else []
    return Site(PATTERN, variant, node, node, inputs, emit, backend=name, tolerance=1e-4, input_gen=gen,
                reads_buffers=buffers)
