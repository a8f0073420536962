"""The GPU check's environment stage: the machine, the packages, the torch features, and which kernels resolve.

    python scripts/gpu_env.py --out env.json [--dry-run]

Prints what it finds and writes it as check lines (scripts.gpu_results) plus the raw facts. Without --dry-run a
missing CUDA device is a FAIL (the check was started on a GPU machine for nothing); with it, a SKIP. With
--fallback_file, writes there the Mamba2 kernel the later stages must run instead of "auto"'s pick (the portable one
when no Triton kernel launches on the GPU), or nothing: gpu_check.sh exports it as $MVAR_MAMBA_BACKEND.
"""
import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

from models import attention, mamba2, torch_features, triton_autotune
from models.backends import ATTN, MAMBA
from scripts.gpu_results import CheckLine, any_failed, write_lines
from scripts.markdown import markdown_table

PACKAGES = ("torch", "triton", "numpy", "einops", "mamba_ssm", "flash_attn", "causal_conv1d", "mlxtend", "pytest",
            "tensorboard", "safetensors", "huggingface_hub", "torchvision", "PIL", "packaging")
DISTRIBUTIONS = {"mamba_ssm": "mamba-ssm", "flash_attn": "flash-attn", "causal_conv1d": "causal-conv1d",
                 "huggingface_hub": "huggingface-hub", "PIL": "pillow"}
TRAVELLING = ("mamba_ssm", "einops", "mlxtend")  # scripts/gpu_wheels.sh: without them the check runs blind
# the GPU image's own (nothing of ours carries them): the stages import them, and die at once without one
IMAGE_PACKAGES = ("numpy", "pytest", "tensorboard", "safetensors", "huggingface_hub", "torchvision", "PIL", "packaging")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def package_versions() -> dict[str, str]:
    """{import name: installed version, or "absent"}, read without importing the packages."""
    versions = {}
    for name in PACKAGES:
        if importlib.util.find_spec(name) is None:
            versions[name] = "absent"
            continue
        try:
            versions[name] = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "present (no metadata)"
    return versions


def gpu_facts() -> dict[str, str]:
    """Name, compute capability, memory and multiprocessors of GPU 0, or {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_GiB": f"{p.total_memory / 2**30:.1f}",
            "multiprocessors": str(p.multi_processor_count), "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()), "devices": str(torch.cuda.device_count())}


def resolved_kernels(device: torch.device) -> list[list[str]]:
    """[op, dtype, kernel "auto" picks, why each better kernel cannot run] for both ops on `device`."""
    rows = []
    for dtype_name, dtype in DTYPES.items():
        reasons = [f"{k}: {attention.backend_unavailable_reason(k, device, dtype)}" for k in ATTN.kernels[:-1]]
        rows.append([ATTN.label, dtype_name, attention.resolve_backend("auto", device, dtype),
                     "; ".join(r for r in reasons if not r.endswith("None"))])
    kernels, mamba_name = mamba2.resolve_kernels("auto", device.type == "cuda", device)
    note = mamba2.load_kernels()[1]
    rows.append([MAMBA.label, "any", mamba_name, note if kernels or device.type == "cuda" else
                 f"mamba_ssm: needs CUDA inputs ({note})"])
    return rows


def build_tools() -> str:
    """The C compiler and Python headers Triton builds its kernel launcher with, at its first kernel on a GPU."""
    compiler = os.environ.get("CC") or next(filter(None, map(shutil.which, ("gcc", "clang"))), None)  # Triton's order
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return f"C compiler {compiler or 'none found'}, {headers} {'present' if headers.is_file() else 'absent'}"


def triton_launch_problem(device: torch.device) -> str | None:
    """Why a one-line Triton kernel does not compile, launch and add one on `device` (a GPU; the CPU under
    TRITON_INTERPRET=1), or None. On a GPU Triton's first kernel builds its launcher with the machine's C compiler
    and Python's headers: without them every Triton kernel (mamba_ssm's, torch.compile's) fails."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            mask = offsets < n
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

        x = torch.zeros(6, device=device)
        add_one[(1,)](x, 6, BLOCK=8)
        got = x.tolist()
    except Exception as err:  # a missing compiler, headers or driver: any of them is the finding
        message = " / ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
        return f"{type(err).__name__}: {message[:400]}"
    return None if got == [1.0] * 6 else f"wrong result {got}"


def kernel_lines(gpu: bool, versions: dict[str, str], launch_problem: str | None,
                 mamba_kernels: tuple[object | None, str]) -> list[CheckLine]:
    """On a GPU, a Triton kernel launched (`launch_problem`: triton_launch_problem's) and mamba_ssm's kernels loaded
    where the package is installed (`mamba_kernels`: models.mamba2.load_kernels()), each a FAIL otherwise: the
    stages after would pass on the portable kernels alone, mamba_ssm's lines all SKIP."""
    if not gpu:
        return [CheckLine(check, "SKIP", note="needs CUDA") for check in ("Triton kernel on the GPU",
                                                                          "mamba_ssm kernels loaded")]
    lines = [CheckLine("Triton kernel on the GPU", "FAIL" if launch_problem else "PASS",
                       "failed" if launch_problem else "compiled, launched, right", note=launch_problem or "")]
    if versions["mamba_ssm"] != "absent":
        kernels, note = mamba_kernels
        lines.append(CheckLine("mamba_ssm kernels loaded", "PASS" if kernels else "FAIL", versions["mamba_ssm"],
                               note=note))
    return lines


def portable_fallback(gpu: bool, launch_problem: str | None) -> str | None:
    """The Mamba2 kernel the later stages' "auto" must run: the portable one where no Triton kernel launches on the
    GPU (mamba_ssm's would import, be picked, then fail at every call, and with them every training run and timing),
    else None ("auto" picks for itself)."""
    return MAMBA.portable if gpu and launch_problem else None


def check_lines(dry_run: bool, gpu: dict[str, str], versions: dict[str, str]) -> list[CheckLine]:
    lines = [CheckLine("torch", "INFO", torch.__version__, note=f"Python {platform.python_version()}")]
    if gpu:
        lines.append(CheckLine("CUDA device", "PASS", f"{gpu['name']} ({gpu['memory_GiB']} GiB)"))
    else:
        lines.append(CheckLine("CUDA device", "SKIP" if dry_run else "FAIL", "none visible",
                               note="dry run on the CPU" if dry_run else "this check needs a GPU"))
    for key in torch_features.FEATURES:
        why = torch_features.missing(key)
        lines.append(CheckLine(f"torch feature {torch_features.FEATURES[key].name}", "INFO",
                               "absent" if why else "present", note=why or ""))
    if torch_features.compiled_function_gradients_wrong():
        lines.append(CheckLine("torch.compile of autograd.Functions", "INFO", "wrong gradients on this torch",
                               note="pytorch/pytorch#180642: --tfast runs the Mamba2 layers outside the graph"))
    problem = "no Triton" if versions["triton"] == "absent" else triton_autotune.parallel_compile_problem()
    lines.append(CheckLine("Triton autotuning configs compiled in parallel", "INFO", "no" if problem else "yes",
                           note=problem and f"{problem}: each config compiles in turn, a first run takes minutes "
                                            "longer (models/triton_autotune.py)"))
    # what travels as wheels, flash-attn's CUDA build, and what the image must have
    for name in ("mamba_ssm", "flash_attn", "einops", "mlxtend", *IMAGE_PACKAGES):
        needed = name in (*TRAVELLING, *IMAGE_PACKAGES) and not dry_run
        note = "" if not needed else "carry .whl/gpu (make gpu-wheels)" if name in TRAVELLING else \
            "the GPU image's: the numerics, training and timings stages import it"
        lines.append(CheckLine(f"package {name}", "FAIL" if needed and versions[name] == "absent" else "INFO",
                               versions[name], note=note))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the check lines and the raw facts")
    p.add_argument("--dry-run", action="store_true", help="on a CPU: no CUDA device is a SKIP, not a FAIL")
    p.add_argument("--fallback_file", help="where to write the Mamba2 kernel the later stages must run (empty: "
                                           "their own choice)")
    args = p.parse_args(argv)
    versions, gpu = package_versions(), gpu_facts()
    device = torch.device("cuda" if gpu else "cpu")
    kernels = resolved_kernels(device)
    features = torch_features.table()
    print(f"python {sys.version.split()[0]} ({sys.executable}), {platform.platform()}, {os.cpu_count()} CPUs")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("GPU: " + (", ".join(f"{k} {v}" for k, v in gpu.items()) or "none"))
    print(markdown_table(["op", "dtype", f"auto on {device.type}", "why not a faster kernel"], kernels))
    print(markdown_table(["torch feature", "since torch", "needed by", "here"], features))
    tools = build_tools()
    print(tools)
    launch_problem = None  # only a GPU's matters (kernel_lines)
    if gpu:
        launch_problem = "Triton is not installed" if versions["triton"] == "absent" else triton_launch_problem(device)
    lines = check_lines(args.dry_run, gpu, versions) + kernel_lines(bool(gpu), versions, launch_problem,
                                                                    mamba2.load_kernels())
    fallback = portable_fallback(bool(gpu), launch_problem)
    if fallback:
        lines.append(CheckLine("Mamba2 kernel of the later stages", "INFO", fallback,
                               note=f"{MAMBA.env}={fallback}: no Triton kernel launches here, so mamba_ssm's would "
                                    "fail at every call (the numerics still try it, and fail)"))
    if args.fallback_file:
        Path(args.fallback_file).write_text(fallback or "")
    for line in lines:
        print(line.text())
    write_lines(args.out, lines, packages=versions, gpu=gpu, kernels=kernels, torch_features=features,
                python=sys.version.split()[0], cpus=os.cpu_count(), build_tools=tools)
    return 1 if any_failed(lines) else 0


if __name__ == "__main__":
    sys.exit(main())
