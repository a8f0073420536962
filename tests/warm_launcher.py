"""A fork server for the tests' launches of the project's scripts (`conftest.launch`, `interrupt`).

Each `python train.py ...` the tests start spends ~3 s of CPU importing torch, torch._dynamo (which the optimiser
imports) and torchvision before it runs the project's code: about a third of the suite's CPU time. This server pays
for those imports once per pytest worker, then forks a child per launch that runs the script as `python script.py
args` (or `python -m module args`) would (`sys.argv`, `sys.path[0]`, `__main__`, exit status, atexit handlers,
uncaught tracebacks), in the server's environment (the tests' SUBPROCESS_ENV) and with the caller's pipes. A child
is a real process: its own pid, signals, exit status; it is killed when its caller's connection closes (the caller
died). Only third-party modules are shared; the project's own modules are imported by each child as in a fresh
process. MVAR_TEST_COLD=1 makes `conftest` start every process cold instead.

torchrun runs warm too: the agent (`-m torch.distributed.run`) is a child of the server, and each of its workers is
`python warm_launcher.py relay script args`, a small stdlib-only process that has the server fork `python script
args` with the worker's environment and streams, forwards the signals torchrun sends to it, and exits as the script
did; the rank leads a process group of its own, which the relay signals, as torchrun signals a worker's. torchrun's
own code (rendezvous, environment, failure handling) is unchanged.

A script that starts python itself (the GPU check) gets a stand-in interpreter, `python warm_launcher.py interpreter
STAND_IN args` (conftest.warm_python): a relay whose child has STAND_IN as `sys.executable`, so what it starts with
`sys.executable` is warm too. A relay runs cold, exec'ing the interpreter in its own place, where a fork would differ:
interpreter options other than -u, pytest, or an environment variable read at start-up (STARTUP_VARS) unlike the
server's. A child's `sys.path` is made from its own PYTHONPATH.

Run as `python warm_launcher.py serve NAME` (an abstract Unix socket): it prints `ready` when it serves, and exits
when its stdin closes."""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import re
import runpy
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

# third-party only (see the docstring); after torch, what every train.py imports: the Hub mixin (with huggingface_hub's
# card, API and YAML modules: 0.35 s a start on an AVX2 EPYC), safetensors, TensorBoard's writer and tqdm. They read
# their settings (HF_HOME, HF_HUB_OFFLINE, ...) from the server's environment, which is every child's.
PRELOAD = ("torch", "torch._dynamo", "torchvision", "numpy", "PIL.Image", "huggingface_hub.hub_mixin",
           "safetensors.torch", "torch.utils.tensorboard", "tqdm")
NAME_VAR = "MVAR_WARM_LAUNCHER"  # the server's socket name, in every child's environment (for `relay`)
# what torchrun's agent sends its workers to stop them (TORCHELASTIC_SIGNALS_TO_HANDLE's default), forwarded by relay
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
RELAY = [str(Path(__file__).resolve()), "relay"]  # torchrun's worker script and its first argument, in a warm launch
# read when the interpreter or a preloaded module starts (hash seed, bytecode, buffering, warnings; torch's logs,
# compiler settings, threads and CPU kernels; the Hub's settings; the temporary folder; the loader): a child cannot
# take another value, so a relay whose environment differs from the server's in one runs cold. Not PYTHONPATH: a
# child's sys.path is made from its own.
STARTUP_VARS = re.compile(r"PYTHON(?!PATH$)\w*|TORCH_LOGS\w*|TORCHDYNAMO_\w+|TORCHINDUCTOR_\w+|HF_\w+|HUGGINGFACE_\w+|"
                          r"OMP_\w+|MKL_\w+|KMP_\w+|OPENBLAS_\w+|ATEN_CPU_CAPABILITY|ONEDNN_\w+|DNNL_\w+|TMPDIR|TEMP|TMP|"
                          r"LD_\w+")
COLD = b"cold: "  # the server's answer to a request a fork cannot run as a fresh process would, before the reason


class ColdOnly(Exception):
    """The server will not fork this request (the message says why): it must start cold."""


def startup_differences(env: dict[str, str], reference: dict[str, str]) -> list[str]:
    """The STARTUP_VARS whose values differ between `env` and `reference` (set in one only included)."""
    return sorted(k for k in env.keys() | reference.keys()
                  if STARTUP_VARS.fullmatch(k) and env.get(k) != reference.get(k))


def pythonpath(env: dict[str, str]) -> list[str]:
    """PYTHONPATH's folders as the interpreter puts them on sys.path: absolute, from the working directory."""
    value = env.get("PYTHONPATH", "")
    return [os.path.abspath(folder) for folder in value.split(os.pathsep)] if value else []


def abstract_address(name: str) -> str:
    """The server's socket address: `name` in Linux's abstract namespace (no file, no path length limit, gone with
    the server)."""
    return "\0" + name


def serve(name: str) -> tuple[dict, list[int]]:
    """Serve launch requests on the abstract Unix socket `name`; returns (request, fds) in each forked child, never
    in the server (which exits when its stdin closes)."""
    # sys.path after the script's folder and PYTHONPATH's, before a preloaded import adds to it (torch 2.8 adds a
    # temporary folder)
    ours = set(pythonpath(os.environ))
    base_path = [folder for folder in sys.path[1:] if folder not in ours]
    for module in PRELOAD:
        importlib.import_module(module)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError(f"importing {PRELOAD} started threads, so forking is not safe: set MVAR_TEST_COLD=1 (every "
                           "process starts cold) and preload less")
    # the preloaded objects out of the collector's reach: a child's collections (every exit runs several) would
    # otherwise write to each object's header, copying nearly every page the server shares with it (exit: 1.6 s ->
    # 0.5 s a child on an AVX2 EPYC); they stay alive in every child, as in a fresh process that imported them
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(abstract_address(name))
    listener.listen()
    os.environ[NAME_VAR] = name
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}  # pid -> the connection its exit status goes back on
    while True:
        readable, _, _ = select.select([listener, sys.stdin, *children.values()], [], [], 0.02)
        while children:  # reap: each exit status goes back to the caller that started the child
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            try:
                conn.send(str(os.waitstatus_to_exitcode(status)).encode())
            except OSError:
                pass  # its caller is gone
            conn.close()
        for pid, conn in children.items():
            if conn in readable:  # a caller sends nothing after its request: it closed, so it died
                os.kill(pid, signal.SIGKILL)
        if sys.stdin in readable and not sys.stdin.buffer.read1(1):  # the pytest worker is gone
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            sys.exit(0)
        if listener in readable:
            conn, _ = listener.accept()
            conn.settimeout(5)  # a caller that connects and never sends must not stall every launch
            fds, pid = [], -1
            try:
                message, fds, flags, _ = socket.recv_fds(conn, 1 << 20, 3)
                request = json.loads(message)
                differ = startup_differences(request.get("env", os.environ), os.environ)
                if differ:
                    conn.send(COLD + f"{', '.join(differ)} unlike the warm launcher's environment".encode())
                elif len(fds) == 3 and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    pid = os.fork()
            except (OSError, ValueError, AttributeError):
                pass  # it died mid-request, sent no JSON object, or no process could be forked: pid stays -1
            if pid == 0:
                listener.close()
                conn.close()
                for other in children.values():
                    other.close()
                return dict(request, path=base_path), fds
            for fd in fds:
                os.close(fd)
            if pid < 0:  # nothing runs: its caller reads no pid (or why it must start cold)
                conn.close()
                continue
            if request.get("own_group"):
                with contextlib.suppress(OSError):  # the child does the same: whichever runs first
                    os.setpgid(pid, pid)
            try:
                conn.settimeout(None)
                conn.send(str(pid).encode())
            except OSError:  # its caller died meanwhile
                os.kill(pid, signal.SIGKILL)
            children[pid] = conn


def become(request: dict, fds: list[int]) -> None:
    """In a forked child: take the caller's stdin/stdout/stderr, working directory and environment (when it sent
    one) and `sys.executable` (when it sent one), then run `python script args` or `python -m module args` (its
    exceptions and exit status are the interpreter's, as for a fresh process)."""
    import numpy  # imported by the server already
    import torch

    if request.get("own_group"):
        os.setpgid(0, 0)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    if "env" in request:
        os.environ.clear()
        os.environ.update(request["env"])
    sys.executable = request.get("executable", sys.executable)
    numpy.random.seed()  # fresh seeds, as a fresh process draws (Python's random reseeds itself after a fork)
    torch.seed()
    argv = request["argv"]
    path = list(dict.fromkeys([*pythonpath(os.environ), *request["path"]]))  # a folder twice: the first kept (site)
    if argv[0] == "-m":
        sys.argv = argv[1:]  # run_module puts the module's file in sys.argv[0], as `python -m` does
        sys.path[:] = [os.getcwd(), *path]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    sys.argv = list(argv)
    sys.path[:] = [str(Path(argv[0]).resolve().parent), *path]
    runpy.run_path(argv[0], run_name="__main__")


def request_child(name: str, argv: list[str], cwd: str | Path, fds: list[int], env: dict[str, str] | None = None,
                  own_group: bool = False, executable: str | None = None) -> WarmProcess:
    """Have the server named `name` fork `python *argv` with `fds` as its stdin, stdout and stderr (and `env` as its
    environment, else the server's; in a process group of its own with `own_group`; `executable` as its
    sys.executable); ColdOnly when `env` differs from the server's in a STARTUP_VARS variable."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(abstract_address(name))
    request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "own_group": own_group,
               **({} if env is None else {"env": env}), **({} if executable is None else {"executable": executable})}
    socket.send_fds(conn, [json.dumps(request).encode()], fds)
    return WarmProcess(conn, [sys.executable, *map(str, argv)])


def script_argv(argv: list[str]) -> list[str] | None:
    """`python *argv` as a warm child runs it (`script args` or `-m module args`), or None where a fork would
    differ: interpreter options (but -u where PYTHONUNBUFFERED already is set: the server's, a STARTUP_VARS
    variable, then is), -c, a program from stdin, or pytest (which cannot rewrite the asserts of plugins the
    server imported)."""
    if argv[:1] == ["-u"] and os.environ.get("PYTHONUNBUFFERED"):
        argv = argv[1:]
    if argv[:1] == ["-m"] and len(argv) > 1 and argv[1] != "pytest" or argv[:1] and not argv[0].startswith("-"):
        return argv
    return None


def relay(argv: list[str], executable: str | None = None) -> None:
    """torchrun's worker command in a warm launch, or a stand-in interpreter's run (`executable` its path): run
    `python *argv` as a warm child with this process's environment and streams, forward the signals torchrun's agent
    stops workers with, and exit as the child did (by the same signal when one killed it). The child leads a process
    group of its own, as torchrun starts a worker, and the signals go to that group (its DataLoader workers too); one
    that comes while the child starts waits. Where a warm child would differ (`script_argv`, ColdOnly), this process
    becomes `python *argv` itself."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    runnable = script_argv(argv)
    try:
        if runnable is None:
            raise ColdOnly(f"options {argv[:1]}")
        child = request_child(os.environ[NAME_VAR], runnable, os.getcwd(), [0, 1, 2], dict(os.environ),
                              own_group=True, executable=executable)
    except ColdOnly:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        os.execv(sys.executable, [sys.executable, *argv])

    def forward(sig: int, _frame) -> None:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # the group ended meanwhile
                os.killpg(child.pid, sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    code = child.wait()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


class WarmProcess:
    """A forked child: the subset of subprocess.Popen the tests use (pid, returncode, poll, wait, send_signal,
    kill)."""

    def __init__(self, conn: socket.socket, args: list[str]):
        self.conn, self.args = conn, args
        pid = conn.recv(4096)
        if not pid:
            raise OSError("the warm launcher dropped the request (it could not fork?)")
        if pid.startswith(COLD):
            conn.close()
            raise ColdOnly(pid[len(COLD):].decode())
        self.pid = int(pid)
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.conn.settimeout(timeout)
            try:
                status = self.conn.recv(64)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self.conn.close()
            if not status:
                raise OSError(f"the warm launcher closed the connection of {self.args} without its exit status "
                              f"(the server died?)")
            self.returncode = int(status)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.conn], [], [], 0)[0]:
            return self.wait()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmLauncher:
    """The client: starts the server with `env`, then `spawn`s scripts through it."""

    def __init__(self, env: dict[str, str]):
        self.name = f"mvar-warm-{os.getpid()}-{secrets.token_hex(6)}"
        self.server = subprocess.Popen([sys.executable, __file__, "serve", self.name], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        line = self.server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"warm launcher did not start (printed {line!r}, exit {self.server.poll()})")

    def spawn(self, argv: list[str], cwd: str | Path, stdout: int, stderr: int, env: dict[str, str] | None = None,
              own_group: bool = False) -> WarmProcess:
        """Run `python *argv` (`argv` starts with a script or with "-m", a module) in a forked child writing to the
        file descriptors `stdout` and `stderr` (with `env` and `own_group` as `request_child` takes them: ColdOnly
        where `env` needs a cold start)."""
        try:
            with open(os.devnull) as devnull:
                return request_child(self.name, argv, cwd, [devnull.fileno(), stdout, stderr], env, own_group)
        except OSError as e:
            raise RuntimeError(f"the warm launcher is gone (exit status {self.server.poll()}, {e}); MVAR_TEST_COLD=1 "
                               "starts every process cold") from e

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        become(*serve(sys.argv[2]))
    elif sys.argv[1:2] == ["relay"] and len(sys.argv) > 2:
        relay(sys.argv[2:])
    elif sys.argv[1:2] == ["interpreter"] and len(sys.argv) > 2:
        relay(sys.argv[3:], executable=sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} serve NAME | relay SCRIPT [ARGS...] | interpreter STAND_IN [PYTHON ARGS...]")
