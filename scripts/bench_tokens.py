"""Training from a token cache against training from images (issue 21, item 5), printed as a markdown table.

For each set-up: a random-weight tokenizer and model, the data extracted once (scripts/extract_tokens.py, timed:
extraction images/s over the train and val splits, start-up
included), then training steps from the images (decode, resize, crop, encoder + quantisation) and from
the cache (ids -> x_BLCv), alternated over rounds in one process (median). The data path of a step is fetching
the batch and making (gt_BL, x_BLCv); the rest is `Trainer.micro_step_tokens`.
- study: the study's 32 px set-up (scripts/study.py: Fashion-MNIST, tokenizer ch 32 / V 512 / z 16, depth 4,
  width 128, batch 64);
- 256px: VQVAE defaults (VAR's tokenizer shape: ch 160, V 4096, z 32), VAR's 256 px schedule (680 tokens), a
  depth-2 width-128 model, batch --bs_256, random 500x375 JPEGs (ImageNet's typical size).

    python scripts/bench_tokens.py --threads 1
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.loading import vae_checkpoint
from models.mvar import MVAR, MVARConfig
from models.presets import parse_patch_nums
from models.tokenizer import VQVAE
from scripts import extract_tokens
from scripts.markdown import markdown_table
from trainer import Trainer
from utils.data.embedded import fashion_mnist_dir
from utils.data.loaders import build_datasets, build_loaders
from utils.data.token_cache import TokenDataset, read_manifest

IMAGENET_IMAGES, IMAGENET_L = 1_281_167, 680
SETUPS = {
    "study": dict(vae=dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2)), pn="1_2_3_4_5_6_8", depth=4,
                  width=128, heads=2),
    "256px": dict(vae={}, pn="256", depth=2, width=128, heads=2),
}


def write_jpegs(folder: Path, n: int) -> None:
    """`n` random 500x375 JPEGs in two classes, train/ and val/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            d = folder / split / f"class{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8).repeat(47, 0).repeat(50, 1)[:375]
            Image.fromarray(img).save(d / f"{i}.jpg", quality=90)


def loaders(data: dict, cache: Path, reso: int, bs: int, n: int) -> dict[str, torch.utils.data.DataLoader]:
    """The training loaders of both paths over the first `n` images (flags as train.py's defaults)."""
    _, images, val = build_datasets(data.get("data_path", ""), data.get("dataset", ""), reso, 1.125, False,
                                    data.get("fmnist_dir"), train_limit=n, val_limit=1)
    tokens = TokenDataset(cache, read_manifest(cache), "train", limit=n)
    return {"images": build_loaders(images, val, bs, 0, 0, 1, seed=0)[0],
            "tokens": build_loaders(tokens, val, bs, 0, 0, 1, seed=0, seeded=False)[0]}


def bench_setup(name: str, bs: int, n: int, rounds: int, work: Path) -> list:
    """One table row per path: images/s, data ms, step ms, data share; plus extraction images/s."""
    s = SETUPS[name]
    pn = parse_patch_nums(s["pn"])
    torch.manual_seed(0)
    vae = VQVAE(**s["vae"], v_patch_nums=pn, test_mode=True)
    reso = pn[-1] * vae.downsample
    torch.save(vae_checkpoint(vae), work / "vae.pth")
    data = {"dataset": "fmnist", "fmnist_dir": fashion_mnist_dir("")} if name == "study" else \
        {"data_path": str(work / "jpegs")}
    if name != "study":
        write_jpegs(work / "jpegs", n)
    flags = [f"--{k}={v}" for k, v in data.items()] + [f"--vae_ckpt={work / 'vae.pth'}", f"--pn={s['pn']}",
                                                       f"--out={work / 'cache'}", f"--limit={n}", f"--batch={bs}"]
    t0 = time.perf_counter()
    extract_tokens.main(extract_tokens.build_parser().parse_args(flags))
    extract_s = time.perf_counter() - t0
    bytes_per_image = read_manifest(work / "cache")["L"] * 2  # uint16 ids of one view (+ 4 bytes of label)
    mvar = MVAR(MVARConfig(depth=s["depth"], embed_dim=s["width"], num_heads=s["heads"], patch_nums=pn,
                           V=vae.vocab_size, Cvae=vae.Cvae, num_classes=10), vae=vae)
    mvar.init_weights()
    trainer = Trainer(vae, mvar, torch.device("cpu"), lr=1e-4)
    iters = {k: iter(v) for k, v in loaders(data, work / "cache", reso, bs, n).items()}
    times = {k: {"data": [], "step": []} for k in iters}
    for _ in range(rounds + 1):  # the first round warms up
        for path, it in iters.items():
            t0 = time.perf_counter()
            inp, label_B = next(it)
            gt_BL, x_BLCv = trainer.targets(inp)
            t1 = time.perf_counter()
            trainer.micro_step_tokens(gt_BL, x_BLCv, label_B)
            times[path]["data"].append(1e3 * (t1 - t0))
            times[path]["step"].append(1e3 * (time.perf_counter() - t1))
    rows = []
    for path, t in times.items():
        data_ms, step_ms = statistics.median(t["data"][1:]), statistics.median(t["step"][1:])
        rows.append([name, path, bs, f"{bs / (data_ms + step_ms) * 1e3:.1f}", f"{data_ms:.0f}", f"{step_ms:.0f}",
                     f"{100 * data_ms / (data_ms + step_ms):.0f}%",
                     *((f"{2 * n / extract_s:.1f}", bytes_per_image) if path == "tokens" else ("", ""))])
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--bs", type=int, default=64, help="batch of the study set-up")
    p.add_argument("--bs_256", type=int, default=4, help="batch of the 256 px set-up")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per path (one more warms up)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.setups:
        bs = args.bs if name == "study" else args.bs_256
        with tempfile.TemporaryDirectory() as work:
            rows += bench_setup(name, bs, bs * (args.rounds + 1), args.rounds, Path(work))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, median of {args.rounds} rounds "
          f"(paths alternated)\n")
    print(markdown_table(["set-up", "from", "batch", "train img/s", "data ms/step", "model ms/step", "data share",
                          "extraction img/s", "cache bytes/img/view"], rows))
    gb = IMAGENET_IMAGES * IMAGENET_L * 2 / 1e9
    print(f"\nImageNet-1k at 256 px: {IMAGENET_IMAGES:,} images x {IMAGENET_L} tokens x 2 bytes = {gb:.2f} GB per "
          f"view (+ 4 bytes/image of labels)")


if __name__ == "__main__":
    main()
