"""REST routes under ``/captioners/v1``, mounted on the WebUI's FastAPI app (or the standalone app's).

Every route goes through the :class:`CaptionService`, so it runs under the host's lock (in the
WebUI: the queue lock shared with generations). Bad input is a 4xx with a one-line ``detail``:
400 bad request data, 401 wrong credentials, 404 unknown model or missing folder, 409 model files
missing. Only unexpected failures give 500, and then without a traceback.
"""

# No "from __future__ import annotations": FastAPI reads the route functions' annotations at run time.
import base64
import binascii
import json
import logging
import secrets
from typing import Any, Callable, Mapping, Sequence

from captioners.errors import (CaptionerError, MissingWeightsError, OutputsNotWrittenError, TooLargeError,
                               UnknownModelError)
from captioners.display import display_path, json_bytes
from captioners.images import EncodedImage
from captioners.regions import RegionError, RegionImage, RegionOptions, encoded_mask, parse_box
from captioners.service import CaptionService, InputNotFoundError, check_pixel_limits

log = logging.getLogger(__name__)

PREFIX = "/captioners/v1"
CAPTION_KEYS = {"image", "images", "model", "options", "judging", "mask", "box", "region"}


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """``user:password[,user2:password2]``, the WebUI's ``--api-auth`` format."""
    credentials = {}
    for item in (api_auth or "").split(","):
        if item.strip():
            user, sep, password = item.strip().partition(":")
            if not sep:
                raise CaptionerError("api-auth must be user:password[,user:password...]")
            credentials[user] = password
    return credentials


def decode_image(data: Any, where: str) -> EncodedImage:
    """A base64 (or data-URL) string -> an image checked from its header (decoded later, in the job),
    or a 400 naming the bad item."""
    if not isinstance(data, str) or not data:
        raise CaptionerError(f"{where} must be a base64-encoded image string.")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CaptionerError(f"{where} is not valid base64: {exc}") from exc
    return EncodedImage(raw, where)


def parse_body(body: bytes) -> Any:
    """The request's JSON, or a one-line 400 (FastAPI's own answer would be a list of validation errors)."""
    if not body.strip():
        raise CaptionerError("The request body is empty: send a JSON object.")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = str(exc).splitlines()[0] if not isinstance(exc, RecursionError) else "nested too deeply"
        raise CaptionerError(f"The request body is not valid JSON ({reason}): send a JSON object.") from None


def status_of(exc: BaseException) -> int:
    if isinstance(exc, (UnknownModelError, InputNotFoundError)):
        return 404
    if isinstance(exc, MissingWeightsError):
        return 409
    if isinstance(exc, TooLargeError):
        return 413
    if isinstance(exc, OutputsNotWrittenError):
        return 507  # Insufficient Storage: the captions are written, some combined output is not
    if isinstance(exc, CaptionerError):
        return 400
    return 500


class CaptionersApi:
    """The route handlers; plain methods taking and returning JSON-able data."""

    def __init__(self, service: CaptionService):
        self.service = service

    def models(self) -> dict[str, Any]:
        settings = self.service.settings()
        return {"models_dir": str(settings.models_dir), "default": settings.model,
                "loaded": self.service.loaded_model(), "models": [row.to_dict() for row in self.service.model_rows()]}

    def caption(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        payload = _object(payload)
        unknown = sorted(set(payload) - CAPTION_KEYS)
        if unknown:
            raise CaptionerError(f"Unknown field(s) {', '.join(unknown)}; use {', '.join(sorted(CAPTION_KEYS))}.")
        if ("image" in payload) == ("images" in payload):
            raise CaptionerError("Give either 'image' (one base64 string) or 'images' (a list of them).")
        items = [payload["image"]] if "image" in payload else payload["images"]
        if not isinstance(items, list) or not items:
            raise CaptionerError("'images' must be a non-empty list of base64 strings.")
        images = [decode_image(item, f"images[{i}]" if "images" in payload else "image")
                  for i, item in enumerate(items)]
        images, regions = self.regions(payload, images)
        options = payload.get("options")
        if options is not None and not isinstance(options, dict):
            raise CaptionerError("'options' must be an object of decoding options.")
        models, results = self.service.judge(images, _model(payload), options, payload.get("judging"))
        answer = {"model": ",".join(models), "captions": [result.caption for result in results],
                  "results": [judged_dict(result) for result in results]}
        if regions is not None:
            answer["regions"] = regions
        return answer

    def regions(self, payload: Mapping[str, Any], images: list[EncodedImage]
                ) -> tuple[Sequence[EncodedImage], list[dict[str, int]] | None]:
        """With a ``mask`` or a ``box``: the images as their regions' crops (checked now, cropped in the
        job), and each crop's box for the answer. ``region`` options default to the Settings'."""
        has_mask, has_box = "mask" in payload, "box" in payload
        if not (has_mask or has_box):
            if "region" in payload:
                raise RegionError("'region' options need a 'mask' (a base64 image) or a 'box' ({x, y, w, h}).")
            return images, None
        if has_mask and has_box:
            raise RegionError("Give either 'mask' (a base64 image) or 'box' ({x, y, w, h}), not both.")
        settings = self.service.settings()
        options = RegionOptions.from_mapping(payload.get("region"), settings.region)
        if has_box:
            target = parse_box(payload["box"])
        else:
            mask = decode_image(payload["mask"], "mask")
            check_pixel_limits([mask], settings)  # a mask is decoded now: the same limit as an image
            target = encoded_mask(mask)
        cropped = [RegionImage(image, target, options) for image in images]
        return cropped, [image.box.to_dict() for image in cropped]

    def batch(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        job = dict(_object(payload))
        model = _model(job)
        job.pop("model", None)
        summary = self.service.run_batch(job, model)
        if summary.output_failures:
            raise OutputsNotWrittenError(not_written_message(summary))
        result = summary.to_dict()
        model = ",".join(model) if isinstance(model, list) else model
        result.setdefault("model", model or self.service.settings().model)
        return result

    def interrupt(self) -> dict[str, Any]:
        return {"interrupted": self.service.interrupt()}

    def unload(self) -> dict[str, Any]:
        return {"unloaded": self.service.unload()}


def not_written_message(summary: Any) -> str:
    """One line: which outputs failed and why, and what the run did write all the same."""
    failures = "; ".join(f"{display_path(path)} ({reason})" for path, reason in summary.output_failures)
    captions = sum(1 for path in summary.written if path not in {p for p, _ in summary.output_failures})
    return (f"Captioned {summary.captioned} images and wrote {captions} files, but could not write: {failures}. "
            "Free some space or fix the path, then rerun (caption files already written are kept).")


def _object(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise CaptionerError("The request body must be a JSON object.")
    return payload


def judged_dict(result: Any) -> dict[str, Any]:
    """An image's result: its captions with scores, models and flags (see captioners.judging)."""
    return {"caption": result.caption, "clip_score": result.score, **result.to_dict()}


def _model(payload: Mapping[str, Any]) -> str | list[str] | None:
    """A model id, ids separated by commas, or a list of ids (several models judged together)."""
    model = payload.get("model")
    if isinstance(model, list) and model and all(isinstance(m, str) and m for m in model):
        return model
    if model is not None and not isinstance(model, str):
        raise CaptionerError("'model' must be a model id string (or a list of them).")
    return model or None


def mount(app: Any, service: CaptionService, api_auth: str | None = None) -> CaptionersApi:
    """Add the routes to a FastAPI app, behind HTTP basic auth when ``api_auth`` is set."""
    from fastapi import Depends, HTTPException, Request, Response
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from starlette.concurrency import run_in_threadpool

    api = CaptionersApi(service)
    credentials = parse_credentials(api_auth)
    dependencies = []
    if credentials:
        def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> None:
            expected = credentials.get(given.username)
            if expected is None or not secrets.compare_digest(given.password.encode(), expected.encode()):
                raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

        dependencies.append(Depends(check))

    def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            try:
                # Encoded here: file names with bytes that are not UTF-8 stay exact (\udcXX) instead
                # of failing in FastAPI's encoder.
                return Response(json_bytes(handler(*args)), media_type="application/json")
            except HTTPException:
                raise
            except Exception as exc:
                status = status_of(exc)
                if status == 500:
                    log.exception("Captioners API: unexpected error")
                    raise HTTPException(500, f"{type(exc).__name__}: {exc} (details in the server log)") from exc
                raise HTTPException(status, str(exc)) from exc
        return run

    # The body is read and parsed here (so bad JSON gets the one-line detail); the handler then runs in
    # the thread pool, where waiting for the WebUI's queue lock does not block the server.
    def with_body(handler: Callable[[Any], Any], name: str) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Any:
            body = await request.body()
            return await run_in_threadpool(guarded(lambda: handler(parse_body(body))))
        endpoint.__name__ = name  # the route's name
        return endpoint

    def models() -> Any:
        return guarded(api.models)()

    caption = with_body(api.caption, "caption")
    batch = with_body(api.batch, "batch")

    def interrupt() -> Any:
        return guarded(api.interrupt)()

    def unload() -> Any:
        return guarded(api.unload)()

    for path, endpoint, method in (("/models", models, "GET"), ("/caption", caption, "POST"),
                                   ("/batch", batch, "POST"), ("/interrupt", interrupt, "POST"),
                                   ("/unload", unload, "POST")):
        app.add_api_route(PREFIX + path, endpoint, methods=[method], dependencies=dependencies,
                          name=f"captioners_{endpoint.__name__}", tags=["Captioners"])
    return api
