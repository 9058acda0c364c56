"""Decoding: every input becomes RGB as the references expect, or a typed error."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deit_model import DecodeError, decode_image
from deit_model import decode as d


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb_array(w=40, h=30) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_rgb_png_is_lossless():
    arr = _rgb_array()
    out = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), arr)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK"])
def test_modes_convert_like_pil_convert_rgb(mode):
    src = Image.fromarray(_rgb_array()).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = _encode(src, fmt)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = decode_image(data)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected)


def test_palette_with_transparency():
    src = Image.fromarray(_rgb_array()).convert("P")
    data = _encode(src, "PNG", transparency=0)
    out = decode_image(data)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    data = _encode(Image.fromarray(ramp), "PNG")
    out = np.asarray(decode_image(data))
    assert out.shape == (8, 64, 3)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    # a clipped conversion would be 255 almost everywhere
    assert 100 < out[..., 0].mean() < 155


@pytest.mark.parametrize("fmt", ["PNG", "PPM", "TIFF"])
def test_16_bit_scale_is_the_files_not_the_pixels(fmt):
    """A dark 16-bit image is scaled as a bright one is (PGM opens as mode I in Pillow 13)."""
    dark = np.full((4, 4), 200 * 257, np.uint16)  # 51400 of 65535: 200 of 255
    bright = dark.copy()
    bright[0, 0] = 65535
    for arr in (dark, bright):
        out = np.asarray(decode_image(_encode(Image.fromarray(arr), fmt)))
        assert out[1:, 1:].min() == out[1:, 1:].max() == 200
    low = np.full((4, 4), 200, np.uint16)  # 200 of 65535 is nearly black, whatever the maximum
    assert np.asarray(decode_image(_encode(Image.fromarray(low), fmt))).max() == 1


def test_32_bit_integer_tiff_converts_as_pil_does():
    """Mode I with no known range (not 16-bit) is clipped as convert("RGB") clips it."""
    arr = np.array([[10, 200, 1000, 70000]], np.int32)
    data = _encode(Image.fromarray(arr), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(data)), expected)


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data)
    assert out.size == (20, 40)  # width and height swapped
    top = np.asarray(out)[:5].mean()
    bottom = np.asarray(out)[-5:].mean()
    assert top > 200 and bottom < 50  # white moved from the left to the top


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", d.EMPTY),
        (b"this is text, not pixels", d.NOT_AN_IMAGE),
        (_encode(Image.fromarray(_rgb_array(200, 200)), "JPEG")[:400], d.CORRUPT),
        (_encode(Image.fromarray(_rgb_array(200, 200)), "PNG")[:200], d.CORRUPT),
    ],
)
def test_bad_inputs_raise_typed_errors(data, kind):
    with pytest.raises(DecodeError) as err:
        decode_image(data)
    assert err.value.error_type == kind
    assert str(err.value)


def _bad_png_crc() -> bytes:
    png = bytearray(_encode(Image.new("RGB", (40, 30)), "PNG"))
    png[29] ^= 0xFF  # the IHDR chunk's checksum
    return bytes(png)


@pytest.mark.parametrize("data, reason", [
    (_bad_png_crc(), "PNG: broken PNG file (bad header checksum in b'IHDR')"),
    (_encode(Image.new("RGB", (40, 30)), "JPEG")[:20], "JPEG: "),
    (b"\xff\xd8\xff\xd9", "JPEG: "),
])
def test_a_damaged_header_of_a_known_format_is_corrupt_with_pils_reason(data, reason):
    """They were "not a recognised image format" (found in review); text still is (the case above)."""
    with pytest.raises(DecodeError) as err:
        decode_image(data)
    assert err.value.error_type == d.CORRUPT and str(err.value).startswith("cannot decode image: " + reason)


def test_pixel_limit_past_pils_own_names_ours():
    """PIL raises past twice its limit, which followed ours, and its message quoted that double."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100, 100, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    with pytest.raises(DecodeError) as err:
        decode_image(bomb, max_pixels=1000)
    assert err.value.error_type == d.TOO_LARGE and str(err.value) == "10000 pixels exceeds the limit of 1000"


def test_pixel_limit():
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(DecodeError) as err:
        decode_image(data, max_pixels=5000)
    assert err.value.error_type == d.TOO_LARGE and "10000" in str(err.value)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


def test_pixel_limit_above_pillows_default_is_honoured():
    """PIL's own check would refuse this image; a larger --max-pixels must let it through."""
    from PIL import Image as PILImage

    data = _encode(Image.new("L", (20_000, 10_000)), "PNG")  # 200 MP, over PIL's 179 MP default
    default = PILImage.MAX_IMAGE_PIXELS
    try:
        with pytest.raises(DecodeError) as err:
            decode_image(data)
        assert err.value.error_type == d.TOO_LARGE
        assert decode_image(data, max_pixels=250_000_000).size == (20_000, 10_000)
    finally:
        PILImage.MAX_IMAGE_PIXELS = default


def test_a_larger_pixel_limit_holds_while_another_thread_decodes(monkeypatch):
    """PIL's limit is process-wide and GPU actors decode on two threads: one thread's restore of
    the default must not make the other's large image a false too_many_pixels.

    The interleaving that once did is forced rather than hoped for: the other thread is held
    inside its own open (PIL's limit lifted to our default, the original saved to restore) while
    the main thread lifts the limit to 400 MP and opens; the other thread's restore then lands in
    the main thread's open unless the two opens are kept apart.
    """
    import struct
    import threading
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # the header of a 200 MP PNG (over PIL's default, within the limit asked for), its data cut short
    big = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 10_000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    small = _encode(Image.new("RGB", (4, 4)), "PNG")
    real_open, in_open, main_opens, other_done = Image.open, *(threading.Event() for _ in range(3))

    def open_(fp, *args, **kwargs):
        if threading.current_thread() is other:
            in_open.set()
            main_opens.wait(timeout=0.5)  # held inside its open until the main thread opens too
        else:
            main_opens.set()
            other_done.wait(timeout=0.5)  # the other thread's restore lands now, if nothing stops it
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)
    other = threading.Thread(target=lambda: (decode_image(small), other_done.set()))
    other.start()
    assert in_open.wait(timeout=5)
    with pytest.raises(DecodeError) as err:
        decode_image(big, max_pixels=400_000_000)
    other.join()
    assert err.value.error_type == d.CORRUPT  # past the pixel check: the data is what is wrong


def test_each_preprocessor_keeps_its_own_output_shape(tiny_checkpoint, photos, tmp_path):
    """decode_batch sizes pixels by the preprocessor it is given, kept on that object.

    A shape cache keyed by ``id()`` once outlived its preprocessor: one made later at the same
    address got the old shape, and every image of its batches failed preprocessing (it showed in
    CI as the 384 checkpoint's images failing after a 224 one's). The address reuse itself cannot
    be forced from a test; what is checked is that the shape lives on the object.
    """
    from deit_model import create_random_checkpoint, load_preprocessor
    from tasks.decode import decode_batch

    from .conftest import TINY_OVERRIDES

    big = load_preprocessor(str(create_random_checkpoint("facebook/deit-base-distilled-patch16-384", tmp_path / "c",
                                                         **TINY_OVERRIDES)))
    small = load_preprocessor(str(tiny_checkpoint))
    batch = {"uri": np.array([str(p) for p in sorted(photos.iterdir())][:2], dtype=object)}
    for pre, side in ((small, 224), (big, 384), (small, 224)):
        out = decode_batch(batch, preprocessor=pre, max_pixels=10**9, fast_decode=False, storage_options={})
        assert out["pixel_values"].shape[-1] == side and out["decoded"].all(), out["error_message"]
        assert pre.__dict__["_input_shape"] == (3, side, side)


def test_a_thin_image_that_its_resize_would_make_huge_is_an_error_row(tiny_checkpoint, tmp_path):
    """1 x 4,000 pixels is a few hundred bytes, but timm's shortest-edge resize to 248 would make it
    248 x 992,000 (246 MP, gigabytes) before the crop: a too_many_pixels row, on both decode paths.
    The transformers checkpoint resizes to a fixed 256 x 256 and scores the same image."""
    pytest.importorskip("timm")
    from deit_model import create_random_timm_checkpoint, load_preprocessor
    from tasks.decode import decode_batch

    timm_pre = load_preprocessor(str(create_random_timm_checkpoint(
        "deit_base_distilled_patch16_224.fb_in1k", tmp_path / "c", depth=1, embed_dim=32, num_heads=2)))
    assert timm_pre.resized_size(1, 4000) == (248, 992_000)
    assert load_preprocessor(str(tiny_checkpoint)).resized_size(1, 4000) == (256, 256)
    rng = np.random.default_rng(0)
    uris = []
    for name, size in (("thin.jpg", (1, 4000)), ("narrow.jpg", (2, 400)), ("photo.jpg", (500, 375))):
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        uris.append(str(path))
    batch = {"uri": np.array(uris, dtype=object)}
    for pre, failed in ((timm_pre, [True, False, False]), (load_preprocessor(str(tiny_checkpoint)), [False] * 3)):
        for device_jpeg in (False, True):
            out = decode_batch(batch, preprocessor=pre, max_pixels=d.DEFAULT_MAX_PIXELS, fast_decode=False,
                               storage_options={}, device_jpeg=device_jpeg)
            assert list(~out["decoded"]) == failed, out["error_message"]
            if failed[0]:
                assert out["error_type"][0] == d.TOO_LARGE
                assert "resizes to 248x992000" in out["error_message"][0]
                assert device_jpeg is False or "jpeg_data" in out and out["jpeg_offsets"][1] == 0  # not sent on


@pytest.mark.parametrize("uint8", [False, True])
def test_a_batch_is_preprocessed_in_chunks_with_the_same_pixels_and_errors(tiny_checkpoint, photos, tmp_path,
                                                                          monkeypatch, uint8):
    """A batch of large photos is decoded and preprocessed a few at a time (scoring processes keep
    their peak heap, so 16 decoded 12 MP photos held at once stayed resident); chunking must not
    change a pixel, an error row or the rows' order."""
    import tasks.decode as td
    from deit_model import load_preprocessor

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    uris = [str(p) for p in sorted(photos.iterdir())]
    uris.insert(3, str(tmp_path / "broken.jpg"))
    batch = {"uri": np.array(uris, dtype=object)}
    pre = load_preprocessor(str(tiny_checkpoint))

    def run():
        return td.decode_batch(batch, preprocessor=pre, max_pixels=10**9, fast_decode=False, storage_options={},
                               uint8=uint8 and pre.splits_exactly())

    whole = run()
    sizes = []
    real = td._preprocess
    monkeypatch.setattr(td, "_preprocess", lambda images, *a: sizes.append(len(images)) or real(images, *a))
    monkeypatch.setattr(td.image_decode, "CHUNK_PIXELS", 600_000)  # two of these photos at most
    chunked = run()
    assert max(sizes) <= 2 and sum(sizes) == len(uris) - 1 and len(sizes) >= 4
    assert list(chunked["decoded"]) == [i != 3 for i in range(len(uris))]
    assert list(chunked["error_type"]) == list(whole["error_type"]) and chunked["error_type"][3] is not None
    np.testing.assert_array_equal(chunked["pixel_values"], whole["pixel_values"])
    assert chunked["pixel_values"].dtype == whole["pixel_values"].dtype


@pytest.mark.parametrize("device_jpeg", [False, True])
def test_a_batch_decodes_its_first_objects_while_the_rest_are_read(tiny_checkpoint, photos, tmp_path, monkeypatch,
                                                                    device_jpeg):
    """Read in chunks of READ_CHUNK (a missing object among them): the first chunk is decoded
    while a later one is still being read, and the rows come out as from one read of the batch."""
    import threading

    import tasks.decode as td
    from deit_model import load_preprocessor
    from tasks import storage
    from tasks.batch_reads import read_batch

    uris = [str(p) for p in sorted(photos.iterdir())]
    uris.insert(2, str(tmp_path / "missing.jpg"))
    batch = {"uri": np.array(uris, dtype=object)}
    pre = load_preprocessor(str(tiny_checkpoint))
    kw = {"preprocessor": pre, "max_pixels": 10**9, "fast_decode": False, "storage_options": {},
          "device_jpeg": device_jpeg}
    whole = td.decode_batch(batch, datas=read_batch(batch, {}), **kw)
    monkeypatch.setattr(storage, "READ_CHUNK", 2)
    first_decoded, last_read = threading.Event(), []
    real_read, real_sort = storage.read_uris, td._sort

    def read(chunk, options):
        if chunk[-1] == uris[-1]:  # the last chunk: read only once the first rows are past
            last_read.append(first_decoded.wait(10))
        return real_read(chunk, options)

    def rows(datas):
        for i, data in enumerate(datas):  # every row, decoded here or not, passes this point
            if i == 1:
                first_decoded.set()
            yield data

    monkeypatch.setattr(storage, "read_uris", read)
    monkeypatch.setattr(td, "_sort", lambda datas, *a: real_sort(rows(datas), *a))
    streamed = td.decode_batch(batch, **kw)
    assert last_read == [True]  # under a read of the whole batch first, the last chunk's read waits in vain
    for key in whole:
        if isinstance(whole[key], np.ndarray) and whole[key].dtype != object:
            np.testing.assert_array_equal(streamed[key], whole[key])
        else:  # an object column: strings, None, or (``pixels``) arrays
            assert len(streamed[key]) == len(whole[key]), key
            for a, b in zip(streamed[key], whole[key]):
                assert np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b, key
    assert streamed["error_type"][2] == "not_found" and not streamed["decoded"][2]


@pytest.mark.parametrize("read_first", [False, True])
def test_an_object_over_the_byte_limit_is_an_error_row_and_is_not_read(tiny_checkpoint, photos, tmp_path,
                                                                       read_first):
    """A file of many GB with an image's name would be read whole before any image check: over
    --max-bytes as listed it is refused unread, on both read paths (the decode task's stream, and
    the CPU actor's read ahead). A missing file stands in for it: read, it would be not_found."""
    import os

    import tasks.decode as td
    from deit_model import load_preprocessor
    from tasks.batch_reads import read_batch

    uris = [str(p) for p in sorted(photos.iterdir())][:3]
    uris.insert(1, str(tmp_path / "huge.jpg"))
    sizes = np.array([os.path.getsize(u) if os.path.exists(u) else 5 * 2**30 for u in uris], dtype=float)
    sizes[2] = np.nan  # a size the listing did not give (a manifest without sizes): read
    batch = {"uri": np.array(uris, dtype=object), "source_size": sizes}
    kw = dict(preprocessor=load_preprocessor(str(tiny_checkpoint)), max_pixels=10**9, fast_decode=False,
              storage_options={})
    datas = read_batch(batch, {}, 2**30) if read_first else None
    out = td.decode_batch(batch, datas=datas, max_bytes=2**30, **kw)
    assert list(out["decoded"]) == [True, False, True, True], out["error_message"]
    assert out["error_type"][1] == d.TOO_MANY_BYTES
    assert out["error_message"][1] == ("5,368,709,120 bytes as listed, over the limit of 1,073,741,824 "
                                       "(--max-bytes); not read")
    smallest = int(np.nanmin(sizes))  # the limit is the listed size's: one byte under it refuses that image
    tight = td.decode_batch(batch, max_bytes=smallest - 1, **kw)
    assert list(tight["error_type"] == d.TOO_MANY_BYTES) == list((sizes > smallest - 1))
    assert td.decode_batch(batch, max_bytes=None, **kw)["error_type"][1] == "not_found"  # no limit: read


def test_a_batch_is_read_at_most_read_ahead_chunks_before_its_decode(tmp_path, monkeypatch):
    """Reads run READ_AHEAD chunks ahead of the rows taken, no further, and a row's bytes are not
    kept once taken: a batch of 128 phone photos held all its bytes until its end."""
    import gc
    import weakref

    from tasks import storage

    uris = []
    for i in range(9):
        (tmp_path / f"{i}.bin").write_bytes(bytes([i]) * 1000)
        uris.append(str(tmp_path / f"{i}.bin"))
    monkeypatch.setattr(storage, "READ_CHUNK", 2)  # 5 chunks
    taken, started, real_read = [0], [], storage.read_uris

    class Data(bytearray):  # bytes that a weak reference can watch (bytes itself cannot have one)
        pass

    def read(chunk, options):
        started.append((uris.index(chunk[0]) // 2, taken[0]))  # (chunk, rows taken when its read began)
        return [Data(d) for d in real_read(chunk, options)]

    monkeypatch.setattr(storage, "read_uris", read)
    refs = []
    with storage.ReadStream(uris, {}) as stream:
        for data in stream:  # not enumerate(): its reused result tuple keeps the last row's bytes
            assert data == bytes([taken[0]]) * 1000
            refs.append(weakref.ref(data))
            del data
            gc.collect()
            taken[0] += 1
            assert all(r() is None for r in refs)  # nothing the stream keeps
    assert [c for c, _ in sorted(started)] == [0, 1, 2, 3, 4]
    for chunk, rows_taken in started:  # chunk k waits until chunk k - READ_AHEAD has been taken
        assert rows_taken >= 2 * (chunk - storage.READ_AHEAD), started
