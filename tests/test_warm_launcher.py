"""The tests start scripts, alone or as torchrun's ranks, from a warm fork server (tests/warm_launcher.py): a script
must run there as it does in a cold `python script.py` or `torchrun script.py`, or the tests of train.py would test
something else."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SUBPROCESS_ENV, ended, interrupt, launch, launch_cmd, warm_launcher, warm_python
from warm_launcher import NAME_VAR, RELAY, ColdOnly, abstract_address

PROBE = """
import atexit, json, os, random, signal, sys, time
import numpy as np
atexit.register(lambda: print("atexit ran", flush=True))
state = dict(argv=sys.argv, path=sys.path, cwd=os.getcwd(), name=__name__, file=__file__, spec=repr(__spec__),
             project_imported=sorted(m for m in ("models", "utils", "trainer", "conftest") if m in sys.modules),
             stdin=sys.stdin.read(), threads=os.environ["OMP_NUM_THREADS"], unbuffered=os.environ["PYTHONUNBUFFERED"])
print(json.dumps(state), flush=True)
torch = sys.modules.get("torch")  # a warm child has it (the server imported it); a cold one would pay 3 s for it
draws = [random.random(), float(np.random.rand()), float(torch.rand(1)) if torch else None]
print(json.dumps(dict(pid=os.getpid(), ppid=os.getppid(), draws=draws)), flush=True)
print("to stderr", file=sys.stderr, flush=True)
mode = sys.argv[1]
if mode == "trap":  # a script that stops cleanly on SIGTERM, as train.py checkpoints
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    mode = "sleep"
if mode == "family":  # a script with a child process of its own, as a DataLoader worker
    import subprocess
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL)
    print(json.dumps(dict(child=worker.pid)), flush=True)
    mode = "sleep"
if mode == "raise":
    raise ValueError("boom")
if mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
sys.exit(int(mode))
"""

# torchrun's ranks: what torchrun tells each (environment, argv, __main__), a gloo all-reduce, who started it; with
# "fail", rank 1 exits 3 while rank 0 sleeps (torchrun then stops rank 0 and names rank 1 as the cause)
RANK_PROBE = """
import atexit, json, os, sys, time
import torch, torch.distributed as dist
atexit.register(lambda: print(f"atexit ran on rank {os.environ['RANK']}", flush=True))
dist.init_process_group("gloo")
total = torch.tensor(int(os.environ["RANK"]) + 1)
dist.all_reduce(total)
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
        "MASTER_ADDR", "OMP_NUM_THREADS", "TORCHELASTIC_MAX_RESTARTS", "PYTHONPATH")
env = {k: v for k, v in os.environ.items() if k in keys}
parent = open(f"/proc/{os.getppid()}/cmdline").read().split("\\0")
report = dict(env=env, argv=sys.argv, path0=sys.path[0], name=__name__, total=int(total), parent=parent[1:3],
              run_id=len(os.environ["TORCHELASTIC_RUN_ID"]) > 0, own_group=os.getpgid(0) == os.getpid())
os.write(1, (json.dumps(report) + "\\n").encode())  # one write: the ranks share stdout
if sys.argv[1] == "fail":
    if os.environ["RANK"] == "1":
        sys.exit(3)
    time.sleep(60)  # outside a collective: only torchrun's SIGTERM ends it (gloo would see its peer go, at random)
dist.barrier()
dist.destroy_process_group()
"""

# a run of a stand-in interpreter (conftest.warm_python): its sys.path, argv, hash seed, who started it; with "nested",
# the same of a run of its sys.executable
STAND_IN_PROBE = """
import json, os, subprocess, sys
info = dict(path=sys.path, argv=sys.argv, hash=hash("mvar"), ppid=os.getppid())
if sys.argv[1:] == ["nested"]:
    info["nested"] = json.loads(subprocess.run([sys.executable, sys.argv[0]], capture_output=True, text=True,
                                               check=True).stdout)
print(json.dumps(info))
"""

needs_warm = pytest.mark.skipif(warm_launcher() is None,
                                reason="warm launcher off (MVAR_TEST_COLD=1, not Linux, or more than one thread)")


def cold(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=120)


@needs_warm
@pytest.mark.parametrize("mode, code", [("0", 0), ("3", 3), ("raise", 1)])
def test_a_warm_start_runs_a_script_as_a_cold_one(tmp_path, mode, code):
    """argv, sys.path, cwd, __main__, stdin, environment, stdout/stderr, exit status, atexit handlers and an
    uncaught exception's traceback as in a fresh process; none of the project's modules imported beforehand."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    warm, fresh = launch(script, mode, nproc=1, check=False), cold(launch_cmd(script, mode))
    assert warm.returncode == fresh.returncode == code
    warm_lines, fresh_lines = warm.stdout.splitlines(), fresh.stdout.splitlines()
    assert warm_lines[0] == fresh_lines[0] and json.loads(warm_lines[0])["project_imported"] == []
    assert warm_lines[2:] == fresh_lines[2:] == ["atexit ran"]
    assert json.loads(warm_lines[1])["ppid"] != os.getpid()  # it did come from the server
    assert warm.stderr.splitlines()[0] == "to stderr"
    assert warm.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]  # "ValueError: boom" when raised


@needs_warm
def test_warm_children_draw_their_own_seeds(tmp_path):
    """Python's, numpy's and torch's global generators are seeded per process, as in a fresh one (a fork would copy
    the server's state into every child: ranks or relaunches that draw before seeding would all draw alike)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    draws = [json.loads(launch(script, "0", nproc=1).stdout.splitlines()[1])["draws"] for _ in range(2)]
    assert all(a != b for a, b in zip(*draws, strict=True)), draws


@needs_warm
def test_a_warm_child_collects_none_of_the_servers_objects(tmp_path):
    """The server's objects (torch's and the other preloads') are frozen in a child: the collections every exit runs
    skip them instead of writing to their headers, which copied nearly every page the child shares with the server
    (1.6 s an exit on an AVX2 EPYC, 0.5 s frozen). A fresh process freezes nothing; the child's own objects are
    collected as in one."""
    script = tmp_path / "probe.py"
    script.write_text("import gc\nimport torch\nprint(gc.get_freeze_count(), len(gc.get_objects()))\n")
    frozen, collected = map(int, launch(script, nproc=1).stdout.split())
    assert frozen > 10 * collected  # torch alone tracks ~10^5 objects
    # a fresh interpreter's own count: 0, but CPython 3.12.1 starts with 375 tuples frozen
    fresh = cold([sys.executable, "-c", "import gc; print(gc.get_freeze_count())"]).stdout.strip()
    assert cold(launch_cmd(script)).stdout.split()[0] == fresh


@needs_warm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_warm_child_is_a_process_of_its_own_for_signals(tmp_path, sig):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc, output = interrupt([sys.executable, str(script), "sleep"], "sleeping", sig)
    assert proc.returncode == -sig and "to stderr" in output and "atexit ran" not in output
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)  # reaped


@needs_warm
def test_a_spawned_child_takes_its_environment_and_group_and_polls_like_popen(tmp_path):
    """What test_multinode starts its torchrun agents with: `spawn` with an environment (ColdOnly where a start-up
    variable differs from the server's) and a process group of its own; `poll` is None while the child runs and its
    exit status once it ended."""
    script, go = tmp_path / "probe.py", tmp_path / "go"
    script.write_text("import os, sys, time\nprint(os.environ['PROBE'], os.getpgid(0) == os.getpid(), flush=True)\n"
                      "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\nsys.exit(3)\n")
    read_end, write_end = os.pipe()
    try:
        child = warm_launcher().spawn([str(script), str(go)], tmp_path, write_end, write_end,
                                      env={**SUBPROCESS_ENV, "PROBE": "mine"}, own_group=True)
    finally:
        os.close(write_end)
    with open(read_end) as out:
        assert out.readline().split() == ["mine", "True"]
    assert child.poll() is None
    go.touch()
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:  # as TwoNodes.wait_for sees an agent end
        time.sleep(0.01)
    assert child.poll() == 3 and child.wait() == 3
    with pytest.raises(ColdOnly, match="OMP_NUM_THREADS"):
        warm_launcher().spawn([str(script), str(go)], tmp_path, 1, 2, env={**SUBPROCESS_ENV, "OMP_NUM_THREADS": "7"})


@needs_warm
def test_a_launch_past_its_timeout_is_killed(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    with pytest.raises(subprocess.TimeoutExpired):
        launch(script, "sleep", nproc=1, timeout=2)


def rank_reports(stdout: str) -> list[dict]:
    """RANK_PROBE's reports in rank order, without the parent process (the one thing a warm launch changes)."""
    reports = sorted((json.loads(line) for line in stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["env"]["RANK"])
    return [{k: v for k, v in r.items() if k != "parent"} for r in reports]


@needs_warm
@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_a_warm_torchrun_runs_its_ranks_as_a_cold_one(tmp_path, mode):
    """torchrun's agent forked warm, its ranks forked by the server through relays: each rank sees what a cold
    torchrun gives it (environment, argv, sys.path, __main__, a working process group) and exits through atexit; a
    rank that fails stops the others and is named as the root cause with its exit status, as cold."""
    script = tmp_path / "rank_probe.py"
    script.write_text(RANK_PROBE)
    warm = launch(script, mode, nproc=2, check=False, timeout=120)
    fresh = cold(launch_cmd(script, "ok", nproc=2)) if mode == "ok" else None  # ("fail"'s pattern: read off a cold one)
    reports = rank_reports(warm.stdout)
    assert len(reports) == 2 and reports[1]["total"] == 3
    parents = {tuple(json.loads(line)["parent"]) for line in warm.stdout.splitlines() if line.startswith("{")}
    assert parents == {(str(Path(RELAY[0])), "serve")}, parents  # forked by the server, not started by the agent
    if mode == "ok":
        assert warm.returncode == fresh.returncode == 0 and reports == rank_reports(fresh.stdout)
        assert sorted(re.findall("atexit ran on rank .", warm.stdout)) == [f"atexit ran on rank {r}" for r in (0, 1)]
    else:
        stopped = re.compile(r"rank +: 0 \(local_rank: 0\)\n +exitcode +: -15 .*Root Cause.*?"
                             r"rank +: 1 \(local_rank: 1\)\n +exitcode +: 3 ", re.S)
        assert warm.returncode == 1 and "atexit ran on rank 0" not in warm.stdout
        assert stopped.search(warm.stderr), warm.stderr[-2000:]


@needs_warm
@pytest.mark.parametrize("sig, mode, code", [(signal.SIGTERM, "trap", 7), (signal.SIGTERM, "family", -signal.SIGTERM),
                                             (signal.SIGKILL, "sleep", -signal.SIGKILL)])
def test_a_relay_passes_on_torchruns_signals_and_its_rank_dies_with_it(tmp_path, sig, mode, code):
    """torchrun stops a worker with SIGTERM (killpg on it), then SIGKILL after 30 s: the relay forwards the first to
    its rank's process group (the rank, which may handle it, and its own children, as DataLoader workers) and exits
    as the rank did, by the same signal when one killed it; killed itself, the server kills its rank, which would
    otherwise run on unseen."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**SUBPROCESS_ENV, NAME_VAR: warm_launcher().name}
    relay = subprocess.Popen([sys.executable, *RELAY, str(script), mode], env=env, cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    lines = [relay.stdout.readline() for _ in range(4 if mode == "family" else 3)]
    assert lines[-1] == "sleeping\n", lines
    pids = [json.loads(lines[1])["pid"], *([json.loads(lines[2])["child"]] if mode == "family" else [])]
    os.killpg(relay.pid, sig)
    assert relay.wait(timeout=30) == code and ("atexit ran" in relay.stdout.read()) == (mode == "trap")
    for pid in pids:  # the rank was reaped before the relay heard its status; its child goes with the signal
        assert ended(pid, within=5.0), f"{pid} of the rank and its child {pids} is still running"


@needs_warm
def test_a_stand_in_interpreter_forks_warm_where_a_fork_runs_as_a_fresh_process(tmp_path):
    """conftest.warm_python's interpreter (the GPU check's, in the tests): `python script`, `python -u script` and
    `python -m module` are forked by the server, with the sys.path a fresh process makes from its own PYTHONPATH (a
    relative folder included), and the stand-in as sys.executable, so that what they start is warm too. A start-up
    variable unlike the server's (PYTHONHASHSEED), another interpreter option (-S) or pytest runs cold, in the relay's
    place (the test is its parent). Without the sys.path made per child, without the stand-in as sys.executable, or
    without the refusal of a start-up variable, this fails."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "probe_module.py").write_text(STAND_IN_PROBE)
    script = tmp_path / "probe.py"
    script.write_text(STAND_IN_PROBE)
    python, env = warm_python(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(["lib", env["PYTHONPATH"]])  # relative: to the working directory
    server = warm_launcher().server.pid

    def run(interpreter: str, *args: str, **more_env: str) -> dict:
        proc = subprocess.run([interpreter, *args], env={**env, **more_env}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    for args in (["-u", str(script), "nested"], ["-m", "probe_module", "nested"]):
        warm, fresh = run(python, *args), run(sys.executable, *args)
        assert (warm["ppid"], warm["nested"]["ppid"], fresh["ppid"]) == (server, server, os.getpid())
        assert {k: v for k, v in warm.items() if k not in ("ppid", "hash", "nested")} == \
            {k: v for k, v in fresh.items() if k not in ("ppid", "hash", "nested")}
        assert warm["nested"]["path"] == fresh["nested"]["path"] and str(tmp_path / "lib") in warm["path"]
    seeded, fresh = (run(p, str(script), PYTHONHASHSEED="7") for p in (python, sys.executable))
    assert seeded["ppid"] == os.getpid() and seeded["hash"] == fresh["hash"]
    assert run(python, "-S", str(script))["ppid"] == os.getpid()
    (tmp_path / "test_parent.py").write_text("import os\ndef test_parent():\n    print('parent', os.getppid())\n")
    tests = subprocess.run([python, "-m", "pytest", "-s", "-p", "no:cacheprovider", "test_parent.py"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert f"parent {os.getpid()}" in tests.stdout, tests.stdout[-2000:]


@needs_warm
def test_the_server_outlives_callers_that_die_mid_request(tmp_path):
    """A caller killed before its request was whole (nothing sent, or no streams) is dropped; the server serves on
    (before, it died parsing the empty request, and every later launch of that pytest worker failed)."""
    for message in (None, b'{"argv": ["x.py"], "cwd": "/"}'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.connect(abstract_address(warm_launcher().name))
            if message is not None:
                conn.send(message)  # no file descriptors with it
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    assert launch(script, "0", nproc=1).returncode == 0
