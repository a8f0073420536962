"""Loading M-VAR weights: official raw state dicts (derived buffers dropped), our checkpoints, clear errors."""
import fnmatch
import logging
import threading
from pathlib import Path

import pytest
import torch

from models import MVAR, MVARConfig
import hashlib

from models import loading
from models.loading import DERIVED_KEYS, CheckpointError, StateDictMismatchError, check_digest, \
    config_from_state_dict, file_digest, load_checkpoint, load_mvar, load_mvar_checkpoint, load_state_dict_checked, \
    mvar_checkpoint, uninitialized_parameters, vae_checkpoint, vae_from_state_dict, weights_digest, with_digest
from models.presets import ARCH_BRANCHES
from models.tokenizer import VQVAE

TINY = dict(depth=2, embed_dim=64, num_heads=2, V=64, Cvae=8, num_classes=10, d_state=16)


def official_style_state_dict(mvar: MVAR) -> dict:
    """What the official release saves: our weights plus the buffers it derives from the schedule."""
    sd = dict(mvar.state_dict())
    sd["lvl_1L"] = mvar.lvl_1L.clone()
    sd["attn_bias_for_masking"] = torch.zeros(1, 1, mvar.L, mvar.L)
    for i in range(mvar.depth):
        sd[f"blocks.{i}.attn.patch_nums"] = torch.tensor([pn * pn for pn in mvar.patch_nums], dtype=torch.int32)
    return sd


@pytest.mark.parametrize("arch", ["mvar", "var", "mamba"])
def test_official_raw_state_dict_loads_with_inferred_config(arch):
    torch.manual_seed(0)
    src = MVAR(MVARConfig(**TINY, arch=arch, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))).eval()
    loaded = load_mvar(official_style_state_dict(src), attn_backend="sdpa", mamba_backend="torch")
    assert loaded.config.arch == arch and loaded.config.depth == 2 and loaded.config.embed_dim == 64
    assert loaded.config.num_classes == 10 and loaded.L == 680
    assert loaded.config.num_heads == 2 or arch == "mamba"  # no attention: heads are not stored
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_var_blocks_mix_is_inferred_from_a_raw_state_dict():
    src = MVAR(MVARConfig(**{**TINY, "depth": 3}, var_blocks=2, patch_nums=(1, 2, 3)), attn_backend="sdpa",
               mamba_backend="torch").eval()  # the kernels `loaded` runs: the same computation, bit for bit
    loaded = load_mvar(src.state_dict(), patch_nums=(1, 2, 3), attn_backend="sdpa", mamba_backend="torch")
    assert (loaded.config.arch, loaded.config.var_blocks, loaded.config.d_state) == ("mvar", 2, 16)
    label_B, x = torch.tensor([1, 2]), torch.randn(2, src.L - 1, 8)
    assert torch.equal(loaded(label_B, x), src(label_B, x))


def test_our_checkpoint_roundtrip_through_a_file(tmp_path):
    torch.manual_seed(0)
    src = MVAR(MVARConfig(**TINY, patch_nums=(1, 2, 3))).eval()
    torch.save(mvar_checkpoint(src), tmp_path / "ckpt.pth")
    loaded = load_mvar(tmp_path / "ckpt.pth")
    label_B, x = torch.tensor([1, 2]), torch.randn(2, src.L - 1, 8)
    assert torch.equal(loaded(label_B, x), src(label_B, x))


@pytest.mark.parametrize("arch", sorted(ARCH_BRANCHES))
def test_a_loaded_model_skips_the_init_and_equals_its_source(arch):
    """load_mvar builds with `uninitialized_parameters` (a d30's init took 18 s of two cores): every parameter then
    comes from the file, so none may be a derived key the load leaves to the model, and the result is the source's
    weights, buffers, attributes and logits exactly."""
    torch.manual_seed(0)
    src = MVAR(MVARConfig(**TINY, arch=arch, patch_nums=(1, 2, 3)), attn_backend="sdpa",
               mamba_backend="torch").eval()
    src.init_weights()
    assert not [n for n, _ in src.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in DERIVED_KEYS)]
    loaded = load_mvar(mvar_checkpoint(src), attn_backend="sdpa", mamba_backend="torch")
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    own, theirs = dict(loaded.named_parameters()), dict(src.named_parameters())
    assert own.keys() == theirs.keys()
    for name, param in theirs.items():
        assert torch.equal(own[name], param) and own[name].dtype == param.dtype, name
        assert own[name].requires_grad and vars(own[name]) == vars(param), name  # e.g. Mamba2's _no_weight_decay
    for name, buf in src.named_buffers():  # the non-persistent ones (lvl_1L, drop path) are built, not loaded
        assert torch.equal(dict(loaded.named_buffers())[name], buf), name
    label_B, x = torch.tensor([1, 2]), torch.randn(2, src.L - 1, 8)
    assert torch.equal(loaded(label_B, x), src(label_B, x))


def test_uninitialized_parameters_runs_no_init_and_keeps_a_shared_parameter_shared():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 64)
            self.b = torch.nn.Linear(64, 64)
            self.b.weight = self.a.weight
            self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with uninitialized_parameters():
        tied = Tied()
        assert tied.a.weight.is_meta  # the init calls ran on meta tensors: no memory, no random draws
    assert torch.equal(torch.get_rng_state(), before)
    assert not any(p.is_meta for p in tied.parameters()) and tied.b.weight is tied.a.weight
    assert tied.a.weight.requires_grad and not tied.frozen.requires_grad and tied.frozen.dtype == torch.float32
    tied.load_state_dict({k: torch.full_like(v, 2.0) for k, v in tied.state_dict().items()})
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in tied.parameters())


def test_uninitialized_parameters_leaves_other_threads_alone():
    """The registration hook is process-wide: a model another thread builds meanwhile (the web app's jobs) keeps its
    initialisation."""
    built, entered, go = {}, threading.Event(), threading.Event()

    def other():
        entered.wait()
        built["meta"] = torch.nn.Linear(4, 4).weight.is_meta
        go.set()

    thread = threading.Thread(target=other)
    thread.start()
    with uninitialized_parameters():
        entered.set()
        go.wait(timeout=30)
    thread.join()
    assert built == {"meta": False}


def test_a_loaded_tokenizer_equals_its_source():
    torch.manual_seed(0)
    src = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4), test_mode=True)
    stored = vae_checkpoint(src)
    loaded = vae_from_state_dict(stored["vae_config"], stored["vae"], "a test tokenizer")
    for (name, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    img = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.img_to_idxBl(img)[-1], src.img_to_idxBl(img)[-1])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_a_training_checkpoint_is_memory_mapped_so_the_ranks_of_a_node_share_it(tmp_path):
    """sample.py's FID dump on 8 ranks read a training checkpoint (weights plus AdamW states: 34 GB at d30) whole
    on every rank; mapped, the ranks share the page cache."""
    torch.manual_seed(0)
    src = MVAR(MVARConfig(**TINY, patch_nums=(1, 2, 3)))
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({**mvar_checkpoint(src), "optimizer": {"state": {0: torch.zeros(64, 64)}}}, path)
    ckpt = load_mvar_checkpoint(path, "--ckpt")
    assert str(path) in Path("/proc/self/maps").read_text() and "optimizer" not in ckpt
    assert all(torch.equal(ckpt["model"][k], v) for k, v in src.state_dict().items())


def test_kernel_backends_are_not_taken_from_a_checkpoint(tmp_path, monkeypatch):
    """Kernels are a run-time choice: checkpoints do not hold them (older ones that do still load, their choice
    ignored); a load runs "auto" (then $MVAR_ATTN_BACKEND) unless told, and explicit choices win."""
    src = MVAR(MVARConfig(**TINY, patch_nums=(1, 2, 3)), attn_backend="sdpa", mamba_backend="torch").eval()
    ckpt = mvar_checkpoint(src)
    assert not {"attn_backend", "mamba_backend"} & set(ckpt["config"])
    ckpt["config"].update(attn_backend="sdpa", mamba_backend="torch")  # as checkpoints were written before
    torch.save(ckpt, tmp_path / "ckpt.pth")
    loaded = load_mvar(tmp_path / "ckpt.pth")
    assert (loaded.attn_backend, loaded.mamba_backend) == ("auto", "auto")
    assert {b.mamba.backend for b in loaded.blocks} == {"auto"}
    forced = load_mvar(tmp_path / "ckpt.pth", attn_backend="sdpa", mamba_backend="torch")
    assert (forced.attn_backend, forced.mamba_backend) == ("sdpa", "torch")
    assert {b.attn.backend for b in forced.blocks} == {"sdpa"}
    with pytest.raises(TypeError, match="bogus"):  # only the old kernel keys are dropped
        MVARConfig.from_dict({**ckpt["config"], "bogus": 1})
    monkeypatch.setenv("MVAR_ATTN_BACKEND", "flash_attn")  # "auto" defers to the environment, which is checked
    with pytest.raises(ValueError, match="flash"):
        loaded(torch.tensor([1]), torch.randn(1, src.L - 1, 8))


def test_set_backends_switches_every_block_and_keeps_the_logits():
    torch.manual_seed(0)
    mvar = MVAR(MVARConfig(**TINY, patch_nums=(1, 2, 3))).eval()
    label, x = torch.tensor([1, 2]), torch.randn(2, mvar.L - 1, 8)
    before = mvar(label, x)  # "auto": cpu_fused's C kernels where they build
    mvar.set_backends(attn_backend="sdpa", mamba_backend="torch")
    assert {(b.attn.backend, b.mamba.backend) for b in mvar.blocks} == {("sdpa", "torch")}
    after = mvar(label, x)
    assert {b.mamba.active_backend for b in mvar.blocks} == {"torch"}
    # another Mamba2 kernel on the same weights: equal up to float32 rounding (tests/test_mamba2_cpu.py's bound)
    torch.testing.assert_close(after, before, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="attn_backend='xformers': expected one of"):
        mvar.set_backends(attn_backend="xformers")


def test_mismatched_checkpoint_names_the_first_bad_keys():
    sd = MVAR(MVARConfig(**TINY, patch_nums=(1, 2, 3))).state_dict()
    ckpt = {"config": {**TINY, "patch_nums": (1, 2, 3), "embed_dim": 128}, "model": sd}
    with pytest.raises(RuntimeError, match=r"shape mismatch.*pos_start"):
        load_mvar(ckpt)
    del sd["blocks.1.ffn.fc1.weight"]
    with pytest.raises(RuntimeError, match=r"missing key.*blocks\.1\.ffn\.fc1\.weight"):
        load_mvar({"config": {**TINY, "patch_nums": (1, 2, 3)}, "model": sd})


def test_a_narrow_model_without_attention_loads_from_its_raw_state_dict():
    """A review: without attention's scale_mul the head count was guessed as C // 64, 0 below C = 64: a
    ZeroDivisionError traceback for a small Mamba-only model."""
    sd = MVAR(MVARConfig(**{**TINY, "embed_dim": 32, "num_heads": 1}, arch="mamba", patch_nums=(1, 2, 3))).state_dict()
    config = config_from_state_dict(sd, patch_nums=(1, 2, 3))
    assert (config.arch, config.embed_dim, config.num_heads) == ("mamba", 32, 1)


def test_a_head_count_nothing_records_is_said_to_be_assumed(caplog):
    """A review: without attn_l2_norm's scale_mul, weights of 4 heads of 32 loaded as 2 of 64 without a word (logits
    1e-4 apart); official VAR and M-VAR files record it (l2 norm on), and an override silences the warning."""
    config = MVARConfig(**{**TINY, "embed_dim": 128, "num_heads": 4}, attn_l2_norm=False, patch_nums=(1, 2, 3))
    sd = MVAR(config).state_dict()
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        assert config_from_state_dict(sd, patch_nums=(1, 2, 3)).num_heads == 2
    assert "record no attention head count: assumed 2" in caplog.text
    caplog.clear()
    mix = MVARConfig(**{**TINY, "embed_dim": 128, "num_heads": 4}, arch="mamba", var_blocks=1, attn_l2_norm=False,
                     patch_nums=(1, 2, 3))  # its attention is in the leading VAR block only: was assumed unsaid
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        assert config_from_state_dict(MVAR(mix).state_dict(), patch_nums=(1, 2, 3)).num_heads == 2
    assert "record no attention head count: assumed 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        assert config_from_state_dict(sd, patch_nums=(1, 2, 3), num_heads=4).num_heads == 4
        assert config_from_state_dict(MVAR(MVARConfig(**{**TINY, "embed_dim": 128, "num_heads": 4}, patch_nums=(
            1, 2, 3))).state_dict(), patch_nums=(1, 2, 3)).num_heads == 4
    assert "head count" not in caplog.text


def test_unknown_schedule_and_garbage_files_are_clear_errors(tmp_path):
    sd = MVAR(MVARConfig(**TINY, patch_nums=(1, 2, 3))).state_dict()
    with pytest.raises(ValueError, match="--pn"):
        config_from_state_dict(sd)
    assert config_from_state_dict(sd, patch_nums=(1, 2, 3)).patch_nums == (1, 2, 3)
    official = {**sd, "blocks.0.attn.patch_nums": torch.tensor([1, 4, 9], dtype=torch.int32)}
    assert config_from_state_dict(official).patch_nums == (1, 2, 3)  # read off the official buffer
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pth"):
        load_mvar(bad)


def test_a_checkpoint_that_cannot_be_mapped_is_read_whole(tmp_path, monkeypatch):
    """Some FUSE and object-store mounts refuse private maps: such a checkpoint is read whole, not "unreadable"."""
    torch.save({"w": torch.ones(3)}, tmp_path / "ckpt.pth")
    real_load = torch.load

    def no_maps(*args, mmap=None, **kwargs):
        if mmap:
            raise RuntimeError("mmap: operation not supported")
        return real_load(*args, mmap=mmap, **kwargs)

    monkeypatch.setattr(torch, "load", no_maps)
    assert torch.equal(load_checkpoint(tmp_path / "ckpt.pth")["w"], torch.ones(3))


def test_unexpected_and_reshaped_keys_are_refused_not_loaded_around():
    """A depth-3 file in a depth-2 model, or a transposed weight of the same size, loaded silently (strict=False
    skipped the extra blocks) or as torch's bare size error naming no file; both are mismatches named here."""
    torch.manual_seed(0)
    model = MVAR(MVARConfig(**TINY, patch_nums=(1, 2, 3)))
    sd = dict(MVAR(MVARConfig(**{**TINY, "depth": 3}, patch_nums=(1, 2, 3))).state_dict())
    with pytest.raises(StateDictMismatchError, match=r"f\.pth does not match the model: \d+ unexpected key\(s\): "
                                                     r"blocks\.2\."):
        load_state_dict_checked(model, sd, what="f.pth")
    sd = dict(model.state_dict())
    sd["word_embed.weight"] = sd["word_embed.weight"].t().contiguous()  # (C, Cvae) as (Cvae, C): the same numel
    with pytest.raises(StateDictMismatchError, match=r"1 shape mismatch\(es\): word_embed\.weight: file \(8, 64\) "
                                                     r"vs model \(64, 8\)"):
        load_state_dict_checked(model, sd)


def test_a_mismatch_counts_what_it_does_not_list_and_hints_at_a_wrapper_only_for_a_wrapped_file():
    """The "(+N more)" count, and the DDP/compile hint: given only when every unexpected key carries the prefix (a
    stray "module." key beside other strays is no wrapped file)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    sd = model.state_dict()
    with pytest.raises(StateDictMismatchError, match=r"4 missing key\(s\): 0\.weight, \.\.\. \(\+3 more\)\."):
        load_state_dict_checked(model, {}, max_listed=1)
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    with pytest.raises(StateDictMismatchError, match=r"start with 'module\.': it was saved from a DDP/compiled"):
        load_state_dict_checked(model, wrapped)
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_checked(model, {**sd, "module.extra": torch.zeros(1), "extra": torch.zeros(1)})
    assert str(err.value).endswith("2 unexpected key(s): module.extra, extra.")


@pytest.mark.parametrize("digest", [weights_digest, file_digest])
def test_the_digest_covers_names_dtypes_shapes_and_every_byte(digest, monkeypatch):
    """A digest blind to names passes two same-shaped tensors swapped between keys; blind to dtype, the same bytes
    read as another type; the order the keys come in does not matter (safetensors returns them sorted). file_digest
    in pieces of 4 bytes: the nudged float is in a tensor's last piece."""
    monkeypatch.setattr(loading, "FILE_DIGEST_CHUNK", 4)
    a, b = torch.arange(4.0), torch.arange(4.0) + 10
    recorded = digest({"x": a, "y": b})
    assert digest({"y": b.clone(), "x": a.clone()}) == recorded
    nudged = b.clone()
    nudged[3] = torch.nextafter(nudged[3], torch.tensor(float("inf")))
    for other in ({"x": b, "y": a}, {"x": a, "z": b}, {"x": a.view(torch.int32), "y": b}, {"x": a.view(2, 2), "y": b},
                  {"x": a, "y": nudged}, {"x": a, "y": b.flip(0)}):
        assert digest(other) != recorded, other
    with pytest.raises(CheckpointError, match=r"w\.pth is damaged"):
        check_digest({"x": b, "y": a}, recorded, "w.pth")


def test_the_digests_values_never_change():
    """Files and run records hold these digests: a changed definition would call every earlier file damaged (a
    file_digest) or every earlier tokenizer, token cache and FID dump another one (weights_digest)."""
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, -2], dtype=torch.int64)}
    assert weights_digest(state) == "f1a288fa668a562b3aff6d326aa4e45a"
    assert file_digest(state) == "b2tree:85acd732895d3e729f2a6e0ae0245a6d"


def test_file_digest_hashes_the_pieces_digests_in_order_whatever_the_threads(monkeypatch):
    """file_digest = BLAKE2b over each tensor's header, then the 128-bit BLAKE2b of each FILE_DIGEST_CHUNK piece of
    its bytes, in order; the same value on one thread or several."""
    monkeypatch.setattr(loading, "FILE_DIGEST_CHUNK", 8)
    t = torch.arange(5.0)  # 20 bytes: pieces of 8, 8 and 4
    data = t.numpy().tobytes()
    h = hashlib.blake2b(digest_size=16)
    h.update(b"t:torch.float32:(5,);")
    for i in range(0, 20, 8):
        h.update(hashlib.blake2b(data[i:i + 8], digest_size=16).digest())
    expected = "b2tree:" + h.hexdigest()
    for threads in (1, 3):
        monkeypatch.setattr(loading, "hash_threads", lambda threads=threads: threads)
        assert file_digest({"t": t}) == expected


def test_file_digest_hashes_pieces_on_several_threads(monkeypatch):
    """The pieces of one tensor are hashed concurrently: each of the first two waits for the other at a barrier,
    which times out (BrokenBarrierError) when they run one after another."""
    monkeypatch.setattr(loading, "FILE_DIGEST_CHUNK", 8)
    monkeypatch.setattr(loading, "hash_threads", lambda: 2)
    barrier, real = threading.Barrier(2, timeout=10), loading._piece_digest
    monkeypatch.setattr(loading, "_piece_digest", lambda piece: barrier.wait() is None or real(piece))
    file_digest({"t": torch.arange(4.0)})  # two pieces


def test_a_file_verifies_under_either_digest(tmp_path):
    """Checkpoints record a file_digest (with_digest); those written before it recorded a weights_digest, and both
    verify: a damaged tensor is an error under each."""
    state = {"model": {"w": torch.arange(6.0)}, "step": 3}
    assert with_digest(state)[loading.DIGEST_KEY] == file_digest(state)
    for recorded in (file_digest(state), weights_digest(state)):
        torch.save({**state, loading.DIGEST_KEY: recorded}, tmp_path / "c.pth")
        assert load_checkpoint(tmp_path / "c.pth")["step"] == 3
        damaged = {"model": {"w": torch.arange(6.0) + 1}, "step": 3, loading.DIGEST_KEY: recorded}
        torch.save(damaged, tmp_path / "d.pth")
        with pytest.raises(CheckpointError, match="d.pth is damaged"):
            load_checkpoint(tmp_path / "d.pth")


def test_a_var_plus_mamba_mix_is_inferred_from_a_raw_state_dict():
    """The mix's leading VAR block holds attention: asking block 0 for it read a VAR + Mamba mix as `mvar`."""
    src = MVAR(MVARConfig(**TINY, arch="mamba", var_blocks=1, patch_nums=(1, 2, 3)))
    config = config_from_state_dict(src.state_dict(), patch_nums=(1, 2, 3))
    assert (config.arch, config.var_blocks) == ("mamba", 1)


def test_intra_is_refused_for_weights_that_hold_mamba():
    """`--arch intra` names VAR's ambiguous keys only: on M-VAR weights it was accepted, then strict loading blamed
    the file's Mamba2 keys instead of the flag."""
    sd = MVAR(MVARConfig(**TINY, patch_nums=(1, 2, 3))).state_dict()
    with pytest.raises(ValueError, match="arch=intra was asked for .* weights hold attention and Mamba2: arch=mvar"):
        config_from_state_dict(sd, patch_nums=(1, 2, 3), arch="intra")


@pytest.mark.parametrize("fields", [dict(shared_aln=True), dict(attn_l2_norm=False),
                                    dict(arch="var", shared_aln=True, d_state=64),  # no Mamba2: d_state unread
                                    dict(arch="mamba", var_blocks=1), dict(var_blocks=1, d_state=8)])
def test_a_raw_state_dict_gives_back_the_config_it_was_built_with(fields):
    """Every field the tensor shapes decide is read back as the source's: shared_aln (the shared adaLN's weights) and
    attn_l2_norm (scale_mul present) were never varied, so reading either as its default passed the suite."""
    config = MVARConfig(**{**TINY, **fields}, patch_nums=(1, 2, 3))
    heads = {} if config.attn_l2_norm else {"num_heads": config.num_heads}  # nothing records it without the l2 norm
    assert config_from_state_dict(MVAR(config).state_dict(), patch_nums=(1, 2, 3), **heads) == config
