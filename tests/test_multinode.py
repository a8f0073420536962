"""Two torchrun agents as two nodes (issue 10): `--nnodes=2`, c10d rendezvous on 127.0.0.1 (a free port), gloo,
one process each, and a separate output folder per node as on nodes without a shared disk. Training equals one
process with the same global batch; after a kill -9 of one node's worker both nodes resume; an elastic restart
(`--max_restarts=1`) resumes from the checkpoint; the FID dump over two nodes equals one process's. All traffic
stays on the loopback interface; every launch is bounded in time and its process group killed at the end."""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_sample_cli import ckpt  # noqa: F401  (the tiny M-VAR checkpoint fixture)
from conftest import SUBPROCESS_ENV as ENV
from conftest import launch, warm_launcher, warm_workers
from test_trainer_e2e import (NO_MODEL_RNG, REPO, logged_losses, max_abs_diff, model_state,  # noqa: F401
                              setup, single_run, train_cmd)
from utils.run.checkpoint import LAST
from warm_launcher import ColdOnly, WarmProcess

pytestmark = pytest.mark.slow
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE: with the rendezvous store shared across rounds (torch's default), the
# workers of an elastic restart read the previous round's gloo addresses and hang connecting to dead peers
LOOPBACK_ENV = {**ENV, "GLOO_SOCKET_IFNAME": "lo", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(cmd: list[str], env: dict[str, str], log) -> subprocess.Popen | WarmProcess:
    """torchrun's agent `cmd` (`python -m torch.distributed.run ...`) writing to the open file `log`, leading a
    process group of its own: forked by the warm launcher (its torch imports paid once per pytest worker), or cold
    when the launcher is off or `env` needs a fresh interpreter."""
    if warm_launcher() is not None:
        with contextlib.suppress(ColdOnly):
            return warm_launcher().spawn(cmd[1:], REPO, log.fileno(), log.fileno(), env=env, own_group=True)
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class TwoNodes:
    """Two torchrun agents (node_rank 0 and 1) started in their own sessions; `argv(node)` is each node's
    script and flags. Output of node i goes to `logs[i]`. The agents are warm children (`start_agent`) and their
    workers the warm launcher's relays (conftest `warm_workers`): a relay killed takes its rank with it."""

    def __init__(self, tmp: Path, argv, max_restarts: int = 0):
        port = free_port()
        self.logs = [tmp / f"node{i}-{port}.log" for i in range(2)]
        self.procs = []
        for node in range(2):
            worker, env = warm_workers(argv(node), LOOPBACK_ENV)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                   "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                   f"--rdzv_id=test{port}", "--local_addr=127.0.0.1", f"--max_restarts={max_restarts}",
                   "--monitor_interval=0.2", *worker]
            with open(self.logs[node], "w") as log:
                self.procs.append(start_agent(cmd, env, log))

    def text(self) -> str:
        return "".join(p.read_text() for p in self.logs)

    def wait_for(self, pattern: str) -> None:
        deadline = time.time() + TIMEOUT_S
        while not re.search(pattern, self.text()):
            if time.time() > deadline or all(p.poll() is not None for p in self.procs):
                raise AssertionError(f"{pattern!r} never appeared:\n{self.text()[-4000:]}")
            time.sleep(0.02)

    def workers(self, node: int) -> list[int]:
        agent = self.procs[node].pid
        with contextlib.suppress(OSError):
            return [int(p) for p in Path(f"/proc/{agent}/task/{agent}/children").read_text().split()]
        return []

    def kill_worker(self, node: int) -> None:
        workers = self.workers(node)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)

    def wait(self) -> list[int]:
        deadline = time.time() + TIMEOUT_S
        for p in self.procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
        return [p.returncode for p in self.procs]

    def close(self) -> None:
        """Kill what is left: the workers (torchrun starts each in its own session), then the agents."""
        for node, p in enumerate(self.procs):
            for pid in self.workers(node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextlib.contextmanager
def two_nodes(tmp: Path, argv, max_restarts: int = 0):
    nodes = TwoNodes(tmp, argv, max_restarts)
    try:
        yield nodes
    finally:
        nodes.close()


def train_on_two_nodes(setup: Path, outs: list[Path], *extra: str):  # noqa: F811
    """train.py's argv for node i (its own output folder); the global batch is the single-process run's."""
    return lambda node: train_cmd(setup, outs[node], *NO_MODEL_RNG, *extra)[1:]


def completed(setup: Path, outs: list[Path], *extra: str) -> str:  # noqa: F811
    with two_nodes(setup, train_on_two_nodes(setup, outs, *extra)) as nodes:
        codes = nodes.wait()
        assert codes == [0, 0], nodes.text()[-4000:]
        return nodes.text()


@pytest.fixture(scope="module")
def two_node_run(setup):  # noqa: F811
    outs = [setup / f"two_nodes_{i}" for i in range(2)]
    return outs, completed(setup, outs)


def test_two_nodes_equal_one_process(setup, single_run, two_node_run):  # noqa: F811
    outs, log = two_node_run
    assert "no checkpoint in any node's own" in log  # node-local folders: a requeue onto other nodes starts over
    loss_1, loss_2 = logged_losses(single_run), logged_losses(log)
    assert len(loss_1) == 12 and loss_1.keys() == loss_2.keys()
    assert max(abs(loss_1[k] - loss_2[k]) for k in loss_1) < 1e-4
    a, b = model_state(outs[0] / LAST), model_state(outs[1] / LAST)  # each node saved into its own folder
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max_abs_diff(model_state(setup / "single" / LAST), a) < 1e-5


def kill_one_worker_after_a_checkpoint(nodes: TwoNodes) -> None:
    """--save_every=3: kill node 1's worker once iteration 4 is logged, two steps before the next save."""
    nodes.wait_for(r"saved checkpoint .*\(after ep 1 it 3\)")
    nodes.wait_for(r"ep 1/2 it 4/6")
    nodes.kill_worker(1)


def test_both_nodes_resume_after_kill_9_of_one_nodes_worker(setup, two_node_run, tmp_path):  # noqa: F811
    ref_outs, _ = two_node_run
    outs = [setup / f"killed_node_{i}" for i in range(2)]
    with two_nodes(tmp_path, train_on_two_nodes(setup, outs, "--save_every=3")) as nodes:
        kill_one_worker_after_a_checkpoint(nodes)
        assert all(c != 0 for c in nodes.wait())  # no restarts allowed: both agents give up
    for out in outs:
        saved = torch.load(out / LAST, weights_only=True)
        assert (saved["epoch"], saved["iter"]) == (0, 3)
    log = completed(setup, outs, "--save_every=3")
    assert re.search(r"resumed from .* after ep 1 it 3$", log, re.M), log[-3000:]
    ref = model_state(ref_outs[0] / LAST)
    for out in outs:
        got = model_state(out / LAST)
        assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_elastic_restart_resumes_from_the_checkpoint(setup, two_node_run, tmp_path):  # noqa: F811
    ref_outs, _ = two_node_run
    outs = [setup / f"elastic_node_{i}" for i in range(2)]
    with two_nodes(tmp_path, train_on_two_nodes(setup, outs, "--save_every=3"), max_restarts=1) as nodes:
        kill_one_worker_after_a_checkpoint(nodes)
        codes = nodes.wait()
        log = nodes.text()
    assert codes == [0, 0], log[-4000:]
    assert re.search(r"resumed from .* after ep 1 it 3$", log, re.M), log[-3000:]
    ref = model_state(ref_outs[0] / LAST)
    for out in outs:
        got = model_state(out / LAST)
        assert all(torch.equal(ref[k], got[k]) for k in ref)


def fid_dump_argv(model: Path, fid_dir: Path, *extra: str, per_class: int = 1, bs: int = 4) -> list[str]:
    """sample.py and its flags for a tiny FID dump of the checkpoint `model` on the CPU into `fid_dir` (`extra`: more
    flags)."""
    return [str(REPO / "sample.py"), "--ckpt", str(model), "--device", "cpu", "--fid", *extra, "--top_k", "20",
            "--fid_num_per_class", str(per_class), "--bs", str(bs), "--fid_dir", str(fid_dir)]


def test_fid_dump_over_two_nodes_equals_one_process(ckpt, tmp_path):  # noqa: F811
    """The dump folder is shared (as FID dumps are written to shared storage); rank 0 packs the npz."""
    launch(*fid_dump_argv(ckpt, tmp_path / "one", "--preset", "fid", per_class=3), nproc=1, timeout=TIMEOUT_S)
    with two_nodes(tmp_path, lambda node: fid_dump_argv(ckpt, tmp_path / "two", "--preset", "fid", per_class=3)) \
            as nodes:
        assert nodes.wait() == [0, 0], nodes.text()[-4000:]
        assert "rank 0 wrote 16 new PNGs" in nodes.text()  # chunks 0, 2, 4, 6 of 4 images; rank 1 the rest
    name = "tiny-cfg1.5-topk20-topp0.96-seed0-n3.npz"
    with np.load(tmp_path / "one" / name) as a, np.load(tmp_path / "two" / name) as b:
        assert a["arr_0"].shape == (30, 8, 8, 3) and np.array_equal(a["arr_0"], b["arr_0"])


def test_fsdp_refuses_nodes_with_their_own_output_folder(setup, tmp_path):  # noqa: F811
    """Under --fsdp rank 0 alone writes checkpoints (it gathers the state): with node-local output folders node 1's
    would stay empty and every relaunch fail (a review saw exactly that), so the run stops before training."""
    outs = [tmp_path / f"fsdp_{i}" for i in range(2)]
    with two_nodes(tmp_path, train_on_two_nodes(setup, outs, "--fsdp=1")) as nodes:
        codes, log = nodes.wait(), nodes.text()
    assert codes != [0, 0] and "rank(s) 1 see a folder of their own (not rank 0's), and under --fsdp only rank 0 " \
        "writes the checkpoints" in log, log[-4000:]
    assert "ep 1/" not in log and not (outs[0] / LAST).exists()


def test_fid_dump_refuses_nodes_with_other_weights_or_their_own_folder(ckpt, tmp_path):  # noqa: F811
    """A review saw a dump whose nodes held different copies of ckpt.pth exit 0 with both models' images in one npz
    (only rank 0 hashed its weights), and one with a node-local --fid_dir never complete. Node 1 here has both."""
    other = tmp_path / "node1" / ckpt.name
    other.parent.mkdir()
    state = torch.load(ckpt, weights_only=True)
    state["model"]["head.weight"] = state["model"]["head.weight"] + 0.01
    torch.save(state, other)

    with two_nodes(tmp_path, lambda node: fid_dump_argv(other if node else ckpt, tmp_path / f"dump{node}")) as nodes:
        assert nodes.wait() != [0, 0]
        log = nodes.text()
    assert "error: the ranks of this FID dump disagree" in log, log[-4000:]
    assert re.search(r"model_weights \(settings.json\): rank 0: '\w+'; rank 1: '\w+'", log), log[-4000:]
    assert re.search(r"the run lock of --fid_dir .*rank 0: \{'host'.*rank 1: None", log), log[-4000:]
    assert "vae_weights" not in log and not list(tmp_path.glob("dump*/*/*.png"))


def test_a_dump_refused_by_rank_0_alone_ends_every_node(ckpt, tmp_path):  # noqa: F811
    """Only rank 0 compares a relaunch's flags with the dump's settings.json. The other nodes waited for it at a
    barrier under the sharded job's 24 h timeout (a review): gloo failed them with "Connection closed by peer",
    which hid the reason, and NCCL need not notice a peer gone at all. Now they raise rank 0's refusal."""
    launch(*fid_dump_argv(ckpt, tmp_path / "dump", bs=4), nproc=1)  # a finished dump of batches of 4
    with two_nodes(tmp_path, lambda node: fid_dump_argv(ckpt, tmp_path / "dump", bs=2)) as nodes:
        codes = nodes.wait()
        logs = [log.read_text() for log in nodes.logs]
    assert codes[0] != 0 and codes[1] != 0
    assert "error: rank 0: " in logs[1] and "'batch_size': (4, 2)" in logs[1], logs[1][-4000:]


def test_token_extraction_refuses_nodes_with_another_tokenizer_data_copy_or_out(tmp_path):
    """A review saw a two-rank extraction whose ranks loaded different tokenizer files (or data copies) marked
    complete under rank 0's manifest, half of its ids from the other weights. Node 1 here has its own tokenizer
    copy (one weight changed), its own data copy (one more image) and its own --out."""
    import dataclasses

    from conftest import build_tiny_mvar, write_image_folder

    vae, _ = build_tiny_mvar(patch_nums=(1, 2, 4))
    for node in range(2):
        state = {k: v + 0.01 * node if k == "quantize.embedding.weight" else v for k, v in vae.state_dict().items()}
        torch.save({"vae_config": dataclasses.asdict(vae.config), "vae": state}, tmp_path / f"vae{node}.pth")
        write_image_folder(tmp_path / f"data{node}", 12, 12, {"train": 4 + node, "val": 1})

    def argv(node: int) -> list[str]:
        return [str(REPO / "scripts" / "extract_tokens.py"), f"--data_path={tmp_path / f'data{node}'}",
                f"--vae_ckpt={tmp_path / f'vae{node}.pth'}", "--pn=1_2_4", "--mid_reso=1", "--batch=2",
                f"--out={tmp_path / f'cache{node}'}"]

    with two_nodes(tmp_path, argv) as nodes:
        assert nodes.wait() != [0, 0]
        log = nodes.text()
    assert "error: the ranks of this extraction disagree" in log, log[-4000:]
    for fact in (r"the tokenizer's weights \(digest\): rank 0: '\w+'; rank 1: '\w+'",
                 r"the training images: rank 0: 12; rank 1: 15",
                 r"the training files \(digest of their paths and labels\): rank 0: '\w+'; rank 1: '\w+'",
                 r"--out's manifest.json .*rank 0: '\w+'; rank 1: None"):
        assert re.search(fact, log), (fact, log[-4000:])
    assert not list(tmp_path.glob("cache*/*/*.ids.npy"))  # nothing encoded
