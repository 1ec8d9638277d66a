"""SSM recurrences as public research code spells them, each written here in its own words with its source
named in its docstring (`tests/test_ssm_thirdparty.py` runs them). Each function is a model's forward:
`fn(module, *inputs)`, parameters read from `module` (a `Recurrence`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.associative_scan import associative_scan

BATCH, CHANNELS, LENGTH, STATE = 2, 8, 8, 4


class Recurrence(nn.Module):
    """`fn(self, *inputs)` with the given parameters."""

    def __init__(self, fn, **params: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, value in params.items():
            setattr(self, name, nn.Parameter(value))

    def forward(self, *inputs):
        return self.fn(self, *inputs)


def _decays(m, u, delta, B):
    """u, delta [b, d, l]; B [b, l, n] -> exp(Δ ⊗ A), Δ·u ⊗ B, both [b, d, l, n]."""
    A, delta = -torch.exp(m.A_log), F.softplus(delta)
    return torch.exp(A[None, :, None, :] * delta[..., None]), delta[..., None] * B[:, None] * u[..., None]


def ref_scan(m, u, delta, B, C, z=None, grouped=False):
    """Spelled as mamba_ssm's selective_scan_ref (mamba_ssm/ops/selective_scan_interface.py): float32 inputs,
    delta_bias and softplus, einsum discretization, B/C as [b, n, l] or as groups [b, g, n, l] repeated over
    channels, the last state kept in the loop, D skip and silu(z) gate after."""
    u, delta = u.float(), F.softplus(delta.float() + m.delta_bias[..., None])
    channels, state = m.A.shape
    if grouped:  # einops' repeat "b g n l -> b (g h) n l": a new axis, expanded, merged by a reshape
        B, C = (t[:, :, None].expand(-1, -1, channels // t.shape[1], -1, -1).reshape(t.shape[0], channels,
                *t.shape[2:]) for t in (B, C))  # fmt: skip
    discrete_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, m.A))
    if B.dim() == 2:
        b_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    else:
        b_u = torch.einsum("bdl,bdnl,bdl->bdln" if grouped else "bdl,bnl,bdl->bdln", delta, B, u)
    x, ys, last = m.A.new_zeros(u.shape[0], channels, state), [], None
    for i in range(u.shape[2]):
        x = discrete_a[:, :, i] * x + b_u[:, :, i]
        if C.dim() == 2:
            y = torch.einsum("bdn,dn->bd", x, C)
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[..., i]) if grouped else torch.einsum("bdn,bn->bd", x, C[:, :, i])
        if i == u.shape[2] - 1:
            last = x
        ys.append(y)
    out = torch.stack(ys, dim=2) + u * m.D[:, None]
    return (out if z is None else out * F.silu(z)), last


def stacked_states(m, x, delta, B, C, h0=None):
    """Spelled as alxndrTL/mamba.py's selective_scan_seq (mambapy/mamba.py): [b, l, d] layout, the states
    themselves stacked on dim 1 and read out after the loop with a matmul, the D skip."""
    A, delta = -torch.exp(m.A_log), F.softplus(delta)
    delta_a = torch.exp(delta.unsqueeze(-1) * A)
    bx = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
    h = torch.zeros(x.shape[0], A.shape[0], A.shape[1]) if h0 is None else h0
    hs = []
    for t in range(x.shape[1]):
        h = delta_a[:, t] * h + bx[:, t]
        hs.append(h)
    hs = torch.stack(hs, dim=1)
    return (hs @ C.unsqueeze(-1)).squeeze(3) + m.D * x


def concatenated_states(m, x, delta, B, C, decay=torch.exp):
    """mamba.py's loop with each state unsqueezed and concatenated, the last state returned too (its pscan
    path's `hs[:, -1]`); `decay` other than exp is a gated recurrence the op does not compute."""
    A, delta = -torch.exp(m.A_log), F.softplus(delta)
    delta_a, bx = decay(delta.unsqueeze(-1) * A), delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
    h, hs = torch.zeros(x.shape[0], A.shape[0], A.shape[1]), []
    for t in range(x.shape[1]):
        h = bx[:, t] + h * delta_a[:, t]
        hs.append(h.unsqueeze(1))
    hs = torch.cat(hs, 1)
    return (hs @ C.unsqueeze(-1)).squeeze(3), hs[:, -1]


def stacked_states_two_readers(m, x, delta, B, C):
    """mamba.py's loop, its states read twice (the readout and their mean): the scan alone is fused."""
    A, delta = -torch.exp(m.A_log), F.softplus(delta)
    delta_a, bx = torch.exp(delta.unsqueeze(-1) * A), delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
    h, hs = torch.zeros(x.shape[0], A.shape[0], A.shape[1]), []
    for t in range(x.shape[1]):
        h = delta_a[:, t] * h + bx[:, t]
        hs.append(h)
    hs = torch.stack(hs, dim=1)
    return (hs @ C.unsqueeze(-1)).squeeze(3) + hs.mean(-1)


def blelloch(m, x, delta, B, C):
    """Spelled as mamba.py's pscan (mambapy/pscan.py): an in-place up and down sweep over views, L = 8."""
    A, delta = -torch.exp(m.A_log), F.softplus(delta)
    a = torch.exp(delta.unsqueeze(-1) * A).transpose(2, 1).clone()  # [b, d, l, n]
    h = (delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)).transpose(2, 1).clone()
    b, d, length = a.shape[:3]
    ua, uh = a.view(b, d, length // 2, 2, -1), h.view(b, d, length // 2, 2, -1)  # level 1: pairs
    uh[:, :, :, 1].add_(ua[:, :, :, 1] * uh[:, :, :, 0])
    ua[:, :, :, 1].mul_(ua[:, :, :, 0])
    a2, h2 = ua[:, :, :, 1], uh[:, :, :, 1]  # the 4 pair sums: scan them in place
    h2[:, :, 1].add_(a2[:, :, 1] * h2[:, :, 0])
    a2[:, :, 1].mul_(a2[:, :, 0])
    h2[:, :, 3].add_(a2[:, :, 3] * (h2[:, :, 2] + a2[:, :, 2] * h2[:, :, 1]))
    h2[:, :, 2].add_(a2[:, :, 2] * h2[:, :, 1])
    uh[:, :, 1:, 0].add_(ua[:, :, 1:, 0] * uh[:, :, :-1, 1])  # down sweep: the even positions
    return (h.transpose(2, 1) @ C.unsqueeze(-1)).squeeze(3)


def preallocated(m, u, delta, B, C, kind="empty"):
    """Outputs written into a preallocated tensor, `ys[:, :, i] = y` (research code's spelling, e.g. S4/Mamba
    reimplementations), sum readout, D skip."""
    discrete_a, b_u = _decays(m, u, delta, B)
    h = torch.zeros(u.shape[0], u.shape[1], STATE)
    ys = torch.empty_like(u) if kind == "empty" else torch.zeros(u.shape)
    first = 1 if kind == "partial" else 0
    for i in range(first, u.shape[2]):
        h = discrete_a[:, :, i] * h + b_u[:, :, i]
        y = (h * C[:, i, None]).sum(-1)
        ys[:, :, i] = y + 0.5 * ys[:, :, i - 1] if kind == "read-mid-loop" else y
    return ys + u * m.D[:, None]


def preallocated_time_major(m, u, delta, B, C):
    """mamba-minimal's layout [b, l, d] (johnma2006/mamba-minimal model.py) with `ys[:, i] = y` into zeros."""
    A, delta = -torch.exp(m.A_log), F.softplus(delta)
    discrete_a = torch.exp(torch.einsum("bld,dn->bldn", delta, A))
    b_u = torch.einsum("bld,bln,bld->bldn", delta, B, u)
    x, ys = torch.zeros(u.shape[0], u.shape[2], STATE), torch.zeros_like(u)
    for i in range(u.shape[1]):
        x = discrete_a[:, i] * x + b_u[:, i]
        ys[:, i] = torch.einsum("bdn,bn->bd", x, C[:, i])
    return ys


def preallocated_backwards(m, u, delta, B, C):
    """The loop run backwards over time, each output written into its own slot: the stacked order is the
    reverse of the recurrence's."""
    discrete_a, b_u = _decays(m, u, delta, B)
    h, ys = torch.zeros(u.shape[0], u.shape[1], STATE), torch.empty_like(u)
    for i in reversed(range(u.shape[2])):
        h = discrete_a[:, :, i] * h + b_u[:, :, i]
        ys[:, :, i] = (h * C[:, i, None]).sum(-1)
    return ys


def preallocated_inplace_state(m, u, delta, B, C):
    """States updated in place and written into a buffer, `hs[:, :, i] = h`: every slot aliases one h."""
    discrete_a, b_u = _decays(m, u, delta, B)
    h, hs = torch.zeros(u.shape[0], u.shape[1], STATE), torch.empty(*u.shape, STATE)
    for i in range(u.shape[2]):
        h.mul_(discrete_a[:, :, i]).add_(b_u[:, :, i])
        hs[:, :, i] = h
    return (hs * C[:, None]).sum(-1)


def growing_cat(m, u, delta, B, C, in_place=False):
    """Outputs grown by `ys = torch.cat([ys, y], -1)` from an empty start (research code's other spelling);
    `in_place`: the state updated in place and the state itself concatenated (each piece aliases one h)."""
    discrete_a, b_u = _decays(m, u, delta, B)
    h, ys = torch.zeros(u.shape[0], u.shape[1], STATE), torch.empty(u.shape[0], u.shape[1], 0)
    for i in range(u.shape[2]):
        if in_place:
            h.mul_(discrete_a[:, :, i]).add_(b_u[:, :, i])
            ys = h[..., None] if i == 0 else torch.cat([ys, h[..., None]], dim=-1)
        else:
            h = discrete_a[:, :, i] * h + b_u[:, :, i]
            ys = torch.cat([ys, (h * C[:, i, None]).sum(-1, keepdim=True)], dim=-1)
    return (ys * C.transpose(1, 2)[:, None]).sum(-2) if in_place else ys


def _linear(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


def reversed_assoc(m, u, delta, B, C):
    """Hugging Face Mamba's associative_scan path (combine_mode="generic"), run backwards in time."""
    discrete_a, b_u = _decays(m, u, delta, B)
    _, hs = associative_scan(_linear, (discrete_a, b_u), dim=2, reverse=True, combine_mode="generic")
    return (hs * C[:, None]).sum(-1)


def _segsum(x):
    cs = torch.cumsum(x, dim=-1)
    keep = torch.tril(torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool))
    return (cs[..., :, None] - cs[..., None, :]).masked_fill(~keep, -torch.inf)


def ssd_chunked(m, X, A_raw, B, C):
    """Spelled as mamba_ssm's ssd_minimal_discrete (mamba_ssm/modules/ssd_minimal.py), chunks of 4."""
    b, length, heads, p = X.shape
    X, A, B, C = (t.reshape(b, length // 4, 4, *t.shape[2:]) for t in (X, -F.softplus(A_raw), B, C))
    A = A.permute(0, 3, 1, 2)
    a_cs = torch.cumsum(A, dim=-1)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, torch.exp(_segsum(A)), X)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, torch.exp(a_cs[..., -1:] - a_cs), X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    chunk_decay = torch.exp(_segsum(F.pad(a_cs[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states[:, :-1], torch.exp(a_cs))
    return (y_diag + y_off).reshape(b, length, heads, p), states[:, -1]


def rwkv_wkv(m, k, v):
    """Spelled as RWKV-4's max-stabilised wkv (BlinkDL's RWKV_in_150_lines.py), batched [b, l, c]."""
    w, aa, bb = -torch.exp(m.decay), torch.zeros_like(k[:, 0]), torch.zeros_like(k[:, 0])
    pp, outs = torch.full_like(k[:, 0], -1e38), []
    for t in range(k.shape[1]):
        ww = m.first + k[:, t]
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        outs.append((e1 * aa + e2 * v[:, t]) / (e1 * bb + e2))
        ww = pp + w
        p = torch.maximum(ww, k[:, t])
        e1, e2 = torch.exp(ww - p), torch.exp(k[:, t] - p)
        aa, bb, pp = e1 * aa + e2 * v[:, t], e1 * bb + e2, p
    return torch.stack(outs, 1)


def s4d_recurrent(m, u):
    """S4D in recurrent mode as state-spaces/s4 (models/s4/s4d.py) discretizes it (ZOH, complex diagonal A),
    stepped over time, read out with a complex einsum and 2·Re as in mamba_ssm's complex selective_scan_ref."""
    A = -torch.exp(m.log_A_real) + 1j * m.A_imag
    dA = torch.exp(torch.exp(m.log_dt)[:, None] * A)
    dB = (dA - 1.0) / A * torch.complex(m.B_re, m.B_im)
    C = torch.complex(m.C_re, m.C_im)
    h, ys = torch.zeros(u.shape[0], *A.shape, dtype=dA.dtype), []
    for t in range(u.shape[-1]):
        h = dA * h + dB * u[:, :, t, None]
        ys.append(torch.einsum("bhn,hn->bh", h, C).real * 2)
    return torch.stack(ys, -1)


def s4d_params():
    complex_parts = {k: torch.randn(CHANNELS, STATE) for k in ("A_imag", "B_re", "B_im", "C_re", "C_im")}
    return {"log_dt": torch.rand(CHANNELS) * -3, "log_A_real": torch.randn(CHANNELS, STATE) * 0.3, **complex_parts}


def lti_ellipsis_readout(m, x):
    """An LTI loop (LRU-style real decay) read out by an einsum with an ellipsis: not batched over time."""
    a, h, ys = torch.exp(-torch.exp(m.nu)), torch.zeros(x.shape[0], STATE), []
    for t in range(x.shape[1]):
        h = a * h + x[:, t] @ m.B
        ys.append(torch.einsum("...n,dn->...d", h, m.C))
    return torch.stack(ys, 1)


def randn_b(*shape: int) -> torch.Tensor:
    """A standard normal tensor [BATCH, *shape]."""
    return torch.randn(BATCH, *shape)


def scan_params():
    return {"A_log": torch.randn(CHANNELS, STATE) * 0.5, "D": torch.randn(CHANNELS)}


def ref_params():
    return {"A": -torch.rand(CHANNELS, STATE) - 0.2, "D": torch.randn(CHANNELS), "delta_bias": torch.randn(CHANNELS)}


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def ref_scan_half(m, u, delta, B, C, z):
    """selective_scan_ref with half inputs: every input cast with .float(), the output cast back to u's dtype.
    The scan reads u and the skip reads its cast: one leaf of the fused site, not two."""
    out, last = ref_scan(m, _as_float(u), delta, _as_float(B), _as_float(C), _as_float(z))
    return out.to(u.dtype), last


def loop_inputs(time_major: bool) -> tuple[torch.Tensor, ...]:
    """u, delta [BATCH, CHANNELS, LENGTH] ([BATCH, LENGTH, CHANNELS] when time_major); B, C [BATCH, LENGTH, STATE]."""
    channels_time = (LENGTH, CHANNELS) if time_major else (CHANNELS, LENGTH)
    return randn_b(*channels_time), randn_b(*channels_time), randn_b(LENGTH, STATE), randn_b(LENGTH, STATE)
