"""A web page for sampling and editing with an M-VAR checkpoint (Gradio, `pip install -e .[app]`):

    python -m scripts.app --ckpt FOLDER|HUB_ID|FILE.pth      # then open http://127.0.0.1:7860
    make app                                                  # the model `make demo` trained

It samples and edits through sample.py's own functions and offers the sample.py command that reproduces each
result. Bound to 127.0.0.1 unless --host says otherwise; no share link unless --share; offline (no analytics).
The checkpoint is chosen here only; the page uploads images (at most --max_upload_mb) and never names a file.
"""
import argparse
import logging
import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch

from models.loading import load_checkpoint, recorded_class_names
from models.mvar import MVAR
from scripts.app_jobs import Session, Workspace, parse_sample_args
from utils.flags import add_backend_flags
from utils.run.preemption import sigterm_raises
from utils.run.checkpoint import LAST

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: before Gradio is first imported
USER_GRADIO_TEMP_DIR = os.environ.get("GRADIO_TEMP_DIR")  # where Gradio keeps uploads and results, if set by the user
DEMO_CKPT = Path("local_output/demo/mvar") / LAST  # what `make demo` trains
NO_MODEL = (f"no --ckpt given and no {DEMO_CKPT} (the model `make demo` trains, a few minutes on a CPU): run "
            "`make demo`, or pass --ckpt FOLDER|HUB_ID|FILE.pth")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"as sample.py's --ckpt (default: {DEMO_CKPT})")
    p.add_argument("--vae_ckpt", default=None, help="as sample.py's --vae_ckpt")
    p.add_argument("--allow_other_tokenizer", action="store_true", help="as sample.py's")
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--fp16", action="store_true", help="sample in float16 (autocast)")
    amp.add_argument("--bf16", action="store_true", help="sample in bfloat16 (autocast; fp32 where slow)")
    add_backend_flags(p)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (0: the first free one of 7860-7959, Gradio's "
                   "search)")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link")
    p.add_argument("--queue_size", type=int, default=8, help="requests that may wait for the one running")
    p.add_argument("--max_upload_mb", type=float, default=20, help="largest upload accepted (MB)")
    return p


def base_argv(args: argparse.Namespace, ckpt: str) -> list[str]:
    """The app's own flags as sample.py flags (a local checkpoint file or folder by its absolute path, its symbolic
    links kept: the Hugging Face cache's snapshots/<rev>/model.safetensors links to blobs/<hash>, a name without its
    folder's config.json)."""
    argv = ["--ckpt", os.path.abspath(ckpt) if Path(ckpt).exists() else ckpt]  # else a Hub id, or an error
    for flag in ("vae_ckpt", "attn_backend", "mamba_backend", "device"):
        value = getattr(args, flag)
        if value is not None and value != "auto":
            argv += [f"--{flag}", os.path.abspath(value) if flag == "vae_ckpt" else value]
    return argv + [f"--{f}" for f in ("allow_other_tokenizer", "fp16", "bf16") if getattr(args, f)]


def class_names(ckpt_path: Path, mvar: MVAR) -> list[str] | None:
    """The class names a training run recorded in its checkpoint (train.py's data.classes) or its Hub folder's
    weights (MVARHF.class_names), else ImageNet's for a 1,000-class model, else None (the page shows ids)."""
    if getattr(mvar, "class_names", None):
        return list(mvar.class_names)
    if ckpt_path.is_file():  # unverified: sample.py's load just checked it
        if names := recorded_class_names(load_checkpoint(ckpt_path, verify=False)):
            return names
    if mvar.num_classes == 1000:
        from utils.data.embedded import imagenet_class_names
        return imagenet_class_names()
    return None


def open_session(args: argparse.Namespace) -> Session:
    """Load the model as sample.py does, with its messages (SystemExit) before any server starts."""
    import sample

    if args.ckpt is None and not DEMO_CKPT.is_file():
        raise SystemExit(NO_MODEL)
    argv = base_argv(args, args.ckpt or str(DEMO_CKPT))
    try:
        sargs = parse_sample_args(argv)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    device = torch.device(sargs.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mvar, ckpt_path, _ = sample.open_model(sargs, device)
    return Session(mvar, argv, device, class_names(ckpt_path, mvar), Workspace())


def host_problem(host: str) -> str | None:
    """Why a server cannot listen on `host` (None: it can), tried on a free port before the model loads: a name that
    does not resolve or an address of another machine (Gradio's error would blame the port)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address[0], 0, *address[2:]))
    except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError
        return (f"--host={host}: cannot listen on that address ({getattr(e, 'strerror', None) or e}): pass an address "
                "of this machine (127.0.0.1: this machine only, 0.0.0.0: every interface)")
    return None


def launch(argv: Sequence[str] | None = None, block: bool = True):
    """Parse, load, build the page and serve it -> (the Gradio app, its URL); `block=False` returns at once
    (tests), else it serves until interrupted (Ctrl-C or SIGTERM: `kill`, `docker stop`, schedulers), then deletes
    its workspace."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, ok, expected in (("port", 0 <= args.port <= 65535, "0 to 65535"), ("queue_size", args.queue_size >= 1,
                               "at least 1 (0 refuses every request)"),
                               ("max_upload_mb", math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0,
                               "a finite size above 0 (0 refuses every upload)")):
        if not ok:
            parser.error(f"--{flag}={getattr(args, flag)}: expected {expected}")
    if problem := host_problem(args.host):
        parser.error(problem)
    session = open_session(args)
    served, temp_dir = False, os.environ.get("GRADIO_TEMP_DIR")
    try:
        with sigterm_raises():
            # Gradio's copies of uploads and results: in the private workspace (its default is /tmp/gradio, readable
            # by every local user and shared between them), unless the user chose a folder
            os.environ["GRADIO_TEMP_DIR"] = USER_GRADIO_TEMP_DIR or str(session.workspace.uploads)
            from scripts.app_ui import CSS, build_ui  # Gradio only once the model loaded

            title = f"M-VAR: {Path(session.base_argv[1]).name} ({session.mvar.num_classes} classes, " \
                    f"{session.mvar.image_size} px)"
            demo = build_ui(session, title, args.queue_size)
            try:
                _, url, _ = demo.launch(server_name=args.host, server_port=args.port or None, share=args.share,
                                        max_file_size=int(args.max_upload_mb * 1e6), ssr_mode=False,
                                        quiet=not block, css=CSS, prevent_thread_lock=not block)
            except OSError as e:
                reason = str(e).split(". You can")[0]  # Gradio's advice names its own launch() parameter
                raise SystemExit(f"error: --host={args.host} --port={args.port}: cannot listen there ({reason}): "
                                 "choose another --port") from e
            served = True
            if block:
                demo.block_thread()
    finally:
        if block or not served:  # a server that did not start leaves nothing behind either
            session.workspace.close()
            if temp_dir is None:  # not left pointing at the deleted workspace (children inherit it)
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:  # the user's, or a server running in this process (tests)
                os.environ["GRADIO_TEMP_DIR"] = temp_dir
    return demo, session, url


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    launch()
