"""Every way a model is loaded: files on disk or in the Hugging Face cache, strict state-dict loading, the tokenizer,
and M-VAR / VAR weights (our checkpoints with their config, and the official raw state dicts).

Files resolve offline-first (`resolve_checkpoint`): an explicit path, then the Hugging Face cache, then a download
unless HF_HUB_OFFLINE is set; a miss says where to put the file. Checkpoints are read with `weights_only` and
loaded strictly (`load_state_dict_checked`: never a silent `strict=False`). Official files (`OliverRen/M-VAR`
d16.pth ..., `FoundationVision/var` var_d16.pth ...) carry no config: it is read off the tensor shapes. They also
carry derived buffers (`lvl_1L`, `attn_bias_for_masking`, `blocks.i.attn.patch_nums`) that this implementation
recomputes, so those are the only keys ignored. The Hub folder format (safetensors + config.json) is
models/hub_format.py, which loads through the functions here.
"""
import dataclasses
import fnmatch
import hashlib
import logging
import math
import os
import pickle
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from models.mvar import MVAR, MVARConfig
from models.presets import PATCH_NUMS
from models.tokenizer import VAE_FILENAME, VAE_REPO_ID, VQVAE

logger = logging.getLogger(__name__)

MVAR_REPO = "OliverRen/M-VAR"
VAR_REPO = VAE_REPO_ID  # VAR's model files sit beside its tokenizer
VAR_PUBLISHED_DEPTHS = (16, 20, 24, 30, 36)  # var_d{N}.pth there; d36 is VAR's 512 px model
DERIVED_KEYS = ("lvl_1L", "attn_bias_for_masking", "blocks.*.attn.patch_nums")  # fnmatch patterns
PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------------------------
# Files: on disk or in the Hugging Face cache
# ---------------------------------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run; the message names the file."""


_TRUE = {"1", "on", "yes", "true"}


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")  # a weights file, not a folder or repo


# huggingface_hub retries an unreachable Hub for about 30 s before failing
NO_INTERNET_HINT = "\nWithout internet, set HF_HUB_OFFLINE=1: the cache is then read without trying the Hub first."


def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (read at call time, not only at huggingface_hub import)."""
    env = os.environ.get("HF_HUB_OFFLINE")
    return env.strip().lower() in _TRUE if env is not None else bool(hf_constants.HF_HUB_OFFLINE)


def hf_download_url(repo_id: str, filename: str) -> str:
    return f"https://huggingface.co/{repo_id}/resolve/main/{filename}"


def existing_file(path: str | os.PathLike, flag: str, hint: str = "") -> Path:
    """`path` (the value of `flag`) as a Path; FileNotFoundError "FLAG=PATH: no such file" (or "a folder, not a
    file") + `hint` if it is none."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{flag}={path}: {'a folder, not a file' if p.is_dir() else 'no such file'}{hint}")
    return p


def resolve_checkpoint(path: str | os.PathLike | None, repo_id: str, filename: str, flag: str,
                       cache_dir: str | os.PathLike | None = None, revision: str | None = None,
                       token: str | bool | None = None, local_files_only: bool = False) -> Path:
    """Local path of a checkpoint.

    An explicit `path` (the value of `flag`) wins and must exist. Otherwise the Hugging Face cache is tried
    (`cache_dir`, default: the hub cache of HF_HOME; `revision`: a branch, tag or commit, default main), and only if
    the file is not cached, HF_HUB_OFFLINE is unset and not `local_files_only` is it downloaded (with `token` for a
    gated or private repo). Raises FileNotFoundError saying where to put the file.
    """
    flag = flag if flag.startswith("--") else f"--{flag}"
    if path is not None:
        return existing_file(path, flag, f". Point {flag} at a local copy of {filename} (download: "
                                         f"{hf_download_url(repo_id, filename)}).")

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, revision=revision,
                                                    local_files_only=True))
    except (LocalEntryNotFoundError, OSError) as e:  # not cached, or an unreadable cache
        cache_error = e
    if not hf_offline() and not local_files_only:
        try:
            logger.info("downloading %s from the Hugging Face repo %s", filename, repo_id)
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, revision=revision,
                                                        token=token))
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
        f"{'' if hf_offline() else NO_INTERNET_HINT}"
    ) from cache_error


def _load_mapped(path: PathLike) -> Any:
    """torch.load onto the CPU (weights_only), memory-mapped where the file can be (not torch's legacy format, nor
    on a file system that refuses private maps), else read whole; a damaged file raises from the second try."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (torch raises RuntimeError, OSError, ... by cause)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)


def load_checkpoint(path: PathLike, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint on the CPU (weights_only; memory-mapped, so the ranks of a node share the
    pages: eight ranks reading a 34 GB d30 training checkpoint whole would hold 270 GB); CheckpointError naming the
    file if it is unreadable or its tensors do not match the digest it carries (`with_digest`; the digest is checked
    and removed, files without one load as they are). A file that cannot be mapped (torch's legacy format, a file
    system that refuses private maps) is read whole. `verify=False` skips the digest, which reads every tensor, for
    a caller that uses none."""
    if str(path).endswith(".safetensors"):  # torch.load's error would call it unreadable
        raise CheckpointError(f"checkpoint {path} is a safetensors file of the Hub format: pass the model folder "
                              "that holds it with its config.json (sample.py --ckpt FOLDER, MVARHF.from_pretrained), "
                              "or a .pth checkpoint")
    try:
        ckpt = _load_mapped(path)
    except pickle.UnpicklingError as e:  # not a torch file, or one holding more than tensors and plain values
        # torch's own text advises weights_only=False, which runs whatever code the file holds: its cause only
        cause = str(e).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].strip()
        raise CheckpointError(f"checkpoint {path} is unreadable: not a torch checkpoint of tensors and plain Python "
                              f"values (torch.load with weights_only=True: {cause or type(e).__name__})") from e
    except Exception as e:  # truncated, zero-filled, ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    recorded = ckpt.pop(DIGEST_KEY, None)
    if recorded is not None and verify:
        check_digest(ckpt, recorded, f"checkpoint {path}")
    return ckpt


# ---------------------------------------------------------------------------------------------------------------------
# Digests: every file this project writes records one of its tensors, every loader checks it
# ---------------------------------------------------------------------------------------------------------------------
DIGEST_KEY = "digest"  # in a checkpoint dict; in the safetensors metadata of the Hub format


def named_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested dict / list / tuple, keyed by their path ("trainer/optimizer/state/0/exp_avg"); a
    flat state dict keeps its own keys."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    return {name: t for k, v in items for name, t in named_tensors(v, f"{prefix}/{k}" if prefix else str(k)).items()}


def weights_digest(obj: Any) -> str:
    """Content hash (BLAKE2b, 128 bits) of the names, dtypes, shapes and bytes of the tensors in `obj` (a state
    dict, or a nested checkpoint: `named_tensors`): exact, on one CPU core (0.3-1 GB/s, seconds for a large model).
    The weights' identity that runs record and compare (a tokenizer's, a token cache's, an FID dump's models), so its
    value never changes; files carry `file_digest`."""
    h = hashlib.blake2b(digest_size=16)
    state = named_tensors(obj)
    for name in sorted(state):
        h.update(tensor_header(name, state[name]))
        h.update(tensor_bytes(state[name]))
    return h.hexdigest()


def tensor_header(name: str, t: torch.Tensor) -> bytes:
    """What a digest hashes of a tensor before its bytes: its name, dtype and shape."""
    return f"{name}:{t.dtype}:{tuple(t.shape)};".encode()


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of `t` on the CPU, in row-major order, as a flat uint8 array."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


FILE_DIGEST_PREFIX = "b2tree:"  # marks a `file_digest` (a `weights_digest` has none), so both kinds verify
FILE_DIGEST_CHUNK = 4 << 20  # bytes hashed as one piece of a tensor's data


def hash_threads() -> int:
    """Threads for `file_digest`: the cores this process may run on, at most 32."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(32, cores))


def _piece_digest(piece: Any) -> bytes:
    return hashlib.blake2b(piece, digest_size=16).digest()  # releases the GIL on pieces over 2 KiB


def file_digest(obj: Any) -> str:
    """The digest a file records of its tensors (`with_digest`, the Hub format's metadata): like `weights_digest`, the
    names, dtypes, shapes and every byte, but the bytes hashed in FILE_DIGEST_CHUNK pieces on `hash_threads()`
    threads, the pieces of all tensors in one queue, and the pieces' digests hashed in order (a hash tree), so it
    scales with the cores: a 34 GB d30 training checkpoint took ~35-100 s on one core at every save and resume.
    Another value than `weights_digest`, marked by FILE_DIGEST_PREFIX."""
    h = hashlib.blake2b(digest_size=16)
    state = named_tensors(obj)
    threads = hash_threads()
    window = 4 * threads * FILE_DIGEST_CHUNK  # bytes queued: bounds the CPU copies a GPU state makes
    queued: deque[tuple[bytes | Future, int]] = deque()  # headers and the pieces' digests, in hashing order
    in_flight = 0

    def settle(limit: int) -> None:
        nonlocal in_flight
        while queued and (in_flight > limit or isinstance(queued[0][0], bytes)):
            item, size = queued.popleft()
            h.update(item if isinstance(item, bytes) else item.result())
            in_flight -= size

    with ThreadPoolExecutor(threads) as pool:
        for name in sorted(state):
            t = state[name]
            queued.append((tensor_header(name, t), 0))
            data = tensor_bytes(t)
            for i in range(0, len(data), FILE_DIGEST_CHUNK):
                piece = data[i:i + FILE_DIGEST_CHUNK]
                queued.append((pool.submit(_piece_digest, piece), len(piece)))
                in_flight += len(piece)
                settle(window)
        settle(-1)
    return FILE_DIGEST_PREFIX + h.hexdigest()


def with_digest(ckpt: dict[str, Any]) -> dict[str, Any]:
    """`ckpt` plus the `file_digest` of its tensors under DIGEST_KEY, which `load_checkpoint` verifies."""
    return {**ckpt, DIGEST_KEY: file_digest(ckpt)}


def check_digest(obj: Any, recorded: str, what: str) -> None:
    """CheckpointError naming `what` when the tensors of `obj` do not hash to the `recorded` digest (a
    `file_digest`, or the `weights_digest` files written before it recorded)."""
    actual = (file_digest if recorded.startswith(FILE_DIGEST_PREFIX) else weights_digest)(obj)
    if actual != recorded:
        raise CheckpointError(f"{what} is damaged: its tensor data does not match the digest recorded when it was "
                              f"written ({actual} vs {recorded}); use another copy")


# ---------------------------------------------------------------------------------------------------------------------
# Strict state dicts
# ---------------------------------------------------------------------------------------------------------------------
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class StateDictMismatchError(CheckpointError):
    """A checkpoint's keys or shapes do not match the model."""


def _listed(items: list[str], max_listed: int) -> str:
    more = f", ... (+{len(items) - max_listed} more)" if len(items) > max_listed else ""
    return ", ".join(items[:max_listed]) + more


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore: Iterable[str] = (),
                            what: str = "checkpoint", max_listed: int = 5) -> list[str]:
    """Load `state_dict` into `module`, requiring the same keys and shapes.

    `ignore` holds fnmatch patterns (e.g. "blocks.*.attn.patch_nums") of keys that are dropped from the file and
    may be absent from it; the module keeps its own values for them. Returns the dropped file keys. On any other
    difference raises StateDictMismatchError naming the first `max_listed` missing, unexpected and mis-shaped keys.
    """
    patterns = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    own = module.state_dict()
    dropped = [k for k in state_dict if ignored(k)]
    kept = {k: v for k, v in state_dict.items() if not ignored(k)}
    missing = [k for k in own if k not in kept and not ignored(k)]
    unexpected = [k for k in kept if k not in own]
    mis_shaped = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in kept.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listed(missing, max_listed)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected, max_listed)}")
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} shape mismatch(es): {_listed(mis_shaped, max_listed)}")
        hint = ""
        wrapped = [p for p in _WRAPPER_PREFIXES if unexpected and all(k.startswith(p) for k in unexpected)]
        if wrapped:
            hint = f" The file's keys start with {wrapped[0]!r}: it was saved from a DDP/compiled wrapper; unwrap it."
        raise StateDictMismatchError(f"{what} does not match the model: " + "; ".join(parts) + "." + hint)
    module.load_state_dict(kept, strict=False)
    return dropped


@contextmanager
def uninitialized_parameters(device: str | torch.device = "cpu") -> Iterator[None]:
    """Modules built inside skip their parameters' initialisation, for a state dict that sets every parameter.

    Each parameter this thread registers is made on the meta device, where the modules' init calls cost nothing
    (a d24 M-VAR's load took half its time in them); on exit it becomes an uninitialised tensor of its dtype on
    `device`, keeping `requires_grad` and attributes such as `_no_weight_decay`. Buffers are built as usual.
    Only for a load that fills every parameter (`load_state_dict_checked` with no parameter among `ignore`).
    """
    owner, made = threading.get_ident(), []

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.device.type == "meta" or threading.get_ident() != owner:
            return None
        made.append((module, name))
        return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    handle = nn.modules.module.register_module_parameter_registration_hook(on_meta)
    try:
        yield
    finally:
        handle.remove()
    real: dict[int, nn.Parameter] = {}  # one tensor for a parameter registered under two names
    for module, name in made:
        meta = module._parameters.get(name)
        if meta is None or meta.device.type != "meta":
            continue
        if id(meta) not in real:
            real[id(meta)] = nn.Parameter(torch.empty_like(meta, device=device), requires_grad=meta.requires_grad)
            real[id(meta)].__dict__.update(meta.__dict__)
        module._parameters[name] = real[id(meta)]


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------------
def load_vae(path: str | os.PathLike | None = None, device: str | torch.device = "cpu", flag: str = "--vae_ckpt",
             **vae_kwargs: Any) -> VQVAE:
    """Load the tokenizer with strict key checking.

    `path` None resolves VAR's `vae_ch160v4096z32.pth` from the Hugging Face cache (see models.loading). The file is
    either a plain state dict (VAR's release; built with VQVAE defaults) or one of our checkpoints holding
    {"vae_config": asdict(cfg), "vae": sd} (tokenizer training, and M-VAR checkpoints that embed their tokenizer).
    `vae_kwargs` override config fields (e.g. v_patch_nums; a different scale count keeps our usage buffer).
    The result is frozen in eval mode (test_mode=True) unless `test_mode=False` is passed.
    """
    ckpt_path = resolve_checkpoint(path, VAE_REPO_ID, VAE_FILENAME, flag=flag)
    obj = load_checkpoint(ckpt_path)
    if isinstance(obj, dict) and "vae_config" in obj and "vae" in obj:
        config, state_dict = dict(obj["vae_config"]), obj["vae"]
    else:
        config, state_dict = {}, obj
    return vae_from_state_dict(config, state_dict, f"tokenizer checkpoint {ckpt_path} ({flag})", device, **vae_kwargs)


def vae_from_state_dict(config: dict[str, Any], state_dict: dict[str, torch.Tensor], what: str,
                        device: str | torch.device = "cpu", cls: type[VQVAE] = VQVAE, **vae_kwargs: Any) -> VQVAE:
    """Build a tokenizer of class `cls` from its config fields (missing ones: VQVAE defaults) and load
    `state_dict` strictly (errors name `what`); frozen in eval mode unless `test_mode=False` is passed."""
    with uninitialized_parameters():
        vae = cls.from_config({**config, "test_mode": True, **vae_kwargs})
    state_dict = dict(state_dict)
    vae.quantize.keep_own_ema_if_rescaled(state_dict, prefix="quantize.")
    load_state_dict_checked(vae, state_dict, what=what)
    logger.info("loaded %s (%.2fM params)", what, sum(p.numel() for p in vae.parameters()) / 1e6)
    return vae.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# M-VAR / VAR
# ---------------------------------------------------------------------------------------------------------------------
def peek_checkpoint(path: PathLike | None) -> dict[str, Any]:
    """A checkpoint file's dict, memory-mapped and unverified (its tensors not read), for a look at its records;
    {} for no file, one that does not read (its loading says why) or one that holds no dict."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        ckpt = load_checkpoint(path, verify=False)
    except CheckpointError:
        return {}
    return ckpt if isinstance(ckpt, dict) else {}


def recorded_patch_nums(path: PathLike | None) -> tuple[int, ...] | None:
    """The patch schedule a tokenizer file of ours was trained at (`vae_config.v_patch_nums`; an M-VAR checkpoint's
    embedded one too), or None: no file given, an official raw file (VAR's records none), or one that does not read
    (its loading says why)."""
    config = peek_checkpoint(path).get("vae_config")
    return tuple(config["v_patch_nums"]) if isinstance(config, dict) and config.get("v_patch_nums") else None


def trained_tokenizer_step(path: PathLike | None) -> int | None:
    """The step of a tokenizer file written by tokenizer training (tokenizer_trainer.py: {"vae_config", "vae",
    "step", ...}, trained from scratch, so never VAR's tokenizer), or None: no file, VAR's raw file, a tokenizer
    re-saved by `vae_checkpoint`, an M-VAR checkpoint, or a file that does not read (its loading says why).
    Memory-mapped and unverified: the tensors are not read."""
    ckpt = peek_checkpoint(path)
    return ckpt["step"] if "vae_config" in ckpt and "model" not in ckpt and isinstance(ckpt.get("step"), int) else None


def is_ours(ckpt: Mapping[str, Any]) -> bool:
    """Whether a model checkpoint's dict is ours (train.py's or `mvar_checkpoint`'s: its config beside its weights),
    not an official raw state dict (which records no config, no tokenizer and no training data)."""
    return "config" in ckpt and "model" in ckpt


def recorded_class_names(ckpt: Mapping[str, Any]) -> list[str] | None:
    """The class names train.py records in its checkpoints (`data.classes`), or None (official files have none)."""
    names = (ckpt.get("data") or {}).get("classes")
    return [str(n) for n in names] if names else None


def attention_only_note(name: str, ours: bool, arch: str, asked_arch: str | None) -> str | None:
    """What to say of the file `name` when its architecture `arch` was guessed: a raw file (not `ours`) read as VAR
    without `asked_arch` (`config_from_state_dict`), whose keys would be the same for the intra-scale ablation; else
    None."""
    if ours or arch != "var" or asked_arch:
        return None
    return (f"{name} has attention and no Mamba: read as VAR (--arch=intra for the intra-scale ablation, whose keys "
            "are the same; --arch=var says it is VAR)")


def config_from_state_dict(
    state_dict: dict[str, torch.Tensor], patch_nums: Sequence[int] | None = None, **overrides,
) -> MVARConfig:
    """Infer the MVARConfig of a raw (official) state dict from its tensor shapes.

    The patch schedule comes from `patch_nums`, else the official `blocks.0.attn.patch_nums` buffer, else L
    (256 or 512 px presets). Weights with attention and no Mamba load as `arch="var"`: an `intra` ablation has the
    same keys, so pass `arch="intra"` for those (and `var_blocks=K` for a VAR + intra mix, which the keys cannot
    tell apart either; a VAR + mvar/mamba mix is inferred).
    """
    missing = [k for k in ("pos_start", "pos_1LC", "head.weight", "word_embed.weight", "class_emb.weight")
               if k not in state_dict]
    if missing:
        wrapped = [p for p in _WRAPPER_PREFIXES if state_dict and all(str(k).startswith(p) for k in state_dict)]
        hint = f" (its keys start with {wrapped[0]!r}: saved from a DDP/compiled wrapper; unwrap it)" if wrapped else ""
        raise KeyError(f"not an M-VAR/VAR state dict: missing {missing}{hint}")
    C = state_dict["pos_start"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    mamba_blocks = [i for i in range(depth) if f"blocks.{i}.mamba.A_log" in state_dict]
    has_mamba = bool(mamba_blocks)
    has_attn = f"blocks.{depth - 1}.attn.mat_qkv.weight" in state_dict
    arch = "mvar" if has_attn and has_mamba else ("mamba" if has_mamba else "var")
    asked = overrides.get("arch", arch)
    if asked != arch and not (arch == "var" and asked == "intra"):  # only VAR's keys are ambiguous (intra's too)
        layers = {"mvar": "attention and Mamba2", "mamba": "Mamba2 without attention",
                  "var": "attention without Mamba2 (VAR, or the intra ablation)"}[arch]
        raise ValueError(f"arch={asked} was asked for (--arch or --model), but the weights hold {layers}: "
                         f"arch={arch}")
    var_blocks = mamba_blocks[0] if has_mamba else 0  # leading VAR blocks of a var_blocks mix
    L = state_dict["pos_1LC"].shape[1]
    stored = state_dict.get("blocks.0.attn.patch_nums")  # official M-VAR files: the pn*pn of every scale
    if patch_nums is None and stored is not None:
        patch_nums = tuple(math.isqrt(int(n)) for n in stored.tolist())
    if patch_nums is None:
        by_len = {sum(p * p for p in pn): pn for pn in PATCH_NUMS.values()}
        if L not in by_len:
            raise ValueError(f"checkpoint has L={L} tokens: pass the patch schedule explicitly (--pn=1_2_...)")
        patch_nums = by_len[L]
    if sum(p * p for p in patch_nums) != L:
        raise ValueError(f"patch_nums {tuple(patch_nums)} give L={sum(p * p for p in patch_nums)}, "
                         f"but the checkpoint has L={L}")
    scale_mul = state_dict.get("blocks.0.attn.scale_mul_1H11")
    if has_mamba:  # Mamba2 sizes: norm.weight is d_inner, conv1d spans x, B and C (d_inner + 2 * d_state)
        d_inner = state_dict[f"blocks.{var_blocks}.mamba.norm.weight"].shape[0]
        conv_w = state_dict[f"blocks.{var_blocks}.mamba.conv1d.weight"]
        overrides = dict(expand=d_inner // C, d_state=(conv_w.shape[0] - d_inner) // 2, d_conv=conv_w.shape[-1],
                         **overrides)
    fields = dict(
        depth=depth, num_classes=state_dict["class_emb.weight"].shape[0] - 1, V=state_dict["head.weight"].shape[0],
        Cvae=state_dict["word_embed.weight"].shape[1], patch_nums=tuple(patch_nums), arch=arch,
        var_blocks=var_blocks, embed_dim=C,
        num_heads=scale_mul.shape[1] if scale_mul is not None else None,  # None: MVARConfig's head_dim 64, at least 1
        shared_aln="shared_ada_lin.1.weight" in state_dict, attn_l2_norm=scale_mul is not None,
    )
    fields.update(overrides)
    any_attn = any(k.endswith(".attn.mat_qkv.weight") for k in state_dict)  # a VAR+Mamba mix: the leading blocks
    if any_attn and scale_mul is None and "num_heads" not in overrides:  # nothing records the head count
        heads = MVARConfig(**fields).num_heads
        logger.warning("weights without attn_l2_norm record no attention head count: assumed %d (head dim 64, as "
                       "VAR's and M-VAR's); if they were trained with another, pass num_heads (the logits differ)",
                       heads)
    return MVARConfig(**fields)


def load_mvar(
    src: str | Path | dict[str, Any], device: str | torch.device = "cpu", vae: VQVAE | None = None,
    patch_nums: Sequence[int] | None = None, attn_backend: str = "auto", mamba_backend: str = "auto",
    model_cls: type[MVAR] = MVAR, name: str | None = None,
    **config_overrides,
) -> MVAR:
    """Build an MVAR from a checkpoint path or an already loaded dict and load its weights strictly.

    Accepts our checkpoints (a dict with "config" and "model", trainer checkpoints included) and official raw
    state dicts. `config_overrides` change non-weight settings (e.g. cond_drop_rate). The kernels are a run-time
    choice (models.backends), never part of a checkpoint: "auto" (then $MVAR_ATTN_BACKEND / $MVAR_MAMBA_BACKEND)
    unless given, so a model trained with the portable kernels runs the fused ones where they exist.
    `model_cls`: an MVAR subclass to build (e.g. models.hub_format.MVARHF); `name`: what errors call the source.
    """
    ckpt = load_checkpoint(src) if isinstance(src, (str, Path)) else src
    name = name or (str(src) if isinstance(src, (str, Path)) else "state dict")
    if is_ours(ckpt):
        config = MVARConfig.from_dict(ckpt["config"], **config_overrides)
        state_dict = ckpt["model"]
    else:
        state_dict = ckpt
        config = config_from_state_dict(state_dict, patch_nums, **config_overrides)
    with torch.device(device), uninitialized_parameters(device):
        mvar = model_cls(config, vae=vae, attn_backend=attn_backend, mamba_backend=mamba_backend)
    load_state_dict_checked(mvar, state_dict, ignore=DERIVED_KEYS, what=f"M-VAR checkpoint {name}")
    logger.info("loaded %s: arch=%s depth=%d C=%d L=%d", name, config.arch, config.depth, config.embed_dim, mvar.L)
    return mvar.eval()


def official_file(depth: int, arch: str = "mvar") -> tuple[str, str]:
    """(Hugging Face repo, file name) of the published weights of a depth: M-VAR's `OliverRen/M-VAR` d{depth}.pth,
    VAR's `FoundationVision/var` var_d{depth}.pth. The ablations' architectures, and VAR depths it did not publish,
    have none (ValueError)."""
    if arch == "mvar":
        return MVAR_REPO, f"d{depth}.pth"
    if arch == "var" and depth in VAR_PUBLISHED_DEPTHS:
        return VAR_REPO, f"var_d{depth}.pth"
    if arch == "var":
        published = ",".join(map(str, VAR_PUBLISHED_DEPTHS))
        raise ValueError(f"VAR published no depth-{depth} weights (only var_d{{{published}}}.pth in {VAR_REPO}): "
                         "pass --ckpt=PATH")
    raise ValueError(f"--arch={arch} (an ablation of the paper) has no published weights: pass --ckpt=PATH")


def resolve_mvar_checkpoint(path: str | None, depth: int | None, flag: str = "--ckpt", arch: str = "mvar") -> Path:
    """An explicit path (which must exist), else the published file of this depth and architecture
    (`official_file`), offline-first."""
    if path is not None:
        return existing_file(path, flag)
    return resolve_checkpoint(None, *official_file(depth, arch), flag)


KEPT_KEYS = ("config", "model", "vae_config", "vae", "data", "args")  # what sampling and export read of ours


def load_mvar_checkpoint(path: PathLike, flag: str) -> dict[str, Any]:
    """The dict in an M-VAR / VAR checkpoint file (ours or official), read onto the CPU; of ours only the
    `KEPT_KEYS` are kept (a training checkpoint's optimizer states, about twice the weights, are let go at once).
    A tokenizer's file, given where a model's is expected, is a CheckpointError naming `flag`."""
    ckpt = load_checkpoint(path)
    if "model" not in ckpt and "vae" in ckpt:
        raise CheckpointError(f"{flag}={path} is a tokenizer checkpoint (no M-VAR weights): pass it as --vae_ckpt, "
                              f"and an M-VAR checkpoint as {flag}")
    if is_ours(ckpt):
        return {k: ckpt[k] for k in KEPT_KEYS if k in ckpt}
    return ckpt


def embedded_vae(ckpt: dict[str, Any], path: PathLike, device: str | torch.device = "cpu",
                 flag: str = "--ckpt") -> VQVAE:
    """The tokenizer a checkpoint dict embeds ("vae_config" + "vae"), built from the dict already in memory (reading
    the file again would hold it twice)."""
    return vae_from_state_dict(ckpt["vae_config"], ckpt["vae"], f"tokenizer checkpoint {path} ({flag})", device)


def vae_checkpoint(vae: VQVAE) -> dict[str, Any]:
    """The self-describing dict of a tokenizer, {"vae_config", "vae"}, as `load_vae` (--vae_ckpt) reads it."""
    return {"vae_config": dataclasses.asdict(vae.config), "vae": vae.state_dict()}


def mvar_checkpoint(mvar: MVAR, vae: VQVAE | None = None) -> dict[str, Any]:
    """The self-describing dict our tools save: config + weights (+ the tokenizer when given)."""
    ckpt: dict[str, Any] = {"config": dataclasses.asdict(mvar.config), "model": mvar.state_dict()}
    if vae is not None:
        ckpt.update(vae_checkpoint(vae))
    return ckpt
