"""The standalone app: ``python -m captioners ui`` serves the WebUI's Captioners tab on its own.

Bound to 127.0.0.1 unless ``--host`` says otherwise. ``--api`` adds the same REST routes as the
WebUI extension (``/captioners/v1/...``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from captioners.errors import CaptionerError

log = logging.getLogger(__name__)

STYLE = Path(__file__).resolve().parents[1] / "style.css"  # the extension's style.css, in a checkout


def add_ui_parser(sub: argparse._SubParsersAction) -> None:
    from captioners.cli import DEFAULT_MODEL, add_common
    from captioners.service import AFTER_USE

    parser = sub.add_parser("ui", help="open the Captioners tab as a web app (needs gradio)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to your network)")
    parser.add_argument("--port", type=int, default=7862)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model selected at start (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")
    parser.add_argument("--after-use", choices=AFTER_USE, default="keep",
                        help="keep the model loaded, offload it to CPU RAM, or unload it after each job")
    parser.add_argument("--api", action="store_true", help="also serve the REST API under /captioners/v1")
    parser.add_argument("--api-auth", help="user:password[,user:password] for the REST API (HTTP basic)")
    add_common(parser)
    parser.set_defaults(func=cmd_ui)


def build_service(args: argparse.Namespace):
    from captioners.paths import resolve_models_dir
    from captioners.service import CaptionService, Host, Settings

    settings = Settings(models_dir=resolve_models_dir(args.models_dir), model=args.model, device=args.device,
                        dtype=args.dtype, after_use=args.after_use)
    return CaptionService(Host(lambda: settings))


def cmd_ui(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise CaptionerError("The UI needs gradio: pip install 'gradio>=3.41.2' "
                             "(or install this package with the [ui] extra).") from exc
    from captioners.ui import build_tab
    from captioners.ui.compat import launch_kwargs, queue_kwargs

    service = build_service(args)
    css = STYLE.read_text(encoding="utf-8") if STYLE.is_file() else None
    demo = build_tab(service, title="Captioners", css=css)
    demo.queue(**queue_kwargs(4))
    app, url, _ = demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                              inbrowser=False, quiet=True, **launch_kwargs(css=css))
    if args.api:
        from captioners import api

        api.mount(app, service, args.api_auth)
    print(f"Captioners UI at {url}" + (f" (API under {url.rstrip('/')}{'/captioners/v1'})" if args.api else ""),
          flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        service.unload()
    return 0
