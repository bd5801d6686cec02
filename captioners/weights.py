"""Finding, downloading and safely reading model files.

Every file a model needs is an :class:`Asset`: a path inside the models folder plus where it comes
from. ``.pt`` files are only ever read with ``torch.load(..., weights_only=True)``, which refuses
pickles that would run code.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from captioners.errors import CaptionerError, MissingWeightsError, UnsafeCheckpointError

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

    def path(self, models_dir: Path) -> Path:
        return Path(self.local) if os.path.isabs(self.local) else models_dir / self.local

    def is_present(self, models_dir: Path) -> bool:
        target = self.path(models_dir)
        if not self.is_dir:
            return target.is_file() or target.with_suffix(self.converted_suffix).is_file()
        needed = self.required or self.repo_files
        return target.is_dir() and all(_has_one_of(target, name) for name in needed)

    def source(self) -> str:
        if self.repo_id:
            files = ", ".join(self.repo_files)
            return f"https://huggingface.co/{self.repo_id} ({files})"
        return self.file_url or self.url or "(no known download source)"


def _has_one_of(folder: Path, names: str) -> bool:
    return any((folder / name).is_file() for name in names.split("|"))


def ensure_asset(asset: Asset, models_dir: Path, download: bool = True) -> Path:
    """Return the local path of ``asset``, downloading it first when possible."""
    target = asset.path(models_dir)
    if not asset.is_dir:
        converted = target.with_suffix(asset.converted_suffix)
        if target.suffix != asset.converted_suffix and converted.is_file():
            return converted
    if asset.is_present(models_dir):
        return target
    if download and (asset.repo_id or asset.file_url):
        try:
            _download(asset, target)
        except Exception as exc:  # network, offline mode, missing repo: all end the same way
            log.debug("download of %s failed", asset.source(), exc_info=True)
            raise MissingWeightsError(_missing_message(asset, target, reason=str(exc).splitlines()[0])) from exc
        if asset.is_present(models_dir):
            return target
    raise MissingWeightsError(_missing_message(asset, target))


def _missing_message(asset: Asset, target: Path, reason: str = "") -> str:
    what = "folder" if asset.is_dir else "file"
    needed = (name.replace("|", " or ") for name in asset.required or asset.repo_files)
    files = f" with {', '.join(needed)}" if asset.is_dir else ""
    msg = f"Missing model {what} {target}{files}. Download it from {asset.source()} and put it there"
    msg += (f", or point at a copy you already have ({asset.option} on the command line; in the WebUI, "
            "Captioners tab > Models > Local files).")
    if reason:
        msg += f" (automatic download failed: {reason})"
    return msg


def _download(asset: Asset, target: Path) -> None:
    """Hub files through huggingface_hub (cached, resumable, honours HF_ENDPOINT); other files by
    URL. ``HF_HUB_OFFLINE=1`` turns every download off."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("HF_HUB_OFFLINE is set")
    folder = target if asset.is_dir else target.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not asset.repo_id:
        _download_url(asset.file_url, target)
        return
    from huggingface_hub import hf_hub_download

    needed = asset.required or asset.repo_files
    for name in asset.repo_files:
        group = next((g for g in needed if name in g.split("|")), None)
        if asset.is_dir and group and "|" in group and _has_one_of(target, group):
            continue  # another file of this either-or group is already there
        log.info("Downloading %s from %s", name, asset.repo_id)
        try:
            fetched = Path(hf_hub_download(asset.repo_id, name, local_dir=str(folder)))
        except Exception:
            if asset.is_dir and name not in needed:
                continue  # optional extra file, or one of several alternatives
            raise
        wanted = target / name if asset.is_dir else target
        if fetched.resolve() != wanted.resolve():
            wanted.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(fetched), str(wanted))


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


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _PLAIN_TYPES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_plain_pickle(path: str | os.PathLike):
    """Read a pickle of plain data (lists, dicts, strings, numbers) without running code from it."""
    path = Path(path)
    try:
        return _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except OSError as exc:
        raise CaptionerError(f"Could not read {path}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UnsafeCheckpointError(f"Refused to load {path}: it is not a plain-data pickle ({exc}).") from exc


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running code from it.

    ``.safetensors`` is read directly; anything else goes through ``torch.load(weights_only=True)``.
    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # torch.serialization.load is torch.load itself; A1111 replaces the torch.load attribute with
        # its own checker, which returns None for files newer torch writes (".format_version").
        data = torch.serialization.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"Refused to load {path}: it holds Python objects besides tensors, and unpickling them "
            "could run code. Use a plain state-dict checkpoint or a .safetensors file."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise UnsafeCheckpointError(f"Could not read {path} as a PyTorch checkpoint: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UnsafeCheckpointError(f"{path} is not a state dict (a mapping of names to tensors).")
    return dict(data)


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
