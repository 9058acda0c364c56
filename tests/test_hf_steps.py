"""transformers' preprocessing steps on channels-last batches: the processor's own output, or not used."""
from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from deit_model import hf_steps, load_preprocessor
from deit_model.preprocess import HFPreprocessor


def _images() -> list:
    """PIL images and channels-last uint8 tensors (as torchvision decodes), of mixed sizes, some twice."""
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in ((375, 500), (333, 517), (375, 500), (40, 90), (224, 224), (333, 517))]
    return [Image.fromarray(a) if i % 2 else torch.from_numpy(a).permute(2, 0, 1) for i, a in enumerate(arrays)]


def _deit_processor(**kw):
    from transformers import DeiTImageProcessor

    return DeiTImageProcessor(**kw)


@pytest.mark.parametrize("config", [None, {"size": {"shortest_edge": 256}},
                                    {"size": {"height": 300, "width": 200}, "crop_size": {"height": 192, "width": 160}},
                                    {"size": {"height": 224, "width": 224}, "do_center_crop": False}])
def test_the_steps_give_the_processors_own_output_bit_for_bit(tiny_checkpoint, monkeypatch, config):
    pre = load_preprocessor(str(tiny_checkpoint)) if config is None else HFPreprocessor(_deit_processor(**config))
    images = _images()
    ran = []
    real = hf_steps.run
    monkeypatch.setattr(hf_steps, "run", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    assert hf_steps.exact_for(pre, pre._library, pre._library_uint8) and ran  # the check runs them too
    whole, half = real(pre.processor, images).numpy(), real(pre.processor, images, values=False).numpy()
    np.testing.assert_array_equal(whole, pre._library(images))
    np.testing.assert_array_equal(half, pre._library_uint8(images))
    assert whole.dtype == np.float32 and half.dtype == np.uint8 and whole.flags.c_contiguous
    ran.clear()
    np.testing.assert_array_equal(pre(images), whole)
    np.testing.assert_array_equal(pre.to_uint8(images), half)
    # used where the processor's call would copy each image contiguous (transformers 5.24+)
    assert len(ran) == (2 if pre._convert is hf_steps.planar_tensors else 0) == 2 * pre.channels_last_steps()


def test_a_processor_with_its_own_orchestration_runs_as_it_is(monkeypatch):
    from transformers import DeiTImageProcessor

    class Custom(DeiTImageProcessor):
        def _preprocess(self, images, **kwargs):  # a model's own steps, which run() would not repeat
            out = super()._preprocess(images, **kwargs)
            out["pixel_values"] = out["pixel_values"] * 2
            return out

    pre = HFPreprocessor(Custom())
    monkeypatch.setattr(hf_steps, "run", lambda *a, **kw: pytest.fail("ran the generic steps"))
    assert not hf_steps.usable(pre.processor)
    images = _images()
    np.testing.assert_array_equal(pre(images), HFPreprocessor(DeiTImageProcessor())._library(images) * 2)


def test_steps_one_unit_off_are_not_used(tiny_checkpoint, monkeypatch, caplog):
    real = hf_steps._steps

    def off_by_one(p, batch, values):
        out = real(p, batch, values).clone()
        out.view(-1)[0] += 1
        return out

    monkeypatch.setattr(hf_steps, "_steps", off_by_one)
    pre = load_preprocessor(str(tiny_checkpoint))
    with caplog.at_level(logging.WARNING, logger=hf_steps.__name__):
        assert hf_steps.exact_for(pre, pre._library, pre._library_uint8) is False
    assert "differ from its own call" in caplog.text
    monkeypatch.setattr(hf_steps, "_steps", lambda *a: pytest.fail("ran the disagreeing steps"))
    images = _images()
    np.testing.assert_array_equal(pre(images), pre._library(images))


def test_the_switch_and_what_travels_with_the_preprocessor(tiny_checkpoint, monkeypatch):
    pre = load_preprocessor(str(tiny_checkpoint))
    assert hf_steps.exact_for(pre, pre._library, pre._library_uint8)
    assert pre.__dict__["_steps_exact"] is True
    assert "_steps_exact" not in pickle.loads(pickle.dumps(pre)).__dict__  # another process checks for itself
    monkeypatch.setenv(hf_steps.ENV, "library")
    monkeypatch.setattr(hf_steps, "run", lambda *a, **kw: pytest.fail("ran the steps though switched off"))
    assert pre.to_uint8([_images()[1]]).shape == (1, 3, 224, 224)


def test_what_the_steps_do_not_take_goes_to_the_processor(tiny_checkpoint):
    pre = load_preprocessor(str(tiny_checkpoint))
    floats = _images()[0].float()  # not 8-bit pixels: the processor's own call takes it
    assert hf_steps.run(pre.processor, [_images()[1], floats]) is None
    assert pre([floats]).shape == (1, 3, 224, 224)
    np.testing.assert_array_equal(pre([floats]), pre._library([floats]))
    uncropped = _deit_processor(size={"shortest_edge": 64}, do_center_crop=False)
    assert hf_steps.run(uncropped, _images()[:2]) is None  # 64x85 and 64x98: no one stack


def test_a_processor_that_keeps_the_channels_last_view_runs_as_it_is(tiny_checkpoint, monkeypatch):
    """transformers 5.17's call takes the decoders' view without a copy: the steps would not help there."""
    pre = load_preprocessor(str(tiny_checkpoint))
    monkeypatch.setitem(pre.__dict__, "_convert", hf_steps.channels_last_views)  # what 5.17's processor gets
    monkeypatch.setattr(hf_steps, "run", lambda *a, **kw: pytest.fail("ran the steps"))
    images = _images()[:1]
    np.testing.assert_array_equal(pre(images), pre._library(images))
