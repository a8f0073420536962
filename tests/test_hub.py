"""Offline-first checkpoint resolution; nothing here may touch the network."""
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError

from models.loading import load_vae, resolve_checkpoint, resolve_mvar_checkpoint, vae_checkpoint
from models.tokenizer import VAE_FILENAME, VAE_REPO_ID, VQVAE

REPO, FILE = "someone/weights", "model.pth"


def put_in_hf_cache(cache: Path, repo_id: str, filename: str, payload: bytes | None = None) -> Path:
    """Write a file into a Hugging Face hub cache layout (models--org--name/{refs,snapshots})."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    target = repo_dir / "snapshots" / commit / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload if payload is not None else b"weights")
    return target


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache as the default cache, HF_HUB_OFFLINE=1, and a download that fails if it goes online."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    real_download = huggingface_hub.hf_hub_download

    def local_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "tried to download while offline"
        return real_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", local_only)
    return cache


def test_explicit_path_wins(offline_cache, tmp_path):
    put_in_hf_cache(offline_cache, REPO, FILE)
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"x")
    assert resolve_checkpoint(str(mine), REPO, FILE, flag="--ckpt") == mine


def test_explicit_missing_path_names_the_flag(offline_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--vae_ckpt=.*nope\.pth: no such file"):
        resolve_checkpoint(tmp_path / "nope.pth", REPO, FILE, flag="vae_ckpt")
    (tmp_path / "tokenizer").mkdir()  # a review: a Hub folder's tokenizer/ was "no such file"
    with pytest.raises(FileNotFoundError, match=r"--vae_ckpt=.*tokenizer: a folder, not a file\. Point --vae_ckpt"):
        resolve_checkpoint(tmp_path / "tokenizer", REPO, FILE, flag="vae_ckpt")


def test_cache_hit(offline_cache):
    target = put_in_hf_cache(offline_cache, REPO, FILE)
    assert resolve_checkpoint(None, REPO, FILE, flag="--ckpt").read_bytes() == target.read_bytes()


def test_cache_hit_in_explicit_cache_dir(offline_cache, tmp_path):
    other = tmp_path / "other_cache"
    put_in_hf_cache(other, REPO, FILE, b"other")
    assert resolve_checkpoint(None, REPO, FILE, flag="--ckpt", cache_dir=other).read_bytes() == b"other"


def test_offline_miss_says_where_to_put_the_file(offline_cache):
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(None, REPO, FILE, flag="--ckpt")
    msg = str(err.value)
    assert f"--ckpt=/path/to/{FILE}" in msg
    assert f"https://huggingface.co/{REPO}/resolve/main/{FILE}" in msg
    assert str(offline_cache) in msg and "(HF_HUB_OFFLINE is set)" in msg and "Without internet" not in msg


def test_online_miss_downloads_once(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    downloaded = tmp_path / "downloaded.pth"
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        downloaded.write_bytes(b"fresh")
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_checkpoint(None, REPO, FILE, flag="--ckpt") == downloaded
    assert calls == [True, False]

    def no_network(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("connection refused") if kwargs.get("local_files_only") else OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(FileNotFoundError, match=r"OSError: offline[\s\S]*--ckpt=/path/to/model\.pth") as err:
        resolve_checkpoint(None, REPO, FILE, flag="--ckpt")
    # the Hub was tried (huggingface_hub retries it for ~30 s): the way to skip that next time
    assert "Without internet, set HF_HUB_OFFLINE=1" in str(err.value)


def test_load_vae_from_hf_cache(offline_cache, tmp_path):
    vae = VQVAE(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4))
    path = tmp_path / "vae.pth"
    torch.save(vae_checkpoint(vae), path)
    put_in_hf_cache(offline_cache, VAE_REPO_ID, VAE_FILENAME, path.read_bytes())
    loaded = load_vae()
    assert torch.equal(loaded.quantize.embedding.weight, vae.quantize.embedding.weight)


def test_load_vae_miss_names_flag_and_url(offline_cache):
    with pytest.raises(FileNotFoundError) as err:
        load_vae(flag="--vae")
    assert "--vae=/path/to/vae_ch160v4096z32.pth" in str(err.value)
    assert "https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth" in str(err.value)


def test_hf_hub_offline_0_downloads_and_the_download_gets_revision_and_token(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=0 is online (read as "set", a miss never downloaded); a download for a gated repo needs the
    token, and a pinned revision must reach the cache lookup and the download alike."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((kwargs.get("local_files_only", False), kwargs.get("revision"), kwargs.get("token")))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    got = resolve_checkpoint(None, REPO, FILE, flag="--ckpt", revision="v1", token="hf_x")
    assert got == tmp_path / FILE
    assert calls == [(True, "v1", None), (False, "v1", "hf_x")]


def test_a_depth_resolves_the_published_file_names_from_the_cache(offline_cache):
    """`--depth 16` reads OliverRen/M-VAR's d16.pth, `--arch var` FoundationVision/var's var_d16.pth: another name
    finds nothing in a cache that holds them."""
    mvar = put_in_hf_cache(offline_cache, "OliverRen/M-VAR", "d16.pth", b"mvar")
    var = put_in_hf_cache(offline_cache, VAE_REPO_ID, "var_d16.pth", b"var")
    assert resolve_mvar_checkpoint(None, 16).read_bytes() == mvar.read_bytes()
    assert resolve_mvar_checkpoint(None, 16, arch="var").read_bytes() == var.read_bytes()
