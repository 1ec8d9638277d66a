"""Canonicalize (placeholder until the attention work lands its rules): no rewrites yet."""

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult


def canonicalize(gm: GraphModule) -> PassResult:
    return PassResult(gm, False)
