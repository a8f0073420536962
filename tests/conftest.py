"""Shared pytest fixtures: deterministic torch, GPU marker handling, the tiny tokenizer + M-VAR the tests build,
and launching scripts on one process or under torchrun (forked from a warm interpreter: tests/warm_launcher.py).

`tiny_mvar` and `run_torchrun` are fixtures; worker scripts started by a test import `build_tiny_mvar` from here
(`run_torchrun` puts tests/ on their PYTHONPATH)."""
import atexit
import functools
import importlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import MVAR, VQVAE, build_vae_mvar
from warm_launcher import NAME_VAR, RELAY, WarmLauncher, WarmProcess

REPO = Path(__file__).resolve().parents[1]
KERNEL_SITE = REPO / ".whl" / "site"  # the pure-Python mamba-ssm / flash-attn builds `make test` installs
# a 2x tokenizer (V=64, Cvae=8: 8 px images at patch_nums 1_2_3_4) and a depth-2 M-VAR, portable kernels
TINY_MVAR = dict(patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, ch_mult=(1, 2), num_classes=10, depth=2,
                 embed_dim=64, num_heads=2, d_state=16, drop_path_rate=0.0, init_adaln_gamma=0.5,
                 flash_if_available=False, fused_if_available=False)
# MVAR_TEST_THREADS: torch threads of the test process and of every process it launches (`make test` runs one per
# pytest-xdist worker, then its numerics pass with another count); unset, the test process keeps torch's default
TEST_THREADS = os.environ.get("MVAR_TEST_THREADS")
if TEST_THREADS:
    torch.set_num_threads(int(TEST_THREADS))
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": TEST_THREADS or "1", "PYTHONUNBUFFERED": "1",
                  "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def build_tiny_mvar(**overrides) -> tuple[VQVAE, MVAR]:
    """(tokenizer, M-VAR) on the CPU from seed 0: TINY_MVAR with `overrides` (any models.build_vae_mvar argument)."""
    torch.manual_seed(0)
    return build_vae_mvar("cpu", **{**TINY_MVAR, **overrides})


# A launch script that runs `train` with rank 1 on another node-local path (`flag_1`, say "--data_path=/copy": it
# replaces that flag) and extra flags: ranks that do not train alike
PER_RANK = """import os, runpy, sys
sys.path.insert(0, {repo!r})
if os.environ["LOCAL_RANK"] == "1":  # another copy of the data, another flag
    sys.argv = [{flag_1!r} if a.startswith({flag_1!r}.split("=")[0] + "=") else a for a in sys.argv] + {extra_1!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def write_image_folder(root: Path, height: int, width: int, per_class: dict[str, int], classes: int = 3) -> None:
    """An ImageFolder under `root` with split/class{c}/{i}.png: per_class[split] noisy images of one random colour
    each, drawn from seed 0."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = rng.integers(0, 255, (1, 1, 3)) * np.ones((height, width, 1))  # per-image colour + noise
                img = np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def launch_cmd(script: str | Path, *args: str, nproc: int = 1) -> list[str]:
    """The command running `script` with `args`: plain python for one process, else torchrun with `nproc` local
    ranks (gloo on CPU)."""
    launcher = [*TORCHRUN, f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return [*launcher, str(script), *map(str, args)]


@functools.cache
def warm_launcher() -> WarmLauncher | None:
    """This test process's fork server for launches (started on first use), or None with MVAR_TEST_COLD=1: every
    process then starts cold, as a user's would (tests/test_warm_launcher.py checks that a warm start runs a script,
    or torchrun's ranks, as a cold one does)."""
    if os.environ.get("MVAR_TEST_COLD") == "1" or not hasattr(socket, "send_fds") or not Path("/proc/self").is_dir():
        return None  # asked for, or not Linux (the launcher passes file descriptors and counts threads in /proc)
    if SUBPROCESS_ENV["OMP_NUM_THREADS"] != "1":
        return None  # numpy's OpenBLAS starts a thread pool at import then, and a process with threads must not fork
    launcher = WarmLauncher(SUBPROCESS_ENV)
    atexit.register(launcher.close)
    return launcher


def warm_argv(cmd: list[str]) -> list[str] | None:
    """What the warm launcher runs for `launch_cmd`'s `cmd` (`python script.py ...`, or torchrun's agent with relays
    as its workers), or None when it is off or `cmd` is something else."""
    if warm_launcher() is None or len(cmd) < 2:
        return None
    if cmd[0] == sys.executable and cmd[1].endswith(".py"):
        return cmd[1:]
    if cmd[:len(TORCHRUN)] == TORCHRUN and cmd[len(TORCHRUN)].startswith("--nproc_per_node="):
        return [*TORCHRUN[1:], cmd[len(TORCHRUN)], *RELAY, *cmd[len(TORCHRUN) + 1:]]
    return None


def warm_workers(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """For a torchrun a test starts itself (a real agent, as on a node): its script and arguments `argv` behind the
    warm launcher's relay, and `env` with the launcher's name, so that its ranks start warm; both unchanged when
    the launcher is off."""
    if warm_launcher() is None:
        return argv, env
    return [*RELAY, *argv], {**env, NAME_VAR: warm_launcher().name}


def warm_python(folder: Path) -> tuple[str, dict[str, str]]:
    """For a program that starts python itself (the GPU check's `--python`): an interpreter and the environment to
    run it with. The interpreter is a stand-in written to `folder` whose every run, and every run of `sys.executable`
    below it, is a warm launcher's relay (or cold, where a fork would differ: warm_launcher.relay); this test's
    interpreter and SUBPROCESS_ENV when the launcher is off."""
    if warm_launcher() is None:
        return sys.executable, dict(SUBPROCESS_ENV)
    stand_in = folder / "python"
    relay = f"{shlex.quote(sys.executable)} {shlex.quote(RELAY[0])} interpreter"
    stand_in.write_text(f'#!/bin/sh\nexec {relay} "$0" "$@"\n')
    stand_in.chmod(0o755)
    return str(stand_in), {**SUBPROCESS_ENV, NAME_VAR: warm_launcher().name}


def launch(script: str | Path, *args: str, nproc: int = 2, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `launch_cmd` from the repository root with one CPU thread per process; with `check`, a non-zero exit
    fails the test showing the end of the output."""
    cmd = launch_cmd(script, *args, nproc=nproc)
    argv = warm_argv(cmd)
    if argv is None:
        proc = subprocess.run(cmd, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    else:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            child = warm_launcher().spawn(argv, REPO, out.fileno(), err.fileno())
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                raise
            out.seek(0)
            err.seek(0)
            proc = subprocess.CompletedProcess(cmd, child.returncode, out.read().decode(), err.read().decode())
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def ended(pid: int, within: float = 10.0) -> bool:
    """Whether process `pid` is gone (or a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def damage_tensor_data(path: Path, n: int = 64) -> None:
    """Flip `n` bytes in the middle of the largest tensor of a torch .pth (a zip whose entries torch stores
    uncompressed and reads without checking their CRC) or a .safetensors file: the file still loads."""
    if path.suffix == ".safetensors":  # an 8-byte header length, the JSON header, then the tensor data
        start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        size = path.stat().st_size - start
    else:
        with zipfile.ZipFile(path) as z:
            info = max(z.infolist(), key=lambda i: i.file_size)
        with open(path, "rb") as f:  # the data follow the 30-byte local header, the name and the extra field
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start, size = info.header_offset + 30 + name_len + extra_len, info.file_size
    assert size >= 2 * n, f"{path}: no tensor of {2 * n} bytes to damage"
    with open(path, "r+b") as f:
        f.seek(start + size // 2)
        data = f.read(n)
        f.seek(start + size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def interrupt(cmd: list[str], trigger: str, sig: signal.Signals,
              group: bool = False) -> tuple[subprocess.Popen | WarmProcess, str]:
    """Start `cmd` like `launch`, send `sig` to it at the first line matching the regex `trigger` (with `group`: to
    every process it started, as SLURM does, and torchrun to each worker's process group); returns the finished
    process and its whole output."""
    argv = None if group else warm_argv(cmd)
    if argv is None:
        proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=group)
        output = proc.stdout
    else:
        read_end, write_end = os.pipe()
        proc = warm_launcher().spawn(argv, REPO, write_end, write_end)
        os.close(write_end)
        output = open(read_end)
    lines = []
    try:
        for line in output:
            lines.append(line)
            if re.search(trigger, line):
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
                break
        lines += output.readlines()
    finally:
        output.close()
        proc.wait(timeout=120)
    return proc, "".join(lines)


@pytest.fixture
def from_kernel_site(monkeypatch):
    """`load(package, module, importer=importlib.import_module)`: `module` imported from KERNEL_SITE for this test
    only (skipped when `package` is not built there); every module it brought is forgotten afterwards."""
    monkeypatch.syspath_prepend(str(KERNEL_SITE))
    before = set(sys.modules)

    def load(package: str, module: str, importer=importlib.import_module):
        if not (KERNEL_SITE / package).is_dir():
            pytest.skip(f"{package}'s pure-Python build is not in .whl/site (`make test` builds it)")
        return importer(module)

    yield load
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_mvar():
    """`build_tiny_mvar`: tiny_mvar(**overrides) -> (vae, mvar)."""
    return build_tiny_mvar


@pytest.fixture(scope="session")
def run_torchrun():
    """`launch`: run_torchrun(script, *args, nproc=2, check=True, timeout=300) -> CompletedProcess."""
    return launch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


# The files that take longest in `make test`'s pass 1, longest first (summed test seconds on the slowest CI CPU, a
# 2-core AVX2-only EPYC, 2026-12-06, torchrun's ranks warm: study 169, trainer_e2e 127, mvar 103, gpu_check 98,
# multinode 86, preemption 70, demo 62, run_guards 43, token_cache 43, tokenizer_training 33, app 33). The Makefile's
# `--no-loadscope-reorder` makes xdist hand out files in collection order, so these start first and the two workers
# end together (xdist's own order, most tests first, starts these few-test files last, where one can leave the other
# worker idle). Other files follow in their usual order.
LONGEST_FIRST = ("test_study", "test_trainer_e2e", "test_mvar", "test_gpu_check", "test_multinode", "test_preemption",
                 "test_demo", "test_run_guards", "test_token_cache", "test_tokenizer_training", "test_app")


def pytest_collection_modifyitems(config, items):
    missing = [name for name in LONGEST_FIRST if not (REPO / "tests" / f"{name}.py").is_file()]
    if missing:
        raise pytest.UsageError(f"conftest.LONGEST_FIRST names test files that do not exist: {missing}")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's own order is kept
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (not available on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

