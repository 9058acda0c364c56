"""--device-decode: JPEGs decoded where the model runs, every other image as before.

On this CPU-only machine the "device" is the CPU: torchvision's decode_jpeg (libjpeg-turbo, as
PIL's) and the checkpoint's resize on tensors. What a GPU's nvJPEG changes is measured by
benchmarks/gpu_check.py on a GPU, not here.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deit_model import create_random_checkpoint, create_random_timm_checkpoint, device_decodable, load_preprocessor
from tasks.decode import decode_batch, jpeg_of
from tasks.device_jpeg import device_model_input

from .conftest import TINY_OVERRIDES


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def bad_huffman(jpeg: bytes) -> bytes:
    """A JPEG whose headers read and whose Huffman table is garbage: no decoder can decode it."""
    b = bytearray(jpeg)
    i = jpeg.index(b"\xff\xc4")
    b[i + 4:i + 20] = b"\xff" * 16
    return bytes(b)


def test_only_plain_upright_complete_rgb_jpegs_go_to_the_device():
    arr = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    plain = _jpeg(arr, quality=90)
    rotated = Image.Exif()
    rotated[0x0112] = 6
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    assert device_decodable(plain)
    assert device_decodable(plain, max_pixels=30 * 40) and not device_decodable(plain, max_pixels=30 * 40 - 1)
    refused = {
        "png": png.getvalue(), "grayscale": _jpeg(arr[..., 0]), "progressive": _jpeg(arr, progressive=True),
        "rotated": _jpeg(arr, exif=rotated.tobytes()), "truncated": plain[: len(plain) // 2],
        "cmyk": (lambda b: (Image.fromarray(arr).convert("CMYK").save(b, "JPEG"), b.getvalue())[1])(io.BytesIO()),
        "empty": b"", "not an image": b"\xff\xd8\xff hello",
    }
    assert [k for k, v in refused.items() if device_decodable(v)] == []
    assert device_decodable(bad_huffman(plain))  # its headers read: the device decoder refuses it later


def _files(photos, tmp_path):
    """The photos (3 plain JPEGs, 5 PNGs), a progressive JPEG, a broken one, a missing one."""
    uris = sorted(str(p) for p in photos.iterdir())
    china = (photos / "china.jpg").read_bytes()
    (tmp_path / "bad-huffman.jpg").write_bytes(bad_huffman(china))
    Image.open(io.BytesIO(china)).save(tmp_path / "progressive.jpg", "JPEG", progressive=True)
    uris += [str(tmp_path / n) for n in ("bad-huffman.jpg", "progressive.jpg", "missing.jpg")]
    return {"uri": np.array(uris, dtype=object)}


def _both_ways(pre, batch):
    options = dict(preprocessor=pre, max_pixels=10**9, fast_decode=False, storage_options={})
    ref = decode_batch(batch, **options)
    dev = decode_batch(batch, **options, device_jpeg=True)
    assert "pixel_values" not in dev
    jpegs = [jpeg_of(dev, i) for i in range(len(batch["uri"]))]
    assert sum(j is not None for j in jpegs) == 4  # 3 photos + the broken one; PIL decodes the rest
    with open(batch["uri"][3], "rb") as f:  # china.jpg: its bytes, packed
        assert jpegs[3].tobytes() == f.read() and dev["jpeg_data"].size == sum(len(j) for j in jpegs if j is not None)
    out, x = device_model_input(dev, pre, torch.device("cpu"))
    assert list(out["error_type"]) == list(ref["error_type"])  # the same rows fail, for the same reasons
    assert list(out["decoded"]) == list(ref["decoded"]) and out["error_type"][-3] == "corrupt_image"
    on_cpu = [j is None for j, ok in zip(jpegs, out["decoded"]) if ok]  # per model-input row
    return x, torch.from_numpy(ref["pixel_values"][ref["decoded"]]), on_cpu


@pytest.mark.parametrize("name", [
    "facebook/deit-tiny-distilled-patch16-224", "facebook/deit-small-distilled-patch16-224",
    "facebook/deit-base-distilled-patch16-224", "facebook/deit-base-distilled-patch16-384",
    "facebook/deit-tiny-patch16-224", "facebook/deit-small-patch16-224", "facebook/deit-base-patch16-224",
])
def test_transformers_checkpoints_get_the_same_pixels_bit_for_bit(name, photos, tmp_path):
    """transformers' processor resizes tensors either way, and libjpeg-turbo decodes both: exact on a CPU."""
    pre = load_preprocessor(str(create_random_checkpoint(name, tmp_path / "c", **TINY_OVERRIDES)))
    x, ref, _ = _both_ways(pre, _files(photos, tmp_path))
    assert x.dtype == torch.float32 and torch.equal(x, ref)


def test_timm_checkpoints_get_pixels_within_a_few_levels(photos, tmp_path):
    """timm resizes PIL images with PIL; on tensors torchvision's antialiased resize stands in."""
    ckpt = create_random_timm_checkpoint("deit_base_distilled_patch16_224.fb_in1k", tmp_path / "t",
                                         depth=2, embed_dim=64, num_heads=2)
    pre = load_preprocessor(str(ckpt))
    x, ref, on_cpu = _both_ways(pre, _files(photos, tmp_path))
    levels = (x - ref).abs() * 0.229 * 255  # back to 8-bit levels (the smallest std of ImageNet's)
    assert x.shape == ref.shape and 0 < float(levels.mean()) < 0.5 and float(levels.max()) <= 10
    assert sum(on_cpu) == 6 and torch.equal(x[on_cpu], ref[on_cpu])  # what PIL decoded: the same as ever


def test_batches_all_for_the_device_none_for_it_or_nothing_at_all(photos, tmp_path):
    pre = load_preprocessor(str(create_random_checkpoint(
        "facebook/deit-tiny-distilled-patch16-224", tmp_path / "c", **TINY_OVERRIDES)))
    options = dict(preprocessor=pre, max_pixels=10**9, fast_decode=False, storage_options={}, device_jpeg=True)
    jpegs = {"uri": np.array([str(photos / n) for n in ("rocket.jpg", "china.jpg")], dtype=object)}
    out, x = device_model_input(decode_batch(jpegs, **options), pre, torch.device("cpu"))
    ref = decode_batch(jpegs, **{**options, "device_jpeg": False})["pixel_values"]
    assert torch.equal(x, torch.from_numpy(ref))  # in the batch's order
    pngs = {"uri": np.array([str(photos / "coffee.png")], dtype=object)}
    out, x = device_model_input(decode_batch(pngs, **options), pre, torch.device("cpu"))
    assert x.shape == (1, 3, 224, 224) and out["decoded"].all()
    missing = {"uri": np.array([str(tmp_path / "none.jpg")], dtype=object)}
    out, x = device_model_input(decode_batch(missing, **options), pre, torch.device("cpu"))
    assert x is None and list(out["error_type"]) == ["not_found"]


def test_jpegs_are_decoded_on_the_device_in_chunks_with_the_same_pixels_and_errors(photos, tmp_path, monkeypatch):
    """A batch of phone photos must not hold all its full-size pixels on the GPU at once."""
    import deit_model.device_decode as dd

    pre = load_preprocessor(str(create_random_checkpoint(
        "facebook/deit-tiny-distilled-patch16-224", tmp_path / "c", **TINY_OVERRIDES)))
    options = dict(preprocessor=pre, max_pixels=10**9, fast_decode=False, storage_options={}, device_jpeg=True)
    dev = decode_batch(_files(photos, tmp_path), **options)
    sizes = {i: Image.open(io.BytesIO(jpeg_of(dev, i).tobytes())).size for i in range(len(dev["uri"]))
             if jpeg_of(dev, i) is not None}
    assert {i: int(dev["jpeg_pixels"][i]) for i in sizes} == {i: w * h for i, (w, h) in sizes.items()}
    whole, x_whole = device_model_input(dev, pre, torch.device("cpu"))
    calls: list[int] = []
    decode = dd.decode_jpegs
    monkeypatch.setattr(dd, "decode_jpegs", lambda datas, device: calls.append(len(datas)) or decode(datas, device))
    monkeypatch.setattr(dd.decode, "CHUNK_PIXELS", max(w * h for w, h in sizes.values()))  # one JPEG per chunk
    out, x = device_model_input(dev, pre, torch.device("cpu"))
    assert calls == [1] * len(sizes)  # the broken JPEG is its own chunk, refused there, decoded by PIL
    assert torch.equal(x, x_whole) and list(out["error_type"]) == list(whole["error_type"])
    assert list(out["decoded"]) == list(whole["decoded"])
    monkeypatch.setattr(dd.decode, "CHUNK_PIXELS", 3)
    assert dd._chunks([3, 3, 3, 1], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)] and dd._chunks(None, 5) == [(0, 5)]
    monkeypatch.setattr(dd.decode, "CHUNK_PIXELS", 6)
    assert dd._chunks([3, 3, 3, 1, 9], 5) == [(0, 2), (2, 4), (4, 5)] and dd._chunks([], 0) == []
