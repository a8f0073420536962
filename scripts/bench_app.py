"""The web app's costs (docs/benchmarks.md): time to the first image and to a whole batch through the app's API
beside sample.py's own functions on the same model and flags, the resident memory of the app's process before and
after --runs generations in a row, and the page's load time in headless Chromium (when Selenium and Debian's
chromium are installed).

    python scripts/bench_app.py --ckpt CKPT.pth --runs 50
Without --ckpt it builds a randomly initialised model of --depth / --width, 10x10 tokens at the last scale and a
4x tokenizer: 40 px images (nothing is learned; the time is the same). The API client does not download the
images (a page fetches them itself, while the next batch runs)."""
import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sample
from models import build_vae_mvar
from models.loading import mvar_checkpoint
from scripts.app_jobs import parse_sample_args
from scripts.markdown import markdown_table

FLAGS = ["--classes", "1", "--num_per_class", "8", "--bs", "4", "--cfg", "1.5", "--top_k", "100", "--top_p", "0.9",
         "--seed", "0", "--no-more_smooth"]


def build_ckpt(depth: int, width: int, folder: Path) -> Path:
    torch.manual_seed(0)
    vae, mvar = build_vae_mvar("cpu", patch_nums=(1, 2, 3, 4, 5, 6, 8, 10), V=512, Cvae=16, ch=32, ch_mult=(1, 1, 2),
                               num_classes=10, depth=depth, embed_dim=width, num_heads=max(1, width // 64),
                               flash_if_available=False, fused_if_available=False)
    path = folder / "bench.pth"
    torch.save(mvar_checkpoint(mvar, vae), path)
    return path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cli_run(ckpt: Path, folder: Path):
    """sample.py's functions in this process, the model loaded once -> a function timing one run of the command the
    app offers (its batches, then the PNG grid it writes): (first batch, all batches and the grid) seconds."""
    args = parse_sample_args(["--ckpt", str(ckpt), "--device", "cpu", *FLAGS, "--out", str(folder / "cli.png")])
    mvar, _, _ = sample.open_model(args, torch.device("cpu"))
    generate = sample.make_generate(mvar, args, torch.device("cpu"))

    def run() -> tuple[float, float]:
        t0, done = time.perf_counter(), []

        def timed(label_B: np.ndarray, g_seed: int) -> np.ndarray:
            imgs_BHW3 = generate(label_B, g_seed)
            done.append(time.perf_counter() - t0)
            return imgs_BHW3

        sample.sample_pictures(args, timed)
        return done[0], time.perf_counter() - t0

    return run


def app_run(client) -> tuple[float, float]:
    """The app's /sample through gradio_client, the same flags: (first partial result, final result) seconds."""
    t0, first = time.perf_counter(), None
    for _out in client.submit(["1"], 8, 1.5, 100, 0.9, 0, False, 4, api_name="/sample"):
        first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0


def page_load(url: str, reps: int = 3) -> float | None:
    try:
        from selenium import webdriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        return None
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        return None
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            driver.get(url)
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "generate"))
            times.append(time.perf_counter() - t0)
        return min(times)
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--runs", type=int, default=50, help="generations in a row for the memory figure")
    p.add_argument("--reps", type=int, default=5, help="timing repeats, app and sample.py alternated (median)")
    args = p.parse_args()
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else build_ckpt(args.depth, args.width, Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "scripts.app", "--ckpt", str(ckpt), "--device", "cpu",
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/"
            for _ in range(600):
                try:
                    client = Client(url, verbose=False, download_files=False)  # a page fetches its images itself
                    break
                except Exception:
                    time.sleep(0.5)
            start = rss_mb(server.pid)
            load = page_load(url)
            cli_once, app_all, cli_all = cli_run(ckpt, Path(tmp)), [], []
            app_run(client), cli_once()  # an untimed round: first calls' one-time costs are neither side's
            for _ in range(args.reps):  # alternated, so that the load of a shared machine hits both alike
                app_all.append(app_run(client))
                cli_all.append(cli_once())
            app, cli = np.median(app_all, axis=0), np.median(cli_all, axis=0)
            before = rss_mb(server.pid)
            t0 = time.perf_counter()
            for i in range(args.runs):
                client.predict(["1"], 8, 1.5, 100, 0.9, i, False, 4, api_name="/sample")
            after = rss_mb(server.pid)
            print(f"threads: {torch.get_num_threads()}; 8 images in batches of 4; medians of {args.reps}, app and "
                  f"sample.py alternated\n")
            print(markdown_table(["", "app (`/sample`)", "sample.py's functions", "app overhead"], [
                [what, f"{a:.3f} s", f"{c:.3f} s", f"{a / c - 1:+.1%}"] for what, a, c in
                (("first image (first batch of 4)", app[0], cli[0]), ("all 8 images (2 batches)", app[1], cli[1]))]))
            print(f"\nRSS of the app: {start:.0f} MB at start, {before:.0f} MB after the timing runs, {after:.0f} MB "
                  f"after {args.runs} more generations ({(time.perf_counter() - t0) / max(args.runs, 1):.2f} s each)")
            print("page load (headless Chromium, until the Generate button is there): "
                  + (f"{load:.2f} s" if load is not None else "no browser"))
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
