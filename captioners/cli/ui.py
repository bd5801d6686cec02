"""``python -m captioners ui``: serve the Captioners tab (and the REST API) as a web app; see captioners.app."""

from __future__ import annotations

import argparse
import logging
import os

from captioners.app import API_PREFIX, build_app, display_url, serve
from captioners.cli.options import add_common
from captioners.errors import CaptionerError
from captioners.paths import DEFAULT_MODEL

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from captioners.service import AFTER_USE, MAX_IMAGE_MPIXELS, MAX_REQUEST_MPIXELS

    parser = sub.add_parser("ui", help="open the Captioners tab as a web app (needs gradio)",
                            description="Serve the Captioners tab (Caption, Batch, Models) as a web app, "
                                        "optionally with the REST API (--api), behind a login (--auth).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to your network, "
                             "and then needs --auth)")
    parser.add_argument("--port", type=int, default=7862, help="port to listen on (default 7862)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model selected at start (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")
    parser.add_argument("--after-use", choices=AFTER_USE, default="keep",
                        help="keep the model loaded, offload it to CPU RAM, or unload it after each job")
    parser.add_argument("--api", action="store_true", help="also serve the REST API under /captioners/v1")
    parser.add_argument("--max-image-mpixels", type=float, default=MAX_IMAGE_MPIXELS, metavar="N",
                        help=f"API: refuse (413) images of more than N million pixels (default {MAX_IMAGE_MPIXELS})")
    parser.add_argument("--max-request-mpixels", type=float, default=MAX_REQUEST_MPIXELS, metavar="N",
                        help="API: refuse requests whose images have more than N million pixels together "
                             f"(default {MAX_REQUEST_MPIXELS})")
    parser.add_argument("--auth", "--api-auth", dest="auth", metavar="USER:PASSWORD[,...]",
                        help="require HTTP basic auth with one of these logins for the whole app: the page, "
                             "gradio's endpoints behind it and the REST API (--api-auth is the older spelling)")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="allow a --host other machines can reach without --auth: anyone who reaches the "
                             "port can then caption, run batches that write files here, and save local paths")
    add_common(parser)
    parser.set_defaults(func=cmd_ui)


def build_service(args: argparse.Namespace):
    from captioners.paths import resolve_models_dir
    from captioners.service import CaptionService, Host, Settings

    for name in ("max_image_mpixels", "max_request_mpixels"):
        if getattr(args, name) <= 0:
            raise CaptionerError(f"--{name.replace('_', '-')} must be above 0 (got {getattr(args, name):g}).")
    settings = Settings(models_dir=resolve_models_dir(args.models_dir), model=args.model, device=args.device,
                        dtype=args.dtype, after_use=args.after_use, max_image_mpixels=args.max_image_mpixels,
                        max_request_mpixels=args.max_request_mpixels)
    return CaptionService(Host(lambda: settings))


def cmd_ui(args: argparse.Namespace) -> int:
    from captioners.auth import check_bind, is_loopback, parse_auth

    credentials = parse_auth(args.auth)
    check_bind(args.host, credentials, args.allow_unauthenticated)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
        import uvicorn  # noqa: F401  (a gradio dependency)
    except ImportError as exc:
        raise CaptionerError("The UI needs gradio: pip install 'gradio>=3.41.2' "
                             "(or install this package with the [ui] extra).") from exc
    if not credentials and not is_loopback(args.host):
        log.warning("Serving on %s without --auth: anyone who can reach it can use the app.", args.host)

    service = build_service(args)
    app, _ = build_app(service, credentials, api=args.api, host=args.host, port=args.port)
    url = display_url(args.host, args.port)
    line = f"Captioners UI at {url}" + (f" (API under {url.rstrip('/')}{API_PREFIX})" if args.api else "")
    try:
        serve(app, args.host, args.port, lambda: print(line, flush=True))
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed Ctrl-C on
        pass
    finally:
        service.unload()
    return 0
