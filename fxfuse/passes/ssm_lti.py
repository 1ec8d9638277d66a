"""LTI recurrences (LRU, S4D in recurrent mode): an unrolled h_t = a * h_{t-1} + b_t with a constant decay
re-rolled into one `fxfuse::selective_scan`.

The rule, on one screen:
- the step: h_t = a * h_{t-1} + b_t (either operand order) with `a` computed before the loop as exp(z)
  (LRU's exp(-exp(ν)), S4D's exp(Δ·A)); z broadcasts to the state's shape. A decay that is not an exp is
  left alone: the scan takes log-decays, and log of a decay of unknown sign is not exact;
- the input term b_t: anything of step t that does not read the state (x_t @ B, an einsum, Bu[:, t]). When
  its ops are time selects of loop invariants followed by ops of the readout's kind, they run once over
  all steps (x @ B); otherwise the L per-step terms the graph already computes are stacked, unchanged;
- the readout y_t: a chain from h_t of ops that distribute over a leading time axis — matmul / mm / linear
  with loop-invariant weights, elementwise ops with loop invariants or numbers, casts, sums, unsqueezes
  — applied once to all L states; the outputs stacked along any dim;
- the scan is elementwise over the state: the state is flattened to [1, numel, 1] channels, with Δ, B and C
  ones (exp(1·z) = exp(z), h·1 = h), so the op's kernels, gradients and ONNX lowering serve it unchanged.
Left alone, with the reason: decays read from the state or not an exp, input terms that read the state,
readouts that read another step's state or a per-step input, steps that compute anything else.
"""

from __future__ import annotations

import operator
import string

import torch
from torch.fx import Graph, Node

from fxfuse.passes.reroll import Loop
from fxfuse.passes.ssm_labels import PASS_THROUGH, NotAScan, shape
from fxfuse.passes.verify import random_like

aten = torch.ops.aten
_ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
_ELEMENTWISE = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor)
_MATMUL = (aten.matmul.default, aten.mm.default, aten.linear.default)


def decay(loop: Loop) -> tuple[Node, Node] | None:
    """(a, b) when the state update is a * h_prev + b with `a` computed before the loop, else None;
    NotAScan when `a` reads the state (a gate, not a decay)."""
    h, h_prev = loop.bodies[1][loop.carried], loop.bodies[0][loop.carried]
    inside = {n for body in loop.bodies for n in body}
    if h.target is not aten.add.Tensor or len(h.args) != 2 or h.kwargs.get("alpha", 1) != 1:
        return None
    for prod, b in (h.args, h.args[::-1]):
        if isinstance(prod, Node) and prod.target is aten.mul.Tensor and isinstance(b, Node):
            for a, hp in (prod.args, prod.args[::-1]):
                if hp is h_prev and isinstance(a, Node) and a not in inside:
                    return a, b
                if hp is h_prev and isinstance(a, Node) and _reads(a, h_prev, set(loop.bodies[1])):
                    raise NotAScan(f"the decay {a.name} reads the state (a gated, nonlinear recurrence)")
    return None


def _reads(node: Node, target: Node, within: set[Node]) -> bool:
    """Whether `node` depends on `target` through nodes of `within`."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen or n not in within:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _ancestors(node: Node, within: set[Node]) -> set[Node]:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen or n not in within:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _readout_chain(out: Node, h: Node, h_prev: Node, body: set[Node], inside: set[Node]) -> list[Node]:
    """The ops from h_t to the per-step output, checked to distribute over a leading time axis."""
    chain, node = [], out
    while node is not h:
        if node is h_prev or node not in body:
            raise NotAScan("the readout reads another step's state, not the state it just computed")
        movable = [a for a in node.all_input_nodes if a in body]
        if len(movable) != 1:
            raise NotAScan(f"the readout op {node.name} reads the state twice or a per-step input")
        (x,) = movable
        others = [a for a in node.all_input_nodes if a is not x]
        if any(a in inside for a in others):
            raise NotAScan(f"the readout op {node.name} reads a value of another step")
        _check_batchable(node, x)
        chain.append(node)
        node = x
    return chain[::-1]


def _check_batchable(node: Node, x: Node) -> None:
    """Raise unless `node` applied to x with a leading time axis is node applied to each step."""
    t, rank = node.target, len(shape(x))
    if t in PASS_THROUGH and node.args[0] is x:
        return
    if t in _MATMUL and node.args[0] is x and rank >= (1 if t is aten.linear.default else 2):
        if t is aten.linear.default or len(shape(node.args[1])) <= rank:
            return
    if t in _ELEMENTWISE and len(node.args) == 2 and not node.kwargs:
        other = node.args[1] if node.args[0] is x else node.args[0]
        if not isinstance(other, Node) or len(shape(other)) <= rank:
            return
    if t is aten.unsqueeze.default and node.args[0] is x:
        return  # a dim >= 0 moves by one (`_replay`)
    if t is aten.sum.dim_IntList and node.args[0] is x and isinstance(node.args[1], (list, tuple)) and node.args[1]:
        return  # dims >= 0 move by one; a sum over every dim (dims None or []) would sum over time too
    if t is aten.einsum.default and _einsum_over_time(node, x) is not None:
        return  # S4D's / mamba_ssm's complex readout einsum("bhn,hn->bh", h, C): a time letter added
    raise NotAScan(f"the readout op {node.name} ({t}) is not one the scan applies to all steps at once")


def _hoisted(b: Node, body: list[Node], inside: set[Node], time_index) -> list[Node] | None:
    """The ops of step 1 that compute the input term b, when they run as well over all steps at once (a
    leading time axis): time selects of loop invariants, then ops that distribute over that axis. None
    when they do not (the L per-step terms are stacked instead)."""
    ops = [n for n in body if n in _ancestors(b, set(body))]
    batched: dict[Node, int] = {}  # op -> rank of its per-step value
    for op in ops:
        try:
            found = time_index(op)
        except NotAScan:
            return None
        if found is not None:
            if op.target is not aten.select.int or op.args[0] in inside:
                return None
            batched[op] = len(shape(op))
            continue
        movable = [a for a in op.all_input_nodes if a in batched]
        if any(a in inside and a not in batched for a in op.all_input_nodes) or not movable:
            return None
        if len(movable) == 1:
            try:
                _check_batchable(op, movable[0])
            except NotAScan:
                return None
        elif op.target not in _ELEMENTWISE or len({batched[a] for a in movable}) != 1 or op.kwargs:
            return None
        batched[op] = len(shape(op))
    return ops


def analyze_lti(loop: Loop, time_index) -> dict:
    """The LTI scan a loop computes, or NotAScan; `time_index` as in `passes/ssm_labels.py`."""
    found = decay(loop)
    if found is None:
        raise NotAScan("the decay is not a loop-invariant tensor")
    a, b = found
    h, h_prev = loop.bodies[1][loop.carried], loop.bodies[0][loop.carried]
    state = shape(h)
    if a.target is not aten.exp.default or not isinstance(a.args[0], Node):
        raise NotAScan(f"the constant decay is {a.target}, not exp(z) (its log is not exact)")
    z = a.args[0]
    zs = shape(z)
    if len(zs) > len(state) or any(s not in (1, w) for s, w in zip(zs[::-1], state[::-1])):
        raise NotAScan("the decay does not broadcast to the state's shape")
    if any(s not in (1, w) for s, w in zip(shape(b)[::-1], state[::-1])) or len(shape(b)) > len(state):
        raise NotAScan("the input term does not broadcast to the state's shape")
    inside = {n for body in loop.bodies for n in body}
    body = set(loop.bodies[1])
    if b in body and _reads(b, h_prev, body):
        raise NotAScan("the input term reads the state (a nonlinear recurrence)")
    chain = _readout_chain(loop.outputs[1], h, h_prev, body, inside)
    timed = {loop.bodies[1][k] for k, _ in loop.time_args}
    for op in chain:  # the readout is replayed once with step 1's arguments: h_t @ C + t would add 1 to every step
        if op in timed:
            raise NotAScan(f"the readout op {op.name} reads the step number (it differs from step to step)")
    prod = h.args[1] if h.args[0] is b else h.args[0]
    used = {h, prod, *chain} | (_ancestors(b, body) if b in body else set())
    extra = [n for n in loop.bodies[1] if n not in used]
    if extra:
        raise NotAScan(f"the step also computes {extra[0].name} ({extra[0].target}), which the scan does not")
    if loop.anchor.target is not aten.stack.default:
        raise NotAScan("the per-step outputs of an LTI loop are concatenated, not stacked")
    hoisted = _hoisted(b, loop.bodies[1], inside, time_index) if b in body else None
    b_pos = loop.bodies[1].index(b) if b in body else None
    terms = [body_i[b_pos] if b_pos is not None else b for body_i in loop.bodies]
    init = loop.init  # zeros too: the site reads them (their size comes from a tensor outside it)
    if shape(init) != state:
        raise NotAScan("the initial state does not have the state's shape")
    dim = loop.anchor.args[1] if len(loop.anchor.args) > 1 else loop.anchor.kwargs.get("dim", 0)
    dim %= len(shape(loop.outputs[1])) + 1
    zeros = init.op == "call_function" and init.target in _ZEROS
    return {"z": z, "terms": terms, "hoisted": hoisted, "b": b, "chain": chain, "init": init, "zeros": zeros,
            "state": state, "dim": dim, "h": h}  # fmt: skip


def _call(graph: Graph, target, *args, **kwargs) -> Node:
    return graph.call_function(target, args, kwargs)


def _float(graph: Graph, x: Node, node: Node) -> Node:
    if node.meta["val"].dtype in (torch.float32, torch.float64):
        return x
    return _call(graph, aten._to_copy.default, x, dtype=torch.float32)


def _einsum_over_time(op: Node, x: Node) -> str | None:
    """The equation of einsum `op` with a new leading letter on `x`'s operands and on the output (time
    leading), or None when the equation is implicit, uses an ellipsis or has no letter left."""
    equation, operands = op.args[0].replace(" ", ""), op.args[1]
    if "->" not in equation or "." in equation or not isinstance(operands, (list, tuple)):
        return None
    inputs, output = equation.split("->")
    subscripts = inputs.split(",")
    free = [c for c in string.ascii_letters if c not in equation]
    if len(subscripts) != len(operands) or not free:
        return None
    subscripts = [free[0] + s if a is x else s for s, a in zip(subscripts, operands)]
    return ",".join(subscripts) + "->" + free[0] + output


def _replay(graph: Graph, op: Node, state: Node, x: Node, env: dict) -> Node:
    """`op` with its operand `state` replaced by the time-batched `x`, loop invariants read from `env`."""

    def swap(v):
        if isinstance(v, Node):
            return x if v is state else env[v]
        if isinstance(v, (list, tuple)):
            return type(v)(swap(u) for u in v)
        return v

    args = tuple(swap(v) for v in op.args)
    kwargs = {k: swap(v) for k, v in op.kwargs.items()}
    if op.target is aten.unsqueeze.default and args[1] >= 0:
        args = (args[0], args[1] + 1)
    if op.target is aten.sum.dim_IntList:
        args = (args[0], [d + 1 if d >= 0 else d for d in args[1]], *args[2:])
    if op.target is aten.einsum.default:
        args = (_einsum_over_time(op, state), *args[1:])
    target = aten.matmul.default if op.target is aten.mm.default else op.target
    return graph.call_function(target, args, kwargs)


def _input_terms(graph: Graph, hoisted: list[Node], env: dict) -> Node:
    """The input terms of all steps, time leading: step 1's ops once over the whole time axis."""
    env = dict(env)
    for op in hoisted:
        if op.target is aten.select.int and op.args[0] in env and op not in env and op.all_input_nodes == [op.args[0]]:
            env[op] = _call(graph, aten.movedim.int, env[op.args[0]], op.args[1], 0)
            continue
        movable = [a for a in op.all_input_nodes if a in hoisted]
        if len(movable) == 1:
            env[op] = _replay(graph, op, movable[0], env[movable[0]], env)
        else:
            args = tuple(env[a] if isinstance(a, Node) else a for a in op.args)
            env[op] = graph.call_function(op.target, args)
    return env[hoisted[-1]]


def site_parts(loop: Loop, found: dict):
    """(inputs, emit, input_gen) of the site; the caller adds the final state when it is read."""
    z, terms, chain, init, state = found["z"], found["terms"], found["chain"], found["init"], found["state"]
    hoisted = found["hoisted"]
    invariants = list(dict.fromkeys(a for op in chain for a in op.all_input_nodes if a not in set(chain)
                                    and a is not found["h"]))  # fmt: skip
    if hoisted is not None:
        ops = set(hoisted)
        terms = list(dict.fromkeys(a for op in hoisted for a in op.all_input_nodes if a not in ops))
    inputs = list(dict.fromkeys([z, *terms, *invariants, init]))
    length, numel = loop.length, 1
    for s in state:
        numel *= s
    h_dtype = found["h"].meta["val"].dtype

    def emit(graph: Graph, nodes: list[Node], want_state: bool) -> Node | list[Node]:
        import fxfuse.fusion.ssm_scan  # noqa: F401  registers torch.ops.fxfuse.selective_scan

        env = dict(zip(inputs, nodes))
        A = _call(graph, aten.expand.default, _float(graph, env[z], z), list(state))
        A = _call(graph, aten.reshape.default, A, [numel, 1])
        if hoisted is None:
            xs = [_call(graph, aten.expand.default, _float(graph, env[t], t), list(state)) for t in terms]
            x = _call(graph, aten.stack.default, xs, -1)
        else:
            x = _float(graph, _input_terms(graph, hoisted, env), found["b"])
            x = _call(graph, aten.movedim.int, _call(graph, aten.expand.default, x, [length, *state]), 0, -1)
        x = _call(graph, aten.reshape.default, x, [1, numel, length])
        dtype = torch.float64 if any(n.meta["val"].dtype == torch.float64 for n in inputs) else torch.float32
        dt = _call(graph, aten.full.default, [1, numel, length], 1.0, dtype=dtype)
        ones = _call(graph, aten.full.default, [1, length, 1], 1.0, dtype=dtype)
        h0 = _call(graph, aten.reshape.default, _float(graph, env[init], init), [1, numel, 1])
        scan = _call(graph, torch.ops.fxfuse.selective_scan.default, dt, A, x, ones, ones, h0, found["backend"])
        hs = _call(graph, aten.reshape.default, _call(graph, operator.getitem, scan, 0), [*state, length])
        hs = _call(graph, aten.movedim.int, hs, -1, 0)
        if h_dtype != dtype:
            hs = _call(graph, aten._to_copy.default, hs, dtype=h_dtype)
        y = hs
        operand = found["h"]
        for op in chain:
            y, operand = _replay(graph, op, operand, y, env), op
        y = _call(graph, aten.movedim.int, y, 0, found["dim"])
        if not want_state:
            return y
        last = _call(graph, aten.reshape.default, _call(graph, operator.getitem, scan, 1), list(state))
        if h_dtype != dtype:
            last = _call(graph, aten._to_copy.default, last, dtype=h_dtype)
        return [y, last]

    def input_gen(index: int, val: torch.Tensor, case: str, seed: int) -> torch.Tensor | None:
        """The log-decay z <= 0, as trained models keep it: a growing state would overflow the original."""
        if index != 0:
            return None
        return -random_like(val, "normal", seed + 97).abs()

    return inputs, emit, input_gen
