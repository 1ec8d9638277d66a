"""Peak activation memory of one training step (forward + backward) of an attention layer, original vs
`fxfuse.optimize`d, at several sequence lengths.

    python benchmarks/training_memory.py [--lengths 1024 2048 4096] [--batch 2] [--dim 256] [--heads 4]

The layer is BERT-style self-attention written by hand (examples.attention_models.HandMHA: q/k/v
projections, scores / sqrt(d), key-padding masked_fill, softmax, @ v, output projection), fp32. Each
measurement runs in its own process: one warm-up step (capture, rewrite and verification of the
optimized side happen there), then one measured step:
- on CUDA, torch.cuda.max_memory_allocated above the memory allocated before the step;
- on CPU, the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after
  malloc_trim) above the resident set before the step: what the step added to the model, inputs and
  gradients already held.
The fused attention op keeps q, k, v, its output and O(N) row statistics for the backward; the
original keeps the [B, H, N, N] scores and probabilities.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import subprocess
import sys

import torch

import fxfuse
from examples.attention_models import HandMHA


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_step_bytes(model: torch.nn.Module, inputs: tuple) -> int:
    """Bytes the peak of one forward + backward holds above what was held before it."""

    def step() -> None:
        model(*inputs).float().square().mean().backward()

    step()  # warm-up
    for p in model.parameters():
        p.grad = None
    step()  # gradients allocated, as in a training loop's later steps
    if inputs[0].device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so they are not counted as held
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def measure_one(side: str, n: int, batch: int, dim: int, heads: int, device: str) -> int:
    torch.manual_seed(0)
    model = HandMHA(dim, heads).to(device).train()
    keep = torch.ones(batch, n, dtype=torch.long, device=device)
    keep[-1, 3 * n // 4 :] = 0
    inputs = (torch.randn(batch, n, dim, device=device), keep)
    if side == "original":
        return peak_step_bytes(copy.deepcopy(model), inputs)
    fused = fxfuse.optimize(model)
    peak = peak_step_bytes(fused, inputs)
    assert fxfuse.report(fused).count("attention") == 1, fxfuse.report(fused)
    return peak


def measure(n: int, args: argparse.Namespace) -> tuple[int, int]:
    """(original, optimized) peak step bytes for sequence length n, each in a fresh process."""
    peaks = []
    for side in ("original", "optimized"):
        cmd = [sys.executable, __file__, "--one", side, "--lengths", str(n), "--batch", str(args.batch),
               "--dim", str(args.dim), "--heads", str(args.heads), "--device", args.device]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks.append(int(out.strip().splitlines()[-1]))
    return peaks[0], peaks[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", choices=["original", "optimized"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure_one(args.one, args.lengths[0], args.batch, args.dim, args.heads, args.device))
        return
    print(f"attention layer, B={args.batch}, dim={args.dim}, H={args.heads}, fp32, {args.device}; "
          "peak memory of one training step above what was held before it")  # fmt: skip
    print(f"{'N':>6}  {'original MiB':>12}  {'optimized MiB':>13}  {'ratio':>6}")
    for n in args.lengths:
        a, b = measure(n, args)
        print(f"{n:>6}  {a / 2**20:>12.1f}  {b / 2**20:>13.1f}  {a / b:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
