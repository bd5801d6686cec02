"""Files that are not what they claim to be: one clear line and exit 2, never a traceback."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from captioners import cli
from captioners.base import Captioner
from captioners.errors import CaptionerError
from captioners.weights import load_plain_pickle, load_state_dict


def safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"gpt.transformer.wte.weight": torch.zeros(4, 4)})


def header(entries: dict) -> bytes:
    data = json.dumps(entries).encode()
    return struct.pack("<Q", len(data)) + data


BAD_SAFETENSORS = {
    "empty": lambda: b"",
    "truncated": lambda: safetensors_bytes()[:-10],
    "absurd header length": lambda: struct.pack("<Q", 2**62) + b"{}",
    "header is not JSON": lambda: struct.pack("<Q", 5) + b"hello" + bytes(8),
    "data shorter than declared": lambda: header(
        {"a": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}) + bytes(100),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_malformed_safetensors_is_one_clear_error(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_SAFETENSORS[case]())
    with pytest.raises(CaptionerError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and len(message.splitlines()) == 1 and not message.endswith("()")


def truncated_zip(tmp_path: Path) -> bytes:
    torch.save({"a": torch.zeros(100)}, tmp_path / "whole.pt")
    return (tmp_path / "whole.pt").read_bytes()[:300]


BAD_PT = {
    "text file": lambda tmp: b"hello, this is a text file\n",
    "empty file": lambda tmp: b"",
    "JSON file": lambda tmp: b'{"a": 1}',
    "HTML error page": lambda tmp: b"<!DOCTYPE html><html>404</html>",
    "truncated zip": truncated_zip,
    "pickle of a number": lambda tmp: pickle.dumps(5, protocol=2),
}


@pytest.mark.parametrize("case", sorted(BAD_PT))
def test_a_pt_that_is_no_checkpoint_is_one_clear_error(tmp_path, case):
    path = tmp_path / "weights.pt"
    path.write_bytes(BAD_PT[case](tmp_path))
    with pytest.raises(CaptionerError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and len(message.splitlines()) == 1
    assert not message.rstrip(".").endswith(":") and "()" not in message  # never an empty reason
    if case == "empty file":
        assert "empty" in message


@pytest.mark.parametrize("command", ["caption", "convert"])
def test_the_command_line_says_it_in_one_line(tmp_path, photos, capsys, tokenizer_dir, tiny_clip, command):
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes, not a checkpoint\n")
    args = ["convert", str(path)] if command == "convert" else [
        "caption", str(photos[0]), "--model", str(path), "--models-dir", str(tmp_path / "models"), "--device", "cpu",
        "--tokenizer", str(tokenizer_dir), "--clip-config", str(tiny_clip[0]), "--clip-weights", str(tiny_clip[1])]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and "not a PyTorch checkpoint" in err


# ---- presets.json -------------------------------------------------------------------------------
BAD_PRESETS = {
    "not UTF-8": b'{"x": {"base": "clipcap-coco", "description": "caf\xe9"}}',
    "deeply nested": b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge number": b'{"x": {"base": "clipcap-coco", "gpt_heads": ' + b"1" * 5000 + b"}}",
    "not an object": b'["clipcap-coco"]',
    "description is a number": b'{"x": {"base": "clipcap-coco", "description": 5}}',
    "normalize is text": b'{"x": {"base": "clipcap-coco", "normalize": "yes"}}',
    "entry is a list": b'{"x": ["clipcap-coco"]}',
    "weights is a list": b'{"x": {"family": "clip-prefix", "weights": ["a.pt"]}}',
    "decoding of wrong type": b'{"x": {"base": "clipcap-coco", "decoding": {"num_beams": "five"}}}',
    "unknown key": b'{"x": {"base": "clipcap-coco", "colour": "red"}}',
}


@pytest.mark.parametrize("case", sorted(BAD_PRESETS))
def test_a_broken_presets_file_breaks_no_command(tmp_path, capsys, caplog, case):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "presets.json").write_bytes(BAD_PRESETS[case])
    assert cli.main(["models", "--models-dir", str(models_dir), "--json"]) == 0
    captured = capsys.readouterr()
    listing = {row["id"]: row for row in json.loads(captured.out)["models"]}
    assert "clipcap-coco" in listing and "x" not in listing
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and all("presets.json" in w and len(w.splitlines()) == 1 and len(w) < 400 for w in warnings)
    assert "Traceback" not in captured.err
    # A command that names the broken preset says it does not exist (the warning says why).
    assert cli.main(["caption", str(tmp_path), "--model", "x", "--models-dir", str(models_dir)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_models_tab_refuses_to_save_into_a_broken_presets_file(tmp_path):
    from captioners.local_paths import save_local_paths
    from captioners.registry import get_spec

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "presets.json").write_bytes(BAD_PRESETS["not UTF-8"])
    before = (models_dir / "presets.json").read_bytes()
    with pytest.raises(CaptionerError, match="not UTF-8.*fix or remove it first"):
        save_local_paths(models_dir, get_spec("clipcap-coco", models_dir), {"weights": str(tmp_path)})
    assert (models_dir / "presets.json").read_bytes() == before


# ---- vocabulary pickles that would allocate huge memory ---------------------------------------------
PICKLE_BOMBS = {
    # EMPTY_LIST, LONG_BINPUT 2**32-1: the C unpickler grows its memo table to 2**33 entries (64 GB).
    "memo index": b"\x80\x02]r\xff\xff\xff\xff.",
    # BINBYTES8 claiming 2**40 bytes: the C unpickler allocates the claimed size before reading.
    "claimed length": b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"xyz.",
    # FRAME claiming 2**40 bytes.
    "frame length": b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"]\x94.",
}


@pytest.mark.parametrize("case", sorted(PICKLE_BOMBS))
def test_a_vocabulary_pickle_cannot_allocate_huge_memory(tmp_path, case):
    path = tmp_path / "all_labels.pkl"
    path.write_bytes(PICKLE_BOMBS[case])
    try:
        data = load_plain_pickle(path)  # before the fix: MemoryError (or gigabytes allocated)
    except CaptionerError as exc:
        assert str(path) in str(exc) and len(str(exc).splitlines()) == 1
    else:
        assert isinstance(data, (list, bytes))


def test_an_oversized_or_nested_vocabulary_is_refused(tmp_path):
    from captioners.families.sbg_keywords import Vocabulary, read_vocabulary_file

    nested = tmp_path / "encyclopedia.pkl"  # {"human": [[[...]]]}, 5000 lists deep (pickle.dumps cannot make it)
    nested.write_bytes(b"\x80\x02}X\x05\x00\x00\x00human" + b"]" * 5000 + b"a" * 4999 + b"s.")
    with pytest.raises(CaptionerError):
        read_vocabulary_file(nested, convert=True)  # before the fix: RecursionError from json.dumps
    with pytest.raises(CaptionerError, match="word list"):
        Vocabulary([("dog", "NOUN", 3)], {**{k: {} for k in ("scenery", "animal", "plant", "object", "activity",
                                                               "weather", "time")}, "human": [[["x"]]]})
    big = tmp_path / "all_labels.pkl"
    with open(big, "wb") as handle:
        handle.truncate(65 * 1024 * 1024)  # sparse: no disk used
    with pytest.raises(CaptionerError, match="too big"):
        load_plain_pickle(big)


# ---- caption checks its inputs before loading the model --------------------------------------------
def test_caption_checks_its_inputs_before_loading_the_model(tmp_path, photos, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("the model was loaded for inputs that cannot be captioned")

    monkeypatch.setattr(Captioner, "load", refuse)
    text = tmp_path / "notes.jpg"
    text.write_text("a text file renamed .jpg")
    (tmp_path / "empty").mkdir()
    for inputs in ([str(tmp_path / "missing.jpg")], [str(text)], [str(tmp_path / "empty")],
                   [str(tmp_path / "missing.png"), str(text)]):
        assert cli.main(["caption", *inputs, "--models-dir", str(tmp_path / "models")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: No images to caption")
        assert ("file not found" in err) == ("missing" in " ".join(inputs))
        assert ("not an image Pillow can read" in err) == (str(text) in inputs)


def test_caption_reports_bad_inputs_and_captions_the_rest(tmp_path, photos, capsys, icg_checkpoint, tokenizer_dir,
                                                          tiny_clip):
    config, weights = tiny_clip
    code = cli.main(["caption", str(tmp_path / "missing.jpg"), str(photos[0]), "--model", str(icg_checkpoint.path),
                     "--clip-config", str(config), "--clip-weights", str(weights), "--tokenizer", str(tokenizer_dir),
                     "--models-dir", str(tmp_path / "models"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out.startswith(f"{photos[0]}\t")
    assert f"error: {tmp_path / 'missing.jpg'}: file not found" in captured.err
