"""HTML for the tab's tables and progress lines (plain functions: no gradio, easy to test).

Everything user-controlled (paths, captions, error messages) is escaped.
"""

from __future__ import annotations

import html
from html import escape
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from captioners.display import display_path

if TYPE_CHECKING:
    from captioners.registry import ModelRow

MISSING = " (files missing)"


def model_label(row: ModelRow) -> str:
    """A dropdown entry: the id, marked when its files are not all present."""
    return row.id if row.ready else row.id + MISSING


def model_id(label: str | None) -> str | None:
    """The model id behind a dropdown entry (also accepts a bare id or a path)."""
    if not label:
        return None
    return label[: -len(MISSING)] if label.endswith(MISSING) else label


def models_table(rows: Sequence[ModelRow], models_dir: str) -> str:
    out = [f"<p>Models folder: <code>{escape(models_dir)}</code></p>",
           "<table class='captioners-table'><thead><tr><th>model</th><th>family</th><th>status</th>"
           "<th>files</th></tr></thead><tbody>"]
    for row in rows:
        status = "loaded" if row.loaded else "ready" if row.ready else "files missing"
        files = "<br>".join(
            f"{'✅' if f.present else '❌'} <code>{escape(f.path)}</code>"
            + ("" if f.present else f"<br><small>from {escape(f.source)}</small>")
            for f in row.files)
        title = f" title='{escape(row.description, quote=True)}'" if row.description else ""
        out.append(f"<tr><td{title}><b>{escape(row.id)}</b><br><small>{escape(row.origin)}</small></td>"
                   f"<td>{escape(row.family)}</td><td class='captioners-{status.replace(' ', '-')}'>{status}</td>"
                   f"<td>{files}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(progress: Any, model: str = "", ended: str | None = None) -> str:
    """n/N, images/s and ETA of a running batch (a ``captioners.batch.Progress``). Once the batch has
    ``ended`` ("finished", "interrupted", "failed") the line says so and has no ETA any more."""
    if progress is None:
        return "" if ended else "<p class='captioners-progress'>Starting…</p>"
    total = progress.total or 0
    percent = 100 * progress.done / total if total else 0
    rate = f"{progress.images_per_s:.2f} images/s" if progress.images_per_s else "– images/s"
    counts = f"captioned {progress.captioned}, skipped {progress.skipped}, failed {progress.failed}"
    state, eta = "", f" · ETA {duration(progress.eta_s)}"
    if ended:  # "Interrupted at 8/20", "Finished: 20/20"
        state, eta = ended.capitalize() + (" at " if progress.done < total else ": "), ""
    return (f"<div class='captioners-progress'><progress max='100' value='{percent:.0f}'></progress> "
            f"<b>{state}{progress.done}/{total}</b> · {rate}{eta} · "
            f"elapsed {duration(progress.elapsed_s)} · {counts}"
            + (f" · {escape(model)}" if model else "") + "</div>")


def pairs_table(pairs: Iterable[tuple[str, str]], header: tuple[str, str], empty: str, limit: int = 50) -> str:
    pairs = list(pairs)
    if not pairs:
        return f"<p>{escape(empty)}</p>"
    rows = "".join(f"<tr><td><code>{escape(display_path(str(a)))}</code></td><td>{escape(str(b))}</td></tr>"
                   for a, b in pairs[:limit])
    more = f"<p>… and {len(pairs) - limit} more</p>" if len(pairs) > limit else ""
    # captioners-pairs: fixed column widths (style.css), so that a long path cannot squeeze the text
    return (f"<table class='captioners-table captioners-pairs'><thead><tr><th>{escape(header[0])}</th>"
            f"<th>{escape(header[1])}</th></tr></thead><tbody>{rows}</tbody></table>{more}")


def summary_html(summary: Any, model: str = "") -> str:
    """The end of a batch: counts, speed, and whether it was interrupted or a dry run."""
    data = summary.to_dict() if hasattr(summary, "to_dict") else dict(summary)
    failed = data.get("failed") or []
    state = "interrupted" if data.get("interrupted") else "finished"
    dry = " (dry run: nothing written)" if data.get("dry_run") else ""
    written = data.get("written") or data.get("written_files") or []
    rate = data.get("images_per_s") or 0
    return (f"<div class='captioners-summary'><b>Batch {state}{dry}</b>"
            + (f" with {escape(model)}" if model else "")
            + f": captioned {data.get('captioned', 0)}, skipped {data.get('skipped', 0)}, failed {len(failed)}"
            + (f", {len(written)} file(s) written" if written else "")
            + f" in {duration(data.get('elapsed_s'))} ({rate:.2f} images/s)."
            + (f" Dataset report: <code>{escape(display_path(data['report_html']))}</code>."
               if data.get("report_html") else "")
            + "</div>")


def error_html(message: str) -> str:
    return f"<p class='captioners-error'>⚠️ {escape(message)}</p>"


def judged_table(result: Any) -> str:
    """An image's captions with their CLIPScore, model and flags (empty when there is nothing to add)."""
    if len(result.captions) <= 1 and result.score is None and not result.flag_codes:
        return ""
    rows = []
    for text, score, model, flags in zip(result.captions, result.scores, result.models, result.flags):
        shown = "" if score is None else f"{score:.3f}"
        rows.append(f"<tr><td>{html.escape(text)}</td><td>{shown}</td><td>{html.escape(model)}</td>"
                    f"<td>{html.escape('; '.join(flag.message for flag in flags))}</td></tr>")
    return ("<table class='captioners-table'><tr><th>caption</th><th>CLIPScore</th><th>model</th><th>flags</th></tr>"
            + "".join(rows) + "</table>")


def dataset_html(summary: Any) -> str:
    """The Batch tab's Report section: the caption-length plot, CLIPScores, gate counts, flagged captions."""
    import base64

    numbers = getattr(summary, "dataset", None)
    flagged = getattr(summary, "flagged", None) or []
    if not numbers and not flagged:
        return ""
    parts = ["<h3>Report</h3>"]
    if numbers:
        from captioners.judging.dataset_report import plot_pngs

        for name, png in plot_pngs(numbers).items():
            parts.append(f"<img alt='{name}' style='max-width:100%' src='data:image/png;base64,"
                         f"{base64.b64encode(png).decode('ascii')}'>")
        tokens = numbers.get("tokens") or {}
        if tokens.get("count"):
            parts.append(f"<p>Caption length: mean {tokens['mean']} CLIP tokens, max {tokens['max']}, "
                         f"{tokens['over_75']} over 75.</p>")
    score = getattr(summary, "clip_score", None)
    if score:
        parts.append(f"<p>CLIPScore: mean {score['mean']:.3f}, median {score['median']:.3f}, "
                     f"min {score['min']:.3f}, max {score['max']:.3f}.</p>")
    counts = {code: count for code, count in (getattr(summary, "flags", None) or {}).items() if count}
    if counts:
        parts.append("<p>Flagged: " + html.escape(", ".join(f"{code} {count}" for code, count in counts.items()))
                     + "</p>")
    pairs = [(entry["image"], f"{'; '.join(entry['messages'])} [{entry['action']}]: {entry['caption']}")
             for entry in flagged]
    parts.append(pairs_table(pairs, ("image", "flags: caption"), "No caption flagged."))
    return "".join(parts)
