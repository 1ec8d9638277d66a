"""Optimized models under torch.distributed (2 CPU processes, gloo): DistributedDataParallel around
`fxfuse.optimize`, `torch.compile(DDP(model), backend="fxfuse")` (dynamo splits the graph at DDP's
bucket boundaries), and FSDP2 `fully_shard`. Each gives the gradients of one process on the whole batch.

The two processes start once for the module (starting them costs more than the three runs) and
report each case's figures; a case that raises reports its error instead.
"""

import json
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import fxfuse
from examples.attention_models import CausalGPTBlock, GQABlock

WORLD = 2
TIMEOUT_S = 300  # the whole spawn; collectives time out after 90 s, so a lost peer cannot hang CI


class Net(nn.Module):
    """Three pre-residual attention blocks, wide enough (1.7 MB of parameters per pair of blocks) that
    DDP's 1 MB buckets split the compiled graph between them."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([CausalGPTBlock(256, 4), GQABlock(256, 8, 2), CausalGPTBlock(256, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _net() -> Net:
    torch.manual_seed(0)  # the same initial parameters in every process
    return Net()


def _batch() -> torch.Tensor:
    return torch.randn(4, 12, 256, generator=torch.Generator().manual_seed(1))


def _ddp(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, Callable]:
    opt = fxfuse.optimize(model, (x,))
    return DDP(opt), lambda: fxfuse.report(opt)


def _compiled_ddp(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, Callable]:
    return torch.compile(DDP(model, bucket_cap_mb=1), backend="fxfuse"), fxfuse.last_report


def _fsdp2(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, Callable]:
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = fxfuse.optimize(model)
    return opt, lambda: fxfuse.report(opt)


CASES = {"ddp": _ddp, "compiled_ddp": _compiled_ddp, "fsdp2": _fsdp2}


def _run_case(wrap, rank: int) -> dict:
    x = _batch()
    reference = _net()
    reference(x).square().mean().backward()
    model = _net()
    wrapped, report = wrap(model, x.chunk(WORLD)[rank])
    wrapped(x.chunk(WORLD)[rank]).square().mean().backward()
    errors = []
    for p, q in zip(model.parameters(), reference.parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: DTensor shards
        errors.append(((grad - q.grad).norm() / q.grad.norm()).item())
    rep = report()
    return {"max_rel_err": max(errors), "applied": rep.count("attention"), "graphs": rep.graphs}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 about compiled outputs
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90)
    )
    results = {}
    for name, wrap in CASES.items():
        torch._dynamo.reset()
        try:
            results[name] = _run_case(wrap, rank)
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("distributed")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {name: [r[name] for r in ranks] for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_one_process_on_the_whole_batch(results, case):
    for rank, res in enumerate(results[case]):
        assert "error" not in res, f"rank {rank}: {res.get('trace')}"
        assert res["applied"] >= 2
        assert res["max_rel_err"] <= 1e-5, f"rank {rank}"


def test_ddp_runs_one_graph_with_every_site_fused(results):
    assert all(res["graphs"] == 1 and res["applied"] == 3 for res in results["ddp"])


def test_compiled_ddp_graph_is_split_at_buckets(results):
    # DDP's 1 MB buckets cut the graph in two; each piece is rewritten on its own, no site is lost.
    assert all(res["graphs"] == 2 and res["applied"] == 3 for res in results["compiled_ddp"])


def test_fsdp2_graph_breaks_at_each_sharded_block(results):
    # fully_shard's hooks run eagerly between blocks: one graph per block. Both CausalGPTBlocks come
    # from one source line, so the report lists that rewrite once, in graphs 1 and 3.
    assert all(res["graphs"] == 3 and res["applied"] == 2 for res in results["fsdp2"])
