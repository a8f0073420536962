"""The processes a command started, torchrun's workers included, and killing them all (the GPU check's runs).

torchrun starts each worker in a session of its own, so killing torchrun, or the process group that `timeout`
kills, leaves its workers running: on the GPU machine they would hold the GPU through the stages after. Linux only
(/proc); elsewhere nothing is found.

    python -m scripts.process_tree --kill-mentioning TEXT   # kill every process whose command line holds TEXT
"""
import argparse
import os
import signal
import sys
from pathlib import Path


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process now running."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (command) state ppid ...": the command may hold spaces and parentheses
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return parents


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, whatever its session or process group."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (found first: once `pid` dies its children move to another parent)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # gone meanwhile, or not ours to kill
            pass


def mentioning(text: str) -> list[int]:
    """The processes, other than this one, whose command line holds `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        pid = int(cmdline.parent.name)
        try:
            if pid != os.getpid() and text in cmdline.read_bytes().decode(errors="replace"):
                found.append(pid)
        except OSError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kill-mentioning", required=True, metavar="TEXT",
                   help="kill (SIGKILL) every process whose command line holds TEXT, and the processes below them")
    args = p.parse_args(argv)
    if not args.kill_mentioning:
        p.error("--kill-mentioning: empty text would match every process")
    pids = mentioning(args.kill_mentioning)
    for pid in pids:
        kill_tree(pid)
    if pids:
        print(f"killed {len(pids)} process(es) left running: {' '.join(map(str, pids))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
