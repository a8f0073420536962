"""M-VAR: scale-wise autoregressive transformer with intra-scale attention and an inter-scale Mamba2 scan.

Reads top to bottom: config -> FFN / adaLN helpers -> HybridBlock -> MVAR. The architectures (`ARCH_BRANCHES`) and
the size registry (`MVAR_models`, name -> MVARConfig fields) live in the leaf `models.presets`, read by the CLIs.

Shape legend: B batch, L tokens of all scales (680 at 256 px), l tokens of one scale (pn*pn), C width
(64*depth), D condition width (= C), V vocabulary size, Cvae tokenizer latent width, K number of scales.

Architectures (`MVARConfig.arch`, the paper's Table 6 ablation):
    mvar   intra-scale attention -> Mamba2 over all scales -> FFN, 9C adaLN (the paper's model, default)
    var    block-causal global attention -> FFN, 6C adaLN (VAR's own layout: VAR checkpoints load)
    intra  intra-scale attention -> FFN, 6C adaLN (no inter-scale path)
    mamba  Mamba2 over all scales -> FFN, 6C adaLN (no attention)
`var_blocks=K` keeps the first K blocks as VAR blocks and the rest `arch` (the paper's Figure 5, "from VAR to
M-VAR": 0 = all M-VAR, depth = all VAR).
"""
import contextlib
import itertools
import math
from dataclasses import asdict, dataclass
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from models import editing
from models.attention import ScaleAttention
from models.backends import ATTN, MAMBA, check_name
from models.mamba2 import HEADDIM, Mamba2, Mamba2State
from models.precision import linear_weights_in
from models.presets import ARCH_BRANCHES, PATCH_NUMS
from models.sampling import gumbel_softmax_with_rng, sample_with_top_k_top_p_

GAMMA_ROWS = ("official", "all")
# Config keys of checkpoints written before the kernel choice left the config (models.backends): ignored on load.
LEGACY_KERNEL_KEYS = ("attn_backend", "mamba_backend")
TRAINING_ONLY = ("drop_rate", "attn_drop_rate", "drop_path_rate", "cond_drop_rate")  # regularisation, not the function


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MVARConfig:
    """Everything needed to rebuild an MVAR; stored in every checkpoint as `dataclasses.asdict(config)`."""

    depth: int = 16
    num_classes: int = 1000
    V: int = 4096
    Cvae: int = 32
    patch_nums: tuple[int, ...] = PATCH_NUMS[256]
    arch: str = "mvar"
    var_blocks: int = 0  # the first var_blocks blocks are VAR blocks (block-causal attention + FFN, 6C adaLN)
    embed_dim: int | None = None  # None -> 64 * depth
    num_heads: int | None = None  # None -> embed_dim // 64 (= depth by default: head_dim 64)
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None  # None -> 0.1 * depth / 24
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2

    @classmethod
    def from_dict(cls, stored: dict, **overrides) -> "MVARConfig":
        """The config of a checkpoint (`dataclasses.asdict`), older ones included: their kernel choices
        (`LEGACY_KERNEL_KEYS`) are dropped, any other unknown key is an error."""
        return cls(**{k: v for k, v in {**stored, **overrides}.items() if k not in LEGACY_KERNEL_KEYS})

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        bad = [f"{k}={getattr(self, k)}" for k in ("depth", "num_classes", "V", "Cvae") if getattr(self, k) < 1]
        bad += [f"{k}={v}" for k in ("embed_dim", "num_heads") if (v := getattr(self, k)) is not None and v < 1]
        bad += [f"patch_nums={self.patch_nums}"] if min(self.patch_nums, default=0) < 1 else []
        if bad:
            raise ValueError(f"{', '.join(bad)}: expected sizes >= 1")
        if self.arch not in ARCH_BRANCHES:
            raise ValueError(f"arch={self.arch!r}: expected one of {sorted(ARCH_BRANCHES)}")
        if self.embed_dim is None:
            self.embed_dim = 64 * self.depth
        if self.num_heads is None:
            self.num_heads = max(1, self.embed_dim // 64)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        d_inner = self.expand * self.embed_dim
        if d_inner % HEADDIM and any("mamba" in self.block_branches(i) for i in range(self.depth)):
            raise ValueError(f"embed_dim={self.embed_dim}: Mamba2's expand x embed_dim = {d_inner} must be a "
                             f"multiple of its head size {HEADDIM}")
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate={self.drop_path_rate}: expected [0, 1) (the last block's rate)")
        if not 0 <= self.var_blocks <= self.depth:
            raise ValueError(f"var_blocks={self.var_blocks}: expected 0..depth={self.depth}")
        if self.shared_aln and len({len(self.block_branches(i)) for i in range(self.depth)}) > 1:
            raise ValueError(f"shared_aln needs one adaLN layout for all blocks; var_blocks={self.var_blocks} mixes "
                             f"VAR (6C) and {self.arch} ({3 * len(ARCH_BRANCHES[self.arch])}C) blocks")

    def design_differences(self, other: "MVARConfig") -> list[str]:
        """'field=mine -> theirs' for each field that differs, the regularisation (`TRAINING_ONLY`) aside: what
        makes the same weights compute another function (e.g. arch var / intra, num_heads) or have other shapes."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}={mine[k]} -> {theirs[k]}" for k in mine if k not in TRAINING_ONLY and mine[k] != theirs[k]]

    def block_arch(self, block_idx: int) -> str:
        return "var" if block_idx < self.var_blocks else self.arch

    def block_branches(self, block_idx: int) -> tuple[str, ...]:
        return ARCH_BRANCHES[self.block_arch(block_idx)]


# ----------------------------------------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------------------------------------
class FFN(nn.Module):
    """fc1 C->4C, GELU(tanh), fc2 4C->C."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SharedAdaLin(nn.Linear):
    """Linear(D, n*C) whose output is viewed as (B, 1, n, C): one modulation for all blocks (`shared_aln`)."""

    def __init__(self, in_features: int, out_features: int, n_chunks: int):
        super().__init__(in_features, out_features)
        self.n_chunks = n_chunks

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, self.n_chunks, self.out_features // self.n_chunks)


class AdaLNBeforeHead(nn.Module):
    """Non-affine LayerNorm modulated by the class condition, right before the output head."""

    def __init__(self, C: int, D: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class MambaPrefixCache:
    """The official sampler's strategy, kept as a reference: re-run Mamba over the whole prefix at each scale."""

    def __init__(self):
        self.h_BLC: torch.Tensor | None = None

    def __call__(self, mamba: Mamba2, h_BlC: torch.Tensor) -> torch.Tensor:
        self.h_BLC = h_BlC if self.h_BLC is None else torch.cat((self.h_BLC, h_BlC), dim=1)
        return mamba(self.h_BLC)[:, -h_BlC.shape[1]:]


# ----------------------------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------------------------
class HybridBlock(nn.Module):
    """One M-VAR block: pre-norm residual branches (attention, Mamba2, FFN by `arch`), each adaLN-modulated.

    For n branches the condition yields 3n vectors: gamma_1..n, scale_1..n, shift_1..n, and branch i computes
    x += drop_path(gamma_i * branch_i(LN(x) * (1 + scale_i) + shift_i)).
    """

    def __init__(self, config: MVARConfig, block_idx: int, drop_path: float, attn_backend: str = "auto",
                 mamba_backend: str = "auto"):
        super().__init__()
        C = config.embed_dim
        arch = config.block_arch(block_idx)
        self.block_idx, self.C, self.branches = block_idx, C, ARCH_BRANCHES[arch]
        self.n_chunks = 3 * len(self.branches)
        # the rate as a tensor in forward: to torch.compile a float is a constant, and blocks compiled one by one
        # (FSDP2's hooks break the graph between them) would each need a graph of their own
        self.register_buffer("drop_path_t", torch.tensor(float(drop_path)), persistent=False)
        self.has_drop_path = drop_path > 0
        self.shared_aln = config.shared_aln
        if "attn" in self.branches:
            self.attn = ScaleAttention(
                C, config.num_heads, attn_l2_norm=config.attn_l2_norm, attn_drop=config.attn_drop_rate,
                proj_drop=config.drop_rate, mode="causal" if arch == "var" else "intra",
                backend=attn_backend,
            )
        if "mamba" in self.branches:
            self.mamba = Mamba2(
                d_model=C, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                backend=mamba_backend,
            )
        self.ffn = FFN(C, round(C * config.mlp_ratio), drop=config.drop_rate)
        self.ln_wo_grad = nn.LayerNorm(C, eps=config.norm_eps, elementwise_affine=False)
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, self.n_chunks, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, self.n_chunks * C))

    def forward(
        self, x_BLC: torch.Tensor, cond_BD_or_gss: torch.Tensor, seg_lens: Sequence[int],
        mamba_state: None | Mamba2State | MambaPrefixCache = None,
    ) -> torch.Tensor:
        """`seg_lens`: token count of each scale in `x_BLC`; `mamba_state` carries the scan across calls."""
        if self.shared_aln:
            mods = (self.ada_gss + cond_BD_or_gss).unbind(2)  # (1,1,3n,C) + (B,1,3n,C) -> 3n x (B,1,C)
        else:
            mods = self.ada_lin(cond_BD_or_gss).view(-1, 1, self.n_chunks, self.C).unbind(2)
        n = len(self.branches)
        for i, name in enumerate(self.branches):
            gamma, scale, shift = mods[i], mods[n + i], mods[2 * n + i]
            h_BLC = self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
            if name == "attn":
                h_BLC = self.attn(h_BLC, seg_lens)
            elif name == "mamba":
                h_BLC = mamba_state(self.mamba, h_BLC) if isinstance(mamba_state, MambaPrefixCache) \
                    else self.mamba(h_BLC, mamba_state)
            else:
                h_BLC = self.ffn(h_BLC)
            x_BLC = x_BLC + self.stochastic_depth(h_BLC.mul(gamma))
        return x_BLC

    @property
    def drop_path(self) -> float:
        """The block's stochastic-depth rate."""
        return self.drop_path_t.item()

    def stochastic_depth(self, h_BLC: torch.Tensor) -> torch.Tensor:
        """torchvision's `stochastic_depth(h, drop_path, "row", training)` in distribution (not draw for draw: a
        tensor rate takes another bernoulli kernel): in training, each sample's branch is dropped with probability
        drop_path and the kept ones scaled by 1 / (1 - drop_path)."""
        if not (self.training and self.has_drop_path):
            return h_BLC
        keep = 1.0 - self.drop_path_t
        noise_B11 = h_BLC.new_empty((h_BLC.shape[0],) + (1,) * (h_BLC.ndim - 1)).bernoulli_(keep)
        return h_BLC * noise_B11.div_(keep)

    @property
    def uses_kv_cache(self) -> bool:
        """VAR's block-causal attention needs its KV cache when sampling scale by scale."""
        return hasattr(self, "attn") and self.attn.mode == "causal"

    def extra_repr(self) -> str:
        return f"branches={self.branches}, shared_aln={self.shared_aln}, drop_path={self.drop_path:g}"


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class MVAR(nn.Module):
    """Class-conditional next-scale prediction. `forward` is the teacher-forced training pass; sampling is
    `autoregressive_infer_cfg` (needs the tokenizer: `MVAR(config, vae=vae)` or `attach_vae`).
    `attn_backend` / `mamba_backend` pick the kernels (models.backends); `set_backends` changes them later.
    `grad_ckpt` (a run-time switch like the kernels, not part of the config): activation checkpointing per block in
    training, each block's activations recomputed in the backward instead of kept (train.py --grad_ckpt)."""

    def __init__(self, config: MVARConfig, vae: nn.Module | None = None, attn_backend: str = "auto",
                 mamba_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.depth, self.C, self.D = config.depth, config.embed_dim, config.embed_dim
        self.num_heads, self.num_classes = config.num_heads, config.num_classes
        self.V, self.Cvae = config.V, config.Cvae
        self.cond_drop_rate = config.cond_drop_rate

        self.patch_nums = config.patch_nums
        self.seg_lens = tuple(pn * pn for pn in self.patch_nums)
        self.L, self.first_l = sum(self.seg_lens), self.seg_lens[0]
        ends = list(itertools.accumulate(self.seg_lens))
        self.begin_ends = [(end - n, end) for end, n in zip(ends, self.seg_lens, strict=True)]
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.vae_proxy: tuple[nn.Module, ...] = ()  # tuple: the tokenizer is not a submodule (not in state_dict)
        if vae is not None:
            self.attach_vae(vae)

        # 1. input (word), class and position embeddings
        C, init_std = self.C, math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(self.num_classes + 1, C)  # last row = null class for guidance
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t.data, mean=0, std=init_std)
        lvl_1L = torch.cat([torch.full((n,), i) for i, n in enumerate(self.seg_lens)]).view(1, self.L)
        self.register_buffer("lvl_1L", lvl_1L, persistent=False)

        # 2. blocks (drop path increases linearly over depth)
        n_chunks = 3 * len(config.block_branches(0))  # one layout for all blocks under shared_aln
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, n_chunks * C, n_chunks))
            if config.shared_aln else nn.Identity()
        )
        dpr = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList([HybridBlock(config, i, dpr[i], attn_backend, mamba_backend)
                                     for i in range(config.depth)])
        self.attn_backend, self.mamba_backend = attn_backend, mamba_backend
        self.grad_ckpt = False

        # 3. head
        self.head_nm = AdaLNBeforeHead(C, self.D, eps=config.norm_eps)
        self.head = nn.Linear(C, self.V)
        self.rng: torch.Generator | None = None

    # ---- helpers -----------------------------------------------------------------------------------------------
    def attach_vae(self, vae: nn.Module) -> None:
        """Attach the tokenizer used by `autoregressive_infer_cfg` (kept out of the state dict)."""
        if vae.Cvae != self.Cvae or vae.vocab_size != self.V:
            raise ValueError(f"tokenizer (V={vae.vocab_size}, Cvae={vae.Cvae}) does not match the model "
                             f"(V={self.V}, Cvae={self.Cvae})")
        if tuple(vae.quantize.v_patch_nums) != tuple(self.patch_nums):  # its next-scale inputs would not fit
            raise ValueError(f"tokenizer's patch schedule {vae.quantize.v_patch_nums} is not the model's "
                             f"{tuple(self.patch_nums)}: build it with v_patch_nums={tuple(self.patch_nums)} "
                             "(load_vae(..., v_patch_nums=...))")
        self.vae_proxy = (vae,)

    def set_backends(self, attn_backend: str | None = None, mamba_backend: str | None = None) -> None:
        """Switch the kernels of every block (None keeps the current one); weights and outputs are unchanged."""
        self.attn_backend = check_name(ATTN, attn_backend or self.attn_backend)
        self.mamba_backend = check_name(MAMBA, mamba_backend or self.mamba_backend)
        for block in self.blocks:
            if hasattr(block, "attn"):
                block.attn.backend = self.attn_backend
            if hasattr(block, "mamba"):
                block.mamba.backend = self.mamba_backend

    @property
    def vae(self) -> nn.Module:
        if not self.vae_proxy:
            raise RuntimeError("no tokenizer attached: build with MVAR(config, vae=vae) or call mvar.attach_vae(vae)")
        return self.vae_proxy[0]

    @property
    def image_size(self) -> int:
        """The side of the images, in pixels: the last scale times the attached tokenizer's downsampling."""
        return self.patch_nums[-1] * self.vae.downsample

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def run_blocks(
        self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, seg_lens: Sequence[int],
        mamba_states: Sequence[Mamba2State | MambaPrefixCache | None] | None = None,
    ) -> torch.Tensor:
        """All blocks on `x_BLC` (tokens of the scales `seg_lens`), then the head: logits (B, L, V) in fp32."""
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        checkpointed = self.grad_ckpt and self.training and torch.is_grad_enabled() and mamba_states is None
        for i, block in enumerate(self.blocks):
            if checkpointed:  # keeps the block's inputs; its RNG (drop path) is replayed in the recomputation
                x_BLC = torch.utils.checkpoint.checkpoint(block, x_BLC, cond_BD_or_gss, seg_lens, use_reentrant=False)
            else:
                x_BLC = block(x_BLC, cond_BD_or_gss, seg_lens, None if mamba_states is None else mamba_states[i])
        return self.get_logits(x_BLC, cond_BD)

    # ---- training ----------------------------------------------------------------------------------------------
    def compile_for_training(self, mode: str | None = None, backend: str = "inductor") -> None:
        """train.py's --tfast: torch.compile the teacher-forced pass with static shapes. Each progressive stage,
        grad mode (training, validation) and batch size is a graph of its own, and past dynamo's recompile limit
        (8) the forward would run eagerly: the limit is raised to hold them all."""
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 4 * (len(self.seg_lens) + 1))
        self.compile(mode=mode, backend=backend, dynamic=False)

    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor, prog_si: int = -1) -> torch.Tensor:
        """Teacher-forced pass. `x_BLCv_wo_first_l` (B, L-first_l, Cvae) from `idxBl_to_var_input`; returns
        logits (B, L', V) in fp32, L' = L, or the end of scale `prog_si` in progressive training (-1: all scales).

        Labels are replaced by the null class with probability `cond_drop_rate` in train mode only (the official
        code also drops them in eval mode, which makes validation metrics noisy).
        """
        ed = self.begin_ends[prog_si][1] if prog_si >= 0 else self.L
        B = label_B.shape[0]
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            if self.training and self.cond_drop_rate > 0:
                drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
                label_B = torch.where(drop, self.num_classes, label_B)
            cond_BD = self.class_emb(label_B)
            sos_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
            # an empty slice at prog_si == 0 keeps word_embed in the graph (zero grads), so DDP sees no unused params
            words_BLC = self.word_embed(x_BLCv_wo_first_l[:, : ed - self.first_l].float())
            x_BLC = torch.cat((sos_BlC, words_BLC), dim=1)
            x_BLC = x_BLC + self.lvl_embed(self.lvl_1L[:, :ed]) + self.pos_1LC[:, :ed]
        seg_lens = self.seg_lens[: prog_si + 1] if prog_si >= 0 else self.seg_lens
        return self.run_blocks(x_BLC, cond_BD, seg_lens)

    # ---- sampling ----------------------------------------------------------------------------------------------
    def begin_inference(self, batch_size: int, use_cache: bool = True) -> list[Mamba2State | MambaPrefixCache | None]:
        """Reset per-block inference state: Mamba2 states (or prefix caches) and VAR's KV caches."""
        states = []
        for block in self.blocks:
            if block.uses_kv_cache:
                block.attn.kv_caching(True)
            if not hasattr(block, "mamba"):
                states.append(None)
            elif use_cache:
                states.append(block.mamba.allocate_state(batch_size, device=self.pos_1LC.device,
                                                         dtype=self.pos_1LC.dtype))
            else:
                states.append(MambaPrefixCache())
        return states

    def end_inference(self) -> None:
        for block in self.blocks:
            if block.uses_kv_cache:
                block.attn.kv_caching(False)

    def seeded_rng(self, g_seed: int | None) -> torch.Generator | None:
        """The model's sampling generator on its device, seeded with `g_seed` (None: torch's global RNG)."""
        if g_seed is None:
            return None
        device = self.pos_1LC.device
        if self.rng is None or self.rng.device != device:
            self.rng = torch.Generator(device=device)
        return self.rng.manual_seed(g_seed)

    def sampling_labels(
        self, B: int, label_B: int | torch.LongTensor | None, rng: torch.Generator | None,
    ) -> torch.LongTensor:
        """Class ids (B,) on the model's device from a tensor, an int for all (negative = null class), or None
        (uniformly random classes drawn from `rng`). Ids are in [0, num_classes], the last being the null class
        (VAR's); others are a ValueError (they were an index error on the CPU and a device-side assert, which
        leaves the process's CUDA context unusable, on a GPU)."""
        device = self.pos_1LC.device
        if label_B is None:
            uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=device)
            return torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).view(B)
        if isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=device)
        if tuple(label_B.shape) != (B,):
            raise ValueError(f"label_B: expected {B} class ids (B,), one per image, got shape {tuple(label_B.shape)}")
        bad = label_B[(label_B < 0) | (label_B > self.num_classes)]
        if bad.numel():
            raise ValueError(f"label_B: class ids {bad.unique()[:5].tolist()} outside [0, {self.num_classes - 1}] "
                             f"(or {self.num_classes}, the null class; an int < 0: the null class for all)")
        return label_B.to(device)

    @contextlib.contextmanager
    def inference_precision(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Sample (or run `forward`) in `dtype` (None: fp32): autocast, with the Linear weights cast to `dtype` once
        for the whole block (`models.precision.linear_weights_in`) instead of on every call; the same numbers as
        plain autocast. The residual stream, norms, Mamba2 scan and logits keep autocast's precision; word_embed
        keeps its weights (forward runs it with autocast off); the tokenizer keeps its weights too, and decodes
        under the same autocast (as VAR's demo, whose autocast spans `fhat_to_img`)."""
        device_type = self.pos_1LC.device.type
        with linear_weights_in(self, dtype, keep=(self.word_embed,)), \
                torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            yield

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, B: int, label_B: int | torch.LongTensor | None, g_seed: int | None = None,
        cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, use_cache: bool = True,
    ) -> torch.Tensor:
        """Generate B images, returns (B, 3, H, W) in [0, 1].

        label_B: class ids (B,), an int for all (negative = null class), or None for uniformly random classes.
        cfg: guidance, ramped linearly over scales, t = cfg*si/(K-1), logits = (1+t)*cond - t*uncond.
        top_k / top_p: filters (0 disables). more_smooth: Gumbel-softmax mixture of codes (for pictures, not FID).
        use_cache: carry Mamba2 state from scale to scale (default); False re-runs Mamba over the whole prefix
        at each scale like the official release (a reference: same numbers, slower). Attention never needs
        a cache in the intra-scale archs; the `var` arch always uses VAR's KV cache.
        """
        rng = self.seeded_rng(g_seed)
        label_B = self.sampling_labels(B, label_B, rng)
        f_hat, _ = self.sample_scales(label_B, rng, cfg, top_k, top_p, more_smooth, use_cache)
        return self.vae.fhat_to_img(f_hat).float().add_(1).mul_(0.5)  # no second rounding in bf16

    @torch.no_grad()
    def autoregressive_edit_cfg(
        self, img_B3HW: torch.Tensor, mask: torch.Tensor, label_B: int | torch.LongTensor | None,
        g_seed: int | None = None, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
        use_cache: bool = True, keep_unmasked: bool = True, return_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.LongTensor]]:
        """Zero-shot editing (in-/out-painting, class-conditional editing; see models/editing.py): regenerate the
        masked region of images (B, 3, H, W) in [0, 1]; returns the edited images (B, 3, H, W) in [0, 1].

        mask: True (or 1) = regenerate; (H, W), (1, 1, H, W) or (B, 1, H, W). At every scale the tokens whose cell
        holds no masked pixel are the image's own; the others are sampled as in `autoregressive_infer_cfg`
        (same label_B, g_seed, cfg, top_k, top_p, more_smooth, use_cache). keep_unmasked: paste the tokenizer's
        reconstruction outside the mask (those pixels then equal it exactly); False returns the plain decode of
        the edited tokens. return_tokens: also return the token ids of every scale, (B, pn*pn) each.
        """
        img_B3HW = img_B3HW.to(self.pos_1LC.device)
        mask_B1HW = editing.check_edit_inputs(img_B3HW, mask, self.image_size)
        B = img_B3HW.shape[0]
        known = editing.known_tokens(self.vae, img_B3HW, mask_B1HW, self.patch_nums)
        rng = self.seeded_rng(g_seed)
        label_B = self.sampling_labels(B, label_B, rng)
        f_hat, ms_idx_Bl = self.sample_scales(label_B, rng, cfg, top_k, top_p, more_smooth, use_cache, known)
        img_B3HW = self.vae.fhat_to_img(f_hat).float().add_(1).mul_(0.5)
        if keep_unmasked:
            img_B3HW = editing.paste_unmasked(self.vae, known, img_B3HW, mask_B1HW)
        return (img_B3HW, ms_idx_Bl) if return_tokens else img_B3HW

    def sample_scales(
        self, label_B: torch.LongTensor, rng: torch.Generator | None, cfg: float, top_k: int, top_p: float,
        more_smooth: bool, use_cache: bool, known: editing.KnownTokens | None = None,
    ) -> tuple[torch.Tensor, list[torch.LongTensor]]:
        """The scale-by-scale sampling loop -> (f_hat (B, Cvae, h, w), drawn token ids (B, pn*pn) per scale).
        `known`: tokens that replace the drawn ones before they feed the next scale (editing)."""
        B = label_B.shape[0]
        quant = self.vae.quantize
        cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))  # (2B, D)
        lvl_pos_1LC = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        next_BlC = (cond_BD.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, -1, -1)
                    + lvl_pos_1LC[:, : self.first_l])
        f_hat = cond_BD.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        ms_idx_Bl = []
        states = self.begin_inference(2 * B, use_cache)
        try:
            for si, pn in enumerate(self.patch_nums):
                ratio = si / max(self.num_stages_minus_1, 1)
                logits_BlV = self.run_blocks(next_BlC, cond_BD, (pn * pn,), states)
                t = cfg * ratio
                logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
                # as the official code, tokens are always drawn (this filters logits_BlV in place and advances
                # rng); smoothing then mixes code vectors with a Gumbel-softmax over the filtered logits
                idx_Bl = sample_with_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, rng=rng)[:, :, 0]
                if known is not None:
                    idx_Bl = known.merge_idx(si, idx_Bl)
                ms_idx_Bl.append(idx_Bl)
                if not more_smooth:
                    h_BlCv = quant.embedding(idx_Bl)
                else:
                    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                    h_BlCv = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=tau, rng=rng) \
                        @ quant.embedding.weight.unsqueeze(0)
                    if known is not None:
                        h_BlCv = known.merge_codes(si, h_BlCv, quant.embedding(idx_Bl))
                h_BCvhw = h_BlCv.transpose(1, 2).reshape(B, self.Cvae, pn, pn).contiguous()
                f_hat, next_BCvhw = quant.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, h_BCvhw)
                if si != self.num_stages_minus_1:
                    bg, ed = self.begin_ends[si + 1]
                    with torch.autocast(next_BCvhw.device.type, enabled=False):  # in fp32, as `forward`
                        next_BlC = self.word_embed(next_BCvhw.view(B, self.Cvae, -1).transpose(1, 2).float())
                    next_BlC = (next_BlC + lvl_pos_1LC[:, bg:ed]).repeat(2, 1, 1)  # (2B, l, C) for guidance
        finally:
            self.end_inference()
        return f_hat, ms_idx_Bl

    # ---- init --------------------------------------------------------------------------------------------------
    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
        init_std: float = -1, conv_std: float = 0.02, gamma_rows: str = "official",
    ) -> None:
        """VAR's initialisation. `init_std < 0` -> sqrt(1/(3C)). Mamba2's A_log, dt_bias and D keep Mamba2's init.

        gamma_rows: which adaLN rows get `init_adaln_gamma`. "official" scales rows [:2C] (the official M-VAR code;
        in the 9C layout gamma3 then gets `init_adaln` like the scales/shifts); "all" scales every gamma.
        """
        if gamma_rows not in GAMMA_ROWS:
            raise ValueError(f"gamma_rows={gamma_rows!r}: expected one of {GAMMA_ROWS}")
        if conv_std <= 0:
            raise ValueError(f"conv_std={conv_std}: expected a positive std for the conv weights")
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.data.fill_(1.0)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight.data, std=conv_std)
                if m.bias is not None:
                    m.bias.data.zero_()
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        for block in self.blocks:
            if hasattr(block, "attn"):
                block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            n_gamma = 2 if gamma_rows == "official" else len(block.branches)
            if block.shared_aln:
                block.ada_gss.data[:, :, n_gamma:].mul_(init_adaln)
                block.ada_gss.data[:, :, :n_gamma].mul_(init_adaln_gamma)
            else:
                lin = block.ada_lin[-1]
                lin.weight.data[n_gamma * self.C:].mul_(init_adaln)
                lin.weight.data[: n_gamma * self.C].mul_(init_adaln_gamma)
                lin.bias.data.zero_()

    def extra_repr(self) -> str:
        c = self.config
        mix = f", var_blocks={c.var_blocks}" if c.var_blocks else ""
        return f"arch={c.arch}{mix}, depth={c.depth}, C={self.C}, heads={self.num_heads}, L={self.L}, " \
               f"drop_path_rate={c.drop_path_rate:g}"
