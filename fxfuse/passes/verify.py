"""Verify: a candidate is run against its fused replacement on random inputs before it is applied.

Inputs have the captured shapes and dtypes. The cases cover several seeds, large magnitudes and all-negative
values (which is what tells -inf padding from zero padding, for one). The truth is the original region run
in float64: the fused result must be within a dtype-aware relative tolerance of it, or no more than FACTOR
times further from it than the original at its own dtype is (a rewrite may be more accurate than the
original, never clearly less), with NaN and ±inf exactly where the original has them. When the graph
trains, the region's backward is judged the same way, through vector-Jacobian products.
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
        out = torch.randn(shape, generator=gen, dtype=torch.complex128 if dtype.is_complex else torch.float64)
        scale = _HALF_LARGE if case == "large" and dtype in (torch.float16, torch.bfloat16) else _SCALE.get(case, 1.0)
        if case == "negative":  # complex: both parts negative
            out = -torch.view_as_real(out).abs() if dtype.is_complex else -out.abs()
            out = torch.view_as_complex(out) if dtype.is_complex else out
        else:
            out = out * scale
        out = out.to(dtype)
    else:
        out = torch.randint(0, 4, shape, generator=gen).to(dtype)
    return out.to(val.device)


@dataclass
class Comparison:
    """`max_rel_err`: the result's error (against the float64 truth, in `run_cases`); `original_rel_err`:
    the original's own error against that truth; `note`: how the judgement was made, when not as usual."""

    ok: bool
    max_rel_err: float
    reason: str = ""
    original_rel_err: float | None = None
    tolerance: float | None = None
    note: str = ""


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
    if want.dtype.is_complex:  # judged as (real, imaginary) pairs
        got, want = torch.view_as_real(got.resolve_conj()), torch.view_as_real(want.resolve_conj())
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


# Accept a fused result no more than this many times further from the float64 truth than the original is:
# two orderings of the same float computation differ in rounding by a small factor from draw to draw (1.5x
# to 2x at saturated softmaxes), while a wrong rewrite is off by its mistake, which the normal-magnitude
# cases, where the original is ~1e-7 from the truth, expose far above both the tolerance and 2x.
FACTOR = 2.0
# Gradients (only for graphs that train) are checked on fewer cases: a backward pass costs two forwards.
GRAD_CASES: tuple[tuple[str, int], ...] = (("normal", 0), ("negative", 4))


def float64_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with every floating dtype argument (`.to(float16)`, `softmax(..., dtype=float32)`) made float64,
    so that inputs upcast to float64 stay float64 throughout: the truth a region is judged against."""
    wide = lambda a: (torch.float64 if a.is_floating_point else torch.complex128 if a.is_complex else a) \
        if isinstance(a, torch.dtype) else a  # noqa: E731
    graph = torch.fx.Graph()
    env: dict = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
        if _has_float_dtype((node.args, node.kwargs)):  # setting args again costs as much as the copy
            env[node].args = torch.fx.node.map_aggregate(env[node].args, wide)
            env[node].kwargs = torch.fx.node.map_aggregate(env[node].kwargs, wide)
    return torch.fx.GraphModule(gm, graph)


def widen(x: object) -> object:
    """A floating tensor as float64, a complex one as complex128; anything else as it is."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x.to(torch.complex128) if isinstance(x, torch.Tensor) and x.is_complex() else x


def _has_float_dtype(value: object) -> bool:
    if isinstance(value, torch.dtype):
        return value.is_floating_point or value.is_complex
    if isinstance(value, (list, tuple)):
        return any(_has_float_dtype(v) for v in value)
    if isinstance(value, dict):
        return any(_has_float_dtype(v) for v in value.values())
    return False


def _upcast(xs: Sequence[object]) -> list[object]:
    return [widen(x) for x in xs]


def _real_leaves(out: object) -> list[object]:
    """The leaves of `out`, complex tensors as their (real, imaginary) pairs (`torch.view_as_real`)."""
    real = lambda t: torch.view_as_real(t.resolve_conj()) if isinstance(t, torch.Tensor) and t.is_complex() else t  # noqa: E731
    return [real(t) for t in torch.utils._pytree.tree_leaves(out)]


def _clones(xs: Sequence[object]) -> list[object]:
    return [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in xs]


def _rel_err(x: torch.Tensor, truth: torch.Tensor, where: torch.Tensor) -> float:
    """compare()'s normwise relative error, max|x - truth| / max|truth|, over the entries `where`."""
    if not where.any():
        return 0.0
    t = truth.detach().double()[where]
    scale = t.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float(((x.detach().double()[where] - t).abs().max() / scale).item())


def _finite_or_zero(x: object) -> object:
    zero = lambda t: torch.nan_to_num(t.detach(), 0.0, 0.0, 0.0) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E501, E731
    return torch.utils._pytree.tree_map(zero, x)


def judge(got: object, want: object, truth: object, rtol: float, what: str = "", exact_nan: bool = True) -> Comparison:
    """Accuracy of `got` (the fused result) against `truth` (the original run in float64), `want` (the
    original at its own dtype) setting the bar.

    Structure, dtypes, integer values and NaN/±inf positions must equal the original's exactly. Each
    floating tensor is then judged on the entries finite in both the original and the truth (an original
    that overflows does not wave the rest through): accepted when its error against the truth is within
    `rtol`, or within FACTOR times the original's own error. `truth=None` (no float64 run) judges against
    the original itself. `what` names the tensor in the reason ("gradient of input 0"). `exact_nan=False`
    drops the NaN/±inf rule: entries not finite on any side are left out.
    """
    # structure, dtypes and integer values; NaN/±inf positions too unless `exact_nan` is off
    exact = compare(*((got, want) if exact_nan else (_finite_or_zero(got), _finite_or_zero(want))), float("inf"))
    if not exact.ok:
        return Comparison(False, float("inf"), f"{what}: {exact.reason}" if what else exact.reason)
    gots, wants = _real_leaves(got), _real_leaves(want)
    truths = _real_leaves(truth) if truth is not None else wants
    if len(truths) != len(wants):
        truths = wants  # a float64 run that returns another structure tells nothing; judge on the original
    worst = Comparison(True, 0.0, original_rel_err=0.0, tolerance=rtol)
    for g, w, t in zip(gots, wants, truths):
        if not (isinstance(w, torch.Tensor) and w.is_floating_point()):
            continue
        if not isinstance(t, torch.Tensor) or t.shape != w.shape:
            t = w
        finite = torch.isfinite(w) & torch.isfinite(t) & torch.isfinite(g)
        mine, theirs = _rel_err(g, t, finite), _rel_err(w, t, finite)
        worst.max_rel_err = max(worst.max_rel_err, mine)
        worst.original_rel_err = max(worst.original_rel_err, theirs)
        if mine > rtol and mine > FACTOR * theirs:
            label = f"{what}: " if what else ""
            return Comparison(
                False, mine,
                f"{label}relative error {mine:.2e} vs float64 > tolerance {rtol:.0e} and > {FACTOR:g}x the "
                f"original's own {theirs:.2e}",
                original_rel_err=theirs, tolerance=rtol,
            )  # fmt: skip
    return worst


def run_cases(
    original: Callable,
    fused: Callable,
    make_inputs: Callable[[str, int], Sequence[object]],
    rtol: float,
    cases: Sequence[tuple[str, int]] = CASES,
    truth: Callable | None = None,
    grad_inputs: Sequence[bool] = (),
    grad_cases: Sequence[tuple[str, int]] = GRAD_CASES,
    names: Sequence[str] = (),
) -> Comparison:
    """Run the original, the fused callable and the truth on each case's inputs; the first failure decides.

    The truth is `truth` (default: `original`) run on the inputs with floating tensors upcast to float64.
    The fused result must have NaN/±inf exactly where the original has them and elsewhere be within
    `rtol` of the truth or no more than FACTOR times further from it than the original is (see `judge`).
    When the truth cannot run (an op without a float64 kernel), the original at its own dtype is the
    truth and the result says so in `note`.

    `grad_inputs[i]` marks inputs the captured graph differentiates: on `grad_cases`, vector-Jacobian
    products with one random cotangent per output are held to the same rule (`names` label the inputs).
    The errors returned are the forward's, unless a gradient fails.
    """
    worst = Comparison(True, 0.0, original_rel_err=0.0, tolerance=rtol)
    truth_fn = truth or original
    for case, seed in cases:
        inputs = make_inputs(case, seed)
        marked = [] if (case, seed) not in grad_cases else [
            i for i, (x, g) in enumerate(zip(inputs, grad_inputs))
            if g and isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
        ]  # fmt: skip
        want = _forward(original, inputs, marked)
        try:
            got = _forward(fused, inputs, marked)
        except Exception as exc:  # a fused op that fails on valid input is a rejection, not a crash
            return Comparison(False, float("inf"), f"fused op raised {type(exc).__name__}: {exc}")
        exact = None
        if not worst.note:
            try:
                exact = _forward(truth_fn, _upcast(inputs), marked)
            except Exception as exc:
                worst.note = f"judged against the original (no float64 run: {type(exc).__name__}: {exc})"
        c = judge(got[1], want[1], None if exact is None else exact[1], rtol)
        if c.ok and marked:  # a failing backward decides; the errors recorded are the forward's
            g = _judge_gradients(want, got, exact, marked, seed, rtol, names)
            c = c if g.ok else g
        if not c.ok:
            return Comparison(False, c.max_rel_err, f"{c.reason} (case {case}, seed {seed})",
                              c.original_rel_err, rtol, worst.note)  # fmt: skip
        worst.max_rel_err = max(worst.max_rel_err, c.max_rel_err)
        worst.original_rel_err = max(worst.original_rel_err, c.original_rel_err or 0.0)
    if worst.note:
        worst.original_rel_err = None
    return worst


def _forward(fn: Callable, inputs: Sequence[object], marked: Sequence[int]) -> tuple[list, object]:
    """(the inputs fn ran on, its output): on clones, the `marked` ones requiring grad; no autograd
    graph when none is marked."""
    xs = _clones(inputs)
    for i in marked:
        xs[i].requires_grad_(True)
    with torch.set_grad_enabled(bool(marked)):
        return xs, fn(*xs)


def _float_leaves(out: object) -> list[torch.Tensor]:
    return [o for o in torch.utils._pytree.tree_leaves(out)
            if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())]


def _vjp(run: tuple[list, object], marked: Sequence[int], cotangents: Sequence[torch.Tensor]) -> list:
    """Gradients of <output, cotangents> w.r.t. the `marked` inputs of a `_forward` run (zeros where
    unused); each cotangent is cast to its output's dtype."""
    xs, out = run
    outs = _float_leaves(out)
    pairs = [(o, c.to(device=o.device, dtype=o.dtype)) for o, c in zip(outs, cotangents) if o.requires_grad]
    wanted = [xs[i] for i in marked]
    grads = [None] * len(wanted)
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads)]


def _judge_gradients(want: tuple, got: tuple, exact: tuple | None, marked: Sequence[int], seed: int, rtol: float,
                     names: Sequence[str]) -> Comparison:  # fmt: skip
    """The region's backward, judged like its forward: one vector-Jacobian product per side, with the same
    cotangents (drawn at the original's dtype; the truth gets those values in float64).

    Outputs that are not finite (fully-masked attention rows) get a zero cotangent, as a loss that can be
    trained must leave them out. Their NaN still reaches the backward, in places that depend on the
    formula (NaN * 0 stays NaN through a matmul, a `where` stops it), so gradients of such a case are
    judged on the entries finite on every side; NaN placement is exact where the forward is finite."""
    outs = _float_leaves(want[1])
    gen = torch.Generator().manual_seed(10_000 + seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.complex128 if o.is_complex() else torch.float64).to(o.dtype)
            for o in outs]  # fmt: skip
    finite = all(bool(torch.isfinite(o).all()) for o in outs)
    cots = [c.masked_fill(~torch.isfinite(o.detach()), 0.0) for c, o in zip(cots, outs)]
    want_grads = _vjp(want, marked, cots)
    try:
        got_grads = _vjp(got, marked, cots)
    except Exception as exc:
        return Comparison(False, float("inf"), f"fused op's backward raised {type(exc).__name__}: {exc}")
    exact_grads = None
    if exact is not None:
        with contextlib.suppress(Exception):  # no float64 backward: judged against the original's gradients
            exact_grads = _vjp(exact, marked, cots)
    worst = Comparison(True, 0.0, original_rel_err=0.0, tolerance=rtol)
    for k, i in enumerate(marked):
        name = f"input {i}" + (f" ({names[i]})" if i < len(names) else "")
        truth = None if exact_grads is None else exact_grads[k]
        c = judge(got_grads[k], want_grads[k], truth, rtol, f"gradient of {name}", exact_nan=finite)
        if not c.ok:
            return c
        worst.max_rel_err = max(worst.max_rel_err, c.max_rel_err)
        worst.original_rel_err = max(worst.original_rel_err, c.original_rel_err or 0.0)
    return worst


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
    saved, changed = [], []
    for gm in modules:
        before = len(saved)
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if _is_dropout(node.target):
                saved.append((node, node.target, node.args))
                node.target = _identity
            elif str(node.target) == "fxfuse.attention.default" and len(node.args) > 12 and node.args[12]:
                saved.append((node, node.target, node.args))
                node.args = (*node.args[:12], 0.0, *node.args[13:])
        if len(saved) > before:  # only then: the code of an unrolled loop's region takes ~0.1 s to regenerate
            changed.append(gm)
            gm.recompile()
    try:
        yield
    finally:
        for node, target, args in saved:
            node.target, node.args = target, args
        for gm in changed:
            gm.recompile()
