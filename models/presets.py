"""The names that the models and every CLI share, in one leaf module (no project imports), so flag choices are
read from the same source the models are built from.

PATCH_NUMS / parse_patch_nums  patch schedules (VAR's 256 and 512 px presets, or explicit sides)
ARCH_BRANCHES                  block architectures -> their residual branches (models/mvar.py builds them)
MVAR_models                    model sizes by name -> MVARConfig fields (DiT's `--model M-VAR-d16` habit)
ATTN_KERNELS / MAMBA_KERNELS   kernel backends in order of preference, portable last (models/backends.py)
"""
import itertools
from collections.abc import Sequence

PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}

ARCH_BRANCHES: dict[str, tuple[str, ...]] = {  # residual branches of one block, in order
    "mvar": ("attn", "mamba", "ffn"),
    "var": ("attn", "ffn"),
    "intra": ("attn", "ffn"),
    "mamba": ("mamba", "ffn"),
}

MVAR_models: dict[str, dict] = {  # width 64*depth unless given; the paper's Tables 1 and 5
    **{f"M-VAR-d{d}": dict(depth=d) for d in (12, 16, 20, 24, 30, 32)},
    **{f"VAR-d{d}": dict(depth=d, arch="var") for d in (12, 16, 20, 24, 30)},
    "M-VAR-W": dict(depth=16, embed_dim=768),  # Table 5: wider (262.70M; the paper says 260M)
    "M-VAR-D": dict(depth=12, embed_dim=1024),  # Table 5: deeper per width (350.13M; the paper says 340M)
    "M-VAR-d24-512": dict(depth=24, patch_nums=PATCH_NUMS[512]),
}

ATTN_KERNELS = ("flash_attn", "torch_varlen", "sdpa")
MAMBA_KERNELS = ("mamba_ssm", "cpu_fused", "torch")


def parse_patch_nums(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """Patch schedule from a preset resolution (256, "512") or explicit sides ("1_2_3_4", (1, 2, 4))."""
    usage = (f"expected a preset resolution ({', '.join(map(str, PATCH_NUMS))}) or increasing side lengths "
             f"joined by '_', e.g. '1_2_3_4_5_6_8_10_13_16'")
    if isinstance(spec, str):
        spec = spec.strip()
        if "_" not in spec:
            if not spec.isdigit():
                raise ValueError(f"bad patch schedule {spec!r}: {usage}")
            spec = int(spec)
        else:
            try:
                spec = [int(s) for s in spec.split("_")]
            except ValueError:
                raise ValueError(f"bad patch schedule {spec!r}: {usage}") from None
    if isinstance(spec, int):
        if spec not in PATCH_NUMS:
            raise ValueError(f"no patch schedule preset for resolution {spec}: {usage}")
        return PATCH_NUMS[spec]
    pns = tuple(spec)
    if not pns or not all(isinstance(p, int) and p > 0 for p in pns) or any(a >= b for a, b in itertools.pairwise(pns)):
        raise ValueError(f"bad patch schedule {spec!r}: {usage}")
    return pns


def format_patch_nums(patch_nums: Sequence[int]) -> str:
    """A patch schedule as --pn spells it ("1_2_3_4"): `parse_patch_nums`'s inverse."""
    return "_".join(map(str, patch_nums))
