"""The Hugging Face Hub format: safetensors weights + config.json, through huggingface_hub's PyTorchModelHubMixin.

`MVARHF` and `VQVAEHF` are MVAR and VQVAE with `save_pretrained` / `from_pretrained` / `push_to_hub`. A model
folder (or Hub repo) samples on its own:

    config.json                   MVARConfig fields (not the kernel choices: those are picked where it runs)
    model.safetensors             M-VAR weights
    tokenizer/config.json         VQVAEConfig fields
    tokenizer/model.safetensors   tokenizer weights
    README.md                     model card

Loading is offline-first: a local folder; else the file in the Hugging Face cache; else, unless HF_HUB_OFFLINE
is set, a download. A miss names the repo and the cache. Weights are read with safetensors (no pickle runs), checked
against the digest that `save_weights` records in the file's metadata (files without one load as they are), and
loaded strictly by the checked loaders of models/loading.py and models/tokenizer.py. model.safetensors records
the content hash of the tokenizer it was saved with (metadata `tokenizer_weights`): another tokenizer of the same
shape (a replaced tokenizer/ folder, or one passed in) decodes the model's tokens into noise, so it is refused
unless `allow_other_tokenizer` says it is meant. It also records the class names of the run that trained it, when
known (metadata `class_names`; `MVARHF.class_names`), which the web app shows.
"""
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from models.loading import CHECKPOINT_SUFFIXES, DIGEST_KEY, MVAR_REPO, NO_INTERNET_HINT, VAR_REPO, CheckpointError, \
    check_digest, config_from_state_dict, embedded_vae, existing_file, file_digest, hf_offline, is_ours, load_mvar, \
    load_mvar_checkpoint, load_vae, resolve_checkpoint, trained_tokenizer_step, vae_from_state_dict, weights_digest
from models.mvar import MVAR, MVARConfig
from models.presets import format_patch_nums
from models.tokenizer import VQVAE

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "config.json", "model.safetensors", "tokenizer"
TOKENIZER_KEY = "tokenizer_weights"  # model.safetensors metadata: weights_digest of its tokenizer
CLASS_NAMES_KEY = "class_names"  # model.safetensors metadata: the training run's class names, a JSON list
CONFIG_KEY = "config"  # model.safetensors metadata: the config.json it was saved with (sorted JSON)
PAPER_URL = "https://arxiv.org/abs/2411.10433"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
OFFICIAL_DATA = "ImageNet-1k train set (the official release)"
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Where the files come from
# ----------------------------------------------------------------------------------------------------------------
def model_folder(source: str | os.PathLike) -> Path | None:
    """The local model folder `source` names: the folder itself, or the folder of the model.safetensors given (beside
    its config.json); None for anything else."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.name == WEIGHTS_FILE and path.is_file() and (path.parent / CONFIG_FILE).is_file():
        return path.parent
    return None


def is_hub_source(source: str | os.PathLike) -> bool:
    """True for a model folder (or its model.safetensors), or for a repo id ("org/name") that is not a local path
    nor a checkpoint name."""
    path = Path(source)
    if model_folder(path) is not None:
        return True
    text = str(source)
    return not path.exists() and bool(_REPO_ID.fullmatch(text)) and not text.endswith(CHECKPOINT_SUFFIXES)


class HubSource:
    """The files of a model folder or Hub repo; `flag` is what errors call it (e.g. "--ckpt"). A repo's files come
    from the cache first (`revision`: a branch, tag or commit; `token` for a gated or private repo;
    `local_files_only`: never download), as huggingface_hub's own from_pretrained takes them, and all from the
    commit the first one came from (a branch that moves meanwhile, or a cache whose refs moved on after an
    interrupted download, would mix one commit's config with another's weights)."""

    def __init__(self, source: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 flag: str = "--ckpt", revision: str | None = None, token: str | bool | None = None,
                 local_files_only: bool = False):
        self.source, self.cache_dir, self.flag = str(source), cache_dir, flag
        self.hub_kwargs = {"revision": revision, "token": token, "local_files_only": local_files_only}
        self.folder = model_folder(source)
        if self.folder is None and not is_hub_source(source):
            raise FileNotFoundError(f"{flag}={source}: neither a model folder nor a Hugging Face repo id (org/name)")
        if self.folder is None and Path(source).parent.is_dir():  # a typo in a local path, not a repo's name
            raise FileNotFoundError(f"{flag}={source}: {Path(source).parent}/ has no folder {Path(source).name} (a "
                                    f"repo id org/name is looked up on the Hub only where no local folder org/ exists)")

    def file(self, name: str) -> Path:
        """Local path of `name` (e.g. "tokenizer/config.json"): in the folder, or from the cache / a download."""
        if self.folder is not None:
            path = self.folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{self.flag}={self.source}: the folder has no {name} (expected a folder "
                                        f"written by save_pretrained or scripts/export.py)")
            return path
        try:
            path = resolve_checkpoint(None, self.source, name, self.flag, cache_dir=self.cache_dir, **self.hub_kwargs)
            self.hub_kwargs["revision"] = path.parents[len(Path(name).parts) - 1].name  # .../snapshots/<commit>/name
            return path
        except FileNotFoundError as e:
            if self.source in (MVAR_REPO, VAR_REPO):
                raise FileNotFoundError(f"{self.flag}={self.source}: that repo holds the official .pth files, not a "
                                        "Hub-format folder: pass --depth=N (with --arch=var for VAR's) to use its "
                                        f"dN.pth, or {self.flag}=path/to/dN.pth") from e
            cache = Path(self.cache_dir) if self.cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)
            offline = " (HF_HUB_OFFLINE is set)" if hf_offline() else ""
            cause = f" ({type(e.__cause__).__name__}: {str(e.__cause__).splitlines()[0]})" if e.__cause__ else ""
            raise FileNotFoundError(
                f"{self.flag}={self.source}: no such local folder, and {name} of the Hugging Face repo "
                f"{self.source} is neither in the cache at {cache} nor downloadable{offline}{cause}.\n"
                f"On a machine with internet access run `hf download {self.source}` (copy the cache folder over "
                f"if needed), or point {self.flag} at a folder written by scripts/export.py."
                f"{'' if hf_offline() else NO_INTERNET_HINT}") from e

    def json(self, name: str) -> dict[str, Any]:
        path = self.file(name)
        try:
            return json.loads(path.read_text())
        except ValueError as e:  # not JSON, or not text
            raise CheckpointError(f"{path} is not valid JSON ({e}): expected the {name} that scripts/export.py "
                                  "writes") from e

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of the safetensors file `name`, checked against the digest in its metadata."""
        state = self._read_safetensors(name, lambda path: load_file(path, device="cpu"))
        recorded = self.metadata(name).get(DIGEST_KEY)
        if recorded is not None:
            check_digest(state, recorded, f"{self.flag}={self.source}: {self.file(name)}")
        return state

    def metadata(self, name: str) -> dict[str, str]:
        """The string metadata in the header of the safetensors file `name`."""
        def read(path: Path) -> dict[str, str]:
            with safe_open(path, framework="pt") as f:
                return f.metadata() or {}
        return self._read_safetensors(name, read)

    def _read_safetensors(self, name: str, read: Callable[[Path], Any]) -> Any:
        path = self.file(name)
        try:
            return read(path)
        except Exception as e:  # noqa: BLE001 (truncated, zero-filled, not safetensors: safetensors names no file)
            raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}): expected a complete safetensors "
                                  "file; copy or download it again") from e

    def __str__(self) -> str:
        return self.source


def save_weights(module: nn.Module, folder: Path, config: dict[str, Any], metadata: dict[str, str] | None = None
                 ) -> None:
    """config.json + model.safetensors of `module` into `folder`, the digest of its tensors in the header
    (`metadata`: more header entries)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state_dict = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state_dict, folder / WEIGHTS_FILE,
              metadata={"format": "pt", DIGEST_KEY: file_digest(state_dict),
                        CONFIG_KEY: json.dumps(config, sort_keys=True), **(metadata or {})})
    (folder / WEIGHTS_FILE).chmod(0o666 & ~current_umask())  # safetensors creates it 0600: others could not read it


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
class VQVAEHF(VQVAE, PyTorchModelHubMixin, library_name="mvar", paper_url=PAPER_URL,
              tags=["vqvae", "image-tokenizer"]):
    """VAR's multi-scale VQVAE in the Hub format (a folder with config.json + model.safetensors)."""

    def _save_pretrained(self, save_directory: Path) -> None:
        save_weights(self, save_directory, dataclasses.asdict(self.config))

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | HubSource, *, subfolder: str = "",
                        device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                        flag: str = "--vae_ckpt", revision: str | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, **vae_kwargs: Any) -> "VQVAEHF":
        """A tokenizer folder or repo id (`subfolder`: where in it, e.g. "tokenizer"; `revision`, `token`,
        `local_files_only` as in huggingface_hub); `vae_kwargs` override config fields (e.g. v_patch_nums)."""
        src = source if isinstance(source, HubSource) else HubSource(source, cache_dir, flag, revision, token,
                                                                     local_files_only)
        prefix = f"{subfolder}/" if subfolder else ""
        return vae_from_state_dict(src.json(prefix + CONFIG_FILE), src.weights(prefix + WEIGHTS_FILE),
                                   f"tokenizer {src} ({prefix + WEIGHTS_FILE})", device, cls=cls, **vae_kwargs)


class TokenizerMismatchError(ValueError):
    """A tokenizer whose weights are not those of the one the model was trained or exported with."""


def check_own_tokenizer(vae: nn.Module, own_digest: str | None, what: str, model: str, allow: bool,
                        model_V_Cvae: tuple[int, int]) -> None:
    """TokenizerMismatchError unless `vae` (described by `what`) has the weights of `own_digest` (weights_digest of
    the tokenizer that `model` was trained with; None: not recorded, nothing to check) or `allow` (then a warning).
    A tokenizer whose vocabulary or latent channels differ from the model's (`model_V_Cvae`) never fits."""
    if (vae.vocab_size, vae.Cvae) != tuple(model_V_Cvae):
        raise TokenizerMismatchError(f"{what} (V={vae.vocab_size}, Cvae={vae.Cvae}) does not fit {model} "
                                     f"(V={model_V_Cvae[0]}, Cvae={model_V_Cvae[1]}): pass the tokenizer it was "
                                     "trained with")
    if own_digest is None or weights_digest(vae.state_dict()) == own_digest:
        return
    message = (f"{what} is not the tokenizer {model} was trained with (same shapes, other weights): the model's "
               "tokens would decode into noise")
    if not allow:
        raise TokenizerMismatchError(f"{message}. Pass --allow_other_tokenizer if this is meant")
    logger.warning("%s (--allow_other_tokenizer)", message)


def read_model_file(path: Path, arch: str | None = None, patch_nums: Sequence[int] | None = None,
                    flag: str = "--ckpt") -> tuple[dict[str, Any], MVARConfig, bool]:
    """A model checkpoint file as sample.py and scripts/export.py read it -> (its dict, its config, whether it is
    ours). Ours records its config; an official raw state dict's is read off the tensor shapes, with `arch` (its
    attention-only keys cannot tell VAR from the intra ablation) and `patch_nums` where they cannot tell."""
    ckpt = load_mvar_checkpoint(path, flag)
    ours = is_ours(ckpt)
    try:
        config = MVARConfig.from_dict(ckpt["config"]) if ours else \
            config_from_state_dict(ckpt, patch_nums, **({"arch": arch} if arch else {}))
    except (KeyError, TypeError, ValueError) as e:  # not a model, or a config with impossible values
        raise ValueError(f"{flag}={path}: {e.args[0]}") from e
    return ckpt, config, ours


def model_file_tokenizer(ckpt: dict[str, Any], path: Path, config: MVARConfig, vae_ckpt: str | None,
                         allow_other: bool, device: str | torch.device = "cpu") -> tuple[VQVAE, str]:
    """The tokenizer that decodes the tokens of the model file `path` (`read_model_file`): the one our checkpoint
    embeds, unless `vae_ckpt` is given, else VAR's from the Hugging Face cache; another than the embedded one is
    checked against it (`check_own_tokenizer`) -> (tokenizer, "embedded", "official" or the --vae_ckpt file's name)."""
    embedded = "vae" in ckpt and "vae_config" in ckpt
    if vae_ckpt is None and embedded:
        return embedded_vae(ckpt, path, device), "embedded"
    if not is_ours(ckpt) and (step := trained_tokenizer_step(vae_ckpt)) is not None:  # official: VAR's tokenizer
        message = (f"--vae_ckpt={vae_ckpt} is a tokenizer trained here (tokenizer training, step {step}), but "
                   f"--ckpt={path} holds official weights, trained with VAR's vae_ch160v4096z32.pth: the model's "
                   "tokens would decode into noise")
        if not allow_other:
            raise TokenizerMismatchError(f"{message}. Leave --vae_ckpt out (VAR's, from the Hugging Face cache) or "
                                         "pass VAR's file; --allow_other_tokenizer if this is meant")
        logger.warning("%s (--allow_other_tokenizer)", message)
    vae = load_vae(vae_ckpt, device=device, v_patch_nums=config.patch_nums)
    check_own_tokenizer(vae, weights_digest(ckpt["vae"]) if embedded else None,
                        f"--vae_ckpt={vae_ckpt}" if vae_ckpt else "VAR's tokenizer (Hugging Face cache)",
                        f"--ckpt={path}", allow_other, (config.V, config.Cvae))
    return vae, "official" if vae_ckpt is None else Path(vae_ckpt).name


class ModelWeights(NamedTuple):
    """A model's weights as --init_from reads them, with what the file records of their training: the weights_digest
    of the tokenizer and the config (None where not recorded: official raw files)."""
    state: dict[str, torch.Tensor]
    tokenizer_digest: str | None
    config: MVARConfig | None


def read_model_weights(source: str | os.PathLike, flag: str) -> ModelWeights:
    """The weights of a model in any of its formats: a Hub model folder, its model.safetensors or a repo id; our
    checkpoint (a training one too); an official raw state dict. `flag` names the source in errors (e.g. train.py's
    --init_from)."""
    if is_hub_source(source):
        src = HubSource(source, flag=flag)
        return ModelWeights(src.weights(WEIGHTS_FILE), src.metadata(WEIGHTS_FILE).get(TOKENIZER_KEY), read_config(src))
    ckpt = load_mvar_checkpoint(existing_file(source, flag), flag)  # a tokenizer's file is refused here
    if is_ours(ckpt):  # ours embeds the tokenizer it was trained with (official files do not)
        return ModelWeights(ckpt["model"], weights_digest(ckpt["vae"]) if "vae" in ckpt else None,
                            MVARConfig.from_dict(ckpt["config"]))
    return ModelWeights(ckpt, None, None)


# ----------------------------------------------------------------------------------------------------------------
# M-VAR
# ----------------------------------------------------------------------------------------------------------------
def read_config(source: str | os.PathLike | HubSource, cache_dir: str | os.PathLike | None = None,
                flag: str = "--ckpt") -> MVARConfig:
    """The MVARConfig of a model folder or repo id, without reading its weights."""
    src = source if isinstance(source, HubSource) else HubSource(source, cache_dir, flag)
    try:
        return MVARConfig.from_dict(src.json(CONFIG_FILE))
    except (TypeError, ValueError) as e:  # unknown or missing fields, impossible values
        raise CheckpointError(f"{src.file(CONFIG_FILE)} is not an M-VAR config ({e})") from e


class MVARHF(MVAR, PyTorchModelHubMixin, library_name="mvar", paper_url=PAPER_URL,
             tags=["m-var", "image-generation", "class-conditional"]):
    """MVAR in the Hub format; `save_pretrained` also writes the attached tokenizer into `tokenizer/`, and
    `from_pretrained` attaches it again, so one folder or repo id samples. `class_names`: the names of the classes,
    saved with the weights when set (scripts/export.py takes a training run's)."""

    class_names: list[str] | None = None

    def _save_pretrained(self, save_directory: Path) -> None:
        metadata = {TOKENIZER_KEY: weights_digest(self.vae.state_dict())} if self.vae_proxy else {}
        if self.class_names is not None:
            metadata[CLASS_NAMES_KEY] = json.dumps(list(self.class_names))
        save_weights(self, save_directory, dataclasses.asdict(self.config), metadata)
        if self.vae_proxy:
            save_weights(self.vae, save_directory / TOKENIZER_DIR, dataclasses.asdict(self.vae.config))
        elif (save_directory / TOKENIZER_DIR).exists():  # an earlier save's, which would load as this model's own
            shutil.rmtree(save_directory / TOKENIZER_DIR)
            logger.info("removed %s: this model has no tokenizer attached", save_directory / TOKENIZER_DIR)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | HubSource, *, device: str | torch.device = "cpu",
                        cache_dir: str | os.PathLike | None = None, vae: VQVAE | None = None, flag: str = "--ckpt",
                        allow_other_tokenizer: bool = False, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False,
                        vae_name: str = "the given tokenizer", **config_overrides: Any) -> "MVARHF":
        """A model folder or repo id (`revision`: a branch, tag or commit to pin; `token`, `local_files_only` as in
        huggingface_hub) -> the model in eval mode with its tokenizer attached (or `vae` when given; `vae_name` names
        it in errors, e.g. the flag that gave it). A tokenizer other than the one it was saved with is a
        TokenizerMismatchError unless `allow_other_tokenizer`. `config_overrides` change non-weight settings
        (attn_backend, mamba_backend, ...)."""
        src = source if isinstance(source, HubSource) else HubSource(source, cache_dir, flag, revision, token,
                                                                     local_files_only)
        config = src.json(CONFIG_FILE)
        what = vae_name if vae is not None else f"{src}/{TOKENIZER_DIR}"
        if vae is None:
            vae = VQVAEHF.from_pretrained(src, subfolder=TOKENIZER_DIR, device=device,
                                          v_patch_nums=config["patch_nums"])
        metadata = src.metadata(WEIGHTS_FILE)
        if CONFIG_KEY in metadata and MVARConfig.from_dict(json.loads(metadata[CONFIG_KEY])) != \
                MVARConfig.from_dict(config):
            raise CheckpointError(f"{src.file(CONFIG_FILE)} is not the config {src.file(WEIGHTS_FILE)} was saved "
                                  f"with ({metadata[CONFIG_KEY]}): a half-written export, or an edited config")
        check_own_tokenizer(vae, metadata.get(TOKENIZER_KEY), what, f"{src}/{WEIGHTS_FILE}", allow_other_tokenizer,
                            (config["V"], config["Cvae"]))
        ckpt = {"config": config, "model": src.weights(WEIGHTS_FILE)}
        model = load_mvar(ckpt, device=device, vae=vae, model_cls=cls, name=f"{src} ({WEIGHTS_FILE})",
                          **config_overrides)
        if CLASS_NAMES_KEY in metadata:
            model.class_names = json.loads(metadata[CLASS_NAMES_KEY])
        return model

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """README.md of the folder; kwargs: repo_id, training_data, metrics ({name: value}), source."""
        return ModelCard(model_card_text(self, **kwargs))


def training_data(ckpt: dict) -> str:
    """What a checkpoint says it was trained on: our train.py flags; "not recorded" for a file of ours without them
    (`mvar_checkpoint`'s); else the official release."""
    flags = ckpt.get("args")
    if not isinstance(flags, dict):
        return "not recorded" if is_ours(ckpt) else OFFICIAL_DATA
    if flags.get("tokens"):  # trained on the cache's ids (--data_path then gives only the validation images)
        data = f"the token cache {flags['tokens']} (scripts/extract_tokens.py)"
    else:
        data = flags.get("data_path") or f"embedded `{flags.get('dataset')}` (utils/data/embedded.py)"
    return f"{data}, {flags.get('ep')} epochs, batch {flags.get('bs')} (train.py)"


def model_card_text(mvar: MVAR, repo_id: str | None = None, training_data: str | None = None,
                    metrics: dict[str, str] | None = None, source: str | None = None,
                    fid_sample: str | None = None) -> str:
    """A model card: architecture, parameter count, training data, metrics, and the commands that use it.
    `fid_sample`: the `.npz` that `sample.py --fid --preset fid` writes for this model (scripts/export.py names
    it), shown in the FID commands of ImageNet models."""
    c = mvar.config
    name = repo_id or "path/to/this/folder"
    reso = mvar.image_size if mvar.vae_proxy else None
    n_params = sum(p.numel() for p in mvar.parameters())
    mix = f", first {c.var_blocks} blocks VAR" if c.var_blocks else ""
    rows = [("architecture", f"`{c.arch}`{mix}, depth {c.depth}, width {c.embed_dim}, {c.num_heads} heads"),
            ("parameters", f"{n_params / 1e6:.2f}M (transformer; the tokenizer is not counted)"),
            ("classes", str(c.num_classes)), ("scales", format_patch_nums(c.patch_nums)),
            ("image size", f"{reso} px" if reso else "see the tokenizer"), ("codebook", f"{c.V} x {c.Cvae}"),
            ("training data", training_data or "not recorded"), ("exported from", f"`{source}`" if source else "-")]
    rows += [(k, str(v)) for k, v in (metrics or {}).items()]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    classes = " ".join(str(i) for i in range(min(c.num_classes, 4)))
    lines = [
        "---", "library_name: mvar", "tags:", "- m-var", "- image-generation", "- class-conditional",
        "- pytorch_model_hub_mixin", "---", "",
        f"# M-VAR ({c.arch}, depth {c.depth})", "",
        f"Class-conditional scale-wise autoregressive image generator ([M-VAR]({PAPER_URL})), in the safetensors "
        "format of this repository's `models/hub_format.py`: `config.json` + `model.safetensors`, the tokenizer in "
        "`tokenizer/`.", "",
        "| | |", "|---|---|", table, "",
        "## Use", "", "```bash",
        f"python sample.py --ckpt {name} --classes {classes} --num_per_class 4 --cfg 1.5 --top_k 900 --top_p 0.96 "
        "--out grid.png",
        f"python sample.py --ckpt {name} --edit image.png --box 0,{(reso or 16) // 2},{reso or 16},{reso or 16} "
        f"--classes {classes.split()[0]} --out edit.png",
    ]
    if c.num_classes == 1000 and reso in (256, 512) and fid_sample:
        ref = "VIRTUAL_imagenet256_labeled.npz" if reso == 256 else "VIRTUAL_imagenet512.npz"
        lines += [f"torchrun --nproc_per_node=8 sample.py --ckpt {name} --fid --preset fid --fid_dir samples --fp16",
                  f"python scripts/fid.py --sample samples/{fid_sample} --ref {ref}"]
    lines += ["```", "", "In Python:", "", "```python", "from models.hub_format import MVARHF",
              f"mvar = MVARHF.from_pretrained({name!r})",
              "img_B3HW = mvar.autoregressive_infer_cfg(4, label_B=0, g_seed=0, cfg=1.5, top_k=900, top_p=0.96)",
              "```", ""]
    return "\n".join(lines)
