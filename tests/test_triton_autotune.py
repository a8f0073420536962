"""models.triton_autotune: an autotuner's configs compiled in parallel threads before it benchmarks them.

No GPU here: a stand-in Triton driver names an sm_90 target, so the kernels are really compiled for a Hopper GPU
(Triton's code generator and ptxas run on the CPU); their launches do nothing and the benchmark times nothing."""
import contextlib
import os
import sys
import threading
import time
import types
import weakref
from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytest.importorskip("triton.runtime._async_compile", reason="Triton < 3.4: no AsyncCompileMode")

from models import triton_autotune  # noqa: E402

CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in ((32, 1), (64, 2), (128, 4), (256, 4))]


@triton.autotune(configs=CONFIGS, key=["n"])
@triton.jit
def _double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


class Hopper:
    """The parts of a Triton driver that compiling, launching and benchmarking ask for; nothing runs."""

    class utils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return None, None, 0, 0, 1024  # module, function, registers, spills, max threads

    class launcher_cls:
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args, **kwargs):
            pass

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()  # compiles the config, as a real benchmark does
            return [1.0, 1.0, 1.0]
        return bench


@pytest.fixture
def compiles(monkeypatch):
    """(thread name, kernel name) of every compilation, under the stand-in driver, with no cached binaries."""
    from triton.runtime import driver
    seen, real = [], triton.compiler.compile

    def recording(src, *args, **kwargs):
        seen.append((threading.current_thread().name, src.fn.__name__))
        return real(src, *args, **kwargs)

    monkeypatch.setattr(triton.compiler, "compile", recording)
    monkeypatch.setattr(_double.fn, "device_caches", type(_double.fn.device_caches)(_double.fn.create_binder))
    monkeypatch.setattr(_double, "prune_configs", _double.prune_configs)  # the hook is undone after the test
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")
    monkeypatch.setattr(driver, "_active", Hopper())  # restored after (reset_active would look for a GPU)
    return seen


def warm_double() -> set[str]:
    """Autotune `_double` (compile every config, launch none); the hashes of the binaries."""
    x = torch.ones(1000)
    _double.warmup(x, torch.empty_like(x), 1000, grid=(1,))
    return {k.hash for k in _double.fn.device_caches[0][0].values()}


def test_configs_compile_in_worker_threads_to_the_same_binaries(compiles, monkeypatch, caplog):
    sequential = warm_double()
    assert [thread for thread, _ in compiles] == ["MainThread"] * len(CONFIGS)
    compiles.clear()
    monkeypatch.setattr(_double.fn, "device_caches", type(_double.fn.device_caches)(_double.fn.create_binder))
    assert triton_autotune.compile_configs_in_parallel(__name__, threads=4) == 1
    assert triton_autotune.compile_configs_in_parallel(__name__, threads=4) == 0  # hooked once
    assert warm_double() == sequential and len(sequential) == len(CONFIGS)
    # each config once, in the pool: the autotuner's own pass found them compiled
    assert len(compiles) == len(CONFIGS) and all(t.startswith("triton-compile") for t, _ in compiles), compiles
    assert "one by one" not in caplog.text  # no fallback was logged


def test_the_clean_up_drops_failed_compiles_only_and_takes_a_finished_kernel_without_its_future():
    """A review: newer Triton sets a FutureKernel's .future to None once it has its result, and the clean-up's
    AttributeError would have sent every compile to the one-by-one fallback."""
    from concurrent.futures import Future

    from triton.runtime._async_compile import FutureKernel

    failed, done, finished = Future(), Future(), FutureKernel(lambda kernel: None, None)
    failed.set_exception(RuntimeError("ptxas error"))
    done.set_result("binary")
    cache = {"a": FutureKernel(lambda kernel: None, failed), "b": FutureKernel(lambda kernel: None, done),
             "c": finished, "d": "a compiled kernel"}
    triton_autotune.drop_failed_compiles({0: (cache, None)}, FutureKernel)
    assert sorted(cache) == ["b", "c", "d"]


def test_a_failing_hook_falls_back_to_tritons_sequential_path(compiles, monkeypatch, caplog):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("not this Triton's internals")

    triton_autotune.compile_configs_in_parallel(__name__, threads=4)
    monkeypatch.setattr(triton.runtime._async_compile, "AsyncCompileMode", Broken)
    triton_autotune._log_fallback.cache_clear()
    assert len(warm_double()) == len(CONFIGS)  # Triton compiled them itself
    assert [thread for thread, _ in compiles] == ["MainThread"] * len(CONFIGS)
    assert "Triton compiles them one by one" in caplog.text and "not this Triton's internals" in caplog.text


def test_worker_threads_parse_kernel_sources_one_at_a_time(compiles, monkeypatch):
    """Two threads in ast.parse at once can fail on CPython 3.11 and 3.12 ("AST constructor recursion depth
    mismatch": it failed CI once); each thread's parse is slowed here so that overlaps would show."""
    import ast
    real, lock, inside, most = ast.parse, threading.Lock(), [0], [0]

    def slow_parse(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(ast, "parse", slow_parse)
    triton_autotune.compile_configs_in_parallel(__name__, threads=4)
    assert len(warm_double()) == len(CONFIGS)
    assert all(t.startswith("triton-compile") for t, _ in compiles) and most == [1], (compiles, most)


def test_a_config_that_failed_in_the_pool_is_compiled_again_by_the_benchmark(compiles, monkeypatch):
    """Triton keeps a failed compilation in its kernel cache, and it would raise at the benchmark's launch: the hook
    drops it, so the benchmark compiles it again as Triton does without the hook."""
    recording, lock, failed = triton.compiler.compile, threading.Lock(), []

    def fails_once_in_the_pool(src, *args, **kwargs):
        with lock:
            fail = threading.current_thread().name.startswith("triton-compile") and not failed
            if fail:
                failed.append(True)
        if fail:
            raise SystemError("AST constructor recursion depth mismatch (a stand-in)")
        return recording(src, *args, **kwargs)

    monkeypatch.setattr(triton.compiler, "compile", fails_once_in_the_pool)
    triton_autotune.compile_configs_in_parallel(__name__, threads=4)
    assert len(warm_double()) == len(CONFIGS) and failed == [True]
    assert sorted(t.split("_")[0] for t, _ in compiles) == ["MainThread"] + ["triton-compile"] * (len(CONFIGS) - 1)


def test_a_batch_whose_autotuning_ran_out_of_memory_is_freed_before_the_next_try(compiles, monkeypatch):
    """Triton's autotuner keeps its call's arguments when the call raised, as on an out-of-memory error in its
    benchmark; the GPU check's largest-batch probe makes it let go before it tries a smaller batch, or the batch that
    did not fit would stay allocated and the next ones could fail for want of its memory."""
    from triton.runtime import driver

    from scripts import gpu_timings

    def out_of_memory(kernel_call, quantiles=None, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(driver._active, "get_benchmarker", lambda: out_of_memory)
    monkeypatch.setattr(_double, "cache", {})  # no tuning result from another test
    batches = []

    def bench_main(argv):
        if not batches:
            x = torch.ones(1000)
            batches.append(weakref.ref(x))
            _double[(1,)](x, torch.empty_like(x), 1000)  # autotunes: the benchmark runs out of memory
        assert batches[0]() is None, "the batch that did not fit is still allocated"
        return "| table |"

    monkeypatch.setattr(gpu_timings.bench, "main", bench_main)
    assert gpu_timings.largest_batch_train([], (128, 64)) == (64, "| table |")
    assert _double.nargs is None


@pytest.fixture
def mamba_ssm(monkeypatch, from_kernel_site):
    """mamba_ssm's Triton modules from .whl/site, imported for this test only."""
    from models.mamba2 import _import_mamba_submodule
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())  # CPU tensors stand in
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(
        multi_processor_count=132))
    return from_kernel_site("mamba_ssm", "mamba_ssm.ops.triton.ssd_combined", _import_mamba_submodule)


def test_mamba_ssm_kernels_compile_every_config_in_the_pool(compiles, mamba_ssm, monkeypatch):
    """The Mamba2 scan's forward Triton kernels as M-VAR calls them (gated, D, dt bias and softplus), fp32, sm_90.
    (Its backward kernels are autotuned alike; compiling them too doubles the test's time.)"""
    from triton.runtime.autotuner import Autotuner
    tuners = {id(t): t for m in list(sys.modules.values()) if m and m.__name__.startswith("mamba_ssm.")
              for t in vars(m).values() if isinstance(t, Autotuner)}.values()
    for tuner in tuners:  # its two smallest configs (most compile in 1 s): the test's time, not its coverage
        monkeypatch.setattr(tuner, "configs", tuner.configs[-2:])
    assert triton_autotune.compile_configs_in_parallel("mamba_ssm", threads=2) == len(tuners) > 10
    g = torch.Generator().manual_seed(0)
    B, L, H, P, N = 2, 40, 4, 64, 16
    x, z = torch.randn(B, L, H, P, generator=g), torch.randn(B, L, H, P, generator=g)
    dt, A = torch.rand(B, L, H, generator=g), -torch.rand(H, generator=g)
    Bm, Cm = torch.randn(B, L, 1, N, generator=g), torch.randn(B, L, 1, N, generator=g)
    mamba_ssm.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, chunk_size=256, D=torch.ones(H), z=z,
                                        dt_bias=torch.zeros(H), dt_softplus=True)
    pool = Counter(name for thread, name in compiles if thread.startswith("triton-compile"))
    main = Counter(name for thread, name in compiles if not thread.startswith("triton-compile"))
    assert set(pool) == {"_chunk_cumsum_fwd_kernel", "_chunk_state_fwd_kernel", "_state_passing_fwd_kernel",
                         "_bmm_chunk_fwd_kernel", "_chunk_scan_fwd_kernel"}, pool
    assert set(pool.values()) == {2} and not main, (pool, main)  # each config once, in the pool, and no more


def test_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv(triton_autotune.ENV, "3")
    assert triton_autotune.compile_threads() == 3
    monkeypatch.setenv(triton_autotune.ENV, "0")
    assert triton_autotune.compile_configs_in_parallel(__name__) == 0
    monkeypatch.setenv(triton_autotune.ENV, "many")
    with pytest.raises(ValueError, match="MVAR_TRITON_COMPILE_THREADS='many'"):
        triton_autotune.compile_threads()
    monkeypatch.delenv(triton_autotune.ENV)
    assert 1 <= triton_autotune.compile_threads() <= triton_autotune.MAX_DEFAULT_THREADS



def test_default_threads_are_the_usable_cpus_at_most_16(monkeypatch):
    """Unset, the threads are the CPUs this process may use, capped at 16; taking the larger of the two (mutant:
    max for min) passed the suite, whose check (1 <= threads <= 16) holds on a small machine either way."""
    monkeypatch.delenv(triton_autotune.ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    assert triton_autotune.compile_threads() == triton_autotune.MAX_DEFAULT_THREADS == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert triton_autotune.compile_threads() == 3


def test_one_thread_or_fewer_hooks_nothing(monkeypatch):
    """One compile thread is Triton's own sequential path: nothing is hooked (mutant: `threads <= 1` as
    `threads < 1` hooked the autotuners for a pool of one); a negative count reads as 0 (mutant: kept negative)."""
    before = _double.prune_configs
    monkeypatch.setattr(_double, "prune_configs", before)  # undone after the test, were it hooked
    assert triton_autotune.compile_configs_in_parallel(__name__, threads=1) == 0
    assert _double.prune_configs is before
    monkeypatch.setenv(triton_autotune.ENV, "-2")
    assert triton_autotune.compile_threads() == 0


def test_a_packages_autotuners_are_its_modules_not_those_of_a_namesake(monkeypatch):
    """`autotuners(cls, "pkg")` takes the modules pkg and pkg.* only: matching by prefix (mutant) also hooked a
    package whose name starts with it (here pkg_extra, as mamba_ssm_extra would be for mamba_ssm)."""
    class Tuner:
        pass

    class Other:
        pass

    tuners = {}
    for name in ("pkg", "pkg.ops.kernels", "pkg_extra", "other"):
        module = types.ModuleType(name)
        module.tuner, module.not_a_tuner = tuners.setdefault(name, Tuner()), Other()
        monkeypatch.setitem(sys.modules, name, module)
    found = triton_autotune.autotuners(Tuner, "pkg")
    assert sorted(map(id, found)) == sorted(id(tuners[n]) for n in ("pkg", "pkg.ops.kernels"))

def test_off_under_the_interpreter(monkeypatch):
    from triton import knobs
    monkeypatch.setattr(knobs.runtime, "interpret", True)
    assert triton_autotune.compile_configs_in_parallel(__name__, threads=4) == 0
