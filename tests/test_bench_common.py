"""bench/common.py: the image encoder's FLOP count, the matmul shape it is compared with, CSV rows."""

from __future__ import annotations

import csv

import pytest
import torch

from captioners.vit_encoder import OwnViTForward
from bench.common import CSV_COLUMNS, append_rows, count_flops, encoder_figures, environment, largest_linear


def tiny_vit():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0,
                             output_dim=16).eval()


def hand_count(batch: int, tokens: int = 17, width: int = 32, layers: int = 2, out: int = 16,
               class_token_last: bool = False) -> int:
    """2 FLOPs per multiply-add: patch conv, then per layer qkv, QK^T, AV, out proj, MLP; then proj.
    ``class_token_last``: the last layer as our forward does it (keys and values of every token,
    the rest for the class token alone)."""
    t, d = tokens, width
    patches = 2 * 16 * d * 3 * 8 * 8
    layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d
    last = 2 * t * d * 2 * d + 2 * d * d + 2 * 2 * t * d + 2 * d * d + 2 * 2 * d * 4 * d
    blocks = (layers - 1) * layer + last if class_token_last else layers * layer
    return batch * (patches + blocks + 2 * d * out)


def test_flops_of_a_tiny_vit_match_a_hand_count():
    model = tiny_vit()
    pixels = torch.randn(3, 3, 32, 32)
    assert count_flops(lambda: model(pixels)) == hand_count(3)
    assert count_flops(lambda: OwnViTForward(model)(pixels)) == hand_count(3, class_token_last=True)


def test_flop_count_leaves_attention_fast_path_as_it_was():
    before = torch.backends.mha.get_fastpath_enabled()
    model = tiny_vit()
    count_flops(lambda: model(torch.randn(1, 3, 32, 32)))
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_largest_linear_is_the_mlp_of_every_token():
    model = tiny_vit()
    pixels = torch.randn(3, 3, 32, 32)
    assert largest_linear(lambda: model(pixels)) == (3 * 17, 32, 128)
    assert largest_linear(lambda: OwnViTForward(model)(pixels)) == (3 * 17, 32, 128)  # addmm, not nn.Linear


def test_encoder_figures_are_consistent():
    model = tiny_vit()
    figures = encoder_figures("tiny", model, torch.randn(4, 3, 32, 32), repeats=1)
    assert figures.batch == 4 and figures.gflop_per_image == pytest.approx(hand_count(1) / 1e9)
    assert figures.gflops > 0 and figures.matmul_gflops > 0
    assert figures.ratio == pytest.approx(figures.gflops / figures.matmul_gflops)
    assert set(figures.columns()) <= set(CSV_COLUMNS) and "encoder / matmul" in figures.line()


def test_rows_are_appended_under_one_header(tmp_path):
    row = {**environment("cpu", torch.float32), "batch": 8, "images": 16, "measure": "engine",
           "images_per_s": 1.5}
    path = append_rows("bench_x", [row], tmp_path)
    append_rows("bench_x", [{**row, "measure": "loop"}], tmp_path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert [r["measure"] for r in rows] == ["engine", "loop"]
    assert rows[0]["bench"] == "bench_x" and rows[0]["torch"] == torch.__version__
    assert rows[0]["dtype"] == "float32" and rows[0]["device"] == "cpu" and rows[0]["machine"]


def test_rows_refuse_unknown_columns_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="not result columns: speed"):
        append_rows("bench_x", [{"speed": 1}], tmp_path)
    (tmp_path / "bench_y.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="move it away"):
        append_rows("bench_y", [{"images": 1}], tmp_path)
    assert append_rows("bench_x", [{"images": 1}], None) is None


def test_bench_encoder_counts_every_linear_layer_of_both_forwards():
    """bench_encoder.py's linear-layer FLOPs against a hand count (qkv, out proj, MLP per token; the
    final projection of the class token), for open_clip's forward and ours."""
    from bench.bench_encoder import linear_flops

    model = tiny_vit()
    pixels = torch.randn(3, 3, 32, 32)
    t, d = 17, 32
    assert linear_flops(lambda: model(pixels)) == 3 * (2 * 2 * t * (4 * d * d + 8 * d * d) + 2 * d * 16)
    last = 2 * t * 2 * d * d + 2 * (2 * d * d + 8 * d * d)
    assert linear_flops(lambda: OwnViTForward(model)(pixels)) == 3 * (2 * t * 12 * d * d + last + 2 * d * 16)
