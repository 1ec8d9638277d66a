"""Complex LTI recurrences (LRU, S4D in recurrent mode with a complex state): an unrolled
h_t = λ ⊙ h_{t-1} + b_t with a constant complex λ re-rolled into one `fxfuse::complex_scan`.

The rules, on one screen:
- complex tensors: the step is λ * h + b (either order) on a complex state, λ computed before the loop by
  any formula (exp(-exp(ν) + i·exp(θ)), torch.complex(re, im), torch.polar) and broadcasting to the state;
- real/imaginary split: two carried real tensors updated as a complex multiply,
  h_re' = α·h_re − β·h_im + u_re and h_im' = α·h_im + β·h_re + u_im (sums and products in any order and
  grouping; the conjugate signs are λ = α − iβ), α and β computed before the loop;
- the input terms b_t (u_re, u_im): what step t computes without the state. When its ops run as well over a
  leading time axis (x[:, t] @ B, casts) they run once over all steps, otherwise the L terms are stacked;
- the readout y_t: ops of h_t (h_re, h_im) and of step t's inputs that distribute over a leading time axis
  (`.real`, matmuls with loop-invariant weights, elementwise ops, the D·x_t skip), run once over all states;
- the final state, when something after the loop reads it, is the scan's last state (a view, no copy).
Left alone, with the reason: decays computed in the loop or reading the state, cross terms that are not a
complex multiply, input terms that read the state, readouts of another step's state, steps that compute
anything else. A state read mid-loop is refused by the driver (`passes/rewrite.py`): it escapes the region.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import Graph, Node

from fxfuse.passes.reroll import (
    Loop,
    NotALoop,
    _bodies,
    _check_step,
    _template,
    _unify_step0,
    per_step_outputs,
)
from fxfuse.passes.site import Rejection, Site
from fxfuse.passes.ssm_labels import NotAScan, shape
from fxfuse.passes.ssm_lti import _check_batchable, _reads, _replay
from fxfuse.passes.verify import random_like

aten = torch.ops.aten
_UNARY = (aten.real.default, aten.imag.default, aten.neg.default, aten.conj.default, aten._conj.default,
          aten.resolve_conj.default)  # fmt: skip
_BINARY = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)
_BATCHED = ("root", "select", "batched")
_ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
SCAN_TOLERANCE = 1e-4  # as every scan: the batched projections and readout round differently per step


def complex_state(loop: Loop) -> bool:
    """Whether the loop carries a complex state (torch complex tensors)."""
    val = loop.bodies[1][loop.carried].meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_complex


def find_pair_loop(anchor: Node) -> tuple[Loop, int, Node]:
    """An unrolled loop carrying exactly two values (a real/imaginary split): the loop with its first
    carried value, the second's position and initial value. `reroll.find_loop` with two carried values."""
    outputs, _ = per_step_outputs(anchor)
    bodies = _bodies(outputs)
    if any(len(b) != len(bodies[1]) for b in bodies[1:]) or not bodies[1]:
        raise NotALoop("the per-step outputs are not computed by step bodies of one size")
    slots = _template(bodies)
    for step in range(3, len(outputs)):
        _check_step(slots, bodies[step], bodies[step - 1], bodies[1], step)
    carried = sorted({s.value for s in slots.values() if s.kind == "carry"})
    if len(carried) != 2:
        raise NotALoop(f"the steps carry {len(carried)} values; a real/imaginary split carries 2")
    out_pos = bodies[1].index(outputs[1])
    bodies[0], init = _unify_step0(slots, bodies[1], outputs[0], out_pos)
    if any(bodies[i][out_pos] is not outputs[i] for i in range(len(outputs))) or set(init) != set(carried):
        raise NotALoop("the stacked outputs are not the same node of each step, or a state has no initial value")
    time_args = [key for key, s in slots.items() if s.kind == "time"]
    first, second = carried
    return Loop(anchor, outputs, bodies, slots, first, init[first], time_args), second, init[second]


def _upstream(node: Node, within: set[Node], stop: set[Node]) -> set[Node]:
    """Nodes of `within` that `node` reads, not looking past `stop` (which are included)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n not in within:
            continue
        seen.add(n)
        if n not in stop:
            todo.extend(n.all_input_nodes)
    return seen


def _seeded(node: Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def _left_matmul(op: Node, x: Node) -> bool:
    """W @ x_t with a loop-invariant W (`C @ h`): over all steps, W @ xs (xs [L, n, ...]) or xs @ Wᵀ (x_t [n])."""
    return op.target in (aten.matmul.default, aten.mm.default) and op.args[1] is x and op.args[0] is not x


def _plan(ops: list[Node], roots: set[Node], inside: set[Node], time_index) -> dict[Node, str]:
    """How each op of step 1 runs once over all steps (time leading): "root" (a state, given), "select"
    (step t of a loop invariant), "invariant" (the same value in every step: computed once), "batched"
    (distributes over the time axis). NotAScan when an op does not."""
    kind: dict[Node, str] = {}
    rank: dict[Node, int] = {}
    for op in ops:
        if op in roots:
            kind[op], rank[op] = "root", len(shape(op))
            continue
        if time_index(op) is not None:
            if op.target is not aten.select.int or op.args[0] in inside:
                raise NotAScan(f"{op.name} takes step t in a way the scan does not run over all steps")
            kind[op], rank[op] = "select", len(shape(op))
            continue
        movable = [a for a in op.all_input_nodes if a in rank]
        stray = [a for a in op.all_input_nodes if a in inside and a not in kind]
        if stray:
            raise NotAScan(f"{op.name} reads {stray[0].name}, a value of another step or of the state update")
        if not movable:
            if _seeded(op):
                raise NotAScan(f"{op.name} draws random numbers in every step")
            kind[op] = "invariant"
            continue
        if len(movable) == 1 and _left_matmul(op, movable[0]):
            w, r = len(shape(op.args[0])), rank[movable[0]]
            if not ((r == 1 and w == 2) or 2 <= w <= r):
                raise NotAScan(f"the matmul {op.name} does not run over all steps at once")
        elif len(movable) == 1:
            if not (op.target in _UNARY and op.args[0] is movable[0]):
                _check_batchable(op, movable[0])
        elif op.target not in _BINARY or op.kwargs or len({rank[a] for a in movable}) != 1:
            raise NotAScan(f"{op.name} ({op.target}) combines per-step values in a way the scan does not batch")
        kind[op], rank[op] = "batched", len(shape(op))
    return kind


def _run(graph: Graph, ops: list[Node], kind: dict[Node, str], env: dict) -> dict:
    """Emit `ops` once over all steps; `env` maps loop invariants and roots to graph nodes (updated)."""
    mapped = lambda v: torch.fx.node.map_arg(v, env.__getitem__)  # noqa: E731
    for op in ops:
        if kind[op] == "root":
            continue
        if kind[op] == "select":
            env[op] = graph.call_function(aten.movedim.int, (env[op.args[0]], op.args[1], 0))
            continue
        movable = [a for a in op.all_input_nodes if kind.get(a) in _BATCHED]
        if len(movable) == 1 and _left_matmul(op, movable[0]) and len(shape(movable[0])) == 1:
            w = graph.call_function(aten.transpose.int, (env[op.args[0]], 0, 1))  # W @ v_t = v_t @ Wᵀ
            env[op] = graph.call_function(aten.matmul.default, (env[movable[0]], w))
        elif len(movable) == 1:
            env[op] = _replay(graph, op, movable[0], env[movable[0]], env)
        else:
            env[op] = graph.call_function(op.target, mapped(op.args), mapped(op.kwargs))
    return env


def _invariants(ops: list[Node], kind: dict[Node, str], exclude: set[Node]) -> list[Node]:
    """The loop invariants the ops read (the site's inputs)."""
    return [a for op in ops if kind[op] != "root" for a in op.all_input_nodes if a not in kind and a not in exclude]


def _inputs_plan(terms: list[Node], loop: Loop, time_index) -> tuple[list[Node], dict] | None:
    """(ops, kinds) computing the input terms once over all steps, or None (the per-step terms are stacked)."""
    body, inside = loop.bodies[1], {n for b in loop.bodies for n in b}
    within = set(body)
    needed = set().union(*(_upstream(t, within, set()) for t in terms))
    ops = [n for n in body if n in needed]
    try:
        return ops, _plan(ops, set(), inside, time_index)
    except NotAScan:
        return None


def _linear(node: Node, prevs: tuple[Node, Node], within: set[Node], seen: set[Node]) -> list[tuple]:
    """`node` as a signed sum: (sign, coefficient, previous state) terms and (sign, None, None, term) input
    terms; NotAScan when the state enters otherwise (a product of states, a nonlinearity)."""
    out, todo = [], [(node, 1)]
    while todo:
        n, sign = todo.pop()
        if not any(_reads(n, p, within) for p in prevs):
            out.append((sign, None, None, n))
            continue
        seen.add(n)
        t = n.target if n.op == "call_function" else None
        args = n.args
        if t in (aten.add.Tensor, aten.sub.Tensor) and n.kwargs.get("alpha", 1) == 1 and len(args) == 2 \
                and all(isinstance(a, Node) for a in args):  # fmt: skip
            todo += [(args[0], sign), (args[1], sign if t is aten.add.Tensor else -sign)]
        elif t is aten.neg.default:
            todo.append((args[0], -sign))
        elif t is aten.mul.Tensor and len(args) == 2 and any(a in prevs for a in args):
            prev, coef = args if args[0] in prevs else args[::-1]
            if not isinstance(coef, Node) or coef in within or coef in prevs:
                raise NotAScan(f"the state is multiplied by {getattr(coef, 'name', coef)}, not by a decay computed "
                               "before the loop")  # fmt: skip
            out.append((sign, coef, prev, None))
        else:
            raise NotAScan(f"{n.name} ({t}) enters the state update; a complex multiply adds and subtracts "
                           "decay * state products")  # fmt: skip
    return out


def _complex_update(h: Node, h_prev: Node, within: set[Node]) -> tuple[Node, Node]:
    """h = λ * h_prev + b (any operand order) -> (λ, b); NotAScan otherwise or when λ reads the state."""
    if h.target is aten.add.Tensor and len(h.args) == 2 and h.kwargs.get("alpha", 1) == 1:
        for prod, b in (h.args, h.args[::-1]):
            if isinstance(prod, Node) and prod.target is aten.mul.Tensor and isinstance(b, Node):
                for lam, hp in (prod.args, prod.args[::-1]):
                    if hp is h_prev and isinstance(lam, Node):
                        if _reads(lam, h_prev, within):
                            raise NotAScan(f"the decay {lam.name} reads the state (a gated, nonlinear recurrence)")
                        return lam, b
    raise NotAScan(f"the complex state update {h.name} ({h.target}) is not λ * h + b")


def _split_update(h_p: Node, h_q: Node, prevs: tuple[Node, Node], within: set[Node], seen: set[Node]):
    """(α, β, sign of β in λ, u_p, u_q) for h_p = α·p − β·q + u_p, h_q = α·q + β·p + u_q (sign +1; the
    conjugate signs give -1)."""
    p, q = prevs
    parts = {}
    for new in (h_p, h_q):
        terms = _linear(new, prevs, within, seen)
        coefs = {prev: [(s, c) for s, c, pv, _ in terms if pv is prev] for prev in prevs}
        inputs = [(s, u) for s, c, pv, u in terms if pv is None]
        if any(len(v) != 1 for v in coefs.values()):
            raise NotAScan(f"{new.name} does not read each of the two states once through a decay")
        if len(inputs) != 1 or inputs[0][0] != 1:
            raise NotAScan(f"{new.name} does not add exactly one input term")
        parts[new] = (coefs[p][0], coefs[q][0], inputs[0][1])
    (a_p, b_p, u_p), (b_q, a_q, u_q) = parts[h_p], parts[h_q]
    if a_p != (1, a_q[1]) or a_q[0] != 1 or b_p[1] is not b_q[1] or b_p[0] != -b_q[0]:
        raise NotAScan("the two carried values are not updated as a complex multiply (α on both states, the "
                       "cross terms ±β with opposite signs)")  # fmt: skip
    return a_p[1], b_p[1], -b_p[0], u_p, u_q


def analyze_complex(loop: Loop, time_index, second: tuple[int, Node] | None = None) -> dict:
    """The complex scan a loop computes, or NotAScan. `second` (position, initial value) is the imaginary
    part of a real/imaginary split; without it the loop carries one complex tensor."""
    body, inside = loop.bodies[1], {n for b in loop.bodies for n in b}
    within = set(body)
    h, h_prev = body[loop.carried], loop.bodies[0][loop.carried]
    state = shape(h)
    update: set[Node] = set()
    lam_ops: list[Node] = []
    if second is None:
        lam, b = _complex_update(h, h_prev, within)
        if b in within and _reads(b, h_prev, within):
            raise NotAScan("the input term reads the state (a nonlinear recurrence)")
        update = {h, next(a for a in h.args if a is not b)}
        if lam in within:  # recomputed in every step from loop invariants only: computed once
            lam_ops = [n for n in body if n in _upstream(lam, within, set())]
            if any(time_index(n) is not None for n in lam_ops) or any(
                k != "invariant" for k in _plan(lam_ops, set(), inside, time_index).values()
            ):
                raise NotAScan(f"the decay {lam.name} changes from step to step (an input-dependent, selective decay)")
            update |= set(lam_ops)
        decays, roots, terms, inits = [lam], [h], [b], [loop.init]
    else:
        pos, init2 = second
        h2, prev2 = body[pos], loop.bodies[0][pos]
        if shape(h2) != state or any(n.meta["val"].dtype.is_complex for n in (h, h2)):
            raise NotAScan("the two carried values are not the real and imaginary parts of one state")
        alpha, beta, sign, u_p, u_q = _split_update(h, h2, (h_prev, prev2), within, update)
        decays, roots, terms, inits = [alpha, beta], [h, h2], [u_p, u_q], [loop.init, init2]
    for node, what in [*((d, "decay") for d in decays), *((t, "input term") for t in terms)]:
        s = shape(node)
        if len(s) > len(state) or any(a not in (1, w) for a, w in zip(s[::-1], state[::-1])):
            raise NotAScan(f"the {what} {node.name} does not broadcast to the state's shape")
    if any(shape(i) != state for i in inits):
        raise NotAScan("the initial state does not have the state's shape")
    if loop.anchor.target is not aten.stack.default:
        raise NotAScan("the per-step outputs of an LTI loop are concatenated, not stacked")
    out = loop.outputs[1]
    readout = [n for n in body if n in _upstream(out, within, set(roots))]
    readout_kind = _plan(readout, set(roots), inside, time_index)
    step_terms = [t for t in terms if t in within]
    hoisted = _inputs_plan(step_terms, loop, time_index) if step_terms else ([], {})
    used = update | set(roots) | set(readout) | set().union(*(_upstream(t, within, set()) for t in step_terms))
    extra = [n for n in body if n not in used]
    if extra:
        raise NotAScan(f"the step also computes {extra[0].name} ({extra[0].target}), which the scan does not")
    dim = loop.anchor.args[1] if len(loop.anchor.args) > 1 else loop.anchor.kwargs.get("dim", 0)
    return {"decays": decays, "lam_ops": lam_ops, "sign": 1 if second is None else sign, "roots": roots, "terms": terms,
            "inits": inits, "readout": readout, "readout_kind": readout_kind, "hoisted": hoisted,
            "state": state, "dim": dim % (len(shape(out)) + 1), "split": second is not None}  # fmt: skip


def _call(graph: Graph, target, *args, **kwargs) -> Node:
    return graph.call_function(target, args, kwargs)


def _pairs(graph: Graph, x: Node, like: Node) -> Node:
    """x as real (real, imaginary) pairs [..., 2]: a view of a complex tensor, or a real one with zeros."""
    if like.meta["val"].dtype.is_complex:
        return _call(graph, aten.view_as_real.default, _call(graph, aten.resolve_conj.default, x))
    return _call(graph, aten.stack.default, [x, _call(graph, aten.zeros_like.default, x)], -1)


def _decay_gen(decays: list[Node], inputs: list[Node], decay_leaves: list[Node]) -> Callable:
    """Verification inputs with |λ| < 1, as trained LRUs keep it: a growing state overflows the original.
    What a decay computed in the loop reads is drawn at normal magnitude in every case (x100 would make
    exp(-exp(ν) + i·exp(θ)) meaningless in the original itself)."""
    index = {inputs.index(d) for d in decays if d in inputs}
    leaves = {inputs.index(d) for d in decay_leaves}

    def gen(i: int, val: torch.Tensor, case: str, seed: int) -> torch.Tensor | None:
        if i in leaves:
            return random_like(val, "normal", seed + 97 * i)
        if i not in index:
            return None
        gen = torch.Generator().manual_seed(seed + 31 * i)
        if val.dtype.is_complex:
            mod = 0.3 + 0.69 * torch.rand(val.shape, generator=gen, dtype=torch.float64)
            phase = 6.28 * torch.rand(val.shape, generator=gen, dtype=torch.float64)
            return torch.polar(mod, phase).to(val.dtype).to(val.device)
        bound = 0.7 if len(decays) == 2 else 0.99  # α, β: |α + iβ| < 0.99
        out = bound * (2 * torch.rand(val.shape, generator=gen, dtype=torch.float64) - 1)
        return out.to(val.dtype).to(val.device)

    return gen


def complex_site_parts(loop: Loop, found: dict, backend: str):
    """(inputs, emit(graph, nodes, finals), input_gen) of the site; `finals` lists which carried values'
    last states are read after the loop (emit returns them after the stacked outputs)."""
    decays, roots, terms, inits = found["decays"], found["roots"], found["terms"], found["inits"]
    readout, kind = found["readout"], found["readout_kind"]
    within = set(loop.bodies[1])
    hoisted = found["hoisted"]
    stacked_terms = [t for t in terms if t in within] if hoisted is None else []
    positions = [loop.bodies[1].index(t) for t in stacked_terms]
    per_step = [body[k] for k in positions for body in loop.bodies]
    lam_ops = found["lam_ops"]
    lam_kind = dict.fromkeys(lam_ops, "invariant")
    inputs = [*(d for d in decays if d not in within), *_invariants(lam_ops, lam_kind, set()), *inits, *per_step]
    inputs += [*_invariants(readout, kind, set()), *(t for t in terms if t not in within)]
    if hoisted is not None:
        inputs += _invariants(*hoisted, set())
    inputs = list(dict.fromkeys(inputs))
    state, length = found["state"], loop.length
    numel = 1
    for s in state:
        numel *= s
    h_dtype = roots[0].meta["val"].dtype

    def all_steps(graph: Graph, env: dict, term: Node) -> Node:
        """One input term of every step, time leading, broadcast to the state: [L, *state]."""
        if term not in within:
            x = env[term]
        elif hoisted is not None:
            x = env[term]
        else:
            k = loop.bodies[1].index(term)
            x = _call(graph, aten.stack.default, [env[body[k]] for body in loop.bodies], 0)
        return _call(graph, aten.expand.default, x, [length, *state])

    def emit(graph: Graph, nodes: list[Node], finals: list[int]) -> Node | list[Node]:
        import fxfuse.fusion.complex_scan  # noqa: F401  registers torch.ops.fxfuse.complex_scan

        env = _run(graph, lam_ops, lam_kind, dict(zip(inputs, nodes)))
        if hoisted is not None:
            env = _run(graph, hoisted[0], hoisted[1], env)
        if found["split"]:
            alpha, beta = (env[d] for d in decays)
            if found["sign"] < 0:
                beta = _call(graph, aten.neg.default, beta)
            full = [_call(graph, aten.expand.default, v, list(state)) for v in (alpha, beta)]
            a = _call(graph, aten.stack.default, full, -1)
            xs = _call(graph, aten.stack.default, [all_steps(graph, env, t) for t in terms], -1)
            h0 = _call(graph, aten.stack.default, [env[i] for i in inits], -1)
        else:
            a = _call(graph, aten.expand.default, _pairs(graph, env[decays[0]], decays[0]), [*state, 2])
            xs = _pairs(graph, all_steps(graph, env, terms[0]), terms[0])
            h0 = _pairs(graph, env[inits[0]], inits[0])
        a = _call(graph, aten.reshape.default, a, [numel, 2])
        xs = _call(graph, aten.reshape.default, xs, [length, numel, 2])
        h0 = _call(graph, aten.reshape.default, h0, [numel, 2])
        hs = _call(graph, torch.ops.fxfuse.complex_scan.default, a, xs, h0, backend)
        hs = _call(graph, aten.reshape.default, hs, [length, *state, 2])
        if found["split"]:
            states = [_call(graph, aten.select.int, hs, -1, j) for j in range(2)]
            real = torch.float64 if any(n.meta["val"].dtype == torch.float64 for n in inputs) else torch.float32
            if h_dtype != real:
                states = [_call(graph, aten._to_copy.default, s, dtype=h_dtype) for s in states]
        else:
            states = [_call(graph, aten.view_as_complex.default, hs)]
            wide = any(n.meta["val"].dtype in (torch.float64, torch.complex128) for n in inputs)
            if h_dtype != (torch.complex128 if wide else torch.complex64):
                states = [_call(graph, aten._to_copy.default, states[0], dtype=h_dtype)]
        env.update(zip(roots, states))
        y = _run(graph, readout, kind, env)[loop.outputs[1]]
        y = _call(graph, aten.movedim.int, y, 0, found["dim"])
        if not finals:
            return y
        return [y, *(_call(graph, aten.select.int, states[j], 0, length - 1) for j in finals)]

    return inputs, emit, _decay_gen(decays, inputs, _invariants(lam_ops, lam_kind, set()))


def _backend_name(backend: str, anchor: Node) -> str:
    from fxfuse.backends import kernel_backend_label
    from fxfuse.fusion.complex_scan.op import cpu_problem

    return kernel_backend_label(backend, anchor.meta["val"].device, cpu_problem)


def _site(loop: Loop, found: dict, backend: str, carried: list[int]) -> Site:
    inputs, emit, input_gen = complex_site_parts(loop, found, backend)
    inside = {n for b in loop.bodies for n in b}
    finals = [j for j, k in enumerate(carried) if any(u not in inside for u in loop.bodies[-1][k].users)]
    extra = [loop.bodies[-1][carried[j]] for j in finals]
    zeros = all(i.op == "call_function" and i.target in _ZEROS for i in found["inits"])
    batched = [n for n in found["readout"] if found["readout_kind"][n] == "batched"]
    variant = ", ".join(
        [
            f"{loop.length} steps → 1 scan",
            "LTI",
            "complex state (real/imaginary split)" if found["split"] else "complex state",
        ]
        + (["input terms hoisted"] if found["hoisted"] is not None else ["per-step inputs stacked"])
        + (["final state"] if extra else [])
        + ([] if zeros else ["initial state"])
        + [f"{len(batched)}-op readout", f"time dim {found['dim']}"]
    )
    return Site("ssm_scan", variant, loop.anchor, loop.anchor, inputs, lambda graph, nodes: emit(graph, nodes, finals),
                backend=_backend_name(backend, loop.anchor), tolerance=SCAN_TOLERANCE, input_gen=input_gen,
                extra_outputs=extra)  # fmt: skip


def match_complex(loop: Loop, time_index, backend: str) -> Site | Rejection:
    """A loop carrying one complex tensor -> fxfuse::complex_scan, or the reason why not."""
    try:
        return _site(loop, analyze_complex(loop, time_index), backend, [loop.carried])
    except NotAScan as exc:
        return Rejection("ssm_scan", f"{loop.length} steps, LTI recurrence, complex state", loop.anchor, str(exc))


def match_split(anchor: Node, time_index_of: Callable[[Loop], Callable], backend: str) -> Site | Rejection:
    """A loop carrying two real tensors (a real/imaginary split) -> fxfuse::complex_scan, or why not."""
    length = len(per_step_outputs(anchor)[0])
    try:
        loop, pos, init = find_pair_loop(anchor)
    except NotALoop as exc:
        return Rejection("ssm_scan", "unrolled loop", anchor, str(exc))
    try:
        found = analyze_complex(loop, time_index_of(loop), (pos, init))
        return _site(loop, found, backend, [loop.carried, pos])
    except NotAScan as exc:
        return Rejection("ssm_scan", f"{length} steps, two carried values", anchor, str(exc))
