"""The `cpu_fused` Mamba2 backend: its C conv + SiLU and gated norm against the PyTorch Functions (outputs and every
gradient), the whole layer against the `torch` backend, and how the backend is chosen, built and refused."""
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from models import backends
from models import mamba2 as m2
from models import mamba2_cpu
from models.backends import BackendError
from models.mamba2 import Mamba2

pytestmark = pytest.mark.numerics  # rerun by `make test` at the lowest ISA level

# The C kernels and the PyTorch Functions compute the same sums in float32 with their own exp (~2 ulp apart) and
# their own order for the weight gradients' sums over rows: values of order 1 from sums of at most a few hundred
# terms differ by a few 1e-7 relative; 2e-5 leaves room for that and still fails on any wrong tap, sign or factor.
TOL = dict(rtol=2e-5, atol=2e-5)
# bfloat16 activations: both sides compute the same float32 value up to TOL and round it to bf16, so a value can
# land one bf16 step apart (2^-8 relative) where it falls near a rounding boundary: torch's default bf16 tolerance.
BF16_TOL = dict(rtol=1.6e-2, atol=1e-5)


def _tol(t: torch.Tensor) -> dict:
    return BF16_TOL if t.dtype == torch.bfloat16 else TOL

needs_kernels = pytest.mark.skipif(mamba2_cpu.available() is not None,
                                   reason=f"cpu_fused kernels unavailable: {mamba2_cpu.available()}")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_same_function(fused, reference, inputs, strided_arg=None, width=None, threads=1):
    """fused.apply and reference.apply on copies of `inputs` (tensors, then the rest): outputs and gradients of
    every tensor input equal within TOL (BF16_TOL for bf16 ones). `strided_arg` is passed as a column slice of a
    wider tensor (a split view of in_proj's output), to exercise the kernels' row strides."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    rest = inputs[len(tensors):]
    grads, outs = [], []
    old = torch.get_num_threads()
    for fn, nt in ((fused, threads), (reference, 1)):
        torch.set_num_threads(nt)
        leaves = _leaves(*tensors)
        args = list(leaves)
        if strided_arg is not None:
            wide = torch.zeros(*leaves[strided_arg].shape[:-1], width, dtype=leaves[strided_arg].dtype)
            wide = wide.index_copy(-1, torch.arange(3, 3 + leaves[strided_arg].shape[-1]), leaves[strided_arg])
            args[strided_arg] = wide[..., 3:3 + leaves[strided_arg].shape[-1]]
        out = fn.apply(*args, *rest)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
        outs.append(out)
        grads.append([t.grad for t in leaves])
    torch.set_num_threads(old)
    assert outs[0].dtype == outs[1].dtype
    torch.testing.assert_close(outs[0], outs[1], **_tol(outs[1]))
    for g_fused, g_ref in zip(*grads, strict=True):
        assert g_fused.dtype == g_ref.dtype
        torch.testing.assert_close(g_fused, g_ref, **_tol(g_ref))


@needs_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_silu_matches_the_pytorch_function(bias, threads, dtype):
    torch.manual_seed(0)
    x, w = torch.randn(3, 11, 24, dtype=dtype), torch.randn(24, 4)
    inputs = (x, w, torch.randn(24)) if bias else (x, w, None)
    _assert_same_function(mamba2_cpu.CausalConvSiLU, m2._CausalConvSiLU, inputs, strided_arg=0, width=40,
                          threads=threads)


@needs_kernels
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [24, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_norm_matches_the_pytorch_function(norm_before_gate, group_size, dtype):
    """y is the scan's float32 output; the gate z and the result are the activations' dtype."""
    torch.manual_seed(0)
    y, z, w = torch.randn(2, 7, 24), torch.randn(2, 7, 24, dtype=dtype), torch.rand(24) + 0.5
    _assert_same_function(mamba2_cpu.GatedRMSNorm, m2._GatedRMSNorm, (y, z, w, 1e-5, group_size, norm_before_gate),
                          strided_arg=1, width=50, threads=2)


@needs_kernels
def test_nan_in_the_input_stays_nan():
    x = torch.randn(1, 5, 8)
    x[0, 2, 3] = float("nan")
    y = mamba2_cpu.CausalConvSiLU.apply(x, torch.randn(8, 4), torch.randn(8))
    assert y[0, 2:, 3].isnan().all() and y[0, :2].isfinite().all()  # the NaN reaches the next K-1 steps only
    out = mamba2_cpu.GatedRMSNorm.apply(x, torch.randn(1, 5, 8), torch.ones(8), 1e-5, 8, False)
    assert out[0, 2].isnan().all() and out[0, [0, 1, 3, 4]].isfinite().all()



@needs_kernels
def test_bf16_infinity_stays_infinite_and_nan_stays_nan():
    """bf16 activations are written by the kernels' own rounding: +inf stays +inf (mutant: the NaN test `>` as `>=`
    wrote it as NaN) and NaN stays NaN, as the PyTorch Function gives; the suite checked NaN in float32 only."""
    torch.manual_seed(0)
    x = torch.rand(1, 6, 8).add(0.1).bfloat16()
    x[0, 2, 3], x[0, 2, 5] = float("inf"), float("nan")
    w, bias = torch.rand(8, 4) + 0.1, torch.rand(8)
    y = mamba2_cpu.CausalConvSiLU.apply(x, w, bias)
    assert torch.isposinf(y[0, 2:, 3]).all() and y[0, 2:, 5].isnan().all() and y[0, :2].isfinite().all()
    torch.testing.assert_close(y, m2._CausalConvSiLU.apply(x, w, bias), **BF16_TOL, equal_nan=True)


@needs_kernels
def test_bf16_results_round_half_to_even_as_torch():
    """x = 0 and no bias make the pre-activation 0, where silu' is exactly 1/2: with dy = 2 and only the newest tap,
    dx = w exactly, and w is chosen halfway between two bf16 values. Both sides must round to even, as torch's
    float-to-bf16 conversion does (1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6, 2 + 2^-7 -> 2); rounding halves up
    (mutant) is one bf16 step off at a tie only, within the suite's bf16 tolerance."""
    w_last = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 + 2 ** -7])
    w = torch.cat([torch.zeros(4, 3), w_last[:, None]], dim=1)
    expected = torch.tensor([1.0, 1 + 2 ** -6, -1.0, 2.0], dtype=torch.bfloat16).expand(2, 5, 4)
    assert torch.equal(w_last.bfloat16(), expected[0, 0])  # torch's own rounding, the rule both sides follow
    for fn in (mamba2_cpu.CausalConvSiLU, m2._CausalConvSiLU):
        x = torch.zeros(2, 5, 4, dtype=torch.bfloat16, requires_grad=True)
        fn.apply(x, w, None).backward(torch.full((2, 5, 4), 2.0, dtype=torch.bfloat16))
        assert torch.equal(x.grad, expected), fn


@needs_kernels
def test_conv_silu_is_within_a_few_float32_ulps_of_exact():
    """With only the newest tap (w = 1) and no bias the kernel's output is silu(x) itself: against float64, every
    value within 1e-6 relative (8 float32 ulps; measured 1.6e-7), what the kernels' exp polynomial (~2 ulp) and a few
    roundings give on any CPU. A typo in its highest coefficient (1.98e-4 as 1.98e-3: 1.6e-6 off) passed the suite,
    whose comparisons allow 2e-5."""
    x = torch.linspace(-30, 30, 6001).view(1, -1, 1).repeat(1, 1, 8)
    w = torch.cat([torch.zeros(8, 3), torch.ones(8, 1)], dim=1)
    y = mamba2_cpu.CausalConvSiLU.apply(x, w, None).double()
    exact = torch.nn.functional.silu(x.double())
    assert ((y - exact).abs() / exact.abs().clamp_min(1e-30)).max() < 1e-6

@needs_kernels
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_layer_on_cpu_fused_matches_the_torch_backend(autocast):
    """The whole layer, forward and backward, every parameter's gradient, with a batch large enough to be sliced;
    in fp32 and under bf16 autocast (bf16 activations through the kernels)."""
    torch.manual_seed(0)
    ref = Mamba2(d_model=32, d_state=16, headdim=8, ngroups=2, chunk_size=8, backend="torch")
    fused = Mamba2(d_model=32, d_state=16, headdim=8, ngroups=2, chunk_size=8, backend="cpu_fused")
    fused.load_state_dict(ref.state_dict())
    u = torch.randn(5, 37, 32)
    outs = []
    for m in (fused, ref):
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            out = m(u)
        out.float().square().mean().backward()
        outs.append(out)
    assert fused.active_backend == "cpu_fused" and ref.active_backend == "torch"
    torch.testing.assert_close(outs[0], outs[1], **_tol(outs[1]))
    for (name, p_fused), p_ref in zip(fused.named_parameters(), ref.parameters(), strict=True):
        # under bf16 an activation may round one bf16 step (2^-8) apart on the two sides; each gradient is then
        # held to that step of its largest entry (measured: ~1e-6 of it)
        tol = TOL if autocast is None else dict(rtol=0, atol=2 ** -8 * p_ref.grad.abs().max().item())
        torch.testing.assert_close(p_fused.grad, p_ref.grad, **tol, msg=name)



def test_the_kernels_take_only_unit_channel_stride_and_float32_weights():
    """`fits`: activations float32 or bf16, weights (and the norm's input) float32, all with unit stride along the
    channels. Letting a channel-strided tensor (mutant: no stride check) or a bf16 weight (mutant: no weight dtype
    check) through passed the suite; the kernels would read them as contiguous float32."""
    x, w = torch.randn(2, 5, 8), torch.randn(8, 4)
    assert mamba2_cpu.fits(x, w, None) and mamba2_cpu.fits(x.bfloat16(), w, torch.randn(8))
    assert not mamba2_cpu.fits(x.transpose(1, 2).contiguous().transpose(1, 2), w)
    assert not mamba2_cpu.fits(x, torch.randn(4, 8).t())
    assert not mamba2_cpu.fits(x.half(), w) and not mamba2_cpu.fits(x, w.bfloat16())
    assert not mamba2_cpu.fits(x, w, torch.randn(8, dtype=torch.float64))


@needs_kernels
def test_a_bf16_layer_on_cpu_fused_equals_the_torch_backend():
    """A layer whose parameters are bf16 (not autocast: the weights themselves) takes the PyTorch Functions even on
    cpu_fused, since the kernels read float32 weights: the same numbers as the torch backend, exactly. With bf16
    weights let through (mutant) the output was NaN."""
    torch.manual_seed(0)
    ref = Mamba2(d_model=32, d_state=16, headdim=8, ngroups=2, chunk_size=8, backend="torch").to(torch.bfloat16)
    fused = Mamba2(d_model=32, d_state=16, headdim=8, ngroups=2, chunk_size=8, backend="cpu_fused")
    fused.to(torch.bfloat16).load_state_dict(ref.state_dict())
    u = torch.randn(2, 11, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fused(u), ref(u)) and fused.active_backend == "cpu_fused"

@needs_kernels
def test_auto_on_cpu_picks_cpu_fused_and_fp16_keeps_the_pytorch_functions(monkeypatch):
    monkeypatch.delenv(backends.MAMBA.env, raising=False)
    m = Mamba2(d_model=32, d_state=16, headdim=8, backend="auto")
    calls = []
    monkeypatch.setattr(mamba2_cpu.CausalConvSiLU, "apply",
                        lambda *a: calls.append("conv") or m2._CausalConvSiLU.apply(*a))
    with torch.no_grad():
        m(torch.randn(1, 5, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(torch.randn(1, 5, 32))
        assert m.active_backend == "cpu_fused" and calls == ["conv", "conv"]
        with torch.autocast("cpu", dtype=torch.float16):  # fp16 activations: the PyTorch Functions
            m(torch.randn(1, 5, 32))
    assert calls == ["conv", "conv"]


@pytest.mark.parametrize("cc, why", [("no-such-cc", "no C compiler"), ("/bin/false", "could not build mamba2_cpu.c")])
def test_without_a_working_compiler_auto_falls_back_and_a_forced_cpu_fused_says_why(cc, why, monkeypatch, tmp_path,
                                                                                      caplog):
    monkeypatch.delenv(backends.MAMBA.env, raising=False)
    monkeypatch.setenv("CC", cc if cc.startswith("/") else str(tmp_path / cc))
    monkeypatch.setenv("MVAR_KERNEL_CACHE", str(tmp_path / "cache"))
    mamba2_cpu.load.cache_clear()
    backends._log_once.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=backends.__name__), torch.no_grad():
            m = Mamba2(d_model=32, d_state=16, headdim=8, backend="auto")
            m(torch.randn(1, 5, 32))
        assert m.active_backend == "torch"
        assert f"not cpu_fused: {why}" in caplog.records[-1].getMessage()
        with pytest.raises(BackendError, match=f"mamba_backend='cpu_fused' cannot run here: {why}.*'torch'"):
            Mamba2(d_model=32, d_state=16, headdim=8, backend="cpu_fused")(torch.randn(1, 5, 32))
    finally:
        mamba2_cpu.load.cache_clear()


@needs_kernels
def test_kernels_are_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MVAR_KERNEL_CACHE", str(tmp_path))
    mamba2_cpu.load.cache_clear()
    try:
        lib, note = mamba2_cpu.load()
        built = list(tmp_path.glob("mamba2_cpu-*.so"))
        assert lib is not None and len(built) == 1 and str(built[0]) in note
        mtime = built[0].stat().st_mtime_ns
        mamba2_cpu.load.cache_clear()
        mamba2_cpu.load()
        assert built[0].stat().st_mtime_ns == mtime and list(tmp_path.iterdir()) == built  # reused, no leftovers
    finally:
        mamba2_cpu.load.cache_clear()


@needs_kernels
def test_an_edited_source_is_built_anew_not_taken_from_the_cache(monkeypatch, tmp_path):
    """The cache key holds the C source: after an edit of mamba2_cpu.c the old library must not load. Without the
    source in the key (mutant) the suite passed. The build is stood in for by a copy of the library built already."""
    built = Path(mamba2_cpu.load()[1].removeprefix("C kernels "))
    builds = []

    def copy_built(cc, out):
        builds.append(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(built, out)
    monkeypatch.setattr(mamba2_cpu, "_compile", copy_built)
    monkeypatch.setenv("MVAR_KERNEL_CACHE", str(tmp_path / "cache"))
    edited = tmp_path / "mamba2_cpu.c"
    edited.write_text(mamba2_cpu.SOURCE.read_text() + "/* an edit */\n")
    try:
        for source in (mamba2_cpu.SOURCE, edited, edited):
            monkeypatch.setattr(mamba2_cpu, "SOURCE", source)
            mamba2_cpu.load.cache_clear()
            assert mamba2_cpu.load()[0] is not None
    finally:
        mamba2_cpu.load.cache_clear()
    assert len(builds) == 2 and builds[0] != builds[1]  # one build per source, the second source's reused


@pytest.mark.parametrize("compiler_has_openmp", [True, False])
def test_the_build_asks_for_openmp_first_and_falls_back_without_it(monkeypatch, tmp_path, compiler_has_openmp):
    """`_compile` tries `-fopenmp` first (the kernels' threads) and builds without it only where that fails; trying
    the plain build first (mutant) always succeeded single-threaded, with the same numbers, and passed the suite."""
    commands = []

    def compiler(cmd, capture_output, text):
        commands.append(cmd)
        ok = compiler_has_openmp or "-fopenmp" not in cmd
        if ok:
            Path(cmd[cmd.index("-o") + 1]).write_bytes(b"a library")
        return subprocess.CompletedProcess(cmd, 0 if ok else 1, "", "" if ok else "unsupported option -fopenmp")
    monkeypatch.setattr(mamba2_cpu.subprocess, "run", compiler)
    out = tmp_path / "cache" / "k.so"
    mamba2_cpu._compile("cc", out)
    assert out.read_bytes() == b"a library"
    assert ["-fopenmp" in cmd for cmd in commands] == ([True] if compiler_has_openmp else [True, False])
