"""The dataset report of a captioning run: numbers for the ``--report`` JSON and one HTML page.

People who build LoRA training sets caption hundreds or thousands of images and then need to see,
in one place, what went wrong before they train: captions too long for CLIP's 75 tokens, the same
caption written for many images (a LoRA then learns that caption, not the images), near copies,
repetitive or low-scoring captions, and which words dominate the set. This module turns one
:class:`ReportRecord` per image into JSON-able numbers (:func:`dataset_numbers`) and into a single
self-contained HTML file (:func:`render_html`) that opens anywhere, offline, without scripts.

Nothing here loads a model: scores, token counts, quality flags and text embeddings are computed by
the caller and handed in, so the report is cheap and can be rebuilt from saved results.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from captioners.display import display_path
from captioners.images import opened, to_rgb

log = logging.getLogger(__name__)

# Quality-gate codes, in the order the report lists them (every one is counted, zeros included).
FLAG_CODES: tuple[str, ...] = ("empty", "short", "repetition", "over_budget", "over_t5_budget", "low_score")

CLIP_TOKEN_LIMIT = 75  # CLIP's 77 positions less the start and end tokens
TOKEN_BIN = 5
SCORE_BIN = 0.1
SCORE_BINS = 25  # 0 to 2.5: CLIPScore = 2.5 * max(cos, 0)

NEAR_BLOCK = 1024  # rows (and columns) of one similarity tile: 4 MiB of float32, whatever N is
NEAR_MAX_PAIRS = 1000

THUMBNAIL_SIDE = 128
THUMBNAIL_DRAFT = (256, 256)
THUMBNAIL_QUALITY = 80
THUMBNAIL_MAX_PIXELS = 64_000_000  # larger images get no preview: decoding them could exhaust memory

# How much of the long lists the HTML shows (the JSON keeps everything).
HTML_MAX_GROUPS = 200
HTML_MAX_GROUP_PATHS = 50
HTML_MAX_NEAR = 300

# Words too common to say anything about a data set; removed from the word counts of top_terms.
# fmt: off
STOP_WORDS: frozenset[str] = frozenset((
    "a", "an", "the", "of", "in", "on", "and", "with", "is", "are", "at", "to", "for", "from", "by", "as", "it",
    "its", "this", "that", "these", "those", "there", "here", "be", "been", "being", "was", "were", "or", "but",
    "into", "onto", "over", "under", "up", "down", "out", "off", "near", "next", "while", "has", "have", "had",
    "his", "her", "their", "them", "they", "he", "she", "him", "we", "you", "your", "our", "my", "me", "i",
    "some", "any", "each", "other", "than", "then", "so", "very", "can", "will", "just",
))
# fmt: on

_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


@dataclass
class ReportRecord:
    """One image of a batch run, as the report needs it."""

    image: str  # image path as given
    captions: list[str]  # the image's caption(s), best first (often one)
    scores: list[float | None] = field(default_factory=list)  # CLIPScore per caption, None when not scored
    flags: list[str] = field(default_factory=list)  # quality-gate codes of the first caption
    tokens: int | None = None  # CLIP token count of the first caption (None: not counted)


def first_caption(record: ReportRecord) -> str:
    """The caption that goes into the training set: the best (first) one, or "" when there is none."""
    return record.captions[0] if record.captions else ""


def first_score(record: ReportRecord) -> float | None:
    """The first caption's CLIPScore, or None when it was not scored (or is not a finite number)."""
    if not record.scores or record.scores[0] is None:
        return None
    value = float(record.scores[0])
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Duplicates


def normalise_caption(text: str) -> str:
    """The caption reduced to what a text encoder mostly sees: lowercase words, no punctuation.

    "A dog runs." and "a dog runs" train a LoRA the same way, so they count as exact duplicates.
    Punctuation becomes a space (so "well-lit" equals "well lit"), then runs of spaces collapse.
    """
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).strip()


def exact_duplicate_groups(records: Sequence[ReportRecord]) -> list[list[int]]:
    """Groups (two or more) of record indices whose first captions are equal once normalised.

    Empty captions are left out: they are already flagged "empty", and grouping every failed image
    together would bury the real duplicates. Groups come in the order of their first record, and
    the indices in each group ascend.
    """
    by_text: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        key = normalise_caption(first_caption(record))
        if key:
            by_text.setdefault(key, []).append(index)
    return [indices for indices in by_text.values() if len(indices) >= 2]


def _group_ids(count: int, groups: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Per row, the index of its exact-duplicate group, or -1: lets a tile drop in-group pairs at once."""
    ids = torch.full((count,), -1, dtype=torch.long)
    for group_id, group in enumerate(groups):
        for index in group:
            if 0 <= index < count:
                ids[index] = group_id
    return ids.to(device)


def _tile_pairs(
    matrix: torch.Tensor, group_ids: torch.Tensor, row0: int, col0: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (i < j) of one tile with cosine >= threshold that are not in one exact group."""
    rows = matrix[row0 : row0 + NEAR_BLOCK]
    cols = matrix[col0 : col0 + NEAR_BLOCK]
    sims = rows @ cols.T
    keep = sims >= threshold
    if row0 == col0:  # a diagonal tile: only the upper triangle, never a row with itself
        keep &= torch.ones_like(keep).triu(diagonal=1)
    row_groups = group_ids[row0 : row0 + NEAR_BLOCK].unsqueeze(1)
    col_groups = group_ids[col0 : col0 + NEAR_BLOCK].unsqueeze(0)
    keep &= ~((row_groups == col_groups) & (row_groups >= 0))
    where = keep.nonzero()
    return where[:, 0] + row0, where[:, 1] + col0, sims[keep]


def _keep_best(
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The running top NEAR_MAX_PAIRS: memory stays bounded even when every caption is the same."""
    rows, cols, values = (torch.cat((old, extra)) for old, extra in zip(best, new))
    if values.numel() > NEAR_MAX_PAIRS:
        values, order = values.topk(NEAR_MAX_PAIRS)
        rows, cols = rows[order], cols[order]
    return rows, cols, values


def near_duplicate_pairs(
    features: Any, threshold: float = 0.95, exclude_exact: Sequence[Sequence[int]] = ()
) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)``, i < j, of captions whose text embeddings are nearly the same.

    ``features`` is an (N, D) tensor of L2-normalised embeddings of the first captions (None: no
    embeddings, no pairs). Pairs inside one group of ``exclude_exact`` are left out: the report
    already lists them as exact duplicates. The similarity matrix is computed in tiles of
    NEAR_BLOCK x NEAR_BLOCK, so 100k captions never need an N x N matrix. At most NEAR_MAX_PAIRS
    pairs come back, highest cosine first (ties by i, then j).
    """
    if features is None:
        return []
    matrix = torch.as_tensor(features).detach()
    if matrix.ndim != 2:
        raise ValueError(f"features must be an (N, D) matrix, not of shape {tuple(matrix.shape)}")
    count = matrix.shape[0]
    if count < 2:
        return []
    # float32 also for half/bfloat16 input: CPU matmul in half precision is slow, and rounds cosines.
    matrix = matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    group_ids = _group_ids(count, exclude_exact, matrix.device)
    empty_index = torch.empty(0, dtype=torch.long, device=matrix.device)
    best = (empty_index, empty_index, torch.empty(0, dtype=matrix.dtype, device=matrix.device))
    for row0 in range(0, count, NEAR_BLOCK):
        for col0 in range(row0, count, NEAR_BLOCK):
            best = _keep_best(best, _tile_pairs(matrix, group_ids, row0, col0, threshold))
    pairs = [(int(i), int(j), float(v)) for i, j, v in zip(best[0].tolist(), best[1].tolist(), best[2].tolist())]
    return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))


# ---------------------------------------------------------------------------------------------
# Terms


def is_tag_list(captions: Sequence[str]) -> bool:
    """Whether the captions are mostly comma-separated tag lists (Booru/WD14 style): >= 2 commas on average.

    Tags like "long hair" must be counted whole, while sentences are counted word by word.
    """
    if not captions:
        return False
    return sum(caption.count(",") for caption in captions) / len(captions) >= 2


def _tags(caption: str) -> list[str]:
    """The caption's tags, lowercased with their inner spaces collapsed ("Long  Hair" is "long hair")."""
    tags = (_SPACES.sub(" ", part).strip().lower() for part in caption.split(","))
    return [tag for tag in tags if tag]


def _words(caption: str) -> list[str]:
    """The caption's lowercased words, stop words removed."""
    return [word for word in _WORD.findall(caption.lower()) if word not in STOP_WORDS]


def top_terms(captions: Sequence[str], limit: int = 30) -> list[tuple[str, int]]:
    """The most frequent tags (tag-list captions) or words (sentences), with their counts.

    Every occurrence counts. Equal counts are ordered alphabetically so reports are reproducible.
    """
    split = _tags if is_tag_list(captions) else _words
    counts = Counter(term for caption in captions for term in split(caption))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked[: max(0, limit)]


# ---------------------------------------------------------------------------------------------
# Numbers


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values; fraction in 0..1."""
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _round(value: float | None) -> float | None:
    """Four decimals: enough for scores, and keeps the JSON readable."""
    return None if value is None else round(float(value), 4)


def token_numbers(records: Sequence[ReportRecord]) -> dict[str, Any]:
    """Caption length in CLIP tokens: histogram in bins [low, low+5) from 0 up to the longest caption.

    Always a dict (histogram [] and None statistics when nothing was counted), so readers of the
    JSON need no special case. ``over_75`` counts captions CLIP truncates.
    """
    counts = sorted(int(r.tokens) for r in records if r.tokens is not None and r.tokens >= 0)
    if not counts:
        return {"count": 0, "histogram": [], "mean": None, "median": None, "max": None, "over_75": 0}
    bins = [0] * (counts[-1] // TOKEN_BIN + 1)
    for value in counts:
        bins[value // TOKEN_BIN] += 1
    histogram = [[k * TOKEN_BIN, (k + 1) * TOKEN_BIN, n] for k, n in enumerate(bins)]
    return {
        "count": len(counts),
        "histogram": histogram,
        "mean": _round(statistics.fmean(counts)),
        "median": _round(statistics.median(counts)),
        "max": counts[-1],
        "over_75": sum(1 for value in counts if value > CLIP_TOKEN_LIMIT),
    }


def _score_bin(score: float) -> int:
    """The 0.1-wide bin of a score; rounding first so 0.3 lands in [0.3, 0.4), not in [0.2, 0.3)."""
    return min(SCORE_BINS - 1, max(0, math.floor(round(score / SCORE_BIN, 9))))


def score_numbers(records: Sequence[ReportRecord]) -> dict[str, Any] | None:
    """CLIPScore of the first captions (the ones written): statistics and 25 bins of 0.1 over 0..2.5.

    Bins are [low, high) except the last, which holds 2.5 too. None when nothing was scored.
    """
    scores = sorted(s for s in (first_score(r) for r in records) if s is not None)
    if not scores:
        return None
    bins = [0] * SCORE_BINS
    for score in scores:
        bins[_score_bin(score)] += 1
    histogram = [[round(k * SCORE_BIN, 1), round((k + 1) * SCORE_BIN, 1), n] for k, n in enumerate(bins)]
    return {
        "count": len(scores),
        "mean": _round(statistics.fmean(scores)),
        "median": _round(statistics.median(scores)),
        "min": _round(scores[0]),
        "max": _round(scores[-1]),
        "p5": _round(percentile(scores, 0.05)),
        "histogram": histogram,
    }


def flag_counts(records: Sequence[ReportRecord]) -> dict[str, int]:
    """Records per quality-gate code: every known code (zeros included), then any unknown ones seen."""
    counts = dict.fromkeys(FLAG_CODES, 0)
    for record in records:
        for code in dict.fromkeys(record.flags):  # a code listed twice still flags the image once
            counts[code] = counts.get(code, 0) + 1
    return counts


def flagged_entries(records: Sequence[ReportRecord]) -> list[dict[str, Any]]:
    """Every record with at least one flag, in run order: what a person must look at."""
    return [
        {"image": r.image, "caption": first_caption(r), "score": _round(first_score(r)), "flags": list(r.flags)}
        for r in records
        if r.flags
    ]


def dataset_numbers(
    records: Sequence[ReportRecord],
    near_pairs: Sequence[tuple[int, int, float]] = (),
    exact_groups: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """All the report's numbers as one JSON-able dict (the ``--report`` JSON; render_html draws it).

    ``near_pairs`` come from :func:`near_duplicate_pairs` (it needs embeddings, which this module
    does not compute); ``exact_groups`` default to :func:`exact_duplicate_groups` of the records.
    """
    if exact_groups is None:
        exact_groups = exact_duplicate_groups(records)
    captions = [first_caption(r) for r in records]
    return {
        "images": len(records),
        "captions": sum(len(r.captions) for r in records),
        "tokens": token_numbers(records),
        "scores": score_numbers(records),
        "top_terms": [[term, count] for term, count in top_terms(captions)],
        "top_terms_kind": "tags" if is_tag_list(captions) else "words",
        "exact_duplicates": [[records[i].image for i in group] for group in exact_groups],
        "near_duplicates": [[records[i].image, records[j].image, _round(cos)] for i, j, cos in near_pairs],
        "flags": flag_counts(records),
        "flagged": flagged_entries(records),
    }


# ---------------------------------------------------------------------------------------------
# Plots


def _figure_png(figure: Any) -> bytes:
    """PNG bytes of a figure through the Agg canvas, without matplotlib's "Software" text chunk."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _histogram_png(figure_class: Any, histogram: Sequence[Sequence[float]], xlabel: str, limit: float | None) -> bytes:
    """A bar histogram of [low, high, count] bins, with an optional dashed limit line."""
    figure = figure_class(figsize=(6.4, 2.8), dpi=100, layout="tight")
    axes = figure.add_subplot()
    lows = [low for low, _, _ in histogram]
    widths = [high - low for low, high, _ in histogram]
    axes.bar(lows, [count for _, _, count in histogram], width=widths, align="edge", color="#4a78b5")
    if limit is not None:
        axes.axvline(limit, color="#c0392b", linestyle="--", linewidth=1.5, label=f"CLIP limit ({limit:g} tokens)")
        axes.legend(loc="upper right", fontsize="small")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("images (first caption)")
    from matplotlib.ticker import MaxNLocator

    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.2, 0.4 ... ticks
    return _figure_png(figure)


def plot_pngs(numbers: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots of the numbers: "tokens" (with the 75-token line) and "scores" when there are scores.

    matplotlib is optional (install the package matplotlib for plots): without it this returns {} and the
    HTML shows tables only. Figures are made through matplotlib's object API and the Agg canvas,
    never pyplot, so there is no global figure state: safe in threads and without a display.
    """
    try:
        import matplotlib  # noqa: F401  (first: a missing or blocked package must fail here, not half way)
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: the report has tables but no plots (install the package matplotlib for them)")
        return {}
    plots: dict[str, bytes] = {}
    tokens = numbers.get("tokens") or {}
    if tokens.get("histogram"):
        plots["tokens"] = _histogram_png(Figure, tokens["histogram"], "caption length (CLIP tokens)", CLIP_TOKEN_LIMIT)
    scores = numbers.get("scores")
    if scores and scores.get("histogram"):
        plots["scores"] = _histogram_png(Figure, scores["histogram"], "CLIPScore", None)
    return plots


# ---------------------------------------------------------------------------------------------
# Thumbnails


def thumbnail_data_uri(path: str) -> str | None:
    """A small JPEG preview of the image as a data URI, or None when it cannot be had.

    A preview must never break the report, so any failure (missing, corrupt, unsupported file)
    gives None, and images above THUMBNAIL_MAX_PIXELS are refused before decoding: a tiny file can
    declare billions of pixels. JPEGs are decoded at reduced size (draft), which makes big photos cheap.
    """
    try:
        with opened(path) as image:
            width, height = image.size
            if width * height > THUMBNAIL_MAX_PIXELS:
                log.debug("no preview for %s: %d x %d pixels", display_path(path), width, height)
                return None
            if image.format == "JPEG":
                image.draft("RGB", THUMBNAIL_DRAFT)
            if image.mode not in ("RGB", "RGBA", "L", "LA"):  # palette, 16-bit...: resize would look bad
                image = to_rgb(image)
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            small = to_rgb(image)
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    except Exception as exc:  # noqa: BLE001  (see the docstring: any failure means no preview)
        log.debug("no preview for %s: %s", display_path(path), exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.caption { max-width: 520px; overflow-wrap: anywhere; }
td.path { max-width: 280px; overflow-wrap: anywhere; font-family: monospace; font-size: 0.9em; }
.counts { display: flex; flex-wrap: wrap; gap: 0.6em; padding: 0; list-style: none; }
.counts li { background: #f3f6fb; border: 1px solid #d7e0ee; border-radius: 6px; padding: 0.4em 0.8em; }
.counts b { font-size: 1.3em; display: block; }
.flag { display: inline-block; background: #fdecea; color: #922; border-radius: 4px; padding: 0 0.4em; margin: 1px; }
.nopreview { color: #888; font-size: 0.85em; width: 128px; text-align: center; }
.note { color: #666; }
img.plot { max-width: 100%; }
"""


def _esc(text: Any) -> str:
    """User text (paths, captions, terms) made safe for HTML; paths made printable first."""
    return html.escape(display_path(text) if isinstance(text, (str, Path)) else str(text), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    """A number for a table cell: floats to ``digits`` decimals, None as a dash."""
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table from already escaped cells (a cell may carry its own ``<td ...>``)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plot_img(png: bytes | None, alt: str) -> str:
    """An embedded PNG plot, or nothing (then the tables beside it carry the numbers)."""
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<p><img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _header(numbers: dict[str, Any], title: str) -> str:
    """The title and the counts a person reads first."""
    tokens = numbers.get("tokens") or {}
    scores = numbers.get("scores")
    counts = [
        ("images", numbers.get("images", 0)),
        ("captions", numbers.get("captions", 0)),
        ("flagged", len(numbers.get("flagged", []))),
        ("over 75 tokens", tokens.get("over_75", 0)),
        ("exact duplicate groups", len(numbers.get("exact_duplicates", []))),
        ("near-duplicate pairs", len(numbers.get("near_duplicates", []))),
        ("scored", scores["count"] if scores else 0),
        ("mean CLIPScore", _number(scores["mean"]) if scores else "&ndash;"),
    ]
    items = "".join(f"<li><b>{value}</b>{label}</li>" for label, value in counts)
    return f'<h1>{html.escape(title)}</h1>\n<ul class="counts">{items}</ul>'


def _tokens_section(numbers: dict[str, Any], plots: dict[str, bytes]) -> str:
    """Caption length: the plot, the statistics and the non-empty bins."""
    tokens = numbers.get("tokens") or {}
    parts = ["<h2>Caption length (CLIP tokens)</h2>"]
    if not tokens.get("histogram"):
        return parts[0] + '<p class="note">No caption was counted.</p>'
    parts.append(_plot_img(plots.get("tokens"), "caption length histogram"))
    stats = [(k, _number(tokens.get(k), 2)) for k in ("count", "mean", "median", "max", "over_75")]
    parts.append(_table(["captions counted", "mean", "median", "max", "over 75"], [[v for _, v in stats]]))
    rows = [[f"{low}&ndash;{high - 1}", f'<td class="num">{n}</td>'] for low, high, n in tokens["histogram"] if n]
    parts.append(_table(["tokens", "captions"], rows))
    return "\n".join(p for p in parts if p)


def _terms_section(numbers: dict[str, Any]) -> str:
    """The most frequent tags or words: what a LoRA trained on these captions will hear most."""
    kind = numbers.get("top_terms_kind", "words")
    terms = numbers.get("top_terms", [])
    heading = "<h2>Top terms</h2>"
    if not terms:
        return heading + '<p class="note">No terms.</p>'
    label = "tag" if kind == "tags" else "word"
    rows = [[_esc(term), f'<td class="num">{count}</td>'] for term, count in terms]
    return heading + f'<p class="note">Most frequent {kind} of the captions.</p>' + _table([label, "count"], rows)


def _exact_section(numbers: dict[str, Any], caption_of: dict[str, str]) -> str:
    """Groups of images with the same caption, each caption once with its images."""
    groups = numbers.get("exact_duplicates", [])
    heading = "<h2>Exact duplicates</h2>"
    if not groups:
        return heading + '<p class="note">No two images have the same caption.</p>'
    rows = []
    for paths in groups[:HTML_MAX_GROUPS]:
        shown = "<br>".join(_esc(p) for p in paths[:HTML_MAX_GROUP_PATHS])
        if len(paths) > HTML_MAX_GROUP_PATHS:
            shown += f"<br><i>and {len(paths) - HTML_MAX_GROUP_PATHS} more</i>"
        caption = f'<td class="caption">{_esc(caption_of.get(paths[0], ""))}</td>'
        rows.append([caption, f'<td class="num">{len(paths)}</td>', f'<td class="path">{shown}</td>'])
    note = _more_note(len(groups), HTML_MAX_GROUPS, "groups")
    return heading + _table(["caption", "images", "paths"], rows) + note


def _near_section(numbers: dict[str, Any], caption_of: dict[str, str]) -> str:
    """Pairs of captions that differ in wording but mean nearly the same to the text encoder."""
    pairs = numbers.get("near_duplicates", [])
    heading = "<h2>Near duplicates</h2>"
    if not pairs:
        return heading + '<p class="note">No near-duplicate pairs (or no text embeddings were computed).</p>'
    rows = [
        [
            f'<td class="path">{_esc(a)}</td>',
            f'<td class="caption">{_esc(caption_of.get(a, ""))}</td>',
            f'<td class="path">{_esc(b)}</td>',
            f'<td class="caption">{_esc(caption_of.get(b, ""))}</td>',
            f'<td class="num">{_number(cos, 3)}</td>',
        ]
        for a, b, cos in pairs[:HTML_MAX_NEAR]
    ]
    note = _more_note(len(pairs), HTML_MAX_NEAR, "pairs")
    return heading + _table(["image A", "caption A", "image B", "caption B", "cosine"], rows) + note


def _scores_section(numbers: dict[str, Any], plots: dict[str, bytes]) -> str:
    """CLIPScore distribution: the plot, the statistics and the non-empty bins."""
    scores = numbers.get("scores")
    heading = "<h2>CLIPScore distribution</h2>"
    if not scores:
        return heading + '<p class="note">No caption was scored.</p>'
    parts = [heading, _plot_img(plots.get("scores"), "CLIPScore histogram")]
    keys = ("count", "mean", "median", "min", "max", "p5")
    parts.append(
        _table(["scored", "mean", "median", "min", "max", "5th percentile"], [[_number(scores[k]) for k in keys]])
    )
    rows = [[f"{low:.1f}&ndash;{high:.1f}", f'<td class="num">{n}</td>'] for low, high, n in scores["histogram"] if n]
    parts.append(_table(["CLIPScore", "captions"], rows))
    return "\n".join(p for p in parts if p)


def _flagged_section(numbers: dict[str, Any], thumbnails: bool, max_flagged: int) -> str:
    """The captions a quality gate flagged, with a preview of each image."""
    flagged = numbers.get("flagged", [])
    counts = numbers.get("flags", {})
    heading = "<h2>Flagged captions</h2>"
    summary = ", ".join(f"{_esc(code)}: {n}" for code, n in counts.items())
    summary_html = f'<p class="note">{summary}</p>' if summary else ""
    if not flagged:
        return heading + summary_html + '<p class="note">No caption was flagged.</p>'
    rows = [_flagged_row(entry, thumbnails) for entry in flagged[: max(0, max_flagged)]]
    headers = (["preview"] if thumbnails else []) + ["image", "caption", "score", "flags"]
    note = _more_note(len(flagged), max_flagged, "flagged captions")
    return heading + summary_html + _table(headers, rows) + note


def _flagged_row(entry: dict[str, Any], thumbnails: bool) -> list[str]:
    """One flagged caption: preview (or "no preview"), path, caption, score, flags."""
    cells = []
    if thumbnails:
        uri = thumbnail_data_uri(entry["image"])
        cells.append(f'<td><img alt="" src="{uri}"></td>' if uri else '<td class="nopreview">no preview</td>')
    flags = "".join(f'<span class="flag">{_esc(code)}</span>' for code in entry.get("flags", []))
    cells += [
        f'<td class="path">{_esc(entry["image"])}</td>',
        f'<td class="caption">{_esc(entry.get("caption", ""))}</td>',
        f'<td class="num">{_number(entry.get("score"))}</td>',
        flags,
    ]
    return cells


def _more_note(total: int, shown: int, what: str) -> str:
    """A line saying the table is cut (the JSON has them all)."""
    if total <= shown:
        return ""
    return f'<p class="note">Showing the first {max(0, shown)} of {total} {what}; the JSON report lists all.</p>'


def render_html(
    numbers: dict[str, Any],
    records: Sequence[ReportRecord],
    title: str = "Captioning report",
    thumbnails: bool = True,
    max_flagged: int = 500,
) -> str:
    """The report as ONE self-contained HTML page: inline CSS, plots and previews as data URIs.

    No external URL and no script, so the file can be mailed, archived or opened offline, and a
    caption containing markup cannot run anything: every path and caption is HTML-escaped.
    ``records`` give the captions shown beside the duplicate paths; image paths are read relative
    to the current folder for the previews of flagged images (``thumbnails=False`` skips them).
    """
    caption_of: dict[str, str] = {}
    for record in records:
        caption_of.setdefault(record.image, first_caption(record))
    plots = plot_pngs(numbers)
    body = "\n".join(
        [
            _header(numbers, title),
            _tokens_section(numbers, plots),
            _terms_section(numbers),
            _exact_section(numbers, caption_of),
            _near_section(numbers, caption_of),
            _scores_section(numbers, plots),
            _flagged_section(numbers, thumbnails, max_flagged),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
