"""utils.run.rng: a resumed rank restores its own generator states from a checkpoint's list of every rank's, and a
resumed run keeps its checkpoint's seed."""
import logging
import random

import numpy as np
import torch

import dist
from utils.run.rng import get_rng_state, resolve_seed, restore_rng_states, set_rng_state


def test_each_rank_restores_its_own_rng_states(monkeypatch, request):
    """Rank 1 of 2 resumes with states[1] for torch, Python and NumPy (restoring states[0] on every rank gives all
    ranks rank 0's draws: the same dropout masks and augmentations on every rank after a resume)."""
    saved = get_rng_state()
    request.addfinalizer(lambda: set_rng_state(saved))  # Python's and NumPy's global streams as other tests left them
    states, draws = [], []
    for seed in (10, 11):  # rank r's state, and its next draws
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        states.append(get_rng_state())
        draws.append((torch.rand(3), random.random(), np.random.rand(3)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    torch.manual_seed(0)
    restore_rng_states(states)
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], draws[1][0]) and not torch.equal(got[0], draws[0][0])
    assert got[1] == draws[1][1] and got[1] != draws[0][1]
    assert np.array_equal(got[2], draws[1][2]) and not np.array_equal(got[2], draws[0][2])


def test_a_resumed_run_keeps_its_checkpoints_seed(caplog):
    """The seed orders every epoch's images (the sampler) and seeds the sample grids: a resume with another --seed
    would continue a mid-epoch position in another order. The checkpoint's seed wins, with a warning; a --seed that
    overrode it passed the suite."""
    with caplog.at_level(logging.WARNING, logger="utils.run.rng"):
        assert resolve_seed(5, {"args": {"seed": 3}}) == 3
    assert "--seed=5 ignored: resuming with the checkpoint's seed 3" in caplog.text
    assert resolve_seed(None, {"args": {"seed": 3}}) == 3 and resolve_seed(5, None) == 5
    assert resolve_seed(5, {"args": {}}) == 5  # a checkpoint without a recorded seed


def test_the_states_of_another_world_size_are_not_restored(monkeypatch, request, caplog):
    """A checkpoint of 4 ranks resumed on 2: rank r's stream of 4 is not rank r's of 2 (seed * world + rank), so no
    state is restored and the run says it is not bit-exact; restoring states[rank] whenever the list was long enough
    passed the suite."""
    saved = get_rng_state()
    request.addfinalizer(lambda: set_rng_state(saved))
    states = []
    for seed in (10, 11, 12, 13):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        states.append(get_rng_state())
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = get_rng_state()
    with caplog.at_level(logging.WARNING, logger="utils.run.rng"):
        restore_rng_states(states)
    assert torch.equal(torch.get_rng_state(), before["torch"]) and random.getstate() == before["python"]
    assert "RNG states of 4 ranks, this run has 2: not restoring them" in caplog.text


def test_a_drawn_seed_is_rank_0s_on_every_rank(monkeypatch):
    """Without --seed (and no checkpoint's) rank 0 draws one and every rank takes it (faked here: rank 1, whose
    broadcast brings rank 0's 1234): seeds drawn per rank would give each rank another initialisation and data
    order. A draw on each rank passed the suite."""
    monkeypatch.setattr(dist, "is_main_process", lambda: False)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: 1234)
    assert resolve_seed(None, None) == 1234 and resolve_seed(None, {"args": {}}) == 1234
