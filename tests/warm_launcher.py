"""A fork server for the tests' single-process launches of the project's scripts (`conftest.launch`, `interrupt`).

Each `python train.py ...` the tests start spends ~3 s of CPU importing torch, torch._dynamo (which the optimiser
imports) and torchvision before it runs the project's code: about a third of the suite's CPU time. This server pays
for those imports once per pytest worker, then forks a child per launch that runs the script as `python script.py
args` would (`sys.argv`, `sys.path[0]`, `__main__`, exit status, atexit handlers, uncaught tracebacks), in the
server's environment (the tests' SUBPROCESS_ENV) and with the caller's pipes. A child is a real process: its own
pid, signals, exit status. Only third-party modules are shared; the project's own modules are imported by each
child as in a fresh process. MVAR_TEST_COLD=1 makes `conftest` start every process cold instead.

Run as `python warm_launcher.py NAME` (an abstract Unix socket): it prints `ready` when it serves, and exits when
its stdin closes."""
from __future__ import annotations

import importlib
import json
import os
import runpy
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy

# third-party only (see the docstring); after torch, what every train.py imports: the Hub mixin (with huggingface_hub's
# card, API and YAML modules: 0.35 s a start on an AVX2 EPYC), safetensors, TensorBoard's writer and tqdm. They read
# their settings (HF_HOME, HF_HUB_OFFLINE, ...) from the server's environment, which is every child's.
PRELOAD = ("torch", "torch._dynamo", "torchvision", "numpy", "PIL.Image", "huggingface_hub.hub_mixin",
           "safetensors.torch", "torch.utils.tensorboard", "tqdm")


def serve(name: str) -> tuple[dict, list[int]]:
    """Serve launch requests on the abstract Unix socket `name`; returns (request, fds) in each forked child, never
    in the server (which exits when its stdin closes)."""
    path_before = list(sys.path)  # a preloaded import may add to sys.path (torch 2.8 adds a temporary folder)
    for module in PRELOAD:
        importlib.import_module(module)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError(f"importing {PRELOAD} started threads, so forking is not safe: set MVAR_TEST_COLD=1 (every "
                           "process starts cold) and preload less")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind("\0" + name)
    listener.listen()
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}  # pid -> the connection its exit status goes back on
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.02)
        while children:  # reap: each exit status goes back to the caller that started the child
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            conn.send(str(os.waitstatus_to_exitcode(status)).encode())
            conn.close()
        if sys.stdin in readable and not sys.stdin.buffer.read1(1):  # the pytest worker is gone
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            sys.exit(0)
        if listener in readable:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for other in children.values():
                    other.close()
                return dict(json.loads(message), path=path_before), fds
            for fd in fds:
                os.close(fd)
            conn.send(str(pid).encode())
            children[pid] = conn


def become(request: dict, fds: list[int]) -> None:
    """In a forked child: take the caller's stdin/stdout/stderr and working directory, then run the script as
    `python script args` (its exceptions and exit status are the interpreter's, as for a fresh process)."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    numpy.random.seed()  # a fresh seed, as a fresh process draws (Python's random reseeds itself after a fork)
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[:] = [str(Path(script).resolve().parent), *request["path"][1:]]
    runpy.run_path(script, run_name="__main__")


class WarmProcess:
    """A forked child: the subset of subprocess.Popen the tests use (pid, returncode, wait, send_signal, kill)."""

    def __init__(self, conn: socket.socket, args: list[str]):
        self.conn, self.args = conn, args
        self.pid = int(conn.recv(64))
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.conn.settimeout(timeout)
            try:
                status = self.conn.recv(64)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self.conn.close()
            self.returncode = int(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmLauncher:
    """The client: starts the server with `env`, then `spawn`s scripts through it."""

    def __init__(self, env: dict[str, str]):
        name = f"mvar-warm-{os.getpid()}-{secrets.token_hex(6)}"
        self.address = "\0" + name  # Linux's abstract namespace: no file, no path length limit, gone with the server
        self.server = subprocess.Popen([sys.executable, __file__, name], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        line = self.server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"warm launcher did not start (printed {line!r}, exit {self.server.poll()})")

    def spawn(self, argv: list[str], cwd: str | Path, stdout: int, stderr: int) -> WarmProcess:
        """Run `python argv[0] argv[1:]` in a forked child writing to the file descriptors `stdout` and `stderr`."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(self.address)
        except OSError as e:
            raise RuntimeError(f"the warm launcher is gone (exit status {self.server.poll()}, {e}); MVAR_TEST_COLD=1 "
                               "starts every process cold") from e
        with open(os.devnull) as devnull:
            socket.send_fds(conn, [json.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd)}).encode()],
                            [devnull.fileno(), stdout, stderr])
        return WarmProcess(conn, [sys.executable, *map(str, argv)])

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


if __name__ == "__main__":
    become(*serve(sys.argv[1]))
