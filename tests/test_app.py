"""The web app (scripts/app.py) through gradio_client: the same pixels as the sample.py command it offers, edits
that keep what lies outside the box, bad uploads answered with a message while the server keeps serving, no file
of the server reachable from the page, refused checkpoints refused before any server starts. The real-browser
test is tests/test_app_browser.py; both use this file's `app` fixture."""
import math
import re
import shlex
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import REPO
from models.loading import mvar_checkpoint

gradio_client = pytest.importorskip("gradio_client", reason="the app extra is not installed: pip install -e .[app]")

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLE = (["3: three", "random"], 2, 1.5, 10, 0.9, 5, False, 3)  # classes, per class, cfg, k, p, seed, smooth, bs
EDIT = (["7: seven", "2: two"], 2, 1.5, 10, 0.9, 1, False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_mvar):
    """The app on a free loopback port over a tiny checkpoint that records class names -> (url, ckpt path, the
    Gradio Blocks)."""
    from scripts.app import launch  # first: it turns Gradio's analytics off before Gradio is imported

    pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e .[app]")

    vae, mvar = tiny_mvar()
    ckpt = tmp_path_factory.mktemp("app") / "tiny.pth"
    torch.save({**mvar_checkpoint(mvar, vae), "data": {"classes": NAMES}}, ckpt)
    demo, session, url = launch(["--ckpt", str(ckpt), "--device", "cpu", "--port", str(free_port()),
                                 "--max_upload_mb", "1"], block=False)
    yield url, ckpt, demo, session
    demo.close()
    session.workspace.close()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app[0], verbose=False)


def sample_py(command: str, out) -> list[np.ndarray]:
    """Run the offered command (its last line) with --out replaced by the folder `out` -> its images in order."""
    argv = shlex.split(command.strip().splitlines()[-1])[2:]
    argv[argv.index("--out") + 1] = str(out)
    folder = sample.main(argv)
    return [np.asarray(Image.open(p)) for p in sorted(folder.iterdir())]


def test_sampling_gives_the_pixels_of_the_offered_command(app, client, tmp_path):
    url, ckpt, *_ = app
    images, status, command, files = client.predict(*SAMPLE, api_name="/sample")
    assert f"--ckpt {ckpt}" in command and "--classes 3 " in command and "--seed 5" in command
    assert [i["caption"] for i in images][:2] == ["3: three"] * 2 and status.startswith("4 images")
    shown = [np.asarray(Image.open(i["image"])) for i in images]
    assert all(np.array_equal(a, b) for a, b in zip(shown, sample_py(command, tmp_path / "cli"), strict=True))
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["command.sh", "samples.png"]
    # a review: `python sample.py` from the downloads' folder found no sample.py, and overwrote samples.png
    assert shlex.split(command.splitlines()[-1])[1] == str(REPO / "sample.py") and "--out samples-rerun.png" in command


def edit_photo(folder: Path, seed: int = 4, hw: tuple[int, int] = (16, 16)) -> Path:
    """folder/photo.png: noise from `seed`, `hw` pixels (16 px square by default: the tiny model sees it at 8 px)."""
    photo = folder / "photo.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(photo)
    return photo


def test_edit_keeps_the_outside_of_the_box_and_matches_sample_py(client, tmp_path):
    photo = edit_photo(tmp_path, seed=0)  # the box's top half is rows 0-3 of the model's 8 px
    before, mask, edits, _, command, files = client.predict(gradio_client.handle_file(str(photo)), None, "0,0,16,8",
                                                            *EDIT, api_name="/edit")
    assert "--edit image.png --box=0,0,16,8" in command and sorted(f.rsplit("/", 1)[-1] for f in files) == \
        ["command.sh", "edit.png", "image.png"]
    out = [np.asarray(Image.open(e["image"])) for e in edits]
    assert np.asarray(Image.open(mask))[:4].all() and not np.asarray(Image.open(mask))[4:].any()
    assert all(np.array_equal(o[4:], out[0][4:]) for o in out)  # outside: the same reconstruction in every edit
    assert all((o[:4] != out[0][:4]).any() for o in out[1:])  # inside: each edit its own
    grid = np.asarray(Image.open(next(f for f in files if f.endswith("edit.png"))))
    argv = shlex.split(command.strip().splitlines()[-1])[2:]
    argv[argv.index("--edit") + 1], argv[argv.index("--out") + 1] = str(photo), str(tmp_path / "cli.png")
    assert np.array_equal(np.asarray(Image.open(sample.main(argv))), grid)


def bomb_png(path, side: int = 40_000) -> None:
    """A valid 1x1 PNG whose header claims side x side pixels (PIL refuses it when opening, before decoding)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["16-bit", "palette", "RGBA", "grey", "JPEG", "large"])
def test_image_kinds_edit(client, tmp_path, kind):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    path = tmp_path / ("x.jpg" if kind in ("JPEG", "large") else "x.png")
    {"16-bit": lambda: Image.fromarray(rng.integers(0, 65536, (12, 12)).astype(np.uint16)).save(path),
     "palette": lambda: Image.fromarray(rgb).convert("P").save(path),
     "RGBA": lambda: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(path),
     "grey": lambda: Image.fromarray(rgb[..., 0]).save(path),
     "JPEG": lambda: Image.fromarray(rgb).save(path),
     "large": lambda: Image.new("RGB", (3000, 2000), (90, 30, 200)).save(path, quality=70)}[kind]()
    box = "1000,500,2000,1500" if kind == "large" else "0,0,4,4"
    out = client.predict(gradio_client.handle_file(str(path)), None, box, *EDIT, api_name="/edit")
    assert len(out[2]) == 4 and out[3] == "4 edits"


BAD = [("text", "0,0,4,4", "not an image of the formats read here"),
       ("bomb", "0,0,4,4", "not an image of the formats read here"),
       ("eps", "0,0,4,4", "not an image of the formats read here \\(PNG, JPEG"),  # not rendered by Ghostscript
       ("truncated", "0,0,4,4", "the image is damaged"),
       ("png", "", "mark the region to regenerate"),
       ("png", "0,0,99,4", "must satisfy 0 <= x0 < x1 <= 12 "),
       ("png", "a,b", "expected four integers"),
       ("png", "0,0,12,1", None),  # a box the centre crop leaves out: an empty mask
       ("big", "0,0,4,4", "(?i)file.*(large|size)")]


def bad_file(path, kind) -> None:
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "bomb":
        bomb_png(path)
    elif kind == "big":  # over --max_upload_mb 1
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(path)
    elif kind == "eps":
        path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 12 12\nshowpage\n")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:3000])
    else:
        Image.new("RGB", (12, 16), (10, 200, 30)).save(path)


def test_bad_input_gets_a_message_and_the_server_keeps_serving(client, tmp_path):
    for i, (kind, box, message) in enumerate(BAD):
        path = tmp_path / f"{i}.{'txt' if kind == 'text' else 'png'}"
        bad_file(path, kind)
        with pytest.raises(Exception, match=message or "the mask covers no pixel"):
            client.predict(gradio_client.handle_file(str(path)), None, box, *EDIT, api_name="/edit")
    assert client.predict(*SAMPLE, api_name="/sample")[1].startswith("4 images")  # still serving


def test_a_mask_over_everything_works(client, tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (12, 12), (10, 200, 30)).save(path)
    _, mask, edits, *_ = client.predict(gradio_client.handle_file(str(path)), None, "0,0,12,12", *EDIT,
                                        api_name="/edit")
    assert np.asarray(Image.open(mask)).all() and len(edits) == 4


def test_the_image_sent_to_editing_is_the_selected_one_of_the_run_on_screen(app):
    """"edit the selected image" reads the paths the gallery shows: they followed the gallery only once a run had
    ended, so while one streamed its batches the button sent the previous run's image. A new run selects its
    first image until one is clicked."""
    gr = pytest.importorskip("gradio")
    demo = app[2]
    listeners = {f.api_name: f for f in demo.fns.values()}
    sample_fn = listeners["sample"].fn
    send_fn = next(f.fn for f in demo.fns.values() if [b.elem_id for b in f.outputs[:1]] == ["upload"])
    classes, num, cfg, k, p, seed, smooth, _ = SAMPLE
    yields = list(sample_fn(classes, num, cfg, k, p, seed, smooth, 1, progress=lambda *a, **kw: None))
    assert [y[1] for y in yields] == [f"{n} images, more coming" for n in (1, 2, 3, 4)] + ["4 images (done)"]
    assert yields[0][5] == 0 and all(y[5] == gr.skip() for y in yields[1:])
    for gallery_items, *_, shown, _ in yields:  # each batch as it arrives: the shown paths are the gallery's
        assert shown == [path for path, _ in gallery_items]
    mid_run = yields[1][4]
    assert send_fn(mid_run, 1)[0] == mid_run[1] and send_fn(mid_run, 7)[0] == mid_run[-1]


def test_the_page_cannot_read_server_files(app):
    """The route that serves the page's results (a live one: it serves a sample) refuses other files."""
    import urllib.error
    import urllib.request

    url, ckpt, *_ = app
    images = gradio_client.Client(url, verbose=False, download_files=False).predict(*SAMPLE, api_name="/sample")[0]
    served = images[0]["image"]["url"]
    assert "/gradio_api/file=" in served and urllib.request.urlopen(served, timeout=10).status == 200
    for path in ("/etc/hostname", str(ckpt), "scripts/app.py"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/file={path}", timeout=10)
        assert e.value.code == 403, path


def test_queue_runs_one_generation_at_a_time(app, client):
    jobs = [client.submit(*SAMPLE, api_name="/sample") for _ in range(3)]
    results = [job.result(timeout=120) for job in jobs]
    pixels = [[Image.open(i["image"]).tobytes() for i in r[0]] for r in results]
    assert pixels[1] == pixels[0] == pixels[2]  # queued requests: each ran whole, the same images
    demo = app[2]
    generate = [fn for fn in demo.fns.values() if fn.api_name in ("sample", "edit")]
    assert len(generate) == 2 and {(fn.concurrency_id, fn.concurrency_limit) for fn in generate} == {("generate", 1)}
    assert demo._queue.max_size == 8  # --queue_size: more waiting requests are turned away


def test_refused_checkpoint_gets_the_cli_message_before_any_server(tmp_path, monkeypatch, capsys):
    from scripts.app import NO_MODEL, launch

    pytest.importorskip("gradio", reason="the app extra is not installed")

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as cli:
        sample.main(["--ckpt", str(bad), "--device", "cpu", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as web:
        launch(["--ckpt", str(bad), "--device", "cpu", "--port", str(free_port())], block=False)
    assert str(web.value) == str(cli.value) and "unreadable" in str(web.value)
    monkeypatch.chdir(tmp_path)  # no local_output/demo here
    with pytest.raises(SystemExit, match="make demo"):
        launch(["--port", str(free_port())], block=False)
    assert NO_MODEL.count("\n") == 0


@pytest.mark.parametrize("flags, message", [(["--queue_size", "0"], "--queue_size=0: expected at least 1"),
                                            (["--max_upload_mb", "0"], "--max_upload_mb=0.0: expected a finite size "),
                                            (["--port", "70000"], "--port=70000: expected 0 to 65535"),
                                            # a review: an OverflowError traceback once the model loaded
                                            (["--max_upload_mb", "inf"], "--max_upload_mb=inf: expected a finite"),
                                            # a review: "choose another --port" once the model loaded
                                            (["--host", "256.1.1.1"], "--host=256.1.1.1: cannot listen on that "
                                                                      "address (")])
def test_server_flags_that_would_refuse_every_request_are_errors_before_the_model(flags, message, capsys):
    """A review: --queue_size 0 and --max_upload_mb 0 started a server that refused every request or upload."""
    from scripts.app import launch

    with pytest.raises(SystemExit):
        launch(["--ckpt", "no-such.pth", *flags], block=False)
    assert message in capsys.readouterr().err


def test_a_taken_port_is_one_error_line(app):
    """A review: a busy --port ended in a traceback advising launch()'s server_port parameter."""
    from urllib.parse import urlparse

    from scripts.app import launch

    url, ckpt, *_ = app
    port = urlparse(url).port
    with pytest.raises(SystemExit, match=rf"^error: --host=127.0.0.1 --port={port}: cannot listen there \(.*\): "
                                         "choose another --port$"):
        launch(["--ckpt", str(ckpt), "--device", "cpu", "--port", str(port)], block=False)


def test_page_errors_name_workspace_files_by_their_names():
    """A review: messages showed the private workspace's paths (/tmp/mvar-app-.../uploads/<hash>/photo.png)."""
    import gradio as gr

    from scripts.app_ui import page_errors

    with pytest.raises(gr.Error) as shown, page_errors(Path("/tmp/mvar-app-x")):
        raise ValueError("the upload=/tmp/mvar-app-x/uploads/09c7/notimg.png: not an image; --edit=/tmp/mvar-app-x/"
                         "000103/image.png: the image is damaged")
    assert shown.value.message == "the upload=notimg.png: not an image; --edit=image.png: the image is damaged"


def test_a_drawn_mark_edits_like_the_same_box(client, tmp_path):
    """Strokes drawn over the preview (an RGBA layer, here at half the image's size) become mask.png at the
    image's size: the same edits as the box they cover."""
    photo, layer = tmp_path / "photo.png", tmp_path / "layer.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photo)
    strokes = np.zeros((16, 16, 4), dtype=np.uint8)
    strokes[:8, :, 0], strokes[:8, :, 3] = 255, 255  # the top half, in red
    Image.fromarray(strokes).save(layer)
    drawing = {"background": gradio_client.handle_file(str(photo)), "layers": [gradio_client.handle_file(str(layer))],
               "composite": None}
    drawn = client.predict(gradio_client.handle_file(str(photo)), drawing, "", *EDIT, api_name="/edit")
    boxed = client.predict(gradio_client.handle_file(str(photo)), None, "0,0,32,16", *EDIT, api_name="/edit")
    assert "--mask mask.png" in drawn[4] and any(f.endswith("mask.png") for f in drawn[5])
    assert [Image.open(e["image"]).tobytes() for e in drawn[2]] == [Image.open(e["image"]).tobytes() for e in boxed[2]]
    # strokes of another shape (a review: the previous upload's, stretched over this one)
    Image.fromarray(strokes[:, :8]).save(layer)
    with pytest.raises(gradio_client.exceptions.AppError, match=r"the drawing \(8x16\) is not of this image's shape"):
        client.predict(gradio_client.handle_file(str(photo)), drawing, "", *EDIT, api_name="/edit")


def test_drawings_larger_than_any_preview_or_of_several_layers_are_refused_before_decoding(app, client, tmp_path,
                                                                                           monkeypatch):
    """A review: Gradio's editor decoded every image of a drawing, of any number, up to PIL's 179 MP guard (3 layers
    of 81 MP: +2 GB). Each layer is now checked by its header against the model's largest preview, one layer only,
    and the background and composite sent back (the preview) are not decoded at all."""
    from utils.sample_io import edit_preview_max_pixels

    photo = edit_photo(tmp_path)
    bound = edit_preview_max_pixels(app[3].mvar.image_size)
    side = math.isqrt(bound) + 1
    huge, small, bomb = tmp_path / "huge.png", tmp_path / "small.png", tmp_path / "bomb.png"
    Image.new("RGBA", (side, side)).save(huge)
    Image.new("RGBA", (16, 16)).save(small)
    bomb_png(bomb)
    refusals = [([huge], f"the drawing is {side}x{side} px: at most {bound:,} pixels"),
                ([bomb], "the drawing is not an image"), ([small, small], "2 drawing layers: one only")]
    for layers, message in refusals:
        drawing = {"background": None, "layers": [gradio_client.handle_file(str(p)) for p in layers], "composite": None}
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(gradio_client.handle_file(str(photo)), drawing, "", *EDIT, api_name="/edit")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda im, load=Image.Image.load: decoded.append(im.size) or load(im))
    drawing = {"background": gradio_client.handle_file(str(huge)), "layers": [],
               "composite": gradio_client.handle_file(str(huge))}
    assert len(client.predict(gradio_client.handle_file(str(photo)), drawing, "0,0,8,8", *EDIT, api_name="/edit")[2])
    assert decoded and (side, side) not in decoded  # the edit decoded its photo, never the preview sent back


def test_the_largest_preview_is_within_its_bound(tmp_path):
    """edit_preview_max_pixels bounds what read_edit_image returns, and closely: the longest, widest image just
    short of a reduction comes within 7% of it."""
    from utils.sample_io import EDIT_MAX_ASPECT, edit_preview_max_pixels, read_edit_image

    reso, pixels = 8, []
    for short in (1, 15, 16, 31, 32, 33, 63, 64, 95):
        for ratio in (1, 3, EDIT_MAX_ASPECT):
            Image.new("RGB", (short * ratio, short)).save(tmp_path / "x.png")
            pixels.append(read_edit_image(tmp_path / "x.png", reso)[0][0].numel())
    assert max(pixels) <= edit_preview_max_pixels(reso) < 1.07 * max(pixels)


def test_bf16_falls_back_to_fp32_in_the_session_as_in_sample_py(monkeypatch, tiny_mvar, tmp_path):
    """On a CPU without bf16 instructions sample.py samples --bf16 in fp32; the app's session kept bf16 (emulated,
    slower), so the offered command did not reproduce the page's pixels (a review measured 57 levels apart)."""
    from scripts.app_jobs import Session, Workspace

    monkeypatch.setenv("MVAR_CPU_BF16", "0")
    _, mvar = tiny_mvar()
    workspace = Workspace()
    try:
        session = Session(mvar, ["--ckpt", "x.pth", "--bf16"], torch.device("cpu"), None, workspace)
        args = session.parse([*session.base_argv, "--out", str(tmp_path / "x.png")])
        assert sample.parse_args(["--ckpt", "x.pth", "--bf16"]).bf16 and not args.bf16
    finally:
        workspace.close()


def test_class_names_are_read_from_a_legacy_format_checkpoint(tiny_mvar, tmp_path):
    """torch's legacy (non-zip) format loads in sample.py but cannot be memory-mapped: the app crashed at start-up."""
    from scripts.app import class_names

    vae, mvar = tiny_mvar()
    path = tmp_path / "legacy.pth"
    torch.save({**mvar_checkpoint(mvar, vae), "data": {"classes": NAMES}}, path, _use_new_zipfile_serialization=False)
    assert class_names(path, mvar) == NAMES


def test_class_names_are_read_without_hashing_the_weights_again(tiny_mvar, tmp_path, monkeypatch):
    """sample.py's load checked the file's digest, which reads every tensor (34 GB for a d30 training checkpoint):
    the app's second read, for the class names alone, does not hash them again."""
    from models import loading
    from scripts.app import class_names

    vae, mvar = tiny_mvar()
    path = tmp_path / "ckpt.pth"
    torch.save(loading.with_digest({**mvar_checkpoint(mvar, vae), "data": {"classes": NAMES}}), path)
    monkeypatch.setattr(loading, "check_digest", lambda *a: pytest.fail("the weights were hashed again"))
    assert class_names(path, mvar) == NAMES


def test_sigterm_stops_the_server_and_deletes_its_workspace(tiny_mvar, tmp_path):
    """`kill`, `docker stop` and schedulers send SIGTERM, which skipped the clean-up: generated images, uploads and
    masks stayed in /tmp. A workspace nobody closes goes when it is collected."""
    import gc
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, SUBPROCESS_ENV
    from scripts.app_jobs import Workspace

    workspace = Workspace()
    root = workspace.root
    del workspace
    gc.collect()
    assert not root.exists()

    vae, mvar = tiny_mvar()
    torch.save(mvar_checkpoint(mvar, vae), tmp_path / "tiny.pth")
    (tmp_path / "tmp").mkdir()
    port = free_port()
    env = {**SUBPROCESS_ENV, "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.app", "--ckpt", str(tmp_path / "tiny.pth"), "--device",
                             "cpu", "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "err.txt", "w"), start_new_session=True)
    try:
        for _ in range(600):  # serving: its workspace exists and the port answers
            with socket.socket() as s:
                if list((tmp_path / "tmp").glob("mvar-app-*")) and s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("the app did not start serving within 60 s")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    assert not list((tmp_path / "tmp").glob("mvar-app-*"))


def test_requests_are_bounded_and_classes_may_come_as_one_string(client, app, monkeypatch):
    """A review: nothing bounded the classes of a request (["random"] * 100000 ran the server out of memory while
    holding the model), an uploaded image was decoded whatever its size below PIL's 179 MP, and a class sent as the
    string "3" became the classes 3... digit by digit."""
    with pytest.raises(Exception, match="17 classes: at most 16 per request"):
        client.predict(["random"] * 17, *SAMPLE[1:], api_name="/sample")
    images, _, command, _ = client.predict("3", *SAMPLE[1:], api_name="/sample")
    assert "--classes 3 --num_per_class 2" in command and len(images) == 2
    monkeypatch.setattr("scripts.app_jobs.MAX_PIXELS", 100)  # the server runs in this process
    path = app[1].parent / "12px.png"
    Image.new("RGB", (12, 12), (10, 200, 30)).save(path)
    with pytest.raises(Exception, match="the upload is 12x12 px .* reduce it first"):
        client.predict(gradio_client.handle_file(str(path)), None, "0,0,4,4", *EDIT, api_name="/edit")


def test_a_class_edited_twice_keeps_both_rows_in_the_gallery(client, tmp_path):
    """A review: the edits were named class{c}_{k} per row, so a class given twice (or drawn by "random") wrote its
    second row over the first: the gallery showed the second row twice. They are numbered on, as sample.py's."""
    photo = edit_photo(tmp_path, seed=3)
    _, _, edits, status, _, _ = client.predict(gradio_client.handle_file(str(photo)), None, "0,0,16,8",
                                               ["7", "7: seven"], *EDIT[1:], api_name="/edit")
    pixels = [Image.open(e["image"]).tobytes() for e in edits]
    assert status == "4 edits" and len(set(pixels)) == 4 and [e["caption"] for e in edits] == ["7: seven"] * 4


def test_gradios_copies_of_uploads_and_results_stay_in_the_private_workspace(app, client):
    """A review: Gradio kept every upload and result in /tmp/gradio, readable by every local user, for an hour."""
    import os
    import stat

    session = app[3]
    if os.environ.get("GRADIO_TEMP_DIR") != str(session.workspace.uploads):
        pytest.skip("GRADIO_TEMP_DIR was set before the app started (the user's choice wins)")
    client.predict(*SAMPLE, api_name="/sample")
    assert stat.S_IMODE(session.workspace.root.stat().st_mode) == 0o700
    assert any(session.workspace.uploads.rglob("*.png"))


@pytest.fixture
def tiny_session(tiny_mvar):
    """A Session over the tiny M-VAR on the CPU, in a workspace of its own (closed after the test)."""
    from scripts.app_jobs import Session, Workspace

    _, mvar = tiny_mvar()
    session = Session(mvar, ["--ckpt", "x.pth", "--device", "cpu"], torch.device("cpu"), None, Workspace())
    yield session
    session.workspace.close()


def test_a_request_while_a_cancelled_one_still_runs_waits_for_it(tiny_session, monkeypatch):
    """A request Gradio cancelled keeps the model until its work ends. The next one waits for it, holding the queue's
    one slot, so the requests behind it stay queued (a review: refusing at once failed every queued request, one
    after another, within 3 s of a cancel); past BUSY_WAIT_S it is refused."""
    import threading

    from scripts import app_jobs
    from scripts.app_jobs import Knobs

    knobs, outcome = Knobs(classes=["1"], num_per_class=1, bs=1), []

    def request():
        try:
            outcome.append(list(tiny_session.sample(knobs)))
        except ValueError as e:
            outcome.append(e)
    with tiny_session.generating():  # the cancelled request, still running
        waiting = threading.Thread(target=request, daemon=True)
        waiting.start()
        waiting.join(timeout=1)
        assert waiting.is_alive() and not outcome, "the request did not wait for the running one"
    waiting.join(timeout=60)
    assert len(outcome[0][-1].images) == 1
    monkeypatch.setattr(app_jobs, "BUSY_WAIT_S", 0.2)
    with tiny_session.generating(), pytest.raises(ValueError, match="still runs after 0.2 s of waiting"):
        next(tiny_session.sample(knobs))


def test_refused_requests_leave_the_running_requests_folder(tiny_session, tmp_path, monkeypatch):
    """A refused request made its folder before asking for the model, so `keep` (16) refusals during one long request
    deleted the folder that request was writing into."""
    from scripts import app_jobs
    from scripts.app_jobs import Knobs

    monkeypatch.setattr(app_jobs, "BUSY_WAIT_S", 0.01)

    photo, knobs = edit_photo(tmp_path), Knobs(classes=["1"], num_per_class=1)
    with tiny_session.generating():  # a long request, writing into its folder
        running = tiny_session.workspace.new_folder()
        for _ in range(tiny_session.workspace.keep):
            with pytest.raises(ValueError, match="still runs after"):
                next(tiny_session.sample(knobs))
            with pytest.raises(ValueError, match="still runs after"):
                tiny_session.edit(photo, knobs, box="0,0,8,8")
    assert running.is_dir()


def test_progress_counts_every_scale_of_a_request_to_its_total(tiny_session, tmp_path):
    """The page's progress bar: on_scale(done, total) after each scale, ending at done == total (3 classes x 2 at
    --bs 4 are 2 batches of the 4 scales; an edit of 2 classes x 3 at --bs 2, two batches each), and the grid has a
    row per class. A total of the whole batches only, counts from 0, or an edit's total of one batch per class (its
    bar stopped short at num_per_class > bs) passed the suite."""
    from scripts.app_jobs import Knobs

    calls = []
    knobs = Knobs(classes=["1", "2", "3"], num_per_class=2, bs=4)
    grid = list(tiny_session.sample(knobs, on_scale=lambda *c: calls.append(c)))[-1].grid
    assert calls == [(k, 8) for k in range(1, 9)] and Image.open(grid).size == (2 * 10 + 2, 3 * 10 + 2)
    calls.clear()
    tiny_session.edit(edit_photo(tmp_path), Knobs(classes=["1", "2"], num_per_class=3, bs=2), box="0,0,8,8",
                      on_scale=lambda *c: calls.append(c))
    assert calls == [(k, 16) for k in range(1, 17)]
    assert not tiny_session.mvar.head._forward_hooks


def test_a_request_that_fails_midway_frees_the_model_and_its_progress_hook(tiny_session):
    """An error in a request (here its progress callback) must not keep the model's lock, or every later request is
    told to retry forever, nor leave its hook on the model, which would fail every later request the same way."""
    from scripts.app_jobs import Knobs

    def failing(done, total):
        raise RuntimeError("the page went away")
    with pytest.raises(RuntimeError, match="the page went away"):
        list(tiny_session.sample(Knobs(classes=["1"], num_per_class=1, bs=1), on_scale=failing))
    assert not tiny_session.mvar.head._forward_hooks
    assert len(list(tiny_session.sample(Knobs(classes=["1"], num_per_class=1, bs=1)))[-1].images) == 1


def test_strokes_drawn_over_another_shape_than_the_uploads_are_refused(tiny_session, tmp_path):
    """A drawing 2 px narrower than the 16 px preview was drawn over the previous upload (rounding gives 1 px at
    most): it would be stretched over this image."""
    from scripts.app_jobs import Knobs

    with pytest.raises(ValueError, match=r"the drawing \(14x16\) is not of this image's shape \(16x16\)"):
        tiny_session.edit(edit_photo(tmp_path), Knobs(classes=["1"], num_per_class=1), drawn_hw=np.ones((16, 14), bool))


@pytest.mark.parametrize("W, H", [(200, 33), (300, 47)])
def test_strokes_drawn_over_the_preview_of_any_shape_are_taken(tiny_session, tmp_path, W, H):
    """The preview of a 200x33 image is 100x17: its height rounded up, times W/H, put the width 1.06 px from the
    preview's, and such drawings were refused ("draw again", which could not help)."""
    from scripts.app_jobs import Knobs, drawn_at_some_scale

    photo = edit_photo(tmp_path, hw=(H, W))
    preview = tiny_session.preview(photo)[0]
    drawn_hw = np.zeros(preview.shape[:2], bool)
    drawn_hw[:, : preview.shape[1] // 2] = True
    result, _, mask = tiny_session.edit(photo, Knobs(classes=["1"], num_per_class=1), drawn_hw=drawn_hw)
    assert len(result.images) == 1 and mask.any() and not mask.all()
    assert drawn_at_some_scale(16, 16, 16, 16) and not drawn_at_some_scale(16, 14, 16, 16)


def test_an_edit_with_a_drawing_takes_the_uploads_size_from_its_preview(tiny_session, tmp_path, monkeypatch):
    """The size a drawing is checked against and its mask saved at came from decoding the upload again (a PNG's EXIF
    orientation is read only by decoding it): with its preview's, an edit decodes the upload once, in sample.py."""
    import scripts.app_jobs
    from scripts.app_jobs import Knobs

    reads = []
    read = scripts.app_jobs.read_edit_image
    monkeypatch.setattr(scripts.app_jobs, "read_edit_image", lambda path, reso: reads.append(path) or read(path, reso))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    photos = [edit_photo(tmp_path / name, hw=(24, 40)) for name in ("a", "b")]
    drawn_hw = np.zeros(tiny_session.preview(photos[0])[0].shape[:2], bool)
    drawn_hw[:, drawn_hw.shape[1] // 2:] = True  # the right half: inside the centre square the model sees
    masks = [tiny_session.edit(photo, Knobs(classes=["1"], num_per_class=1), drawn_hw=drawn_hw)[2] for photo in photos]
    assert reads == [photos[0], photos[1]]  # the preview of a, none for its edit; b's edit without a preview reads it
    assert np.array_equal(masks[0], masks[1]) and masks[0].any() and not masks[0].all()


def model_is_held(session) -> bool:
    """Whether a request now would have to wait because another holds the model."""
    return session.lock.locked()


def test_a_request_holds_the_model_through_all_its_work(tiny_session, tmp_path):
    """The model stays held through every scale of a sample and of an edit, and is free after: a request that held it
    only while making its folder and command let a cancelled request's remaining work (no longer counted by Gradio's
    queue) sample beside the next request, which passed the suite."""
    from scripts.app_jobs import Knobs

    held, knobs = [], Knobs(classes=["1"], num_per_class=2, bs=1)
    list(tiny_session.sample(knobs, on_scale=lambda *_: held.append(model_is_held(tiny_session))))
    tiny_session.edit(edit_photo(tmp_path), knobs, box="0,0,8,8",
                      on_scale=lambda *_: held.append(model_is_held(tiny_session)))
    assert held == [True] * 2 * 2 * len(tiny_session.mvar.patch_nums) and not model_is_held(tiny_session)


def test_a_samples_grid_is_its_images_in_order_and_each_batch_lists_the_images_so_far(tiny_session):
    """The grid offered for download holds the request's images in their order (rows per class) and each streamed
    Result lists the images of the batches done so far: batches stacked in another order, or Results sharing one
    growing list, passed the suite (2 classes x 2 at --bs 3: two batches, of 3 images and 1)."""
    from scripts.app_jobs import Knobs
    from utils.sample_io import save_grid

    results = list(tiny_session.sample(Knobs(classes=["1", "2"], num_per_class=2, bs=3)))
    assert [len(r.images) for r in results] == [3, 4, 4] and results[0].images == results[-1].images[:3]
    images = np.stack([np.asarray(Image.open(p)) for p in results[-1].images])
    expected = save_grid(images, tiny_session.workspace.root / "expected.png", ncol=2)
    assert Image.open(results[-1].grid).tobytes() == Image.open(expected).tobytes()


def test_a_box_wins_over_a_drawing(tiny_session, tmp_path):
    """Given both, the box is the region (the page's promise): the drawing, here the whole image, is left unused."""
    from scripts.app_jobs import Knobs

    result, _, mask = tiny_session.edit(edit_photo(tmp_path), Knobs(classes=["1"], num_per_class=1),
                                        drawn_hw=np.ones((16, 16), bool), box="0,0,16,8")
    assert "--box=0,0,16,8" in result.command_text and "--mask" not in result.command_text
    assert mask[:4].all() and not mask[4:].any()


def test_a_drawing_over_a_wide_image_is_its_mask_even_a_pixel_narrower(tiny_session, tmp_path):
    """Strokes over the top half of a 24x16 image's preview become a 24x16 mask.png over its top half, also when
    the drawing is one pixel narrower (the preview's rounding, which the shape check allows): width and height
    swapped anywhere, or a check refusing that rounding, passed the suite, whose drawings were all square."""
    from scripts.app_jobs import Knobs

    drawn = np.zeros((16, 23), bool)
    drawn[:8] = True
    result, _, mask = tiny_session.edit(edit_photo(tmp_path, hw=(16, 24)), Knobs(classes=["1"], num_per_class=1),
                                        drawn_hw=drawn)
    mask_png = next(f for f in result.files if f.name == "mask.png")
    assert np.array_equal(np.asarray(Image.open(mask_png)) > 0, np.arange(16)[:, None] < np.full((16, 24), 8))
    assert mask[:4].all() and not mask[4:].any()


def test_an_upload_of_max_pixels_is_accepted_and_one_more_row_refused(tmp_path, monkeypatch):
    """MAX_PIXELS is "at most": a limit off by one refused a photo of exactly the size the page promises."""
    from scripts import app_jobs

    monkeypatch.setattr(app_jobs, "MAX_PIXELS", 144)
    for height in (12, 13):
        Image.new("RGB", (12, height)).save(tmp_path / f"{height}.png")
    app_jobs.check_upload(tmp_path / "12.png")
    with pytest.raises(ValueError, match="the upload is 12x13 px"):
        app_jobs.check_upload(tmp_path / "13.png")


def test_the_mask_is_every_layers_strokes_and_none_when_nothing_is_drawn():
    """Strokes on two layers (Gradio's editor gives one per layer) are both the mask; layers without strokes, or
    without alpha, are no mask (an edit of nothing)."""
    from scripts.app_jobs import mask_from_layers

    top, left = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    top[0, :, 3], left[:, 0, 3] = 255, 255
    mask = mask_from_layers([top, left, np.ones((4, 4, 3), np.uint8)])
    assert mask.tolist() == [[True] * 4] + [[True, False, False, False]] * 3
    assert mask_from_layers([np.zeros((4, 4, 4), np.uint8)]) is None and mask_from_layers([]) is None


def test_settings_sample_py_refuses_are_errors_and_stderr_stays_the_processs(monkeypatch):
    """A review: the page's usage errors were caught by swapping sys.stderr, for every thread of the server, while
    sample.py parsed: other threads' warnings went into one user's message, and two overlapping swaps could leave it
    swapped. The parser raises instead."""
    import sys

    from scripts.app_jobs import parse_sample_args

    seen = []
    monkeypatch.setattr(sample, "official_seed_problems", lambda args: seen.append(sys.stderr) or ["a problem"])
    with pytest.raises(ValueError, match="^a problem$"):
        parse_sample_args(["--ckpt", "x.pth"])
    assert seen == [sys.stderr]
    with pytest.raises(ValueError, match="argument --bs: invalid int value: 'x'"):
        parse_sample_args(["--ckpt", "x.pth", "--bs", "x"])


def test_sending_an_image_the_workspace_cleared_says_so(tmp_path):
    """A review: the workspace keeps the newest 16 requests' folders; sending an older gallery image failed with
    Gradio's bare "Error"."""
    import gradio as gr

    from scripts.app_ui import send_selected

    kept = tmp_path / "kept.png"
    kept.write_bytes(b"png")
    assert send_selected([str(kept), str(tmp_path / "gone.png")], 0)[0] == str(kept)
    with pytest.raises(gr.Error, match="cleared from the workspace"):
        send_selected([str(kept), str(tmp_path / "gone.png")], 1)
    assert send_selected([], None)[0] is None


def test_the_pages_settings_become_the_sample_py_flags_of_the_same_values():
    """Each of the page's settings reaches sample.py as the flag of its name with its value (checked by parsing the
    command line sample.py gets): a dropped --top_p, a cfg rounded to an integer, a top_k capped or --more_smooth
    always off gave the page and its offered command the same (wrong) pixels, which passed the suite."""
    from types import SimpleNamespace

    from scripts.app_jobs import Knobs, Session, parse_sample_args

    session = Session(SimpleNamespace(num_classes=10), ["--ckpt", "x.pth"], torch.device("cpu"), NAMES, None)
    for smooth in (True, False):
        knobs = Knobs(classes=["3: three", "7"], num_per_class=2, cfg=2.75, top_k=321, top_p=0.85, seed=11,
                      more_smooth=smooth, bs=5)
        args = parse_sample_args(session.argv(knobs, "out.png"))
        got = {k: getattr(args, k) for k in ("classes", "num_per_class", "cfg", "top_k", "top_p", "seed",
                                             "more_smooth", "bs")}
        assert got == dict(classes=[3, 7], num_per_class=2, cfg=2.75, top_k=321, top_p=0.85, seed=11,
                           more_smooth=smooth, bs=5)


def test_counts_and_seeds_must_be_whole_numbers(client):
    """A review: an API call's num_per_class=1.5 ran as 1, and a seed of 1.5 as 2 (Gradio's precision=0 rounded it
    before the check). A slider's 4.0 and a seed of 2**64 - 1, exactly, pass."""
    from gradio_client.exceptions import AppError

    from scripts.app_ui import knobs_of

    for i, field in ((5, "seed=1.5"), (3, "top-k=1.5"), (1, "images per class=1.5")):
        with pytest.raises(AppError, match=re.escape(f"{field}: expected a whole number")):
            client.predict(*SAMPLE[:i], 1.5, *SAMPLE[i + 1:], api_name="/sample")

    knobs = knobs_of(["1"], 4.0, 1.5, "900", 0.9, str(2**64 - 1), False, 2.0)
    assert (knobs.num_per_class, knobs.top_k, knobs.seed, knobs.bs) == (4, 900, 2**64 - 1, 2)
    for args, field in (((1.5, 900, 0), "images per class=1.5"), ((2, 9.5, 0), "top-k=9.5"),
                        ((2, 900, "abc"), "seed='abc'"), ((2, 900, float("inf")), "seed=inf")):
        num, top_k, seed = args
        with pytest.raises(ValueError, match=re.escape(f"{field}: expected a whole number")):
            knobs_of(["1"], num, 1.5, top_k, 0.9, seed, False)


def test_random_classes_come_from_the_seed_and_cover_every_class_and_unknown_ones_are_refused():
    """"random" draws a class from the request's seed (the same seed, the same classes; another seed, others),
    any of the model's classes, the last included; an id past the last class is refused before any work; names of
    another length than the classes are not shown. A draw from seed 0 whatever the seed, or one that never drew the
    last class, passed the suite."""
    from types import SimpleNamespace

    from scripts.app_jobs import Session

    session = Session(SimpleNamespace(num_classes=10), ["--ckpt", "x.pth"], torch.device("cpu"), NAMES, None)
    draws = [session.class_ids(["random"] * 16, seed) for seed in range(8)]
    assert draws[3] == session.class_ids(["random"] * 16, 3) and len({tuple(d) for d in draws}) == 8
    assert set(sum(draws, [])) == set(range(10))
    assert session.class_ids(["9: nine", "random", "0"], 4)[::2] == [9, 0]
    # a review: an Arabic-Indic "٣" was class 3, "3: nine" ran class 3, and "²" got int()'s raw message
    for picked, message in ((["10"], "unknown class '10'"), (["-1"], "unknown class '-1'"), (["x"], "unknown class"),
                            ([], "pick at least one class"), (["\u0663"], "unknown class"),
                            (["3: nine"], "unknown class '3: nine'"), (["\u00b2"], "unknown class")):
        with pytest.raises(ValueError, match=message):
            session.class_ids(picked, 0)
    assert session.class_label(3) == "3: three"
    assert Session(SimpleNamespace(num_classes=10), [], torch.device("cpu"), NAMES[:9], None).class_label(3) == "3"


def test_the_workspace_keeps_the_newest_requests_only():
    """Workspace(keep=2) holds the folders of the newest two requests (and the uploads folder): keeping one more
    than asked passed the suite."""
    from scripts.app_jobs import Workspace

    workspace = Workspace(keep=2)
    try:
        made = [workspace.new_folder() for _ in range(4)]
        assert sorted(p.name for p in workspace.root.iterdir()) == ["000003", "000004", "uploads"]
        assert made[-1].is_dir() and not made[0].exists()
    finally:
        workspace.close()


def test_the_apps_own_flags_reach_sample_py_and_a_1000_class_model_gets_imagenets_names(tmp_path):
    """The app's --bf16, --fp16 and --allow_other_tokenizer are sample.py flags of the command it offers; a
    1,000-class checkpoint without recorded names shows ImageNet's. A dropped --bf16 (the page sampling in fp32
    where the command says bf16... or the reverse) and ids for ImageNet passed the suite."""
    from types import SimpleNamespace

    from scripts.app import base_argv, build_parser, class_names

    for flag in ("--bf16", "--fp16", "--allow_other_tokenizer"):
        assert flag in base_argv(build_parser().parse_args([flag]), "hub/id")
    # a review: a model in the Hugging Face cache's layout (snapshots/<rev>/model.safetensors, a link into blobs/) was
    # offered by the link's target, blobs/<hash>, which sample.py then read as a .pth
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "h123").write_bytes(b"weights")
    (tmp_path / "snapshots" / "rev").mkdir(parents=True)
    link = tmp_path / "snapshots" / "rev" / "model.safetensors"
    link.symlink_to(tmp_path / "blobs" / "h123")
    assert base_argv(build_parser().parse_args(["--vae_ckpt", str(link)]), str(link)) == [
        "--ckpt", str(link), "--vae_ckpt", str(link)]
    names = class_names(tmp_path / "absent.pth", SimpleNamespace(num_classes=1000))
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert class_names(tmp_path / "absent.pth", SimpleNamespace(num_classes=10)) is None


def test_a_seed_past_32_bits_reaches_sample_py_whole():
    """The page takes seeds up to 2**64 - 1 (`whole`), and sample.py's --seed as well: the command line carries it
    digit for digit. A seed reduced on its way (say modulo 2**32) gave the page and its command the same pixels, of
    another seed than the one shown, and passed the suite, whose seeds were all small."""
    from types import SimpleNamespace

    from scripts.app_jobs import Knobs, Session, parse_sample_args

    session = Session(SimpleNamespace(num_classes=10), ["--ckpt", "x.pth"], torch.device("cpu"), NAMES, None)
    for seed in (2**32, 2**64 - 1):
        assert parse_sample_args(session.argv(Knobs(classes=["3"], seed=seed), "out.png")).seed == seed
