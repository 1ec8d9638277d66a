"""Buffer values read at optimize time, and the guard that keeps a rewrite honest when a buffer changes.

Dynamo passes a module's buffers to the captured graph as inputs and guards only their shapes, dtypes and
devices, never their values. A rewrite that relies on a buffer's value (a causal mask registered with
`register_buffer("mask", torch.tril(...))`, proven lower-triangular when matching) is therefore run
behind a guard: per call it compares each such buffer's identity, version counter and storage with those
it last checked (O(1)); when they differ it compares the values with the proven snapshot once, and while they
differ the graph runs exactly as captured.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.fx import GraphModule, Node

BUFFER_KEY = "fxfuse_buffer"  # placeholder meta: (the buffer's name, its value when the graph was captured)
BAKED_KEY = "fxfuse_baked_buffers"  # gm.meta: indices of placeholders whose value an applied rewrite relies on
_BUFFER_SOURCE = re.compile(r"\._buffers\['([^']+)'\]$")


def mark_buffers(dynamo_gm: GraphModule, aten_gm: GraphModule, example_inputs: Sequence[object]) -> None:
    """Give `aten_gm`'s placeholders that are module buffers (as dynamo's sources say) their real value."""
    dynamo_ph = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    aten_ph = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if len(dynamo_ph) != len(aten_ph) or len(aten_ph) != len(example_inputs):
        return
    for d, a, x in zip(dynamo_ph, aten_ph, example_inputs):
        source = getattr(d.meta.get("grapharg"), "source", None)
        name = source.name if isinstance(getattr(source, "name", None), str) else None
        found = _BUFFER_SOURCE.search(name) if name else None
        fake = isinstance(x, torch._subclasses.FakeTensor)
        if found and isinstance(x, torch.Tensor) and not fake and not x.requires_grad:
            a.meta[BUFFER_KEY] = (found.group(1), x)


def buffer_seed(gm: GraphModule) -> dict[Node, torch.Tensor]:
    """Buffer placeholders with their values, as a seed for `attention_scores.constant_value`'s cache;
    a buffer the graph writes into is left out (its value mid-graph is not the captured one)."""
    seed = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" and BUFFER_KEY in n.meta and not _written(n):
            seed[n] = n.meta[BUFFER_KEY][1].detach()
    return seed


def _written(node: Node) -> bool:
    from fxfuse.passes.attention_scores import _written_in_place

    return _written_in_place(node)


def buffers_read(node: Node, seed: dict[Node, torch.Tensor]) -> list[Node]:
    """The seeded buffer placeholders that `node` is computed from."""
    found, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in seed:
            found.append(n)
        stack.extend(n.all_input_nodes)
    return found


def buffer_name(node: Node) -> str:
    return node.meta[BUFFER_KEY][0]


def _state(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """What changes when a tensor may have new values: the object (a reassigned buffer), its version
    counter (in-place writes) and its storage (`.data =` keeps the version)."""
    return x, x._version, x.data_ptr()


def guard_buffers(run: Callable, fallback: Callable, aten_gm: object, example_inputs: Sequence[object],
                  note: Callable[[str], None]) -> Callable:  # fmt: skip
    """`run`, behind a check that the buffers its rewrites rely on still hold the values they were proven
    with; calls where one does not run `fallback` (the graph as captured). `note` is told once.

    The check is by identity, version counter and storage (values are compared only after one of them
    changed): writes that bypass the buffer's version counter, through `buf.data` or a NumPy / DLPack view,
    are not seen; the README says to optimize again after those."""
    baked = sorted(set(getattr(aten_gm, "meta", {}).get(BAKED_KEY, ())))
    if not baked:
        return run
    snapshots = {i: example_inputs[i].detach().clone() for i in baked}
    checked = {i: _state(example_inputs[i]) for i in baked}
    told = []

    def guarded(*args):
        for i in baked:
            x = args[i]
            seen, version, ptr = checked[i]
            if seen is x and version == x._version and ptr == x.data_ptr():
                continue
            if x.shape == snapshots[i].shape and torch.equal(x.detach(), snapshots[i].to(x.device)):
                checked[i] = _state(x)  # rewritten with the same value (a checkpoint load)
                continue
            if not told:
                told.append(True)
                message = ("a buffer that a rewrite relies on changed after it was captured; while it differs, "
                           "that graph runs as captured, unoptimized")  # fmt: skip
                note(message)
                warnings.warn(f"fxfuse: {message}", stacklevel=2)
            return fallback(*args)
        return run(*args)

    return guarded
