"""SSM scans written with torch's `associative_scan`: the log-depth sweep it becomes, matched as one
`fxfuse::selective_scan`.

The rule, on one screen:
- on CPU (combine_mode="generic", Hugging Face's `MambaModel` as shipped) capture records the sweep itself:
  the scanned dim moved to the front, slices with step 2, the combine applied to neighbours, `cat`,
  interleaves (stack + flatten), a pad; where the `associative_scan` higher-order op survives capture
  (combine_mode="pointwise"), its node and combine graph;
- the sweep (or the combine graph) is read symbolically, position by position along the scanned dim:
  each value is a product of decays a_i..a_j, a scan of the inputs b_i..b_j from a zero state, or a
  partial term a_{j+1..k} · scan_{i..j}. The combine must be the linear recurrence (a_l·a_r, a_r·b_l + b_r)
  in either operand order; the match needs a tensor whose every position t holds scan_{0..t}, the states;
- the factors as in `passes/ssm_scan.py` (`passes/ssm_labels.py` labels): a = exp(Δ ⊗ A), b = (Δ·u) ⊗ B,
  read by the fused op as leaves; the readout Σ_n h C as a matmul with C[..., None], an einsum or
  (h * C).sum(n); the final state `states[..., -1, :]` the op's second output;
- states read some other way (a nonlinear readout, several readers): when a = exp(z), the scan alone is
  fused as an elementwise recurrence (Δ = z, A = B = C = 1 over the flattened state, as `passes/ssm_lti.py`
  maps LTI loops) and the readers read the op's states.
Left alone, with the reason in the report: combines that are not this recurrence (a tanh, b_l + b_r, the
reversed order a_l·b_r + b_l), sweeps whose states are read elsewhere, decays that are not exp(Δ ⊗ A).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from fxfuse.passes.rewrite import region_of
from fxfuse.passes.site import Rejection, Site
from fxfuse.passes.ssm_labels import PASS_THROUGH, NotAScan, factors, output_labels, shape, strip_moves
from fxfuse.passes.ssm_scan import (
    SCAN_TOLERANCE,
    _arrange,
    _backend_name,
    _call,
    _classify,
    _input_gen,
    _rename_axes,
    _split,
    _to_layout,
)
from fxfuse.passes.ssm_tail import Tail, skip_and_gate
from fxfuse.passes.verify import random_like

aten = torch.ops.aten
_HOP = getattr(torch.ops.higher_order, "associative_scan", None)


class ReadoutNotFused(NotAScan):
    """The states are read by something other than one readout Σ_n h·C (the plain scan may still apply)."""


class NotTheRecurrence(Exception):
    """The sweep (or combine) does not compute the linear recurrence; the message says where."""


# Symbolic values along the scanned dim, one per position:
#   ("A", i, j): a_i * ... * a_j;  ("B", i, j): the scan of b_i..b_j from a zero state;
#   ("P", i, j, k): a_{j+1..k} * scan_{i..j} (half of a combine);  ("Z",): a zero pad.


def _mul(x: tuple, y: tuple) -> tuple:
    for p, q in ((x, y), (y, x)):
        if p[0] == "A" and q[0] == "A" and p[2] + 1 == q[1]:
            return ("A", p[1], q[2])
        if p[0] == "A" and q[0] == "B" and q[2] + 1 == p[1]:
            return ("P", q[1], q[2], p[2])
    if x[0] == "B" and y[0] == "B":
        raise NotTheRecurrence("the combine multiplies two partial scans")
    if "B" in (x[0], y[0]):
        raise NotTheRecurrence("the combine scales a partial scan by the decays of the wrong side "
                               "(a_l·b_r: the reversed recurrence)")  # fmt: skip
    raise NotTheRecurrence("the combine multiplies values of segments that are not neighbours")


def _add(x: tuple, y: tuple) -> tuple:
    for p, q in ((x, y), (y, x)):
        if p[0] == "P" and q[0] == "B" and q[1] == p[2] + 1 and q[2] == p[3]:
            return ("B", p[1], q[2])
    if x[0] == "B" and y[0] == "B":
        raise NotTheRecurrence("the combine adds two partial scans (b_l + b_r), it does not decay the left one")
    raise NotTheRecurrence("the combine adds values that are not a_r·b_l and b_r")


def _elementwise(fn, xs: list, ys: list) -> list:
    if len(xs) != len(ys):
        raise NotTheRecurrence("the combine's operands have different lengths")
    return [fn(x, y) for x, y in zip(xs, ys)]


def _step(node: Node, env: dict) -> object:
    """The symbolic value of `node` from its inputs' (all in `env`); NotTheRecurrence when the op is not
    one of the sweep's or the linear combine's."""
    t, args = node.target, node.args

    def val(a: Node) -> list:
        v = env[a]
        if not isinstance(v, list):
            raise NotTheRecurrence(f"{node.name} reads a stacked pair outside an interleave")
        return v

    if t in (aten.mul.Tensor, aten.add.Tensor):
        x, y = args[0], args[1]
        if not (isinstance(x, Node) and isinstance(y, Node)) or node.kwargs.get("alpha", 1) != 1:
            raise NotTheRecurrence(f"{node.name} ({t}) mixes the scan with a number")
        if shape(x) != shape(y):
            raise NotTheRecurrence(f"{node.name} broadcasts its operands")
        return _elementwise(_mul if t is aten.mul.Tensor else _add, val(x), val(y))
    if t is aten.slice.Tensor:
        dim = args[1] if len(args) > 1 else 0
        start = args[2] if len(args) > 2 else None
        end = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        if dim % len(shape(args[0])) != 0:
            if shape(args[0]) == shape(node):
                return val(args[0])
            raise NotTheRecurrence(f"{node.name} slices another dim than the scanned one")
        big = 1 << 62
        start = None if start is None or abs(start) >= big else start
        end = None if end is None or abs(end) >= big else end
        return val(args[0])[slice(start, end, step)]
    if t is aten.cat.default:
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        if dim % len(shape(node)) != 0:
            raise NotTheRecurrence(f"{node.name} concatenates along another dim")
        return [v for a in args[0] for v in val(a)]
    if t is aten.stack.default:
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        parts = [val(a) for a in args[0]]
        if dim != 1 or any(isinstance(p, tuple) for p in parts) or len({len(p) for p in parts}) != 1:
            raise NotTheRecurrence(f"{node.name} stacks in a way the sweep does not")
        return ("stacked", [list(row) for row in zip(*parts)])
    if t is aten.flatten.using_ints:
        x = env[args[0]]
        if not (isinstance(x, tuple) and tuple(args[1:3]) == (0, 1)):
            raise NotTheRecurrence(f"{node.name} flattens in a way the sweep does not")
        return [v for row in x[1] for v in row]
    if t in (aten.pad.default, aten.constant_pad_nd.default):
        pad = list(args[1])
        mode = args[2] if len(args) > 2 else node.kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else node.kwargs.get("value", None)
        if t is aten.constant_pad_nd.default:
            mode, value = "constant", args[2] if len(args) > 2 else 0
        rank = len(shape(args[0]))
        if mode != "constant" or value not in (None, 0, 0.0) or len(pad) != 2 * rank or any(pad[:-2]):
            raise NotTheRecurrence(f"{node.name} pads in a way the sweep does not")
        return [("Z",)] * pad[-2] + val(args[0]) + [("Z",)] * pad[-1]
    if t in (aten.alias.default, aten.clone.default):
        return val(args[0])
    raise NotTheRecurrence(f"{node.name} ({t}) is not an op of the linear recurrence's sweep")


def _interpret(a: Node | None, b: Node, length: int) -> tuple[dict, Node | None, str]:
    """Symbolic values of the nodes computed from a and b (scan dim first) alone; the node that holds
    the states (scan_{0..t} at every t), or None with the first reason the sweep broke."""
    env: dict[Node, object] = {b: [("B", t, t) for t in range(length)]}
    if a is not None:
        env[a] = [("A", t, t) for t in range(length)]
    want = [("B", 0, t) for t in range(length)]
    reason, states = "", None
    order = {n: i for i, n in enumerate(b.graph.nodes)}
    todo = sorted({u for x in env for u in x.users}, key=order.__getitem__)
    seen = set(todo)
    while todo:
        node = todo.pop(0)
        if node.op != "call_function" or not all(x in env for x in node.all_input_nodes):
            continue
        try:
            env[node] = _step(node, env)
        except (NotTheRecurrence, NotAScan, IndexError, TypeError) as exc:
            reason = reason or str(exc)
            continue
        if env[node] == want and states is None:
            states = node
        for u in node.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
        todo.sort(key=order.__getitem__)
    return env, states, reason


def _combine_roles(combine: GraphModule) -> tuple[int, str | None]:
    """(index of the inputs b among the op's two operands, None) when the higher-order op's combine graph
    is (a_l·a_r, a_r·b_l + b_r) with the operands in either order; else (-1, why not)."""
    placeholders = [n for n in combine.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 4:
        return -1, f"the combine takes {len(placeholders)} tensors, the linear recurrence 4"
    reason = ""
    for ib in (1, 0):
        roles = ("A", "B") if ib == 1 else ("B", "A")
        seeds = [[(roles[j % 2], j // 2, j // 2)] for j in range(4)]
        env, want = dict(zip(placeholders, seeds)), [[(r, 0, 1)] for r in roles]
        try:
            for node in combine.graph.nodes:
                if node.op == "call_function":
                    env[node] = _step(node, env)
                elif node.op == "output":
                    if [env.get(o) for o in node.args[0]] == want:
                        return ib, None
                    raise NotTheRecurrence("the combine does not return (a_l·a_r, a_r·b_l + b_r)")
        except (NotTheRecurrence, NotAScan) as exc:
            reason = reason or str(exc)
    return -1, reason


def _seed_pairs(gm: GraphModule) -> tuple[list[tuple[Node, Node, Node, Node, int]], list[Node]]:
    """(a_front, b_front, a, b, dim) candidates: two tensors of one shape with the same dim moved to the
    front, both sliced with step 2 (the sweep's first level); and all such fronts."""
    fronts: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.movedim.int and node.args[2] == 0:
            src = node.args[0]
            if not isinstance(src, Node) or not isinstance(src.meta.get("val"), torch.Tensor):
                continue
            strided = [u for u in node.users if u.target is aten.slice.Tensor and (*u.args[1:2], *u.args[4:]) == (0, 2)]
            if strided and len(shape(node)) == 4 and shape(node)[0] >= 2:
                fronts.setdefault((shape(node), node.args[1] % 4), []).append(node)
    pairs = []
    near = {n: {w for u in n.users for w in u.users} for nodes in fronts.values() for n in nodes}
    for (_, dim), nodes in fronts.items():
        for fa in nodes:
            for fb in nodes:
                if fa is not fb and near[fa] & near[fb]:  # the first level's combine reads both
                    pairs.append((fa, fb, fa.args[0], fb.args[0], dim))
    return pairs, [n for nodes in fronts.values() for n in nodes]


def _readout(hs: Node, reader: Node, labels: tuple) -> tuple[str, str, Node, tuple, Node, tuple]:
    """From the states (labels with "l") through `reader`: (kind, contracted label, C operand, C's labels,
    output node, output labels)."""
    node, user = hs, reader
    while True:
        moved = output_labels(user, labels) if user.op == "call_function" and user.args and user.args[0] is node \
            else None  # fmt: skip
        if moved is None:
            break
        if len(user.users) != 1:
            raise NotAScan(f"the states reach {len(user.users)} uses before the readout, one is fused")
        node, labels, user = user, moved, next(iter(user.users))
    t = user.target
    if t is aten.matmul.default and user.args[0] is node and len(labels) >= 2:
        partner = user.args[1]
        ps = shape(partner)
        if ps[-1] != 1 or ps[-2] != shape(node)[-1] or len(ps) > len(labels):
            raise NotAScan("the readout matmul is not states @ C[..., None]")
        contracted = labels[-1]
        lead = labels[len(labels) - len(ps) : -2] if len(ps) > 2 else ()
        c_labels = tuple(None if s == 1 else lab for s, lab in zip(ps[:-2], lead)) + (contracted, None)
        out_labels = (*labels[:-1], None)
        kind = "matmul"
    elif t is aten.einsum.default and len(user.args[1]) == 2 and node in user.args[1]:
        equation = user.args[0].replace(" ", "")
        if "..." in equation or "->" not in equation:
            raise NotAScan(f"the readout einsum '{equation}' has no explicit output")
        operands, output = equation.split("->")
        letters = operands.split(",")
        side = user.args[1].index(node)
        name = dict(zip(letters[side], labels))
        summed = [c for c in letters[side] if c not in output]
        other = letters[1 - side]
        if len(summed) != 1 or any(c not in name for c in other + output) or len(letters[side]) != len(labels):
            raise NotAScan(f"the readout einsum '{equation}' is not a sum over one state axis")
        contracted, partner = name[summed[0]], user.args[1][1 - side]
        c_labels = tuple(name[c] for c in other)
        out_labels = tuple(name[c] for c in output)
        kind = "einsum"
    elif t is aten.mul.Tensor and len(user.users) == 1:
        total = next(iter(user.users))
        side = 0 if user.args[0] is node else 1
        partner = user.args[1 - side]
        if (total.target is not aten.sum.dim_IntList or len(total.args[1]) != 1 or not isinstance(partner, Node)
                or shape(user) != shape(node)):  # fmt: skip
            raise NotAScan("the readout product is not summed over one state axis")
        d = total.args[1][0] % len(labels)
        contracted = labels[d]
        aligned = labels[len(labels) - len(shape(partner)) :]
        c_labels = tuple(None if s == 1 else lab for s, lab in zip(shape(partner), aligned))
        keep = len(total.args) > 2 and total.args[2]
        out_labels = tuple(None if j == d else lab for j, lab in enumerate(labels) if keep or j != d)
        user, kind = total, "sum"
    else:
        raise NotAScan(f"the states are read by {t}, not a readout Σ_n h·C")
    if contracted in (None, "l"):
        raise NotAScan("the readout sums over time, not over the state")
    out = user
    while len(out.users) == 1:
        (nxt,) = out.users
        moved = output_labels(nxt, out_labels) if nxt.op == "call_function" and nxt.args and nxt.args[0] is out \
            else None  # fmt: skip
        if moved is None:
            break
        out, out_labels = nxt, moved
    return kind, contracted, partner, c_labels, out, out_labels


def _no_time(_node: Node) -> None:
    return None


def analyze(hs: Node, a: Node, b: Node, dim: int) -> dict:
    """The selective scan whose states (scan dim `dim`) are `hs`, decays `a`, inputs `b`; or NotAScan."""
    labels = tuple("l" if j == dim else f"s{j}" for j in range(4))
    finals = [u for u in hs.users if u.target is aten.select.int and u.args[1] % 4 == dim
              and u.args[2] in (-1, shape(hs)[dim] - 1)]  # fmt: skip
    readers = [u for u in hs.users if u not in finals]
    try:
        if len(readers) != 1:
            raise NotAScan(f"the states have {len(readers)} readers besides the final state; one readout is fused")
        kind, contracted, partner, c_labels, out, out_labels = _readout(hs, readers[0], labels)
    except NotAScan as exc:
        raise ReadoutNotFused(str(exc)) from exc
    stop = lambda n: False  # noqa: E731
    exp_node, exp_labels = strip_moves(a, labels, _no_time)
    if exp_node.target is not aten.exp.default:
        raise NotAScan(f"the decay is {exp_node.target}, not exp(Δ ⊗ A)")
    dt, A = _split(factors(exp_node.args[0], exp_labels, _no_time, stop), contracted)
    if any("l" in labs for _, labs in A.leaves):
        raise NotAScan("the scanned dim is one the decay's A spans (channels), not time")
    x, B = _split(factors(b, labels, _no_time, stop), contracted)
    C = factors(partner, c_labels, _no_time, stop)
    parts = {"dt": dt, "A": A, "x": x, "B": B, "C": C}
    state_axes = tuple(s for s in labels if s not in (contracted, "l"))
    names = _classify(parts, state_axes, contracted)
    _rename_axes(parts, names)
    sizes = dict(zip([names[s] for s in labels], shape(hs)))
    stacked = tuple(None if lab is None else names[lab] for lab in out_labels)
    if sorted(lab for lab in stacked if lab is not None) != ["b", "d", "l"]:
        raise NotAScan(f"the readout's result spans {stacked}, not batch, channel and time")
    state_labels = tuple(names[s] for s in labels if s != "l")
    return {"parts": parts, "sizes": sizes, "stacked": stacked, "kind": kind, "out": out, "finals": finals,
            "state_labels": state_labels}  # fmt: skip


def _site(found: dict, front: Node, length: int, dim: int, backend: str, form: str) -> Site:
    """The scan with the Mamba block's D skip and silu(z) gate after its readout moved in (passes/ssm_tail.py's
    `skip_and_gate`), or without them where their inputs come from the region itself."""
    fused = _site_with(found, front, length, dim, backend, form, skip_and_gate(found["out"], found["stacked"],
                                                                               found["sizes"]))  # fmt: skip
    if fused.output is found["out"] or not isinstance(region_of(fused), str):
        return fused
    return _site_with(found, front, length, dim, backend, form, Tail(found["out"]))


def _site_with(found: dict, front: Node, length: int, dim: int, backend: str, form: str, tail: Tail) -> Site:
    parts, sizes, finals = found["parts"], found["sizes"], found["finals"]
    leaves = list(dict.fromkeys(leaf for part in parts.values() for leaf, _ in part.leaves))
    tail = tail.reading(leaves)
    inputs = list(dict.fromkeys(leaves + tail.inputs))
    extra = finals[:1]
    out_val = tail.output.meta["val"]
    wide = any(n.meta["val"].dtype == torch.float64 for n in [found["out"], *tail.inputs])

    def emit(graph: Graph, nodes: list[Node]) -> Node | list[Node]:
        import fxfuse.fusion.ssm_scan  # noqa: F401  registers torch.ops.fxfuse.selective_scan

        env = dict(zip(inputs, nodes))
        args = [_arrange(graph, env, parts[name], axes, sizes)
                for name, axes in (("dt", "bdl"), ("A", "dn"), ("x", "bdl"), ("B", "bln"), ("C", "bln"))]  # fmt: skip
        scan = _call(graph, torch.ops.fxfuse.selective_scan.default, *args, None, backend,
                     *tail.op_args(graph, env, found["stacked"], sizes))  # fmt: skip
        state = torch.float64 if wide else torch.float32
        y = _to_layout(graph, _call(graph, operator.getitem, scan, 0), "bdl", found["stacked"], tuple(out_val.shape),
                       out_val.dtype, state)  # fmt: skip
        if not extra:
            return y
        h_val = extra[0].meta["val"]
        h = _to_layout(graph, _call(graph, operator.getitem, scan, 1), "bdn", found["state_labels"],
                       tuple(h_val.shape), h_val.dtype, state)  # fmt: skip
        return [y, h]

    variant = ", ".join(
        ["associative_scan → 1 scan", "selective", "fused discretization"]
        + tail.parts
        + (["final state"] if extra else [])
        + [f"readout {found['kind']}", f"scan dim {dim}", f"{length} steps", form]
    )
    return Site("ssm_scan", variant, front, tail.output, inputs, emit, backend=_backend_name(backend, tail.output),
                tolerance=SCAN_TOLERANCE, input_gen=_input_gen(inputs, parts), extra_region=list(finals),
                extra_outputs=extra)  # fmt: skip


def _states_in_layout(states: Node, dim: int) -> Node | None:
    """The states with the scanned dim moved back to `dim` (the one use of the sweep's result)."""
    users = list(states.users)
    if dim == 0:
        return states
    if len(users) == 1 and users[0].target is aten.movedim.int and tuple(users[0].args[1:]) in ((0, dim), (0, dim - 4)):
        return users[0]
    return None


def find_associative_scans(gm: GraphModule, backend: str) -> list[Site | Rejection]:
    """Every associative-scan sweep of the linear recurrence (or near miss) in `gm`."""
    found: list[Site | Rejection] = []
    used: set[Node] = set()
    pairs, fronts = _seed_pairs(gm)
    near: list[tuple[Node, Node, str]] = []
    for fa, fb, a, b, dim in pairs:
        if fa in used or fb in used:
            continue
        length = shape(fa)[0]
        _, states, reason = _interpret(fa, fb, length)
        if states is None:
            if reason:
                near.append((fa, fb, reason))
            continue
        used.update((fa, fb))
        variant = f"associative_scan, {length} steps, linear recurrence"
        found.append(_scan_site(fa, variant, states, a, b, dim, length, backend, "log-depth sweep"))
    for fa, fb, reason in near:  # a sweep over decays and inputs whose combine is another one
        if fa not in used and fb not in used:
            used.update((fa, fb))
            found.append(Rejection("ssm_scan", f"associative_scan, {shape(fa)[0]} steps", fa, reason))
    found.extend(_higher_order_sites(gm, backend))
    for front in fronts:  # a sweep over one tensor (the combine never reads the other)
        slices = {tuple(u.args[1:]) for u in front.users if u.target is aten.slice.Tensor}
        if front not in used and {(0, 1, None, 2)} <= slices and slices & {(0, 0, -1, 2), (0, 0, None, 2)}:
            _, states, reason = _interpret(None, front, shape(front)[0])
            if states is None and reason:
                found.append(Rejection("ssm_scan", f"associative_scan, {shape(front)[0]} steps", front, reason))
    return found


def _higher_order_sites(gm: GraphModule, backend: str) -> list[Site | Rejection]:
    """Every `associative_scan` higher-order op node (where it survives capture) of the linear recurrence."""
    found: list[Site | Rejection] = []
    for node in gm.graph.nodes:
        if _HOP is None or node.op != "call_function" or node.target is not _HOP:
            continue
        combine_node, xs, extra = node.args[0], list(node.args[1]), node.args[2] if len(node.args) > 2 else ()
        if len(xs) != 2 or extra or combine_node.op != "get_attr":
            why = "the combine reads tensors from outside" if extra else f"the scan carries {len(xs)} tensors, not 2"
            found.append(Rejection("ssm_scan", "associative_scan op", node, why))
            continue
        length = shape(xs[0])[0]
        variant = f"associative_scan op, {length} steps"
        if len(shape(xs[0])) != 4:
            found.append(Rejection("ssm_scan", variant, node, f"the scanned tensors have rank {len(shape(xs[0]))}; "
                                   "[batch, channel, time, state] is fused"))  # fmt: skip
            continue
        ib, reason = _combine_roles(getattr(gm, combine_node.target))
        states = next((u for u in node.users if u.target is operator.getitem and u.args[1] == ib), None)
        if reason is not None or states is None:
            found.append(Rejection("ssm_scan", variant, node, reason or "the states are not read"))
            continue
        fronts = xs[1 - ib], xs[ib]
        moved = all(f.target is aten.movedim.int and f.args[2] == 0 for f in fronts)
        dim = fronts[0].args[1] % 4 if moved and len(shape(fronts[0])) == 4 else 0
        if moved and fronts[1].args[1] % 4 != dim:
            found.append(Rejection("ssm_scan", variant, node, "the decays and inputs are scanned along different dims"))
            continue
        a, b = (f.args[0] for f in fronts) if moved else fronts
        found.append(_scan_site(node, f"{variant}, linear recurrence", states, a, b, dim, length, backend,
                                "higher-order op"))  # fmt: skip
    return found


def _scan_site(anchor: Node, variant: str, states: Node, a: Node, b: Node, dim: int, length: int, backend: str,
               form: str) -> Site | Rejection:  # fmt: skip
    """The site of a scan whose states (scanned dim first) are `states`; a Rejection with the reason when it
    is not one the op computes. Anything unexpected is a rejection too, so that the loops found in the same
    graph keep their rewrites."""
    try:
        hs = _states_in_layout(states, dim)
        if hs is None:
            raise NotAScan("the states are read before the scanned dim is moved back")
        try:
            return _site(analyze(hs, a, b, dim), anchor, length, dim, backend, form)
        except ReadoutNotFused as exc:
            plain = _plain_site(
                hs,
                a,
                b,
                dim,
                backend,
                f"associative_scan → 1 scan, elementwise, exp decay, states "
                f"materialized (readout not fused: {exc}), scan dim {dim}, {length} steps, {form}",
            )
            if plain is None:
                raise
            return plain
    except NotAScan as exc:
        return Rejection("ssm_scan", variant, anchor, str(exc))
    except Exception as exc:  # noqa: BLE001
        return Rejection("ssm_scan", variant, anchor, f"not analysed ({type(exc).__name__}: {exc})")


def _plain_site(hs: Node, a: Node, b: Node, dim: int, backend: str, variant: str) -> Site | None:
    """The scan as an elementwise recurrence h_t = exp(z_t) h_{t-1} + b_t over every other position, the op
    run with Δ = z, A = B = C = 1 on the flattened state (exp(z·1) = exp(z), h·1 = h, as `passes/ssm_lti.py`
    maps LTI loops): exact for any readout, which stays as the user wrote it, reading the op's states.
    None when the decay is not exp(z) (the op takes log-decays)."""
    node = a
    while node.op == "call_function" and node.target in PASS_THROUGH:
        node = node.args[0]
    if node.op != "call_function" or node.target is not aten.exp.default or not isinstance(node.args[0], Node):
        return None
    z, full = node.args[0], list(shape(hs))
    if list(shape(b)) != full or len(shape(z)) > len(full) or shape(a) != tuple(full):
        return None
    if any(s not in (1, w) for s, w in zip(shape(z)[::-1], full[::-1])):
        return None
    length = full[dim]
    channels = max(1, hs.meta["val"].numel() // max(length, 1))
    out_dtype = hs.meta["val"].dtype
    inputs = [z, b]

    def emit(graph: Graph, nodes: list[Node]) -> Node:
        import fxfuse.fusion.ssm_scan  # noqa: F401  registers torch.ops.fxfuse.selective_scan

        state = torch.float64 if any(n.meta["val"].dtype == torch.float64 for n in inputs) else torch.float32

        def flat(x: Node, like: Node) -> Node:
            if like.meta["val"].dtype != state:
                x = graph.call_function(aten._to_copy.default, (x,), {"dtype": state})
            x = _call(graph, aten.movedim.int, _call(graph, aten.expand.default, x, full), dim, -1)
            return _call(graph, aten.reshape.default, x, [1, channels, length])

        dt, x = flat(nodes[0], z), flat(nodes[1], b)
        ones_a = _call(graph, aten.full.default, [channels, 1], 1.0)
        ones = _call(graph, aten.full.default, [1, length, 1], 1.0)
        if state == torch.float64:
            ones_a = graph.call_function(aten._to_copy.default, (ones_a,), {"dtype": state})
            ones = graph.call_function(aten._to_copy.default, (ones,), {"dtype": state})
        scan = _call(graph, torch.ops.fxfuse.selective_scan.default, dt, ones_a, x, ones, ones, None, backend)
        moved = [s for j, s in enumerate(full) if j != dim] + [length]
        hs_new = _call(graph, aten.reshape.default, _call(graph, operator.getitem, scan, 0), moved)
        hs_new = _call(graph, aten.movedim.int, hs_new, -1, dim)
        if out_dtype != state:
            hs_new = graph.call_function(aten._to_copy.default, (hs_new,), {"dtype": out_dtype})
        return hs_new

    def input_gen(index: int, val: torch.Tensor, case: str, seed: int) -> torch.Tensor | None:
        """The log-decay z <= 0, as trained models keep it: a growing state would overflow the original."""
        return -random_like(val, "normal", seed + 97).abs() if index == 0 else None

    return Site("ssm_scan", variant, hs, hs, inputs, emit, backend=_backend_name(backend, hs),
                tolerance=SCAN_TOLERANCE, input_gen=input_gen)  # fmt: skip
