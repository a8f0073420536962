"""The GPU check's numerics stage: the model, tokenizer and sampler on the device against the CPU fp32 reference.

    python scripts/gpu_numerics.py --out numerics.json [--dry-run]

One set of random weights (models.build_vae_mvar), copied to the device for every backend combination (attention x
Mamba2, models.backends) and precision (fp32, bf16, fp16 autocast). Each combination is compared with the CPU fp32
run of the portable kernels on: teacher-forced logits, greedy sampled tokens (top_k=1, so no random stream is
involved: CUDA and CPU generators draw different numbers) and the losses of a 20-step training run (trainer.Trainer,
same batches), all on the CPU tokenizer's token ids. The tokenizer's indices are compared once per device, and one
step of its trainer (tokenizer_trainer: reconstruction, VQ, the adaptive-weighted PatchGAN) per precision. fp32 is
fp32 on both sides (no TF32, `exact_fp32`). Kernel pairs run portable first, Triton's fp32 last. A kernel that
cannot run there is a SKIP line saying why. --dry-run: tiny shapes on the CPU (the "device" is the CPU; CUDA kernels
SKIP).
"""
import argparse
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models import build_vae_mvar
from models.attention import backend_unavailable_reason
from models.backends import ATTN, MAMBA, BackendError
from models.mamba2 import resolve_kernels
from models.mvar import MVAR
from models.tokenizer import VQVAE
from scripts.gpu_results import CheckLine, any_failed, failure, largest_error, within, write_lines
import tokenizer_trainer
from trainer import Trainer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_FLAG = {"fp32": 0, "fp16": 1, "bf16": 2}  # Trainer(fp16=...)
# Targets stated in issue 19 before any run: logits error relative to the reference's largest |logit|.
LOGITS_TARGET = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}  # fp16 (10 mantissa bits) held to bf16's (7 bits) target
TOKENS_TARGET = {"fp32": 0.95}  # share of equal greedy tokens; low precisions: reported, no target
TOKENIZER_TARGET = 0.95  # share of equal tokenizer indices (fp32 on both sides)
# Loss of a 20-step run, relative to the CPU's, worst step. Set here before the run: fp32 differs by summation
# order only (grows slowly over steps); low precisions by rounding of every matmul.
LOSS_TARGET = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}
# One tokenizer-trainer step's loss terms: |error| over max(|CPU value|, 0.01) (the GAN terms can be near 0), worst
# term, held to LOSS_TARGET; its adaptive GAN weight (a ratio of two gradient norms, which the low precisions round
# more: bf16 3.1%, fp16 0.3% at the dry run's shapes on a CPU) relative to the CPU's. Both set before any GPU run.
TOKENIZER_TERMS = ("loss", "l1", "l2", "vq", "g", "d")
GAN_WEIGHT_TARGET = {"fp32": 1e-3, "bf16": 0.15, "fp16": 0.05}


@dataclass(frozen=True)
class Shapes:
    """The model and data sizes of one run."""

    patch_nums: tuple[int, ...]
    depth: int
    embed_dim: int
    V: int
    vae_ch: int
    ch_mult: tuple[int, ...]
    batch: int
    steps: int


GPU_SHAPES = Shapes(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), depth=4, embed_dim=256, V=4096, vae_ch=32,
                    ch_mult=(1, 1, 2, 2, 4), batch=4, steps=20)
DRY_SHAPES = Shapes(patch_nums=(1, 2, 3), depth=1, embed_dim=32, V=32, vae_ch=32, ch_mult=(1, 2), batch=2, steps=3)


def build(shapes: Shapes, device: str) -> tuple[VQVAE, MVAR]:
    """Tokenizer and M-VAR from seed 0, dropouts off (their draws differ between devices); Mamba2 at M-VAR's own
    d_state, as the training and timing stages run it, so that the Triton kernels compiled here serve them too
    (mamba_ssm's kernels are compiled per d_state)."""
    torch.manual_seed(0)
    return build_vae_mvar(device, patch_nums=shapes.patch_nums, V=shapes.V, Cvae=8, ch=shapes.vae_ch,
                          ch_mult=shapes.ch_mult, num_classes=10, depth=shapes.depth, embed_dim=shapes.embed_dim,
                          num_heads=max(shapes.embed_dim // 64, 1), drop_path_rate=0.0,
                          cond_drop_rate=0.0, init_adaln_gamma=0.5, attn_backend=ATTN.portable,
                          mamba_backend=MAMBA.portable)


@dataclass
class Outputs:
    """What one run produces, on the CPU in fp32."""

    logits: torch.Tensor
    tokens: torch.Tensor
    losses: list[float]


def batches(shapes: Shapes, vae: VQVAE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` (images in [-1, 1], labels) batches from a fixed CPU generator."""
    g = torch.Generator().manual_seed(1)
    side = shapes.patch_nums[-1] * vae.downsample
    return [(torch.rand(shapes.batch, 3, side, side, generator=g) * 2 - 1,
             torch.randint(0, 10, (shapes.batch,), generator=g)) for _ in range(shapes.steps)]


def run(vae: VQVAE, mvar: MVAR, data: list, ids: list[torch.Tensor], device: torch.device, dtype_name: str) -> Outputs:
    """Logits on the first batch, greedy tokens, then the training losses; `mvar` is trained in place. The model
    reads `ids`, the CPU tokenizer's token ids of `data`'s images, so a token the device's tokenizer would round the
    other way cannot pass for a model error (the tokenizer is compared on its own)."""
    trainer = Trainer(vae, mvar, device, lr=3e-4, fp16=FP16_FLAG[dtype_name])
    label = data[0][1].to(device)
    _, x_BLCv = trainer.ids_to_tokens(ids[0].to(device))
    mvar.eval()
    with torch.no_grad(), trainer.autocast():
        logits = mvar(label, x_BLCv).float().cpu()
    with torch.no_grad(), mvar.inference_precision(trainer.amp_dtype):
        _, idx_Bl = mvar.sample_scales(label, None, cfg=1.5, top_k=1, top_p=0.0, more_smooth=False, use_cache=True)
    mvar.train()
    losses = [trainer.micro_step(i.to(device), lb.to(device)).loss.item() for i, (_, lb) in zip(ids, data, strict=True)]
    return Outputs(logits, torch.cat(idx_Bl, dim=1).cpu(), losses)


def compare(name: str, dtype_name: str, ref: Outputs, got: Outputs) -> list[CheckLine]:
    """The three lines of one combination against the reference."""
    scale = ref.logits.abs().max().item()
    logits_err = (got.logits - ref.logits).abs().max().item() / scale
    agree = (got.tokens == ref.tokens).double().mean().item()  # float32's 2584 / 2720 is 0.94999999 < 0.95
    _, loss_err = largest_error({f"step {i}": abs(g - r) / abs(r)
                                 for i, (g, r) in enumerate(zip(got.losses, ref.losses, strict=True))})
    return [within(f"{name} logits, max |error| / max |logit|", logits_err, LOGITS_TARGET[dtype_name]),
            within(f"{name} greedy sampled tokens equal", agree, TOKENS_TARGET.get(dtype_name), at_least=True,
                   fmt=".4f"),
            within(f"{name} {len(ref.losses)}-step training losses, max relative error", loss_err,
                   LOSS_TARGET[dtype_name], note=f"last loss {got.losses[-1]:.4f} vs {ref.losses[-1]:.4f}")]


def slow_last(combination: tuple[str, str, str]) -> tuple[bool, bool]:
    """Sort key: the portable Mamba2 first, then the other kernels, their fp32 (the slowest Triton compilation)
    last, so that a stage cut by its time box has lost the least."""
    _, mamba, dtype_name = combination
    return mamba != MAMBA.portable, mamba != MAMBA.portable and dtype_name == "fp32"


def unavailable(attn: str, mamba: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the (attn, mamba) pair cannot run on `device` in `dtype` (None: it can), as the model decides it."""
    reason = backend_unavailable_reason(attn, device, dtype)
    if reason is None:
        try:
            resolve_kernels(mamba, device.type == "cuda", device)
        except BackendError as err:
            reason = str(err)
    return reason


def exact_fp32() -> None:
    """fp32 means fp32 in this stage: no TF32 in torch's matmuls or cuDNN's convolutions, and Triton's fp32 `tl.dot`
    (TF32 by default on NVIDIA GPUs) as three TF32 products, fp32's accuracy in half IEEE's compile time
    (mamba_ssm's forward kernels for sm_90: 16 s against 33 s here). Set before any kernel compiles."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    os.environ["TRITON_F32_DEFAULT"] = "tf32x3"


def exact_fp32_line(device: torch.device) -> CheckLine:
    return CheckLine("fp32 without TF32 (torch, cuDNN, Triton dots)", "INFO", device.type,
                     note="TRITON_F32_DEFAULT=tf32x3 (gpu_check.sh: every stage; Triton's default is TF32); the "
                     "recipe's --tf32=1 (torch's matmuls) runs in the training stage")


def tokenizer_line(ref_ids: torch.Tensor, vae_dev: VQVAE, img: torch.Tensor, device: torch.device) -> CheckLine:
    """The device's token ids of `img` against the CPU's (`ref_ids`)."""
    with torch.no_grad():
        got = torch.cat(vae_dev.img_to_idxBl(img.to(device)), dim=1).cpu()
    return within(f"tokenizer on {device.type}: indices equal to the CPU's", (got == ref_ids).double().mean().item(),
                  TOKENIZER_TARGET, at_least=True, fmt=".4f")


def tokenizer_step(shapes: Shapes, device: torch.device, dtype_name: str, img: torch.Tensor) -> dict[str, float]:
    """One tokenizer_trainer step on `img` on `device` under the --fp16 of `dtype_name` -> its loss terms. The
    tokenizer and discriminator are built on the CPU from seed 0, then moved: the same weights on every device."""
    args = tokenizer_trainer.build_parser().parse_args([
        f"--reso={img.shape[-1]}", f"--ch={shapes.vae_ch}", f"--ch_mult={'_'.join(map(str, shapes.ch_mult))}",
        f"--vocab_size={shapes.V}", "--z_channels=8", f"--pn={'_'.join(map(str, shapes.patch_nums))}", "--w_gan=0.1",
        "--gan_weight=adaptive", "--disc_ch=16", f"--disc_layers={min(3, len(shapes.ch_mult) - 1)}", "--wp=0",
        f"--fp16={FP16_FLAG[dtype_name]}"])
    torch.manual_seed(0)
    trainer = tokenizer_trainer.TokenizerTrainer(tokenizer_trainer.build_vae(args), args, device)
    logged = tokenizer_trainer.logged_means(trainer.train_step(img.to(device)))  # as train() logs them
    return {k: logged[k] for k in (*TOKENIZER_TERMS, "gan_weight")}


def tokenizer_step_lines(shapes: Shapes, device: torch.device, dtypes: list[str], img: torch.Tensor) -> list[CheckLine]:
    """Two lines per precision: a tokenizer-trainer step on `device` against the CPU's fp32 step from the same
    weights (its loss terms, its adaptive GAN weight)."""
    ref = tokenizer_step(shapes, torch.device("cpu"), "fp32", img)
    lines = []
    for dtype_name in dtypes:
        name = f"{device.type} tokenizer training step {dtype_name}"
        try:
            got = tokenizer_step(shapes, device, dtype_name, img)
        except Exception as err:  # as for the model's kernels: a finding, not a crash
            lines.append(failure(name, err))
            continue
        worst, error = largest_error({k: abs(got[k] - ref[k]) / max(abs(ref[k]), 0.01) for k in TOKENIZER_TERMS})
        lines += [within(f"{name}: loss terms, max |error| / max(|CPU|, 0.01)", error, LOSS_TARGET[dtype_name],
                         note=f"worst: {worst} {got[worst]:.4g} vs {ref[worst]:.4g}"),
                  within(f"{name}: adaptive GAN weight, relative error",
                         abs(got["gan_weight"] - ref["gan_weight"]) / ref["gan_weight"], GAN_WEIGHT_TARGET[dtype_name],
                         note=f"{got['gan_weight']:.4g} vs {ref['gan_weight']:.4g}")]
    return lines


def device_error(device: torch.device) -> str | None:
    """Why `device` no longer runs anything (a CUDA error poisons its context for the rest of the process), or
    None."""
    try:
        (torch.ones(2, device=device) + 1).sum().item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def check(shapes: Shapes, device: torch.device, dtypes: list[str],
          save: Callable[[list[CheckLine], dict], None]) -> tuple[list[CheckLine], dict]:
    """Every line of the stage and the raw numbers ({combination: losses}); `save` gets them after each step."""
    vae, ref_model = build(shapes, "cpu")
    state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    data = batches(shapes, vae)
    with torch.no_grad():
        ids = [torch.cat(vae.img_to_idxBl(img), dim=1) for img, _ in data]
    ref = run(vae, ref_model, data, ids, torch.device("cpu"), "fp32")
    vae_dev, _ = build(shapes, str(device))
    lines = [exact_fp32_line(device), tokenizer_line(ids[0], vae_dev, data[0][0], device),
             *tokenizer_step_lines(shapes, device, dtypes, data[0][0])]
    raw = {"reference": {"losses": ref.losses, "logits_max": ref.logits.abs().max().item()}, "shapes": vars(shapes)}
    save(lines, raw)
    for attn, mamba, dtype_name in sorted(itertools.product(ATTN.kernels, MAMBA.kernels, dtypes), key=slow_last):
        name = f"{device.type} {attn}+{mamba} {dtype_name}"
        reason = unavailable(attn, mamba, device, DTYPES[dtype_name])
        if reason is not None:
            lines.append(CheckLine(name, "SKIP", note=reason))
            save(lines, raw)
            continue
        _, model = build(shapes, str(device))
        model.load_state_dict(state)
        model.set_backends(attn, mamba)
        t0 = time.perf_counter()
        try:
            got = run(vae_dev, model, data, ids, device, dtype_name)
        except Exception as err:  # a kernel that fails (Triton's errors, mamba_ssm's asserts) is a finding, not a crash
            lines.append(failure(name, err))
            dead = device_error(device)
            if dead:  # a sticky CUDA error: every later combination would fail with it, blamed on its own kernels
                lines.append(CheckLine(f"{device.type} device after {name}", "FAIL",
                                       note=f"unusable, the remaining combinations not run: {dead[:300]}"))
            save(lines, raw)
            if dead:
                break
            continue
        lines += compare(name, dtype_name, ref, got)
        raw[name] = {"losses": got.losses, "seconds": round(time.perf_counter() - t0, 2)}
        print("\n".join(line.text() for line in lines[-3:]), flush=True)
        save(lines, raw)
    return lines, raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the check lines and the raw numbers")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    head = [] if device.type == "cuda" else [CheckLine("numerics device", "SKIP" if args.dry_run else "FAIL", "cpu",
                                                       note="dry run: the CPU against itself" if args.dry_run
                                                       else "no CUDA device")]
    exact_fp32()
    lines, raw = check(DRY_SHAPES if args.dry_run else GPU_SHAPES, device, args.dtypes,
                       lambda lines, raw: write_lines(args.out, head + lines, complete=False, **raw))
    lines = head + lines
    write_lines(args.out, lines, **raw)
    return 1 if any_failed(lines) else 0


if __name__ == "__main__":
    sys.exit(main())
