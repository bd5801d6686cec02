"""Judging in the batch engine: several captions per file, scores in JSONL/CSV, gates in the summary,
on_flag skip, the dataset report (HTML and JSON), and the same from the command line."""

from __future__ import annotations

import csv
import json

import pytest

from captioners.base import Candidates
from captioners.batch import BatchJob, run_batch
from captioners.cli.batch import exit_status
from captioners.cli import main as cli_main
from tests.batch_helpers import copy_photos


@pytest.fixture(scope="module")
def captioner(load_scoring_tiny, icg_checkpoint):
    return load_scoring_tiny(icg_checkpoint.path)


def job(folder, **values):
    return BatchJob.from_mapping({"inputs": [str(folder)], "batch_size": 3, **values})


def test_several_captions_go_one_per_line_or_joined(captioner, photos, tmp_path):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 4)
    decoding = {"strategy": "beam", "captions_per_image": 3, "max_new_tokens": 20}
    summary = run_batch(captioner, job(folder, decoding=decoding, jsonl=str(tmp_path / "out.jsonl")))
    assert summary.captioned == 4
    lines = [image.with_suffix(".txt").read_text(encoding="utf-8").split("\n") for image in images]
    assert all(len(group) == 3 and len(set(group)) == 3 for group in lines)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [[c["caption"] for c in r["captions"]] for r in records] == lines
    joined = tmp_path / "joined"
    copy_photos(photos, joined, 4)
    run_batch(captioner, job(joined, decoding=decoding, join=True, separator=" | "))
    assert [p.read_text(encoding="utf-8") for p in sorted(joined.glob("*.txt"))] == [" | ".join(g) for g in lines]


def test_scores_reach_jsonl_csv_and_the_summary(captioner, photos, tmp_path):
    folder = tmp_path / "set"
    copy_photos(photos, folder, 6)
    summary = run_batch(captioner, job(folder, judging={"score": True}, decoding={"max_new_tokens": 20},
                                       jsonl=str(tmp_path / "o.jsonl"), csv=str(tmp_path / "o.csv")))
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    scores = [r["clip_score"] for r in records]
    assert all(isinstance(s, float) for s in scores) and any(s > 0 for s in scores)
    rows = list(csv.DictReader((tmp_path / "o.csv").open(encoding="utf-8")))
    assert [float(row["clip_score"]) for row in rows] == pytest.approx(scores, abs=1e-4)
    assert summary.clip_score["count"] == 6
    assert summary.clip_score["max"] == max(scores) and summary.clip_score["min"] == min(scores)
    assert summary.flags["low_score"] == 0  # six scores are too few for "the lowest 5%"


def test_the_lowest_scores_of_a_run_are_flagged():
    from captioners.judging.judge import MIN_SCORES_FOR_OUTLIERS, JudgedImage, flag_low_scores

    def judged(score):
        return JudgedImage(["a dog runs on the grass ."], [score], ["m"], [[]])

    few = [judged(s / 10) for s in range(MIN_SCORES_FOR_OUTLIERS - 1)]
    assert flag_low_scores(few, 5.0) is None and not any(r.flag_codes for r in few)
    run = [judged(score) for score in [0.9, 0.8, 0.05, 0.7, 0.02] + [0.6] * 35]  # 40 scores: 5% is 2
    threshold = flag_low_scores(run, 5.0)
    assert threshold == 0.05
    assert [i for i, r in enumerate(run) if r.flag_codes == ["low_score"]] == [2, 4]
    assert "0.02" in run[4].flags[0][0].message


def crafted(captioner, monkeypatch, texts):
    """The model proposes ``texts`` in turn, one per image."""
    queue = list(texts)
    monkeypatch.setattr(captioner, "caption_candidates",
                        lambda pixels, options: Candidates([[queue.pop(0)] for _ in range(len(pixels))]))


def test_gates_are_in_the_summary_and_skip_writes_nothing(load_scoring_tiny, icg_checkpoint, photos, tmp_path,
                                                           monkeypatch):
    captioner = load_scoring_tiny(icg_checkpoint.path)
    texts = ["a dog runs through the grass .", "a dog dog dog dog dog dog .", "", "dog",
             "a man riding a bike on a road ."]
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 5)
    crafted(captioner, monkeypatch, texts)
    summary = run_batch(captioner, job(folder, judging={"on_flag": "skip"}, report=str(tmp_path / "r.json")))
    assert summary.flags["repetition"] == 1 and summary.flags["empty"] == 1 and summary.flags["short"] == 1
    assert summary.flagged_total == 3 and summary.flag_skipped == 3 and summary.captioned == 2
    assert [image.with_suffix(".txt").exists() for image in images] == [True, False, False, False, True]
    assert {entry["action"] for entry in summary.flagged} == {"skipped"}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["dataset"]["flags"]["repetition"] == 1 and report["summary"]["flag_skipped"] == 3
    assert exit_status(summary) == 0


def test_the_html_report_has_every_section(captioner, photos, tmp_path):
    folder = tmp_path / "set"
    copy_photos(photos, folder, 6)
    html_path = tmp_path / "report.html"
    summary = run_batch(captioner, job(folder, judging={"score": True}, decoding={"max_new_tokens": 20},
                                       report_html=str(html_path), report=str(tmp_path / "r.json")))
    html = html_path.read_text(encoding="utf-8")
    assert summary.report_html == str(html_path) and str(html_path) in summary.written
    for section in ("Caption length", "CLIPScore", "Flagged captions", "duplicate"):
        assert section.lower() in html.lower()
    assert "data:image/png;base64," in html
    dataset = json.loads((tmp_path / "r.json").read_text())["summary"]["dataset"]
    assert dataset["images"] == 6 and dataset["scores"]["count"] == 6
    assert sum(count for _, _, count in dataset["tokens"]["histogram"]) == 6


def test_best_of_n_from_the_command_line(icg_checkpoint, scoring_clip, tokenizer_dir, photos, tmp_path, capsys,
                                         assets_dir):
    from tests import tiny_models

    second = tiny_models.build_checkpoint(assets_dir / "cli-second", tokenizer_dir, "icg", seed=7, stop_scale=3.0,
                                          name="second.pt")
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 3)
    config, weights = scoring_clip
    presets = tmp_path / "models" / "presets.json"
    presets.parent.mkdir()
    common = {"family": "clip-prefix", "clip_config": str(config), "clip_weights": str(weights),
              "tokenizer": str(tokenizer_dir)}
    presets.write_text(json.dumps({"a": {**common, "weights": str(icg_checkpoint.path)},
                                   "b": {**common, "weights": str(second.path)}}))
    status = cli_main(["batch", str(folder), "--model", "a,b", "--select", "clip", "--strategy", "beam",
                       "--max-new-tokens", "20", "--score", "--models-dir", str(tmp_path / "models"),
                       "--device", "cpu", "--jsonl", str(tmp_path / "o.jsonl"), "--report-html",
                       str(tmp_path / "r.html")])
    out = capsys.readouterr().out
    assert status == 0 and "CLIPScore: mean" in out and "dataset report:" in out
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert {c["model"] for r in records for c in r["captions"]} <= {"a", "b"}
    assert all(image.with_suffix(".txt").is_file() for image in images)


def test_a_rerun_that_keeps_every_caption_still_reports_the_dataset(captioner, photos, tmp_path):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 3)
    images[0].with_suffix(".txt").write_text("a dog dog dog dog dog\nsecond caption", encoding="utf-8")
    run_batch(captioner, job(folder, decoding={"max_new_tokens": 20}))
    html_path = tmp_path / "report.html"
    summary = run_batch(captioner, job(folder, report_html=str(html_path), report=str(tmp_path / "r.json")))
    assert summary.captioned == 0 and summary.skipped == 3
    dataset = summary.dataset
    assert dataset["images"] == 3 and dataset["captions"] == 4 and dataset["flags"]["repetition"] == 1
    assert "Captioning report: 3 images" in html_path.read_text(encoding="utf-8")
