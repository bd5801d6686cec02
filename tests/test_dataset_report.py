"""The dataset report on a crafted run: known captions, scores, token counts and embeddings, no model."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys

import pytest
import torch
from PIL import Image, JpegImagePlugin

from captioners.judging import dataset_report as report
from captioners.judging.dataset_report import (
    ReportRecord,
    dataset_numbers,
    exact_duplicate_groups,
    near_duplicate_pairs,
    plot_pngs,
    render_html,
    top_terms,
)

SCRIPT_CAPTION = "<script>alert(1)</script> a house"
LONG_CAPTION = "a very long caption " * 20


@pytest.fixture()
def run(tmp_path) -> list[ReportRecord]:
    """Nine images: real PNG/JPEG files, one missing path, one corrupt file, with known results."""
    for name, color in (("img0.png", "red"), ("img2.png", "green"), ("img3.png", "blue"), ("img8.png", "white")):
        Image.new("RGB", (40, 30), color).save(tmp_path / name)
    Image.new("RGB", (600, 300), "yellow").save(tmp_path / "img1.jpg", quality=90)
    Image.new("RGB", (300, 600), "purple").save(tmp_path / "img4.jpg", quality=90)
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(tmp_path / "img7.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    path = str
    return [
        ReportRecord(path(tmp_path / "img0.png"), ["A dog runs."], [0.8], [], 4),
        ReportRecord(path(tmp_path / "img1.jpg"), ["a dog runs"], [0.82], [], 4),
        ReportRecord(path(tmp_path / "img2.png"), ["a red car parked by the sea"], [1.2], [], 7),
        ReportRecord(path(tmp_path / "img3.png"), ["a red car parked near the sea"], [1.15], [], 75),
        ReportRecord(path(tmp_path / "img4.jpg"), ["cat cat cat cat cat cat"], [0.35], ["repetition", "low_score"], 8),
        ReportRecord(path(tmp_path / "missing.png"), [SCRIPT_CAPTION], [0.2], ["low_score"], 12),
        ReportRecord(path(tmp_path / "corrupt.jpg"), [LONG_CAPTION], [None], ["over_budget"], 80),
        ReportRecord(path(tmp_path / "img7.png"), ["a tree in a field", "a green tree"], [0.95, 0.7], [], 5),
        ReportRecord(path(tmp_path / "img8.png"), [""], [], ["empty"], 0),
    ]


def crafted_features(count: int = 9) -> torch.Tensor:
    """Unit vectors: records 0 and 1 identical (the exact pair), 2 and 3 at cosine 0.97, others orthogonal."""
    features = torch.zeros(count, 16)
    for row in range(count):
        features[row, row] = 1.0
    features[1] = features[0]
    features[3] = 0.97 * features[2] + math.sqrt(1 - 0.97**2) * features[3]
    return torch.nn.functional.normalize(features, dim=1)


def test_exact_duplicate_groups(run):
    assert exact_duplicate_groups(run) == [[0, 1]]
    more = run + [ReportRecord("x.png", ["  A   DOG, runs!"], [], [], 3), ReportRecord("y.png", [], [], [], None)]
    assert exact_duplicate_groups(more) == [[0, 1, 9]]  # the record without captions is no duplicate
    assert exact_duplicate_groups(run[2:]) == []


def test_near_duplicate_pairs(run):
    features = crafted_features()
    groups = exact_duplicate_groups(run)
    pairs = near_duplicate_pairs(features, 0.95, exclude_exact=groups)
    assert [(i, j) for i, j, _ in pairs] == [(2, 3)]
    assert pairs[0][2] == pytest.approx(0.97, abs=1e-6)
    assert near_duplicate_pairs(features, 0.98, exclude_exact=groups) == []
    # Without the exact groups the identical pair is found too, first (cosine 1).
    assert [(i, j) for i, j, _ in near_duplicate_pairs(features, 0.95)] == [(0, 1), (2, 3)]
    assert near_duplicate_pairs(None) == []
    assert near_duplicate_pairs(features[:1]) == []
    with pytest.raises(ValueError):
        near_duplicate_pairs(torch.ones(4))


def brute_force_pairs(features: torch.Tensor, threshold: float, groups) -> list[tuple[int, int]]:
    """The full N x N matrix, for comparison with the block computation."""
    sims = features @ features.T
    group_of = {index: g for g, group in enumerate(groups) for index in group}
    found = []
    n = features.shape[0]
    for i, j in torch.nonzero(torch.triu(sims >= threshold, diagonal=1)).tolist():
        if i in group_of and group_of.get(j) == group_of[i]:
            continue
        found.append((-float(sims[i, j]), i, j))
    assert all(i < j < n for _, i, j in found)
    return [(i, j) for _, i, j in sorted(found)]


def test_near_duplicate_pairs_in_blocks_equals_brute_force():
    generator = torch.Generator().manual_seed(7)
    features = torch.nn.functional.normalize(torch.randn(2500, 64, generator=generator), dim=1)
    # Planted near copies inside one block, across blocks (0 / 1024 / 2048) and one exact group.
    for k, (i, j) in enumerate([(3, 4), (10, 1500), (20, 2400), (1030, 2100), (2050, 2499), (500, 1023)]):
        noise = torch.randn(64, generator=generator)
        features[j] = torch.nn.functional.normalize(features[i] + (0.05 + 0.03 * k) * noise / noise.norm(), dim=0)
    features[77] = features[2222]
    groups = [[77, 2222], [5, 6]]
    expected = brute_force_pairs(features, 0.9, groups)
    pairs = near_duplicate_pairs(features, 0.9, exclude_exact=groups)
    assert [(i, j) for i, j, _ in pairs] == expected
    assert len(expected) == 6 and (77, 2222) not in expected
    cosines = [cos for _, _, cos in pairs]
    assert cosines == sorted(cosines, reverse=True)
    for i, j, cos in pairs:
        assert cos == pytest.approx(float(features[i] @ features[j]), abs=1e-5)
    assert [(i, j) for i, j, _ in near_duplicate_pairs(features, 0.9)] == brute_force_pairs(features, 0.9, [])


def test_near_duplicate_pairs_keeps_the_best_1000():
    """1200 planted pairs with cosines 3e-5 apart: exactly the 1000 highest come back, in order."""
    generator = torch.Generator().manual_seed(3)
    dim, planted = 64, 1200
    base = torch.nn.functional.normalize(torch.randn(planted, dim, generator=generator), dim=1)
    other = torch.randn(planted, dim, generator=generator)
    other = torch.nn.functional.normalize(other - (other * base).sum(1, keepdim=True) * base, dim=1)
    cos = 0.96 + 0.00003 * torch.arange(planted, dtype=torch.float32)
    partner = cos.unsqueeze(1) * base + torch.sqrt(1 - cos**2).unsqueeze(1) * other
    features = torch.cat((base, partner))  # pair k is (k, 1200 + k)
    pairs = near_duplicate_pairs(features, 0.95)
    assert len(pairs) == 1000
    assert [(i, j) for i, j, _ in pairs] == [(k, planted + k) for k in range(planted - 1, planted - 1001, -1)]


def test_top_terms_words_and_tags():
    words = ["A dog runs on the beach.", "a dog sleeps", "The cat and the dog, at home"]
    assert top_terms(words) == [("dog", 3), ("beach", 1), ("cat", 1), ("home", 1), ("runs", 1), ("sleeps", 1)]
    assert top_terms(words, limit=2) == [("dog", 3), ("beach", 1)]
    tags = ["1girl, solo, long hair, smile", "1girl, solo,  Short hair", "1boy, solo, smile"]
    assert top_terms(tags) == [
        ("solo", 3),
        ("1girl", 2),
        ("smile", 2),
        ("1boy", 1),
        ("long hair", 1),
        ("short hair", 1),
    ]
    # Fewer than two commas on average: words, not tags.
    assert top_terms(["red car, blue sky", "red car"]) == [("car", 2), ("red", 2), ("blue", 1), ("sky", 1)]
    assert top_terms([]) == []


def test_dataset_numbers(run):
    near = near_duplicate_pairs(crafted_features(), 0.95, exclude_exact=exact_duplicate_groups(run))
    numbers = dataset_numbers(run, near_pairs=near)
    json.dumps(numbers)  # JSON-able as it is
    assert numbers["images"] == 9
    assert numbers["captions"] == 10
    tokens = numbers["tokens"]
    histogram = [[5 * k, 5 * k + 5, 0] for k in range(17)]
    for k, n in ((0, 3), (1, 3), (2, 1), (15, 1), (16, 1)):  # 0,4,4 | 5,7,8 | 12 | 75 | 80
        histogram[k][2] = n
    assert tokens["histogram"] == histogram
    assert (tokens["count"], tokens["mean"], tokens["median"], tokens["max"]) == (9, 21.6667, 7, 80)
    assert tokens["over_75"] == 1  # 75 fits, 80 does not
    scores = numbers["scores"]
    assert scores["count"] == 7  # first captions only: corrupt.jpg and img8.png are not scored
    assert scores["mean"] == 0.7814  # 5.47 / 7
    assert (scores["median"], scores["min"], scores["max"], scores["p5"]) == (0.82, 0.2, 1.2, 0.245)
    assert len(scores["histogram"]) == 25
    assert scores["histogram"][0] == [0.0, 0.1, 0] and scores["histogram"][-1] == [2.4, 2.5, 0]
    counts = {k: n for k, (_, _, n) in enumerate(scores["histogram"]) if n}
    assert counts == {2: 1, 3: 1, 8: 2, 9: 1, 11: 1, 12: 1}  # 0.2 | 0.35 | 0.8 0.82 | 0.95 | 1.15 | 1.2
    assert numbers["top_terms"] == [
        ["caption", 20], ["long", 20], ["cat", 6], ["car", 2], ["dog", 2], ["parked", 2], ["red", 2], ["runs", 2],
        ["script", 2], ["sea", 2], ["1", 1], ["alert", 1], ["field", 1], ["house", 1], ["tree", 1],
    ]  # fmt: skip
    assert numbers["top_terms_kind"] == "words"
    assert numbers["exact_duplicates"] == [[run[0].image, run[1].image]]
    assert numbers["near_duplicates"] == [[run[2].image, run[3].image, 0.97]]
    assert numbers["flags"] == {
        "empty": 1,
        "short": 0,
        "repetition": 1,
        "over_budget": 1,
        "over_t5_budget": 0,
        "low_score": 2,
    }
    assert numbers["flagged"] == [
        {
            "image": run[4].image,
            "caption": "cat cat cat cat cat cat",
            "score": 0.35,
            "flags": ["repetition", "low_score"],
        },
        {"image": run[5].image, "caption": SCRIPT_CAPTION, "score": 0.2, "flags": ["low_score"]},
        {"image": run[6].image, "caption": LONG_CAPTION, "score": None, "flags": ["over_budget"]},
        {"image": run[8].image, "caption": "", "score": None, "flags": ["empty"]},
    ]


def test_dataset_numbers_without_scores_or_tokens():
    records = [ReportRecord("a.png", ["x"], [None], [], None), ReportRecord("b.png", ["y"], [], [], None)]
    numbers = dataset_numbers(records)
    assert numbers["scores"] is None
    assert numbers["tokens"] == {"count": 0, "histogram": [], "mean": None, "median": None, "max": None, "over_75": 0}
    assert numbers["flagged"] == [] and numbers["exact_duplicates"] == [] and numbers["near_duplicates"] == []
    assert set(numbers["flags"].values()) == {0}


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def test_plot_pngs(run):
    pytest.importorskip("matplotlib")
    plots = plot_pngs(dataset_numbers(run))
    assert sorted(plots) == ["scores", "tokens"]
    for data in plots.values():
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert png_size(data) == (640, 280)
        assert b"Software" not in data and b"matplotlib.org" not in data  # no text chunk naming a URL
    unscored = [ReportRecord(r.image, r.captions, [], r.flags, r.tokens) for r in run]
    assert sorted(plot_pngs(dataset_numbers(unscored))) == ["tokens"]


def test_plot_pngs_without_matplotlib(run, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("INFO", logger=report.__name__):
        assert plot_pngs(dataset_numbers(run)) == {}
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "install the package matplotlib" in caplog.records[0].getMessage()


def data_uris(page: str, kind: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'src="data:image/{kind};base64,([A-Za-z0-9+/=]+)"', page)]


def check_common_html(page: str, run: list[ReportRecord]) -> None:
    """What the page shows with or without plots."""
    assert page.startswith("<!DOCTYPE html>")
    for heading in (
        "<h1>Captioning report</h1>",
        "<h2>Caption length (CLIP tokens)</h2>",
        "<h2>Top terms</h2>",
        "<h2>Exact duplicates</h2>",
        "<h2>Near duplicates</h2>",
        "<h2>CLIPScore distribution</h2>",
        "<h2>Flagged captions</h2>",
    ):
        assert page.count(heading) == 1, heading
    for count, label in ((9, "images"), (10, "captions"), (4, "flagged"), (1, "over 75 tokens")):
        assert f"<li><b>{count}</b>{label}</li>" in page
    assert "<li><b>1</b>exact duplicate groups</li>" in page
    assert "<li><b>1</b>near-duplicate pairs</li>" in page
    assert "<li><b>7</b>scored</li>" in page
    assert "<li><b>0.781</b>mean CLIPScore</li>" in page
    # The histogram tables, readable without plots.
    assert '<td>0&ndash;4</td><td class="num">3</td>' in page
    assert '<td>75&ndash;79</td><td class="num">1</td>' in page
    assert '<td>0.8&ndash;0.9</td><td class="num">2</td>' in page
    assert "<td>0.245</td>" in page  # p5
    assert '<td>caption</td><td class="num">20</td>' in page
    # Duplicates: paths and captions.
    assert run[0].image in page and run[1].image in page
    assert "A dog runs." in page and "a red car parked near the sea" in page and '<td class="num">0.970</td>' in page
    # Escaping: the script is shown, never run.
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a house" in page
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page
    assert "empty: 1, short: 0, repetition: 1, over_budget: 1, over_t5_budget: 0, low_score: 2" in page


def test_render_html(run):
    pytest.importorskip("matplotlib")
    near = near_duplicate_pairs(crafted_features(), 0.95, exclude_exact=exact_duplicate_groups(run))
    numbers = dataset_numbers(run, near_pairs=near)
    page = render_html(numbers, run)
    check_common_html(page, run)
    pngs = data_uris(page, "png")
    assert len(pngs) == 2 and all(png.startswith(b"\x89PNG") for png in pngs)
    # Thumbnails of the flagged images that can be read (img4.jpg, img8.png); the others get "no preview".
    jpegs = data_uris(page, "jpeg")
    assert len(jpegs) == 2
    sizes = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as thumb:
            assert thumb.format == "JPEG" and thumb.mode == "RGB"
            sizes.append(thumb.size)
    assert sizes == [(64, 128), (40, 30)]
    assert page.count("no preview") == 2
    rows = re.findall(r"<tr>(.*?)</tr>", page.split("<h2>Flagged captions</h2>")[1])
    assert len(rows) == 1 + 4  # header and the four flagged images
    assert "no preview" in rows[2] and "missing.png" in rows[2] and "no preview" in rows[3] and "corrupt.jpg" in rows[3]


def test_render_html_without_matplotlib(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    near = near_duplicate_pairs(crafted_features(), 0.95, exclude_exact=exact_duplicate_groups(run))
    page = render_html(dataset_numbers(run, near_pairs=near), run)
    check_common_html(page, run)
    assert "data:image/png" not in page
    assert len(data_uris(page, "jpeg")) == 2


def test_render_html_options(run):
    numbers = dataset_numbers(run)
    page = render_html(numbers, run, title="My <LoRA> set", thumbnails=False, max_flagged=2)
    assert "<h1>My &lt;LoRA&gt; set</h1>" in page and "<title>My &lt;LoRA&gt; set</title>" in page
    assert "data:image/jpeg" not in page and "no preview" not in page
    assert "Showing the first 2 of 4 flagged captions" in page
    assert "No near-duplicate pairs" in page
    rows = re.findall(r"<tr>(.*?)</tr>", page.split("<h2>Flagged captions</h2>")[1])
    assert len(rows) == 1 + 2


def test_render_html_nothing_scored():
    records = [ReportRecord("<b>a.png", ["x & y"], [None], ["short"], None)]
    page = render_html(dataset_numbers(records), records, thumbnails=True)
    assert "No caption was scored." in page and "No caption was counted." in page
    assert "&lt;b&gt;a.png" in page and "x &amp; y" in page and "<b>a.png" not in page
    assert "data:image/png" not in page and page.count("no preview") == 1


def thumbnail(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    image.load()
    return image


def test_thumbnails(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(photo, quality=95)
    small = thumbnail(report.thumbnail_data_uri(str(photo)))
    assert (small.format, small.mode, small.size) == ("JPEG", "RGB", (128, 96))
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (300, 200), (0, 0, 0, 0)).save(clear)
    small = thumbnail(report.thumbnail_data_uri(str(clear)))
    assert small.size == (128, 85) and min(small.getpixel((60, 40))) >= 250  # transparent becomes white
    # A palette image of 1-pixel black and white stripes: resized as RGB it averages to grey; resized
    # as a palette (nearest neighbour) it would come out all black or all white.
    stripes = Image.new("L", (64, 256))
    for x in range(0, 64, 2):
        stripes.paste(255, (x, 0, x + 1, 256))
    palette = tmp_path / "palette.gif"
    stripes.convert("RGB").convert("P").save(palette)
    small = thumbnail(report.thumbnail_data_uri(str(palette)))
    assert small.size == (32, 128) and 100 < small.getpixel((10, 60))[0] < 155


def test_thumbnails_of_jpegs_are_decoded_small(tmp_path, monkeypatch):
    """draft() lets the JPEG decoder skip detail: a big photo costs a fraction of its full decode."""
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (90, 90, 200)).save(photo, quality=90)
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append((mode, size))
        result = original(self, mode, size)
        calls.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    assert thumbnail(report.thumbnail_data_uri(str(photo))).size == (128, 96)
    assert calls[:2] == [("RGB", (256, 256)), (500, 375)]  # decoded at 1/8 scale


def test_thumbnail_refuses_huge_images(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("1", (400, 300)).save(path)
    assert report.thumbnail_data_uri(str(path)).startswith("data:image/jpeg;base64,")
    monkeypatch.setattr(report, "THUMBNAIL_MAX_PIXELS", 400 * 300 - 1)
    assert report.thumbnail_data_uri(str(path)) is None
    assert report.thumbnail_data_uri(str(tmp_path)) is None  # a folder: no preview, no exception
    assert report.THUMBNAIL_MAX_PIXELS == 400 * 300 - 1
    monkeypatch.undo()
    assert report.THUMBNAIL_MAX_PIXELS == 64_000_000
