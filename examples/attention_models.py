"""Hand-written attention modules, spelled the way research code spells them.

Each class has a `make()` factory (no arguments) returning (model in eval mode, example_inputs tuple),
used by the matcher tests, the demo and the benchmarks. Sizes are tiny except `AttentionHeavy`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class HandMHA(nn.Module):
    """Textbook multi-head attention: `/ math.sqrt(d)` and a key-padding mask through masked_fill."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(f(x), self.heads) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return self.o(merge_heads(F.softmax(scores, dim=-1) @ v))

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        return cls().eval(), (torch.randn(2, 9, 32), mask)


class CausalGPTBlock(nn.Module):
    """nanoGPT's CausalSelfAttention: fused c_attn, a tril *buffer* as the causal mask."""

    def __init__(self, dim: int = 32, heads: int = 4, block: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = (split_heads(z, self.heads) for z in self.c_attn(x).split(x.shape[-1], dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return self.c_proj(merge_heads(F.softmax(att, dim=-1) @ v))

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        return cls().eval(), (torch.randn(2, 12, 32),)


class CausalInlineBlock(nn.Module):
    """Causal attention whose mask is built in forward (triu of -inf): provably causal from the graph."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        q, k, v = (split_heads(z, self.heads) for z in self.qkv(x).chunk(3, dim=-1))
        causal = torch.triu(torch.full((n, n), float("-inf"), device=x.device), diagonal=1)
        att = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + causal, dim=-1)
        return self.o(merge_heads(att @ v))

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        return cls().eval(), (torch.randn(2, 10, 32),)


class GQABlock(nn.Module):
    """Grouped-query attention (8 query heads, 2 kv heads), kv repeated by repeat_interleave or by
    expand + reshape (Llama's repeat_kv)."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2, expand: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d, self.expand = heads, kv_heads, dim // heads, expand
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        rep = self.heads // self.kv_heads
        if not self.expand:
            return x.repeat_interleave(rep, dim=1)
        b, h, n, d = x.shape
        return x[:, :, None].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q(x), self.heads)
        k, v = (split_heads(z, self.kv_heads) for z in self.kv(x).chunk(2, dim=-1))
        k, v = self._repeat(k), self._repeat(v)
        att = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.d**-0.5, dim=-1)
        return self.o(merge_heads(torch.matmul(att, v)))

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        return cls().eval(), (torch.randn(2, 11, 64),)


class DETRDecoderBlock(nn.Module):
    """DETR decoder layer, sequence-first [N, B, C] like nn.MultiheadAttention: object queries attend to
    each other, then to the 7x7 image memory, heads folded into the batch for bmm ([B*H, N, D])."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.self_in, self.cross_q, self.cross_kv = (
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, 2 * dim),
        )
        self.self_out, self.cross_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        """[N, B, C] -> [B*H, N, D]."""
        n, b, _ = x.shape
        return x.reshape(n, b * self.heads, self.d).transpose(0, 1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: nn.Module, b: int) -> torch.Tensor:
        w = torch.bmm(self._fold(q) * self.d**-0.5, self._fold(k).transpose(1, 2))
        o = torch.bmm(F.softmax(w, dim=-1), self._fold(v))
        return out(o.transpose(0, 1).reshape(q.shape[0], b, -1))

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        b = tgt.shape[1]
        q, k, v = self.self_in(tgt).chunk(3, dim=-1)
        tgt = self.norm1(tgt + self._attend(q + query_pos, k + query_pos, v, self.self_out, b))
        k, v = self.cross_kv(memory).chunk(2, dim=-1)
        return self.norm2(tgt + self._attend(self.cross_q(tgt + query_pos), k + pos, v, self.cross_out, b))

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        return cls().eval(), (
            torch.randn(10, 2, 32),
            torch.randn(49, 2, 32),
            torch.randn(10, 2, 32),
            torch.randn(49, 2, 32),
        )


class ViTEinsumBlock(nn.Module):
    """ViT block in the timm style: qkv reshaped and permuted to [3, B, H, N, D], einsum products."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        out = torch.einsum("bhij,bhjd->bhid", attn.softmax(dim=-1), v)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, c))

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        return cls().eval(), (torch.randn(2, 17, 32),)


class PackedVarlenBlock(nn.Module):
    """Several sequences packed in one row; tokens attend within their own segment only."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(z, self.heads) for z in self.qkv(x).chunk(3, dim=-1))
        same = seg[:, :, None] == seg[:, None, :]
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~same[:, None], float("-inf"))
        return self.o(merge_heads(s.softmax(-1) @ v))

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 3, 3]])
        return cls().eval(), (torch.randn(2, 10, 32), seg)


class GAUBlock(nn.Module):
    """Gated attention unit (Hua et al. 2022): one head, relu(s)**2 instead of softmax, gated output."""

    def __init__(self, dim: int = 32, expansion: int = 2, s: int = 16) -> None:
        super().__init__()
        self.uv = nn.Linear(dim, 2 * expansion * dim + s)
        self.gamma, self.beta = nn.Parameter(torch.randn(2, s) * 0.02 + 1), nn.Parameter(torch.zeros(2, s))
        self.o = nn.Linear(expansion * dim, dim)
        self.e = expansion * dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        u, v, z = torch.split(F.silu(self.uv(x)), [self.e, self.e, self.uv.out_features - 2 * self.e], dim=-1)
        q, k = (z[:, :, None] * self.gamma + self.beta).unbind(2)
        a = F.relu(q @ k.transpose(1, 2) / n) ** 2
        return self.o(u * (a @ v))

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        return cls().eval(), (torch.randn(2, 12, 32),)


class AttentionHeavy(nn.Module):
    """Benchmark model: a stack of causal attention layers at sequence 1024 where attention dominates."""

    def __init__(self, dim: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CausalInlineBlock(dim, heads) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, norm in zip(self.blocks, self.norms):
            x = x + block(norm(x))
        return x

    @classmethod
    def make(cls) -> tuple[nn.Module, tuple]:
        return cls().eval(), (torch.randn(1, 1024, 128),)


class AttentionWithProbs(nn.Module):
    """Self-attention that also returns its probabilities, as Hugging Face models do when asked for
    `output_attentions=True`: a near miss, left alone (the fused op never forms the probabilities)."""

    def __init__(self, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.o = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5, dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, n, c)), probs


MODELS = (
    HandMHA,
    CausalGPTBlock,
    CausalInlineBlock,
    GQABlock,
    DETRDecoderBlock,
    ViTEinsumBlock,
    PackedVarlenBlock,
    GAUBlock,
    AttentionHeavy,
)


# Demo- and benchmark-sized factories (the classes' own `make()` are test-sized).
def make_attention_heavy() -> tuple[nn.Module, tuple]:
    """Two causal pre-norm layers, [1, 1024, 128]."""
    torch.manual_seed(0)
    return AttentionHeavy.make()


def make_padded_mha() -> tuple[nn.Module, tuple]:
    """BERT-style self-attention with a key-padding mask, [2, 512, 256], 4 heads."""
    torch.manual_seed(0)
    model = HandMHA(dim=256, heads=4).eval()
    mask = torch.ones(2, 512, dtype=torch.long)
    mask[1, 384:] = 0
    return model, (torch.randn(2, 512, 256), mask)


def make_gqa_decoder() -> tuple[nn.Module, tuple]:
    """Llama-style grouped-query attention block, 8 query heads sharing 2 kv heads, [1, 1024, 256]."""
    torch.manual_seed(0)
    return GQABlock(dim=256, heads=8, kv_heads=2).eval(), (torch.randn(1, 1024, 256),)


def make_attention_with_probs() -> tuple[nn.Module, tuple]:
    """The near miss of the demo: attention whose probabilities are returned, [1, 256, 128], 4 heads."""
    torch.manual_seed(0)
    return AttentionWithProbs().eval(), (torch.randn(1, 256, 128),)
