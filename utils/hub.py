"""Offline-first resolution of checkpoint files: explicit path, then the Hugging Face cache, then a download."""
import logging
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError

logger = logging.getLogger(__name__)

_TRUE = {"1", "on", "yes", "true"}


def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (read at call time, not only at huggingface_hub import)."""
    env = os.environ.get("HF_HUB_OFFLINE")
    return env.strip().lower() in _TRUE if env is not None else bool(hf_constants.HF_HUB_OFFLINE)


def hf_download_url(repo_id: str, filename: str) -> str:
    return f"https://huggingface.co/{repo_id}/resolve/main/{filename}"


def resolve_checkpoint(path: str | os.PathLike | None, repo_id: str, filename: str, flag: str,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of a checkpoint.

    An explicit `path` (the value of `flag`) wins and must exist. Otherwise the Hugging Face cache is tried
    (`cache_dir`, default: the hub cache of HF_HOME), and only if the file is not cached and HF_HUB_OFFLINE is
    unset is it downloaded. Raises FileNotFoundError saying where to put the file.
    """
    flag = flag if flag.startswith("--") else f"--{flag}"
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{flag}={path}: no such file. Point {flag} at a local copy of {filename} "
                                    f"(download: {hf_download_url(repo_id, filename)}).")
        return p

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, OSError) as e:  # not cached, or an unreadable cache
        cache_error = e
    if not hf_offline():
        try:
            logger.info("downloading %s from the Hugging Face repo %s", filename, repo_id)
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir))
        except Exception as e:  # noqa: BLE001 (network, auth, missing file: all end in the same instructions)
            cache_error = e
    cache = Path(cache_dir) if cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)
    raise FileNotFoundError(
        f"{filename} (Hugging Face repo {repo_id}) is not available"
        f"{' (HF_HUB_OFFLINE is set)' if hf_offline() else ''}: {type(cache_error).__name__}: {cache_error}\n"
        f"Either pass {flag}=/path/to/{filename}, or put it in the Hugging Face cache at {cache} with\n"
        f"  hf download {repo_id} {filename}   (older huggingface_hub: huggingface-cli download ...)\n"
        f"on a machine with internet access (copy the cache folder over if needed). Direct download URL:\n"
        f"  {hf_download_url(repo_id, filename)}"
    ) from cache_error
