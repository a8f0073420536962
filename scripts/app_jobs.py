"""What the web app (scripts/app.py) runs, without Gradio: the page's values become a sample.py command line, which
sample.py parses and samples through its own functions (`picture_batches`, `edit_rows`), so the command offered
for download reproduces the page's pixels. Every request writes into a fresh folder of a private temporary
workspace (the oldest are removed), which also holds Gradio's copies of the uploads and results (`uploads`);
nothing from the page names a file: uploads are copied in under fixed names. A request is bounded (`MAX_ROWS`
classes, `MAX_PIXELS` per uploaded image) and checked before any work.
"""
import argparse
import contextlib
import re
import shlex
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sample
from models.mvar import MVAR
from utils.sample_io import open_image, read_edit_image, save_folder, save_grid, to_uint8_BHW3

RANDOM = "random"  # the class picker's entry for one class drawn from the seed (the command names the class drawn)
PAPER = sample.PRESETS["fid"]  # the page's "paper settings" button: sample.py --preset fid
MAX_ROWS = 16  # classes (grid rows) per request: with 16 images per class at most, a request's work stays bounded
MAX_PIXELS = 50_000_000  # pixels of an uploaded image (a 50 MP photo); PIL's own guard lets 179 MP through
MAX_REMEMBERED = 64  # uploads whose full size Session remembers from their previews
BUSY_WAIT_S = 600.0  # how long a request waits for a cancelled one that still holds the model (`generating`)


@dataclass
class Knobs:
    """The page's sampling settings (sample.py's flags of the same names)."""

    classes: Sequence[str] = (RANDOM,)
    num_per_class: int = 4
    cfg: float = 4.0
    top_k: int = 900
    top_p: float = 0.95
    seed: int = 0
    more_smooth: bool = False
    bs: int = 16


@dataclass
class Result:
    """One request's files: the images (paths), the PNG grid, the reproducing command and its text."""

    images: list[Path]
    grid: Path
    command: Path
    files: list[Path] = field(default_factory=list)

    @property
    def command_text(self) -> str:
        return self.command.read_text().strip()


class Workspace:
    """A private temporary folder (readable by this user only) with one numbered sub-folder per request, of which
    only the newest `keep` are kept, and `uploads`, where Gradio keeps its copies of uploads and results
    (scripts/app.py points GRADIO_TEMP_DIR there; Gradio's default, /tmp/gradio, is readable by every local user).
    It is deleted by `close`, else when the object is collected or the interpreter exits."""

    def __init__(self, keep: int = 16):
        self.root, self.keep, self.count = Path(tempfile.mkdtemp(prefix="mvar-app-")), keep, 0
        self.uploads = self.root / "uploads"
        self.uploads.mkdir()
        self.lock = threading.Lock()
        self.close = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def new_folder(self) -> Path:
        with self.lock:
            self.count += 1
            folder = self.root / f"{self.count:06d}"
            folder.mkdir()
            for old in sorted(p for p in self.root.iterdir() if p.name.isdigit())[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return folder


class Session:
    """The loaded model and the fixed part of its sample.py command line (the app's own flags); generates one
    request at a time."""

    def __init__(self, mvar: MVAR, base_argv: Sequence[str], device: torch.device, class_names: list[str] | None,
                 workspace: Workspace):
        self.mvar, self.base_argv, self.device, self.workspace = mvar, list(base_argv), device, workspace
        self.names = class_names if class_names and len(class_names) == mvar.num_classes else None
        self.lock = threading.Lock()  # one generation at a time per process, whatever calls it (see `generating`)
        self.full_sizes: dict[tuple[str, int, int], tuple[int, int]] = {}  # `full_size`'s, of the newest previews

    def class_choices(self) -> list[str]:
        """The class picker's entries: "random", then "id: name" (or the id where no names are recorded)."""
        return [RANDOM] + [self.class_label(c) for c in range(self.mvar.num_classes)]

    def class_label(self, c: int) -> str:
        return f"{c}: {self.names[c]}" if self.names else str(c)

    def class_ids(self, picked: Sequence[str], seed: int) -> list[int]:
        """Picker entries -> class ids; each "random" is a class drawn from the seed."""
        if not picked:
            raise ValueError("pick at least one class (or \"random\")")
        if len(picked) > MAX_ROWS:
            raise ValueError(f"{len(picked)} classes: at most {MAX_ROWS} per request (one grid row each)")
        rng = np.random.default_rng(seed)
        ids = []
        for entry in picked:
            if entry == RANDOM:
                ids.append(int(rng.integers(self.mvar.num_classes)))
                continue
            head, colon, _ = str(entry).partition(":")
            known = re.fullmatch(r"\d+", head.strip(), re.ASCII) and int(head) < self.mvar.num_classes
            if not known or (colon and str(entry) != self.class_label(int(head))):  # an id, or the list's entry
                raise ValueError(f"unknown class {entry!r}: pick one of the list")
            ids.append(int(head))
        return ids

    def argv(self, knobs: Knobs, out: Path, *extra: str) -> list[str]:
        """The sample.py command line (without `python sample.py`) for these settings."""
        return [*self.base_argv, "--classes", *map(str, self.class_ids(knobs.classes, knobs.seed)),
                "--num_per_class", str(knobs.num_per_class), "--bs", str(knobs.bs), "--cfg", f"{knobs.cfg:g}",
                "--top_k", str(knobs.top_k), "--top_p", f"{knobs.top_p:g}", "--seed", str(knobs.seed),
                "--more_smooth" if knobs.more_smooth else "--no-more_smooth", *extra, "--out", str(out)]

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """sample.py's flags as its main() ends up with them here (--bf16 falls back to fp32 where the CPU has no bf16
        instructions), so the page and the command it offers draw the same pixels."""
        args = parse_sample_args(argv)
        sample.fall_back_to_fp32_where_slow(args, self.device)
        return args

    def sample(self, knobs: Knobs, on_scale: Callable[[int, int], None] | None = None) -> Iterator[Result]:
        """Sample as `python sample.py ARGV` would: a Result after each batch (its grid and command exist from the
        last one on). on_scale(scales done, scales in all) is called after every scale."""
        with self.generating():  # before its folder: a refused request must not push a running one's out
            folder = self.workspace.new_folder()
            argv = self.argv(knobs, folder / "samples.png")
            args, command = self.parse(argv), write_command(argv, folder)
            labels = sample.picture_labels(args)[0]
            total = -(-len(labels) // args.bs) * len(self.mvar.patch_nums)
            generate, images, batches = sample.make_generate(self.mvar, args, self.device), [], []
            with scale_calls(self.mvar, on_scale, total):
                for imgs_BHW3, names in sample.picture_batches(args, generate):
                    save_folder(imgs_BHW3, folder / "images", names)
                    images += [folder / "images" / f"{n}.png" for n in names]
                    batches.append(imgs_BHW3)
                    yield Result(images=list(images), grid=folder / "samples.png", command=command)
        grid = save_grid(np.concatenate(batches), folder / "samples.png", ncol=args.num_per_class)
        yield Result(images=images, grid=grid, command=command, files=[grid, command])

    def edit(self, image: Path, knobs: Knobs, drawn_hw: np.ndarray | None = None, box: str | None = None,
             on_scale: Callable[[int, int], None] | None = None) -> tuple[Result, np.ndarray, np.ndarray]:
        """Edit as `python sample.py --edit IMAGE --mask/--box ...` would -> (Result: the edits, the before | mask |
        edits grid, the command; the image as the model sees it (H, W, 3) uint8; the mask as the model sees it).
        `drawn_hw`: a bool mask over the image at any size (the preview's), saved at the image's full size as
        mask.png; `box`: "x0,y0,x1,y1" in the image's pixels (wins over the drawing)."""
        check_upload(Path(image))
        with self.generating():  # before its folder, as in `sample`
            folder = self.workspace.new_folder()
            source = folder / f"image{Path(image).suffix.lower() or '.png'}"  # the output is edit.png
            shutil.copyfile(image, source)
            mask_file = folder / "mask.png"
            if box:
                region, inputs = [f"--box={box.replace(' ', '')}"], [source]  # "=": a box may start with "-"
            elif drawn_hw is not None:
                H, W = self.full_size(Path(image))
                h, w = drawn_hw.shape
                if not drawn_at_some_scale(h, w, H, W):  # strokes drawn on the previous upload, still on screen
                    raise ValueError(f"the drawing ({w}x{h}) is not of this image's shape ({W}x{H}): draw again "
                                     "over it")
                Image.fromarray(drawn_hw.astype(np.uint8) * 255).resize((W, H), Image.NEAREST).save(mask_file)
                region, inputs = ["--mask", str(mask_file)], [source, mask_file]
            else:
                raise ValueError("mark the region to regenerate: draw on the image or give a box x0,y0,x1,y1")
            argv = self.argv(knobs, folder / "edit.png", "--edit", str(source), *region)
            args, command = self.parse(argv), write_command(argv, folder)
            batches = len(args.classes) * -(-args.num_per_class // args.bs)  # sample.edit_rows: --bs edits at a time
            with scale_calls(self.mvar, on_scale, batches * len(self.mvar.patch_nums)):
                rows = list(sample.edit_rows(args, self.mvar))
        grid = save_grid(to_uint8_BHW3(torch.cat(rows)), folder / "edit.png", ncol=2 + args.num_per_class)
        edits = to_uint8_BHW3(torch.cat([row[2:] for row in rows]))
        names = sample.picture_labels(args)[1]  # a class given twice numbers its second row on from its first
        save_folder(edits, folder / "images", names)
        before, mask = to_uint8_BHW3(rows[0][:2])
        return Result(images=[folder / "images" / f"{n}.png" for n in names], grid=grid, command=command,
                      files=[grid, command, *inputs]), before, mask

    def preview(self, image: Path) -> tuple[np.ndarray, tuple[int, int]]:
        """The image to draw on, as sample.py reads it (reduced, at least twice the model's size) -> (uint8
        (h, w, 3), the full size (H, W) that masks and boxes refer to); ValueError when it cannot be read."""
        check_upload(Path(image))
        img_3hw, full_HW, _ = read_edit_image(Path(image), self.mvar.image_size)
        self.full_sizes[file_key(image)] = full_HW
        while len(self.full_sizes) > MAX_REMEMBERED:
            del self.full_sizes[next(iter(self.full_sizes))]
        return to_uint8_BHW3(img_3hw[None])[0], full_HW

    def full_size(self, image: Path) -> tuple[int, int]:
        """(H, W) of an upload as displayed (EXIF orientation applied): its preview's, else read (a PNG's EXIF is
        read only by decoding it, so without the preview an edit with a drawing decodes the upload twice)."""
        return self.full_sizes.get(file_key(image)) or self.preview(image)[1]

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Hold the model for one request. Gradio's queue runs one generation at a time, but an edit it cancelled (or
        whose page closed) still finishes its work in its thread (a cancelled sampling stops at its next batch): the
        next request waits for it, up to BUSY_WAIT_S, holding the queue's one slot, so the requests behind it stay
        queued (refusing at once failed every queued request, one after the other); then a ValueError."""
        if not self.lock.acquire(timeout=BUSY_WAIT_S):
            raise ValueError(f"the previous request (perhaps a cancelled one) still runs after {BUSY_WAIT_S:g} s of "
                             "waiting: try again later")
        try:
            yield
        finally:
            self.lock.release()


def file_key(path: Path) -> tuple[str, int, int]:
    """A file's identity for a cache: its absolute path, size and modification time."""
    stat = Path(path).stat()
    return str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns


def drawn_at_some_scale(h: int, w: int, H: int, W: int) -> bool:
    """Whether an h x w drawing can be of the H x W image: some scale s puts both H*s and W*s within less than a
    pixel of h and w (the preview rounds each side; a rounding of the height, times W/H, could move the width by
    more than a pixel, and previews of 4000x3001 were refused)."""
    return (h - 1) * W < (w + 1) * H and (w - 1) * H < (h + 1) * W


def check_upload(image: Path) -> None:
    """Refuse, before any decoding, an upload that is no image of sample_io.EDIT_FORMATS or has more than MAX_PIXELS
    pixels (ValueError naming its size)."""
    with open_image(image, "the upload") as im:
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"the upload is {im.width}x{im.height} px ({im.width * im.height / 1e6:.0f} MP): at most "
                             f"{MAX_PIXELS / 1e6:.0f} MP here; reduce it first")


class RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are ValueError (argparse's message), not a message on stderr and an exit:
    a server's other threads keep their stderr."""

    def error(self, message: str):
        raise ValueError(message)


def parse_sample_args(argv: Sequence[str]) -> argparse.Namespace:
    """sample.parse_args, with its usage errors as ValueError (the message argparse would print)."""
    return sample.parse_args(argv, parser_class=RaisingParser)


def write_command(argv: Sequence[str], folder: Path) -> Path:
    """command.sh: `python /path/to/sample.py ARGV`, with the request folder's files named relative to it (they are
    downloaded beside it) and its output renamed NAME-rerun.png, so that a rerun keeps the downloaded result."""
    prefix = f"{folder}/"
    words = [a.removeprefix(prefix) for a in argv]
    out = words.index("--out") + 1
    words[out] = str(Path(words[out]).with_stem(f"{Path(words[out]).stem}-rerun"))
    path = folder / "command.sh"
    path.write_text("# run from the folder of the downloaded files, in this project's environment\n"
                    f"python {shlex.quote(str(Path(sample.__file__).resolve()))} {shlex.join(words)}\n")
    return path


@contextlib.contextmanager
def scale_calls(mvar: MVAR, on_scale: Callable[[int, int], None] | None, total: int) -> Iterator[None]:
    """Call on_scale(done, total) after every scale the model samples (its output head runs once per scale)."""
    if on_scale is None:
        yield
        return
    done = 0

    def hook(*_) -> None:
        nonlocal done
        done += 1
        on_scale(done, total)

    handle = mvar.head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def mask_from_layers(layers: Sequence[np.ndarray]) -> np.ndarray | None:
    """The drawn strokes (RGBA layers over the preview) -> a bool mask at the layers' size, or None when nothing was
    drawn."""
    drawn = [np.asarray(layer)[..., 3] > 0 for layer in layers
             if np.asarray(layer).ndim == 3 and np.asarray(layer).shape[-1] == 4]
    return np.logical_or.reduce(drawn) if drawn and any(d.any() for d in drawn) else None
