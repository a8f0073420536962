"""Scale attention: kernels equal dense masked references, scale isolation/causality, KV cache, backend dispatch."""
import logging
import math
import sys
import types

import pytest
import torch

import models.attention as A
from models import backends
from models.attention import ScaleAttention, block_causal_attention, intra_scale_attention


pytestmark = pytest.mark.numerics  # rerun by `make test` at the lowest ISA level

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
SEG_256 = tuple(p * p for p in PN_256)
SEG_512 = tuple(p * p for p in PN_512)


@pytest.fixture(autouse=True)
def _fresh_backend_resolution(monkeypatch):
    monkeypatch.delenv(backends.ATTN.env, raising=False)
    A._resolve.cache_clear()
    backends._log_once.cache_clear()
    yield
    A._resolve.cache_clear()
    A._resolved.clear()  # kernel functions a test planted


def qkv(B, L, H, c, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, c, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]


def scale_ids(seg_lens):
    return torch.repeat_interleave(torch.arange(len(seg_lens)), torch.tensor(seg_lens))


def dense_reference(q, k, v, allowed_LL, scale):
    """Plain softmax attention over all L tokens with a boolean (L, L) mask; (B, L, H, c) in and out."""
    s_BHLL = torch.einsum("blhc,bmhc->bhlm", q, k) * scale
    s_BHLL = s_BHLL.masked_fill(~allowed_LL.to(q.device), float("-inf"))
    return torch.einsum("bhlm,bmhc->blhc", s_BHLL.softmax(-1), v)


def assert_fwd_bwd_equal(fn, ref, inputs, atol, rtol=0.0):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    ref_out = ref(*inputs)
    ref_grads = torch.autograd.grad(ref_out, inputs, torch.ones_like(ref_out))
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=atol, rtol=rtol)


# ---- kernels vs dense references ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seg_lens, B, H, c", [(SEG_256, 2, 2, 16), (SEG_512, 1, 2, 8), ((7, 1, 130, 3), 2, 3, 8)])
def test_intra_sdpa_equals_block_diagonal_reference(seg_lens, B, H, c):
    inputs = qkv(B, sum(seg_lens), H, c)
    ids = scale_ids(seg_lens)
    same_scale = ids[:, None] == ids[None, :]
    assert_fwd_bwd_equal(
        lambda q, k, v: intra_scale_attention(q, k, v, seg_lens, 0.3, backend="sdpa"),
        lambda q, k, v: dense_reference(q, k, v, same_scale, 0.3), inputs, atol=1e-5,
    )


def test_sdpa_packing_keeps_score_count_near_sum_of_squares():
    groups = A._pack_groups(SEG_512)
    assert [lens for _, _, lens in groups] == [(1, 4, 9, 16, 36), (81,), (169,), (324,), (576,), (1024,)]
    packed = sum((e - s) ** 2 for s, e, _ in groups)
    assert packed < 1.05 * sum(n * n for n in SEG_512) < 0.5 * sum(SEG_512) ** 2



def test_sdpa_packs_scales_up_to_exactly_the_token_budget():
    """A packed group may hold exactly SDPA_PACK_TOKENS tokens (consecutive scales are packed "while their total
    stays within" it); closing the group one scale early at the boundary passed the suite (mutant: `>` as `>=`)."""
    n = A.SDPA_PACK_TOKENS
    assert A._pack_groups((n // 2, n // 2, 1)) == ((0, n, (n // 2, n // 2)), (n, n + 1, (1,)))
    assert A._pack_groups((1, n - 1, 2)) == ((0, n, (1, n - 1)), (n, n + 2, (2,)))

@pytest.mark.parametrize("seg_lens", [SEG_256, (4, 9, 16)])
def test_block_causal_equals_dense_reference(seg_lens):
    inputs = qkv(2, sum(seg_lens), 2, 16)
    ids = scale_ids(seg_lens)
    key_not_later = ids[None, :] <= ids[:, None]
    assert_fwd_bwd_equal(
        lambda q, k, v: block_causal_attention(q, k, v, seg_lens, 0.3),
        lambda q, k, v: dense_reference(q, k, v, key_not_later, 0.3), inputs, atol=1e-5,
    )


def test_block_causal_mask_is_cached_and_block_causal():
    mask = A.block_causal_mask((1, 4), torch.device("cpu"), torch.float32)
    assert mask is A.block_causal_mask((1, 4), torch.device("cpu"), torch.float32)
    assert torch.isinf(mask[0, 1:]).all() and (mask[1:] == 0).all() and mask[0, 0] == 0


@pytest.mark.parametrize("mode", ["intra", "causal"])
def test_perturbing_one_scale_changes_only_allowed_scales(mode):
    seg_lens = (1, 4, 9, 16)
    ids = scale_ids(seg_lens)
    attn = ScaleAttention(32, 2, mode=mode).eval()
    x = torch.randn(2, sum(seg_lens), 32)
    with torch.no_grad():
        base = attn(x, seg_lens)
        for j in range(len(seg_lens)):
            x2 = x.clone()
            x2[:, ids == j] += torch.randn_like(x2[:, ids == j])
            changed = (attn(x2, seg_lens) - base).abs().amax(dim=(0, 2)) > 1e-6  # (L,)
            expect = ids == j if mode == "intra" else ids >= j
            assert torch.equal(changed, expect), (mode, j)


def test_forced_flash_error_names_the_reason():
    q, k, v = qkv(1, 5, 1, 8)
    with pytest.raises(ValueError, match="flash_attn.*needs CUDA"):
        intra_scale_attention(q, k, v, (1, 4), 1.0, backend="flash_attn")
    with pytest.raises(ValueError, match="torch_varlen.*needs CUDA"):
        intra_scale_attention(q, k, v, (1, 4), 1.0, backend="torch_varlen")
    with pytest.raises(ValueError, match="expected one of"):
        intra_scale_attention(q, k, v, (1, 4), 1.0, backend="xformers")
    with pytest.raises(ValueError, match="sum to the sequence length 5"):
        intra_scale_attention(q, k, v, (1, 3), 1.0, backend="sdpa")



def test_an_empty_scale_is_refused_by_both_attentions():
    """A scale of 0 tokens is a caller's mistake (the scales of M-VAR have pn*pn >= 1 tokens) and raises, in the
    intra-scale and the block-causal attention; accepting it (mutant: `< 1` as `< 0` in the check) passed the suite,
    and the sdpa kernel then ran on without a word."""
    q, k, v = qkv(1, 5, 1, 8)
    with pytest.raises(ValueError, match=r"seg_lens=\(0, 5\) must be positive and sum to the sequence length 5"):
        intra_scale_attention(q, k, v, (0, 5), 1.0, backend="sdpa")
    with pytest.raises(ValueError, match=r"seg_lens=\(1, 0, 4\) must be positive"):
        block_causal_attention(q, k, v, (1, 0, 4), 1.0)

def test_env_var_overrides_auto_only(monkeypatch):
    q, k, v = qkv(1, 5, 1, 8)
    monkeypatch.setenv(backends.ATTN.env, "flash_attn")
    with pytest.raises(ValueError, match=f"{backends.ATTN.env}='flash_attn' cannot run here"):
        intra_scale_attention(q, k, v, (1, 4), 1.0)
    assert intra_scale_attention(q, k, v, (1, 4), 1.0, backend="sdpa").shape == q.shape  # explicit choice wins
    monkeypatch.setenv(backends.ATTN.env, "nope")
    with pytest.raises(ValueError, match="expected one of"):
        intra_scale_attention(q, k, v, (1, 4), 1.0)


# ---- GPU backends dispatched to fake kernels on CPU ----------------------------------------------------------------
def fake_varlen_kernel(calls, default_scale_from_head_dim):
    """Stand-in for a varlen kernel: records its arguments and computes attention per cu_seqlens segment."""

    def kernel(q_THc, k_THc, v_THc, cu_q, cu_k, max_q, max_k, *, dropout_p=0.0, softmax_scale=None, scale=None,
               deterministic=None):
        calls.append(dict(shape=tuple(q_THc.shape), cu=cu_q.clone(), cu_k=cu_k, max=(max_q, max_k),
                          dropout_p=dropout_p, scale=softmax_scale if scale is None else scale,
                          deterministic=deterministic))
        s = calls[-1]["scale"]
        s = 1 / math.sqrt(q_THc.shape[-1]) if s is None and default_scale_from_head_dim else s
        out = torch.empty_like(q_THc)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            w_HLL = torch.einsum("lhc,mhc->hlm", q_THc[a:b], k_THc[a:b]).mul(s).softmax(-1)
            out[a:b] = torch.einsum("hlm,mhc->lhc", w_HLL, v_THc[a:b])
        return out

    return kernel


def test_flash_attn_dispatch_packs_every_scale_of_every_sample(monkeypatch):
    calls = []
    monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: fake_varlen_kernel(calls, False))
    monkeypatch.setattr(A, "backend_unavailable_reason", lambda *a: None)
    seg_lens = (1, 4, 9, 36)
    q, k, v = qkv(3, 50, 2, 8)
    out = intra_scale_attention(q, k, v, seg_lens, 0.7, dropout_p=0.0, backend="auto")
    (call,) = calls
    assert call["shape"] == (150, 2, 8) and call["max"] == (36, 36) and call["scale"] == 0.7
    assert call["cu"].dtype == torch.int32 and call["cu"].tolist() == [0, 1, 5, 14, 50, 51, 55, 64, 100, 101, 105,
                                                                        114, 150]
    assert call["cu_k"] is call["cu"] or torch.equal(call["cu_k"], call["cu"])
    torch.testing.assert_close(out, intra_scale_attention(q, k, v, seg_lens, 0.7, backend="sdpa"), atol=1e-5, rtol=0)


def test_flash_attn_max_seqlen_is_largest_scale_at_512px(monkeypatch):
    calls = []
    monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: fake_varlen_kernel(calls, False))
    monkeypatch.setattr(A, "backend_unavailable_reason", lambda *a: None)
    q, k, v = (t.detach() for t in qkv(1, sum(SEG_512), 1, 4))
    intra_scale_attention(q, k, v, SEG_512, 1.0, dropout_p=0.1, backend="flash_attn")
    assert calls[0]["max"] == (1024, 1024) and calls[0]["dropout_p"] == 0.1 and len(calls[0]["cu"]) == 11


@pytest.mark.parametrize("takes_scale", [True, False])
def test_torch_varlen_dispatch_scale_keyword_or_folded_into_q(monkeypatch, takes_scale):
    calls = []
    kernel = fake_varlen_kernel(calls, default_scale_from_head_dim=True)
    if takes_scale:
        def varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
            return kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)
    else:
        def varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
            return kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: None)
    monkeypatch.setattr(A, "_torch_varlen_attn", lambda: varlen)
    monkeypatch.setattr(A, "backend_unavailable_reason",
                        lambda name, *_: "absent" if name == "flash_attn" else None)
    seg_lens = (4, 16)
    q, k, v = qkv(2, 20, 2, 16)
    out = intra_scale_attention(q, k, v, seg_lens, 1.0)  # auto -> torch_varlen (flash_attn "absent")
    assert calls[0]["shape"] == (40, 2, 16) and calls[0]["max"] == (16, 16)
    assert calls[0]["cu"].tolist() == [0, 4, 20, 24, 40] and calls[0]["scale"] == (1.0 if takes_scale else None)
    torch.testing.assert_close(out, intra_scale_attention(q, k, v, seg_lens, 1.0, backend="sdpa"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_the_varlen_kernels_compile_without_a_graph_break(monkeypatch, backend):
    """Their functions are looked up by `resolve_backend`, outside torch.compile's trace: the lookups import and log
    (flash_attn's starts Triton's parallel compiles), which broke the graph inside the loop over blocks, and dynamo
    then ran the whole model eagerly. A loader that logs stands in; the kernel is dense attention."""
    def kernel(q_THc, k_THc, v_THc, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, deterministic=False,
               scale=None):
        w_HTT = torch.einsum("thc,shc->hts", q_THc, k_THc).mul(softmax_scale or scale or 1.0).softmax(-1)
        return torch.einsum("hts,shc->thc", w_HTT, v_THc)

    def loader():
        logging.getLogger("a loader").info("imported")  # dynamo cannot trace a logging call
        return kernel
    monkeypatch.setattr(A, "_flash_attn_varlen_func", loader)
    monkeypatch.setattr(A, "_torch_varlen_attn", loader)
    monkeypatch.setattr(A, "backend_unavailable_reason", lambda *a: None)
    torch.manual_seed(0)
    layer = ScaleAttention(16, 2, backend=backend).eval()
    x_BLC = torch.randn(2, 5, 16)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x_BLC, (1, 4)), layer(x_BLC, (1, 4)))
    assert layer.last_backend == backend
    torch._dynamo.reset()


def test_auto_prefers_flash_then_varlen_then_sdpa_and_logs_once(monkeypatch, caplog):
    cuda, half = torch.device("cuda"), torch.bfloat16
    assert A.resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert A.resolve_backend("auto", cuda, torch.float32) == "sdpa"  # varlen kernels need fp16/bf16
    monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: object())
    monkeypatch.setattr(A, "_torch_varlen_attn", lambda: object())
    with caplog.at_level(logging.INFO, logger=backends.__name__):
        assert A.resolve_backend("auto", cuda, half) == "flash_attn"
        assert A.resolve_backend("auto", cuda, half) == "flash_attn"
    assert sum("backend: flash_attn" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: None)
    A._resolve.cache_clear()
    assert A.resolve_backend("auto", cuda, half) == "torch_varlen"
    assert A.resolve_backend("auto", cuda, half, dropout_p=0.1) == "sdpa"  # torch varlen has no dropout
    with pytest.raises(ValueError, match="no attention dropout"):
        A.resolve_backend("torch_varlen", cuda, half, dropout_p=0.1)
    with pytest.raises(ValueError, match="flash_attn is not importable"):
        A.resolve_backend("flash_attn", cuda, half)


def test_auto_passes_over_flash_kernels_on_pre_ampere_gpus_and_for_wide_heads(monkeypatch):
    """Both varlen kernels are flash attention: compute capability 8.0 or newer, heads of at most 256 channels.
    "auto" takes sdpa on a V100/T4 or for wider heads (--num_heads small for the width), and a forced kernel says
    why instead of failing at its first call."""
    cuda, half = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: object())
    monkeypatch.setattr(A, "_torch_varlen_attn", lambda: object())
    A._resolve.cache_clear()
    for capability, head_dim, kernel in (((7, 5), 64, "sdpa"), ((8, 0), 512, "sdpa"), ((8, 0), 256, "flash_attn")):
        monkeypatch.setattr(A, "_cuda_capability", lambda device, c=capability: c)
        assert A.resolve_backend("auto", cuda, half, head_dim=head_dim) == kernel, (capability, head_dim)
    monkeypatch.setattr(A, "_cuda_capability", lambda device: (7, 0))
    with pytest.raises(ValueError, match="compute capability 8.0 or newer .Ampere., this one has 7.0"):
        A.resolve_backend("torch_varlen", cuda, half, head_dim=64)
    monkeypatch.setattr(A, "_cuda_capability", lambda device: (9, 0))
    with pytest.raises(ValueError, match="heads of at most 256 channels, these have 512"):
        A.resolve_backend("flash_attn", cuda, half, head_dim=512)
    A._resolve.cache_clear()



def test_a_capability_passed_in_is_the_one_judged(monkeypatch):
    """`backend_unavailable_reason(..., capability=...)` judges the compute capability it is given (resolution
    passes the one it looked up for the device); looking it up again from the device instead (mutant: the argument
    ignored) passed the suite, since the tests faked the lookup and passed nothing."""
    cuda, half = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: object())
    monkeypatch.setattr(A, "_torch_varlen_attn", lambda: object())
    monkeypatch.setattr(A, "_cuda_capability", lambda device: (8, 6))  # what a lookup would say
    assert A.backend_unavailable_reason("flash_attn", cuda, half, capability=(7, 5)) == (
        "flash_attn needs a GPU of compute capability 8.0 or newer (Ampere), this one has 7.5")
    monkeypatch.setattr(A, "_cuda_capability", lambda device: (7, 0))
    assert A.backend_unavailable_reason("torch_varlen", cuda, half, capability=(9, 0)) is None

def test_deterministic_mode_asks_flash_attn_for_it_and_passes_over_torch_varlen(monkeypatch):
    """train.py --deterministic (torch.use_deterministic_algorithms with warn_only): flash-attn is asked for its
    deterministic backward; torch's varlen attention (its flash kernel) has none unless the mode is strict, so "auto"
    passes it over and forcing it is an error that says why."""
    cuda, half = torch.device("cuda"), torch.bfloat16
    calls = []
    monkeypatch.setattr(A, "_torch_varlen_attn", lambda: object())
    q, k, v = qkv(1, 5, 1, 8)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: fake_varlen_kernel(calls, False))
            A._resolve.cache_clear()
            assert A.resolve_backend("auto", cuda, half) == "flash_attn"
            with monkeypatch.context() as m:
                m.setattr(A, "backend_unavailable_reason", lambda *a: None)
                intra_scale_attention(q, k, v, (1, 4), 1.0, backend="flash_attn")
            assert calls[-1]["deterministic"] is deterministic
            monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: None)
            A._resolve.cache_clear()
            assert A.resolve_backend("auto", cuda, half) == ("sdpa" if deterministic else "torch_varlen")
            if deterministic:
                with pytest.raises(ValueError, match="--deterministic runs it with warn_only"):
                    A.resolve_backend("torch_varlen", cuda, half)
                torch.use_deterministic_algorithms(True)  # strict: torch's flash backward is deterministic then
                assert A.resolve_backend("torch_varlen", cuda, half) == "torch_varlen"
        finally:
            torch.use_deterministic_algorithms(False)


def test_flash_attn_rocm_triton_build_is_not_picked_on_nvidia(monkeypatch):
    """FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE makes flash-attn import its AMD Triton kernels; on an NVIDIA GPU
    they fail at their first call, so "auto" must pass them over (and on ROCm torch keep them)."""
    cuda, half = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(A, "_flash_attn_varlen_func", lambda: object())
    monkeypatch.setattr(A, "_torch_varlen_attn", lambda: object())
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", types.SimpleNamespace(USE_TRITON_ROCM=True))
    monkeypatch.setattr(torch.version, "hip", None)
    A._resolve.cache_clear()
    assert "ROCm Triton build" in A.backend_unavailable_reason("flash_attn", cuda, half)
    assert A.resolve_backend("auto", cuda, half) == "torch_varlen"
    monkeypatch.setattr(torch.version, "hip", "6.4")
    A._resolve.cache_clear()
    assert A.backend_unavailable_reason("flash_attn", cuda, half) is None
    A._resolve.cache_clear()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # flash-attn's autotune arguments, at its import
def test_flash_attn_rocm_triton_configs_carry_options_cuda_refuses(monkeypatch, from_kernel_site):
    """The fact behind the gate above, seen when compiling for sm_90 (tests/test_triton_autotune.py's stand-in
    driver): Triton's CUDA backend refuses the option `waves_per_eu` of flash-attn's AMD configs with a KeyError.
    If a flash-attn release drops it, this fails: then try its Triton kernels on NVIDIA and lift the gate."""
    triton_nvidia = pytest.importorskip("triton.backends.nvidia.compiler")
    monkeypatch.setenv("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")
    fwd = from_kernel_site("flash_attn", "flash_attn.flash_attn_triton_amd.fwd_prefill")
    options = {k for config in fwd.attn_fwd.configs for k in config.all_kwargs()} - set(fwd.attn_fwd.arg_names)
    assert "waves_per_eu" in options - set(triton_nvidia.CUDAOptions.__dataclass_fields__)


# ---- the module ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [True, False])
def test_scale_attention_parameter_names_and_count(l2):
    C, H = 64, 4
    attn = ScaleAttention(C, H, attn_l2_norm=l2)
    names = {"mat_qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias"} | ({"scale_mul_1H11"} if l2 else set())
    assert set(dict(attn.named_parameters())) == names
    assert set(attn.state_dict()) == names | {"zero_k_bias"}
    assert sum(p.numel() for p in attn.parameters()) == 4 * C * C + 3 * C + (H if l2 else 0)
    assert attn.mat_qkv.bias is None and attn.scale == (1.0 if l2 else 0.25 / math.sqrt(C // H))
    if l2:
        assert attn.scale_mul_1H11.shape == (1, H, 1, 1)
        torch.testing.assert_close(attn.scale_mul_1H11.exp(), torch.full((1, H, 1, 1), 4.0))


def test_l2_norm_temperature_is_clamped_at_100():
    torch.manual_seed(0)
    seg_lens = (1, 4)
    attn = ScaleAttention(16, 2).eval()
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        attn.scale_mul_1H11.fill_(math.log(100))
        at_cap = attn(x, seg_lens)
        attn.scale_mul_1H11.fill_(10.0)
        assert torch.equal(attn(x, seg_lens), at_cap)
        attn.scale_mul_1H11.fill_(math.log(99))  # and not lower: just under the cap, the output moves
        assert (attn(x, seg_lens) - at_cap).abs().max() > 1e-6


def test_scale_attention_matches_explicit_computation():
    C, H, seg_lens = 32, 2, (1, 4, 9)
    attn = ScaleAttention(C, H, mode="intra")
    with torch.no_grad():
        for p in (attn.q_bias, attn.v_bias, attn.scale_mul_1H11):
            p.normal_()
    x = torch.randn(2, 14, C)
    q, k, v = (x @ w.T for w in attn.mat_qkv.weight.chunk(3))
    q, v = q + attn.q_bias, v + attn.v_bias
    q, k, v = (t.view(2, 14, H, C // H) for t in (q, k, v))
    q = torch.nn.functional.normalize(q, dim=-1) * attn.scale_mul_1H11.exp().view(1, 1, H, 1)
    k = torch.nn.functional.normalize(k, dim=-1)
    ids = scale_ids(seg_lens)
    expected = attn.proj(dense_reference(q, k, v, ids[:, None] == ids[None, :], 1.0).reshape(2, 14, C))
    torch.testing.assert_close(attn(x, seg_lens), expected, atol=1e-5, rtol=0)


def test_causal_kv_cache_one_scale_at_a_time_equals_full_forward():
    attn = ScaleAttention(32, 2, mode="causal").eval()
    seg_lens = (1, 4, 9, 16)
    x = torch.randn(3, sum(seg_lens), 32)
    with torch.no_grad():
        full = attn(x, seg_lens)
        attn.kv_caching(True)
        steps = [attn(x_l, (x_l.shape[1],)) for x_l in x.split(seg_lens, dim=1)]
        assert attn.cached_k.shape == (3, 30, 2, 16)
        attn.kv_caching(False)
    assert attn.cached_k is None
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mode='causal'"):
        ScaleAttention(32, 2, mode="intra").kv_caching(True)


def test_intra_one_scale_at_a_time_equals_full_forward_without_cache():
    attn = ScaleAttention(32, 2, mode="intra").eval()
    x = torch.randn(2, sum(SEG_256[:6]), 32)
    with torch.no_grad():
        full = attn(x, SEG_256[:6])
        steps = [attn(x_l, (x_l.shape[1],)) for x_l in x.split(SEG_256[:6], dim=1)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_attn_dropout_only_in_train_mode_and_extra_repr():
    torch.manual_seed(0)
    drop, plain = ScaleAttention(32, 2, attn_drop=0.5), ScaleAttention(32, 2)
    plain.load_state_dict(drop.state_dict())
    x = torch.randn(2, 14, 32)
    assert torch.equal(drop.eval()(x, (1, 4, 9)), plain.eval()(x, (1, 4, 9)))
    assert not torch.allclose(drop.train()(x, (1, 4, 9)), plain.train()(x, (1, 4, 9)))
    assert "mode=intra" in repr(plain) and "auto (last run: sdpa)" in repr(plain)
    with pytest.raises(ValueError, match="attention mode 'global'"):
        ScaleAttention(32, 2, mode="global")


# ---- on a GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("seg_lens", [SEG_256, SEG_512])
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_varlen_backends_match_sdpa_bf16(backend, seg_lens):
    reason = A.backend_unavailable_reason(backend, torch.device("cuda"), torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    inputs = qkv(2, sum(seg_lens), 4, 64, dtype=torch.bfloat16, device="cuda")
    assert_fwd_bwd_equal(
        lambda q, k, v: intra_scale_attention(q, k, v, seg_lens, 0.125, backend=backend),
        lambda q, k, v: intra_scale_attention(q, k, v, seg_lens, 0.125, backend="sdpa"), inputs,
        atol=2e-2, rtol=2e-2,
    )


@pytest.mark.gpu
def test_gpu_sdpa_fp32_equals_reference_and_half_only_backends_refuse_fp32():
    inputs = qkv(2, sum(SEG_256), 4, 64, device="cuda")
    ids = scale_ids(SEG_256)
    assert_fwd_bwd_equal(
        lambda q, k, v: intra_scale_attention(q, k, v, SEG_256, 0.125),
        lambda q, k, v: dense_reference(q, k, v, ids[:, None] == ids[None, :], 0.125), inputs, atol=1e-4,
    )
    for backend in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match="float16/bfloat16"):
            intra_scale_attention(*inputs, SEG_256, 0.125, backend=backend)


@pytest.mark.gpu
def test_gpu_scale_attention_autocast_bf16_auto_matches_sdpa():
    active = A.resolve_backend("auto", torch.device("cuda"), torch.bfloat16)
    if active == "sdpa":
        pytest.skip("no varlen kernel is active here: auto would compare SDPA with itself")
    layer = ScaleAttention(256, 4).cuda()
    x = torch.randn(2, sum(SEG_256), 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_auto = layer(x, SEG_256)
        layer.backend = "sdpa"
        out_sdpa = layer(x, SEG_256)
    torch.testing.assert_close(out_auto.float(), out_sdpa.float(), atol=2e-2, rtol=2e-2)


def test_a_changed_env_var_is_seen_after_a_first_resolution(monkeypatch):
    """Resolutions are cached: without $MVAR_ATTN_BACKEND in the cache key, the first "auto" outcome stuck."""
    q, k, v = qkv(1, 5, 1, 8)
    intra_scale_attention(q, k, v, (1, 4), 1.0)  # "auto" -> sdpa, cached
    monkeypatch.setenv(backends.ATTN.env, "flash_attn")
    with pytest.raises(ValueError, match=f"{backends.ATTN.env}='flash_attn' cannot run here"):
        intra_scale_attention(q, k, v, (1, 4), 1.0)


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_the_flash_kernels_need_cuda_not_just_another_device_than_the_cpu(device):
    """Only the CPU was refused: "auto" on an Apple or Intel GPU would have picked a CUDA-only kernel."""
    for name in ("flash_attn", "torch_varlen"):
        reason = A.backend_unavailable_reason(name, torch.device(device), torch.bfloat16, head_dim=64)
        assert reason == f"{name} needs CUDA tensors, got device {device!r}"
