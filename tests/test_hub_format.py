"""The Hub format (models/hub_format.py, scripts/export.py): safetensors round trips without pickle, a fake offline Hub
cache, official-layout .pth -> folder with bit-identical logits, sample.py --ckpt on folders and repo ids."""
import dataclasses
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
from models.hub_format import MVARHF, VQVAEHF, HubSource, TokenizerMismatchError, check_own_tokenizer, is_hub_source, \
    model_card_text, model_file_tokenizer, model_folder, read_config, read_model_weights, training_data
from conftest import damage_tensor_data
from models.loading import DERIVED_KEYS, VAR_REPO, CheckpointError, load_checkpoint, load_mvar, \
    load_state_dict_checked, mvar_checkpoint, vae_checkpoint, weights_digest
from scripts import export
import test_hub
from test_hub import put_in_hf_cache
from test_loading import official_style_state_dict
from test_mvar import build_tiny, teacher_input
from utils.run import checkpoint

REPO = "someone/mvar-tiny"
offline_cache = test_hub.offline_cache  # the fixture: HF_HUB_OFFLINE=1, an empty hub cache under tmp_path


def hub_model(arch="mvar"):
    vae, mvar = build_tiny(arch)
    return load_mvar(mvar_checkpoint(mvar, vae), vae=vae, model_cls=MVARHF), vae


def assert_same_model(a, b):
    label_B, _, x_BLCv = teacher_input(a.vae, a)
    assert torch.equal(a(label_B, x_BLCv), b(label_B, x_BLCv))
    for k, v in a.vae.state_dict().items():
        assert torch.equal(v, b.vae.state_dict()[k]), k
    assert torch.equal(a.autoregressive_infer_cfg(2, 3, g_seed=1, top_k=5),
                       b.autoregressive_infer_cfg(2, 3, g_seed=1, top_k=5))


@pytest.fixture
def no_pickle(monkeypatch):
    """Loading must not unpickle anything (safetensors only)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refuse)


@pytest.mark.parametrize("arch", ["mvar", "var", "var1+mvar"])
def test_save_load_round_trip_is_exact_and_unpickled(tmp_path, arch, no_pickle):
    mvar, _ = hub_model(arch)
    mvar.save_pretrained(tmp_path / "m")
    files = sorted(str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "model.safetensors", "tokenizer/config.json",
                     "tokenizer/model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["arch"] == mvar.config.arch and "attn_backend" not in config  # kernels are picked at load
    loaded = MVARHF.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, MVARHF) and isinstance(loaded.vae, VQVAEHF) and not loaded.training
    assert_same_model(mvar.eval(), loaded)


def test_a_folders_model_safetensors_names_its_folder(tmp_path):
    """`--ckpt m/model.safetensors` loads the folder m (its config.json and tokenizer beside it); a .safetensors file
    outside a model folder is an error saying what to pass, not "unreadable"."""
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    assert is_hub_source(weights) and HubSource(weights).folder == tmp_path / "m"
    assert_same_model(mvar.eval(), MVARHF.from_pretrained(weights))
    out = sample.main(["--ckpt", str(weights), "--device", "cpu", "--classes", "1", "--num_per_class", "1",
                       "--out", str(tmp_path / "one.png")])
    assert Image.open(out).size == (8, 8)
    args = sample.parse_args(["--ckpt", str(weights), "--device", "cpu"])
    _, source, _ = sample.open_model(args, torch.device("cpu"))
    assert source == tmp_path / "m"  # what the app reads class names from and FID dumps are named after
    from scripts.app import class_names
    assert class_names(source, mvar) is None  # a folder: no training record (was: a crash on the file)
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match="safetensors file of the Hub format: pass the model folder"):
        load_checkpoint(loose)
    alone = tmp_path / "alone" / "model.safetensors"  # its name, but no config.json beside it: no model folder (a
    alone.parent.mkdir()  # review of the mutants: one without the config.json check passed the suite)
    alone.write_bytes(weights.read_bytes())
    assert model_folder(alone) is None and not is_hub_source(alone)
    with pytest.raises(CheckpointError, match="safetensors file of the Hub format: pass the model folder"):
        load_checkpoint(alone)


def test_a_save_without_a_tokenizer_leaves_no_earlier_tokenizer_behind(tmp_path):
    """A review: saving a model with no tokenizer attached into a folder that held another's left that tokenizer/,
    and from_pretrained paired it with the new weights unchecked (no tokenizer digest recorded)."""
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer" / "model.safetensors").is_file()
    bare = MVARHF(mvar.config)
    bare.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "tokenizer").exists()
    with pytest.raises(FileNotFoundError):
        MVARHF.from_pretrained(tmp_path / "m")
    assert MVARHF.from_pretrained(tmp_path / "m", vae=mvar.vae).class_names is None


def test_the_tokenizer_is_built_at_the_models_schedule_whatever_its_folder_records(tmp_path):
    """A tokenizer's weights serve any patch schedule: tokenizer/ saved at another one (VQVAEHF.save_pretrained of
    a tokenizer loaded at its default, put beside a model of another schedule) is built at the model's. A review of
    the mutants: from_pretrained without v_patch_nums passed the suite (a folder always records the model's)."""
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "tokenizer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "v_patch_nums": [1, 2, 4]}))
    loaded = MVARHF.from_pretrained(tmp_path / "m")
    assert tuple(loaded.vae.quantize.v_patch_nums) == tuple(mvar.patch_nums) == (1, 2, 3, 4)
    assert_same_model(mvar.eval(), loaded)


def test_strict_loading_names_the_bad_keys(tmp_path):
    """An export of before the config was recorded in the weights' metadata, its config.json edited: the strict
    load names the missing keys."""
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "config"}
    save_file(load_file(weights), weights, metadata=metadata)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(RuntimeError, match=r"model\.safetensors.*missing key.*blocks\.2"):
        MVARHF.from_pretrained(tmp_path / "m")


def test_a_config_json_that_is_not_the_weights_own_is_refused(tmp_path):
    """A review: nothing tied config.json to model.safetensors, so a VAR export whose config said "intra" (same
    keys: a hand edit, a half-written overwrite, a Hub commit of the config alone) loaded as another model and
    sampled other images. The weights' metadata records the config they were saved with."""
    mvar, _ = hub_model("var")
    mvar.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "arch": "intra"}))
    with pytest.raises(CheckpointError, match=r"config\.json is not the config .*model\.safetensors was saved with"):
        MVARHF.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer/model.safetensors"])
def test_damaged_weights_are_an_error_naming_the_file_and_files_without_a_digest_load(tmp_path, damaged):
    """64 flipped bytes inside the tensor data: safetensors loads them, the digest in the metadata does not match;
    a file written without a digest (an older export) still loads."""
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    damage_tensor_data(tmp_path / "m" / damaged)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'm' / damaged} is damaged"):
        MVARHF.from_pretrained(tmp_path / "m")
    mvar.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / damaged
    save_file(load_file(path), path, metadata={"format": "pt"})
    assert_same_model(mvar.eval(), MVARHF.from_pretrained(tmp_path / "old"))


def put_folder_in_cache(folder, cache, repo_id):
    for path in folder.rglob("*"):
        if path.is_file():
            put_in_hf_cache(cache, repo_id, str(path.relative_to(folder)), path.read_bytes())


def test_repo_id_loads_offline_from_the_hub_cache(tmp_path, offline_cache):
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    put_folder_in_cache(tmp_path / "m", offline_cache, REPO)
    assert is_hub_source(REPO) and not is_hub_source("someone/missing.pth")
    assert_same_model(mvar.eval(), MVARHF.from_pretrained(REPO))

    flags = ["--device", "cpu", "--classes", "1", "2", "--num_per_class", "2", "--top_k", "5", "--seed", "3"]
    from_repo = sample.main(["--ckpt", REPO, *flags, "--out", str(tmp_path / "repo.png")])
    from_folder = sample.main(["--ckpt", str(tmp_path / "m"), *flags, "--out", str(tmp_path / "folder.png")])
    assert from_repo.read_bytes() == from_folder.read_bytes()
    npz = sample.main(["--ckpt", REPO, "--device", "cpu", "--fid", "--fid_num_per_class", "1", "--top_k", "5",
                       "--fid_dir", str(tmp_path / "fid")])
    assert json.loads(npz.with_suffix(".json").read_text())["ckpt_path"] == REPO  # not a path under the cwd


def test_nothing_found_names_the_repo_and_the_cache(offline_cache):
    with pytest.raises(FileNotFoundError) as err:
        MVARHF.from_pretrained(REPO)
    msg = str(err.value)
    assert REPO in msg and str(offline_cache) in msg and "HF_HUB_OFFLINE" in msg and f"hf download {REPO}" in msg
    with pytest.raises(SystemExit, match=rf"--ckpt={REPO}: no such local folder.*{offline_cache}"):
        sample.main(["--ckpt", REPO, "--device", "cpu", "--classes", "1"])


def test_a_repo_is_read_from_one_commit_when_its_branch_moves_meanwhile(tmp_path, offline_cache, monkeypatch):
    """Each file was looked up at `main` on its own: a repo updated between two of them (or a cache whose refs/main
    moved on after an interrupted download) gave one commit's config with another commit's weights."""
    import huggingface_hub

    old, _ = hub_model()
    old.save_pretrained(tmp_path / "old")
    put_folder_in_cache(tmp_path / "old", offline_cache, REPO)
    new, _ = hub_model()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    repo_dir = offline_cache / f"models--{REPO.replace('/', '--')}"
    new.save_pretrained(repo_dir / "snapshots" / ("f" * 40))
    real_download = huggingface_hub.hf_hub_download

    def main_moves_after_the_first_file(*args, **kwargs):
        path = real_download(*args, **kwargs)
        (repo_dir / "refs" / "main").write_text("f" * 40)
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", main_moves_after_the_first_file)
    assert_same_model(old.eval(), MVARHF.from_pretrained(REPO))


def test_from_pretrained_takes_huggingface_hubs_revision_token_and_local_files_only(tmp_path, offline_cache,
                                                                                     monkeypatch):
    """They reached MVARConfig as unknown fields (a TypeError), so a repo could not be pinned to a commit."""
    import huggingface_hub

    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    put_folder_in_cache(tmp_path / "m", offline_cache, REPO)
    commit = "0123456789abcdef0123456789abcdef01234567"  # put_in_hf_cache's snapshot
    assert_same_model(mvar.eval(), MVARHF.from_pretrained(REPO, revision=commit, token=None, local_files_only=True))
    with pytest.raises(FileNotFoundError, match="LocalEntryNotFoundError"):  # the cause is kept in the message
        MVARHF.from_pretrained(REPO, revision="f" * 40)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, but local_files_only: no download is tried
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls, cache_only = [], huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(k) or cache_only(*a, **k))
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        MVARHF.from_pretrained("someone/elsewhere", local_files_only=True)
    assert calls and all(k["local_files_only"] for k in calls)


def test_the_official_repo_id_as_ckpt_points_at_depth(offline_cache):
    with pytest.raises(SystemExit, match="OliverRen/M-VAR: that repo holds the official .pth files, not a Hub-format "
                                         "folder: pass --depth=N"):
        sample.main(["--ckpt", "OliverRen/M-VAR", "--device", "cpu", "--classes", "1"])


def test_official_pth_exports_to_a_folder_with_identical_logits(tmp_path, offline_cache):
    _, mvar = build_tiny()
    torch.save(official_style_state_dict(mvar), tmp_path / "d2.pth")  # what OliverRen/M-VAR ships: raw tensors
    vae, _ = build_tiny()
    # a tiny tokenizer needs its config beside it (VAR's raw vae_ch160v4096z32.pth is read with VQVAE defaults)
    torch.save(vae_checkpoint(vae), tmp_path / "vae.pth")
    out = export.main(["--ckpt", str(tmp_path / "d2.pth"), "--vae_ckpt", str(tmp_path / "vae.pth"),
                       "--out", str(tmp_path / "hub"), "--repo_id", REPO, "--metric", "FID=9.99"])
    from_pth = load_mvar(tmp_path / "d2.pth", vae=vae)
    assert_same_model(from_pth, MVARHF.from_pretrained(out))
    card = (out / "README.md").read_text()
    n_params = sum(p.numel() for p in mvar.parameters()) / 1e6
    for text in ("`mvar`, depth 2, width 64, 2 heads", f"{n_params:.2f}M", "ImageNet-1k", "| FID | 9.99 |",
                 f"python sample.py --ckpt {REPO} --classes", "`d2.pth`"):
        assert text in card, text


def test_export_takes_the_arch_of_an_official_file(tmp_path, offline_cache):
    """export.py --arch accepted intra only, so VAR's official var_d{N}.pth could not be picked by --depth as
    sample.py picks it, and --arch could not state what an official file must hold."""
    vae, var = build_tiny("var")
    official = put_in_hf_cache(offline_cache, VAR_REPO, "var_d16.pth")
    torch.save(official_style_state_dict(var), official)
    torch.save(vae_checkpoint(vae), tmp_path / "vae.pth")
    tokenizer = ["--vae_ckpt", str(tmp_path / "vae.pth")]
    out = export.main(["--depth", "16", "--arch", "var", *tokenizer, "--out", str(tmp_path / "hub")])
    assert json.loads((out / "config.json").read_text())["arch"] == "var"
    with pytest.raises(SystemExit, match="arch=mamba was asked for .* but the weights hold attention"):
        export.main(["--ckpt", str(official), "--arch", "mamba", *tokenizer, "--out", str(tmp_path / "m")])
    # a review: without --arch the folder recorded arch=var for good, silently (the intra ablation has its keys;
    # sample.py warns when it reads such a file)
    with pytest.raises(SystemExit, match="var_d16.pth has attention and no Mamba: read as VAR .*: pass --arch, which "
                                         "the export records"):
        export.main(["--ckpt", str(official), *tokenizer, "--out", str(tmp_path / "v")])
    assert not (tmp_path / "v").exists()


def test_the_model_card_names_what_the_run_trained_on():
    """A run trained from a token cache (--data_path then gives its validation images only) was described by its
    --data_path, or as the embedded data set of --dataset when it had none."""
    run = {"ep": 8, "bs": 64}
    assert training_data({"args": {**run, "tokens": "/c", "data_path": "/imgs"}}).startswith("the token cache /c ")
    assert training_data({"args": {**run, "tokens": "", "data_path": "/im"}}) == "/im, 8 epochs, batch 64 (train.py)"


def test_our_checkpoint_exports_with_its_tokenizer_and_training_flags(tmp_path):
    """... and its class names (a review: the folder lost them, so the web app showed ids, or ImageNet's names for
    any 1,000-class model)."""
    from scripts.app import class_names

    vae, mvar = build_tiny("mamba")
    names = [f"digit{i}" for i in range(mvar.num_classes)]
    ckpt = {**mvar_checkpoint(mvar, vae), "args": {"data_path": "", "dataset": "mnist", "ep": 8, "bs": 64},
            "data": {"classes": names}}
    torch.save(ckpt, tmp_path / "ar-ckpt-best.pth")
    out = export.main(["--ckpt", str(tmp_path / "ar-ckpt-best.pth"), "--out", str(tmp_path / "hub")])
    loaded = MVARHF.from_pretrained(out)
    assert_same_model(load_mvar(tmp_path / "ar-ckpt-best.pth", vae=vae), loaded)
    assert loaded.class_names == names and class_names(out, loaded) == names
    assert "embedded `mnist` (utils/data/embedded.py), 8 epochs, batch 64" in (out / "README.md").read_text()
    # exporting again into the folder: refused, or with --overwrite a fresh card (a review: huggingface_hub kept the
    # first export's card beside the new weights)
    with pytest.raises(SystemExit, match="is not empty: pass --overwrite"):
        export.main(["--ckpt", str(tmp_path / "ar-ckpt-best.pth"), "--out", str(out), "--metric", "FID=3.5"])
    export.main(["--ckpt", str(tmp_path / "ar-ckpt-best.pth"), "--out", str(out), "--metric", "FID=3.5",
                 "--overwrite"])
    assert "3.5" in (out / "README.md").read_text()
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("ours")  # a folder that is no export is never overwritten
    for target, message in (("project", "holds no earlier export"), ("ar-ckpt-best.pth", "is a file")):
        with pytest.raises(SystemExit, match=message):
            export.main(["--ckpt", str(tmp_path / "ar-ckpt-best.pth"), "--out", str(tmp_path / target), "--overwrite"])
    assert (tmp_path / "project" / "README.md").read_text() == "ours"


@pytest.mark.parametrize("flags, message", [
    (["--depth=0"], r"--depth=0: expected a depth >= 1 \(the official OliverRen/M-VAR d\{N\}.pth; with --arch=var "
                    r"VAR's var_d\{16,20,24,30,36\}.pth\)"),
    (["--depth=-5"], "--depth=-5: expected a depth >= 1"),
    (["--depth=12", "--arch=var"], "VAR published no depth-12 weights"),
    (["--ckpt=CKPT", "--out=FILE/sub/hub"],
     r"--out=FILE/sub/hub: cannot write into FILE/sub/hub \(FILE is a file, not a folder\)"),
    (["--ckpt=CKPT", "--out="], "--out=: expected the folder to write"),
    (["--ckpt=CKPT", "--push"], "--push needs --repo_id=org/name"),  # these two: a review of the mutants
    (["--ckpt=CKPT", "--metric=FID=3.1", "--metric=FID"], r"--metric \['FID'\]: expected NAME=VALUE"),
])
def test_bad_flags_are_errors_before_the_hub_or_the_checkpoint_is_read(flags, message, tmp_path, monkeypatch):
    """A review: --depth=0 spent 28 s trying the Hub for d0.pth; an --out under a regular file was a FileExistsError
    traceback after the checkpoint was read."""
    monkeypatch.setattr(export, "read_model_file", lambda *a, **k: pytest.fail("checkpoint read before the check"))
    import models.loading

    monkeypatch.setattr(models.loading, "resolve_checkpoint", lambda *a, **k: pytest.fail("Hub tried"))
    (tmp_path / "file").write_text("")
    (tmp_path / "x.pth").write_text("")
    sub = {"CKPT": str(tmp_path / "x.pth"), "FILE": str(tmp_path / "file")}
    for key, value in sub.items():
        flags, message = [f.replace(key, value) for f in flags], message.replace(key, value)
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        export.main([*flags] + ([] if any(f.startswith("--out") for f in flags) else ["--out", str(tmp_path / "o")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "x.pth"]


def test_an_overwrite_that_fails_midway_leaves_the_earlier_export_whole(tmp_path, monkeypatch):
    """A review: --overwrite deleted the card and wrote straight into the folder, so a full disk between
    config.json and the weights left a new config beside old weights. Now the export is written beside the folder
    and moved in when complete. A file of ours without training flags has "not recorded" as its training data (it
    claimed the official ImageNet release)."""
    vae, mvar = build_tiny()
    torch.save(mvar_checkpoint(mvar, vae), tmp_path / "a.pth")
    out = export.main(["--ckpt", str(tmp_path / "a.pth"), "--out", str(tmp_path / "hub")])
    assert "| training data | not recorded |" in (out / "README.md").read_text()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    torch.manual_seed(1)
    _, other = build_tiny()
    torch.save(mvar_checkpoint(other, vae), tmp_path / "b.pth")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("models.hub_format.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export.main(["--ckpt", str(tmp_path / "b.pth"), "--out", str(out), "--overwrite"])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    assert_same_model(load_mvar(tmp_path / "a.pth", vae=vae), MVARHF.from_pretrained(out))


def test_the_export_is_written_beside_out_and_moved_in_weights_then_config_last(tmp_path, monkeypatch):
    """write_export saves into a temporary folder beside --out (the same file system: each move is an atomic rename)
    and moves model.safetensors, then config.json, last, so an interrupted overwrite never pairs a new config with
    old weights; an existing --out is probed for writing itself. A review of the mutants: the other order, a
    temporary folder elsewhere (the system's), and the probe of --out's parent instead passed the suite."""
    mvar, _ = hub_model()
    out = tmp_path / "exports" / "hub"
    out.mkdir(parents=True)
    probed, moved, replace = [], [], export.os.replace
    temporary_file = checkpoint.tempfile.TemporaryFile
    monkeypatch.setattr(checkpoint.tempfile, "TemporaryFile",
                        lambda dir: probed.append(Path(dir)) or temporary_file(dir=dir))
    for folder in (out, tmp_path / "new" / "hub"):
        checkpoint.check_writable(folder, "--out", create=False)  # export.py's check of --out
    assert probed == [out, tmp_path] and not (tmp_path / "new").exists()  # --out itself; else its nearest ancestor
    monkeypatch.setattr(export.os, "replace",
                        lambda src, dst: moved.append((Path(src), Path(dst))) or replace(src, dst))
    export.write_export(mvar, out, {})
    assert all(src.parent.parent == out.parent and src.parent.name.startswith(".hub.export-")
               for src, _ in moved if src.parent.name != "tokenizer")
    assert [str(dst.relative_to(out)) for _, dst in moved][-2:] == ["model.safetensors", "config.json"]
    assert sorted(str(dst.relative_to(out)) for _, dst in moved) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert [p.name for p in out.parent.iterdir()] == ["hub"]  # the temporary folder is gone


def test_our_checkpoint_refuses_arch_and_pn_and_a_metric_value_may_hold_an_equals_sign(tmp_path):
    """--arch and --pn describe official files; our checkpoint records its config, so they are refused rather than
    ignored. A metric is split at its first "=" only. A review of the mutants: both passed the suite."""
    vae, mvar = build_tiny()
    torch.save(mvar_checkpoint(mvar, vae), tmp_path / "ours.pth")
    for flag in ("--arch=var", "--pn=1_2_3_4"):
        with pytest.raises(SystemExit, match=r"^error: --arch/--pn are for official files; ours\.pth carries its own "
                                             r"config$"):
            export.main(["--ckpt", str(tmp_path / "ours.pth"), flag, "--out", str(tmp_path / "hub")])
    assert not (tmp_path / "hub").exists()
    out = export.main(["--ckpt", str(tmp_path / "ours.pth"), "--metric", "FID=3.1 (cfg=1.5)", "--out",
                       str(tmp_path / "hub")])
    assert "| FID | 3.1 (cfg=1.5) |" in (out / "README.md").read_text()


def test_an_overwrite_needs_both_files_of_an_earlier_export(tmp_path, monkeypatch):
    """--overwrite replaces an export: a folder with config.json alone (or model.safetensors alone) is no export
    of ours and is left as it is. Either file alone passed the check under a mutant (a review of the mutants)."""
    monkeypatch.setattr(export, "read_model_file", lambda *a, **k: pytest.fail("checkpoint read before the check"))
    (tmp_path / "x.pth").write_text("")
    for name in ("config.json", "model.safetensors"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text("mine")
        with pytest.raises(SystemExit, match=rf"^error: --out={folder} holds no earlier export \(config.json and "
                                             r"model.safetensors\)"):
            export.main(["--ckpt", str(tmp_path / "x.pth"), "--out", str(folder), "--overwrite"])
        assert (folder / name).read_text() == "mine"


def test_a_tokenizer_file_given_is_named_by_its_file_in_errors(tmp_path):
    """model_file_tokenizer names the tokenizer it returns: "embedded", "official" (VAR's, from the cache) or the
    --vae_ckpt file's name, which export.py's checks name (a review of the mutants: "official" for any file passed
    the suite)."""
    vae, mvar = build_tiny()
    torch.save(vae_checkpoint(vae), tmp_path / "my-vae.pth")
    ckpt = mvar_checkpoint(mvar, vae)
    config = mvar.config
    assert model_file_tokenizer(ckpt, tmp_path / "m.pth", config, None, False)[1] == "embedded"
    assert model_file_tokenizer(ckpt, tmp_path / "m.pth", config, str(tmp_path / "my-vae.pth"), False)[1] == \
        "my-vae.pth"
    bad = vae_checkpoint(vae)
    bad["vae"] = {k: v.clone() for k, v in bad["vae"].items()}
    bad["vae"]["post_quant_conv.weight"].fill_(float("nan"))
    torch.save(bad, tmp_path / "nan-vae.pth")
    torch.save(official_style_state_dict(mvar), tmp_path / "d2.pth")
    with pytest.raises(SystemExit, match=r"error: tokenizer \(nan-vae\.pth\) has non-finite weights"):
        export.main(["--ckpt", str(tmp_path / "d2.pth"), "--vae_ckpt", str(tmp_path / "nan-vae.pth"), "--out",
                     str(tmp_path / "hub")])


def test_the_model_card_gives_an_imagenet_models_fid_reference_and_at_most_four_classes():
    """The FID commands appear for 1000-class 256 or 512 px models only, each with its resolution's reference
    batch; the sampling command names at most four classes; a VAR/M-VAR hybrid names its VAR blocks. A review of
    the mutants: a 256 px reference for 512 px, FID commands for any classes, every class id listed, and the hybrid
    unsaid passed the suite (the tiny models have 8 px and few classes)."""
    def card(num_classes, reso, var_blocks=0):
        config = SimpleNamespace(arch="var1+mvar" if var_blocks else "mvar", var_blocks=var_blocks, depth=16,
                                 embed_dim=1024, num_heads=16, num_classes=num_classes, patch_nums=(1, 2, 4), V=4096,
                                 Cvae=32)
        mvar = SimpleNamespace(config=config, image_size=reso, vae_proxy=[object()], parameters=lambda: [])
        return model_card_text(mvar, repo_id="me/m", fid_sample="m.npz")

    assert "python scripts/fid.py --sample samples/m.npz --ref VIRTUAL_imagenet512.npz" in card(1000, 512)
    assert "python scripts/fid.py --sample samples/m.npz --ref VIRTUAL_imagenet256_labeled.npz" in card(1000, 256)
    assert "scripts/fid.py" not in card(10, 256) and "scripts/fid.py" not in card(1000, 64)
    assert "--classes 0 1 2 3 --num_per_class 4" in card(1000, 256) and "--classes 0 1 --num_per_class" in card(2, 8)
    assert "--box 0,256,512,512 --classes 0 --out edit.png" in card(1000, 512)
    assert "| architecture | `var1+mvar`, first 2 blocks VAR, depth 16" in card(10, 256, var_blocks=2)
    assert "| architecture | `mvar`, depth 16, width 1024, 16 heads |" in card(10, 256)


def test_export_refuses_non_finite_weights_and_writes_readable_files(tmp_path, monkeypatch):
    """Issue 23: a diverged checkpoint was exported (and would have been uploaded); safetensors wrote 0600 files."""
    monkeypatch.setattr(MVARHF, "push_to_hub", lambda *a, **k: pytest.fail("non-finite weights were uploaded"))
    vae, mvar = build_tiny()
    good, bad = mvar_checkpoint(mvar, vae), mvar_checkpoint(mvar, vae)
    bad["model"]["head.weight"] = bad["model"]["head.weight"].clone().fill_(float("inf"))
    torch.save(good, tmp_path / "good.pth")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match=r"error: M-VAR checkpoint .*bad.pth has non-finite weights .*head.weight"):
        export.main(["--ckpt", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "hub-bad"), "--repo_id", REPO,
                     "--push"])
    assert not (tmp_path / "hub-bad").exists()
    out = export.main(["--ckpt", str(tmp_path / "good.pth"), "--out", str(tmp_path / "hub")])
    for path in (p for p in out.rglob("*") if p.is_file()):
        assert path.stat().st_mode & 0o044 == 0o044, path  # group and others may read (umask 022)


def test_foreign_tokenizer_folder_is_refused_unless_allowed(tmp_path):
    """Issue 23: a Hub folder whose tokenizer/ was replaced by another of the same shape, or a --vae_ckpt other than
    the checkpoint's own tokenizer given to scripts/export.py."""
    mvar, vae = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    torch.manual_seed(1)
    other = VQVAEHF.from_config(dataclasses.asdict(vae.config))
    other.save_pretrained(tmp_path / "m" / "tokenizer")
    with pytest.raises(ValueError, match=r"m/tokenizer is not the tokenizer .*m/model.safetensors was trained with"):
        MVARHF.from_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="--allow_other_tokenizer"):
        sample.main(["--ckpt", str(tmp_path / "m"), "--device", "cpu", "--classes", "1", "--out",
                     str(tmp_path / "x.png")])
    assert sample.main(["--ckpt", str(tmp_path / "m"), "--device", "cpu", "--classes", "1", "--allow_other_tokenizer",
                        "--out", str(tmp_path / "x.png")]).is_file()

    torch.save(mvar_checkpoint(mvar, vae), tmp_path / "ours.pth")
    torch.save({"vae_config": dataclasses.asdict(vae.config), "vae": other.state_dict()}, tmp_path / "other.pth")
    # a folder's --vae_ckpt is named as a .pth's is (it was "the given tokenizer", which named no flag or file)
    with pytest.raises(SystemExit, match=r"error: --vae_ckpt=.*other.pth is not the tokenizer .*m/model.safetensors"):
        sample.main(["--ckpt", str(tmp_path / "m"), "--vae_ckpt", str(tmp_path / "other.pth"), "--device", "cpu",
                     "--classes", "1", "--out", str(tmp_path / "y.png")])
    flags = ["--ckpt", str(tmp_path / "ours.pth"), "--vae_ckpt", str(tmp_path / "other.pth")]
    with pytest.raises(SystemExit, match=r"--vae_ckpt=.*other.pth is not the tokenizer --ckpt=.*ours.pth"):
        export.main([*flags, "--out", str(tmp_path / "hub")])
    out = export.main([*flags, "--allow_other_tokenizer", "--out", str(tmp_path / "hub")])
    MVARHF.from_pretrained(out)  # the folder records the tokenizer it was exported with


def test_a_tokenizer_trained_here_is_refused_for_official_weights_unless_allowed(tmp_path):
    """An official raw file records no tokenizer, so a tokenizer of this project's tokenizer training with its V and
    Cvae (trained from scratch: never VAR's) decoded its tokens into other images without a word, and an export
    recorded that tokenizer as the folder's own."""
    from tokenizer_trainer import TokenizerTrainer, build_parser, build_vae

    _, mvar = build_tiny()
    torch.save(official_style_state_dict(mvar), tmp_path / "d2.pth")
    args = build_parser().parse_args(["--reso=8", "--ch=32", "--ch_mult=1_2", "--z_channels=8", "--vocab_size=64",
                                      "--pn=1_2_3_4", "--dataset=mnist"])  # the tiny model's V=64, Cvae=8
    torch.save(TokenizerTrainer(build_vae(args), args, torch.device("cpu")).state_dict(), tmp_path / "tok.pth")
    flags = ["--ckpt", str(tmp_path / "d2.pth"), "--vae_ckpt", str(tmp_path / "tok.pth")]
    refused = r"--vae_ckpt=.*tok.pth is a tokenizer trained here .* but --ckpt=.*d2.pth holds official weights"
    with pytest.raises(SystemExit, match=refused):
        sample.main([*flags, "--device", "cpu", "--classes", "1", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match=refused):
        export.main([*flags, "--out", str(tmp_path / "hub")])
    assert not (tmp_path / "hub").exists()
    assert export.main([*flags, "--allow_other_tokenizer", "--out", str(tmp_path / "hub")]).is_dir()
    vae, _ = build_tiny()
    torch.save(vae_checkpoint(vae), tmp_path / "vae.pth")  # a re-saved tokenizer may be VAR's: not refused
    assert sample.main(["--ckpt", str(tmp_path / "d2.pth"), "--vae_ckpt", str(tmp_path / "vae.pth"), "--device",
                        "cpu", "--classes", "1", "--out", str(tmp_path / "y.png")]).is_file()


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:-100]),
     r"m/model.safetensors is unreadable .*expected a complete safetensors file"),
    (lambda m: (m / "tokenizer" / "model.safetensors").write_bytes(b"\0" * 64),
     r"m/tokenizer/model.safetensors is unreadable"),
    (lambda m: (m / "config.json").write_text("{'depth': 2,"), r"m/config.json is not valid JSON"),
    (lambda m: (m / "config.json").write_text(json.dumps({**json.loads((m / "config.json").read_text()),
                                                           "num_classes": -3})),
     r"m/config.json is not an M-VAR config \(num_classes=-3: expected sizes >= 1\)"),
])
def test_broken_folder_files_are_an_error_line_naming_the_file(tmp_path, damage, message):
    """Issue 23: raw safetensors/json tracebacks naming no file, and a negative num_classes blamed on --classes."""
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    damage(tmp_path / "m")
    with pytest.raises(SystemExit, match="error: .*" + message):
        sample.main(["--ckpt", str(tmp_path / "m"), "--device", "cpu", "--classes", "1", "--out",
                     str(tmp_path / "x.png")])


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    mvar, _ = hub_model()
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded[repo_id] = sorted(p.name for p in folder_path.rglob("*") if p.is_file())
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id}))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert mvar.push_to_hub(REPO).endswith("/commit/0")
    assert uploaded == {REPO: ["README.md", "config.json", "config.json", "model.safetensors", "model.safetensors"]}


def test_sample_edit_writes_before_mask_after_rows(tmp_path):
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)  # resized to the model's 8 px
    Image.fromarray(img).save(tmp_path / "in.png")
    out = sample.main(["--ckpt", str(tmp_path / "m"), "--device", "cpu", "--edit", str(tmp_path / "in.png"),
                       "--box", "0,8,16,16", "--classes", "1", "2", "--num_per_class", "3",
                       "--out", str(tmp_path / "edit.png")])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 2 * 10, 2 + 5 * 10, 3)  # 2 rows x (before, mask, 3 edits) of 8 px, padding 2
    cell = [[grid[2 + r * 10: 10 + r * 10, 2 + k * 10: 10 + k * 10] for k in range(5)] for r in range(2)]
    assert np.array_equal(cell[0][0], cell[1][0])  # the same "before" in every row
    assert (cell[0][1][:4] == 0).all() and (cell[0][1][4:] == 255).all()  # the mask: the lower half
    for r in range(2):
        for k in range(2, 5):
            assert np.array_equal(cell[r][k][:4], cell[0][2][:4])  # the upper half is kept in every edit
    assert not np.array_equal(cell[0][2][4:], cell[1][2][4:])  # the lower half follows the class / seed
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "m"), "--edit", str(tmp_path / "in.png"), "--classes", "1"])
    assert not np.array_equal(cell[0][2][:4], cell[0][0][:4])  # by default the tokenizer's reconstruction ...
    original = np.asarray(Image.open(sample.main(
        ["--ckpt", str(tmp_path / "m"), "--device", "cpu", "--edit", str(tmp_path / "in.png"), "--box", "0,8,16,16",
         "--classes", "1", "2", "--num_per_class", "3", "--outside", "original", "--out", str(tmp_path / "o.png")])))
    for r in range(2):  # ... with --outside=original the image's own pixels, the edited half unchanged
        for k in range(2, 5):
            got = original[2 + r * 10: 10 + r * 10, 2 + k * 10: 10 + k * 10]
            assert np.array_equal(got[:4], cell[0][0][:4]) and np.array_equal(got[4:], cell[r][k][4:])


def test_export_names_its_flags_in_errors(tmp_path, offline_cache):
    vae, mvar = build_tiny()
    torch.save(vae_checkpoint(vae), tmp_path / "t.pth")
    with pytest.raises(SystemExit, match=r"--ckpt=.*t\.pth is a tokenizer checkpoint .*--vae_ckpt"):
        export.main(["--ckpt", str(tmp_path / "t.pth"), "--out", str(tmp_path / "hub")])
    with pytest.raises(SystemExit, match=r"pass one of --ckpt=PATH or --depth=N .*, not both"):
        export.main(["--ckpt", str(tmp_path / "t.pth"), "--depth", "16", "--out", str(tmp_path / "hub")])
    with pytest.raises(SystemExit, match=r"--ckpt=.*missing\.pth: no such file$"):  # no download hint for d0.pth
        export.main(["--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "hub")])
    assert not (tmp_path / "hub").exists()


def test_a_training_checkpoint_is_read_once_and_its_optimizer_let_go(tmp_path, monkeypatch):
    """sample.py and export.py read a checkpoint with an embedded tokenizer twice, whole, both copies alive at once:
    twice a training checkpoint's size (its optimizer states included) in memory."""
    import models.loading

    vae, mvar = build_tiny()
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({**mvar_checkpoint(mvar, vae), "trainer": {"adam": torch.zeros(1000)}, "rng": [1], "epoch": 1}, path)
    reads, real = [], models.loading.torch.load
    monkeypatch.setattr(models.loading.torch, "load", lambda f, **k: reads.append(str(f)) or real(f, **k))
    kept = models.loading.load_mvar_checkpoint(path, "--ckpt")
    assert set(kept) == {"config", "model", "vae_config", "vae"}
    reads.clear()
    args = sample.parse_args(["--ckpt", str(path), "--device", "cpu"])
    loaded, _, vae_id = sample.open_model(args, torch.device("cpu"))
    assert reads == [str(path)] and vae_id == "embedded"
    assert all(torch.equal(v, loaded.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    reads.clear()
    export.main(["--ckpt", str(path), "--out", str(tmp_path / "hub")])
    assert reads == [str(path)]


def test_refused_files_end_in_one_error_line(tmp_path):
    """A model file given as the tokenizer, and a truncated file or a state dict of no model given to export.py, were
    tracebacks."""
    vae, mvar = build_tiny()
    raw = tmp_path / "raw.pth"
    torch.save(mvar.state_dict(), raw)
    ours = tmp_path / "ours.pth"
    torch.save(mvar_checkpoint(mvar, vae), ours)
    with pytest.raises(SystemExit, match=r"^error: tokenizer checkpoint .*raw\.pth \(--vae_ckpt\) does not match"):
        sample.main(["--ckpt", str(ours), "--vae_ckpt", str(raw), "--device", "cpu", "--out", str(tmp_path / "x.png")])
    (tmp_path / "trunc.pth").write_bytes(ours.read_bytes()[:2000])
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*trunc\.pth is unreadable"):
        export.main(["--ckpt", str(tmp_path / "trunc.pth"), "--out", str(tmp_path / "hub")])
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match=r"^error: --ckpt=.*other\.pth: not an M-VAR/VAR state dict"):
        export.main(["--ckpt", str(tmp_path / "other.pth"), "--out", str(tmp_path / "hub")])


def test_a_typo_in_a_local_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`--ckpt hub/my-mvar-typo` read as a repo id spent about 27 s in huggingface_hub's retries before its error."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("looked up on the Hub"))
    (tmp_path / "hub").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"--ckpt=hub/my-mvar-typo: hub/ has no folder my-mvar-typo"):
        sample.main(["--ckpt", "hub/my-mvar-typo", "--device", "cpu", "--classes", "1"])


def test_the_model_cards_fid_command_names_the_npz_sample_py_writes():
    """A review: without --repo_id the card named samples/folder-cfg1.5-...npz, after a placeholder path."""
    for flags, name in ((["--out", "hub/var-d16"], "var-d16"),
                        (["--out", "hub/x", "--repo_id", "me/mvar-d16"], "mvar-d16")):
        args = export.build_parser().parse_args(["--ckpt", "d16.pth", *flags])
        assert export.fid_sample_name(args) == f"{name}-cfg1.5-topk900-topp0.96-seed0-n50.npz"


def test_init_from_reads_a_model_in_each_of_its_formats(tmp_path):
    """train.py --init_from took .pth files only: a Hub folder was "no such file", and its model.safetensors got the
    advice to pass the folder, which --init_from then refused. Each format gives the weights and, where recorded, the
    digest of the tokenizer they were trained with (train.py checks it against --vae_ckpt)."""
    mvar, vae = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    torch.save(mvar_checkpoint(mvar, vae), tmp_path / "ours.pth")
    torch.save(official_style_state_dict(mvar), tmp_path / "official.pth")
    digest = weights_digest(vae.state_dict())
    for source, recorded in ((tmp_path / "m", digest), (tmp_path / "m" / "model.safetensors", digest),
                             (tmp_path / "ours.pth", digest), (tmp_path / "official.pth", None)):
        state, tokenizer_digest, config = read_model_weights(source, "--init_from")
        assert tokenizer_digest == recorded, source
        assert config == (mvar.config if recorded else None), source
        _, fresh = build_tiny()
        load_state_dict_checked(fresh, state, ignore=DERIVED_KEYS, what=str(source))
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in mvar.state_dict().items()), source
    with pytest.raises(FileNotFoundError, match="--init_from=.*nope.pth: no such file"):
        read_model_weights(tmp_path / "nope.pth", "--init_from")


def test_init_from_a_tokenizer_file_says_where_it_belongs(tmp_path):
    """A tokenizer's checkpoint given as --init_from was read as a raw M-VAR state dict, and the load then listed
    every missing key of the model instead of saying that the file is a tokenizer (a CheckpointError: train.py's
    "error: ..." line, no traceback)."""
    mvar, vae = hub_model()
    torch.save(vae_checkpoint(vae), tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"--init_from=.*t\.pth is a tokenizer checkpoint .*--vae_ckpt"):
        read_model_weights(tmp_path / "t.pth", "--init_from")


def test_an_existing_file_named_like_a_repo_id_is_a_path(tmp_path, monkeypatch):
    """`--ckpt runs/last` (a checkpoint file without a suffix) was read as the repo id runs/last."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "last").write_bytes(b"x")
    assert not is_hub_source("runs/last") and is_hub_source("runs/other")


def test_a_tokenizer_of_other_latent_channels_never_fits():
    """Only V was compared: a tokenizer of the model's vocabulary but other latent channels passed, allowed or not."""
    vae, _ = build_tiny()
    for allow in (False, True):
        with pytest.raises(TokenizerMismatchError, match=r"t \(V=64, Cvae=8\) does not fit m \(V=64, Cvae=16\)"):
            check_own_tokenizer(vae, None, "t", "m", allow, (64, 16))


def test_read_config_looks_in_the_cache_it_is_given(tmp_path, offline_cache):
    """read_config dropped `cache_dir`: a repo cached elsewhere than the default cache was "not found"."""
    mvar, _ = hub_model()
    mvar.save_pretrained(tmp_path / "m")
    put_folder_in_cache(tmp_path / "m", tmp_path / "other_cache", REPO)
    assert read_config(REPO, cache_dir=tmp_path / "other_cache") == mvar.config


def test_export_refuses_a_tokenizer_with_non_finite_weights(tmp_path):
    """Only the M-VAR weights were checked: a NaN in the embedded tokenizer's decoder was written into the folder."""
    vae, mvar = build_tiny()
    ckpt = mvar_checkpoint(mvar, vae)
    ckpt["vae"]["post_quant_conv.weight"] = ckpt["vae"]["post_quant_conv.weight"].clone().fill_(float("nan"))
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match=r"error: tokenizer \(embedded in --ckpt\) has non-finite weights .*"
                                         r"post_quant_conv\.weight"):
        export.main(["--ckpt", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "hub")])
    assert not (tmp_path / "hub").exists()


def test_official_intra_weights_export_as_the_arch_asked_for(tmp_path, offline_cache):
    """--arch intra on an official-layout file (VAR's keys): the folder records intra and computes the intra model's
    logits. The export's load was not checked to take --arch (only var, the default reading, was exported), so a
    load that dropped it wrote arch=var for the intra ablation, silently."""
    vae, intra = build_tiny("intra")
    torch.save(official_style_state_dict(intra), tmp_path / "intra.pth")
    torch.save(vae_checkpoint(vae), tmp_path / "vae.pth")
    out = export.main(["--ckpt", str(tmp_path / "intra.pth"), "--arch", "intra", "--vae_ckpt",
                       str(tmp_path / "vae.pth"), "--out", str(tmp_path / "hub")])
    assert json.loads((out / "config.json").read_text())["arch"] == "intra"
    assert_same_model(load_mvar(tmp_path / "intra.pth", vae=vae, arch="intra"), MVARHF.from_pretrained(out))
