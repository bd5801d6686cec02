"""Finding, downloading and safely reading model files.

Every file a model needs is an :class:`Asset`: a path inside the models folder plus where it comes
from. ``.pt`` files are only ever read with ``torch.load(..., weights_only=True)``, which refuses
pickles that would run code.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from captioners.errors import MissingWeightsError, UnsafeCheckpointError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class Asset:
    """A file (or a folder of files) that a model needs.

    ``local`` is relative to the models folder unless absolute. When ``repo_id`` is set the file(s)
    ``repo_files`` are downloaded from that Hugging Face repository; ``url`` is a page to fetch it
    by hand when there is no hub copy.
    """

    local: str
    repo_id: str | None = None
    repo_files: tuple[str, ...] = ()
    url: str | None = None
    is_dir: bool = False
    # For folders: the files that must exist for the folder to count as present.
    required: tuple[str, ...] = field(default=())

    def path(self, models_dir: Path) -> Path:
        return Path(self.local) if os.path.isabs(self.local) else models_dir / self.local

    def is_present(self, models_dir: Path) -> bool:
        target = self.path(models_dir)
        if not self.is_dir:
            return target.is_file() or target.with_suffix(".safetensors").is_file()
        needed = self.required or self.repo_files
        return target.is_dir() and all((target / name).is_file() for name in needed)

    def source(self) -> str:
        if self.repo_id:
            files = ", ".join(self.repo_files)
            return f"https://huggingface.co/{self.repo_id} ({files})"
        return self.url or "(no known download source)"


def ensure_asset(asset: Asset, models_dir: Path, download: bool = True) -> Path:
    """Return the local path of ``asset``, downloading it first when possible."""
    target = asset.path(models_dir)
    if not asset.is_dir:
        converted = target.with_suffix(".safetensors")
        if target.suffix != ".safetensors" and converted.is_file():
            return converted
    if asset.is_present(models_dir):
        return target
    if download and asset.repo_id:
        try:
            _download(asset, target)
        except Exception as exc:  # network, offline mode, missing repo: all end the same way
            log.debug("download of %s failed", asset.repo_id, exc_info=True)
            raise MissingWeightsError(_missing_message(asset, target, reason=str(exc).splitlines()[0])) from exc
        if asset.is_present(models_dir):
            return target
    raise MissingWeightsError(_missing_message(asset, target))


def _missing_message(asset: Asset, target: Path, reason: str = "") -> str:
    what = "folder" if asset.is_dir else "file"
    files = f" with {', '.join(asset.required or asset.repo_files)}" if asset.is_dir else ""
    msg = f"Missing model {what} {target}{files}. Download it from {asset.source()} and put it there"
    msg += ", or give the path of a local copy (--weights on the command line)."
    if reason:
        msg += f" (automatic download failed: {reason})"
    return msg


def _download(asset: Asset, target: Path) -> None:
    """Download through huggingface_hub: cached, resumable, honours HF_HUB_OFFLINE and HF_ENDPOINT."""
    from huggingface_hub import hf_hub_download

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("HF_HUB_OFFLINE is set")
    folder = target if asset.is_dir else target.parent
    folder.mkdir(parents=True, exist_ok=True)
    for name in asset.repo_files:
        log.info("Downloading %s from %s", name, asset.repo_id)
        try:
            fetched = Path(hf_hub_download(asset.repo_id, name, local_dir=str(folder)))
        except Exception:
            if asset.is_dir and name not in (asset.required or asset.repo_files):
                continue  # optional extra file of a folder
            raise
        wanted = target / name if asset.is_dir else target
        if fetched.resolve() != wanted.resolve():
            wanted.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(fetched), str(wanted))


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


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write atomically: a half-written weights file would look valid on the next start."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def deduplicate_shared(state_dict: Mapping[str, torch.Tensor], drop: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop keys in ``drop`` whose tensor shares storage with another kept key (safetensors refuses them)."""
    kept = {k: v for k, v in state_dict.items() if k not in drop}
    pointers = {v.untyped_storage().data_ptr() for v in kept.values()}
    for key in drop:
        if key in state_dict and state_dict[key].untyped_storage().data_ptr() not in pointers:
            kept[key] = state_dict[key].clone()
    return kept
