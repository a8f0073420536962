"""Triton autotuners that compile their configs in parallel threads before benchmarking them.

mamba_ssm's Mamba2 scan runs 15 `@triton.autotune`d kernels on a forward and backward pass, over 6 to 11 configs
each. On the first call for a tuning key (kernel shape class and dtypes) Triton compiles a kernel's configs one
after another, then times them. Compiled for sm_90 on one core of an AMD EPYC here, that is 53 s per dtype before
the first step of the first run on a machine (later processes load the binaries from Triton's disk cache, and
re-time them unless TRITON_CACHE_AUTOTUNING=1). Triton's `AsyncCompileMode` compiles in threads, and the heavy
parts release the GIL: the same compilation took 33 s on 2 threads. `compile_configs_in_parallel` hooks the
autotuners of a package's loaded modules so that, when one is about to benchmark, all its configs are compiled
concurrently first; the benchmark then finds them compiled. The binaries, the timings and the chosen config are the
same; only the wall time changes.

MVAR_TRITON_COMPILE_THREADS sets the threads (default: the CPUs this process may use, at most 16; 0 or 1: off).
Off under Triton's interpreter (there a warm-up would run the kernel). Any failure of the hook (another Triton's
internals) falls back to Triton's own sequential path, and a config whose compilation failed in the pool is left
for the benchmark to compile again, so that Triton meets (and reports) its errors as it would without the hook.

The threads parse kernel sources one at a time: CPython 3.11 and 3.12 keep the AST constructor's recursion depth per
interpreter, not per thread, and two threads in `ast.parse` at once can fail with "SystemError: AST constructor
recursion depth mismatch" (seen here in CI). Triton parses a kernel's source at every compilation.
"""
import functools
import inspect
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)
ENV = "MVAR_TRITON_COMPILE_THREADS"
MAX_DEFAULT_THREADS = 16


def compile_threads() -> int:
    """Threads for compiling configs: $MVAR_TRITON_COMPILE_THREADS, else the usable CPUs (at most 16)."""
    value = os.environ.get(ENV, "")
    if value:
        try:
            return max(int(value), 0)
        except ValueError:
            raise ValueError(f"{ENV}={value!r}: expected a number of threads (0 or 1: off)") from None
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
               MAX_DEFAULT_THREADS)


def compile_configs_in_parallel(package: str, threads: int | None = None) -> int:
    """Hook every Triton autotuner defined in the loaded modules of `package` (e.g. "mamba_ssm"); returns how many
    were hooked (0 when off)."""
    threads = compile_threads() if threads is None else threads
    try:
        from triton import knobs
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401 (Triton >= 3.4)
        from triton.runtime.autotuner import Autotuner
    except ImportError as err:
        logger.debug("parallel config compilation unavailable: %s", err)
        return 0
    if threads <= 1 or knobs.runtime.interpret:
        return 0
    hooked = [t for t in autotuners(Autotuner, package) if not getattr(t.prune_configs, "compiles_in_parallel", False)]
    for tuner in hooked:
        tuner.prune_configs = _precompiling(tuner, tuner.prune_configs, threads)
    if hooked:
        logger.info("%s: %d Triton autotuners compile their configs on %d threads (%s)", package, len(hooked),
                    threads, ENV)
    return len(hooked)


def parallel_compile_problem() -> str:
    """Why `compile_all` would fall back to Triton's one-config-at-a-time compiles on this Triton ("" when the
    internals it uses are there; scripts/gpu_env.py reports it, since the fallback makes the first run minutes
    longer)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, FutureKernel  # noqa: F401
        from triton.runtime.jit import JITFunction  # noqa: F401
    except ImportError as err:
        return f"this Triton lacks the internals: {err}"
    if "ignore_errors" not in inspect.signature(AsyncCompileMode).parameters:
        return "this Triton's AsyncCompileMode takes no ignore_errors"
    if compile_threads() <= 1:
        return f"{compile_threads()} compile thread(s) ({ENV} or the usable CPUs)"
    return ""


def autotuners(autotuner_cls: type, package: str | None = None) -> list:
    """The `autotuner_cls` instances defined in the loaded modules of `package` (of every package when None)."""
    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (package is None or name.split(".")[0] == package)]
    return list({id(t): t for m in modules for t in list(getattr(m, "__dict__", {}).values())
                 if issubclass(type(t), autotuner_cls)}.values())  # type(): no proxy's __class__ asked


def drop_arguments() -> int:
    """Make Triton's autotuners let go of their last call's arguments; returns how many held some. An autotuner
    keeps them (`nargs`) when that call raised, e.g. out of memory in its benchmark, so the tensors of a batch that
    did not fit would stay allocated after the error was caught."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return 0
    holding = [t for t in autotuners(Autotuner) if getattr(t, "nargs", None) is not None]
    for tuner in holding:
        tuner.nargs = None
    return len(holding)


def _precompiling(tuner, prune_configs, threads: int):
    """`tuner.prune_configs`, which Triton calls just before it benchmarks, compiling the configs it returns."""

    @functools.wraps(prune_configs)
    def hooked(kwargs: dict):
        configs = prune_configs(kwargs)
        if len(configs) > 1 and tuner.nargs is not None:
            compile_all(tuner.fn, list(tuner.nargs.values()), kwargs, configs, threads)
        return configs

    hooked.compiles_in_parallel = True
    return hooked


def compile_all(fn, args: list, kwargs: dict, configs: list, threads: int) -> None:
    """Compile `fn` (a JITFunction or heuristics over one) for every config on `args`, `threads` at a time,
    without launching it. Configs that fail to compile are left to the benchmark, which compiles them again and
    reports them as Triton does."""
    try:  # another Triton's internals fail here, and fall back
        from triton.runtime._async_compile import AsyncCompileMode, FutureKernel
        from triton.runtime.jit import JITFunction

        _parse_one_at_a_time(JITFunction)
        with ThreadPoolExecutor(min(threads, len(configs)), thread_name_prefix="triton-compile") as pool, \
                AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                fn.run(*args, **{**kwargs, **config.all_kwargs(), "warmup": True})
        while not isinstance(fn, JITFunction):  # heuristics and other wrappers hold the JITFunction as .fn
            fn = fn.fn
        drop_failed_compiles(fn.device_caches, FutureKernel)
    except Exception as err:  # the benchmark compiles what is missing, one config after another
        _log_fallback(type(err).__name__, str(err)[:200])


def drop_failed_compiles(device_caches: dict, future_kernel: type) -> None:
    """Remove the configs whose parallel compilation failed from a JITFunction's caches (they would re-raise at every
    launch); a FutureKernel whose `future` a newer Triton has dropped once it had its result is a finished one."""
    for kernel_cache, *_ in device_caches.values():
        for key, kernel in list(kernel_cache.items()):
            if isinstance(kernel, future_kernel) and kernel.future is not None and kernel.future.exception():
                del kernel_cache[key]


_PARSE_LOCK = threading.Lock()


def _parse_one_at_a_time(jit_function_cls) -> None:
    """Wrap `JITFunction.parse` (once) so that threads parse kernel sources one at a time (see the module's doc)."""
    parse = jit_function_cls.parse
    if getattr(parse, "one_at_a_time", False):
        return

    @functools.wraps(parse)
    def locked(self):
        with _PARSE_LOCK:
            return parse(self)

    locked.one_at_a_time = True
    jit_function_cls.parse = locked


@functools.cache
def _log_fallback(kind: str, message: str) -> None:
    logger.warning("compiling Triton configs in parallel failed (%s: %s); Triton compiles them one by one", kind,
                   message)
