"""The CPU suite: fused ops against the eager code they replace, and example models against `optimize`.

Sizes are picked so that each quick case's ratio is far from the regression threshold on a noisy 2-core
machine: the attention op at N=1024 (the eager [N, N] score tensor no longer fits in cache), SPP at the
YOLO neck sizes. Every case checks once that both sides agree before it is timed: a speedup of an op
that computes something else is not a speedup.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fxfuse.bench.registry import Case, Fn, SkipCase, case, family, load_repo_module

# Op cases compare op outputs at fp32; model cases tolerate the reassociation of a whole network.
OP_RTOL, MODEL_RTOL = 1e-4, 1e-3
# Examples big enough that the fused op, not Python call overhead, decides the ratio; the tiny examples
# (sized for the matcher tests) run in the full suite only.
QUICK_MODELS = {"AttentionHeavy", "yolo_spp", "yolo_sppf", "plain_cnn"}


class OutputMismatch(RuntimeError):
    """The two sides of a case compute different results: an error of the case, never a speedup."""


def check_close(baseline: Fn, optimized: Fn, rtol: float) -> None:
    """Raise OutputMismatch when the two sides disagree (a broken fused op must not report a speedup)."""
    with torch.no_grad():
        a, b = baseline(), optimized()
    for x, y in zip(_tensors(a), _tensors(b), strict=True):
        err = ((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-12)).item()
        if not err <= rtol:
            raise OutputMismatch(f"outputs differ (max rel err {err:.1e} > {rtol:.0e}); not timing a wrong result")


def _tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def no_grad(fn: Fn) -> Fn:
    """Inference timing: autograd bookkeeping would cost both sides alike and blur the ratio."""

    def run() -> object:
        with torch.no_grad():
            return fn()

    return run


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Attention as people write it by hand: [B, H, N, D] -> [B, H, N, D]."""
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _attention_pair(b: int, h: int, n: int, d: int, causal: bool) -> tuple[Fn, Fn]:
    try:
        from fxfuse.fusion.attention import attention
    except ImportError as e:
        raise SkipCase(f"fxfuse.fusion.attention is not importable yet ({e})") from e
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    if causal:
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        fused = lambda: attention(q, k, v, causal=True)
    else:
        # Key padding: the last quarter of the keys is padding, as in a batch of uneven sentences.
        keep = (torch.arange(n) < 3 * n // 4).view(1, 1, 1, n)
        fused = lambda: attention(q, k, v, mask=keep)
    pair = no_grad(lambda: eager_attention(q, k, v, keep)), no_grad(fused)
    check_close(*pair, rtol=OP_RTOL)
    return pair


@case("op/attention[1x8x1024x64,causal]", compile=True)
def attention_causal() -> tuple[Fn, Fn]:
    return _attention_pair(1, 8, 1024, 64, causal=True)


@case("op/attention[1x8x1024x64,padmask]", compile=True)
def attention_padding_mask() -> tuple[Fn, Fn]:
    return _attention_pair(1, 8, 1024, 64, causal=False)


@case("op/attention[4x12x256x64,padmask]", quick=False, compile=True)
def attention_short() -> tuple[Fn, Fn]:
    return _attention_pair(4, 12, 256, 64, causal=False)


@family("op/spp (benchmarks/spp_op.py)")
def spp_op_cases() -> list[Case]:
    """One case per entry of `spp_cases()`: (name, eager_fn, fused_fn, inputs)."""
    module = load_repo_module("benchmarks/spp_op.py")
    quick_names = getattr(module, "QUICK", None)
    cases = []
    for name, eager_fn, fused_fn, inputs in module.spp_cases():

        def setup(eager_fn=eager_fn, fused_fn=fused_fn, inputs=inputs) -> tuple[Fn, Fn]:
            pair = no_grad(lambda: eager_fn(*inputs)), no_grad(lambda: fused_fn(*inputs))
            check_close(*pair, rtol=OP_RTOL)
            return pair

        full_name = name if name.startswith("op/") else f"op/spp[{name}]"
        quick = quick_names is None or name in quick_names
        cases.append(Case(full_name, setup, quick=quick, compile=True, group="op"))
    return cases


def optimized_model_pair(make: Callable[[], tuple[torch.nn.Module, tuple]]) -> tuple[Fn, Fn]:
    """(original, fxfuse.optimize(original)) in eval mode on the factory's example inputs."""
    import fxfuse

    optimize = getattr(fxfuse, "optimize", None)
    if optimize is None:
        raise SkipCase("fxfuse.optimize does not exist yet")
    model, inputs = make()
    model = model.eval()
    with torch.no_grad():
        optimized = optimize(model, inputs)
    pair = no_grad(lambda: model(*inputs)), no_grad(lambda: optimized(*inputs))
    check_close(*pair, rtol=MODEL_RTOL)
    return pair


def _model_factories(relpath: str) -> list[tuple[str, Callable]]:
    """(name, make) for each example of a module's `MODELS`: a dict name -> factory (or class with
    `make`), or a sequence of classes with `make` (named after the class)."""
    module = load_repo_module(relpath)
    models = getattr(module, "MODELS", None)
    if isinstance(models, dict):
        return [(name, getattr(m, "make", m)) for name, m in models.items()]
    if isinstance(models, (list, tuple)):
        return [(m.__name__, m.make) for m in models]
    raise SkipCase(f"{relpath} has no MODELS registry yet")


def _model_family(relpath: str) -> list[Case]:
    return [
        Case(
            f"model/{name}",
            lambda make=make: optimized_model_pair(make),
            quick=name in QUICK_MODELS,
            group="model",
        )
        for name, make in _model_factories(relpath)
    ]


@family("model/* (examples/attention_models.py)")
def attention_models() -> list[Case]:
    return _model_family("examples/attention_models.py")


@family("model/*[N] (demo-sized attention models, vs torch.compile too)")
def attention_models_at_length() -> list[Case]:
    """The demo's attention models at sequence 512-1024, where attention dominates: fxfuse against eager
    and against torch.compile of the same model (issue target: >= 1.5x eager and >= compile)."""
    module = load_repo_module("examples/attention_models.py")
    specs = [("attention_heavy[1024]", "make_attention_heavy"), ("padded_mha[512]", "make_padded_mha"),
             ("gqa_decoder[1024]", "make_gqa_decoder")]  # fmt: skip
    factories = [(name, getattr(module, fn)) for name, fn in specs if hasattr(module, fn)]
    return [
        Case(f"model/{name}", lambda make=make: optimized_model_pair(make), quick=False, compile=True, group="model")
        for name, make in factories
    ]


@family("model/* (examples/spp_models.py)")
def spp_models() -> list[Case]:
    return _model_family("examples/spp_models.py")


@family("op/selective_scan (benchmarks/ssm_scan_op.py)")
def ssm_scan_op_cases() -> list[Case]:
    """The fused selective scan against the eager Python loop over time it replaces (forward)."""
    module = load_repo_module("benchmarks/ssm_scan_op.py")
    cases = []
    for name, eager_fn, fused_fn, inputs in module.scan_cases():

        def setup(eager_fn=eager_fn, fused_fn=fused_fn, inputs=inputs) -> tuple[Fn, Fn]:
            pair = no_grad(lambda: eager_fn(*inputs)), no_grad(lambda: fused_fn(*inputs))
            check_close(*pair, rtol=OP_RTOL)
            return pair

        quick = name == "x".join(map(str, module.QUICK_SHAPE))
        cases.append(Case(f"op/selective_scan[{name}]", setup, quick=quick, group="op"))
    return cases


@family("model/mamba_* (examples/ssm_models.py, loops captured unrolled)")
def ssm_models() -> list[Case]:
    """Mamba-style models whose scan is a Python loop: `optimize` re-rolls it. Capturing an unrolled loop
    costs seconds per hundred steps, so these run in the full suite only."""
    module = load_repo_module("examples/ssm_models.py")
    specs = [("mamba_block[256]", lambda: module.make_mamba_block(256, d_model=64)),
             ("mamba_model[2x256]", lambda: module.make_mamba_model(256))]  # fmt: skip
    return [
        Case(f"model/{name}", lambda make=make: optimized_model_pair(make), quick=False, group="model")
        for name, make in specs
    ]


class NoPatternNet(torch.nn.Module):
    """A conv + MLP net with nothing to fuse: `optimize` must hand it back no slower (ratio ~1.0)."""

    def __init__(self, channels: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 3, padding=1),
            torch.nn.BatchNorm2d(channels),
            torch.nn.SiLU(),
            torch.nn.Conv2d(channels, channels, 3, padding=1),
            torch.nn.SiLU(),
        )
        self.head = torch.nn.Sequential(torch.nn.Linear(channels, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))

    @staticmethod
    def make() -> tuple[torch.nn.Module, tuple]:
        return NoPatternNet(), (torch.randn(4, 3, 64, 64),)


@case("model/no-pattern", group="model")
def no_pattern_model() -> tuple[Fn, Fn]:
    return optimized_model_pair(NoPatternNet.make)
