"""Public entry points: `optimize`, `report`."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from fxfuse import families
from fxfuse.dynamo_backend import Options, compiled_report, compiled_target, last_compiled_report, make_backend
from fxfuse.report import Report

RECOMPILE_LIMIT = 256
VERBOSE_ENV = "FXFUSE_VERBOSE"  # =1: dynamo's own log of frames it could not capture, in full
# Traced as no-ops: a filter change breaks the graph (a C builtin), and inside `with catch_warnings()`
# the break cannot resume, so dynamo runs the whole frame eagerly (YOLOv5's SPP and SPPF silence a
# max_pool2d warning that way). A filter the captured forward sets is then not set while it runs, so a
# warning it meant to silence may print; numbers are not affected.
_NO_OP_WHILE_TRACED = frozenset({warnings.simplefilter, warnings.filterwarnings})
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit())


def _no_op_while_traced(cfg) -> frozenset:
    """The functions to add to dynamo's `ignore_logging_functions` for this call: none before torch 2.12
    (the config is missing before 2.11, and 2.11's config logging cannot serialise functions in it)."""
    if _TORCH_VERSION < (2, 12) or not isinstance(getattr(cfg, "ignore_logging_functions", None), set):
        return frozenset()
    return _NO_OP_WHILE_TRACED - cfg.ignore_logging_functions


class _FallbackLog(logging.Filter):
    """Holds back dynamo's "WON'T CONVERT" records (a frame it could not capture, with a traceback of
    ~400 lines each); `summaries` keeps one line per frame instead."""

    def __init__(self) -> None:
        super().__init__()
        self.summaries: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("WON'T CONVERT"):
            return True
        where = message.splitlines()[0].removeprefix("WON'T CONVERT").strip()
        exc = record.exc_info[1] if record.exc_info else None
        cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        self.summaries.append(f"could not capture {where} ({cause[:200]}); it ran eagerly")
        return False


class _MetaErrorLog(logging.Filter):
    """Holds back the fake-tensor layer's "failed while attempting to run meta" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("failed while attempting to run meta")


@contextlib.contextmanager
def _quiet_fallbacks(report: Report) -> Iterator[None]:
    """A call that fails in the user's own code (a wrong input shape) shows the user's error alone; a
    frame dynamo could not capture while the call itself worked becomes one note and one warning.
    FXFUSE_VERBOSE=1 leaves dynamo's log as it is."""
    if os.environ.get(VERBOSE_ENV, "0") not in ("", "0"):
        yield
        return
    logger, held = logging.getLogger("torch._dynamo.convert_frame"), _FallbackLog()
    # A shape error met while tracing is first logged with its traceback by the fake-tensor layer; the
    # same error then reaches the user from the eager run (or the frame is summarised as above).
    fake, meta_errors = logging.getLogger("torch._subclasses.fake_tensor"), _MetaErrorLog()
    logger.addFilter(held)
    fake.addFilter(meta_errors)
    try:
        yield
    finally:
        logger.removeFilter(held)
        fake.removeFilter(meta_errors)
    for summary in held.summaries:  # reached only when the call returned
        if summary not in report.notes:
            report.notes.append(summary)
            warnings.warn(f"fxfuse: {summary} (set {VERBOSE_ENV}=1 for dynamo's log)", stacklevel=4)


class OptimizedModule(nn.Module):
    """Calls like the original model (same args/kwargs, same outputs) and shares its parameters.

    `state_dict`/`load_state_dict` use the original's keys; unknown attributes are looked up on the
    original (so `opt.config` works for Hugging Face models).
    """

    def __init__(self, model: nn.Module, options: Options) -> None:
        super().__init__()
        self.original = model
        self.options = options
        self.fxfuse_report = Report(verified=options.verify)
        compiled = torch.compile(model, backend=make_backend(options, self.fxfuse_report), dynamic=False)
        # Not registered as a submodule: it would list every parameter a second time.
        object.__setattr__(self, "_compiled", compiled)
        self._passthrough = False

    def forward(self, *args, **kwargs):
        if self._passthrough:
            return self.original(*args, **kwargs)
        cfg = torch._dynamo.config
        saved = (cfg.suppress_errors, cfg.recompile_limit, cfg.accumulated_recompile_limit, cfg.capture_scalar_outputs)
        # Anything dynamo cannot trace runs eagerly (graph break or whole-frame fallback), never fails.
        # Dynamo caches per code object: every optimized instance of one class, every shape and grad
        # mode adds an entry, so its default limit of 8 would silently stop optimizing the ninth.
        # (Plain attribute sets: config.patch costs twice as much on every call.)
        cfg.suppress_errors, cfg.recompile_limit = True, max(saved[1], RECOMPILE_LIMIT)
        cfg.accumulated_recompile_limit = max(saved[2], 4 * RECOMPILE_LIMIT)
        # `.item()` traced, not a graph break: a break inside a loop (a packed-sequence mask built by slicing
        # at cu_seqlens values) makes dynamo skip the whole frame, attention included, unreported
        cfg.capture_scalar_outputs = True
        ignored = _no_op_while_traced(cfg)
        try:
            if ignored:
                cfg.ignore_logging_functions |= ignored
            with _quiet_fallbacks(self.fxfuse_report):
                out = self._compiled(*args, **kwargs)
        except Exception:
            _capture_again_next_call(self.original)
            raise
        finally:
            if ignored:
                cfg.ignore_logging_functions -= ignored
            (cfg.suppress_errors, cfg.recompile_limit, cfg.accumulated_recompile_limit,
             cfg.capture_scalar_outputs) = saved  # fmt: skip
        rep = self.fxfuse_report
        if rep.graphs and not rep.rewrites and not rep.notes:
            # Nothing in this model looks like a pattern: later calls skip dynamo's guard checks.
            self._passthrough = True
            rep.notes.append("no candidate sites: calls go straight to the original model")
        return out

    def state_dict(self, *args, **kwargs):
        return self.original.state_dict(*args, **kwargs)

    # Names as in the original (and its state_dict), not under `original.`: code that pairs parameters
    # by name (optimizer groups, weight decay filters, checkpoint tools) sees the same model.
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.original.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.original.named_buffers(prefix, recurse, remove_duplicate)

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True):
        return self.original.named_modules(memo, prefix, remove_duplicate)

    def load_state_dict(self, *args, **kwargs):
        return self.original.load_state_dict(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original"), name)


def _capture_again_next_call(model: nn.Module) -> None:
    """A call that raised (the user's own error, such as a wrong input shape) failed dynamo's capture too,
    and with suppress_errors dynamo marks the forward's code "skip" for good: every later call of every
    instance of the class, even a fresh `optimize`, would run eagerly, unreported. Clear that mark."""
    code = getattr(type(model).forward, "__code__", None)
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # a torch without per-code strategies has no such mark either
        return
    if code is not None:
        set_code_exec_strategy(code, FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT))


def _capture_now(opt: OptimizedModule, example_inputs: tuple, example_kwargs: dict | None = None) -> None:
    """Run the model once so capture, rewrite and verification happen now, leaving no trace: buffers
    (batch-norm statistics) and the RNG state are restored afterwards."""
    model = opt.original
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.random.get_rng_state()
    try:
        opt(*example_inputs, **(example_kwargs or {}))
    finally:
        torch.random.set_rng_state(rng)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def optimize(
    model: nn.Module,
    example_inputs: Sequence[object] | Mapping[str, object] | None = None,
    *,
    patterns: Sequence[str] | None = None,
    backend: str = "auto",
    verify: bool = True,
    compile_rest: bool = False,
) -> OptimizedModule:
    """Find the registered pattern families (attention, linear attention, SSM scans, SPP) in `model`,
    verify each rewrite against a float64 run of the original and fuse it; returns an `OptimizedModule`
    that calls like `model` and shares its parameters. `fxfuse.report(opt)` says what was done.

    example_inputs: a tuple of positional arguments (one tensor is taken as a 1-tuple), or a dict of
        keyword arguments such as a tokenizer's output. With it, capture, rewrite and verification happen
        now; without, at the first call (and again for inputs the captured graph does not cover: a new
        shape, dtype or device, as with `torch.compile`).
    patterns: family names to look for (default: all), e.g. ["attention", "spp"]; see
        `fxfuse.families.names()`.
    backend: what the fused ops run: "auto" (CUDA tensors: "triton", CPU tensors: "cpu"), "triton",
        "cpu" or "reference" (the plain-PyTorch implementation). One that cannot run on the inputs' device
        falls back to "reference", with a note in the report.
    verify: False skips the per-site check against float64 and the whole-graph check (the report says so).
    compile_rest: True hands the rewritten graph to Inductor, the fused ops staying opaque, so the rest of
        the model gets Inductor's generic fusion too.

    Raises TypeError for a `model` that is not an `nn.Module` (or is already optimized) and ValueError for
    an unknown pattern or backend name. A model dynamo cannot capture runs eagerly, with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fxfuse.optimize expects a torch.nn.Module, got {type(model).__name__}; "
            "wrap a function in an nn.Module whose forward calls it"
        )
    if isinstance(model, OptimizedModule):
        raise TypeError("this model is already optimized by fxfuse; pass the original model")
    check_patterns(patterns)
    options = Options(tuple(patterns) if patterns is not None else None, backend, verify, compile_rest)
    opt = OptimizedModule(model, options)
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if isinstance(example_inputs, Mapping):
            _capture_now(opt, (), dict(example_inputs))
            return opt
        if not isinstance(example_inputs, (tuple, list)):
            raise TypeError(
                "example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
                f"got {type(example_inputs).__name__}"
            )
        _capture_now(opt, tuple(example_inputs))
    return opt


def check_patterns(patterns: Sequence[str] | None) -> None:
    """A clear error for a `patterns=` argument that names no registered family (shared with export)."""
    if isinstance(patterns, str):  # tuple("spp") would be ("s", "p", "p"): say what to write instead
        raise TypeError(f"patterns takes a list of family names, e.g. patterns=[{patterns!r}]")
    if patterns is None:
        return
    if not patterns:
        raise ValueError("patterns=[] selects no pattern family; pass patterns=None to look for all of them")
    unknown = [p for p in patterns if p not in families.FAMILIES]
    if unknown:
        raise ValueError(f"unknown pattern(s) {unknown}; available: {', '.join(families.names())}")


def report(model: object) -> Report:
    """The report of a model from `fxfuse.optimize`, or of one `torch.compile(model, backend="fxfuse")`
    (a model or a function). It is live: graphs captured at later calls are added to it."""
    if isinstance(model, OptimizedModule):
        return model.fxfuse_report
    target = compiled_target(model)
    if target is not None:
        return compiled_report(target)
    raise TypeError(
        f"{type(model).__name__} was not produced by fxfuse.optimize or torch.compile; pass what one of "
        "them returned"
    )


def last_report() -> Report:
    """The report of the model most recently compiled by `torch.compile(..., backend="fxfuse")` (each
    compiled model has its own: `fxfuse.report(compiled)`)."""
    return last_compiled_report()
