"""dist/: single-process fallbacks, unwrap_model, and a 2-rank gloo run (collectives, DDP no_sync, FSDP2 state)."""
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import dist
from conftest import REPO, SUBPROCESS_ENV

WORKER = textwrap.dedent("""
    import tempfile
    import time
    from pathlib import Path
    import torch
    from torch import nn
    import dist
    from trainer import param_groups
    from utils.run.checkpoint import is_checkpoint_writer

    def main():
        device = dist.initialize()
        rank, world = dist.get_rank(), dist.get_world_size()
        assert world == 2 and device.type == "cpu" and dist.initialized()
        assert dist.all_reduce_mean(torch.tensor([float(rank)])).item() == 0.5
        assert dist.all_reduce_sum(torch.tensor([1.0 + rank])).item() == 3.0
        assert dist.all_gather_object({"r": rank}) == [{"r": 0}, {"r": 1}]
        assert dist.broadcast_object("x" if rank == 0 else None) == "x"
        assert dist.broadcast_object("y" if rank == 1 else None, src=1) == "y"  # another rank's object
        assert dist.broadcast(torch.tensor([1.0 + rank])).item() == 1.0
        gathered = dist.all_gather_cat(torch.tensor([[rank, 10 + rank]]))  # rows in rank order (a mutant reversed)
        assert torch.equal(gathered, torch.tensor([[0, 10], [1, 11]]))
        try:  # one rank's error (a damaged checkpoint on its node) is raised on every rank, no rank left waiting
            with dist.raised_on_every_rank(OSError):
                if rank == 1:
                    raise OSError("disk full")
        except OSError as e:
            assert str(e) == ("disk full" if rank == 1 else "rank 1: disk full"), str(e)
        else:
            raise AssertionError("no rank raised")
        with dist.raised_on_every_rank(OSError):
            pass

        torch.manual_seed(rank)  # different weights per rank: DDP must broadcast rank 0's
        model = dist.wrap_model(nn.Linear(3, 1, bias=False), device)
        assert dist.unwrap_model(model) is model.module
        w0 = dist.all_gather_object(model.module.weight.detach().clone())
        assert torch.equal(w0[0], w0[1])
        x = torch.full((1, 3), float(rank + 1))
        with dist.grad_sync(model, enabled=False):  # micro-step: gradients stay local
            model(x).sum().backward()
        local = model.module.weight.grad.clone()
        assert torch.equal(local, x)
        model.module.weight.grad = None
        with dist.grad_sync(model, enabled=True):  # final micro-step: averaged over ranks
            model(x).sum().backward()
        assert torch.allclose(model.module.weight.grad, torch.full((1, 3), 1.5))

        torch.manual_seed(rank)  # different weights per rank: FSDP2 too must start from rank 0's
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        net[1].weight._no_weight_decay = True  # a 2-D parameter the flag alone spares (fully_shard used to drop it)
        ref = {k: dist.broadcast(v.clone()) for k, v in net.state_dict().items()}
        sharded = dist.wrap_model(net, device, fsdp=True)
        assert dist.is_fsdp(sharded)
        decay, no_decay = (g["params"] for g in param_groups(sharded))
        assert [p is sharded[0].weight for p in decay] == [True]
        assert len(no_decay) == 3 and any(p is sharded[1].weight for p in no_decay)
        full = dist.full_model_state_dict(sharded)  # gathered on rank 0 only
        assert all(torch.equal(full[k], ref[k]) for k in ref) if rank == 0 else full == {}
        dist.load_full_state(sharded, {k: v + 1 for k, v in ref.items()}, None, None)
        full = dist.full_model_state_dict(sharded)
        assert all(torch.equal(full[k], ref[k] + 1) for k in ref) if rank == 0 else full == {}

        plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))  # a single-process optimizer state moves to FSDP2
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.1)
        plain(torch.ones(1, 4)).sum().backward()
        plain_opt.step()
        plain_sd = dist.full_optimizer_state_dict(plain, plain_opt)
        assert set(plain_sd["state"]) == set(ref)  # keyed by parameter name
        sharded_opt = torch.optim.AdamW(sharded.parameters(), lr=0.1)
        fresh = dist.full_optimizer_state_dict(sharded, sharded_opt)  # before any step: no state, none made
        assert fresh["state"] == {} and not sharded_opt.state
        dist.load_full_state(sharded, plain.state_dict(), sharded_opt, plain_sd)
        back = dist.full_optimizer_state_dict(sharded, sharded_opt)
        if rank == 0:
            assert all(torch.equal(back["state"][k][m], plain_sd["state"][k][m]) for k in ref
                       for m in ("exp_avg", "exp_avg_sq"))

        folder = Path(dist.broadcast_object(tempfile.mkdtemp() if rank == 0 else None))  # a shared output folder
        dist.get_local_rank = lambda: 0  # each rank its node's first: a writer unless it finds rank 0's token
        is_file = Path.is_file
        if rank == 1:  # a slow look: rank 0 must not remove the token before every rank has looked
            Path.is_file = lambda self: time.sleep(0.5) or is_file(self)
        assert is_checkpoint_writer(folder) == (rank == 0)
        Path.is_file = is_file
        dist.barrier()
        assert not list(folder.iterdir())  # rank 0's token, read by every rank, is gone again
        return rank

    rank = main()
    dist.finalize()  # once the DDP/FSDP2 models are out of scope
    print("WORKER OK", rank)
""")


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    device = dist.initialize()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (dist.get_rank(), dist.get_world_size(), dist.is_main_process(), dist.initialized()) == (0, 1, True, False)
    t = torch.tensor([2.0])
    assert dist.all_reduce_mean(t) is t and t.item() == 2.0
    assert dist.all_gather_object(3) == [3] and dist.broadcast_object(4) == 4
    with pytest.raises(OSError, match="^disk full$"), dist.raised_on_every_rank(OSError):
        raise OSError("disk full")
    with pytest.raises(KeyError), dist.raised_on_every_rank(OSError):  # other errors pass through
        raise KeyError("x")
    model = nn.Linear(2, 2)
    assert dist.wrap_model(model, device) is model


def test_partial_torchrun_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(dist.LaunchError, match="WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"):
        dist.initialize()


def test_a_bad_launch_is_one_error_line_and_a_lonely_rank_says_what_it_waits_for(tmp_path):
    """A review: WORLD_SIZE alone gave train.py a RuntimeError traceback, and a rank whose peers never came printed
    nothing for the 30 minutes of the process group's wait (logging starts after it)."""
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in dist.core.TORCHRUN_VARS}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--dataset=mnist"], env={**env, "WORLD_SIZE": "2"},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not: launch with torchrun (or set "
        "all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; unset WORLD_SIZE for one process)"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import dist, dist.core as c; c.RENDEZVOUS_NOTICE_S = 0.3; dist.initialize(timeout_min=0.03)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env={
        **env, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert proc.returncode != 0 and f"rank 0: still waiting, after 0.3 s, for the 2 ranks to meet at 127.0.0.1:" \
        f"{port} (every node launched, with the same --nnodes and master address?); giving up after 0.03 min" \
        in proc.stderr


def test_the_ranks_wait_for_each_other_as_long_as_the_flag_says(tmp_path, monkeypatch):
    """--dist_timeout_min (VAR's 30 minutes by default): a lone rank of two gives up after it, in one error line
    naming where it waited (it was torch's DistStoreError traceback, after a fixed 30 minutes); the tokenizer's
    trainer passes its flag the same way."""
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in dist.core.TORCHRUN_VARS}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--dataset=mnist", "--dist_timeout_min=0.02"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env={
                              **env, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": str(port)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: rank 0: the 2 ranks did not all meet at 127.0.0.1:{port} within 0.02 min (")
    assert not list(tmp_path.iterdir())  # no output folder: nothing was started

    import tokenizer_trainer

    def initialize(timeout_min: float = 30.0):
        raise dist.LaunchError(f"waited {timeout_min} min")

    monkeypatch.setattr(dist, "initialize", initialize)
    with pytest.raises(dist.LaunchError, match="waited 0.02 min"):
        tokenizer_trainer.train(tokenizer_trainer.build_parser().parse_args(["--dist_timeout_min=0.02"]))


def test_a_port_in_use_is_one_error_line_naming_it(monkeypatch):
    """Rank 0 of a launch without torchrun's agent listens at MASTER_ADDR:MASTER_PORT itself; a port another run
    holds was torch's DistNetworkError traceback (EADDRINUSE), and is now a LaunchError saying what to change."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                         TORCHELASTIC_USE_AGENT_STORE="False").items():
            monkeypatch.setenv(k, v)
        with pytest.raises(dist.LaunchError, match=f"rank 0: no connection at 127.0.0.1:{port} .*address already in "
                           "use.*pick another with torchrun --master_port"):
            dist.initialize(backend="gloo", timeout_min=0.05)
    assert not torch.distributed.is_initialized()


def test_a_group_that_forms_says_nothing_of_waiting(monkeypatch, capsys):
    """The rendezvous notice is for a group that has not formed: one that forms cancels it, so no "still waiting"
    line follows a launch that went well (a review of the mutants: a notice left running passed the suite, whose
    only group formed in-process is refused). A one-rank gloo group, the notice due after 0.2 s."""
    import time

    import dist.core

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     TORCHELASTIC_USE_AGENT_STORE="False").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist.core, "RENDEZVOUS_NOTICE_S", 0.2)
    try:
        dist.initialize(backend="gloo", timeout_min=0.5)
        assert dist.get_world_size() == 1
        time.sleep(0.5)
    finally:
        dist.finalize()
    assert "still waiting" not in capsys.readouterr().err and not torch.distributed.is_initialized()


def test_unwrap_model_removes_compile_wrapper():
    model = nn.Linear(2, 2)
    assert dist.unwrap_model(torch.compile(model)) is model
    assert dist.unwrap_model(model) is model


def test_the_local_rank_is_torchruns(monkeypatch):
    """Under a process group the local rank is torchrun's LOCAL_RANK (faked: rank 3 of its node); it picks the one
    checkpoint writer per node of node-local output folders (utils.run.checkpoint). The tests run one rank per node,
    so a local rank of 0 everywhere (every rank of a multi-GPU node a writer, racing on one lock) passed them."""
    import dist.core

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist.get_local_rank() == 0  # no process group: a single process
    monkeypatch.setattr(dist.core, "initialized", lambda: True)
    assert dist.get_local_rank() == 3


def test_the_main_process_is_global_rank_0_not_each_nodes_first(monkeypatch):
    """Rank 4, the first of its node (faked), is no main process: one process of the job logs and writes its files.
    The tests run one node, where local and global ranks agree, so a check of the local rank passed them (a review
    of the mutants)."""
    import dist.core

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist.core, "initialized", lambda: True)
    monkeypatch.setattr(dist.core.tdist, "get_rank", lambda: 4)
    assert (dist.get_rank(), dist.get_local_rank(), dist.is_main_process()) == (4, 0, False)
    monkeypatch.setattr(dist.core.tdist, "get_rank", lambda: 0)
    assert dist.is_main_process()


def test_the_other_ranks_raise_the_first_failing_ranks_message(monkeypatch):
    """Ranks 1 and 2 of three failed (faked gather): a rank that did not raises rank 1's message, as the first
    type given. Two ranks, one failing, cannot tell the first from the last, so the last passed the suite (a review
    of the mutants)."""
    import dist.core

    monkeypatch.setattr(dist.core, "all_gather_object", lambda obj: [obj, "rank 1: disk full", "rank 2: damaged"])
    with pytest.raises(OSError, match="^rank 1: disk full$"), dist.raised_on_every_rank(OSError, ValueError):
        pass


def test_a_local_rank_past_the_visible_gpus_is_a_launch_error(monkeypatch):
    """Two GPUs visible (faked): LOCAL_RANK=2 is a LaunchError saying what to lower; LOCAL_RANK=1 takes cuda:1. An
    off-by-one (>) let LOCAL_RANK=2 through to CUDA's own error and passed the CPU-only suite (a review of the
    mutants)."""
    class Picked(Exception):
        pass

    def set_device(device):
        raise Picked(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for k, v in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(dist.LaunchError, match=r"^LOCAL_RANK=2 but only 2 GPUs are visible: lower --nproc_per_node$"):
        dist.initialize()
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Picked) as picked:
        dist.initialize()
    assert picked.value.args[0] == torch.device("cuda", 1)


def test_fsdp2_gradient_sync_follows_the_accumulation_window(monkeypatch):
    """`grad_sync` on an FSDP2 model (its one method faked) turns the reduce-scatter off for the micro-steps inside
    an accumulation window and on for the last; the 2-rank test covers DDP's no_sync only, so an FSDP2 model that
    synced every micro-step (--ac times the communication) passed the suite."""
    import dist.wrap

    class Sharded(nn.Linear):
        def set_requires_gradient_sync(self, enabled):
            calls.append(enabled)

    calls = []
    monkeypatch.setattr(dist.wrap, "is_fsdp", lambda model: True)
    model = Sharded(2, 2)
    for enabled in (False, False, True):
        with dist.grad_sync(model, enabled):
            pass
    assert calls == [False, False, True]


def test_two_rank_gloo_collectives_ddp_and_fsdp(tmp_path, run_torchrun):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = run_torchrun(script, timeout=180)
    assert proc.stdout.count("WORKER OK") == 2


def test_run_then_finalize_frees_mains_locals_before_leaving_the_group_even_on_error(monkeypatch):
    import weakref

    import dist.core

    refs, alive_at_finalize = [], []
    monkeypatch.setattr(dist.core, "finalize", lambda: alive_at_finalize.append(refs[0]() is not None))

    def main(x):
        model = nn.Linear(2, 2)  # stands for the DDP/FSDP2 model that holds the process group
        refs.append(weakref.ref(model))
        raise ValueError(x)

    with pytest.raises(ValueError, match="boom"):
        dist.run_then_finalize(main, "boom")
    assert alive_at_finalize == [False]
    assert dist.run_then_finalize(lambda a, b: a + b, 1, 2) == 3 and len(alive_at_finalize) == 2


def test_an_optimizer_state_of_other_parameters_is_refused_naming_them():
    """Resuming an optimizer state whose parameter names differ from the model's, either way, names them (an extra
    entry was a bare KeyError deep in the position lookup, or ignored under FSDP2)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    saved = dist.full_optimizer_state_dict(model, opt)
    renamed = {"state": {k.replace("1.", "9."): v for k, v in saved["state"].items()},
               "param_groups": [{**g, "params": [k.replace("1.", "9.") for k in g["params"]]}
                                for g in saved["param_groups"]]}
    with pytest.raises(KeyError, match=r"no entry for \['1.bias', '1.weight'\]"):
        dist.load_full_state(model, model.state_dict(), opt, renamed)
    extra = {**saved, "param_groups": [{**saved["param_groups"][0],
                                        "params": [*saved["param_groups"][0]["params"], "2.weight"]}]}
    with pytest.raises(KeyError, match=r"entries for parameters the model lacks: \['2.weight'\]"):
        dist.load_full_state(model, model.state_dict(), opt, extra)
    dist.load_full_state(model, model.state_dict(), opt, saved)
