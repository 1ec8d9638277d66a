"""Linear attention: softmax-free attention `(phi(Q) phi(K)^T) V` reassociated to `phi(Q) (phi(K)^T V)`.

Feature maps stay graph ops; the matcher needs only the product structure. A rule in `RULES` anchors on
a product and returns the semantic parameters (roles of q, k, v, scale, causal, decay, normaliser):
- quadratic form: the value product W @ v where W is the score product q @ k^T with, in between, only
  what the fused op expresses: constant scales, a constant lower-triangular 0/1 mask (multiplied, or
  masked_fill of the upper triangle with 0, or tril of the scores), a constant decay matrix gamma_h^(i - j)
  on and below the diagonal (proven by evaluating it; a mask held in a module buffer is read at capture,
  and the compiled graph is guarded on it: `buffer_values.py`; also as the third operand of one einsum),
  and a row normaliser W / (W.sum(-1, keepdim) + eps) or W / W.sum(-1, keepdim).clamp(min), also written
  W * (1 / ...), W * reciprocal(...), W.sum(-1)[..., None], or as q . cumsum(k) (q . sum(k)) when W has no
  scale or decay; W may also be 1 + s + s²/2 of the scores s (Based's Taylor exp), which is phi(q) . phi(k)
  for phi(x) = [1, x, vec(x x^T) / sqrt(2)], or s² (ReBased), phi(x) = vec(x x^T) (features built in the
  graph); reading W: `linear_attention_weights.py`;
- already linear: q @ (k^T @ v) (kv = einsum over the sequence), optionally times 1 / (q . sum(k) + eps)
  or 1 / clamp(q . sum(k), min), also as one 3-operand einsum(q, kv, z) (fast-transformers);
- bucketed running sums of k^T v plus the intra-bucket causal part: `linear_attention_buckets.py`.
Anything else between the products (softmax, relu^2: the attention family; a bias; an abs-sum
normaliser; a mask that is not causal) is left alone, with the reason when it looked like this family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxfuse.passes.attention_layout import Operand, Product, read_product, val
from fxfuse.passes.linear_attention_buckets import defers_to_buckets, match_buckets
from fxfuse.passes.linear_attention_site import PATTERN, Roles, Weights, build_site, einsum_sides, is_call
from fxfuse.passes.linear_attention_weights import (
    divided,
    dot_product,
    einsum_product,
    normaliser,
    peel_eps,
    read_scores,
    read_weights,
    reciprocal_of,
    row_sum_of,
)
from fxfuse.passes.site import Rejection, Site

aten = torch.ops.aten


def _reject(anchor: Node, why: str, variant: str = "quadratic form") -> Rejection:
    return Rejection(PATTERN, variant, anchor, why)


def _roles(ps: Product, pv: Product, weights_operand: str) -> Roles | str:
    """Name every axis: the score product ps = q k^T gives batch, n, m, d; the value product pv adds e."""
    w_labels, v_labels = (pv.a_labels, pv.b_labels) if weights_operand == "a" else (pv.b_labels, pv.a_labels)
    v_node = pv.b if weights_operand == "a" else pv.a
    contracted = [c for c in w_labels if c in v_labels and c not in pv.out_labels]
    if len(contracted) != 1:
        return "the value product is not W @ v over one key axis"
    key_axis = w_labels.index(contracted[0])
    if key_axis != len(w_labels) - 1:
        return "the value product contracts another axis than the scores' last (key) axis"
    m = ps.out_labels[key_axis]
    dims = [c for c in ps.a_labels if c in ps.b_labels and c not in ps.out_labels]
    if len(dims) != 1 or (m in ps.a_labels) == (m in ps.b_labels):
        return "the score product is not q @ k^T over one feature dim"
    (ql, qn), (kl, kn) = ((ps.a_labels, ps.a), (ps.b_labels, ps.b))[:: 1 if m in ps.b_labels else -1]
    ns = [c for c in ps.out_labels if c in ql and c not in kl and c != m]
    if len(ns) != 1:
        return "the score product has no single query axis"
    batch = "".join(c for c in ps.out_labels if c not in (m, ns[0]))
    if not batch or len(batch) > 2 or any(c not in ql or c not in kl for c in batch):
        return "q and k do not share the batch axes of the scores"
    if set(ql) - set(batch + ns[0] + dims[0]) or set(kl) - set(batch + m + dims[0]):
        return "q or k does not fit [batch, heads, N, D]"
    canon = dict(zip(batch, "bh"[2 - len(batch) :]), **{ns[0]: "n", m: "m", dims[0]: "d"})
    to_role = {w_labels[i]: canon[c] for i, c in enumerate(ps.out_labels)}
    extra = [c for c in v_labels if c not in to_role]
    if len(extra) != 1 or any(to_role.get(c) not in ("b", "h", "m") for c in v_labels if c != extra[0]):
        return "the value operand does not fit [batch, heads, M, E]"
    to_role[extra[0]] = "e"
    out_labels = "".join(to_role.get(c, "?") for c in pv.out_labels)
    batch_roles = "".join(canon[c] for c in batch)
    vl = "".join(to_role[c] for c in v_labels)
    if sorted(out_labels) != sorted(batch_roles + "ne") or "m" not in vl or any(c not in vl for c in batch_roles):
        return "the output is not [batch, heads, N, E]"
    sizes = {canon[c]: int(s) for c, s in zip(ps.out_labels, val(ps.node).shape)}
    sizes["d"] = int(val(qn).shape[ql.index(dims[0])])
    sizes["e"] = int(val(v_node).shape[v_labels.index(extra[0])])
    q = Operand(qn, "".join(canon[c] for c in ql))
    k = Operand(kn, "".join(canon[c] for c in kl))
    scores_labels = "".join(canon[c] for c in ps.out_labels)
    if not scores_labels.endswith("nm"):
        return "the scores are not laid out [batch, N, M]"
    return Roles(batch_roles, sizes, q, k, Operand(v_node, vl), out_labels, scores_labels)


def match_quadratic(node: Node, backend: str) -> Site | Rejection | None:
    # W @ v with W = (q @ k^T) [* constant mask or decay] [/ row-sum] -> linear_attention(q, k, v)
    pv = read_product(node)
    if pv is None or pv.bias is not None or pv.alpha != 1.0 or defers_to_buckets(node):
        return None
    for which, w_node in (("a", pv.a), ("b", pv.b)):
        found = normaliser(w_node)
        if isinstance(found, str):
            return _reject(node, found) if _reaches_scores(w_node) else None
        scores, normalize, eps = found
        where, terms, taylor = read_scores(scores)
        ps = _score_product(where)
        if ps is None or where is scores and normalize == "none" and not _looks_like_scores(ps, pv):
            continue
        if ps.bias is not None or ps.alpha != 1.0:
            return _reject(node, "a bias is added to the scores: not linearisable")
        if val(scores) is None or val(scores).shape != val(ps.node).shape:
            return _reject(node, "the scores change shape before the value product")
        roles = _roles(ps, pv, which)
        if isinstance(roles, str):
            continue
        weights = read_weights(terms, roles.scores_labels, roles.sizes.get("h", 1))
        if isinstance(weights, str):
            return _reject(node, weights)
        if taylor is not None:
            weights.squared, weights.taylor = taylor[0] == "square", taylor[1]
        output = node
        if normalize == "none":
            # (W @ v) / (W.sum(-1, keepdim=True) + eps): the same normaliser applied after the product
            after = _normalised_output(node, scores) if roles.out_labels.endswith("ne") else None
            if after is None and roles.out_labels.endswith("e"):
                after = _normalised_like_linear(node, roles, weights)
            if after is not None:
                output, normalize, eps = after
        weights.normalize, weights.eps = normalize, eps
        site = build_site(node, output, roles, weights, backend, "quadratic form O(N²d) → O(Nd²)")
        return _reject(node, site) if isinstance(site, str) else site
    return None


def _normalised_output(out: Node, scores: Node) -> tuple[Node, str, float] | None:
    """(the division, normalize, eps) when `out`'s only user divides it by a row sum of `scores`."""
    if len(out.users) != 1:
        return None
    user = next(iter(out.users))
    for x, den in divided(user):
        found = row_sum_of(den, scores) if x is out else None
        if isinstance(found, tuple):
            return user, *found
    return None


def _normalised_like_linear(out: Node, roles: Roles, w: Weights) -> tuple[Node, str, float] | None:
    """(the division, normalize, eps) when `out`'s only user divides it by q . sum(k) (+ eps), or by
    q . cumsum(k) when causal: the row sums of the unscaled, undecayed weights, written in the linear form
    (Based's and fast-transformers' causal numerators with their linear-form normaliser)."""
    if len(out.users) != 1 or w.scale != 1.0 or w.decay is not None or w.taylor is not None:
        return None
    user = next(iter(out.users))
    found = _linear_normaliser(user, roles, w.causal)
    return (user, *found[1:]) if found is not None and found[0] is out else None


def _looks_like_scores(ps: Product, pv: Product) -> bool:
    """A bare product of products (x @ A @ B) is linear attention only when q, k and v all carry the
    batch axes and a sequence axis: not a chain of weight matrices."""
    return all(val(t) is not None and val(t).dim() >= 3 for t in (ps.a, ps.b, pv.a, pv.b))


def _reaches_scores(w: Node) -> bool:
    return any(_score_product(read_scores(a)[0]) is not None for a in w.all_input_nodes)


def _score_product(where: Node) -> Product | None:
    return read_product(where) or einsum_product(where)


@dataclass
class KV:
    """q @ kv with kv = k^T v (non-causal) or kv = cumsum(k v^T outer products, seq_dim) (causal)."""

    p2: Product  # the product with q
    side: str  # which operand of p2 is kv: "a" | "b"
    p1: Product  # k with v
    seq_dim: int | None  # the cumsum axis of p1's output, None when p1 contracts the sequence
    scale: float = 1.0  # a number kv is multiplied by (FLASH divides k^T v by the sequence length)


def _kv_product(node: Node) -> KV | None:
    """`node` as q @ kv (see KV), or None."""
    p2 = read_product(node)
    if p2 is None or p2.bias is not None or p2.alpha != 1.0:
        return None
    for side, operand in (("b", p2.b), ("a", p2.a)):
        found = _kv_operand(p2, side, operand)
        if found is not None:
            return found
    return None


def _kv_operand(p2: Product, side: str, operand: Node) -> KV | None:
    seq_dim, scale = None, 1.0
    if is_call(operand, aten.mul.Tensor, aten.div.Tensor) and isinstance(operand.args[0], Node):
        number = operand.args[1]
        if isinstance(number, int | float) and not isinstance(number, bool) and number != 0:
            scale, operand = (1.0 / number if operand.target is aten.div.Tensor else float(number)), operand.args[0]
    if is_call(operand, aten.cumsum.default) and len(operand.users) == 1:
        seq_dim = operand.args[1] % val(operand).dim()
        operand = operand.args[0]
    p1 = read_product(operand)
    if p1 is not None and p1.bias is None and p1.alpha == 1.0 and len(operand.users) == 1:
        if all(val(t) is not None and val(t).dim() >= 3 for t in (p1.a, p1.b)):
            return KV(p2, side, p1, seq_dim, scale)
    return None


def _linear_roles(kv: KV) -> Roles | str:
    """Roles of q @ kv: p1 pairs k and v over the sequence axis m, p2 contracts the feature axis d."""
    p1, p2 = kv.p1, kv.p2
    (kl, kn), (vl, vn) = (p1.a_labels, p1.a), (p1.b_labels, p1.b)
    shared = [c for c in kl if c in vl and c not in p1.out_labels]
    if kv.seq_dim is None:
        seq = shared
    else:  # outer products k_m v_m^T, summed up to each m by the cumsum
        seq = [] if shared else [c for c in p1.out_labels[kv.seq_dim] if c in kl and c in vl]
    d_axis = [c for c in kl if c not in vl]
    e_axis = [c for c in vl if c not in kl]
    batch = [c for c in p1.out_labels if c in kl and c in vl and c not in seq]
    if len(seq) != 1 or len(d_axis) != 1 or len(e_axis) != 1 or not 1 <= len(batch) <= 2:
        return "k and v do not pair over one sequence axis of [batch, heads, M, D] and [batch, heads, M, E]"
    canon = dict(zip(batch, "bh"[2 - len(batch) :]), **{seq[0]: "m", d_axis[0]: "d", e_axis[0]: "e"})
    kv_labels, ql, qn = (p2.b_labels, p2.a_labels, p2.a) if kv.side == "b" else (p2.a_labels, p2.b_labels, p2.b)
    role = {c: canon[p1.out_labels[i]] for i, c in enumerate(kv_labels)}
    contracted = [c for c in ql if c in kv_labels and c not in p2.out_labels]
    if len(contracted) != 1 or role[contracted[0]] != "d":
        return "q @ kv does not contract the feature axis"
    if kv.seq_dim is None:
        n_axis = [c for c in ql if c not in kv_labels]
    else:  # row i reads the state summed up to i: q's sequence axis is kv's
        n_axis = [c for c in ql if role.get(c) == "m" and c in p2.out_labels]
        if len(ql) != len(kv_labels) - 1:
            return "q does not fit [batch, heads, N, D]"
    if len(n_axis) != 1 or any(role[c] not in ("b", "h", "d") for c in ql if c != n_axis[0]):
        return "q does not fit [batch, heads, N, D]"
    role[n_axis[0]] = "n"
    out_labels = "".join(role.get(c, "?") for c in p2.out_labels)
    batch_roles = "".join(canon[c] for c in batch)
    if sorted(out_labels) != sorted(batch_roles + "ne") or sorted(role[c] for c in ql) != sorted(batch_roles + "nd"):
        return "the output is not [batch, heads, N, E]"
    sizes = {canon[c]: int(n) for c, n in zip(kl, val(kn).shape)}
    sizes.update({canon[c]: int(n) for c, n in zip(vl, val(vn).shape)})
    sizes["n"] = int(val(qn).shape[ql.index(n_axis[0])])
    q = Operand(qn, "".join(role[c] for c in ql))
    k, v = Operand(kn, "".join(canon[c] for c in kl)), Operand(vn, "".join(canon[c] for c in vl))
    return Roles(batch_roles, sizes, q, k, v, out_labels, batch_roles + "nm")


def _linear_normaliser(node: Node, roles: Roles, causal: bool) -> tuple[Node, str, float] | None:
    """(numerator, normalize, eps) when `node` is num * (1 / (q . ksum + eps))[..., None] or
    num / (...)[..., None] (or the clamp(min=eps) of q . ksum), ksum = k summed over the sequence
    (non-causal) or its cumsum (causal)."""
    if not roles.out_labels.endswith("e"):
        return None
    readings = [(num, r.args[0]) for num, r in divided(node) if _last_axis_added(r)]
    if is_call(node, aten.mul.Tensor) and all(isinstance(a, Node) for a in node.args[:2]):
        # num * reciprocal(den)[..., None]: the reciprocal taken before the broadcast axis is added
        pairs = (node.args[:2], node.args[1::-1])
        readings += [(num, reciprocal_of(u.args[0])) for num, u in pairs
                     if _last_axis_added(u) and reciprocal_of(u.args[0]) is not None]  # fmt: skip
    kept = [(num, r, True) for num, r in divided(node) if not _last_axis_added(r)]  # (q * ksum).sum(-1, keepdim)
    for num, den, keepdim in [(num, den, False) for num, den in readings] + kept:
        found = _row_denominator(den, roles, causal, roles.out_labels[:-1], keepdim)
        if found is not None:
            return num, *found
    return None


def _last_axis_added(node: Node) -> bool:
    return is_call(node, aten.unsqueeze.default) and node.args[1] % val(node).dim() == val(node).dim() - 1


def _row_denominator(den: Node, roles: Roles, causal: bool, rows: str, kept: bool = False) -> tuple[str, float] | None:
    """(normalize, eps) when `den` is q . ksum + eps (either order) or (q . ksum).clamp(min=eps), its axes
    playing the roles `rows` (the output's without e), ksum = k summed over the sequence (non-causal)
    or its cumsum (causal); q . ksum may be (q * ksum).sum(-1), with keepdim exactly when `kept`."""
    peeled = peel_eps(den)
    if peeled is None:
        return None
    den, mode, eps = peeled
    pd, dot = read_product(den), dot_product(den)
    if pd is None and dot is not None and dot[1] == kept:
        pd = dot[0]
    elif kept:
        return None
    q, k = roles.q, roles.k
    if pd is None or q.node not in (pd.a, pd.b) or pd.a is pd.b:
        return None
    (ql, sl, ksum) = (pd.a_labels, pd.b_labels, pd.b) if pd.a is q.node else (pd.b_labels, pd.a_labels, pd.a)
    k_labels = k.labels
    if is_call(k.node, aten.transpose.int) and is_call(ksum, aten.sum.dim_IntList, aten.cumsum.default):
        if ksum.args[0] is k.node.args[0]:  # k^T @ v beside k.sum(seq): the sum reads k before the transpose
            i, j = (a % len(k_labels) for a in k.node.args[1:3])
            swapped = list(k_labels)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            k_labels = "".join(swapped)
    seq = k_labels.index("m")
    source = k.node if k_labels == k.labels else k.node.args[0]
    if causal:
        ok = is_call(ksum, aten.cumsum.default) and ksum.args[1] % val(ksum).dim() == seq
        ks_roles = k_labels.replace("m", "n")
    else:
        keep = len(ksum.args) > 2 and ksum.args[2]
        ok = is_call(ksum, aten.sum.dim_IntList) and not keep and [d % val(source).dim() for d in ksum.args[1]] == [seq]
        ks_roles = k_labels.replace("m", "")
    if not ok or ksum.args[0] is not source:
        return None
    if pd.a_labels == pd.b_labels and q.labels != ks_roles:
        return None  # an elementwise q * ksum pairs axes by position: they must play the same roles
    role = dict(zip(ql, q.labels)) | dict(zip(sl, ks_roles))
    contracted = [c for c in ql if c in sl and c not in pd.out_labels]
    if [role[c] for c in contracted] != ["d"] or "".join(role.get(c, "?") for c in pd.out_labels) != rows:
        return None  # q . ksum must contract d only and line up with the numerator's rows
    return mode, eps


def _three_way(node: Node) -> tuple[Node, KV, str] | None:
    """(z, the q @ kv reading, z's labels) when `node` is einsum("q,kv,z->out", q, kv, z) with z only
    scaling output rows (fast-transformers' `einsum("nlhd,nhmd,nlh->nlhm", Q, KV, Z)`)."""
    spelled = einsum_sides(node) if is_call(node, aten.einsum.default) and len(node.args[1]) == 3 else None
    if spelled is None:
        return None
    sides, out = spelled
    for i in range(3):
        zl, (la, lb) = sides[i], [sd for j, sd in enumerate(sides) if j != i]
        ops = [t for j, t in enumerate(node.args[1]) if j != i]
        if any(c not in out for c in zl) or any(c not in la + lb for c in out):
            continue  # z must only scale output rows
        if any(len(set(x)) != len(x) for x in (zl, la, lb, out)):
            continue  # a repeated label is a diagonal
        p2 = Product(node, ops[0], ops[1], la, lb, out)
        for side, operand in (("b", p2.b), ("a", p2.a)):
            found = _kv_operand(p2, side, operand)
            if found is not None:
                return node.args[1][i], found, zl
    return None


def match_already_linear(node: Node, backend: str) -> Site | Rejection | None:
    # q @ (k^T v) or q @ cumsum(k v^T) [/ (q . sum(k) + eps), / (q . cumsum(k) + eps)] -> linear_attention
    found, normalized = _kv_product(node), None
    three = _three_way(node) if found is None else None
    if three is not None:
        # einsum(q, kv, z) with z = 1 / (q . sum(k) + eps) on the rows: the normaliser inside the product
        z, found, z_labels = three
        roles = _linear_roles(found)
        if isinstance(roles, str) or reciprocal_of(z) is None or len(z.users) != 1 or found.scale != 1.0:
            return None  # (a scaled kv over an unscaled row sum is not the op's normaliser)
        causal = found.seq_dim is not None
        rows = "".join(roles.out_labels[found.p2.out_labels.index(c)] for c in z_labels)
        normalized = _row_denominator(reciprocal_of(z), roles, causal, rows)
        if normalized is None or "e" in rows or sorted(rows + "e") != sorted(roles.out_labels):
            return None
        normalized = (None, *normalized)
    elif found is not None:
        roles = _linear_roles(found)
        if isinstance(roles, str):
            return None
        causal = found.seq_dim is not None
        normaliser = _linear_normaliser(next(iter(node.users)), roles, causal) if len(node.users) == 1 else None
        if normaliser is not None and found.scale == 1.0:
            return None  # the normaliser after it anchors the site
    else:
        args = [a for a in node.args if isinstance(a, Node) and len(a.users) == 1]
        hits = [(a, hit) for a in args if (hit := _kv_product(a)) is not None]
        if len(hits) != 1:
            return None
        numerator, found = hits[0]
        roles = _linear_roles(found)
        if isinstance(roles, str):
            return None
        causal = found.seq_dim is not None
        normalized = _linear_normaliser(node, roles, causal)
        if normalized is None or normalized[0] is not numerator or found.scale != 1.0:
            return None
    w = Weights(scale=found.scale, causal=causal)
    if normalized is not None:
        w.normalize, w.eps = normalized[1:]
    variant = "cumsum of k vᵀ: [N, d, e] per head never built" if causal else "already linear q(kᵀv)"
    site = build_site(node, node, roles, w, backend, variant)
    return _reject(node, site, variant) if isinstance(site, str) else site


RULES = (match_quadratic, match_already_linear, match_buckets)


def find_linear_attention(gm: GraphModule, backend: str = "auto") -> list[Site | Rejection]:
    """Every linear-attention site in `gm` (canonicalized ATen graph): a Site, or why it was left alone."""
    results: list[Site | Rejection] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or val(node) is None:
            continue
        for rule in RULES:
            try:
                hit = rule(node, backend)
            except Exception as exc:  # one odd site must not cost the model its other sites
                hit = _reject(node, f"matcher error ({type(exc).__name__}: {exc})")
            if hit is not None:
                results.append(hit)
                break
    from fxfuse.passes.linear_attention_chunks import with_chunk_loops  # imports this module: a late import

    return with_chunk_loops(gm, backend, results)  # loops over chunks: one site each, their products inside
