"""--gpu-decode: JPEGs left as bytes by the workers, decoded by torchvision and preprocessed as tensors.

No GPU here: the same code runs with the decoding device set to the CPU (torchvision's CPU decoder
instead of nvjpeg), which checks everything but nvjpeg itself.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from captioners.batch import BatchJob, run_batch
from captioners.batch import local_engine
from captioners.batch.gpu_decode import EncodedJpeg, GpuJpegStage, decode_jpegs, gpu_decode_device, gpu_jpeg
from captioners.batch.loading import collate, with_gpu_jpegs
from captioners.batch.steps import PreprocessStep
from captioners.families.fusecap import BlipPixels, blip_tensor_preprocess
from captioners.judging.judge import MultiPreprocess
from captioners.tensor_preprocess import TensorPreprocess, from_transforms
from tests.batch_corpus import make_corpus
from tests.batch_helpers import copy_photos

CPU = torch.device("cpu")


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92, **save)
    return out.getvalue()


def open_clip_preprocess():
    import open_clip

    return open_clip.image_transform(224, is_train=False)


def on_tensor(data: bytes, preprocess: TensorPreprocess) -> torch.Tensor:
    jpeg = gpu_jpeg(data, "test")
    assert jpeg is not None
    return preprocess(decode_jpegs([jpeg], CPU)[0])


# ---- the preprocessing as tensor operations ------------------------------------------------------
def test_open_clips_preprocessing_on_a_tensor_is_close_to_pils(photos):
    pil_preprocess = open_clip_preprocess()
    tensor_preprocess = from_transforms(pil_preprocess)
    assert tensor_preprocess == TensorPreprocess(224, (0.48145466, 0.4578275, 0.40821073),
                                                 (0.26862954, 0.26130258, 0.27577711), (224, 224), "bicubic")
    for photo in photos[:4]:
        data = Path(photo).read_bytes()
        want = pil_preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
        got = on_tensor(data, tensor_preprocess)
        assert got.shape == want.shape == (3, 224, 224)
        # in 0..255 steps: another resize implementation, never a different picture
        difference = ((got - want) * torch.tensor(tensor_preprocess.std)[:, None, None] * 255).abs()
        assert difference.mean() < 1.0 and difference.max() < 40


def test_blips_preprocessing_on_a_tensor_is_close_to_the_image_processors(photos):
    from transformers import BlipImageProcessor

    processor = BlipImageProcessor()
    tensor_preprocess = blip_tensor_preprocess(processor)
    assert tensor_preprocess is not None and tensor_preprocess.size == (384, 384) and tensor_preprocess.crop is None
    data = Path(photos[0]).read_bytes()
    want = BlipPixels(processor)(Image.open(io.BytesIO(data)).convert("RGB"))
    got = on_tensor(data, tensor_preprocess)
    assert got.shape == want.shape == (3, 384, 384)
    difference = ((got - want) * torch.tensor(processor.image_std)[:, None, None] * 255).abs()
    assert difference.mean() < 1.0 and difference.max() < 40


def test_pipelines_with_other_steps_have_no_tensor_version():
    from torchvision import transforms

    pil_preprocess = open_clip_preprocess()
    assert from_transforms(transforms.Compose([transforms.RandomCrop(8), *pil_preprocess.transforms])) is None
    assert from_transforms(lambda image: image) is None
    assert from_transforms(transforms.Compose([transforms.ToTensor()])) is None  # no resize: not a model's


# ---- which images go to the GPU, and upright -----------------------------------------------------
def test_only_plain_jpegs_go_to_the_gpu(photos):
    scene = Image.open(photos[0]).convert("RGB").resize((64, 48))
    assert isinstance(gpu_jpeg(jpeg_bytes(scene), "rgb"), EncodedJpeg)
    assert isinstance(gpu_jpeg(jpeg_bytes(scene.convert("L")), "gray"), EncodedJpeg)
    assert gpu_jpeg(jpeg_bytes(scene.convert("CMYK")), "cmyk") is None
    png = io.BytesIO()
    scene.save(png, "PNG")
    assert gpu_jpeg(png.getvalue(), "png") is None
    assert gpu_jpeg(jpeg_bytes(scene)[:-200], "cut short") is None  # no end marker: the CPU path says why


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(orientation):
    image = Image.new("RGB", (40, 24))
    image.paste((255, 0, 0), (0, 0, 10, 6))    # a red corner and a green edge: any wrong turn shows
    image.paste((0, 255, 0), (30, 0, 40, 24))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_bytes(image, exif=exif.tobytes())
    jpeg = gpu_jpeg(data, "turned")
    assert jpeg.orientation == orientation
    got = decode_jpegs([jpeg], CPU)[0]
    want = torch.from_numpy(np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))).permute(2, 0, 1)
    assert got.shape == want.shape
    assert (got.int() - want.int()).abs().float().mean() < 2


@pytest.mark.parametrize("models", [1, 2])
def test_a_mixed_batch_keeps_every_image_and_every_reason(photos, tmp_path, models):
    """JPEGs decoded by the stage, a PNG by the workers, a JPEG the decoder rejects by the CPU path;
    with two models (a captioner and the scorer) every image has one input per model."""
    one = open_clip_preprocess()
    preprocess = one if models == 1 else MultiPreprocess([one, one])
    tensor_preprocess = from_transforms(one) if models == 1 else MultiPreprocess([from_transforms(one)] * 2)
    scene = Image.open(photos[0]).convert("RGB")
    files = {"a.jpg": jpeg_bytes(scene), "b.jpg": jpeg_bytes(scene.rotate(90, expand=True))}
    png = io.BytesIO()
    scene.save(png, "PNG")
    files["c.png"] = png.getvalue()
    bad = bytearray(jpeg_bytes(scene))
    bad[len(bad) // 3:len(bad) // 3 + 4] = b"\xff\xda\x00\x02"  # the header reads, a bogus scan does not
    files["d.jpg"] = bytes(bad)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    worker = PreprocessStep(preprocess, gpu_jpegs=True)
    items = [(i, worker(tmp_path / name)) for i, name in enumerate(files)]
    png_input = "Tensor" if models == 1 else "tuple"  # the PNG's model inputs, decoded by the worker
    assert [type(x).__name__ for _, x in items] == ["EncodedJpeg", "EncodedJpeg", png_input, "EncodedJpeg"]
    stage = GpuJpegStage(tensor_preprocess, CPU, PreprocessStep(preprocess))
    batch = with_gpu_jpegs(collate(items), stage)
    assert not batch.jpegs and sorted(batch.indices + [i for i, _ in batch.failed]) == [0, 1, 2, 3]
    cpu_only = collate([(i, PreprocessStep(preprocess)(tmp_path / name)) for i, name in enumerate(files)])
    assert sorted(batch.indices) == sorted(cpu_only.indices)  # the same images usable either way
    parts = zip(batch.pixels, cpu_only.pixels) if models == 2 else [(batch.pixels, cpu_only.pixels)]
    for got, cpu in parts:
        assert got.shape[0] == len(batch.indices)
        for position, index in enumerate(batch.indices):
            want = cpu[cpu_only.indices.index(index)]
            assert (got[position] - want).abs().mean() < 0.05


# ---- the option ------------------------------------------------------------------------------------
def test_without_a_cuda_gpu_the_option_says_so_and_decodes_on_the_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        assert gpu_decode_device(True, CPU, object()) is None
    assert "needs a CUDA GPU" in caplog.text
    assert gpu_decode_device(False, torch.device("cuda"), object()) is None
    assert gpu_decode_device(True, torch.device("cuda"), None) is None
    assert BatchJob.from_mapping({"gpu_decode": True}).gpu_decode


@pytest.fixture()
def decoded_on_the_cpu(monkeypatch):
    """--gpu-decode with its decoding device set to the CPU; counts the images torchvision decoded."""
    import torchvision.io

    calls = []
    real = torchvision.io.decode_jpeg

    def counting(data, *args, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", counting)
    monkeypatch.setattr(local_engine, "gpu_decode_device", lambda requested, device, preprocess: CPU if requested else None)
    return calls


def test_a_run_with_gpu_decoding_captions_what_the_cpu_path_does(load_tiny, icg_checkpoint, tmp_path,
                                                                  decoded_on_the_cpu):
    captioner = load_tiny(icg_checkpoint.path)
    summaries, reasons = {}, {}
    for gpu in (False, True):
        corpus = make_corpus(tmp_path / f"gpu-{gpu}")
        summaries[gpu] = summary = run_batch(captioner, BatchJob(inputs=[str(corpus.root)], recursive=True, batch_size=4,
                                                       gpu_decode=gpu))
        if gpu:
            assert sum(decoded_on_the_cpu) >= 6  # the corpus's plain JPEGs went through torchvision
            assert all(p.with_suffix(".txt").read_text(encoding="utf-8") for p in corpus.captioned)
        reasons[gpu] = {Path(p).name: why.replace(str(corpus.root), "<root>") for p, why in summary.failed}
    assert summaries[True].captioned == summaries[False].captioned
    assert reasons[True] == reasons[False] and reasons[True]  # the same images fail, for the same reasons


def test_batch_size_auto_probes_with_a_gpu_decoded_image(load_tiny, icg_checkpoint, photos, tmp_path,
                                                         decoded_on_the_cpu, monkeypatch):
    captioner = load_tiny(icg_checkpoint.path)
    copy_photos(photos, tmp_path / "in", 3)
    sizes = []
    monkeypatch.setattr(local_engine, "auto_batch_size", lambda device, run, images: sizes.append(run(2)) or 2)
    summary = run_batch(captioner, BatchJob(inputs=[str(tmp_path / "in")], batch_size="auto", gpu_decode=True))
    assert summary.captioned == 3 and sizes == [None]
    assert decoded_on_the_cpu == [1, 2, 1]  # the probe's image through the GPU stage, then batches of 2
