"""Mamba2 mixer: a drop-in for `mamba_ssm.Mamba2` (same parameter names, shapes and init) with a pure-PyTorch path.

The pure-PyTorch path runs everywhere (CPU tests, training without the CUDA extensions): a causal depthwise conv and
the chunked SSD algorithm (matmuls inside chunks, one small matrix product across chunks, no loop over tokens).
On CUDA, `backend="auto"` uses mamba_ssm's Triton kernels when they import (see `requirements-cuda.txt`);
the choice is resolved by `models.backends`, shared with the attention kernels.
A `Mamba2State` carries the conv window and the SSM state so a sequence can be fed in pieces (one scale at a time)
with the same outputs as a single pass over the whole sequence.

Shape legend: B batch, L sequence length (l: a piece of it), D d_model, H SSM heads, P head dim, G groups,
N d_state, Dc conv channels (d_ssm + 2*G*N), K conv width, c chunks, Q chunk length.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import mamba2_cpu, torch_features, triton_autotune
from models.backends import MAMBA, check_name, resolve

logger = logging.getLogger(__name__)

# The PyTorch path scans in chunks of min(chunk_size, this): same maths, and on CPU (C=1024, L=680) chunks of 64
# make forward+backward ~1.45x faster than 256, because the (Q, Q) intra-chunk tensors shrink with Q.
TORCH_CHUNK_SIZE = 64
# Without a state, the PyTorch path runs a CPU batch in slices of sequences whose in_proj output stays under this
# many bytes (float32): the layer is a chain of elementwise passes, and on a slice that fits the caches they read
# warm memory, forward and backward (depth 4, width 128, L=155, batch 64, one thread: ~1.4x faster; measured in
# docs/benchmarks.md). Sequences are independent, so only the products' blocking differs from one pass.
CPU_SLICE_BYTES = 4 << 20


# ---------------------------------------------------------------------------------------------------------------
# Pure-PyTorch building blocks
# ---------------------------------------------------------------------------------------------------------------
def ssd_chunk_scan(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state_BHPN: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan of h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t + D x_t.

    `dt_BLH` is the final step size (softplus and bias already applied), `A_H` is negative, `D` is (H,) or (H, P).
    Heads are split evenly over the G groups of B and C. With `x_BLHP` in float32, bf16 or fp16 (bf16/fp16: Mamba2
    under autocast) the products inside and out of chunks run in x's dtype while the decays, the state carried
    across chunks and the output are float32; float64 inputs are scanned entirely in float64 (the tests'
    reference precision).
    Returns (y_BLHP in the compute dtype, final state (B, H, P, N)).
    """
    with torch.autocast(x_BLHP.device.type, enabled=False):  # every cast below is explicit
        scan = _ssd_chunk_scan_float64 if x_BLHP.dtype == torch.float64 else _ssd_chunk_scan_mixed
        return scan(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D, initial_state_BHPN)


def _pad_to_chunks(x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int):
    """(x, dt, B, C padded along L to a multiple of Q, Q, c): c = ceil(L / chunk_size) chunks of equal length
    Q = ceil(L / c) <= chunk_size, so that at most c - 1 positions are padding (L=155, chunk_size 64: 3 chunks of 52,
    not of 64 with 37 padded)."""
    L = x.shape[1]
    c = -(-L // chunk_size)
    Q = -(-L // c)
    pad = c * Q - L
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is unchanged
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    return x, dt, B, C, Q, c


def _ssd_chunk_scan_float64(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D, initial_state_BHPN):
    """`ssd_chunk_scan` in float64: every step in float64, the state passed across chunks by one batched product."""
    Bsz, L, H, P = x_BLHP.shape
    G, N = B_BLGN.shape[-2:]
    Hg = H // G
    cdt = torch.float64
    x, dt, B, C, Q, c = _pad_to_chunks(*(t.to(cdt) for t in (x_BLHP, dt_BLH, B_BLGN, C_BLGN)), chunk_size)

    dA_cs_BcHQ = torch.cumsum((dt * A_H.to(cdt)).view(Bsz, c, Q, H), dim=2).transpose(2, 3)
    xdt_BcGhQP = (x * dt.unsqueeze(-1)).view(Bsz, c, Q, G, Hg, P).permute(0, 1, 3, 4, 2, 5)
    B_BcGQN = B.view(Bsz, c, Q, G, N).transpose(2, 3)
    C_BcGQN = C.view(Bsz, c, Q, G, N).transpose(2, 3)

    # 1. within chunks: y_l += sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s
    causal_QQ = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg_BcHQQ = (dA_cs_BcHQ.unsqueeze(-1) - dA_cs_BcHQ.unsqueeze(-2)).masked_fill(~causal_QQ, -math.inf)
    CB_BcGQQ = C_BcGQN @ B_BcGQN.transpose(-1, -2)
    scores_BcGhQQ = CB_BcGQQ.unsqueeze(3) * seg_BcHQQ.exp().view(Bsz, c, G, Hg, Q, Q)
    y_BcGhQP = scores_BcGhQQ @ xdt_BcGhQP

    # 2. state contributed by each chunk, decayed to the chunk's end
    decay_to_end_BcHQ = (dA_cs_BcHQ[..., -1:] - dA_cs_BcHQ).exp()
    xdt_decayed = xdt_BcGhQP * decay_to_end_BcHQ.view(Bsz, c, G, Hg, Q, 1)
    states_BcGhPN = xdt_decayed.transpose(-1, -2) @ B_BcGQN.unsqueeze(3)

    # 3. across chunks: state entering chunk k = sum_{j<=k} exp(T_k - T_j) s_j over [initial, chunk 0, ..., c-1]
    if initial_state_BHPN is None:
        init_B1HPN = states_BcGhPN.new_zeros(Bsz, 1, H, P, N)
    else:
        init_B1HPN = initial_state_BHPN.to(cdt).reshape(Bsz, 1, H, P, N)
    all_states = torch.cat([init_B1HPN, states_BcGhPN.reshape(Bsz, c, H, P, N)], dim=1)  # (B, c+1, H, P, N)
    T_BHz = F.pad(torch.cumsum(dA_cs_BcHQ[..., -1], dim=1), (0, 0, 1, 0)).transpose(1, 2)  # (B, H, c+1)
    causal_zz = torch.ones(c + 1, c + 1, dtype=torch.bool, device=x.device).tril()
    chunk_decay_BHzz = (T_BHz.unsqueeze(-1) - T_BHz.unsqueeze(-2)).masked_fill(~causal_zz, -math.inf).exp()
    passed_BHzX = chunk_decay_BHzz @ all_states.transpose(1, 2).reshape(Bsz, H, c + 1, P * N)
    passed_BzHPN = passed_BHzX.view(Bsz, H, c + 1, P, N).transpose(1, 2)
    entering_BcGhNP = passed_BzHPN[:, :-1].reshape(Bsz, c, G, Hg, P, N).transpose(-1, -2)
    final_BHPN = passed_BzHPN[:, -1]

    # 4. output from the state entering each chunk, decayed to each position
    y_off_BcGhQP = (C_BcGQN.unsqueeze(3) @ entering_BcGhNP) * dA_cs_BcHQ.exp().view(Bsz, c, G, Hg, Q, 1)
    y_BLHP = (y_BcGhQP + y_off_BcGhQP).permute(0, 1, 4, 2, 3, 5).reshape(Bsz, c * Q, H, P)[:, :L]
    if D is not None:
        y_BLHP = y_BLHP + x[:, :L] * (D.to(cdt).view(H, -1))
    return y_BLHP, final_BHPN


def _ssd_chunk_scan_mixed(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D, initial_state_BHPN):
    """`ssd_chunk_scan` for float32, bf16 or fp16 x, B, C: the products in that dtype, the decays, the carried state
    and the output in float32. With a gradient to compute, one autograd Function (`_MixedChunkScan`) whose backward,
    derived by hand, reuses the forward's intermediates; without (sampling), the same forward alone."""
    inputs = (x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D, initial_state_BHPN)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _MixedChunkScan.apply(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D, initial_state_BHPN)
    y, final, _ = _mixed_scan_forward(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D, initial_state_BHPN)
    return y, final


def _mixed_scan_forward(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D, initial_state_BHPN, keep=False):
    """(y, final state, what the backward reuses if `keep` else None), without autograd. Laid out for few passes
    over memory: every elementwise step writes its result in the layout and dtype the next product reads, and the
    state is carried chunk by chunk (c small elementwise steps). `acc` is float32 (float64 for float64 inputs, which
    only the gradcheck of `_MixedChunkScan` passes)."""
    Bsz, L, H, P = x_BLHP.shape
    G, N = B_BLGN.shape[-2:]
    Hg, mdt, acc = H // G, x_BLHP.dtype, torch.promote_types(x_BLHP.dtype, torch.float32)
    x, dt, B, C, Q, c = _pad_to_chunks(x_BLHP, dt_BLH.to(acc), B_BLGN.to(mdt), C_BLGN.to(mdt), chunk_size)
    dt_BcHQ = dt.view(Bsz, c, Q, H).transpose(2, 3)
    dA_cs_BcHQ = torch.cumsum(dt_BcHQ * A_H.to(acc).view(H, 1), dim=-1)
    xdt_BcHQP = _written(torch.mul, x.view(Bsz, c, Q, H, P).transpose(2, 3), dt_BcHQ.unsqueeze(-1), dtype=mdt)
    B_BcGQN = B.view(Bsz, c, Q, G, N).transpose(2, 3)
    C_BcGQN = C.view(Bsz, c, Q, G, N).transpose(2, 3)

    # 1. within chunks: y_l += sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s
    causal_QQ = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay_BcGhQQ = (dA_cs_BcHQ.unsqueeze(-1) - dA_cs_BcHQ.unsqueeze(-2)).masked_fill_(~causal_QQ, -math.inf) \
        .exp_().view(Bsz, c, G, Hg, Q, Q)
    CB_BcGQQ = C_BcGQN @ B_BcGQN.transpose(-1, -2)
    scores_BcGhQQ = _written(torch.mul, CB_BcGQQ.unsqueeze(3), decay_BcGhQQ, dtype=mdt)
    xdt_BcGhQP = xdt_BcHQP.view(Bsz, c, G, Hg, Q, P)
    y_BcGhQP = scores_BcGhQQ @ xdt_BcGhQP

    # 2. state contributed by each chunk, decayed to the chunk's end: xdt written as (heads x P, Q) rows, so that
    # one product per chunk and group serves every head of the group (B is not repeated per head)
    decay_to_end_BcGhQ1 = (dA_cs_BcHQ[..., -1:] - dA_cs_BcHQ).exp_().view(Bsz, c, G, Hg, Q, 1)
    xdt_decayed_BcGhPQ = _written(torch.mul, xdt_BcGhQP.transpose(-1, -2), decay_to_end_BcGhQ1.transpose(-1, -2),
                                  dtype=mdt)
    states_BcGhPN = (xdt_decayed_BcGhPQ.view(Bsz, c, G, Hg * P, Q) @ B_BcGQN).view(Bsz, c, G, Hg, P, N)

    # 3. carry the state from chunk to chunk in float32 (h_k: the state entering chunk k); 4. each chunk's output
    # from the state entering it, one product per chunk and group for every head ((Q, N) x (N, heads x P): C is not
    # repeated per head either). The states are stacked from a list: torch.compile takes no out= into a strided view,
    # and eager's out= saved at most 3% of the scan (11 chunks; 0.3% at 256 px's 3)
    decay_BcGh11 = dA_cs_BcHQ[..., -1].exp().view(Bsz, c, G, Hg, 1, 1)
    h_k = [x.new_zeros(Bsz, G, Hg, P, N, dtype=acc) if initial_state_BHPN is None
           else initial_state_BHPN.to(acc).reshape(Bsz, G, Hg, P, N)]
    for k in range(c):
        h_k.append(torch.addcmul(states_BcGhPN[:, k], h_k[k], decay_BcGh11[:, k]))
    h_BcGhPN, final_BHPN = torch.stack(h_k[:c], dim=1), h_k[c].view(Bsz, H, P, N)
    y_off = [C_BcGQN[:, k] @ h_BcGhPN[:, k].to(mdt).view(Bsz, G, Hg * P, N).transpose(-1, -2) for k in range(c)]
    y_off_BcGQX = torch.stack(y_off, dim=1)  # (B,c,G,Q,X), X: heads x P
    y_off_BcQGhP = y_off_BcGQX.view(Bsz, c, G, Q, Hg, P).transpose(2, 3)

    # y = within-chunk part + decayed state part (+ D x), written once in (B, L, H, P) order
    decay_in_BcHQ = dA_cs_BcHQ.exp()
    y_BcQGhP = _written(torch.addcmul, y_BcGhQP.permute(0, 1, 4, 2, 3, 5), y_off_BcQGhP,
                        decay_in_BcHQ.view(Bsz, c, G, Hg, Q, 1).permute(0, 1, 4, 2, 3, 5), dtype=acc)
    y_BcQHP = y_BcQGhP.view(Bsz, c, Q, H, P)
    if D is not None:
        y_BcQHP.addcmul_(x.view(Bsz, c, Q, H, P), D.to(acc).view(H, -1))
    saved = None
    if keep:
        saved = (x, dt_BcHQ, A_H.to(acc), B_BcGQN, C_BcGQN, decay_BcGhQQ, CB_BcGQQ, scores_BcGhQQ, xdt_BcGhQP,
                 decay_to_end_BcGhQ1, xdt_decayed_BcGhPQ, decay_BcGh11, h_BcGhPN, y_off_BcGQX, decay_in_BcHQ)
    return y_BcQHP.reshape(Bsz, c * Q, H, P)[:, :L], final_BHPN, saved


def _returned(t: torch.Tensor) -> torch.Tensor:
    """A Function's output, as a tensor of its own under torch.compile (where inductor fuses the copy away): torch 2.11
    gets the gradients wrong for an output the forward wrote in place or aliased (pytorch/pytorch#180642)."""
    return t.clone() if torch.compiler.is_compiling() else t


class _MixedChunkScan(torch.autograd.Function):
    """The mixed-precision chunked scan with its backward derived by hand (the notation of `_mixed_scan_forward`).

    Forward: cs = cumsum(dt A) within each chunk; xdt = x dt; scores = (C B^T) * exp(cs_l - cs_s) (causal);
    y = scores @ xdt + exp(cs_l) (C_l h_k^T) + D x, with h_k the state entering chunk k:
    h_{k+1} = S_k + exp(cs_end) h_k, S_k = (xdt * exp(cs_end - cs_s))^T B.
    Backward, from dy and d(final state): the chunk recursion run backwards (one small step per chunk), every other
    term as one batched product or one elementwise pass over the saved scores, decays and states; the gradient of
    cs summed in reverse gives dt's and A's. Products in the inputs' dtype, everything elementwise in float32."""

    @staticmethod
    def forward(ctx, x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D, initial_state_BHPN):
        y, final, saved = _mixed_scan_forward(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D,
                                              initial_state_BHPN, keep=True)
        ctx.save_for_backward(*saved, D)
        ctx.dtypes = (x_BLHP.dtype, dt_BLH.dtype, A_H.dtype, B_BLGN.dtype, C_BLGN.dtype)
        ctx.L, ctx.has_initial = x_BLHP.shape[1], initial_state_BHPN is not None
        return _returned(y), _returned(final)

    @staticmethod
    def backward(ctx, dy_BLHP, dfinal_BHPN):
        (x, dt_BcHQ, A_H, B_BcGQN, C_BcGQN, decay_BcGhQQ, CB_BcGQQ, scores_BcGhQQ, xdt_BcGhQP, w_BcGhQ1, u_BcGhPQ,
         decay_BcGh11, h_BcGhPN, y_off_BcGQX, e_BcHQ, D) = ctx.saved_tensors
        Bsz, c, G, Hg, Q, P = xdt_BcGhQP.shape
        H, N, L, mdt, acc = G * Hg, B_BcGQN.shape[-1], ctx.L, x.dtype, e_BcHQ.dtype
        dy = dy_BLHP.to(acc).contiguous()  # y.sum() gives an expanded gradient; `to` may return it as it is
        dy_BcQGhP = (F.pad(dy, (0, 0, 0, 0, 0, c * Q - L)) if c * Q != L else dy).reshape(Bsz, c, Q, G, Hg, P)

        # the state part, y_off * exp(cs_l): d(y_off) = dy exp(cs_l); its products with C and with the states
        dyo_BcQGhP = dy_BcQGhP * e_BcHQ.view(Bsz, c, G, Hg, Q).permute(0, 1, 4, 2, 3).unsqueeze(-1)
        dcs_BcGhQ = torch.linalg.vecdot(dyo_BcQGhP, y_off_BcGQX.to(acc).view(Bsz, c, G, Q, Hg, P).transpose(2, 3)) \
            .permute(0, 1, 3, 4, 2)
        dyo_BcGQX = dyo_BcQGhP.view(Bsz, c, Q, G, Hg * P).transpose(2, 3).to(mdt)
        dC_BcGQN = dyo_BcGQX @ h_BcGhPN.to(mdt).view(Bsz, c, G, Hg * P, N)
        dh_direct_BcGhPN = (dyo_BcGQX.transpose(-1, -2) @ C_BcGQN).view(Bsz, c, G, Hg, P, N)

        # the chunk recursion backwards: dh_k = dh_direct_k + exp(cs_end_k) dh_{k+1}, dh_c = d(final state);
        # dS_k = dh_{k+1} is what chunk k's state contributed
        dS_k = [h_BcGhPN.new_zeros(h_BcGhPN[:, 0].shape) if dfinal_BHPN is None
                else dfinal_BHPN.to(h_BcGhPN.dtype).reshape(h_BcGhPN[:, 0].shape)]  # chunk c-1, then down
        for k in range(c - 1, 0, -1):
            dS_k.append(torch.addcmul(dh_direct_BcGhPN[:, k], dS_k[-1], decay_BcGh11[:, k]))
        dS_BcGhPN = torch.stack(dS_k[::-1], dim=1)
        dinit = torch.addcmul(dh_direct_BcGhPN[:, 0], dS_BcGhPN[:, 0], decay_BcGh11[:, 0]).view(Bsz, H, P, N) \
            if ctx.has_initial else None
        dcs_end_BcGh = torch.linalg.vecdot(dS_BcGhPN.flatten(-2), h_BcGhPN.flatten(-2)) \
            * decay_BcGh11.view(Bsz, c, G, Hg)

        # the chunk states S = u^T B with u = xdt * w, w = exp(cs_end - cs_s)
        dS_m_BcGXN = dS_BcGhPN.to(mdt).view(Bsz, c, G, Hg * P, N)
        du_BcGhQP = (B_BcGQN @ dS_m_BcGXN.transpose(-1, -2)).view(Bsz, c, G, Q, Hg, P).transpose(3, 4)
        dB_BcGQN = u_BcGhPQ.view(Bsz, c, G, Hg * P, Q).transpose(-1, -2) @ dS_m_BcGXN
        dw_BcGhQ = torch.linalg.vecdot(du_BcGhQP.to(acc), xdt_BcGhQP.to(acc)) * w_BcGhQ1.squeeze(-1)
        dcs_BcGhQ -= dw_BcGhQ
        dcs_end_BcGh += dw_BcGhQ.sum(-1)

        # within chunks: y_diag = scores @ xdt, scores = CB * decay, decay = exp(cs_l - cs_s)
        dy_m_BcGhQP = dy_BcQGhP.permute(0, 1, 3, 4, 2, 5).to(mdt, memory_format=torch.contiguous_format)
        dscores_BcGhQQ = dy_m_BcGhQP @ xdt_BcGhQP.transpose(-1, -2)
        dxdt_BcGhQP = scores_BcGhQQ.transpose(-1, -2) @ dy_m_BcGhQP
        dmix_BcGhQQ = dscores_BcGhQQ.to(acc).mul_(decay_BcGhQQ)  # d(CB) per head
        dCB_BcGQQ = dmix_BcGhQQ.sum(3)
        ddecay_BcGhQQ = dmix_BcGhQQ.mul_(CB_BcGQQ.unsqueeze(3))  # d(decay) * decay = d(cs_l - cs_s)
        dcs_BcGhQ += ddecay_BcGhQQ.sum(-1)
        dcs_BcGhQ -= ddecay_BcGhQQ.sum(-2)
        dCB_m = dCB_BcGQQ.to(mdt)
        dC_BcGQN += dCB_m @ B_BcGQN
        dB_BcGQN += dCB_m.transpose(-1, -2) @ C_BcGQN
        dcs_BcGhQ[..., -1] += dcs_end_BcGh

        # xdt = x dt (both terms of dxdt), cs = cumsum(dt A), y += D x
        dxdt_BcGhQP = dxdt_BcGhQP.to(acc).addcmul_(du_BcGhQP, w_BcGhQ1)
        dxdt_BcQGhP = dxdt_BcGhQP.permute(0, 1, 4, 2, 3, 5)
        x_BcQGhP = x.view(Bsz, c, Q, G, Hg, P)
        da_BcHQ = dcs_BcGhQ.flip(-1).cumsum(-1).flip(-1).reshape(Bsz, c, H, Q)
        ddt_BcQH = torch.linalg.vecdot(dxdt_BcQGhP, x_BcQGhP.to(acc)).reshape(Bsz, c, Q, H) \
            + (da_BcHQ * A_H.view(H, 1)).transpose(2, 3)
        dA_H = (da_BcHQ * dt_BcHQ).sum((0, 1, 3))
        dx_BcQGhP = _written(torch.mul, dxdt_BcQGhP, dt_BcHQ.view(Bsz, c, G, Hg, Q, 1).permute(0, 1, 4, 2, 3, 5),
                             dtype=acc)
        dD = None
        if D is not None:
            D_GhP = D.to(acc).view(G, Hg, -1)
            dx_BcQGhP = dx_BcQGhP.addcmul_(dy_BcQGhP, D_GhP)
            dD = (dy_BcQGhP * x_BcQGhP).sum((0, 1, 2))
            dD = (dD if D.dim() == 2 else dD.sum(-1)).reshape(D.shape).to(D.dtype)

        def unpad(t, dtype):  # (B, c, Q, ...) -> (B, L, ...)
            return t.reshape(Bsz, c * Q, *t.shape[3:])[:, :L].to(dtype)

        x_t, dt_t, A_t, B_t, C_t = ctx.dtypes
        return (unpad(dx_BcQGhP.reshape(Bsz, c, Q, H, P), x_t), unpad(ddt_BcQH, dt_t), dA_H.to(A_t),
                unpad(dB_BcGQN.transpose(2, 3), B_t), unpad(dC_BcGQN.transpose(2, 3), C_t), None, dD,
                dinit)


def _written(op: Callable, *args: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """op(*args) as a new contiguous `dtype` tensor, written in one pass (`out=`) unless a gradient is needed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):  # out= has no autograd
        return op(*args).to(dtype).contiguous()
    out = torch.empty(torch.broadcast_shapes(*(t.shape for t in args)), dtype=dtype, device=args[0].device)
    return op(*args, out=out)


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int, norm_before_gate: bool,
) -> torch.Tensor:
    """RMSNorm over groups of `group_size` channels, gated by silu(z) before (default in Mamba2) or after the norm.

    Computes in float32 at least; returns z's dtype (the activations' dtype). One autograd Function
    (`_GatedRMSNorm`): its backward reuses the gate and the normalised values the forward wrote.
    """
    return _GatedRMSNorm.apply(y, z, weight, eps, group_size, norm_before_gate)


class _GatedRMSNorm(torch.autograd.Function):
    """out = n w (x silu(z) if norm_before_gate), n = v / rms(v) per group, v = y (x silu(z) if not norm_before_gate).

    Backward: with do = d(n w), dn = do w, dv = (dn - n mean(dn n)) / rms(v) per group, and silu's derivative by
    `aten.silu_backward`."""

    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size, norm_before_gate):
        cdt = torch.promote_types(y.dtype, torch.float32)
        ctx.dtypes = (y.dtype, z.dtype)
        y, z_c = y.to(cdt), z.to(cdt)
        gate = F.silu(z_c)
        v = y if norm_before_gate else y * gate
        v_grouped = v.unflatten(-1, (-1, group_size))
        r = torch.linalg.vector_norm(v_grouped, dim=-1, keepdim=True).square_().div_(group_size).add_(eps).rsqrt_()
        n = (v_grouped * r).flatten(-2)
        out = n * weight.to(cdt)
        if norm_before_gate:
            out.mul_(gate)
        ctx.save_for_backward(y, z, weight, gate, n, r)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return _returned(out.to(z.dtype))

    @staticmethod
    def backward(ctx, dout):
        y, z, weight, gate, n, r = ctx.saved_tensors
        cdt, gs = n.dtype, ctx.group_size
        dout, w = dout.to(cdt), weight.to(cdt)
        dz = None
        if ctx.norm_before_gate:
            dz = torch.ops.aten.silu_backward(dout * n * w, z.to(cdt))
            dout = dout * gate
        dw = (dout * n).flatten(0, -2).sum(0)
        dn_grouped = (dout * w).unflatten(-1, (-1, gs))
        n_grouped = n.unflatten(-1, (-1, gs))
        mean_BG1 = torch.linalg.vecdot(dn_grouped, n_grouped).unsqueeze(-1).div_(gs)
        dv = dn_grouped.addcmul_(n_grouped, mean_BG1, value=-1).mul_(r).flatten(-2)
        if ctx.norm_before_gate:
            dy = dv
        else:
            dz = torch.ops.aten.silu_backward(dv * y, z.to(cdt))
            dy = dv.mul_(gate)
        return dy.to(ctx.dtypes[0]), dz.to(ctx.dtypes[1]), dw.to(weight.dtype), None, None, None


class _CausalConvSiLU(torch.autograd.Function):
    """silu(depthwise causal conv1d + bias) over (B, l, Dc) kept channels-last: K shifted multiply-adds on contiguous
    rows, forward and backward, accumulated in float32 at least. (`F.conv1d` wants (B, Dc, l), so the transposes
    cost copies, and its depthwise backward on the CPU is slow: measured in docs/benchmarks.md.)"""

    @staticmethod
    def forward(ctx, x_BlD, w_DK, bias_D):
        K, n = w_DK.shape[1], x_BlD.shape[1]
        # taps as contiguous rows: broadcasting a strided column (w_DK[:, j]) is ~4x slower per pass on a CPU
        w_KD = w_DK.t().to(torch.promote_types(x_BlD.dtype, torch.float32), memory_format=torch.contiguous_format)
        pre_BlD = torch.mul(x_BlD, w_KD[K - 1])  # the newest tap: x_t; tap K-1-k reads x_{t-k}
        if bias_D is not None:
            pre_BlD.add_(bias_D)
        for k in range(1, min(K, n)):
            pre_BlD[:, k:].addcmul_(x_BlD[:, :n - k], w_KD[K - 1 - k])
        ctx.save_for_backward(x_BlD, w_DK, pre_BlD)
        ctx.has_bias = bias_D is not None
        return _returned(F.silu(pre_BlD).to(x_BlD.dtype))

    @staticmethod
    def backward(ctx, dy_BlD):
        x_BlD, w_DK, pre_BlD = ctx.saved_tensors
        K, n = w_DK.shape[1], x_BlD.shape[1]
        w_KD = w_DK.t().to(pre_BlD.dtype, memory_format=torch.contiguous_format)
        dpre_BlD = torch.ops.aten.silu_backward(dy_BlD.to(pre_BlD.dtype), pre_BlD)
        dx_BlD = dpre_BlD * w_KD[K - 1]
        dw_KD = torch.zeros_like(w_KD)
        dw_KD[K - 1] = (dpre_BlD * x_BlD).sum((0, 1))
        for k in range(1, min(K, n)):
            dx_BlD[:, :n - k].addcmul_(dpre_BlD[:, k:], w_KD[K - 1 - k])
            dw_KD[K - 1 - k] = (dpre_BlD[:, k:] * x_BlD[:, :n - k]).sum((0, 1))
        dw_DK = dw_KD.t()
        dbias_D = dpre_BlD.sum((0, 1)) if ctx.has_bias else None
        return dx_BlD.to(x_BlD.dtype), dw_DK.to(w_DK.dtype), dbias_D


class RMSNormGated(nn.Module):
    """Gated RMSNorm with mamba_ssm's parameter layout (`weight` only)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.group_size = hidden_size if group_size is None else group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, " \
               f"norm_before_gate={self.norm_before_gate}"


# ---------------------------------------------------------------------------------------------------------------
# Optional mamba_ssm / causal_conv1d kernels
# ---------------------------------------------------------------------------------------------------------------
def causal_conv1d_layout(x_BDl: torch.Tensor) -> torch.Tensor:
    """`x_BDl` in a layout causal_conv1d takes: a channel-last view (stride 1 along D, as in_proj's output
    transposed) only when D and the other two strides are multiples of 8, as causal_conv1d_fwd checks (M-VAR-d30's
    in_proj is 7868 wide); otherwise a contiguous copy, as mamba_ssm's own Mamba2 makes."""
    if x_BDl.stride(1) == 1 and all(n % 8 == 0 for n in (x_BDl.shape[1], x_BDl.stride(0), x_BDl.stride(2))):
        return x_BDl
    return x_BDl.contiguous()


@dataclass(frozen=True)
class MambaKernels:
    """Entry points of the optional CUDA/Triton kernels (None where a package did not import)."""

    chunk_scan: Callable  # mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined
    rmsnorm_fn: Callable | None  # mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn
    causal_conv1d_fn: Callable | None  # causal_conv1d.causal_conv1d_fn


def _import_mamba_submodule(name: str) -> types.ModuleType:
    """Import `mamba_ssm.<...>` even when `mamba_ssm/__init__.py` fails.

    The package init imports `selective_scan_cuda`, absent from wheels built without CUDA extensions, although the
    Triton submodules we need work. On failure we retry with a bare package object standing in for `mamba_ssm`
    (its __path__ only, the init not run), then remove that stand-in so a later `import mamba_ssm` by anyone else
    fails with its own original error instead of getting a half-built package.
    """
    try:
        return importlib.import_module(name)
    except Exception as package_err:  # any failure of the package init: retry without it
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            raise
        stub = types.ModuleType("mamba_ssm")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = stub
        try:
            return importlib.import_module(name)
        except Exception as err:
            raise err from package_err
        finally:
            if sys.modules.get("mamba_ssm") is stub:
                del sys.modules["mamba_ssm"]


@functools.cache
def load_kernels() -> tuple[MambaKernels | None, str]:
    """Import the optional kernels once. Returns (kernels or None, a short description of what happened)."""
    try:
        chunk_scan = _import_mamba_submodule("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    except Exception as err:  # the kernels are optional, any failure means "not available"
        return None, f"mamba_ssm Triton kernels unavailable ({type(err).__name__}: {err})"
    try:
        rmsnorm_fn = _import_mamba_submodule("mamba_ssm.ops.triton.layernorm_gated").rmsnorm_fn
    except Exception:  # optional: fall back to torch
        rmsnorm_fn = None
    try:
        causal_conv1d_fn = importlib.import_module("causal_conv1d").causal_conv1d_fn
    except Exception:  # optional: fall back to torch
        causal_conv1d_fn = None
    threads = triton_autotune.compile_threads()
    parallel = triton_autotune.compile_configs_in_parallel("mamba_ssm", threads)
    compiling = f"autotune configs compiled on {threads} threads" if parallel else "autotune configs compiled in turn"
    note = "mamba_ssm kernels loaded (gated norm: {}, causal_conv1d: {}, {})".format(
        "triton" if rmsnorm_fn else "torch", "yes" if causal_conv1d_fn else "no (torch conv)", compiling)
    logger.info(note)
    return MambaKernels(chunk_scan, rmsnorm_fn, causal_conv1d_fn), note


def _is_kernel_device(t: torch.Tensor) -> bool:
    """Whether the kernels can run on `t`'s device (a function so tests can pretend on CPU)."""
    return t.is_cuda


def resolve_kernels(backend: str, on_kernel_device: bool, device: torch.device | str = "cuda",
                    ) -> tuple[MambaKernels | None, str]:
    """(kernels or None, "mamba_ssm" | "torch") for a requested backend ("auto" defers to $MVAR_MAMBA_BACKEND).
    "cpu_fused" (kernels None: the PyTorch scan with models.mamba2_cpu's conv and norm) is for CPU inputs.
    A forced kernel that cannot run raises a `BackendError` saying why; callers may check a flag before any
    work. Each outcome is logged once."""
    def unavailable(name: str) -> str | None:
        if name == "torch":
            return None
        if name == "cpu_fused":
            on_cpu = torch.device(device).type == "cpu" and not on_kernel_device
            return mamba2_cpu.available() if on_cpu else f"needs CPU inputs, got device {device}"
        kernels, note = load_kernels()
        if kernels is None:
            return note
        return None if on_kernel_device else f"needs CUDA inputs, got device {device}"

    name = resolve(MAMBA, backend, unavailable, f"input on {device}")
    return (load_kernels()[0] if name == "mamba_ssm" else None), name


_resolved: dict[str, MambaKernels] = {}  # kernel_name's finds, for traced code: torch.compile cannot trace imports


@torch.compiler.assume_constant_result  # torch.compile runs it, eagerly, when tracing: logging cannot be traced
def kernel_name(backend: str, on_kernel_device: bool, device: torch.device) -> str:
    """`resolve_kernels`'s name; the kernels it found are then `_resolved[name]`."""
    kernels, name = resolve_kernels(backend, on_kernel_device, device)
    if kernels is not None:
        _resolved[name] = kernels
    return name


# ---------------------------------------------------------------------------------------------------------------
# The mixer
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Mamba2State:
    """Recurrent state of one Mamba2 layer for a batch: the last K-1 conv inputs and the SSM state.

    conv_state: (B, Dc, K-1), oldest input first. ssm_state: (B, H, P, N). Both are updated in place by
    `Mamba2.forward` (detached: no gradient flows through the carried state). Plain tensors, so batch indexing
    or repetition is `Mamba2State(s.conv_state[idx], s.ssm_state[idx])`.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


HEADDIM = 64  # mamba_ssm's default head size, and M-VAR's: expand x d_model must be a multiple of it


class Mamba2(nn.Module):
    """The Mamba2 mixer of mamba_ssm 2.3.2 (parameters, init and maths) with a portable PyTorch path.

    Unsupported mamba_ssm options: d_ssm != None (the extra gated-MLP channels) and tensor parallelism.
    `backend`: "auto" (env MVAR_MAMBA_BACKEND overrides it; mamba_ssm kernels for CUDA inputs when they import,
    else "cpu_fused" for CPU inputs when its C kernels build, else PyTorch), "torch" (the portable reference),
    "cpu_fused" (models.mamba2_cpu: the PyTorch scan with the conv + SiLU and the gated norm in fused C kernels,
    float32 or bf16 activations) or "mamba_ssm" (raises if the kernels are missing or the input is not on CUDA).
    The mamba_ssm path is NOT YET RUN ON GPU; its Triton kernels run on CPU under Triton's interpreter (fp32) in
    tests/test_triton_interpreter.py, through `_is_kernel_device`.
    `chunk_size` is the kernel's chunk length; the PyTorch path uses min(chunk_size, TORCH_CHUNK_SIZE) (same maths).
    Defaults are mamba_ssm's (d_state=128): M-VAR passes d_state=64, d_conv=4, expand=2.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = HEADDIM,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if d_ssm is not None and d_ssm != expand * d_model:
            raise ValueError(f"Mamba2: d_ssm={d_ssm} (SSM on part of the channels) is not supported; use d_ssm=None")
        check_name(MAMBA, backend)
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = self.d_ssm = expand * d_model
        if self.d_ssm % headdim:
            raise ValueError(f"Mamba2: expand*d_model={self.d_ssm} must be a multiple of headdim={headdim}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_ssm // headdim, ngroups
        if ngroups < 1 or self.nheads % ngroups:
            raise ValueError(f"Mamba2: nheads={self.nheads} must be a multiple of ngroups={ngroups}")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size, self.layer_idx, self.backend = chunk_size, layer_idx, backend
        self.active_backend: str | None = None  # what the last forward used, for extra_repr

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias, **factory)
        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        dt = torch.exp(torch.rand(self.nheads, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_bias._no_weight_decay = True
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"Mamba2: A_init_range={A_init_range} must satisfy 0 < low <= high")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, group_size=self.d_ssm // ngroups,
                                     norm_before_gate=norm_before_gate, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    # ---- public API --------------------------------------------------------------------------------------------
    def allocate_state(self, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> Mamba2State:
        """Zero state for `batch_size` sequences (device/dtype default to the parameters'; SSM state >= float32)."""
        device = self.out_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        K1 = self.d_conv - 1
        return Mamba2State(
            conv_state=torch.zeros(batch_size, self.conv_dim, K1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                  dtype=torch.promote_types(dtype, torch.float32)),
        )

    def forward(self, u_BlD: torch.Tensor, state: Mamba2State | None = None) -> torch.Tensor:
        """(B, l, D) -> (B, l, D). With `state`, continue from it and update it in place."""
        if torch.compiler.is_compiling() and torch_features.compiled_function_gradients_wrong() and \
                self._resolve_backend(u_BlD)[1] is not None:  # mamba_ssm's Functions, which `_returned` cannot mend
            return _forward_outside_the_graph(self, u_BlD, state)
        return self._forward_any_backend(u_BlD, state)

    def _forward_any_backend(self, u_BlD: torch.Tensor, state: Mamba2State | None) -> torch.Tensor:
        name, kernels = self._resolve_backend(u_BlD)
        # torch.compile traces the PyTorch path (inductor fuses it itself; the C kernels are opaque to it)
        fused_cpu = name == "cpu_fused" and not torch.compiler.is_compiling()
        per_slice = self._cpu_slice(u_BlD) if state is None and kernels is None else u_BlD.shape[0]
        if per_slice < u_BlD.shape[0]:
            return torch.cat([self._forward(u, None, None, fused_cpu) for u in u_BlD.split(per_slice)])
        return self._forward(u_BlD, state, kernels, fused_cpu)

    def _forward(self, u_BlD: torch.Tensor, state: Mamba2State | None, kernels: MambaKernels | None,
                 fused_cpu: bool = False) -> torch.Tensor:
        """`kernels`: mamba_ssm's (None: the PyTorch path); `fused_cpu`: models.mamba2_cpu's conv and norm there."""
        Bsz, seqlen, _ = u_BlD.shape
        zxbcdt = self.in_proj(u_BlD)
        z_Bld, xBC_Bld, dt_BlH = torch.split(zxbcdt, [self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        if kernels is not None and kernels.causal_conv1d_fn is not None and state is None and \
                2 <= self.d_conv <= 4:  # causal_conv1d's widths; others take the torch conv
            xBC_Bld = kernels.causal_conv1d_fn(causal_conv1d_layout(xBC_Bld.transpose(1, 2)),
                                               self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                               activation="silu").transpose(1, 2)
        else:
            xBC_Bld = self._causal_conv(xBC_Bld, state, fused_cpu)
        x_Bld, B_BlGN, C_BlGN = torch.split(xBC_Bld, [self.d_ssm, self.ngroups * self.d_state,
                                                      self.ngroups * self.d_state], dim=-1)
        x_BlHP = x_Bld.unflatten(-1, (self.nheads, self.headdim))
        B_BlGN = B_BlGN.unflatten(-1, (self.ngroups, self.d_state))
        C_BlGN = C_BlGN.unflatten(-1, (self.ngroups, self.d_state))
        cdt = torch.promote_types(u_BlD.dtype, torch.float32)  # float64 stays float64 (tests)
        A_H = -torch.exp(self.A_log.to(cdt))
        D = self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D
        initial = None if state is None else state.ssm_state
        if initial is not None and torch.is_grad_enabled():
            initial = initial.clone()  # a kernel may save it for backward; the state is overwritten below
        if kernels is None:
            dt_BlH = F.softplus(dt_BlH.to(cdt) + self.dt_bias.to(cdt))
            if self.dt_limit != (0.0, float("inf")):
                dt_BlH = dt_BlH.clamp(*self.dt_limit)
            y_BlHP, final = ssd_chunk_scan(x_BlHP, dt_BlH, A_H, B_BlGN, C_BlGN,
                                           min(self.chunk_size, TORCH_CHUNK_SIZE), D, initial)
            if not self.rmsnorm:
                y_BlHP = y_BlHP * F.silu(z_Bld.unflatten(-1, (self.nheads, self.headdim)).to(y_BlHP.dtype))
        else:  # not yet run on GPU (run on CPU under Triton's interpreter)
            out = kernels.chunk_scan(
                x_BlHP, dt_BlH, A_H, B_BlGN, C_BlGN, self.chunk_size, D=D,
                z=None if self.rmsnorm else z_Bld.unflatten(-1, (self.nheads, self.headdim)),
                dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit, initial_states=initial,
                return_final_states=state is not None,
            )
            y_BlHP, final = out if state is not None else (out, None)
        if state is not None:
            state.ssm_state.copy_(final.detach())
        y_Bld = y_BlHP.reshape(Bsz, seqlen, self.d_ssm)
        if self.rmsnorm:
            if kernels is not None and kernels.rmsnorm_fn is not None:
                y_Bld = kernels.rmsnorm_fn(y_Bld, self.norm.weight, None, z=z_Bld, eps=self.norm.eps,
                                           group_size=self.norm.group_size, norm_before_gate=self.norm_before_gate)
            elif fused_cpu and mamba2_cpu.fits(z_Bld, y_Bld, self.norm.weight):
                y_Bld = mamba2_cpu.GatedRMSNorm.apply(y_Bld, z_Bld, self.norm.weight, self.norm.eps,
                                                      self.norm.group_size, self.norm_before_gate)
            else:
                y_Bld = self.norm(y_Bld, z_Bld)
        return self.out_proj(y_Bld.to(z_Bld.dtype))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"headdim={self.headdim}, nheads={self.nheads}, ngroups={self.ngroups}, chunk_size={self.chunk_size}, "
                f"backend={self.backend} (active: {self.active_backend or 'not run yet'})")

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _causal_conv(self, xBC_Bld: torch.Tensor, state: Mamba2State | None, fused_cpu: bool = False
                     ) -> torch.Tensor:
        """Depthwise causal conv + SiLU over (B, l, Dc); starts from and updates `state.conv_state` if given.
        `fused_cpu`: models.mamba2_cpu's C kernel where it takes the tensors. With a state, the conv runs over the
        K-1 kept inputs and the new ones, and the first K-1 outputs are dropped: the teacher-forced pass's math
        (fp32 weights, fp32 accumulation; F.conv1d under autocast would round the weights to bf16/fp16)."""
        w_DK, bias_D = self.conv1d.weight.squeeze(1), self.conv1d.bias
        K1 = self.d_conv - 1
        if state is not None:
            xBC_Bld = torch.cat([state.conv_state.transpose(1, 2).to(xBC_Bld.dtype), xBC_Bld], dim=1)
            state.conv_state.copy_(xBC_Bld[:, xBC_Bld.shape[1] - K1:].transpose(1, 2).detach())
        fused = fused_cpu and mamba2_cpu.fits(xBC_Bld, w_DK, bias_D)
        y_Bld = (mamba2_cpu.CausalConvSiLU if fused else _CausalConvSiLU).apply(xBC_Bld, w_DK, bias_D)
        return y_Bld if state is None else y_Bld[:, K1:]

    def _cpu_slice(self, u_BlD: torch.Tensor) -> int:
        """Sequences per slice of the PyTorch path (`CPU_SLICE_BYTES`); the whole batch off the CPU."""
        if u_BlD.device.type != "cpu":
            return u_BlD.shape[0]
        return max(1, CPU_SLICE_BYTES // (u_BlD.shape[1] * self.in_proj.out_features * 4))

    def _resolve_backend(self, u: torch.Tensor) -> tuple[str, MambaKernels | None]:
        """(the backend's name, its kernels or None for the PyTorch path) for input `u` (logged once per outcome).
        Only eager calls record it in `active_backend`: dynamo takes no module write inside --grad_ckpt's
        checkpoint, and a read of it in the trace would guard on a value the eager calls change."""
        name = kernel_name(self.backend, _is_kernel_device(u), u.device)
        if not torch.compiler.is_compiling():
            self.active_backend = name
        return name, _resolved.get(name)


@torch.compiler.disable
def _forward_outside_the_graph(layer: Mamba2, u_BlD: torch.Tensor, state: Mamba2State | None) -> torch.Tensor:
    """Mamba2 with mamba_ssm's kernels eagerly inside a compiled model, on a torch whose compiled autograd.Functions
    get wrong gradients (`torch_features.compiled_function_gradients_wrong`): a graph break in the loop over blocks,
    so dynamo compiles the model's pieces apart. Our PyTorch path's Functions return fresh tensors and compile."""
    _log_outside_the_graph(torch.__version__)
    return layer._forward_any_backend(u_BlD, state)


OUTSIDE_THE_GRAPH = "Mamba2 layers on mamba_ssm's kernels run outside torch.compile's graph"  # (the GPU check reads it)


@functools.cache
def _log_outside_the_graph(version: str) -> None:
    logger.warning("torch %s: %s (its compiled autograd.Functions get wrong gradients on this torch: "
                   "pytorch/pytorch#180642); the model is compiled in pieces. --mamba_backend=torch compiles whole",
                   version, OUTSIDE_THE_GRAPH)
