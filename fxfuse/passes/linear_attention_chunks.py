"""Causal linear attention written as a Python loop over chunks, unrolled by capture, re-rolled into one op.

Research code spells chunkwise linear attention / retention as (chunk c = rows s .. s + C of q, k, v):
    out_c = (q_c k_cᵀ ⊙ D) v_c + (q_c S) ⊙ ξ          S <- δ S + kᵀ_c (v_c ⊙ ζ)        -> cat(out_c, seq)
and, normalised, out_c = (...) / ((q_c k_cᵀ ⊙ D).sum(-1) + q_c z + eps) with z <- δ z + Σ_rows k_c ⊙ ζ.
D is the constant causal mask (tril, or gamma^(i - j) on and below the diagonal); without decay ξ, δ, ζ
are absent, with decay they are the constants gamma^(r + 1), gamma^C and gamma^(C - 1 - r) that make the
loop equal to causal linear attention with decay gamma over the whole sequence. The rules:
- the anchor concatenates >= 3 per-chunk outputs along the sequence axis;
- every chunk is read on its own (`passes/linear_attention_chunk.py`): the intra-chunk quadratic product
  (the linear-attention family's score reading: scale, causal mask, decay), the inter-chunk product with
  the state it reads, the normaliser; q, k, v are consecutive slices of the same three tensors;
- chunk 0 reads a zero state (or none), chunk i the state chunk i - 1 handed on: its own plus kᵀv of its
  keys and values (a running key sum for the normaliser);
- the chunk bodies between the first and the last are structurally isomorphic up to the chunk index
  (`passes/reroll.py`'s template); the last chunk may be shorter;
- decay factors are proven by evaluating the constants against the intra mask's gammas;
- the state the loop ends with, when read after it, becomes a second output computed from k and v.
Left alone, with the reason: a state update that is not kᵀv of the chunk, a non-causal intra mask, a state
reset or not carried, bodies that differ, a state read mid-loop, factors that do not match.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Graph, GraphModule, Node

from fxfuse.passes.attention_layout import Operand, val
from fxfuse.passes.linear_attention_chunk import (
    VIEWS,
    Chunk,
    final_update,
    is_zero_state,
    known_value,
    read_chunk,
    read_update,
)
from fxfuse.passes.linear_attention_site import PATTERN, Roles, Weights, build_site
from fxfuse.passes.reroll import NotALoop, _check_step, _template, chained, per_step_outputs
from fxfuse.passes.site import Rejection, Site

aten = torch.ops.aten
_RTOL = 1e-5  # decay factors built in float32 differ from gamma^p by rounding only


def _expected(gamma: torch.Tensor, node: Node, roles: str, axis: str | None, power) -> torch.Tensor:
    """gamma_h^power(position along `axis`) laid out on `node`'s axes (roles, e.g. "bhnd")."""
    shape = [1] * len(roles)
    if "h" in roles and gamma.numel() > 1:
        shape[roles.index("h")] = gamma.numel()
    g = gamma.view(shape)
    if axis is None:
        return g**power
    n = val(node).shape[roles.index(axis)]
    pos_shape = [1] * len(roles)
    pos_shape[roles.index(axis)] = n
    return g ** power(torch.arange(n, dtype=torch.float64).view(pos_shape), n)


def _factor_holds(factor: Node, node: Node, want: torch.Tensor) -> bool:
    """Whether the constant `factor` multiplying `node` is `want` wherever it meets `node`."""
    value = known_value(factor)[0].double()
    target = tuple(val(node).shape)
    try:
        got, exp = torch.broadcast_to(value, target), torch.broadcast_to(want, target)
    except RuntimeError:
        return False
    return bool(torch.isclose(got, exp, rtol=_RTOL, atol=1e-30).all())


def _check_decay(chunks: list[Chunk], updates: list[dict], gamma: torch.Tensor | None) -> str | None:
    """Every decay factor is what causal decay gamma over the whole sequence needs, and none is missing:
    ξ = gamma^(r + 1) on the inter rows, δ = gamma^C on the carried state, ζ = gamma^(C - 1 - r) on the
    rows added to it (chunk i's factors and those of the update that adds chunk i)."""
    rows = {"ξ": ("n", lambda r, n: r + 1), "ζ": ("m", lambda r, n: n - 1 - r), "δ": (None, None)}
    normalised = chunks[0].norm_in is not None
    for i, chunk in enumerate(chunks):
        found = dict(chunk.factors) | (updates[i + 1] if i + 1 < len(updates) else {})
        if gamma is None:
            if found:
                return f"chunk {i} multiplies by a decay factor ({next(iter(found))}) but its scores have no decay"
            continue
        needed = {"ξ", "δ", "ζ"} if i + 1 < len(updates) else {"ξ"}
        if chunk.state_in is None:  # the first chunk of a loop starting from None: no inter term, nothing carried
            needed -= {"ξ", "δ"}
        if normalised:  # the key sum too, but for the final state (only S is returned)
            needed |= {"ξ of the normaliser"} if "ξ" in needed else set()
            needed |= {f"{n} of the key sum" for n in needed & {"δ", "ζ"}} if i + 1 < len(chunks) else set()
        missing = needed - set(found)
        if missing:
            return f"chunk {i} has a decay on its scores but no {sorted(missing)[0]} factor"
        for name, (factor, node, roles) in found.items():
            axis, power = rows[name[0]]
            if gamma.numel() > 1 and "h" not in roles:
                return f"chunk {i}'s decay factor {name} does not run along the heads as the decay does"
            want = _expected(gamma, node, roles, axis, power or chunk.length)
            if not _factor_holds(factor, node, want):
                return f"chunk {i}'s decay factor {name} is not what decay {gamma.tolist()} over the sequence needs"
    return None


def _ancestors(roots: list[Node], stop: set[Node]) -> set[Node]:
    seen, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n not in seen and n not in stop:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _bodies(chunks: list[Chunk], final: Node | None) -> list[list[Node]]:
    """Chunk i's nodes: what its output and the states it hands on need that no earlier chunk computed."""
    order = {n: j for j, n in enumerate(chunks[0].output.graph.nodes)}
    seen: set[Node] = set()
    bodies = []
    for i, chunk in enumerate(chunks):
        nxt = chunks[i + 1] if i + 1 < len(chunks) else None
        hands_on = [final] if nxt is None else [nxt.state_in, nxt.norm_in]
        roots = [chunk.output] + [n for n in hands_on if n is not None]
        body = _ancestors(roots, seen)
        seen |= body
        bodies.append(sorted(body, key=order.__getitem__))
    return bodies


def _isomorphic(bodies: list[list[Node]], full: int) -> None:
    """NotALoop unless the full-size chunk bodies 1 .. full - 1 are one template up to the chunk index."""
    same = bodies[1:full]
    if len(same) < 2:  # fewer than two chunks between the first and the last: nothing to compare
        return
    if any(len(b) != len(same[0]) for b in same):
        raise NotALoop("the chunk bodies differ in size")
    slots = _template(bodies)
    for step in range(3, full):
        _check_step(slots, bodies[step], bodies[step - 1], bodies[1], step)


def _covered(outputs: list[Node]) -> set[Node]:
    """The loop's own nodes (as far as its products go): what the chunk outputs need short of what both the
    first and the last need (the model before the loop); two walks whatever the number of chunks."""
    before = _ancestors([outputs[0]], set()) & _ancestors([outputs[-1]], set())
    return _ancestors(outputs, before)


def _signature(c: Chunk) -> tuple:
    """What every chunk must share: sources, scale, decay, normaliser, layouts."""
    labels = tuple(o.labels for o in (c.roles.q, c.roles.k, c.roles.v))
    return c.sources, c.scale, c.weights.decay, c.eps, c.norm_in is None, c.state_roles, labels, c.roles.out_labels


def analyze(anchor: Node, chunks: list[Chunk]) -> tuple[Chunk, Weights, list[list[Node]], Node | None] | str:
    """The causal linear attention the loop computes (as chunk 0's roles over the whole sequence), or why not."""
    first = chunks[0]
    if first.state_in is None:  # no inter term to read the state's layout from: chunk 1's
        first.state_roles = chunks[1].state_roles
    for i, c in enumerate(chunks[1:], 1):
        if c.length == 1 and c.weights.decay is None:
            c.weights.decay = first.weights.decay  # gamma^0: a one-row chunk's decay matrix is [[1]]
        if _signature(c) != _signature(first):
            return f"chunk {i} differs from chunk 0 (sources, scale, decay, normaliser or layout)"
    size = first.length
    n = val(first.sources[0]).shape[first.span[0]]
    spans = [c.span[1:] for c in chunks]
    if spans[0][0] != 0 or spans[-1][1] != n or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        return "the chunks do not cover the sequence in order"
    if any(c.length != size for c in chunks[:-1]) or chunks[-1].length > size:
        return "the chunks are not all of one size (but the last)"
    rank = len(first.roles.out_labels)
    dim = per_step_outputs(anchor)[1] % (rank + (anchor.target is aten.stack.default))
    if first.roles.out_labels[dim] != "n":
        return "the chunk outputs are not concatenated along the sequence axis"
    if any(s is not None and not is_zero_state(s) for s in (first.state_in, first.norm_in)):
        return "the loop starts from a state that is not zero"
    if any(c.state_in is None for c in chunks[1:]):
        return "a chunk after the first has no inter-chunk term: the chunks are not chained by a state"
    updates = [{}]
    for i in range(1, len(chunks)):
        factors = {}
        for key_sum in (False, True) if first.norm_in is not None else (False,):
            found = read_update(chunks[i].norm_in if key_sum else chunks[i].state_in, chunks[i - 1], key_sum)
            if isinstance(found, str):
                return f"chunk {i}: {found}"
            factors |= found[1]
        updates.append(factors)
    final = final_update(chunks[-1])
    if final is not None:
        updates.append(final[1])
        final = final[0]
    gamma = None if first.weights.decay is None else torch.tensor(first.weights.decay, dtype=torch.float64)
    problem = _check_decay(chunks, updates, gamma)
    if problem is not None:
        return problem
    bodies = _bodies(chunks, final)
    try:
        _isomorphic(bodies, len(chunks) - 1)  # the last chunk hands on no state (and may be shorter)
    except NotALoop as exc:
        return str(exc)
    inside = {n for body in bodies for n in body} | {anchor}
    for body in bodies[1:]:
        for node in body:
            outside = [u for u in node.users if u not in inside]
            if outside and node is not final:
                return (f"{outside[0].name} after the loop reads {node.name} (the final state?): "
                        "only the state the loop ends with can be returned")
    w = Weights(scale=first.scale, causal=True, decay=first.weights.decay)
    if first.norm_in is not None:
        w.normalize, w.eps = "eps", first.eps
    inputs = set(first.sources)
    for i, c in enumerate(chunks):
        for node, value in c.weights.constants.items():
            w.constants.setdefault(node, value)
        # masks read from buffers: folded here, so the compiled graph guards them per call
        w.buffers.extend(b for b in c.weights.buffers if b not in w.buffers)
        factor_nodes = [f[0] for f in c.factors.values()] + [f[0] for f in updates[i].values()]
        factor_nodes += [f[0] for f in updates[-1].values()] if final is not None and i + 1 == len(chunks) else []
        # a zero state made from q (q.new_zeros) stays in the region: as an input it would look differentiated
        zeros = [n for n in (c.state_in, c.norm_in) if n is not None and not all(
            a in inputs or a.target in VIEWS and a.args[0] in inputs for a in n.all_input_nodes)]  # fmt: skip
        for node in factor_nodes + (zeros if i == 0 else []):
            if node not in inputs:
                value, buffers = known_value(node)
                w.buffers.extend(b for b in buffers if b not in w.buffers)  # guarded per call, as masks are
                w.constants.setdefault(node, torch.zeros(val(node).shape, dtype=val(node).dtype)
                                       if value is None else value)  # fmt: skip
    return first, w, bodies, final


def match_chunk_loop(anchor: Node, backend: str) -> Site | Rejection | None:
    # cat([(q_c k_cᵀ ⊙ D) v_c + q_c S ...], seq) with S <- S + k_cᵀ v_c -> linear_attention(q, k, v, causal)
    parsed = per_step_outputs(anchor)
    output = anchor if anchor.target is aten.cat.default else _merged_stack(anchor)
    if parsed is None or output is None:
        return None
    chunks = [read_chunk(o) for o in parsed[0]]
    if all(c is None for c in chunks):
        return None
    reads_state = any(isinstance(c, Chunk) and c.state_in is not None for c in chunks[1:])
    if not reads_state and not chained(parsed[0]):
        return None  # attention computed independently in each piece (branches, heads): not a loop
    n, variant = len(chunks), f"chunk loop ({len(chunks)} chunks)"
    bad = next((i for i, c in enumerate(chunks) if not isinstance(c, Chunk)), None)
    if bad is not None:
        why = chunks[bad] or "its output is not intra-chunk + inter-chunk attention"
        return Rejection(PATTERN, variant, anchor, f"chunk {bad}: {why}")
    found = analyze(anchor, chunks)
    if isinstance(found, str):
        return Rejection(PATTERN, variant, anchor, found)
    first, w, _, final = found
    size, last = first.length, chunks[-1].length
    variant = f"chunk loop ({n} chunks of {size}" + (f", last {last})" if last != size else ")") + " → 1 op"
    whole = val(first.sources[0]).shape[first.span[0]]
    sizes = dict(first.roles.sizes, n=whole, m=whole)
    roles = Roles(first.roles.batch, sizes, *(Operand(src, op.labels) for src, op in
                  zip(first.sources, (first.roles.q, first.roles.k, first.roles.v))),
                  first.roles.out_labels, first.roles.scores_labels)  # fmt: skip
    site = build_site(anchor, output, roles, w, backend, variant + (", final state" if final is not None else ""))
    if isinstance(site, Site) and final is not None:
        site = _with_final_state(site, first, final, _ancestors([final], set(site.inputs)))
    return Rejection(PATTERN, variant, anchor, site) if isinstance(site, str) else site


def _merged_stack(anchor: Node) -> Node | None:
    """The reshape that merges a stack's new axis s with axis s + 1 (chunks stacked, then rows merged), the
    same as concatenating along s; None when the stack is not followed by one."""
    if anchor.target is not aten.stack.default or len(anchor.users) != 1:
        return None
    (merge,) = anchor.users
    stacked = tuple(val(anchor).shape)
    dim = (anchor.args[1] if len(anchor.args) > 1 else anchor.kwargs.get("dim", 0)) % len(stacked)
    want = stacked[:dim] + (stacked[dim] * stacked[dim + 1],) + stacked[dim + 2 :] if dim + 1 < len(stacked) else None
    ok = merge.op == "call_function" and merge.target in VIEWS
    return merge if ok and want is not None and tuple(val(merge).shape) == want else None


def _with_final_state(site: Site, first: Chunk, final: Node, own: set[Node]) -> Site | str:
    """`site` that also returns the final state S = Σ_m gamma^(N - 1 - m) k_mᵀ v_m, computed from k and v."""
    ks, vs = first.sources[1:]
    decay = first.weights.decay
    if ks not in site.inputs or vs not in site.inputs:
        return "the final state is read after the loop and k or v reach the fused op re-laid out"
    if decay is not None and min(decay) <= 0:
        return "the final state is read after the loop and a decay factor is 0"
    ik, iv, base = site.inputs.index(ks), site.inputs.index(vs), site.emit
    kl, vl, n = first.roles.k.labels, first.roles.v.labels, val(ks).shape[first.roles.k.labels.index("m")]
    equation, dtype = f"{kl},{vl}->{first.state_roles}", val(final).dtype

    def emit(graph: Graph, nodes: list[Node]) -> list[Node]:
        v = nodes[iv]
        if decay is not None:  # row m of v weighted by gamma_h^(N - 1 - m), as exp((N - 1 - m) log gamma_h)
            device = val(vs).device
            logs = [graph.call_function(aten.full.default, ([1], math.log(g)), {"device": device}) for g in decay]
            log_gamma = logs[0] if len(logs) == 1 else graph.call_function(aten.cat.default, (logs,))
            rows = graph.call_function(aten.arange.start_step, (n - 1, -1, -1), {"dtype": torch.float32,
                                                                                   "device": device})  # fmt: skip
            per_head = [len(decay) if r == "h" and len(decay) > 1 else 1 for r in vl]
            per_row = [n if r == "m" else 1 for r in vl]
            weight = graph.call_function(aten.exp.default, (graph.call_function(aten.mul.Tensor, (
                graph.call_function(aten.view.default, (log_gamma, per_head)),
                graph.call_function(aten.view.default, (rows, per_row)))),))  # fmt: skip
            if val(vs).dtype != torch.float32:
                weight = graph.call_function(aten._to_copy.default, (weight,), {"dtype": val(vs).dtype})
            v = graph.call_function(aten.mul.Tensor, (v, weight))
        state = graph.call_function(aten.einsum.default, (equation, [nodes[ik], v]))
        if dtype != val(vs).dtype:
            state = graph.call_function(aten._to_copy.default, (state,), {"dtype": dtype})
        return [base(graph, nodes), state]

    site.emit, site.extra_outputs = emit, [final]
    site.extra_region = [n for n in own if n.op == "call_function"]
    return site


def with_chunk_loops(gm: GraphModule, backend: str, found: list[Site | Rejection]) -> list[Site | Rejection]:
    """`found` (the per-node rules' sites) with every chunk loop first, as one site or one rejection: the
    per-chunk products inside it are not reported on their own."""
    loops, inside = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or val(node) is None:
            continue
        try:
            hit = match_chunk_loop(node, backend)
        except Exception as exc:  # one odd loop must not cost the model its other sites
            hit = Rejection(PATTERN, "chunk loop", node, f"matcher error ({type(exc).__name__}: {exc})")
        if hit is not None:
            loops.append(hit)
            inside |= _covered(per_step_outputs(node)[0])
    return loops + [r for r in found if r.anchor not in inside]
