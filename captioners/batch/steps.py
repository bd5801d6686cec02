"""The two steps of every batch engine, local or distributed: preprocess, then caption.

- :class:`PreprocessStep` (CPU): an image path (or its bytes) -> the model's fixed-shape input. A
  failure is returned as its reason, never raised: one bad file must not end a long run.
- :class:`CaptionStep`: the job's Judge (models loaded once per worker) maps a batch of preprocessed
  images to :class:`~captioners.judging.judge.JudgedImage` results, and to table rows of
  ``id, path, caption, captions, score, scores, model, options_hash, error, judged``
  (:func:`table_row`, :func:`judged_from_row`), the contract a distributed engine writes and the
  local writer reads back.

The local engine (:mod:`captioners.batch.local_engine`) and the Ray engine
(:mod:`captioners.batch.ray_engine`) both run these two steps, so both give the same captions.
Importing this module touches no GPU: models load when a worker builds its step.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from captioners.base import Captioner
from captioners.batch.gpu_decode import EncodedJpeg, gpu_jpeg
from captioners.batch.job import BatchJob
from captioners.batch.remote import RemoteFile, exception_text, read_remote
from captioners.display import display_path, json_bytes
from captioners.errors import CaptionerError, ImageLoadError
from captioners.images import EncodedImage, load_image
from captioners.judging.gates import Flag
from captioners.judging.judge import Judge, JudgedImage

log = logging.getLogger(__name__)

Pixels = torch.Tensor | tuple[torch.Tensor, ...]  # one tensor, or one per model (several models, a scoring CLIP)
TABLE_COLUMNS = ("id", "path", "caption", "captions", "score", "scores", "model", "options_hash", "error", "judged")


class PreprocessStep:
    """Path, remote file or bytes -> the model's input; the reason as a string when the image cannot be used.

    ``preprocess`` is the Judge's (picklable: open_clip / BLIP transforms), so it runs in threads,
    worker processes or remote CPU tasks alike. A remote file's bytes are read here, in the worker."""

    def __init__(self, preprocess: Callable[[Image.Image], Pixels], min_side: int | None = None,
                 gpu_jpegs: bool = False):
        self.preprocess = preprocess
        self.min_side = min_side  # set: JPEGs are decoded at reduced size (draft mode)
        self.gpu_jpegs = gpu_jpegs  # set: JPEGs the GPU can decode come back as their bytes (gpu_decode.py)

    def __call__(self, source: Path | str | bytes | RemoteFile,
                 name: str | None = None) -> Pixels | EncodedJpeg | str:
        if isinstance(source, RemoteFile):
            try:
                source, name = read_remote(source), "the object"
            except OSError as exc:  # gone since listing, access denied: this image fails, the run goes on
                return f"cannot read it: {exception_text(exc)}"
        path = Path(source) if not isinstance(source, bytes) else None
        if self.gpu_jpegs:
            jpeg = self._gpu_jpeg(source, path, name)
            if jpeg is not None:
                return jpeg
        try:
            if path is None:  # bytes from object storage: no path to open, no draft decoding
                return self.preprocess(EncodedImage(source, name or "image").decode())
            return self.preprocess(load_image(path, min_side=self.min_side))
        except ImageLoadError as exc:
            shown = display_path(path) if path is not None else (name or "")
            return str(exc).removeprefix(f"{shown}: ")
        except MemoryError:
            return "not enough memory to decode this image"
        except Exception as exc:  # a preprocessing failure must not end a long run
            return f"preprocessing failed: {type(exc).__name__}: {exc}"

    @staticmethod
    def _gpu_jpeg(source: Path | str | bytes, path: Path | None, name: str | None) -> EncodedJpeg | None:
        """The image's bytes when the GPU can decode it; None sends it down the CPU path, which also
        gives the reason when it cannot be read at all."""
        try:
            if path is None:
                return gpu_jpeg(source, name or "image")
            return gpu_jpeg(path, display_path(path))
        except Exception:  # unreadable, not an image, a decompression bomb: the CPU path says which
            return None


@dataclass(frozen=True)
class ModelRequest:
    """What a worker needs to load the job's models itself: plain data, picklable to any machine."""

    models: tuple[str, ...]
    models_dir: str
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"

    def absolute(self) -> "ModelRequest":
        """The same request with every local path absolute: a worker on a cluster runs in a folder of
        its own, where a path relative to the driver's folder names nothing."""
        from captioners.registry import PATH_KEYS

        def absolute(value: Any) -> Any:
            path = Path(str(value)).expanduser()
            return str(path.absolute()) if isinstance(value, str) and path.exists() else value

        overrides = {key: absolute(value) if key in PATH_KEYS else value for key, value in self.overrides.items()}
        return ModelRequest(tuple(absolute(model) for model in self.models), str(Path(self.models_dir).absolute()),
                            overrides, self.device, self.dtype)

    def captioners(self) -> list[Captioner]:
        """The captioners, not loaded yet (their files are checked when they load)."""
        from captioners.registry import create_captioner

        return [create_captioner(model, Path(self.models_dir), self.overrides) for model in self.models]


def options_hash(job: BatchJob, model_id: str, options: dict[str, Any]) -> str:
    """What makes two captions of one image the same: model, decoding, judging and text shaping.
    A table row made under other options is never taken for this job's."""
    identity = {"model": model_id, "decoding": options, "shaping": job.to_dict()["shaping"], "join": job.join,
                "judging": {k: v for k, v in job.judging.to_dict().items() if k != "max_tokens"}}
    return hashlib.sha256(json_bytes(identity)).hexdigest()[:16]


class CaptionStep:
    """One batch of preprocessed images -> one JudgedImage each, or one reason for the whole batch."""

    def __init__(self, judge: Judge, model_id: str, options_hash: str):
        self.judge, self.model_id, self.options_hash = judge, model_id, options_hash

    def caption(self, pixels: Pixels) -> list[JudgedImage] | str:
        try:
            with torch.inference_mode():
                return self.judge.judge(pixels)
        except CaptionerError:  # an option this model cannot do: every batch would fail alike
            raise
        except Exception as exc:  # e.g. out of memory: these images fail, the run goes on
            log.warning("Captioning a batch failed: %s", exc)
            return f"captioning failed: {type(exc).__name__}: {exc}"

    def rows(self, ids: Sequence[str], paths: Sequence[str], pixels: Pixels | None,
             errors: Sequence[str | None]) -> list[dict[str, Any]]:
        """Table rows for a batch whose images failed preprocessing where ``errors`` says so;
        ``pixels`` holds the others, in order."""
        good = [i for i, error in enumerate(errors) if not error]
        results: list[JudgedImage] | str = self.caption(pixels) if good and pixels is not None else []
        by_position = dict(zip(good, results)) if isinstance(results, list) else {}
        rows = []
        for i, (image_id, path, error) in enumerate(zip(ids, paths, errors)):
            outcome: JudgedImage | str = by_position.get(i) or error or results  # type: ignore[assignment]
            rows.append(table_row(image_id, path, outcome, self.model_id, self.options_hash))
        return rows


def table_row(image_id: str, path: str, outcome: JudgedImage | str, model: str, key: str) -> dict[str, Any]:
    if isinstance(outcome, str):
        return {"id": image_id, "path": path, "caption": None, "captions": [], "score": None, "scores": [],
                "model": model, "options_hash": key, "error": outcome, "judged": None}
    judged = {"captions": outcome.captions, "scores": outcome.scores, "models": outcome.models,
              "flags": [[[flag.code, flag.message] for flag in flags] for flags in outcome.flags],
              "retried": outcome.retried, "skipped": outcome.skipped}
    return {"id": image_id, "path": path, "caption": outcome.caption, "captions": list(outcome.captions),
            "score": outcome.score, "scores": list(outcome.scores), "model": ",".join(dict.fromkeys(outcome.models))
            or model, "options_hash": key, "error": None, "judged": json.dumps(judged, ensure_ascii=False)}


def judged_from_row(row: dict[str, Any]) -> JudgedImage | str:
    """A table row back as the writer takes it: the JudgedImage, or the image's failure reason."""
    if row.get("error"):
        return str(row["error"])
    data = json.loads(row["judged"])
    return JudgedImage(captions=list(data["captions"]), scores=list(data["scores"]), models=list(data["models"]),
                       flags=[[Flag(code, message) for code, message in flags] for flags in data["flags"]],
                       retried=bool(data["retried"]), skipped=bool(data["skipped"]))
