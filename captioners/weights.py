"""Finding, downloading and safely reading model files.

Every file a model needs is an :class:`Asset`: a path inside the models folder plus where it comes
from; :func:`ensure_assets` makes all of a model's files present or names every missing one.
No file read here can run code: ``.pt`` files go through ``torch.load(..., weights_only=True)``
(which refuses pickles naming anything but tensors), TorchScript archives through
:mod:`captioners.torch_archive` (tensors only, never their code), vocabulary pickles through a
plain-data unpickler. Whatever is wrong with a file becomes a one-line CaptionerError.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import pickle
import shutil
import struct
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from captioners.errors import CaptionerError, CheckpointLayoutError, MissingWeightsError, UnsafeCheckpointError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class Asset:
    """A file (or a folder of files) that a model needs.

    ``local`` is relative to the models folder unless absolute. When ``repo_id`` is set the file(s)
    ``repo_files`` are downloaded from that Hugging Face repository; ``file_url`` is a direct
    download of a single file from elsewhere (e.g. raw GitHub); ``url`` is a page to fetch it by
    hand when there is neither.
    """

    local: str
    repo_id: str | None = None
    repo_files: tuple[str, ...] = ()
    url: str | None = None
    is_dir: bool = False
    # For folders: the files that must exist for the folder to count as present; "a|b" means either.
    required: tuple[str, ...] = field(default=())
    file_url: str | None = None
    # A file with this suffix beside a single-file asset is its safer converted copy, used instead.
    converted_suffix: str = ".safetensors"
    # The command-line option that points at a local copy instead (for error messages).
    option: str = "--weights"
    # Glob patterns (relative to the models folder) of copies that serve when ``local`` is absent,
    # e.g. where an earlier version of this package let another library cache the file.
    fallbacks: tuple[str, ...] = ()

    def path(self, models_dir: Path) -> Path:
        return Path(self.local) if os.path.isabs(self.local) else models_dir / self.local

    def locate(self, models_dir: Path) -> Path | None:
        """The local copy to use (the converted twin, the folder, or a fallback), or None."""
        target = self.path(models_dir)
        if not self.is_dir:
            converted = target.with_suffix(self.converted_suffix)
            if target.suffix != self.converted_suffix and converted.is_file():
                return converted
            if target.is_file():
                return target
        elif target.is_dir() and all(_has_one_of(target, name) for name in self.required or self.repo_files):
            return target
        for pattern in self.fallbacks:
            found = sorted(p for p in models_dir.glob(pattern) if p.is_file())
            if found:
                return found[-1]
        return None

    def is_present(self, models_dir: Path) -> bool:
        return self.locate(models_dir) is not None

    def downloadable(self) -> bool:
        return bool(self.repo_id or self.file_url)

    def source(self, with_files: bool = True) -> str:
        if self.repo_id:
            files = " or ".join(self.repo_files) if self.required == ("|".join(self.repo_files),) else \
                ", ".join(self.repo_files)
            return f"https://huggingface.co/{self.repo_id}" + (f" ({files})" if with_files else "")
        return self.file_url or self.url or "(no known download source)"

    def describe(self, models_dir: Path) -> str:
        """Where the file goes, for messages: a folder with the files it needs."""
        target = self.path(models_dir)
        if not self.is_dir:
            return str(target)
        needed = ", ".join(name.replace("|", " or ") for name in self.required or self.repo_files)
        return f"{target}{os.sep} ({needed})"


def _has_one_of(folder: Path, names: str) -> bool:
    return any((folder / name).is_file() for name in names.split("|"))


def ensure_asset(asset: Asset, models_dir: Path, download: bool = True) -> Path:
    """Return the local path of ``asset``, downloading it first when possible."""
    return ensure_assets([asset], models_dir, download=download)[0]


def ensure_assets(assets: list[Asset], models_dir: Path, download: bool = True, model: str | None = None
                  ) -> list[Path]:
    """The local paths of every asset, downloading the missing ones first.

    When some stay missing, one MissingWeightsError names all of them, each with its source and its
    destination. Before any download, each source's host is asked once whether it answers at all, so
    that without a network the answer comes at once (huggingface_hub retries a refused connection
    for ~25 s per file, printing every retry).
    """
    missing = [asset for asset in dict.fromkeys(assets) if not asset.is_present(models_dir)]
    reasons: dict[Asset, str] = {}
    if missing and download:
        unreachable: dict[str, str | None] = {}
        for asset in missing:
            if not asset.downloadable():
                continue
            host = _source_host(asset)
            if host not in unreachable:
                unreachable[host] = _unreachable(host)
            if unreachable[host]:
                reasons[asset] = unreachable[host]
                continue
            try:
                _download(asset, asset.path(models_dir))
            except Exception as exc:  # a missing repo or file, a dropped connection: all end the same way
                log.debug("download of %s failed", asset.source(), exc_info=True)
                reasons[asset] = _download_failure(exc, asset)
    still = [asset for asset in missing if not asset.is_present(models_dir)]
    if still:
        raise MissingWeightsError(_missing_message(still, models_dir, reasons, model),
                                  _missing_message_for_ui(still, models_dir, reasons, model))
    return [asset.locate(models_dir) for asset in assets]


def _missing_message(assets: list[Asset], models_dir: Path, reasons: dict[Asset, str], model: str | None) -> str:
    """A headline, then one line per missing file: where it goes, where it comes from, why it is not there."""
    whose = f" of {model}" if model else ""
    files = f"files ({len(assets)})" if len(assets) > 1 else "file"
    lines = [f"Missing model {files}{whose}. Download each from its source and put it where shown, or point at a "
             "copy you already have (command line: the option shown; WebUI: Captioners tab > Models > Local files):"]
    for asset in assets:
        if not (asset.downloadable() or asset.url):  # a path the user gave
            lines.append(f"  {asset.describe(models_dir)}: not found (check the path given with {asset.option} "
                         "or in presets.json)")
            continue
        failed = f"; automatic download failed: {reasons[asset]}" if asset in reasons else ""
        # A folder's line already names the files it needs.
        lines.append(f"  {asset.describe(models_dir)} <- {asset.source(with_files=not asset.is_dir)} "
                     f"({asset.option}{failed})")
    return "\n".join(lines)


# Where a user of the tab (WebUI or app) points a model at a copy of a file: the counterpart of each
# command-line option an Asset names. The Local files fields are named after the presets.json keys.
UI_PLACES = {
    "--weights": "Models > Local files: weights",
    "--tokenizer": "Models > Local files: tokenizer",
    "--clip-weights": "Models > Local files: clip weights",
    "--clip-config": "Models > Local files: clip config",
    "--vocabulary": "Models > Local files: vocabulary",
    "--score-clip": "the Scoring CLIP field under Scores and quality gates (WebUI: also Settings > Captioners)",
}


def _missing_message_for_ui(assets: list[Asset], models_dir: Path, reasons: dict[Asset, str],
                            model: str | None) -> str:
    """:func:`_missing_message` for the tab, the img2img button and the API: no command-line options."""
    whose = f" of {model}" if model else ""
    files = f"files ({len(assets)})" if len(assets) > 1 else "file"
    lines = [f"Missing model {files}{whose}. Captioners tab > Models > Download missing files fetches them; "
             "or put each file where shown, or point the model at a copy you already have (Models > Local files "
             "for the selected model):"]
    for asset in assets:
        place = UI_PLACES.get(asset.option)
        if not (asset.downloadable() or asset.url):  # a path the user gave
            where = f" in {place}" if place else ""
            lines.append(f"  {asset.describe(models_dir)}: not found (check the path given{where} or in presets.json)")
            continue
        source = asset.source(with_files=not asset.is_dir)
        if place:  # a hand-download note may name the option too
            source = source.replace(asset.option, place)
        why = f"automatic download failed: {reasons[asset]}" if asset in reasons else ""
        hint = "; ".join(part for part in (place or "", why) if part)
        lines.append(f"  {asset.describe(models_dir)} <- {source}" + (f" ({hint})" if hint else ""))
    return "\n".join(lines)


def _download_failure(exc: BaseException, asset: Asset) -> str:
    """A download error in words (huggingface_hub's first line is often just "404 Client Error.")."""
    kind = type(exc).__name__
    if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return f"not in the repository {asset.repo_id}"
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return f"the repository {asset.repo_id} does not exist or needs a login"
    return _first_line(exc)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _source_host(asset: Asset) -> str:
    """The server a download would ask: the hub's endpoint (HF_ENDPOINT), or the URL's host ("" for
    local file:// URLs, which need no probe)."""
    if asset.repo_id:
        from huggingface_hub import constants

        return constants.ENDPOINT.rstrip("/")
    parts = urllib.parse.urlsplit(asset.file_url or "")
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") else ""


def _unreachable(host: str, timeout: float = 10.0) -> str | None:
    """Why ``host`` cannot be asked for files (offline mode, no connection), or None when it answers."""
    if _offline():
        return "HF_HUB_OFFLINE is set"
    if not host:
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(host, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # any HTTP answer means the server is there
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad URLs
        reason = getattr(exc, "reason", exc)
        return f"{host} cannot be reached ({_first_line(reason) if isinstance(reason, BaseException) else reason})"


def _download(asset: Asset, target: Path) -> None:
    """Hub files through huggingface_hub (cached, resumable, honours HF_ENDPOINT); other files by
    URL. ``HF_HUB_OFFLINE=1`` turns every download off."""
    if _offline():
        raise RuntimeError("HF_HUB_OFFLINE is set")
    folder = target if asset.is_dir else target.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not asset.repo_id:
        _download_url(asset.file_url, target)
        return
    from huggingface_hub import hf_hub_download

    needed = asset.required or asset.repo_files
    last_error: Exception | None = None
    for name in asset.repo_files:
        group = next((g for g in needed if name in g.split("|")), None)
        if asset.is_dir and group and "|" in group and _has_one_of(target, group):
            continue  # another file of this either-or group is already there
        log.info("Downloading %s from %s", name, asset.repo_id)
        try:
            fetched = Path(hf_hub_download(asset.repo_id, name, local_dir=str(folder)))
        except Exception as exc:
            if asset.is_dir and name not in needed:
                last_error = exc
                continue  # optional extra file, or one of several alternatives
            raise
        wanted = target / name if asset.is_dir else target
        if fetched.resolve() != wanted.resolve():
            wanted.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(fetched), str(wanted))
    if asset.is_dir and last_error is not None and not all(_has_one_of(target, g) for g in needed):
        raise last_error  # none of an either-or group could be fetched: say why


def _download_url(url: str, target: Path, timeout: float = 60.0) -> None:
    """Fetch one file; it only appears under its name once complete (a partial file never looks valid)."""
    log.info("Downloading %s", url)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


# Constructors of plain data; a pickle may name these and nothing else.
_PLAIN_TYPES = frozenset({"list", "tuple", "dict", "set", "frozenset", "str", "bytes", "int", "float", "bool",
                          "complex"})
# Plain-data pickles here are small vocabularies (the ICG ones are ~100 KB); anything far bigger is refused.
MAX_PLAIN_PICKLE_BYTES = 64 * 1024 * 1024


class _PlainDataUnpickler(pickle._Unpickler):
    """Python's own unpickler, not the C one: its memo is a dict and it reads no more bytes than the file
    holds, so a crafted length or memo index (``LONG_BINPUT 4294967295``) cannot make it allocate GBs."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _PLAIN_TYPES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_plain_pickle(path: str | os.PathLike):
    """Read a pickle of plain data (lists, dicts, strings, numbers) without running code from it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PLAIN_PICKLE_BYTES:
            raise CheckpointLayoutError(f"Refused to load {path}: {size / 2**20:.0f} MB is far too big for a "
                                        "vocabulary pickle; use the original file or its .json conversion.")
        data = path.read_bytes()
    except OSError as exc:
        raise CaptionerError(f"Could not read {path}: {exc.strerror or exc}") from exc
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            struct.error, RecursionError, MemoryError, OverflowError) as exc:
        raise UnsafeCheckpointError(f"Refused to load {path}: it is not a plain-data pickle "
                                    f"({_first_line(exc)}).") from None


def _first_line(exc: BaseException) -> str:
    """An exception as one short line: its message, or its type when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running code from it.

    ``.safetensors`` is read directly; TorchScript archives through :mod:`captioners.torch_archive`
    (tensors only, no code); anything else through ``torch.load(weights_only=True)``. A
    ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped. Every failure is a
    CaptionerError with a one-line reason.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"Weights file not found: {path}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise CaptionerError(f"Could not read {path}: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointLayoutError(f"{path} is empty (0 bytes): download or copy it again.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    data = _read_torch_file(path, head)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointLayoutError(f"{path} is not a state dict (a mapping of names to tensors).")
    return dict(data)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError (truncated, bad header...) has no common importable base
        raise CheckpointLayoutError(f"{path} is not a readable .safetensors file ({_first_line(exc)}); "
                                    "download or convert it again.") from None


def _read_torch_file(path: Path, head: bytes):
    # torch.save writes a zip (torch >= 1.6) or a pickle (protocol 2: b"\x80\x02"); anything else
    # (a text file, an HTML error page saved as .pt) would give torch.load's KeyError or IndexError.
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointLayoutError(f"{path} is not a PyTorch checkpoint (it starts with {head[:8]!r}, "
                                    "not a torch.save zip or pickle).")
    from captioners.torch_archive import is_torchscript, read_torchscript_tensors

    if is_torchscript(path):
        return read_torchscript_tensors(path)
    try:
        # torch.serialization.load is torch.load itself; A1111 replaces the torch.load attribute with
        # its own checker, which returns None for files newer torch writes (".format_version").
        return torch.serialization.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"Refused to load {path}: it holds Python objects besides tensors, and unpickling them "
            "could run code. Use a plain state-dict checkpoint or a .safetensors file.") from exc
    except Exception as exc:  # truncated zips, damaged pickles: torch raises many kinds
        raise CheckpointLayoutError(f"Could not read {path} as a PyTorch checkpoint "
                                    f"({_first_line(exc)}).") from None


def read_checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of a checkpoint's tensors without reading their data (a safetensors header, a
    torch.save zip's data.pkl, a legacy torch.save pickle's object part), or None when that cannot be
    learnt cheaply or safely."""
    from captioners.torch_archive import read_tensor_shapes

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        with open(path, "rb") as handle:
            if handle.read(1) == b"\x80":  # a pickle, not a zip: torch.save before 1.6 (or told to)
                return _legacy_shapes(handle)
        return read_tensor_shapes(path)
    except Exception:  # unreadable here means unknown; loading the file reports the real problem
        return None


# A legacy torch.save file is four pickles (a magic number, a protocol version, a sys_info dict, the
# saved object) followed by the storages' bytes. The object pickle names each tensor's size, so its
# shapes come from the first few KB of a file of any size; the storages are never read.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def _legacy_shapes(handle: io.BufferedReader) -> dict[str, tuple[int, ...]] | None:
    handle.seek(0)
    header = [_PlainDataUnpickler(handle).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
        return None
    data = _LegacyShapeUnpickler(handle).load()
    for key in _WRAPPER_KEYS:
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping):
        return None
    return {str(key): tuple(value) for key, value in data.items() if isinstance(value, _LegacyShape)}


class _LegacyShape(tuple):
    """A tensor's size, standing in for the tensor (no storage is read)."""


def _legacy_tensor(_storage: object, _offset: object, size: object, *_rest: object) -> _LegacyShape:
    if not isinstance(size, tuple) or not all(type(n) is int and n >= 0 for n in size):
        raise pickle.UnpicklingError(f"bad tensor size {str(size)[:40]}")
    return _LegacyShape(size)


def _parameter_data(data: object, *_rest: object) -> object:
    return data  # a Parameter is its tensor's shape here


class _LegacyShapeUnpickler(pickle._Unpickler):
    """Reads the object pickle of a legacy torch.save: dicts of tensors become dicts of shapes. Only
    the globals such a state dict names are known; any other refuses the file (no code runs)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _legacy_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _parameter_data
        if module == "torch" and name.endswith("Storage") and name.isidentifier():
            return name  # a storage type: only named, never built
        if module == "builtins" and name in _PLAIN_TYPES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: object) -> None:
        return None  # a storage: its bytes come after this pickle and are not needed for shapes


@contextlib.contextmanager
def quiet_model_building() -> Iterator[None]:
    """transformers >= 5 draws a "Loading weights" progress bar for every from_pretrained, even from a
    state dict in memory: noise in every run. Its setting is restored afterwards (downloads keep theirs)."""
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically: a half-written weights file would look valid on the next start."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)


def deduplicate_shared(state_dict: Mapping[str, torch.Tensor], drop: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop keys in ``drop`` whose tensor shares storage with another kept key (safetensors refuses them)."""
    kept = {k: v for k, v in state_dict.items() if k not in drop}
    pointers = {v.untyped_storage().data_ptr() for v in kept.values()}
    for key in drop:
        if key in state_dict and state_dict[key].untyped_storage().data_ptr() not in pointers:
            kept[key] = state_dict[key].clone()
    return kept
