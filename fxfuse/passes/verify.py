"""Verify: a candidate is run against its fused replacement on random inputs before it is applied.

Inputs have the captured shapes and dtypes. The cases cover several seeds, large magnitudes and all-negative
values (which is what tells -inf padding from zero padding, for one). Outputs must agree within a dtype-aware
relative tolerance, with NaN and ±inf exactly where the original has them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

# (case, seed): the default generator scales standard normals per case.
CASES: tuple[tuple[str, int], ...] = (("normal", 0), ("normal", 1), ("normal", 2), ("large", 3), ("negative", 4))
_SCALE = {"normal": 1.0, "large": 100.0}
# Half precision overflows at 65504: x100 inputs make the original's own fp16 products inf (then NaN),
# which tests fp16 arithmetic, not the rewrite. x10 still exercises saturated softmaxes.
_HALF_LARGE = 10.0


def tolerance(dtype: torch.dtype, override: float | None = None) -> float:
    """Relative tolerance: 1e-5 for fp32/fp64 (or the site's override), 1e-2 for half precision."""
    if dtype in (torch.float16, torch.bfloat16):
        return max(1e-2, override or 0.0)
    return override if override is not None else 1e-5


def random_like(val: torch.Tensor, case: str, seed: int) -> torch.Tensor:
    """A random tensor with `val`'s shape, dtype and device (`val` may be a FakeTensor)."""
    gen = torch.Generator().manual_seed(seed)
    shape, dtype = tuple(val.shape), val.dtype
    if dtype == torch.bool:
        out = torch.rand(shape, generator=gen) < 0.5
    elif dtype.is_floating_point or dtype.is_complex:
        out = torch.randn(shape, generator=gen, dtype=torch.float64)
        scale = _HALF_LARGE if case == "large" and dtype in (torch.float16, torch.bfloat16) else _SCALE.get(case, 1.0)
        out = -out.abs() if case == "negative" else out * scale
        out = out.to(dtype)
    else:
        out = torch.randint(0, 4, shape, generator=gen).to(dtype)
    return out.to(val.device)


@dataclass
class Comparison:
    ok: bool
    max_rel_err: float
    reason: str = ""


def compare(got: object, want: object, rtol: float) -> Comparison:
    """Compare (nested) outputs: same structure, NaN/inf positions identical, max relative error <= rtol.

    The relative error of a tensor is max|got - want| / max|want| over finite entries, so it does not
    blow up at entries that happen to be near zero.
    """
    if isinstance(want, Mapping):  # dicts and Hugging Face ModelOutputs
        if not isinstance(got, Mapping) or list(got.keys()) != list(want.keys()):
            return Comparison(False, float("inf"), "output keys differ")
        return compare(list(got.values()), list(want.values()), rtol)
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return Comparison(False, float("inf"), "output structure differs")
        worst = Comparison(True, 0.0)
        for g, w in zip(got, want):
            c = compare(g, w, rtol)
            if not c.ok:
                return c
            worst = Comparison(True, max(worst.max_rel_err, c.max_rel_err))
        return worst
    if not isinstance(want, torch.Tensor):
        return Comparison(got == want, 0.0 if got == want else float("inf"), "" if got == want else "values differ")
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return Comparison(False, float("inf"), f"shape {getattr(got, 'shape', None)} != {tuple(want.shape)}")
    if got.dtype != want.dtype:
        return Comparison(False, float("inf"), f"dtype {got.dtype} != {want.dtype}")
    if not want.dtype.is_floating_point:
        same = torch.equal(got, want)
        return Comparison(same, 0.0 if same else float("inf"), "" if same else "integer outputs differ")
    g, w = got.detach().double(), want.detach().double()
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        n = int((torch.isnan(g) != torch.isnan(w)).sum())
        return Comparison(False, float("inf"), f"NaN at {n} position(s) where the original has none, or vice versa")
    inf_w, inf_g = torch.isinf(w), torch.isinf(g)
    if not torch.equal(inf_w, inf_g) or not torch.equal(g[inf_w], w[inf_w]):
        return Comparison(False, float("inf"), "±inf positions differ")
    finite = torch.isfinite(w)
    if not finite.any():
        return Comparison(True, 0.0)
    scale = w[finite].abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    err = float(((g - w)[finite].abs().max() / scale).item())
    if err <= rtol:
        return Comparison(True, err)
    return Comparison(False, err, f"max relative error {err:.2e} > tolerance {rtol:.0e}")


def run_cases(
    original: Callable,
    fused: Callable,
    make_inputs: Callable[[str, int], Sequence[object]],
    rtol: float,
    cases: Sequence[tuple[str, int]] = CASES,
) -> Comparison:
    """Run both callables on each case's inputs; the first failing case decides."""
    worst = 0.0
    for case, seed in cases:
        inputs = make_inputs(case, seed)
        with torch.no_grad():
            want = original(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
            try:
                got = fused(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
            except Exception as exc:  # a fused op that fails on valid input is a rejection, not a crash
                return Comparison(False, float("inf"), f"fused op raised {type(exc).__name__}: {exc}")
        c = compare(got, want, rtol)
        if not c.ok:
            c = _at_least_as_accurate(original, inputs, got, want, rtol) or c
        if not c.ok:
            return Comparison(False, c.max_rel_err, f"{c.reason} (case {case}, seed {seed})")
        worst = max(worst, c.max_rel_err)
    return Comparison(True, worst)


def _at_least_as_accurate(original: Callable, inputs: Sequence[object], got, want, rtol: float) -> Comparison | None:
    """For half-precision sites: the fused op (float32 accumulation) may differ from an fp16 original by
    more than 1e-2 where the original itself is that far from the exact answer (large-magnitude scores).
    Accept it when it is at least as close as the original to a float64 run of the original; else None."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    if not leaves or not all(t.dtype in (torch.float16, torch.bfloat16) for t in leaves):
        return None
    wide = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    try:
        with torch.no_grad():
            truth = original(*wide)
        truth = torch.utils._pytree.tree_map(lambda t: t.to(leaves[0].dtype).double() if isinstance(t, torch.Tensor)
                                             else t, truth)
        as_half = lambda out: torch.utils._pytree.tree_map(
            lambda t: t.double() if isinstance(t, torch.Tensor) else t, out)
        mine = compare(as_half(got), truth, float("inf"))
        theirs = compare(as_half(want), truth, float("inf"))
    except Exception:
        return None
    if not mine.ok:
        return None  # NaN/inf where the exact answer has none
    if mine.max_rel_err <= max(rtol, theirs.max_rel_err):
        return Comparison(True, mine.max_rel_err)
    return None


def _identity(x, *args, **kwargs):
    return x


_DROPOUTS = (
    "torch.nn.functional.dropout",
    "torch.nn.functional.dropout1d",
    "torch.nn.functional.dropout2d",
    "torch.nn.functional.dropout3d",
    "torch.nn.functional.alpha_dropout",
    "torch.nn.functional.feature_alpha_dropout",
    "torch.dropout",
    "torch.feature_dropout",
    "torch.alpha_dropout",
    "aten.dropout.default",
    "aten.feature_dropout.default",
    "aten.alpha_dropout.default",
)


def _is_dropout(target: object) -> bool:
    name = getattr(target, "__module__", "") + "." + getattr(target, "__name__", "")
    return str(target) in _DROPOUTS or name in _DROPOUTS


@contextlib.contextmanager
def without_dropout(*modules: torch.fx.GraphModule):
    """Dropout made the identity (and fused ops' `dropout_p` 0) while comparing: a rewrite is checked on
    what it computes, not on which random numbers it draws. Restored on exit."""
    saved = []
    for gm in modules:
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if _is_dropout(node.target):
                saved.append((node, node.target, node.args))
                node.target = _identity
            elif str(node.target) == "fxfuse.attention.default" and len(node.args) > 12 and node.args[12]:
                saved.append((node, node.target, node.args))
                node.args = (*node.args[:12], 0.0, *node.args[13:])
        gm.recompile()
    try:
        yield
    finally:
        for node, target, args in saved:
            node.target, node.args = target, args
        for gm in modules:
            gm.recompile()
