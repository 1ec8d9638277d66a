"""Re-roll: find the L copies of a loop body that capture unrolled, chained through one carried state.

Dynamo unrolls `for t in range(L): h = step(h, xs[t]); ys.append(out(h))` into L copies of the step.
Starting from the op that stacks the per-step outputs (`torch.stack(ys)` / `torch.cat`), step i's body is
what output i needs that output i - 1 did not. The bodies must be *structurally isomorphic*, node for node
in graph order: same ops, same constant arguments, arguments that are either the same node in every step
(loop-invariant), a node of the same step at the same position, or a node of the previous step at one fixed
position (the carried state) — and integer arguments that differ only by the time index, i * stride +
offset (the `xs[:, t]` selects). Anything else (a body that differs, a value carried from two steps back,
more than one carried value) is reported, not matched. Step 0 is unified against step 1 backwards from its
output; its carried inputs are the initial state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

aten = torch.ops.aten
STACKS = (aten.stack.default, aten.cat.default)


class NotALoop(Exception):
    """The candidate is not an unrolled loop of isomorphic steps; the message says why."""


@dataclass
class Slot:
    """How one argument of a template node varies across steps."""

    kind: str  # "body" (same step, position), "carry" (previous step, position), "inv" (node), "const", "time"
    value: object = None  # position, node, constant; for "time": (stride, value at step 1)


@dataclass
class Loop:
    """An unrolled loop: `bodies[i]` are step i's nodes in graph order (step 0 unified with step 1)."""

    anchor: Node  # the stack / cat of the per-step outputs
    outputs: list[Node]  # per-step outputs, as stacked
    bodies: list[list[Node]]
    slots: dict[tuple[int, tuple], Slot]  # (template position, argument path) -> Slot
    carried: int  # position of the carried state in a body
    init: Node  # the state step 0 reads (h_{-1})
    time_args: list[tuple[int, tuple]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.outputs)

    def at(self, step: int, node: Node) -> Node:
        """The node of `step` at the template (step 1) node's position."""
        return self.bodies[step][self.bodies[1].index(node)]


def _arg_items(node: Node):
    """(path, value) for every leaf of a node's args and kwargs (lists flattened)."""

    def walk(value, path):
        if isinstance(value, (list, tuple)):
            for j, v in enumerate(value):
                yield from walk(v, (*path, j))
        else:
            yield path, value

    for j, a in enumerate(node.args):
        yield from walk(a, (j,))
    for k, a in node.kwargs.items():
        yield from walk(a, (k,))


def _shape(node: Node) -> tuple:
    """The argument structure of a node (target and the nesting of its args), for a quick mismatch test."""

    def shape(value):
        return tuple(shape(v) for v in value) if isinstance(value, (list, tuple)) else type(value).__name__

    return node.target, shape(node.args), tuple(sorted(node.kwargs))


def _bodies(outputs: list[Node]) -> list[list[Node]]:
    """Step i's nodes: ancestors of output i that are not ancestors of output i - 1 (i >= 1), graph order."""
    order = {n: j for j, n in enumerate(outputs[0].graph.nodes)}
    seen: set[Node] = set()
    stack = [outputs[0]]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    bodies = [[]]
    for out in outputs[1:]:
        body, stack = [], [out]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            body.append(n)
            stack.extend(n.all_input_nodes)
        bodies.append(sorted(body, key=order.__getitem__))
    return bodies


def _template(bodies: list[list[Node]]) -> dict[tuple[int, tuple], Slot]:
    """Classify every argument of step 1 by comparing it with step 2."""
    one, two = bodies[1], bodies[2]
    pos1, pos2 = {n: j for j, n in enumerate(one)}, {n: j for j, n in enumerate(two)}
    slots = {}
    for k, (a, b) in enumerate(zip(one, two)):
        if a.op != b.op or _shape(a) != _shape(b):
            raise NotALoop(f"step bodies differ ({a.name}: {a.target} vs {b.name}: {b.target})")
        for (path, va), (_, vb) in zip(_arg_items(a), _arg_items(b)):
            if isinstance(va, Node) and isinstance(vb, Node):
                if va in pos1 and vb in pos2 and pos1[va] == pos2[vb]:
                    slots[k, path] = Slot("body", pos1[va])
                elif va is vb:
                    slots[k, path] = Slot("inv", va)
                elif vb in pos1:
                    slots[k, path] = Slot("carry", pos1[vb])
                else:
                    raise NotALoop(f"{b.name} reads {vb.name}, neither loop-invariant nor from the previous step "
                                   "(a dependence on two previous steps)")  # fmt: skip
            elif isinstance(va, Node) or isinstance(vb, Node):
                raise NotALoop(f"step bodies differ at {a.name}")
            elif isinstance(va, int) and isinstance(vb, int) and not isinstance(va, bool) and va != vb:
                slots[k, path] = Slot("time", (vb - va, va))
            elif va != vb:
                raise NotALoop(f"step bodies differ in a constant of {a.name} ({va} vs {vb})")
            else:
                slots[k, path] = Slot("const", va)
    return slots


def _holds(slot: Slot, v: object, pos: dict[Node, int], prev: list[Node], step: int) -> bool:
    """Whether argument value `v` of step `step` is what `slot` says it must be."""
    if slot.kind == "body":
        return isinstance(v, Node) and pos.get(v) == slot.value
    if slot.kind == "carry":
        return isinstance(v, Node) and prev[slot.value] is v
    if slot.kind == "inv":
        return v is slot.value
    if slot.kind == "const":
        return not isinstance(v, Node) and v == slot.value
    stride, at_one = slot.value
    return v == at_one + (step - 1) * stride


def _check_step(loop_slots, body: list[Node], prev: list[Node], template: list[Node], step: int) -> None:
    pos = {n: j for j, n in enumerate(body)}
    for k, (t, n) in enumerate(zip(template, body)):
        if n.op != t.op or _shape(n) != _shape(t):
            raise NotALoop(f"step {step} differs from step 1 ({n.name}: {n.target} vs {t.target})")
        for path, v in _arg_items(n):
            if not _holds(loop_slots[k, path], v, pos, prev, step):
                raise NotALoop(f"step {step} differs from step 1 at {n.name}")


def _unify_step0(loop_slots, template: list[Node], out0: Node, out_pos: int) -> tuple[list[Node], dict[int, Node]]:
    """Step 0's nodes by walking back from its output in step 1's shape; returns them and the carried
    inputs step 0 reads instead of a previous step (position -> node)."""
    body: dict[int, Node] = {}
    init: dict[int, Node] = {}
    stack = [(out_pos, out0)]
    while stack:
        k, n = stack.pop()
        if k in body:
            if body[k] is not n:
                raise NotALoop("step 0 does not have the shape of the other steps")
            continue
        t = template[k]
        if n.op != t.op or _shape(n) != _shape(t):
            raise NotALoop(f"step 0 differs from step 1 ({n.name}: {n.target} vs {t.target})")
        body[k] = n
        for path, v in _arg_items(n):
            slot = loop_slots[k, path]
            if slot.kind == "body":
                stack.append((slot.value, v))
            elif slot.kind == "carry":
                if init.setdefault(slot.value, v) is not v:
                    raise NotALoop("step 0 reads two different initial states for one carried value")
            elif slot.kind == "inv" and v is not slot.value:
                raise NotALoop(f"step 0 reads {getattr(v, 'name', v)} where the other steps read a loop invariant")
            elif slot.kind == "const" and v != slot.value:
                raise NotALoop(f"step 0 differs from step 1 in a constant of {n.name}")
            elif slot.kind == "time" and v != slot.value[1] - slot.value[0]:
                raise NotALoop(f"step 0's time index at {n.name} does not continue the others'")
    if len(body) != len(template):
        raise NotALoop("step 0 does not have the shape of the other steps")
    return [body[k] for k in range(len(template))], init


def chained(outputs: list[Node]) -> bool:
    """Whether step 2's nodes read step 1's and a step is more than a single op or two: a recurrence worth
    a line in the report when it is not matched (an SPPF pool chain concatenated is not)."""
    bodies = _bodies(outputs[:3])
    one = set(bodies[1])
    return len(bodies[1]) >= 3 and any(a in one for n in bodies[2] for a in n.all_input_nodes)


def per_step_outputs(anchor: Node, stacks: tuple = STACKS) -> tuple[list[Node], int] | None:
    """(per-step outputs, dim) when `anchor` stacks or concatenates >= 3 tensors, else None. `stacks`: the
    targets that count (ATen's by default; capture passes `torch.stack`, `torch.cat` for a dynamo graph)."""
    if anchor.op != "call_function" or anchor.target not in stacks or not anchor.args:
        return None
    tensors = anchor.args[0]
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 3 or not all(isinstance(t, Node) for t in tensors):
        return None
    if len(set(tensors)) != len(tensors):
        return None
    dim = anchor.args[1] if len(anchor.args) > 1 else anchor.kwargs.get("dim", 0)
    return list(tensors), dim


def unrolled_steps(anchor: Node, stacks: tuple = STACKS) -> tuple[list[Node], list[list[Node]], dict]:
    """(per-step outputs, bodies, slots) of the isomorphic steps whose outputs `anchor` stacks, every step
    checked against step 1; NotALoop (with the reason) otherwise. `bodies[0]` is empty (step 0 is not told
    apart from what precedes the loop); nothing is required of the state carried from step to step."""
    parsed = per_step_outputs(anchor, stacks)
    if parsed is None:
        raise NotALoop("not a stack of >= 3 per-step outputs")
    outputs, _ = parsed
    bodies = _bodies(outputs)
    if any(len(b) != len(bodies[1]) for b in bodies[1:]) or not bodies[1]:
        raise NotALoop("the per-step outputs are not computed by step bodies of one size")
    slots = _template(bodies)
    for step in range(3, len(outputs)):
        _check_step(slots, bodies[step], bodies[step - 1], bodies[1], step)
    return outputs, bodies, slots


def find_loop(anchor: Node) -> Loop:
    """The unrolled loop whose per-step outputs `anchor` stacks; NotALoop (with the reason) otherwise."""
    outputs, bodies, slots = unrolled_steps(anchor)
    carried = sorted({s.value for s in slots.values() if s.kind == "carry"})
    if not carried:
        raise NotALoop("the steps carry no state from one to the next (a parallel map, not a recurrence)")
    if len(carried) > 1:
        raise NotALoop(f"the steps carry {len(carried)} values from one to the next; one state is supported")
    out_pos = bodies[1].index(outputs[1])
    bodies[0], init = _unify_step0(slots, bodies[1], outputs[0], out_pos)
    if any(bodies[i][out_pos] is not outputs[i] for i in range(len(outputs))):
        raise NotALoop("the stacked outputs are not the same node of each step")
    time_args = [key for key, s in slots.items() if s.kind == "time"]
    return Loop(anchor, outputs, bodies, slots, carried[0], init[carried[0]], time_args)
