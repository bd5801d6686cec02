"""Sizes for the machine: --batch-size auto (probe on a GPU, halving on out-of-memory), --workers auto,
and the local engine's stage times (the data-wait fraction the benchmarks print)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from captioners import cli
from captioners.batch import BatchJob, run_batch
from captioners.batch.local_engine import LocalEngine
from captioners.batch.sizing import AUTO, CPU_AUTO_BATCH, GPU_LARGEST_BATCH, auto_batch_size, auto_workers, \
    probe_batch_size
from captioners.errors import CaptionerError
from tests.batch_helpers import copy_photos

CUDA = torch.device("cuda")  # a device object only: nothing here runs on a GPU


def out_of_memory_above(limit: int, tried: list[int]):
    def run(size: int) -> None:
        tried.append(size)
        if size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return run


def test_probe_halves_until_a_batch_fits():
    tried: list[int] = []
    assert probe_batch_size(out_of_memory_above(40, tried), 256, CUDA) == 32
    assert tried == [256, 128, 64, 32]


def test_probe_takes_a_runtime_error_that_says_out_of_memory_and_raises_others():
    def old_style(size: int) -> None:
        if size > 3:
            raise RuntimeError("CUDA error: out of memory")
    assert probe_batch_size(old_style, 16) == 2

    def broken(size: int) -> None:
        raise ValueError("bad weights")
    with pytest.raises(ValueError, match="bad weights"):
        probe_batch_size(broken, 16)


def test_probe_says_what_to_do_when_one_image_does_not_fit():
    with pytest.raises(CaptionerError, match="--dtype fp16 or --device cpu"):
        probe_batch_size(out_of_memory_above(0, []), 8)


def test_auto_batch_on_a_gpu_probes_from_at_most_the_run_size():
    tried: list[int] = []
    assert auto_batch_size(CUDA, out_of_memory_above(1000, tried), images=20) == 20
    assert tried == [20]
    tried.clear()
    assert auto_batch_size(CUDA, out_of_memory_above(100, tried), images=10_000) == GPU_LARGEST_BATCH // 4


def test_auto_batch_on_a_cpu_is_the_documented_default_without_probing():
    tried: list[int] = []
    assert auto_batch_size(torch.device("cpu"), out_of_memory_above(0, tried), images=1000) == CPU_AUTO_BATCH
    assert auto_batch_size(torch.device("cpu"), out_of_memory_above(0, tried), images=3) == 3
    assert tried == []


def test_engine_probes_with_copies_of_the_first_image_that_decodes():
    """The engine's wiring: the judge sees batches of one decodable image, largest first."""
    seen: list[tuple[int, float]] = []

    def judge(pixels: torch.Tensor) -> None:
        seen.append((pixels.shape[0], float(pixels[:, 0, 0, 0].unique().item())))
        if pixels.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("out of memory")

    dataset = [(0, "truncated or corrupt image"), (1, torch.full((3, 2, 2), 7.0))] + \
        [(i, torch.zeros(3, 2, 2)) for i in range(2, 6)]
    step = SimpleNamespace(judge=SimpleNamespace(judge=judge))
    size = LocalEngine._batch_size(BatchJob(batch_size=AUTO), SimpleNamespace(device=CUDA), step, dataset)
    assert size == 3 and seen == [(6, 7.0), (3, 7.0)]
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert LocalEngine._batch_size(BatchJob(batch_size=AUTO), cpu, step, dataset) == 6 and len(seen) == 2
    assert LocalEngine._batch_size(BatchJob(batch_size=5), SimpleNamespace(device=CUDA), step, dataset) == 5


def test_jobs_take_auto_and_say_so_when_a_value_is_bad():
    job = BatchJob.from_mapping({"batch_size": "auto", "workers": "auto"})
    assert job.batch_size == AUTO and job.workers == auto_workers() >= 1
    assert job.to_dict()["batch_size"] == "auto"
    with pytest.raises(CaptionerError, match="batch_size must be a whole number or auto"):
        BatchJob.from_mapping({"batch_size": "large"})
    with pytest.raises(CaptionerError, match="batch_size must be"):
        BatchJob.from_mapping({"batch_size": 0})


def test_cli_parses_auto_and_refuses_words():
    parser = cli.build_parser()
    args = parser.parse_args(["batch", "folder", "--batch-size", "auto", "--workers", "AUTO"])
    assert args.batch_size == AUTO and args.workers == AUTO
    with pytest.raises(SystemExit):
        parser.parse_args(["batch", "folder", "--batch-size", "big"])


def test_auto_run_on_the_cpu_gives_the_same_captions_and_its_stage_times(load_tiny, icg_checkpoint, photos,
                                                                         tmp_path):
    captioner = load_tiny(icg_checkpoint.path)
    images = copy_photos(photos, tmp_path / "set", 10)
    auto = run_batch(captioner, BatchJob(inputs=[str(tmp_path / "set")], output_dir=str(tmp_path / "auto"),
                                         batch_size=AUTO))
    fixed = run_batch(captioner, BatchJob(inputs=[str(tmp_path / "set")], output_dir=str(tmp_path / "fixed"),
                                          batch_size=CPU_AUTO_BATCH))
    assert auto.captioned == fixed.captioned == len(images)
    for image in images:
        name = image.stem + ".txt"
        assert (tmp_path / "auto" / name).read_text() == (tmp_path / "fixed" / name).read_text()
    stages = auto.stages
    assert stages["batch_size"] == CPU_AUTO_BATCH and stages["batches"] == 2
    assert stages["captioning_s"] > 0 and stages["writing_s"] > 0 and 0 <= stages["data_wait"] < 1
    assert stages["data_wait"] == pytest.approx(
        stages["waiting_s"] / (stages["waiting_s"] + stages["captioning_s"] + stages["writing_s"]))
    assert json.loads(json.dumps(auto.to_dict()))["stages"]["batches"] == 2


def test_summary_says_how_long_the_model_waited_for_images(capsys):
    from captioners.batch.report import BatchSummary, StageTimes
    from captioners.cli.batch import print_summary

    stages = StageTimes(batch_size=64, batches=3, waiting_s=1.0, captioning_s=8.5, writing_s=0.5)
    print_summary(BatchSummary(captioned=3, total=3, stages=stages.to_dict()))
    assert "batch size 64: waited for images 10% of the time (1.0 s), captioning 8.5 s, writing 0.5 s" \
        in capsys.readouterr().out
    print_summary(BatchSummary(captioned=0, total=0))
    assert "waited" not in capsys.readouterr().out
