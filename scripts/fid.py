"""FID, Inception Score and precision/recall of generated images against an ADM-format reference batch.

    python scripts/fid.py --sample samples/d16-cfg1.5-topk900-topp0.96-seed0-n50.npz \
        --ref VIRTUAL_imagenet256_labeled.npz [--inception /path/to/inception-2015-12-05.pt]

The flags only; the maths and the input checks are `utils.evaluation.fid` (see its docstring for the accepted inputs).
"""
import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from utils.evaluation.fid import evaluate
from utils.flags import device_problem
from utils.run.checkpoint import OutputFolderError, check_writable, write_text_atomic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", required=True, help="npz with arr_0 uint8 (N,H,W,3), or a folder of images")
    parser.add_argument("--ref", required=True, help="reference npz (mu/sigma and/or arr_0), ADM format")
    parser.add_argument("--inception", default=None, help="Inception TorchScript file (see "
                        "utils/evaluation/inception.py)")
    parser.add_argument("--bs", type=int, default=100, help="images per Inception batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, default=3, help="neighbours for precision/recall")
    parser.add_argument("--no_pr", action="store_true", help="skip precision/recall (saves the reference pass)")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("sample", "ref"):
        if not Path(getattr(args, flag)).exists():
            parser.error(f"--{flag}={getattr(args, flag)}: no such file or folder")
    if Path(args.ref).is_dir():  # it was "not a readable .npz file"
        parser.error(f"--ref={args.ref} is a folder; expected a reference .npz (OpenAI's batch, or any npz with "
                     "mu/sigma and/or images arr_0): pack a folder of images with numpy.savez(path, arr_0=images)")
    for flag in ("bs", "k"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if problem := device_problem(args.device):
        parser.error(problem)
    if args.out is not None:
        try:
            if Path(args.out).is_dir():
                raise OutputFolderError(f"--out={args.out} is a folder; expected a JSON file name")
            check_writable(Path(args.out).absolute().parent, f"--out={args.out}")
        except OutputFolderError as e:
            parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        results = evaluate(Path(args.sample), Path(args.ref), args.inception, args.bs, args.device, args.k,
                           with_pr=not args.no_pr)
    except (ValueError, FileNotFoundError) as e:  # the inputs and the Inception file; non-finite features
        raise SystemExit(f"error: {e}") from e
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    return results


if __name__ == "__main__":
    main()
