"""The GPU suite (`fxfuse bench --suite gpu`): our Triton kernels against torch's best, in TFLOP/s and GB/s.

Sections, each with a time budget (checked before every measurement, so a slow section ends early with
what it has instead of overrunning the script's hard timeout; results are merged into the output file
after every section, so a killed section loses only itself):
- attention: fxfuse.fusion.attention (Triton) forward and forward+backward, bf16, N = 1k..16k,
  D = 64/128, no mask / causal / key-padding mask, against SDPA pinned to each backend (flash, cuDNN,
  efficient) and compiled flex_attention with the same mask. Work per row is kept near constant the way
  the FlashAttention benchmarks do it: B = 16k / N, H = 2048 / D.
- spp: the fused SPP op against the eager pyramid from benchmarks/spp_op.py, in GB/s.
- linear_attention: the Triton chunked kernel against the eager quadratic form and causal SDPA
  (gpu_linear_attention.py).
- ssm_scan: the fused selective scan (Triton) against the eager loop over time from
  benchmarks/ssm_scan_op.py, in GB/s of the compulsory bytes (u, Δ, A, B, C read and y written once).
Nothing here needs CUDA at import time; the formulas and table rendering are unit-tested on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fxfuse.bench.table import format_table

SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
VARIANTS = ("none", "causal", "padmask")
MODES = ("fwd", "fwd+bwd")
IMPLS = ("fxfuse", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
FLEX_SEQ_LENS = (1024, 4096, 16384)  # each shape is a fresh compile; a few sizes show the trend
# The YOLO neck at 640 px (batch 8), and a batch big enough that bandwidth, not launch latency, decides.
SPP_SHAPES = ((8, 256, 20, 20), (32, 256, 80, 80))
# A small Mamba layer at 1k tokens (the CPU target size) and a Mamba-1.4b-sized layer (D = 2 x 2048) at 2k.
SSM_SHAPES = ((2, 512, 1024, 16), (4, 4096, 2048, 16))
BUDGET_S = {"attention": 120.0, "spp": 25.0, "linear_attention": 55.0, "ssm_scan": 40.0}
# Backward runs five N x N x D matmuls (recomputed S, dV, dP, dQ, dK) to the forward's two (S, PV).
BACKWARD_FACTOR = 2.5


def attention_flops(b: int, h: int, n: int, d: int, *, causal: bool, mode: str = "fwd") -> float:
    """Matmul FLOPs of attention: 4 B H N^2 D forward (QK^T and PV), halved when causal; fwd+bwd = 3.5x."""
    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    if mode == "fwd":
        return flops
    if mode == "fwd+bwd":
        return flops * (1.0 + BACKWARD_FACTOR)
    raise ValueError(f"mode {mode!r}: expected 'fwd' or 'fwd+bwd'")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def attention_shape(n: int, d: int) -> tuple[int, int]:
    """(B, H) for sequence length n and head dim d: 16k tokens and a model width of 2048 per row."""
    return max(1, 16384 // n), max(1, 2048 // d)


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def cuda_time_ms(fn: Callable[[], object], target_ms: float = 60.0, max_reps: int = 100) -> float:
    """Median milliseconds of `fn` over CUDA-event-timed reps, after warm-up; reps sized to ~target_ms."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(5, target_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _attention_impls(q, k, v, variant: str, n: int, *, flex: bool) -> dict[str, Callable]:
    """name -> fn(q, k, v) computing the same attention (ours and SDPA, or only flex); the mask is
    [B, 1, 1, N], True = attend."""
    import torch

    causal = variant == "causal"
    valid = 3 * n // 4
    keep = (torch.arange(n, device=q.device) < valid).view(1, 1, 1, n) if variant == "padmask" else None
    if not flex:
        return _eager_impls(keep, causal)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if causal:
        mask_mod = lambda b, h, qi, ki: qi >= ki
    elif variant == "padmask":
        mask_mod = lambda b, h, qi, ki: ki < valid
    else:
        mask_mod = None
    block_mask = create_block_mask(mask_mod, None, None, n, n, device=q.device) if mask_mod else None
    compiled = torch.compile(flex_attention, dynamic=False)
    return {"flex": lambda q, k, v: compiled(q, k, v, block_mask=block_mask)}


def _eager_impls(keep, causal: bool) -> dict[str, Callable]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fxfuse.fusion.attention import attention

    impls: dict[str, Callable] = {"fxfuse": lambda q, k, v: attention(q, k, v, mask=keep, causal=causal)}
    for name, backend in (
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):

        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal)

        impls[name] = sdpa
    return impls


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"


def _raise_recompile_limit(torch) -> None:
    """Every flex shape is its own compile; the default limit (8) would drop later shapes to eager flex."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def run_attention(deadline: float, log=sys.stderr) -> list[dict]:
    """Two passes over the configurations: ours and SDPA first, then compiled flex (a compile per shape), so
    a budget that runs out drops flex rows rather than the comparison that matters most."""
    import torch

    _raise_recompile_limit(torch)
    records: list[dict] = []
    for with_flex in (False, True):
        for n in SEQ_LENS:
            if with_flex and n not in FLEX_SEQ_LENS:
                continue
            for d in HEAD_DIMS:
                for variant in VARIANTS:
                    records += _attention_rows(n, d, variant, with_flex, deadline, log)
                    torch.cuda.empty_cache()
    return add_ratios(records)


def _attention_rows(n: int, d: int, variant: str, flex: bool, deadline: float, log) -> list[dict]:
    import torch

    b, h = attention_shape(n, d)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = []
    try:
        impls = _attention_impls(q, k, v, variant, n, flex=flex)
    except Exception as e:  # flex's block mask, say: the other rows still run
        print(f"  attention d={d} n={n} {variant}: {_short(e)}", file=log)
        return rows
    for mode in MODES:
        flops = attention_flops(b, h, n, d, causal=variant == "causal", mode=mode)
        for impl, f in impls.items():
            rec = {"section": "attention", "impl": impl, "b": b, "h": h, "n": n, "d": d}
            rec.update(variant=variant, mode=mode, dtype="bf16", name=f"attention/{impl}[d={d},n={n},{variant},{mode}]")
            if time.monotonic() > deadline:
                rec["skipped"] = "section time budget spent"
            else:
                try:
                    rec["ms"] = _time_attention(f, q, k, v, mode)
                    rec["tflops"] = tflops(flops, rec["ms"])
                except Exception as e:  # e.g. a backend that does not take this mask
                    rec["skipped"] = _short(e)
            rows.append(rec)
            status = f"{rec['tflops']:.0f} TFLOP/s" if "ms" in rec else rec["skipped"]
            print(f"  {rec['name']}: {status}", file=log, flush=True)
    return rows


def _time_attention(f: Callable, q0, k0, v0, mode: str) -> float:
    import torch

    if mode == "fwd":
        with torch.no_grad():
            return cuda_time_ms(lambda: f(q0, k0, v0))
    q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
    do = torch.randn_like(q0)

    def step() -> None:
        f(q, k, v).backward(do)
        q.grad = k.grad = v.grad = None  # no accumulation kernels in the timed step

    return cuda_time_ms(step)


def add_ratios(records: list[dict]) -> list[dict]:
    """Each attention record gets ratio = its time / fxfuse's time for the same row (> 1: ours is faster)."""
    ours = {_row_key(r): r["ms"] for r in records if r.get("impl") == "fxfuse" and "ms" in r}
    for r in records:
        key = _row_key(r)
        if "ms" in r and key in ours:
            r["ratio"] = r["ms"] / ours[key]
    return records


def _row_key(r: dict) -> tuple:
    return (r["d"], r["n"], r["variant"], r["mode"])


def _time_bandwidth_cases(section: str, cases: list[tuple], deadline: float, log) -> list[dict]:
    """Time (record name, eager_fn, fused_fn, inputs) pairs in GB/s until `deadline`; later ones are skipped."""
    records = []
    for name, eager_fn, fused_fn, inputs in cases:
        rec = {"section": section, "name": name}
        if time.monotonic() > deadline:
            rec["skipped"] = "section time budget spent"
        else:
            try:
                rec.update(_time_spp(eager_fn, fused_fn, inputs))
            except Exception as e:
                rec["skipped"] = _short(e)
        status = f"{rec['fused_gbps']:.0f} GB/s, {rec['ratio']:.2f}x" if "ratio" in rec else rec["skipped"]
        print(f"  {rec['name']}: {status}", file=log, flush=True)
        records.append(rec)
    return records


def run_spp(deadline: float, log=sys.stderr) -> list[dict]:
    from fxfuse.bench.registry import load_repo_module

    module = load_repo_module("benchmarks/spp_op.py")
    cases = [(f"spp/{name}[{'x'.join(map(str, shape))}]", *rest)
             for shape in SPP_SHAPES for name, *rest in module.spp_cases(shape)]  # fmt: skip
    return _time_bandwidth_cases("spp", cases, deadline, log)


def run_ssm_scan(deadline: float, log=sys.stderr) -> list[dict]:
    from fxfuse.bench.registry import load_repo_module

    module = load_repo_module("benchmarks/ssm_scan_op.py")
    cases = [(f"ssm_scan/selective[{name}]", *rest) for name, *rest in module.scan_cases(SSM_SHAPES)]
    return _time_bandwidth_cases("ssm_scan", cases, deadline, log)


def _time_spp(eager_fn: Callable, fused_fn: Callable, inputs: list) -> dict:
    """Times and GB/s of both sides on CUDA copies of the CPU case's inputs."""
    import torch

    inputs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs]
    eager, fused = (f.cuda() if isinstance(f, torch.nn.Module) else f for f in (eager_fn, fused_fn))
    with torch.no_grad():
        out = eager(*inputs)
        nbytes = sum(t.nbytes for t in inputs if isinstance(t, torch.Tensor)) + out.nbytes
        eager_ms = cuda_time_ms(lambda: eager(*inputs))
        fused_ms = cuda_time_ms(lambda: fused(*inputs))
    return {
        "bytes": nbytes,
        "eager_ms": eager_ms,
        "fused_ms": fused_ms,
        "eager_gbps": gbps(nbytes, eager_ms),
        "fused_gbps": gbps(nbytes, fused_ms),
        "ratio": eager_ms / fused_ms,
    }


def render_markdown(results: dict) -> str:
    """Markdown tables: attention TFLOP/s per implementation (ratio = its time / ours), SPP GB/s."""
    cases = results.get("cases", [])
    out = [f"# fxfuse GPU benchmarks: {results.get('device', '?')}, {results.get('date', '?')}", ""]
    v = results.get("versions", {})
    out += [f"torch {v.get('torch', '?')}, triton {v.get('triton', '?')}, fxfuse {v.get('fxfuse', '?')}", ""]
    att = [c for c in cases if c.get("section") == "attention"]
    if att:
        out += [
            "## Attention, bf16, TFLOP/s",
            "",
            "In parentheses: that implementation's time / fxfuse's (> 1: fxfuse is faster). "
            "FLOPs = 4·B·H·N²·D forward, halved when causal; forward+backward = 3.5× forward. "
            "B = 16k/N, H = 2048/D.",
            "",
        ]
        by_row: dict[tuple, dict[str, dict]] = {}
        for c in att:
            by_row.setdefault(_row_key(c), {})[c["impl"]] = c
        rows = []
        for (d, n, variant, mode), impls in sorted(
            by_row.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][2], kv[0][1])
        ):
            cells = [f"{mode} d={d} {variant}", f"{n}"]
            for impl in IMPLS:
                c = impls.get(impl)
                if c is None or "tflops" not in c:
                    cells.append("-" if c is None else "n/a")
                elif impl == "fxfuse":
                    cells.append(f"{c['tflops']:.0f}")
                else:
                    cells.append(f"{c['tflops']:.0f} ({c['ratio']:.2f}x)" if "ratio" in c else f"{c['tflops']:.0f}")
            rows.append(cells)
        out += [format_table(("case", "N") + IMPLS, rows, markdown=True), ""]
        notes = sorted({f"{c['impl']}: {c['skipped']}" for c in att if "skipped" in c})
        out += [f"- n/a {note}" for note in notes] + ([""] if notes else [])
    for section, title in (
        ("spp", "## SPP: fused vs eager pyramid, GB/s (input read + output written once)"),
        ("ssm_scan", "## Selective scan: fused vs eager loop over time, GB/s (inputs read + y written once)"),
    ):
        out += _bandwidth_table([c for c in cases if c.get("section") == section], title)
    linear = [c for c in cases if c.get("section") == "linear_attention"]
    if linear:
        from fxfuse.bench.gpu_linear_attention import render_linear_attention

        out += render_linear_attention(linear)
    return "\n".join(out)


def _bandwidth_table(spp: list[dict], title: str) -> list[str]:
    out = []
    if spp:
        out += [title, ""]
        rows = [
            [
                c["name"],
                f"{c['eager_ms']:.3f}",
                f"{c['eager_gbps']:.0f}",
                f"{c['fused_ms']:.3f}",
                f"{c['fused_gbps']:.0f}",
                f"{c['ratio']:.2f}x",
            ]
            if "ratio" in c
            else [c["name"], "-", "-", "-", "-", c.get("skipped", "?")]
            for c in spp
        ]
        head = ("case", "eager ms", "eager GB/s", "fused ms", "fused GB/s", "speedup")
        out += [format_table(head, rows, markdown=True), ""]
    return out


def merge_results(path: Path, header: dict, records: list[dict]) -> dict:
    """Merge `records` into the results file at `path` (same name replaces), keeping earlier sections."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(header)
    fresh = {r["name"] for r in records}
    data["cases"] = [c for c in data.get("cases", []) if c["name"] not in fresh] + records
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".md").write_text(render_markdown(data))
    return data


def main_gpu(args: argparse.Namespace) -> int:
    """Run the GPU suite's sections; results go to --results-dir/<date>-<device>.json (.md) or --json."""
    import torch

    from fxfuse.bench.cli import machine_info, versions

    if not torch.cuda.is_available():
        print(
            "fxfuse bench --suite gpu needs a CUDA device; run `fxfuse bench` for the CPU suite.",
            file=sys.stderr,
        )
        return 2
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    path = (
        Path(args.json)
        if args.json
        else Path(args.results_dir or "benchmarks/results") / f"{date}-{device_slug(device)}.json"
    )
    header = {
        "suite": "gpu",
        "device": device,
        "date": date,
        "machine": machine_info(),
        "versions": versions(),
    }
    sections = [s for s in ([args.section] if args.section else BUDGET_S) if not args.cases or args.cases in s]
    data = header
    for section in sections:
        budget = args.budget_s if args.budget_s is not None else BUDGET_S[section]
        print(f"[gpu] {section} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
        from fxfuse.bench.gpu_linear_attention import run_linear_attention

        run = {"attention": run_attention, "spp": run_spp, "linear_attention": run_linear_attention,
               "ssm_scan": run_ssm_scan}[section]
        try:
            records = run(time.monotonic() + budget)
        except Exception as e:  # e.g. the op module is not importable: record, go on with the next section
            records = [{"section": section, "name": f"{section}/*", "skipped": _short(e)}]
            print(f"[gpu] {section} failed: {records[0]['skipped']}", file=sys.stderr)
        data = merge_results(path, header, records)
    print(render_markdown(data))
    print(f"[gpu] wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0
