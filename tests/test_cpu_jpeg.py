"""Plain JPEGs decoded by torchvision's libjpeg-turbo: PIL's pixels and errors, or not used at all."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from deit_model import cpu_jpeg, load_preprocessor
from deit_model.decode import device_jpeg_size
from tasks.decode import decode_batch


def _jpeg(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _kinds(tmp_path, photos) -> dict[str, str]:
    """Real photos, and JPEGs of every kind the path takes or leaves to PIL, by name."""
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: PIL's, which turns it upright
    datas = {
        "420.jpg": _jpeg(noise, quality=85), "444.jpg": _jpeg(noise, quality=95, subsampling=0),
        "422.jpg": _jpeg(noise[:301, :417], quality=70, subsampling=1),
        "optimized.jpg": _jpeg(noise, quality=80, optimize=True),
        "progressive.jpg": _jpeg(noise, quality=85, progressive=True),
        "grey.jpg": _jpeg(noise[..., 0]), "rotated.jpg": _jpeg(noise, exif=exif.tobytes()),
        "cmyk.jpg": _encode_cmyk(noise),
    }
    corrupt = bytearray(datas["420.jpg"])
    corrupt[5000:5020] = bytes(20)  # complete, but with a damaged scan: decodes with garbage, the same in both
    datas["corrupt.jpg"] = bytes(corrupt)
    datas["truncated.jpg"] = datas["420.jpg"][:20_000]
    uris = {}
    for name, data in datas.items():
        (tmp_path / name).write_bytes(data)
        uris[name] = str(tmp_path / name)
    for p in sorted(photos.iterdir()):
        uris[p.name] = str(p)
    return uris


def _encode_cmyk(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("uint8", [False, True])
def test_plain_jpegs_come_out_as_pil_makes_them_and_the_rest_are_pils(tiny_checkpoint, photos, tmp_path,
                                                                       monkeypatch, uint8):
    uris = _kinds(tmp_path, photos)
    pre = load_preprocessor(str(tiny_checkpoint))
    assert cpu_jpeg.exact_for(pre)
    batch = {"uri": np.array(list(uris.values()), dtype=object)}
    options = {"preprocessor": pre, "max_pixels": 10**9, "fast_decode": False, "storage_options": {},
               "uint8": uint8 and pre.splits_exactly()}
    taken = []
    real = cpu_jpeg.decode_rgb
    monkeypatch.setattr(cpu_jpeg, "decode_rgb", lambda data: taken.append(data) or real(data))
    fast = decode_batch(batch, **options)
    monkeypatch.setenv(cpu_jpeg.ENV, "pil")
    n = len(taken)
    pil = decode_batch(batch, **options)
    assert len(taken) == n  # PIL alone: the path is off
    plain = {name for name, uri in uris.items() if device_jpeg_size(open(uri, "rb").read())}
    assert {"420.jpg", "444.jpg", "422.jpg", "optimized.jpg", "corrupt.jpg", "china.jpg"} <= plain
    assert not plain & {"progressive.jpg", "grey.jpg", "rotated.jpg", "cmyk.jpg", "truncated.jpg"}
    assert n == len(plain)  # each plain JPEG went through torchvision, nothing else did
    np.testing.assert_array_equal(fast["pixel_values"], pil["pixel_values"])
    assert fast["pixel_values"].dtype == pil["pixel_values"].dtype == (np.uint8 if options["uint8"] else np.float32)
    assert list(fast["error_type"]) == list(pil["error_type"])
    assert list(fast["decoded"]) == [name != "truncated.jpg" for name in uris]


def test_a_decoder_that_disagrees_with_pil_is_not_used(tiny_checkpoint, photos, monkeypatch, caplog):
    """One pixel off in the probes' decode turns the path off for that preprocessor, with a warning."""
    real = cpu_jpeg.decode_rgb

    def off_by_one(data):
        pixels = real(data).clone()
        pixels[0, 0, 0] ^= 1
        return pixels

    monkeypatch.setattr(cpu_jpeg, "decode_rgb", off_by_one)
    pre = load_preprocessor(str(tiny_checkpoint))
    with caplog.at_level(logging.WARNING, logger=cpu_jpeg.__name__):
        assert cpu_jpeg.exact_for(pre) is False
    assert "decodes the probe JPEGs differently" in caplog.text
    monkeypatch.setattr(cpu_jpeg, "decode_rgb", lambda data: pytest.fail("decoded by the disagreeing path"))
    batch = {"uri": np.array([str(photos / "china.jpg")], dtype=object)}
    out = decode_batch(batch, preprocessor=pre, max_pixels=10**9, fast_decode=False, storage_options={})
    assert out["decoded"].all()


def test_what_is_known_does_not_travel_with_the_preprocessor(tiny_checkpoint):
    """Another process (another node's libraries) checks for itself."""
    import pickle

    pre = load_preprocessor(str(tiny_checkpoint))
    assert cpu_jpeg.exact_for(pre)
    assert "_cpu_jpeg_exact" not in pickle.loads(pickle.dumps(pre)).__dict__


def test_timms_preprocessing_takes_pil_images_only(tmp_path):
    """timm resizes a tensor with torchvision's own resize, not PIL's: its images stay PIL's."""
    pytest.importorskip("timm")
    from deit_model import create_random_timm_checkpoint

    pre = load_preprocessor(str(create_random_timm_checkpoint(
        "deit_tiny_distilled_patch16_224.fb_in1k", tmp_path / "c", depth=1, embed_dim=32, num_heads=2)))
    assert cpu_jpeg.exact_for(pre) is False


def test_the_probes_cover_each_subsampling_and_are_plain():
    probes = cpu_jpeg.probe_jpegs()
    sampling = {Image.open(io.BytesIO(p)).layer[1][1:3] for p in probes}  # Cb's (h, v) sampling factors
    assert sampling == {(1, 1)} and all(device_jpeg_size(p) for p in probes)
    assert {Image.open(io.BytesIO(p)).layer[0][1:3] for p in probes} == {(1, 1), (2, 1), (2, 2)}
