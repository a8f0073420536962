"""scripts/slurm.sbatch with stand-ins for srun, scontrol and scancel: the node layout each node's launcher gets, the
time-limit signal (save, then requeue), and a cancellation (wait for the save). The same script ran on a one-node
SLURM 22.05 (Debian's slurm-wlm) with scripts/train_smoke_cpu.sh: saved at the time-limit signal, requeued, resumed."""
import os
import signal
import subprocess
import time

import pytest

from conftest import REPO

SRUN = """#!/usr/bin/env bash
# srun: one task per node (SLURM_NODEID 0..N-1) of the command after srun's own options; the highest exit status.
# As SLURM's srun (src/srun/srun_job.c), a SIGTERM to srun kills its tasks with SIGKILL
echo "srun $*" >> "$LOG"
while [[ $1 == --* ]]; do shift; done
pids=()
trap 'echo "srun: forcing job termination" >> "$LOG"; kill -KILL "${pids[@]}"' TERM
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p"; r=$?; ((r > rc)) && rc=$r; done
exit $rc
"""
SCONTROL = """#!/bin/sh
echo "scontrol $*" >> "$LOG"
[ "$1" = show ] && printf 'gpu-a07\\ngpu-a08\\n'
[ "$1" = requeue ] && exit "${REQUEUE_RC:-0}"
exit 0
"""
SCANCEL = """#!/bin/sh
# scancel --signal=TERM JOB: SLURM signals the tasks of the job's steps, here the launchers
echo "scancel $*" >> "$LOG"
kill -TERM $(cat "$PIDS")
"""
LAUNCHER = """#!/usr/bin/env bash
# a launcher: training that runs RUN_S seconds and, on SIGTERM, saves and exits with ON_TERM
trap 'echo "node $NODE_RANK saved" >> "$LOG"; exit "${ON_TERM:-143}"' TERM
echo "node $NODE_RANK/$NNODES master $MASTER_ADDR:$MASTER_PORT nproc $NPROC_PER_NODE args $*" >> "$LOG"
echo $$ >> "$PIDS"
for ((i = 0; i < ${RUN_S:-0} * 10; i++)); do sleep 0.1; done
"""


@pytest.fixture
def slurm(tmp_path):
    """A job of two nodes (id 4325123, 4 GPUs and 64 CPUs each) whose SLURM commands are stand-ins writing to a log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "launch.sh").write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "NPROC_PER_NODE"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", LOG=str(tmp_path / "log"), PIDS=str(tmp_path / "pids"),
               SLURM_JOB_ID="4325123", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-a[07-08]",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="64")
    return tmp_path, env


def start(folder, env, *args):
    return subprocess.Popen(["bash", str(REPO / "scripts/slurm.sbatch"), *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_lines(folder):
    return (folder / "log").read_text().splitlines()


def wait_for_launchers(folder, proc, n=2):
    deadline = time.monotonic() + 20
    while not ((folder / "pids").exists() and len((folder / "pids").read_text().split()) == n):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def time_limit_signal(folder, env, **extra) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a job whose 30 s training gets the time-limit signal once it runs."""
    proc = start(folder, {**env, "RUN_S": "30", **extra}, "launch.sh")
    wait_for_launchers(folder, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_each_node_gets_the_jobs_layout_and_its_rank(slurm):
    folder, env = slurm
    proc = start(folder, env, "launch.sh", "--data_path=/data/imagenet", "--depth=16")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    lines = log_lines(folder)
    assert lines[0] == "scontrol show hostnames gpu-a[07-08]"
    assert lines[1].startswith("srun --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1 bash -c ")
    assert sorted(line for line in lines if line.startswith("node ")) == [
        f"node {rank}/2 master gpu-a07:25123 nproc 4 args --data_path=/data/imagenet --depth=16" for rank in (0, 1)]
    assert "job 4325123, run 1: 2 node(s) x 4, master gpu-a07:25123: launch.sh" in out


def test_the_port_stays_below_the_ephemeral_range(slurm):
    """A review: 20000 + id mod 20000 reached 39999, inside Linux's ephemeral ports (32768-60999), where an outgoing
    connection may hold it: about a third of the job ids."""
    folder, env = slurm
    proc = start(folder, {**env, "SLURM_JOB_ID": "19999"}, "launch.sh")
    out, err = proc.communicate(timeout=30)
    assert "master gpu-a07:27999" in out, out + err


def test_the_environment_wins_and_without_gpus_a_node_runs_8(slurm):
    folder, env = slurm
    del env["SLURM_GPUS_ON_NODE"]
    proc = start(folder, {**env, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400", "SLURM_CPUS_PER_TASK": "32"},
                 "launch.sh")
    proc.communicate(timeout=30)
    lines = log_lines(folder)
    assert "--cpus-per-task=32" in lines[0] and not any(line.startswith("scontrol") for line in lines)
    assert "node 1/2 master 10.0.0.7:29400 nproc 8 args " in lines


def test_the_time_limit_signal_saves_then_requeues(slurm):
    """SIGUSR1 (--signal=B:USR1@600) goes to the training as SIGTERM through scancel, not to srun (srun turns a
    SIGTERM into a SIGKILL of its tasks: no checkpoint), and once every node saved the job is requeued."""
    folder, env = slurm
    rc, out, err = time_limit_signal(folder, env)
    lines = log_lines(folder)
    assert rc == 143, out + err
    assert lines.index("scancel --signal=TERM 4325123") < lines.index("scontrol requeue 4325123") == len(lines) - 1
    assert {"node 0 saved", "node 1 saved"} < set(lines)
    assert "the time limit is near" in out


def test_a_training_that_ends_as_the_time_limit_nears_is_not_requeued(slurm):
    folder, env = slurm
    assert time_limit_signal(folder, env, ON_TERM="0")[0] == 0
    assert not any("requeue" in line for line in log_lines(folder))


def test_a_refused_requeue_says_to_resubmit(slurm):
    folder, env = slurm
    rc, _, err = time_limit_signal(folder, env, REQUEUE_RC="1")
    assert rc == 143 and "submit the same command again, it resumes" in err


def test_a_cancellation_waits_for_the_save(slurm):
    """A preemption or `scancel --signal=TERM` signals the training (the job's steps; with --full the batch script
    too), not srun: the script must not die first (the job would end and its steps be killed mid-save), nor requeue
    (SLURM's --requeue does that)."""
    folder, env = slurm
    proc = start(folder, {**env, "RUN_S": "30", "ON_TERM": "143"}, "launch.sh")
    wait_for_launchers(folder, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None
    for pid in (folder / "pids").read_text().split():
        os.kill(int(pid), signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    lines = log_lines(folder)
    assert proc.returncode == 143 and {"node 0 saved", "node 1 saved"} < set(lines), out + err
    assert not any(line.startswith(("scancel", "scontrol requeue")) for line in lines)


@pytest.mark.parametrize("job, args, message", [(None, ["launch.sh"], "submit it with sbatch"),
                                                ("4325123", [], "the first argument must be a launcher"),
                                                ("4325123", ["train_d16.sh"], "got 'train_d16.sh'")])
def test_a_script_run_outside_sbatch_or_without_a_launcher_is_refused(slurm, job, args, message):
    folder, env = slurm
    if job is None:
        del env["SLURM_JOB_ID"]
    proc = start(folder, env, *args)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and message in err and not (folder / "log").exists()
