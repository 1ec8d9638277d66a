"""SSM scans: an unrolled selective-scan loop re-rolled into one `fxfuse::selective_scan`.

The rule, on one screen:
- re-roll (`passes/reroll.py`): the per-step outputs stacked along time come from L isomorphic step bodies
  chained through one carried state h;
- the step: h_t = a_t * h_{t-1} + b_t (either operand order), the readout y_t = Σ_n h_t C_t spelled as an
  einsum, a matmul with C_t[..., None], or (h_t * C_t).sum(n), casts and size-1 views around it;
- the factors (`passes/ssm_labels.py`): a_t = exp(Δ ⊗ A), b_t = (Δ·u) ⊗ B_t, with Δ, u over (batch,
  channel, time), A over (channel, state), B and C over (batch, time, state) — whether they are multiplied
  into [B, D, L, N] before the loop or per step inside it. The fused op reads the leaves, so [B, D, L, N] is
  never materialized;
- the initial state is zeros or an input; the final state, when something after the loop reads it, is
  the op's second output;
- after the loop, the Mamba block's D skip y + u * D (D per channel) and silu(z) gate (F.silu or
  z * sigmoid(z)), when they are the stacked readout's only use, move into the op (`skip_and_gate`);
- a decay computed before the loop (an LTI recurrence: LRU, S4D) goes to `passes/ssm_lti.py` instead, a
  complex state (torch complex tensors, or two carried real tensors updated as a complex multiply) to
  `passes/ssm_complex.py`.
Left alone, with the reason in the report: nonlinear cells (tanh, sigmoid), bodies that differ across
steps, dependence on two previous steps, several carried values, per-step inputs computed inside the loop,
decays that are not exp of a (channel, state) × (batch, channel, time) product, and states read mid-loop.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from fxfuse.passes.reroll import Loop, NotALoop, find_loop, per_step_outputs
from fxfuse.passes.rewrite import region_of
from fxfuse.passes.site import Rejection, Site
from fxfuse.passes.ssm_complex import complex_state, match_complex, match_split
from fxfuse.passes.ssm_labels import (
    PASS_THROUGH,
    NotAScan,
    Product,
    factors,
    input_labels,
    output_labels,
    shape,
    strip_moves,
)
from fxfuse.passes.ssm_lti import analyze_lti, decay, site_parts
from fxfuse.passes.ssm_near import loop_reason, near_miss_rejections
from fxfuse.passes.ssm_states import match_stacked_states, states_stacked
from fxfuse.passes.ssm_tail import Tail, skip_and_gate
from fxfuse.passes.verify import random_like

aten = torch.ops.aten
SCAN_TOLERANCE = 1e-4  # a scan reassociates L products and sums
_ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
_OP_LAYOUTS = (("dt", "bdl"), ("A", "dn"), ("x", "bdl"), ("B", "bln"), ("C", "bln"))  # the op's arguments
_ALLOWED = {"dt": {"b", "d", "l"}, "A": {"d", "n"}, "x": {"b", "d", "l"}, "B": {"b", "l", "n"}, "C": {"b", "l", "n"}}


def _time_index(loop: Loop):
    """time_index(node) for the step-1 template: (tensor, dim) when node takes step t of a loop invariant."""
    template = loop.bodies[1]
    pos = {n: k for k, n in enumerate(template)}
    paths: dict[Node, set] = {}
    for k, path in loop.time_args:
        paths.setdefault(template[k], set()).add(path)

    def time_index(node: Node) -> tuple[Node, int] | None:
        if node not in paths:
            return None
        found = paths[node]
        for path in found:
            stride, at_one = loop.slots[pos[node], path].value
            if stride != 1:
                raise NotAScan(f"{node.name} walks time with stride {stride} (only t = 0, 1, 2, ... is fused)")
            if at_one != (2 if path == (3,) else 1):
                raise NotAScan(f"{node.name} reads step {at_one} at step 1 (an offset or reversed time)")
        if loop.slots[pos[node], (0,)].kind != "inv":
            raise NotAScan(f"{node.name} indexes time in a tensor computed inside the loop")
        src = node.args[0]
        rank = len(shape(src))
        if node.target is aten.select.int and found == {(2,)}:
            dim = node.args[1] % rank
        elif node.target is aten.slice.Tensor and found == {(2,), (3,)} and (len(node.args) < 5 or node.args[4] == 1):
            dim = node.args[1] % rank
        else:
            raise NotAScan(f"{node.name} ({node.target}) uses the time index in a way the scan does not read")
        if shape(src)[dim] != loop.length:
            raise NotAScan(f"{src.name} has {shape(src)[dim]} steps along dim {dim}, the loop runs {loop.length}")
        return src, dim

    return time_index


def _state_update(h: Node, h_prev: Node) -> tuple[Node, Node]:
    """h = a * h_prev + b (any operand order) -> (a, b)."""
    if h.target is not aten.add.Tensor or len(h.args) != 2 or h.kwargs.get("alpha", 1) != 1:
        raise NotAScan(f"the state update {h.name} ({h.target}) is not a * h + b (a nonlinear cell?)")
    for prod, b in (h.args, h.args[::-1]):
        if isinstance(prod, Node) and prod.target is aten.mul.Tensor and isinstance(b, Node):
            for a, hp in (prod.args, prod.args[::-1]):
                if hp is h_prev and isinstance(a, Node):
                    return a, b
                if hp is h_prev:
                    raise NotAScan(f"the decay is the constant {a} (an LTI recurrence), not exp(Δ ⊗ A)")
    raise NotAScan(f"the state update {h.name} is not a * h + b with h the previous state")


def _readout(out: Node, h: Node, time_index) -> tuple[str, str, Node, tuple, tuple]:
    """The per-step output as a contraction of h over one axis: (kind, contracted label, partner C_t,
    C_t's labels, the output's labels), in h's provisional labels ("s0", "s1", "s2")."""
    h_labels = tuple(f"s{j}" for j in range(len(shape(h))))
    chain, node = [], out
    while node is not h and _moves_only(node):
        chain.append(node)
        node = node.args[0]
    is_h = lambda n: _through_casts(n) is h  # noqa: E731  (a view would move the axes)
    t = node.target
    if t is aten.einsum.default and len(node.args[1]) == 2:
        operands, output = node.args[0].replace(" ", "").split("->")
        letters = operands.split(",")
        side = 0 if is_h(node.args[1][0]) else 1 if is_h(node.args[1][1]) else None
        if side is None or len(letters[side]) != 3:
            raise NotAScan(f"the readout einsum '{node.args[0]}' does not read the state")
        name = dict(zip(letters[side], h_labels))
        summed = [c for c in letters[side] if c not in output]
        other = letters[1 - side]
        if len(summed) != 1 or any(c not in name for c in other + output):
            raise NotAScan(f"the readout einsum '{node.args[0]}' is not a sum over one state axis")
        kind, contracted = "einsum", name[summed[0]]
        partner, partner_labels = node.args[1][1 - side], tuple(name[c] for c in other)
        labels = tuple(name[c] for c in output)
    elif t is aten.matmul.default and is_h(node.args[0]):
        partner = node.args[1]
        if len(shape(partner)) != 3 or shape(partner)[2] != 1:
            raise NotAScan("the readout matmul is not h @ C_t[..., None]")
        kind, contracted = "matmul", "s2"
        partner_labels = (None if shape(partner)[0] == 1 else "s0", "s2", None)
        labels = ("s0", "s1", None)
    elif t is aten.sum.dim_IntList and node.args[0].target is aten.mul.Tensor and len(node.args[1]) == 1:
        prod = node.args[0]
        if shape(prod) != shape(h):
            raise NotAScan("the readout product broadcasts the state to another shape")
        side = 0 if is_h(prod.args[0]) else 1 if is_h(prod.args[1]) else None
        if side is None or not isinstance(prod.args[1 - side], Node):
            raise NotAScan("the readout sum does not multiply the state by a tensor")
        d = node.args[1][0] % 3
        kind, contracted = "sum", h_labels[d]
        partner = prod.args[1 - side]
        aligned = h_labels[len(h_labels) - len(shape(partner)) :]
        partner_labels = tuple(None if s == 1 else lab for s, lab in zip(shape(partner), aligned))
        keep = len(node.args) > 2 and node.args[2]
        labels = tuple(None if j == d else lab for j, lab in enumerate(h_labels) if keep or j != d)
    else:
        raise NotAScan(f"the per-step output is not a readout of the state (found {t})")
    for step in reversed(chain):
        labels = output_labels(step, labels)
        if labels is None:
            raise NotAScan(f"the readout passes through {step.target}")
    return kind, contracted, partner, partner_labels, labels


def _through_casts(node: object) -> object:
    """The tensor behind dtype casts and copies (the fp32 state cast back before the readout)."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in PASS_THROUGH:
        node = node.args[0]
    return node


def _moves_only(node: Node) -> bool:
    """Whether `node` only moves axes or casts (a step of the readout's way to the stacked output)."""
    return (
        node.op == "call_function"
        and isinstance(node.args[0] if node.args else None, Node)
        and (input_labels(node, tuple([None] * len(shape(node))), lambda _: None) is not None)
    )


def _classify(parts: dict[str, Product], state_axes: tuple[str, str], contracted: str) -> dict[str, str]:
    """Name the provisional axes: the contracted one is "n", the channel "d" is the one the decay's
    state-wide factor A carries (or that B and C lack), the other is the batch "b"."""
    on_a = {lab for _, labs in parts["A"].leaves for lab in labs if lab in state_axes}
    on_bc = {lab for p in ("B", "C") for _, labs in parts[p].leaves for lab in labs if lab in state_axes}
    candidates = [s for s in state_axes if s in on_a] or [s for s in state_axes if s not in on_bc]
    if len(candidates) != 1:
        raise NotAScan("cannot tell the channel axis from the batch axis (A, B and C share them)")
    channel = candidates[0]
    batch = next(s for s in state_axes if s != channel)
    return {contracted: "n", channel: "d", batch: "b", "l": "l"}


def _split(product: Product, contracted: str) -> tuple[Product, Product]:
    with_n = Product([leaf for leaf in product.leaves if contracted in leaf[1]])
    without = Product([leaf for leaf in product.leaves if contracted not in leaf[1]], product.const)
    return without, with_n


def analyze(loop: Loop) -> dict:
    """The selective scan a loop computes, or NotAScan."""
    template = loop.bodies[1]
    h, h_prev = template[loop.carried], loop.bodies[0][loop.carried]
    if len(shape(h)) != 3:
        raise NotAScan(f"the state has rank {len(shape(h))}; [batch, channel, state] is fused")
    time_index = _time_index(loop)
    body = set(template)
    stop = lambda n: n is h_prev  # noqa: E731
    a, b = _state_update(h, h_prev)
    kind, contracted, partner, c_labels, out_labels = _readout(loop.outputs[1], h, time_index)
    h_labels = ("s0", "s1", "s2")
    exp_node, exp_labels = strip_moves(a, h_labels, time_index)
    if exp_node.target is not aten.exp.default:
        raise NotAScan(f"the decay is {exp_node.target}, not exp(Δ ⊗ A) (an LTI or gated recurrence)")
    dt, A = _split(factors(exp_node.args[0], exp_labels, time_index, stop), contracted)
    x, B = _split(factors(b, h_labels, time_index, stop), contracted)
    C = factors(partner, c_labels, time_index, stop)
    parts = {"dt": dt, "A": A, "x": x, "B": B, "C": C}
    for name, part in parts.items():
        for leaf, _ in part.leaves:
            if leaf is h_prev:
                raise NotAScan(f"the state enters the {name} factor (a nonlinear recurrence)")
            if leaf in body:
                raise NotAScan(f"a per-step input ({leaf.name}, {leaf.target}) is computed inside the loop")
    names = _classify(parts, tuple(s for s in h_labels if s != contracted), contracted)
    _rename_axes(parts, names)
    sizes = dict(zip([names[s] for s in h_labels], shape(h)), l=loop.length)
    out_labels = tuple(None if lab is None else names[lab] for lab in out_labels)
    _, dim = per_step_outputs(loop.anchor)
    rank = len(out_labels) + (loop.anchor.target is aten.stack.default)
    dim %= rank
    if loop.anchor.target is aten.stack.default:
        stacked = out_labels[:dim] + ("l",) + out_labels[dim:]
    elif out_labels[dim] is None:
        stacked = out_labels[:dim] + ("l",) + out_labels[dim + 1 :]
    else:
        raise NotAScan("the per-step outputs are concatenated along an axis they span")
    init = None if loop.init.target in _ZEROS else loop.init
    if init is not None and shape(init) != shape(h):
        raise NotAScan("the initial state does not have the state's shape")
    return {"parts": parts, "sizes": sizes, "stacked": stacked, "kind": kind, "init": init,
            "state_labels": tuple(names[s] for s in h_labels), "time_dim": dim}  # fmt: skip


def _call(graph: Graph, target, *args) -> Node:
    return graph.call_function(target, args)


def _arrange(graph: Graph, env: dict, part: Product, axes: str, sizes: dict) -> Node:
    """The product of a part's leaves as one float32 tensor with dims `axes` (e.g. "bdl"), expanded."""
    out = None
    for leaf, labels in part.leaves:
        x = env[leaf]
        if shape(leaf) and leaf.meta["val"].dtype not in (torch.float32, torch.float64):
            x = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
        kept = [lab for lab in labels if lab is not None]
        if len(kept) != len(labels):
            x = _call(graph, aten.reshape.default, x, [s for s, lab in zip(shape(leaf), labels) if lab is not None])
        order = sorted(range(len(kept)), key=lambda j: axes.index(kept[j]))
        if order != list(range(len(kept))):
            x = _call(graph, aten.permute.default, x, order)
        x = _call(graph, aten.reshape.default, x, [sizes[a] if a in kept else 1 for a in axes])
        out = x if out is None else _call(graph, aten.mul.Tensor, out, x)
    full = [sizes[a] for a in axes]
    if out is None:
        return _call(graph, aten.full.default, full, float(part.const))
    if part.const != 1.0:
        out = _call(graph, aten.mul.Tensor, out, part.const)
    return _call(graph, aten.expand.default, out, full)


def _to_layout(graph: Graph, x: Node, have: str, want: tuple, out_shape: tuple, dtype, x_dtype) -> Node:
    """x with dims `have` (e.g. "bdl") -> the labels `want` (None = size 1) and the original's shape."""
    order = [have.index(lab) for lab in want if lab is not None]
    if order != list(range(len(have))):
        x = _call(graph, aten.permute.default, x, order)
    x = _call(graph, aten.reshape.default, x, list(out_shape))
    if dtype != x_dtype:
        x = graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})
    return x


def _input_gen(inputs: list[Node], parts: dict[str, Product]):
    """Verification inputs that keep the decay exp(Δ·A) <= 1, as trained models do (softplus Δ, A < 0):
    a random exponent would overflow the original and compare inf with inf."""
    sign = -1.0 if parts["dt"].const * parts["A"].const < 0 else 1.0
    role = {leaf: "positive" for leaf, _ in parts["dt"].leaves + parts["A"].leaves[1:]}
    if parts["A"].leaves:
        role[parts["A"].leaves[0][0]] = "negative" if sign > 0 else "positive"

    def gen(index: int, val: torch.Tensor, case: str, seed: int) -> torch.Tensor | None:
        if index >= len(inputs) or inputs[index] not in role:
            return None
        x = random_like(val, "normal", seed + 97 * index).abs()
        return x if role[inputs[index]] == "positive" else -x

    return gen


def match_selective_scan(anchor: Node, backend: str) -> Site | Rejection | None:
    """stack([readout(h_t, C_t) for t], dim) of an unrolled h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t ->
    fxfuse::selective_scan over Δ, A, Δ·u, B, C."""
    if per_step_outputs(anchor) is None:
        return None
    try:
        loop = find_loop(anchor)
    except NotALoop as exc:
        if str(exc).startswith("the steps carry 2 values"):  # a complex state split into real and imaginary
            return match_split(anchor, _time_index, backend)
        outputs = per_step_outputs(anchor)[0]
        reason = loop_reason(outputs, str(exc))
        return None if reason is None else Rejection("ssm_scan", "unrolled loop", anchor, reason)
    variant = f"{loop.length} steps"
    if complex_state(loop):
        return match_complex(loop, _time_index(loop), backend)
    try:
        if decay(loop) is not None:
            return _lti_site(loop, analyze_lti(loop, _time_index(loop)), backend)
    except NotAScan as exc:
        return Rejection("ssm_scan", f"{variant}, LTI recurrence", anchor, str(exc))
    if states_stacked(loop):  # the states themselves stacked (mamba.py)
        return match_stacked_states(loop, _time_index(loop), backend)
    try:
        found = analyze(loop)
    except NotAScan as exc:
        return Rejection("ssm_scan", f"{variant}, recurrence", anchor, str(exc))
    parts, sizes = found["parts"], found["sizes"]
    leaves = list(dict.fromkeys(leaf for part in parts.values() for leaf, _ in part.leaves))
    init = found["init"]
    last = loop.bodies[-1][loop.carried]
    inside = {n for body in loop.bodies for n in body}
    extra = [last] if any(u not in inside for u in last.users) else []

    def site(tail: Tail) -> Site:
        tail = tail.reading(leaves)
        inputs = list(dict.fromkeys(leaves + ([init] if init is not None else []) + tail.inputs))
        wide = any(n.meta["val"].dtype == torch.float64 for n in leaves + tail.inputs)
        state = torch.float64 if wide else torch.float32
        out_val, h_val = tail.output.meta["val"], last.meta["val"]

        def emit(graph: Graph, nodes: list[Node]) -> Node | list[Node]:
            import fxfuse.fusion.ssm_scan  # noqa: F401  registers torch.ops.fxfuse.selective_scan

            env = dict(zip(inputs, nodes))
            args = [_arrange(graph, env, parts[name], axes, sizes) for name, axes in _OP_LAYOUTS]
            h0 = None
            if init is not None:
                h0 = _to_layout(graph, env[init], "".join(found["state_labels"]), tuple("bdn"), (sizes["b"],
                                sizes["d"], sizes["n"]), torch.float32, init.meta["val"].dtype)  # fmt: skip
            scan = _call(graph, torch.ops.fxfuse.selective_scan.default, *args, h0, backend,
                         *tail.op_args(graph, env, found["stacked"], sizes))  # fmt: skip
            y = _to_layout(graph, _call(graph, operator.getitem, scan, 0), "bdl", found["stacked"],
                           tuple(out_val.shape), out_val.dtype, state)  # fmt: skip
            if not extra:
                return y
            h = _to_layout(graph, _call(graph, operator.getitem, scan, 1), "bdn", found["state_labels"],
                           tuple(h_val.shape), h_val.dtype, state)  # fmt: skip
            return [y, h]

        variant = ", ".join(
            [f"{loop.length} steps → 1 scan", "selective", "fused discretization"]
            + tail.parts
            + (["final state"] if extra else [])
            + (["initial state"] if init is not None else [])
            + [f"readout {found['kind']}", f"time dim {found['time_dim']}"]
        )
        return Site("ssm_scan", variant, anchor, tail.output, inputs, emit, backend=_backend_name(backend, anchor),
                    tolerance=SCAN_TOLERANCE, input_gen=_input_gen(inputs, parts), extra_outputs=extra)  # fmt: skip

    fused = site(skip_and_gate(anchor, found["stacked"], sizes))
    # the skip's or gate's inputs computed from the loop's own values: the tail stays a graph op
    return fused if fused.output is anchor or not isinstance(region_of(fused), str) else site(Tail(anchor))


def _lti_site(loop: Loop, found: dict, backend: str) -> Site:
    """The site of an LTI recurrence (`passes/ssm_lti.py`): the same op, Δ, B and C ones."""
    found["backend"] = backend
    inputs, emit, input_gen = site_parts(loop, found)
    anchor, last = loop.anchor, loop.bodies[-1][loop.carried]
    inside = {n for body in loop.bodies for n in body}
    extra = [last] if any(u not in inside for u in last.users) else []
    variant = ", ".join(
        [f"{loop.length} steps → 1 scan", "LTI", "constant decay exp(z)"]
        + (["per-step inputs stacked"] if found["hoisted"] is None else ["input terms hoisted"])
        + (["final state"] if extra else [])
        + ([] if found["zeros"] else ["initial state"])
        + [f"{len(found['chain'])}-op readout", f"time dim {found['dim']}"]
    )
    return Site("ssm_scan", variant, anchor, anchor, inputs, lambda graph, nodes: emit(graph, nodes, bool(extra)),
                backend=_backend_name(backend, anchor), tolerance=SCAN_TOLERANCE, input_gen=input_gen,
                extra_outputs=extra)  # fmt: skip


def _rename_axes(parts: dict[str, Product], names: dict) -> None:
    """Each factor's axis labels renamed by `names` (to b, d, l, n), in place; NotAScan when a factor spans
    an axis the selective scan's factor of that name cannot (`_ALLOWED`)."""
    for name, part in parts.items():
        named = [(leaf, tuple(None if lab is None else names[lab] for lab in labs)) for leaf, labs in part.leaves]
        for leaf, labs in named:
            if not set(labs) - {None} <= _ALLOWED[name]:
                raise NotAScan(f"the {name} factor {leaf.name} spans axes {labs}, a selective scan's {name} spans "
                               f"{sorted(_ALLOWED[name])}")  # fmt: skip
        parts[name] = Product(named, part.const)


def _backend_name(backend: str, anchor: Node) -> str:
    from fxfuse.backends import kernel_backend_label
    from fxfuse.fusion.ssm_scan.op import cpu_problem

    return kernel_backend_label(backend, anchor.meta["val"].device, cpu_problem)


def find_ssm_scan(gm: GraphModule, backend: str) -> list[Site | Rejection]:
    """Every re-rollable scan (or near miss) anchored on a stack / cat of per-step outputs, then every
    `associative_scan` of the linear recurrence (`passes/ssm_assoc.py`)."""
    from fxfuse.passes.ssm_assoc import find_associative_scans  # it imports this module's helpers

    found = []
    for node in gm.graph.nodes:
        result = match_selective_scan(node, backend)
        if result is not None:
            found.append(result)
    return found + find_associative_scans(gm, backend) + near_miss_rejections(gm)
