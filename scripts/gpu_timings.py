"""The GPU check's timing stage: scripts/bench.py's `paper` and `train` sections, read back against issue 19's targets.

    python scripts/gpu_timings.py --out timings.json [--dry-run]

paper: sampling latency with cfg in bf16 at batch 1 and 64, 256 px, random weights, M-VAR-d24 vs VAR-d30, M-VAR-D
and M-VAR-d16 vs VAR-d16, the models of a pair alternated in one process. train: an M-VAR-d16 training step with the
best kernels ("auto") in bf16 at the largest batch that fits, as a share of the bf16 matmul rate measured in the
same run; the batches tried start at what a fit of two small batches' peak memory predicts (`probed_batches`).
bench.py's tables travel in the JSON file ("tables"). --dry-run: the same sections on the CPU at width 32 and tiny
patch schedules, the memory probe against the CPU's memory with the batch capped at DRY_MAX_BATCH; the targets are
then reported, not judged (INFO), as they are when $MVAR_MAMBA_BACKEND forces the portable Mamba2 (gpu_check.sh's
fallback where no Triton kernel launches).
"""
import argparse
import gc
import os
import sys

import torch

from models import triton_autotune
from models.backends import MAMBA
from scripts import bench
from scripts import timing as bm
from scripts.gpu_results import CheckLine, any_failed, failure, within, write_lines
from scripts.markdown import read_tables

# Targets stated in issue 19 before any run.
PAPER_PAIR, PAPER_BATCH, PAPER_RATIO = "M-VAR-d24 / VAR-d30", 64, 0.86  # the paper: 14% faster
TRAIN_SHARE = 35.0  # % of the measured bf16 matmul rate
# tried in turn for the train section after the batch the memory fit predicts, the first that fits counts: VAR
# trains d16 at 96 per 80 GB GPU (768 on 8)
BATCHES = (96, 64, 48, 32, 16, 8)
PROBE_BATCHES = (8, 16)  # a training step's memory at these two batches gives its cost per image and its fixed cost
FIT_SHARE = 0.9  # of the device's memory, the rest left to the allocator's fragmentation and cuBLAS workspaces
MAX_BATCH = 1024
DRY_MAX_BATCH = 8  # the dry run's fit on the CPU's memory, capped: its train section runs the probe, then batch 8
COMMON = ["--repeats", "3", "--warmup", "1"]
GPU_FLAGS = {"paper": ["--device", "cuda", "--paper_dtypes", "bf16", "--paper_bs", "1", str(PAPER_BATCH)],
             "train": ["--device", "cuda", "--depth", "16", "--archs", "mvar", "--train_dtypes", "bf16"]}
DRY_FLAGS = {"paper": ["--device", "cpu", "--pn", "1_2", "--paper_width", "32", "--paper_dtypes", "bf16",
                       "--paper_bs", "2", "--paper_pairs", "M-VAR-d24"],
             "train": ["--device", "cpu", "--depth", "1", "--pn", "1_2_3", "--archs", "mvar", "--train_dtypes", "bf16"]}


def unjudged_because(dry_run: bool) -> str:
    """Why the targets are reported, not judged ("" when they are judged): a dry run's tiny CPU shapes, or a Mamba2
    kernel forced other than mamba_ssm's (the GPU check's fallback where no Triton kernel launches), which the
    paper's speeds do not assume: a FAIL would read as M-VAR being slow."""
    if dry_run:
        return "dry run: tiny shapes on the CPU"
    forced = os.environ.get(MAMBA.env, "")
    if forced and forced not in ("auto", "mamba_ssm"):
        return f"Mamba2 ran as {forced!r} (${MAMBA.env}), not mamba_ssm's kernels, which the targets assume"
    return ""


def cell_number(cell: str) -> float:
    """'**0.83x**' -> 0.83."""
    return float(cell.strip("*x "))


def paper_lines(text: str, batch: int, judged: bool) -> list[CheckLine]:
    """The pair ratios of the paper section, the target pair at `batch` judged when `judged` (a FAIL when that row
    is missing: the other rows are INFO, and the report would pass without the target judged)."""
    lines = []
    for row in (r for table in read_tables(text) for r in table if "pair" in r and " / " in r["pair"]):
        target = PAPER_RATIO if judged and row["pair"] == PAPER_PAIR and int(row["batch"]) == batch else None
        lines.append(within(f"sampling time {row['pair']}, {row['dtype']}, batch {row['batch']}",
                            cell_number(row["time ratio"]), target, fmt=".2f",
                            note="paper " + row["paper's time ratio"]))
    if not lines:
        return [CheckLine("paper section", "FAIL", "no pair table in bench.py's output")]
    if judged and not any(line.target for line in lines):
        lines.append(CheckLine(f"sampling time {PAPER_PAIR}, batch {batch}", "FAIL",
                               "not in bench.py's table: the target was not judged"))
    return lines


def train_line(text: str, batch: int, judged: bool) -> CheckLine:
    """The M-VAR bf16 row of the train section, judged against TRAIN_SHARE when `judged`; on a CPU that runs bf16 as
    fp32 (the dry run, models.precision) the row labelled "bf16 (ran fp32)"."""
    rows = (r for table in read_tables(text) for r in table
            if r.get("arch") == "mvar" and r.get("dtype", "").split(" (")[0] == "bf16")
    row = next(rows, None)
    if row is None:
        return CheckLine("train section", "FAIL", "no mvar bf16 row in bench.py's output")
    return within(f"M-VAR training step, batch {batch}, {row['dtype']}: % of the measured matmul rate",
                  float(row["% of peak"]), TRAIN_SHARE if judged else None, at_least=True, fmt=".1f",
                  note=f"{row['images / s']} images/s, {row['GFLOP/s']} model GFLOP/s")


def out_of_memory(err: Exception) -> bool:
    """torch's OutOfMemoryError, or what cuBLAS raises instead when it cannot allocate its workspace at the edge."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")))


def free_memory() -> None:
    """Give the CUDA memory of a finished or failed try back before the next."""
    triton_autotune.drop_arguments()  # an autotuner that ran out of memory in its benchmark keeps the batch
    gc.collect()
    torch.cuda.empty_cache()


def train_memory_mib(flags: list[str], batch: int, device: torch.device) -> float:
    """MiB a training step of bench.py's train section (`flags`, first --archs and --train_dtypes) at `batch` holds
    at its peak: the tensors kept between steps (weights, buffers, AdamW's state, made by a first step) plus the
    second step's own peak above them (activations, gradients)."""
    args = bench.build_parser().parse_args([*flags, "--bs", str(batch)])
    mvar, trainer, step = bench.random_train_step(args.archs[0], args.depth, (args.train_dtypes or [args.dtype])[0],
                                                  device, args)
    step()
    kept = {t.data_ptr(): t.nbytes for t in (*mvar.parameters(), *mvar.buffers(),
                                             *(v for state in trainer.optimizer.state.values()
                                               for v in state.values() if torch.is_tensor(v)))}
    return sum(kept.values()) / 2**20 + bm.peak_mib(step, device)


def fit_batch(mib_of: dict[int, float], total_mib: float) -> int:
    """The largest multiple of 8 (at most MAX_BATCH) whose memory, linear in the batch through the two measured
    points of `mib_of` (batch -> MiB), stays within FIT_SHARE of `total_mib`; 0 when not even batch 8 does."""
    (b0, m0), (b1, m1) = sorted(mib_of.items())
    per_image = max(m1 - m0, 0.0) / (b1 - b0)
    fixed = m0 - per_image * b0
    room = FIT_SHARE * total_mib - fixed
    if room <= 0:
        return 0
    return MAX_BATCH if per_image == 0 else min(MAX_BATCH, int(room / per_image) // 8 * 8)


def device_memory_mib(device: torch.device) -> float:
    """The memory of `device` in MiB: a GPU's total, or the machine's physical memory for the CPU (the dry run)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def probed_batches(flags: list[str], device: torch.device, max_batch: int = MAX_BATCH) -> tuple[int, ...]:
    """The batches largest_batch_train tries on `device`: the memory fit's (`fit_batch` of PROBE_BATCHES' peaks and
    the device's memory, at most `max_batch`), three quarters of it, then the smaller of BATCHES; BATCHES alone when
    the probe fails or fits less than 8."""
    try:
        mib_of = {}
        for batch in PROBE_BATCHES:
            mib_of[batch] = train_memory_mib(flags, batch, device)
            free_memory()
        total_mib = device_memory_mib(device)
    except RuntimeError as err:
        print(f"train section: the memory probe failed ({type(err).__name__}: {err}); trying {BATCHES}", flush=True)
        free_memory()
        return BATCHES
    fit = min(max_batch, fit_batch(mib_of, total_mib))
    print(f"train section: a step holds {mib_of} MiB at batches {PROBE_BATCHES}; of {total_mib:.0f} MiB, batch {fit} "
          f"would use at most {FIT_SHARE:.0%}", flush=True)
    if fit < 8:
        return BATCHES
    return tuple(dict.fromkeys((fit, max(8, fit * 3 // 4 // 8 * 8), *(b for b in BATCHES if b < fit))))


def largest_batch_train(flags: list[str], batches: tuple[int, ...]) -> tuple[int, str]:
    """(batch, markdown) of the train section at the first batch of `batches` that does not run out of memory."""
    for batch in batches:
        try:
            return batch, bench.main(["--only", "train", *flags, "--bs", str(batch)])
        except RuntimeError as err:  # OutOfMemoryError is one
            if not out_of_memory(err):
                raise
            print(f"train section: batch {batch} does not fit ({type(err).__name__})", flush=True)
        free_memory()  # after the except block, whose traceback held the model and batch
    raise RuntimeError(f"no batch of {batches} fits")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the check lines")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, targets not judged")
    p.add_argument("--only", nargs="+", default=["paper", "train"], choices=["paper", "train"])
    args = p.parse_args(argv)
    flags, why = (DRY_FLAGS if args.dry_run else GPU_FLAGS), unjudged_because(args.dry_run)
    judged = not why
    lines, tables = ([CheckLine("the targets", "INFO", "not judged", note=why)] if why and not args.dry_run else []), {}

    def paper() -> list[CheckLine]:
        tables["paper"] = bench.main(["--only", "paper", *COMMON, *flags["paper"]])
        return paper_lines(tables["paper"], 2 if args.dry_run else PAPER_BATCH, judged)

    def train() -> list[CheckLine]:
        train_flags = [*COMMON, *flags["train"]]
        batches = probed_batches(train_flags, torch.device("cpu" if args.dry_run else "cuda"),
                                 DRY_MAX_BATCH if args.dry_run else MAX_BATCH)
        batch, tables["train"] = largest_batch_train(train_flags, batches)
        return [train_line(tables["train"], batch, judged)]

    for section, measure in (("paper", paper), ("train", train)):
        if section not in args.only:
            continue
        try:
            lines += measure()
        except Exception as err:  # one section's failure (a kernel error, memory) must not lose the other's numbers
            lines.append(failure(f"{section} section", err))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        write_lines(args.out, lines, complete=False, tables=tables)
    print("\n".join(line.text() for line in lines), flush=True)
    write_lines(args.out, lines, tables=tables)
    return 1 if any_failed(lines) else 0


if __name__ == "__main__":
    sys.exit(main())
