"""Public entry points: `optimize`, `report`."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from fxfuse.dynamo_backend import Options, compiled_report, compiled_target, last_compiled_report, make_backend
from fxfuse.report import Report

RECOMPILE_LIMIT = 256
VERBOSE_ENV = "FXFUSE_VERBOSE"  # =1: dynamo's own log of frames it could not capture, in full
# Traced as no-ops: a filter change breaks the graph (a C builtin), and inside `with catch_warnings()`
# the break cannot resume, so dynamo runs the whole frame eagerly (YOLOv5's SPP and SPPF silence a
# max_pool2d warning that way). Only which warnings print inside the captured graph can differ.
_NO_OP_WHILE_TRACED = frozenset({warnings.simplefilter, warnings.filterwarnings})


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


@contextlib.contextmanager
def _quiet_fallbacks(report: Report) -> Iterator[None]:
    """A call that fails in the user's own code (a wrong input shape) shows the user's error alone; a
    frame dynamo could not capture while the call itself worked becomes one note and one warning.
    FXFUSE_VERBOSE=1 leaves dynamo's log as it is."""
    if os.environ.get(VERBOSE_ENV, "0") not in ("", "0"):
        yield
        return
    logger, held = logging.getLogger("torch._dynamo.convert_frame"), _FallbackLog()
    logger.addFilter(held)
    try:
        yield
    finally:
        logger.removeFilter(held)
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
        ignored = _NO_OP_WHILE_TRACED - cfg.ignore_logging_functions
        cfg.ignore_logging_functions |= ignored
        try:
            with _quiet_fallbacks(self.fxfuse_report):
                out = self._compiled(*args, **kwargs)
        finally:
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
    """Find attention / SPP patterns in `model`, verify and fuse them; returns a module that calls like it.

    With `example_inputs` (a tuple of positional arguments, or a dict of keyword arguments such as a
    tokenizer's output) capture, rewrite and verification happen now; without, at the first call (and
    again for inputs the captured graph does not cover).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fxfuse.optimize expects a torch.nn.Module, got {type(model).__name__}; "
            "wrap a function in an nn.Module whose forward calls it"
        )
    if isinstance(model, OptimizedModule):
        raise TypeError("this model is already optimized by fxfuse; pass the original model")
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
