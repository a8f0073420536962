"""The web app's page (Gradio Blocks): a sampling tab and an editing tab over one `app_jobs.Session`.

Both tabs run in one queue with one worker (`concurrency_id="generate"`), so one generation runs at a time and the
others see their place. The page's errors (a bad upload, an empty mask, settings sample.py refuses) are messages in
the page; the server keeps serving. For scripts the two endpoints are `/sample` and `/edit` (gradio_client):

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860")
    images, status, command, files = client.predict(["3", "random"], 4, 4.0, 900, 0.95, 0, False, 16,
                                                    api_name="/sample")
    before, mask, edits, status, command, files = client.predict(handle_file("digit.png"), None, "0,0,8,4",
                                                                 ["7"], 2, 4.0, 900, 0.95, 0, False, api_name="/edit")

(`/sample`: classes, images per class, cfg, top-k, top-p, seed, smoothing, batch size; `/edit`: image, drawn
layers (None with a box), box "x0,y0,x1,y1", then the same settings without the batch size.)
"""
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import torch
from gradio.components.image_editor import EditorData
from gradio.data_classes import FileData

from scripts.app_jobs import MAX_ROWS, PAPER, RANDOM, Knobs, Result, Session, mask_from_layers
from utils.sample_io import NonFiniteValueError, edit_preview_max_pixels, open_image

PROGRESS = gr.Progress()  # Gradio gives each call its own tracker in place of this default
# small model images (8-64 px) fill their boxes, their pixels kept sharp
CSS = "#before img, #region img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
PAGE_ERRORS = (ValueError, FileNotFoundError, NonFiniteValueError)  # what a request can get wrong: shown, not raised


@contextlib.contextmanager
def page_errors(workspace: Path) -> Iterator[None]:
    """A request's errors as messages in the page (the server keeps serving): PAGE_ERRORS, the files of the private
    `workspace` named by their names only, and running out of memory, whose cached blocks go back to the GPU's other
    users."""
    try:
        yield
    except PAGE_ERRORS as e:
        raise gr.Error(re.sub(re.escape(str(workspace)) + r"/(?:[^\s:]*/)?", "", str(e)), print_exception=False) from e
    except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError, under its name of every supported torch
        torch.cuda.empty_cache()
        raise gr.Error("out of memory: lower the batch size, the images per class or the classes",
                       print_exception=False) from e


def knob_inputs(session: Session, num_label: str, num_default: int, tab: str) -> list[gr.components.Component]:
    """Class picker, count, cfg, top-k, top-p, seed, smoothing, and a button setting the paper's values (element
    ids `{tab}-classes`, `{tab}-seed`)."""
    classes = gr.Dropdown(session.class_choices(), value=[RANDOM], multiselect=True, label="classes (one row each)",
                          allow_custom_value=True,  # scripts may pass bare ids (checked by Session.class_ids)
                          max_choices=MAX_ROWS, elem_id=f"{tab}-classes")
    num = gr.Slider(1, 16, value=num_default, step=1, label=num_label)
    cfg = gr.Slider(0, 10, value=Knobs.cfg, step=0.1, label="cfg (classifier-free guidance)")
    # precision=None: the value as sent, for knobs_of's whole-number check (precision=0 rounded 1.5 to 2)
    top_k = gr.Number(Knobs.top_k, precision=None, minimum=0, label="top-k (0: all tokens)")
    top_p = gr.Slider(0.01, 1, value=Knobs.top_p, step=0.01, label="top-p (1: no nucleus filter)")
    seed = gr.Number(Knobs.seed, precision=None, minimum=0, label="seed", elem_id=f"{tab}-seed")
    smooth = gr.Checkbox(Knobs.more_smooth, label="smoothing (--more_smooth: smoother pictures, not for FID)")
    paper = gr.Button("the paper's settings (cfg 1.5, top-k 900, top-p 0.96, no smoothing)", size="sm")
    paper.click(lambda: (PAPER["cfg"], PAPER["top_k"], PAPER["top_p"], PAPER["more_smooth"]),
                outputs=[cfg, top_k, top_p, smooth], api_visibility="undocumented", queue=False)
    return [classes, num, cfg, top_k, top_p, seed, smooth]


def whole(value, name: str) -> int:
    """A count or seed from the page or an API call: an int, a float without a fraction (a slider's 4.0) or a string
    of digits, exactly (a seed up to 2**64 - 1), else ValueError naming the field (1.5 was taken as 1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value, re.ASCII):
        return int(value)
    raise ValueError(f"{name}={value!r}: expected a whole number")


def knobs_of(classes, num, cfg, top_k, top_p, seed, smooth, bs: int = Knobs.bs) -> Knobs:
    """The page's values (or an API call's: one class may come as a bare string or number) -> Knobs."""
    classes = [classes] if isinstance(classes, (str, int)) else list(classes or [])
    return Knobs(classes=classes, num_per_class=whole(num, "images per class"), cfg=float(cfg),
                 top_k=whole(top_k or 0, "top-k"), top_p=float(top_p), seed=whole(seed or 0, "seed"),
                 more_smooth=bool(smooth), bs=whole(bs, "batch size"))


def gallery(session: Session, result: Result) -> list[tuple[str, str]]:
    """(image path, caption: its class) pairs; the files are named class{id:04d}_{k:03d}.png."""
    return [(str(p), session.class_label(int(p.stem.removeprefix("class").split("_")[0]))) for p in result.images]


def send_selected(paths: list[str], i: int | None):
    """"edit the selected image": its file into the edit tab's upload, and that tab shown. The workspace keeps the
    newest requests' folders only: an older image is gone, said on the page."""
    if not paths:
        return None, gr.Tabs(selected="edit")
    path = paths[min(i or 0, len(paths) - 1)]
    if not Path(path).is_file():
        raise gr.Error("that image was cleared from the workspace (it keeps the newest requests only): generate "
                       "again", print_exception=False)
    return path, gr.Tabs(selected="edit")


def selected_index(evt: gr.SelectData) -> int:
    return evt.index


def brush(width: int | None) -> gr.Brush:
    """A red brush 1/16 of the preview's width wide (Gradio's automatic size covers a small model's whole image)."""
    return gr.Brush(colors=["#ff0000"], color_mode="fixed", default_size=max(1, width // 16) if width else "auto")


def progress_bar(progress: gr.Progress):
    return lambda done, total: progress((done, total), desc="scales", unit="scales")


def checked_drawing(drawing: dict | None, max_pixels: int) -> EditorData | None:
    """The editor's raw value with its layers checked by their headers before anything decodes them (Gradio's own
    preprocessing decodes every image it is sent, of any number, up to PIL's 179 MP guard: 3 layers of 81 MP took
    2 GB): one layer at most (the page draws on one), each of at most `max_pixels`, else a page error; the
    background and composite (the preview sent back) dropped."""
    if not drawing:
        return None
    value = EditorData.model_validate(drawing)
    if value.id is not None:  # Gradio's blob upload, which this Gradio's page does not use: its images are not here
        raise gr.Error("the drawing came as blobs, which this app does not read: draw again or use a box",
                       print_exception=False)
    if len(value.layers) > 1:
        raise gr.Error(f"{len(value.layers)} drawing layers: one only", print_exception=False)
    for layer in value.layers:
        try:
            with open_image(Path(layer.path), "drawing") as im:
                width, height = im.size
        except ValueError as e:
            raise gr.Error("the drawing is not an image", print_exception=False) from e
        if width * height > max_pixels:
            raise gr.Error(f"the drawing is {width}x{height} px: at most {max_pixels:,} pixels, the largest preview "
                           "of this model", print_exception=False)
    return value.model_copy(update={"background": None, "composite": None})


def build_ui(session: Session, title: str, queue_size: int) -> gr.Blocks:
    """The page over `session`, its queue bounded at `queue_size` waiting requests."""

    def on_sample(classes, num, cfg, top_k, top_p, seed, smooth, bs, progress=PROGRESS):
        with page_errors(session.workspace.root):
            knobs = knobs_of(classes, num, cfg, top_k, top_p, seed, smooth, bs)
            for k, r in enumerate(session.sample(knobs, on_scale=progress_bar(progress))):
                status = f"{len(r.images)} images" + (" (done)" if r.files else ", more coming")
                shown_paths = [str(p) for p in r.images]  # "edit the selected image" reads these, also mid-run
                yield gallery(session, r), status, r.command_text, [str(p) for p in r.files] or None, shown_paths, \
                    0 if k == 0 else gr.skip()  # a new run's first image is selected until one is clicked

    def on_preview(path):
        if not path:
            return None, ""
        with page_errors(session.workspace.root):
            img, (H, W) = session.preview(Path(path))
        value = {"background": img, "layers": [], "composite": img}
        return gr.ImageEditor(value=value, brush=brush(img.shape[1])), \
            f"{W}x{H} px (a box is in these pixels); draw over what to regenerate"

    def on_edit(image, drawing, box_text, *knob_values, progress=PROGRESS):
        # the event skips Gradio's preprocessing (below), done here: the drawing's images only after their headers
        # were checked, and of them only the layers (the background and composite are the preview, unused)
        image = upload.preprocess(FileData.model_validate(image) if image else None)
        if not image:  # before the drawing is read
            raise gr.Error("upload an image first (or send a generated one over)", print_exception=False)
        box_text = box.preprocess(box_text)
        drawing = editor.preprocess(checked_drawing(drawing, edit_preview_max_pixels(session.mvar.image_size)))
        knob_values = [component.preprocess(value) for component, value in zip(edit_knobs, knob_values, strict=True)]
        with page_errors(session.workspace.root):
            knobs = knobs_of(*knob_values)
            drawn = mask_from_layers((drawing or {}).get("layers") or [])
            r, before, mask_img = session.edit(Path(image), knobs, drawn_hw=drawn,
                                               box=(box_text or "").strip() or None, on_scale=progress_bar(progress))
        return (before, mask_img, gallery(session, r), f"{len(r.images)} edits", r.command_text,
                [str(p) for p in r.files])

    with gr.Blocks(title=title, delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"## {title}")
        shown, selected = gr.State([]), gr.State(0)
        with gr.Tabs() as tabs:
            with gr.Tab("Sample", id="sample"):
                with gr.Row():
                    with gr.Column(scale=1):
                        knobs = knob_inputs(session, "images per class", 4, "sample")
                        bs = gr.Slider(1, 16, value=Knobs.bs, step=1, label="batch size (images shown per batch)")
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column(scale=2):
                        images = gr.Gallery(format="png", label="images", columns=4, elem_id="images")
                        status = gr.Markdown(elem_id="status")
                        command = gr.Code(label="the sample.py command that reproduces them", language="shell",
                                          elem_id="command")
                        files = gr.File(label="downloads: the PNG grid and the command", file_count="multiple")
                        send = gr.Button("edit the selected image", elem_id="send")
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.File(label="image to edit (PNG, JPEG, ...)", elem_id="upload")
                        editor = gr.ImageEditor(type="numpy", image_mode="RGBA", sources=[], transforms=[],
                                                layers=False, label="draw over the region to regenerate",
                                                brush=brush(None), elem_id="editor")
                        size = gr.Markdown(elem_id="size")
                        box = gr.Textbox(label="or a box x0,y0,x1,y1 (wins over the drawing)", elem_id="box")
                        edit_knobs = knob_inputs(session, "edits per class", 2, "edit")
                        run_edit = gr.Button("Edit", variant="primary", elem_id="run-edit")
                    with gr.Column(scale=2):
                        with gr.Row():
                            before = gr.Image(label="before (as the model sees it)", format="png", elem_id="before",
                                              height=260)
                            mask = gr.Image(label="regenerated region", format="png", elem_id="region", height=260)
                        after = gr.Gallery(format="png", label="after", columns=4, elem_id="after")
                        edit_status = gr.Markdown(elem_id="edit-status")
                        edit_command = gr.Code(label="the sample.py --edit command", language="shell",
                                               elem_id="edit-command")
                        edit_files = gr.File(label="downloads: grid, command, image, mask", file_count="multiple",
                                             elem_id="edit-files")
        run.click(on_sample, [*knobs, bs], [images, status, command, files, shown, selected], api_name="sample",
                  concurrency_limit=1, concurrency_id="generate")
        # the cheap events skip the queue: --queue_size bounds the waiting generations, not a click's answer
        images.select(selected_index, None, selected, api_visibility="undocumented", queue=False)
        send.click(send_selected, [shown, selected], [upload, tabs], api_visibility="undocumented", queue=False)
        # the preview decodes the upload (up to 50 MP): one at a time, beside the generations
        upload.change(on_preview, upload, [editor, size], api_visibility="undocumented", concurrency_limit=1,
                      concurrency_id="preview")
        run_edit.click(on_edit, [upload, editor, box, *edit_knobs],
                       [before, mask, after, edit_status, edit_command, edit_files], api_name="edit",
                       concurrency_limit=1, concurrency_id="generate", preprocess=False)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo
