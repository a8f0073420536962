"""models.backends: one resolver, one error type and one flag spelling for the attention and Mamba2 kernels."""
import logging

import pytest
import torch

import sample
from models import backends
from models.attention import intra_scale_attention
from models.backends import ATTN, MAMBA, BackendError
from models.mamba2 import Mamba2
from utils.flags import parse_args as parse_train_args


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for op in (ATTN, MAMBA):
        monkeypatch.delenv(op.env, raising=False)
    backends._log_once.cache_clear()


def test_train_flags_fuse_is_vars_alias_and_explicit_backends_win():
    def chosen(*flags):
        a = parse_train_args(list(flags))
        return backends.from_flags(a.attn_backend, a.mamba_backend, fuse=a.fuse)
    assert chosen() == ("auto", "auto")
    assert chosen("--fuse=0") == ("sdpa", "torch")
    assert chosen("--fuse=0", "--mamba_backend=mamba_ssm") == ("sdpa", "mamba_ssm")
    assert chosen("--attn_backend=torch_varlen") == ("torch_varlen", "auto")
    with pytest.raises(SystemExit):
        parse_train_args(["--attn_backend=xformers"])


def test_every_cli_spells_the_flags_alike():
    from utils.flags import build_parser as train_parser
    for parser in (train_parser(), sample.build_parser()):
        for flag, op in (("--attn_backend", ATTN), ("--mamba_backend", MAMBA)):
            assert parser._option_string_actions[flag].choices == op.choices


def test_both_ops_fail_with_one_error_type_naming_the_source(monkeypatch):
    q = torch.randn(1, 5, 1, 8)
    with pytest.raises(BackendError, match="attn_backend='flash_attn' cannot run here: .*needs CUDA.* 'sdpa'"):
        intra_scale_attention(q, q, q, (1, 4), 1.0, backend="flash_attn")
    m = Mamba2(32, d_state=16, headdim=8, backend="mamba_ssm")
    with pytest.raises(BackendError, match="mamba_backend='mamba_ssm' cannot run here: .* 'torch'"):
        m(torch.randn(1, 5, 32))
    monkeypatch.setenv(MAMBA.env, "cuda")
    with pytest.raises(BackendError, match="MVAR_MAMBA_BACKEND='cuda': expected one of"):
        Mamba2(32, d_state=16, headdim=8)(torch.randn(1, 5, 32))
    with pytest.raises(BackendError, match="attn_backend='xformers': expected one of"):
        backends.check_name(ATTN, "xformers")


def test_resolution_prefers_kernels_in_order_and_logs_each_outcome_once(caplog):
    why_not = {"flash_attn": "no flash here", "torch_varlen": None}
    with caplog.at_level(logging.INFO, logger=backends.__name__):
        for _ in range(3):
            assert backends.resolve(ATTN, "auto", why_not.get, "cuda, torch.bfloat16") == "torch_varlen"
        assert backends.resolve(ATTN, "sdpa", why_not.get, "cuda, torch.bfloat16") == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "intra-scale attention backend: torch_varlen (requested auto; cuda, torch.bfloat16; not flash_attn: no "
        "flash here)",
        "intra-scale attention backend: sdpa (requested attn_backend=sdpa; cuda, torch.bfloat16)"]


def test_env_var_decides_auto_only(monkeypatch):
    monkeypatch.setenv(ATTN.env, "sdpa")
    assert backends.requested(ATTN, "auto") == ("sdpa", ATTN.env)
    assert backends.requested(ATTN, "flash_attn") == ("flash_attn", "attn_backend")


def test_a_torch_feature_missing_from_this_torch_is_reported_with_its_release_and_user(monkeypatch):
    """On a torch without varlen_attn (older than 2.9), or whose varlen_attn has no `scale` (older than 2.10), the
    features are unavailable and missing() names the torch, the feature, its release and what needs it. Reporting
    a missing attribute or keyword as available, or a wrong release in the message, passed the suite."""
    from models import torch_features as tf
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    tf.available.cache_clear()
    try:
        monkeypatch.setattr(varlen, "varlen_attn", lambda q, k, v: q)  # a 2.9 signature: no `scale`
        assert tf.available("varlen_attn") and not tf.available("varlen_attn_scale")
        monkeypatch.delattr(varlen, "varlen_attn")
        tf.available.cache_clear()
        assert not tf.available("varlen_attn")
        assert tf.missing("varlen_attn") == (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn "
                                             "(added in torch 2.9; needed by --attn_backend=torch_varlen)")
    finally:
        monkeypatch.undo()
        tf.available.cache_clear()


def test_the_feature_table_says_yes_exactly_where_the_feature_is_available(monkeypatch):
    """The GPU check prints `torch_features.table()`: one row per feature with its release, its user and whether
    this torch has it. Swapping "yes" and "no" (mutant) passed the suite."""
    from models import torch_features as tf
    monkeypatch.setattr(tf, "available", lambda key: key == "fully_shard")
    rows = {row[0]: row for row in tf.table()}
    assert list(rows) == [f.name for f in tf.FEATURES.values()]
    assert rows["torch.distributed.fsdp.fully_shard"] == ["torch.distributed.fsdp.fully_shard", "2.6",
                                                          "train.py --fsdp=1 (FSDP2)", "yes"]
    assert rows["torch.nn.attention.varlen.varlen_attn"] == ["torch.nn.attention.varlen.varlen_attn", "2.9",
                                                             "--attn_backend=torch_varlen", "no"]
