"""The tests start single-process scripts from a warm fork server (tests/warm_launcher.py): a script must run there
as it does in a cold `python script.py`, or the tests of train.py would test something else."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, SUBPROCESS_ENV, interrupt, launch, launch_cmd, warm_launcher

PROBE = """
import atexit, json, os, random, sys, time
import numpy as np
atexit.register(lambda: print("atexit ran", flush=True))
state = dict(argv=sys.argv, path=sys.path, cwd=os.getcwd(), name=__name__, file=__file__, spec=repr(__spec__),
             project_imported=sorted(m for m in ("models", "utils", "trainer", "conftest") if m in sys.modules),
             stdin=sys.stdin.read(), threads=os.environ["OMP_NUM_THREADS"], unbuffered=os.environ["PYTHONUNBUFFERED"])
print(json.dumps(state), flush=True)
print(json.dumps(dict(ppid=os.getppid(), draws=[random.random(), float(np.random.rand())])), flush=True)
print("to stderr", file=sys.stderr, flush=True)
mode = sys.argv[1]
if mode == "raise":
    raise ValueError("boom")
if mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
sys.exit(int(mode))
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
    """Python's and numpy's global generators are seeded per process, as in a fresh one (a fork would copy the
    server's state into every child)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    draws = [json.loads(launch(script, "0", nproc=1).stdout.splitlines()[1])["draws"] for _ in range(2)]
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]


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
def test_a_launch_past_its_timeout_is_killed(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    with pytest.raises(subprocess.TimeoutExpired):
        launch(script, "sleep", nproc=1, timeout=2)
