"""The GPU check's training stage: train.py on the embedded MNIST with the GPU recipe, as a user would launch it.

    python scripts/gpu_train_check.py --work DIR --out train.json [--dry-run] [--run_timeout 90] [--box 150]

Runs, each a fresh train.py process on a random tokenizer written here (the loss still falls: the model learns the
token statistics of real digits): --fp16=1 (fp16 + GradScaler, 5 epochs) and --fp16=2 --deterministic=1 (bf16, 2
epochs, as every later run), loss finite and falling; the bf16 run again, stopped by SIGTERM a third of the way in
and relaunched: exit status 143, a checkpoint, and final weights bit-identical to the uninterrupted run (a second
uninterrupted run says whether training itself is deterministic here); a world-size-1 torchrun launch (NCCL on a
GPU, dist.core); and beside them all, from the stage's start, --fp16=2 --tfast=1 (torch.compile, whose cold
compilation is the slowest part: it keeps the GPU machine's idle CPU cores busy while the others run) with torch's
graph-break and recompile logs: how whole its graph was.
--dry-run: a depth-1 model on 48 images on the CPU, without --tfast (bf16 may run as fp32 there, models.precision
says so).
Time: each run may take --run_timeout seconds (the first, which compiles the Triton kernels, 1.5 times that; the
--tfast run the whole box), none past the stage's --box; a run that fails prints its output's last lines.
"""
import argparse
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from models.loading import vae_checkpoint
from models.mamba2 import OUTSIDE_THE_GRAPH
from models.tokenizer import VQVAE
from scripts.gpu_results import CheckLine, any_failed, write_lines
from scripts.process_tree import kill_tree

REPO = Path(__file__).resolve().parents[1]
LOSS_RE = re.compile(r"ep (\d+)/\d+ it (\d+)/\d+ \| loss (\S+)")  # train.log_progress's line; nan, inf too
STOP_RE = re.compile(r"stopped by SIGTERM (after ep \d+(?: it \d+)?|at the start)")  # train.py's stop line
LAST = "ar-ckpt-last.pth"
TIMED_OUT = "[gpu_train_check] killed at its timeout of"  # appended to the output of a run past its timeout
FALLING = 0.95  # the last quarter's mean loss below 95% of the first quarter's
# The bf16 run that the resume is compared with, the resumed one and the control: deterministic kernels, since on a
# GPU mamba_ssm's backward and some of torch's add with atomics, in a varying order.
DETERMINISTIC = ("--fp16=2", "--deterministic=1")
# the --tfast run's environment: dynamo's lines, counted below; and no autotuning results kept on disk, since it
# benchmarks the bf16 kernels' configs beside the other runs, on a shared GPU, and the timings would reuse its picks
COMPILE_ENV = {"TORCH_LOGS": "graph_breaks,recompiles", "TRITON_CACHE_AUTOTUNING": "0"}
GRAPH_BREAK_RE = re.compile(r"Graph break in user code at (\S+)")


@dataclass(frozen=True)
class Recipe:
    """Sizes of the runs: model, batch, images, epochs (of the first run; `short_ep` of the others), logging
    interval."""

    depth: int
    embed_dim: int
    bs: int
    train_limit: int  # 0: all 4,050 training digits
    ep: int
    short_ep: int
    log_every: int
    on_gpu: bool

    @property
    def short(self) -> "Recipe":
        return dataclasses.replace(self, ep=self.short_ep)


# 5 x 63 = 315 steps for fp16, 126 for the others (the resume's three runs and the compile)
GPU_RECIPE = Recipe(depth=4, embed_dim=256, bs=64, train_limit=0, ep=5, short_ep=2, log_every=10, on_gpu=True)
DRY_RECIPE = Recipe(depth=1, embed_dim=32, bs=8, train_limit=48, ep=2, short_ep=2, log_every=1, on_gpu=False)
FAILED_TAIL_LINES = 150  # of a failed run's output, printed (check.log keeps it; the scratch folder is deleted)


def write_tokenizer(path: Path) -> None:
    """A random 16 px tokenizer (downsample 4, 512 codes), in the checkpoint format train.py reads."""
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1, 2), test_mode=True, v_patch_nums=(1, 2, 3, 4))
    torch.save(vae_checkpoint(vae), path)


def train_cmd(work: Path, out: str, recipe: Recipe, *extra: str, torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "--local-addr=127.0.0.1"] if torchrun else [sys.executable]  # not the host name: no DNS there
    return [*launcher, str(REPO / "train.py"), f"--vae_ckpt={work / 'vae.pth'}", f"--local_out_dir_path={work / out}",
            "--dataset=mnist", "--pn=1_2_3_4", "--mid_reso=1.125", f"--depth={recipe.depth}",
            f"--embed_dim={recipe.embed_dim}", f"--bs={recipe.bs}", f"--ep={recipe.ep}",
            f"--train_limit={recipe.train_limit}", "--val_limit=64",
            f"--log_every={recipe.log_every}", f"--val_every={recipe.ep}", "--sample_every=0", "--save_every_min=0",
            "--workers=0", "--seed=0", "--tlr=3e-3", "--alng=1e-3", *extra]


class Clock:
    """The stage's time: each run's timeout is its cap, cut to what is left of the box."""

    def __init__(self, box: float, run_timeout: float):
        self.end, self.run_timeout = time.monotonic() + box, run_timeout

    def left(self) -> float:
        """Seconds left of the box."""
        return self.end - time.monotonic()

    def timeout(self, factor: float = 1.0) -> float:
        """`factor` x --run_timeout (inf: all that is left), at most what is left of the box less 3 s."""
        return max(min(factor * self.run_timeout, self.end - time.monotonic() - 3), 1.0)


def run(cmd: list[str], timeout: float, stop_at_line: int = 0, env: dict[str, str] | None = None
        ) -> tuple[int, str, float]:
    """(exit status, output, seconds) of `cmd` (with `env` added to this environment); with `stop_at_line`, SIGTERM
    at that loss line. A run past `timeout` is killed with every process it started (status -9), also while it
    prints nothing (Triton or torch.compile compiling, a rendezvous that hangs). A run that fails prints the last
    FAILED_TAIL_LINES lines of its output."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=None if env is None else {**os.environ, **env})
    lines = []

    def read() -> None:
        seen, stop = 0, stop_at_line
        for line in proc.stdout:
            lines.append(line)
            seen += bool(LOSS_RE.search(line))
            if stop and seen == stop:
                proc.send_signal(signal.SIGTERM)
                stop = 0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun's worker too: it runs in a session of its own
        proc.wait()
        lines.append(f"{TIMED_OUT} {timeout:.0f} s (compiling, or a hang)\n")
    reader.join(timeout=10)
    if proc.returncode not in (0, 128 + signal.SIGTERM):
        out = next((arg.split("=", 1)[1] for arg in cmd if arg.startswith("--local_out_dir_path=")), cmd[-1])
        print(f"--- the run into {out}: exit {proc.returncode}, its last lines:\n"
              + "".join(lines[-FAILED_TAIL_LINES:]) + "---", flush=True)
    return proc.returncode, "".join(lines), time.monotonic() - t0


def losses(log: str) -> list[float]:
    return [float(v) for _, _, v in LOSS_RE.findall(log)]


def tail(log: str) -> str:
    """The end of a run's output, on one line."""
    return log[-300:].replace("\n", " / ")


def falling_line(name: str, rc: int, log: str, seconds: float) -> CheckLine:
    """PASS when the run ended well with finite losses whose last quarter is below FALLING x the first."""
    values = losses(log)
    if rc != 0 or len(values) < 4:
        ended = "timed out" if TIMED_OUT in log else f"exit {rc}"
        return CheckLine(name, "FAIL", f"{ended}, {len(values)} loss lines", note=tail(log))
    q = max(len(values) // 4, 1)
    first, last = sum(values[:q]) / q, sum(values[-q:]) / q
    ok = all(math.isfinite(v) for v in values) and last < FALLING * first
    skipped = log.count("optimizer step skipped")
    return CheckLine(name, "PASS" if ok else "FAIL", f"loss {first:.3f} -> {last:.3f}", f"< {FALLING} x first",
                     note=f"{len(values)} log lines, {skipped} skipped steps, {seconds:.0f} s")


def compile_line(log: str) -> CheckLine:
    """How whole --tfast's compiled model was, from dynamo's logs (`COMPILE_ENV`): PASS with no graph break and
    no recompile limit hit (past it a frame runs eagerly). Where the run's log says mamba_ssm's Mamba2 ran outside
    the graph on purpose (models.mamba2 warns so on the torches of `torch_features.compiled_function_gradients_wrong`),
    breaks in models/mamba2.py alone are INFO."""
    sites = sorted(set(GRAPH_BREAK_RE.findall(log)))
    limit_hit = "hit config.recompile_limit" in log
    value = f"{len(sites)} graph break site(s), {log.count('Recompiling function')} recompile(s)" + \
        (", recompile limit hit" if limit_hit else "")
    note = " ".join(Path(site).name for site in sites)
    target = "no graph break, no recompile limit hit"
    if sites and not limit_hit and OUTSIDE_THE_GRAPH in log and \
            all(Path(site.rsplit(":", 1)[0]).name == "mamba2.py" for site in sites):
        return CheckLine("torch.compile: one graph", "INFO", value, target, f"torch {torch.__version__} runs "
                         f"mamba_ssm's Mamba2 outside the graph (pytorch/pytorch#180642): {note}")
    return CheckLine("torch.compile: one graph", "FAIL" if sites or limit_hit else "PASS", value, target, note)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def resume_lines(work: Path, recipe: Recipe, clock: Clock, loss_lines: int, lines: list[CheckLine],
                 save: Callable[[list[CheckLine]], None]) -> None:
    """SIGTERM a third of the way in (`loss_lines`: the uninterrupted bf16 run's), relaunch with torchrun (one
    rank: NCCL on CUDA) and compare with that run; on a difference, a second uninterrupted run says whether
    training itself is deterministic here. Appends to `lines`, and `save`s them after each run."""
    rc, log, _ = run(train_cmd(work, "resumed", recipe, *DETERMINISTIC), clock.timeout(),
                     stop_at_line=max(loss_lines // 3, 2))
    stop = STOP_RE.search(log)
    stopped = rc == 128 + signal.SIGTERM and stop and (work / "resumed" / LAST).exists()
    lines.append(CheckLine("SIGTERM: exit 143 and a checkpoint", "PASS" if stopped else "FAIL", f"exit {rc}",
                           note=stop.group(0) if stop else tail(log)))
    save(lines)
    rc, log, seconds = run(train_cmd(work, "resumed", recipe, *DETERMINISTIC, torchrun=True), clock.timeout())
    device = re.search(r"world size 1, device (\S+);", log)
    on_cpu = device is None or not device.group(1).startswith("cuda")
    lines.append(CheckLine("relaunch with torchrun --nproc_per_node=1 (NCCL on CUDA, gloo on the CPU)",
                           "PASS" if rc == 0 and "resumed from" in log and not (on_cpu and recipe.on_gpu) else "FAIL",
                           f"exit {rc}, device {device.group(1) if device else '?'}",
                           note=f"{seconds:.0f} s" if rc == 0 else tail(log)))
    save(lines)
    if rc != 0:
        return
    diff = max_difference(work / "bf16" / LAST, work / "resumed" / LAST)
    note = ""
    if diff != 0:
        again_rc, again_log, _ = run(train_cmd(work, "bf16_again", recipe, *DETERMINISTIC), clock.timeout())
        control = max_difference(work / "bf16" / LAST, work / "bf16_again" / LAST) if again_rc == 0 else None
        note = f"control run failed: {tail(again_log)}" if control is None else \
            f"two uninterrupted runs differ by {control:.3g}" + (": not deterministic here" if control else "")
    lines.append(CheckLine("resumed weights bit-identical to the uninterrupted run", "PASS" if diff == 0 else "FAIL",
                           f"max |difference| {diff:.3g}", "0", note))


def check(work: Path, dry_run: bool, clock: Clock, save: Callable[[list[CheckLine]], None]) -> list[CheckLine]:
    """Every line of the stage; `save` gets them after each run."""
    recipe = DRY_RECIPE if dry_run else GPU_RECIPE
    write_tokenizer(work / "vae.pth")
    with ThreadPoolExecutor(max_workers=1) as beside:
        # --tfast from the start, in parallel: inductor compiles on the CPU for a minute or more, cold; run last, it
        # was left what the others had not used of the box. No validation: evaluation mode would compile the model
        # a second time and record other CUDA graphs. The dry run skips it: inductor on the CPU compiles C++ for
        # minutes; tests/test_trainer.py covers --tfast on the CPU
        tfast = None if dry_run else beside.submit(
            run, train_cmd(work, "tfast", recipe.short, "--fp16=2", "--tfast=1", "--val_every=0"),
            clock.timeout(math.inf), env=COMPILE_ENV)
        lines = sequential_lines(work, recipe, clock, save)
        if tfast is None:
            lines.append(CheckLine("train.py --fp16=2 --tfast=1 (torch.compile)", "SKIP", note="dry run: GPU run only"))
        else:
            rc, log, seconds = tfast.result()
            lines += [falling_line("train.py --fp16=2 --tfast=1 (torch.compile)", rc, log, seconds), compile_line(log)]
    return lines


def sequential_lines(work: Path, recipe: Recipe, clock: Clock, save: Callable[[list[CheckLine]], None]
                     ) -> list[CheckLine]:
    """fp16 and bf16 training, then the SIGTERM, resume and bit-identical checks, one run after the other."""
    lines, logs, codes = [], {}, {}
    # the first run compiles Triton's kernels: 1.5 x --run_timeout
    runs = (("train.py --fp16=1 (fp16 + GradScaler)", "fp16", ["--fp16=1"], recipe, 1.5),
            ("train.py --fp16=2 --deterministic=1 (bf16)", "bf16", DETERMINISTIC, recipe.short, 1.0))
    for name, out, flags, sizes, factor in runs:
        codes[out], logs[out], seconds = run(train_cmd(work, out, sizes, *flags), clock.timeout(factor))
        lines.append(falling_line(name, codes[out], logs[out], seconds))
        print(lines[-1].text(), flush=True)
        save(lines)
    if codes["bf16"] == 0 and (work / "bf16" / LAST).exists():
        resume_lines(work, recipe.short, clock, len(losses(logs["bf16"])), lines, save)
    else:
        lines.append(CheckLine("SIGTERM, resume and bit-identical weights", "FAIL",
                               note="not run: the bf16 run they are compared with did not finish"))
    save(lines)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder for the runs")
    p.add_argument("--out", required=True, help="JSON file for the check lines")
    p.add_argument("--dry-run", action="store_true", help="tiny runs on the CPU")
    p.add_argument("--run_timeout", type=float, default=90.0, help="seconds per train.py process (the first: 1.5x)")
    p.add_argument("--box", type=float, default=math.inf, help="seconds for the whole stage (gpu_check.sh's box)")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = check(work, args.dry_run, Clock(args.box, args.run_timeout),
                  lambda lines: write_lines(args.out, lines, complete=False))
    print("\n".join(line.text() for line in lines[2:]), flush=True)
    write_lines(args.out, lines)
    return 1 if any_failed(lines) else 0


if __name__ == "__main__":
    sys.exit(main())
