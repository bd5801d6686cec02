"""captioners.torch_archive: tensors out of TorchScript / torch.save zips, never running their code.

No ``from __future__ import annotations`` here: TorchScript compiles the module classes below from
this file's source and needs real annotations.
"""

import collections
import io
import logging
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Tuple

import pytest
import torch

from captioners.errors import CaptionerError, UnsafeCheckpointError
from captioners.torch_archive import is_torchscript, read_tensor_shapes, read_torchscript_tensors


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.act = torch.nn.ReLU()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.act(x))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("mask", torch.tensor([1.0, 0.5, 2.0], dtype=torch.float16))
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(self.lin(x) * self.mask.float())


class _Evil(torch.nn.Module):
    """Its scripted __setstate__ writes "AAAA" to ``marker`` whenever torch.jit.load restores it."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        written = torch.from_file(state[0], shared=True, size=4, dtype=torch.uint8).fill_(65)
        self.weight = state[1] + written.sum().float() * 0.0  # used, so TorchScript keeps the write
        self.training = state[2]

    def forward(self, x):
        return x * self.weight


class _EvilParent(torch.nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.evil = _Evil(marker)

    def forward(self, x):
        return self.evil(self.lin(x))


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def _rewrite_zip(src: Path, dst: Path, replace: dict) -> Path:
    """Copy a zip, replacing (bytes) or dropping (None) the members named in ``replace``."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            data = replace.get(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    return dst


def _write_archive(path: Path, data_pkl: bytes, storages: dict = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
        archive.writestr("archive/version", "3\n")
    return path


class _StorageRef:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _TensorSpec:
    """Pickles as torch does (_rebuild_tensor_v2 of a persistent storage), with any offset/size/stride."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    _ArchivePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _calling_pickle(module: str, name: str, argument: str) -> bytes:
    """A pickle that calls ``module.name(argument)`` when loaded by a plain unpickler."""
    arg = argument.encode()
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(arg)) + arg + b"\x85R."


@pytest.fixture()
def scripted(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_Net()), str(path))
    return path


@pytest.fixture()
def plain(tmp_path) -> Path:
    path = tmp_path / "plain.pt"
    torch.save({"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(2, dtype=torch.float16)}, path)
    return path


def test_scripted_module_matches_jit_load(scripted):
    assert is_torchscript(scripted)
    want = torch.jit.load(str(scripted)).state_dict()
    assert {"lin.weight", "lin.bias", "mask", "inner.lin.weight", "inner.lin.bias"} <= set(want)
    assert want["mask"].dtype == torch.float16
    _assert_same_tensors(read_torchscript_tensors(scripted), dict(want))


def test_traced_module_matches_jit_load(tmp_path):
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(_Net(), torch.zeros(1, 4)), str(path))
    assert is_torchscript(path)
    _assert_same_tensors(read_torchscript_tensors(path), dict(torch.jit.load(str(path)).state_dict()))
    assert read_tensor_shapes(path)["inner.lin.weight"] == (2, 3)


def test_is_torchscript_is_false_for_other_files(plain, tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    assert not is_torchscript(plain)
    assert not is_torchscript(tmp_path / "text.pt")
    assert not is_torchscript(tmp_path / "missing.pt")


def test_evil_setstate_never_runs(tmp_path, caplog):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(_EvilParent(str(marker))), str(path))
    assert not marker.exists()
    # The test is live: torch.jit.load really runs the archive's __setstate__ and writes the file.
    subprocess.run([sys.executable, "-W", "ignore", "-c", "import sys, torch; torch.jit.load(sys.argv[1])",
                    str(path)], check=True, timeout=300)
    assert marker.read_bytes() == b"AAAA"
    marker.unlink()

    with caplog.at_level(logging.WARNING, logger="captioners.torch_archive"):
        tensors = read_torchscript_tensors(path)
        shapes = read_tensor_shapes(path)
    assert not marker.exists()
    # Chosen behaviour: the sibling's tensors are returned; the custom-state module's are left out.
    assert set(tensors) == {"lin.weight", "lin.bias"} and shapes == {"lin.weight": (2, 2), "lin.bias": (2,)}
    assert "evil" in caplog.text and "custom state" in caplog.text


@pytest.mark.parametrize("module,name,command", [
    ("os", "system", "touch {marker}"),
    ("posix", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w').close()"),
], ids=["os.system", "posix.system", "builtins.eval"])
def test_crafted_globals_are_refused(tmp_path, module, name, command):
    marker = str(tmp_path / "marker")
    payload = _calling_pickle(module, name, command.format(marker=marker))
    # Live: an ordinary unpickler would run it.
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(bytes.fromhex(sys.argv[1]))",
                    payload.hex()], check=True, timeout=60)
    assert Path(marker).exists()
    Path(marker).unlink()

    path = _write_archive(tmp_path / "crafted.pt", payload)
    for read in (read_torchscript_tensors, read_tensor_shapes):
        with pytest.raises(UnsafeCheckpointError, match=f"crafted.pt.*{module}.{name}"):
            read(path)
    assert not Path(marker).exists()


def test_global_hidden_in_a_record_is_refused(tmp_path):
    # A __torch__ record whose state calls os.system: the record itself is inert, the call is refused.
    payload = b"\x80\x02c__torch__\nM\n)\x81" + _calling_pickle("os", "system", "true")[2:-1] + b"b."
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        read_torchscript_tensors(_write_archive(tmp_path / "hidden.pt", payload))


def test_truncated_zip(scripted, tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(scripted.read_bytes()[: scripted.stat().st_size // 2])
    for read in (read_torchscript_tensors, read_tensor_shapes):
        with pytest.raises(CaptionerError, match="truncated.pt"):
            read(path)


def test_storage_member_shorter_than_declared(plain, tmp_path):
    with zipfile.ZipFile(plain) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data/0"))
        short = archive.read(name)[:-4]
    path = _rewrite_zip(plain, tmp_path / "short.pt", {name: short})
    for read in (read_torchscript_tensors, read_tensor_shapes):
        with pytest.raises(CaptionerError, match="short.pt.*data/0"):
            read(path)


@pytest.mark.parametrize("offset,size,stride", [(5, (3, 4), (4, 1)), (0, (4, 4), (4, 1)), (13, (0,), (1,)),
                                                (0, (3,), (1, 1)), (-1, (2,), (1,))])
def test_views_outside_their_storage(tmp_path, offset, size, stride):
    data_pkl = _pickled({"w": _TensorSpec(_StorageRef("0", 12), offset, size, stride)})
    path = _write_archive(tmp_path / "outside.pt", data_pkl, {"0": bytes(48)})
    for read in (read_torchscript_tensors, read_tensor_shapes):
        with pytest.raises(CaptionerError, match="outside.pt.*does not fit"):
            read(path)


def test_crafted_views_that_fit(tmp_path):
    raw = torch.arange(12.0).numpy().tobytes()
    data_pkl = _pickled({"w": _TensorSpec(_StorageRef("0", 12), 1, (3, 3), (4, 1)),
                         "e": _TensorSpec(_StorageRef("0", 12), 12, (0, 5), (5, 1))})
    tensors = read_torchscript_tensors(_write_archive(tmp_path / "fits.pt", data_pkl, {"0": raw}))
    assert torch.equal(tensors["w"], torch.arange(12.0).reshape(3, 4)[:, 1:])
    assert tensors["e"].shape == (0, 5)


@pytest.mark.parametrize("content,match", [
    (b"this is not a zip file", "notzip.pt"),
    (b"PK\x03\x04 garbage", "notzip.pt"),
], ids=["text", "zip-magic-garbage"])
def test_not_a_zip(tmp_path, content, match):
    path = tmp_path / "notzip.pt"
    path.write_bytes(content)
    for read in (read_torchscript_tensors, read_tensor_shapes):
        with pytest.raises(CaptionerError, match=match):
            read(path)


def test_zip_without_data_pkl_and_missing_file(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("x/readme.txt", "hi")
    with pytest.raises(CaptionerError, match="other.zip.*no data.pkl"):
        read_torchscript_tensors(tmp_path / "other.zip")
    with pytest.raises(CaptionerError, match="missing.pt"):
        read_tensor_shapes(tmp_path / "missing.pt")


@pytest.mark.parametrize("data_pkl", [
    b"\x80\x02}q\x00X\x01\x00\x00\x00a",  # cut short
    b"\x80\x02\xff\xfe.",  # unknown opcode
    b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.",  # a dict that contains itself
    b"\x80\x02" + b"}X\x01\x00\x00\x00a" * 100_000 + b"}" + b"s" * 100_000 + b".",  # nested past the recursion limit
    b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ\xff\xff\xff\x7ftQ.",
], ids=["cut-short", "bad-opcode", "self-containing", "too-deep", "missing-storage"])
def test_corrupt_pickles_are_captioner_errors(tmp_path, data_pkl):
    path = _write_archive(tmp_path / "corrupt.pt", data_pkl)
    try:
        result = read_torchscript_tensors(path)
    except CaptionerError as exc:
        assert "corrupt.pt" in str(exc) and "\n" not in str(exc)
    else:
        assert result == {}  # the self-containing dict: read, nothing named, no endless walk


def test_big_endian_archive_is_refused(plain, tmp_path):
    with zipfile.ZipFile(plain) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/byteorder"))
    path = _rewrite_zip(plain, tmp_path / "big.pt", {name: b"big"})
    with pytest.raises(CaptionerError, match="big.pt.*little-endian"):
        read_torchscript_tensors(path)


def _spy_on_members(monkeypatch) -> list:
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)  # ZipFile.read goes through open too
    return opened


def test_shapes_of_a_plain_state_dict_read_no_storage(plain, monkeypatch):
    opened = _spy_on_members(monkeypatch)
    assert read_tensor_shapes(plain) == {"a.weight": (3, 4), "b.bias": (2,)}
    assert opened and not [name for name in opened if "/data/" in name]
    assert any(name.endswith("/data.pkl") for name in opened)


def test_shapes_of_a_wrapped_state_dict(tmp_path, monkeypatch):
    path = tmp_path / "wrapped.pt"
    state = collections.OrderedDict([("enc.weight", torch.zeros(7, 5)), ("enc.bias", torch.zeros(7))])
    torch.save({"state_dict": state, "epoch": 3}, path)
    opened = _spy_on_members(monkeypatch)
    assert read_tensor_shapes(path) == {"enc.weight": (7, 5), "enc.bias": (7,)}
    assert not [name for name in opened if "/data/" in name]


def test_shapes_of_a_torchscript_archive(scripted, monkeypatch):
    want = {name: tuple(t.shape) for name, t in torch.jit.load(str(scripted)).state_dict().items()}
    opened = _spy_on_members(monkeypatch)
    assert read_tensor_shapes(scripted) == want
    assert not [name for name in opened if "/data/" in name]


def test_plain_torch_save_tensors_and_parameters(tmp_path):
    path = tmp_path / "params.pt"
    state = {"p": torch.nn.Parameter(torch.randn(2, 3)), "ints": torch.arange(4), "flags": torch.tensor([True, False])}
    torch.save(state, path)
    _assert_same_tensors(read_torchscript_tensors(path), {k: v.detach() for k, v in state.items()})


def test_legacy_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CaptionerError, match="legacy.pt.*legacy"):
        read_tensor_shapes(path)


def test_a_memo_bomb_in_data_pkl_is_a_clear_error_not_gigabytes(tmp_path):
    """``LONG_BINPUT 2**32-1`` makes the C unpickler grow its memo to 2**33 entries (64 GB)."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bomb/data.pkl", b"\x80\x02}r\xff\xff\xff\xff.")
        archive.writestr("bomb/constants.pkl", b"\x80\x02).")
    assert read_torchscript_tensors(path) == {}
