"""timm checkpoints scored exactly as timm scores them (the model cards' recipes)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

timm = pytest.importorskip("timm")

from deit_model import (create_random_timm_checkpoint, create_scorer, inspect_checkpoint,  # noqa: E402
                        load_preprocessor, to_model_input)

SMALL = {
    "deit_base_distilled_patch16_224.fb_in1k": dict(depth=2, embed_dim=64, num_heads=2),
    "cait_m36_384.fb_dist_in1k": dict(depth=2, embed_dim=48, num_heads=2, depth_token_only=1),
}


def _photos(photos):
    return [Image.open(p).convert("RGB") for p in sorted(photos.iterdir())]


def _timm_reference(name, ckpt, args, images, top_k):
    """The model card's recipe: create_model, resolve_data_config, create_transform, softmax, topk."""
    model = timm.create_model(name, pretrained=False, **args).eval()
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    x = torch.stack([transform(img) for img in images])
    with torch.no_grad():
        probs = model(x).softmax(dim=1)
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
        headless = timm.create_model(name, pretrained=False, num_classes=0, **args).eval()
        headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head")})
        pooled = headless(x)
    scores, ids = torch.topk(probs, k=top_k)
    return x.numpy(), ids.numpy(), scores.numpy(), embedding.numpy(), pooled.numpy()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_timm_models_match_timm(name, tmp_path, photos):
    args = SMALL[name]
    ckpt = create_random_timm_checkpoint(name, tmp_path / "ckpt", **args)
    images = _photos(photos)
    ref_x, ref_ids, ref_scores, ref_emb, ref_pooled = _timm_reference(name, ckpt, args, images, top_k=5)

    pre = load_preprocessor(str(ckpt))
    x = pre(images)
    np.testing.assert_array_equal(x, ref_x)  # timm's own transform, bit for bit
    assert pre.splits_exactly()  # and in two halves, as decode tasks and GPU actors run it
    np.testing.assert_array_equal(to_model_input(pre.to_uint8(images), pre, torch.device("cpu")).numpy(), ref_x)
    scorer = create_scorer(str(ckpt), top_k=5, device="cpu", dtype="fp32")
    ours = scorer.score(x)
    np.testing.assert_array_equal(ours.label_ids, ref_ids)
    np.testing.assert_allclose(ours.scores, ref_scores, atol=1e-5)
    np.testing.assert_allclose(ours.embedding, ref_emb, atol=1e-5)
    np.testing.assert_allclose(ours.embedding, ref_pooled, atol=1e-5)  # == num_classes=0 output
    # timm's ImageNet names, no download
    assert scorer.labels(ours.label_ids)[0][0] == timm.data.ImageNetInfo().index_to_description(int(ref_ids[0, 0]))


def test_timm_preprocessing_is_timms_not_transformers(tmp_path):
    ckpt = create_random_timm_checkpoint("deit_base_distilled_patch16_224.fb_in1k", tmp_path / "c",
                                         **SMALL["deit_base_distilled_patch16_224.fb_in1k"])
    cfg = load_preprocessor(str(ckpt)).to_dict()
    assert cfg["library"] == "timm" and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert load_preprocessor(str(ckpt)).min_decode_side() == 248  # shortest edge 224 / 0.9
    info = inspect_checkpoint(str(ckpt))
    assert info.backend == "timm" and info.embedding_dim == 64 and info.num_labels == 1000


@pytest.mark.parametrize("name, tokens, side", [
    ("deit_base_distilled_patch16_224.fb_in1k", 198, 224),
    ("cait_m36_384.fb_dist_in1k", 577, 384),
])
def test_full_size_timm_shapes(name, tokens, side, tmp_path, photos):
    """One full-size configuration per family: the token counts of the model cards."""
    ckpt = create_random_timm_checkpoint(name, tmp_path / "full")
    scorer = create_scorer(str(ckpt), top_k=5, device="cpu", dtype="fp32")
    x = load_preprocessor(str(ckpt))(_photos(photos)[:1])
    assert x.shape == (1, 3, side, side)
    result = scorer.score(x, token_features=True)
    assert result.features.shape == (1, tokens, 768) and result.embedding.shape == (1, 768)


def test_timm_checkpoint_with_pickled_code_is_refused(tmp_path):
    import os
    import shutil

    from deit_model import ModelLoadError

    ckpt = create_random_timm_checkpoint("deit_base_distilled_patch16_224.fb_in1k", tmp_path / "c",
                                         depth=1, embed_dim=32, num_heads=2)
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(ckpt / "config.json", evil)

    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    state = load_file(ckpt / "model.safetensors")
    state["payload"] = RunsCode()
    torch.save(state, evil / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refused to load .*possibly code"):
        create_scorer(str(evil), device="cpu")


def test_a_timm_cnn_scores_as_timm_and_refuses_token_features(tmp_path, photos):
    """Beyond ViTs: a ResNet's pooled features are its embedding; it has no tokens to keep."""
    ckpt = create_random_timm_checkpoint("resnet10t.c3_in1k", tmp_path / "c")
    model = timm.create_model("resnet10t.c3_in1k", pretrained=False).eval()
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    ref_x = torch.stack([transform(img) for img in _photos(photos)[:2]])
    with torch.no_grad():
        ref_ids = torch.topk(model(ref_x).softmax(dim=1), k=5).indices.numpy()
        ref_emb = model.forward_head(model.forward_features(ref_x), pre_logits=True).numpy()
    scorer = create_scorer(str(ckpt), top_k=5, device="cpu", dtype="fp32")
    x = load_preprocessor(str(ckpt))(_photos(photos)[:2])
    np.testing.assert_array_equal(x, ref_x.numpy())
    ours = scorer.score(x)
    np.testing.assert_array_equal(ours.label_ids, ref_ids)
    np.testing.assert_allclose(ours.embedding, ref_emb, atol=1e-5)
    assert ours.embedding.shape[1] == inspect_checkpoint(str(ckpt)).embedding_dim  # the column's width
    with pytest.raises(ValueError, match="without --token-features"):
        scorer.score(x, token_features=True)


def test_a_timm_model_whose_embedding_is_not_num_features_wide_is_refused(tmp_path):
    from deit_model import ModelLoadError

    # MobileNetV3's head has a hidden layer: it pools to 1024, config.json says 288
    ckpt = create_random_timm_checkpoint("mobilenetv3_small_050.lamb_in1k", tmp_path / "c")
    with pytest.raises(ModelLoadError, match="1024 wide, not config.json's num_features .288."):
        create_scorer(str(ckpt), device="cpu")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_normalisation_is_a_table_computed_on_the_cpu(name, tmp_path, photos, monkeypatch):
    """The value steps run once, on the CPU, for each 8-bit value; a device only looks them up.

    On an H200 the steps themselves came out one ulp off (torch's CUDA division by 255 is a
    multiplication by its reciprocal: benchmarks/gpu_check.py, 2026-12-04). Simulated here: a
    device whose division rounds that way changes nothing, since no batch goes through it.
    """
    ckpt = create_random_timm_checkpoint(name, tmp_path / "ckpt", **SMALL[name])
    pre = load_preprocessor(str(ckpt))
    every = torch.arange(256, dtype=torch.uint8).repeat(3 * 16).view(1, 3, 16, 256)
    table = pre.normalize(every)
    assert torch.equal(table, pre._value_steps(every))  # the library's own bits, for every value
    reciprocal = (every.to(torch.float32) * (1 / 255)).ne(every.to(torch.float32).div(255))
    assert reciprocal.any()  # the GPU's rounding is a real difference for some 8-bit values
    calls = []
    steps = type(pre)._value_steps
    monkeypatch.setattr(type(pre), "_value_steps", lambda self, x: calls.append(x.shape) or steps(self, x))
    images = _photos(photos)
    expected = pre(images)
    assert np.array_equal(pre.normalize(torch.from_numpy(pre.to_uint8(images))).numpy(), expected)
    assert calls == []  # the table was built by the first call above, not per batch
    fresh = load_preprocessor(str(ckpt))
    fresh.normalize(torch.from_numpy(pre.to_uint8(images)))
    assert calls == [(1, 3, 1, 256)]  # a new object builds it from one ramp of 256 values per channel
    restored = pickle.loads(pickle.dumps(fresh))
    assert "_tables" not in restored.__dict__  # tables stay where they were built (CUDA ones too)


def test_label_descriptions_are_keyed_by_label_name_as_timm_keys_them():
    """timm's label_descriptions map a class's name (a synset) to its text, not its index."""
    import timm.data

    from deit_model.timm_backend import _labels

    cfg = {"label_names": ["n02085620", "n02123045", "n01440764"],
           "label_descriptions": {"n02085620": "Chihuahua", "n02123045": "tabby, tabby cat",
                                  "n01440764": "tench, Tinca tinca"}}
    info = timm.data.CustomDatasetInfo(label_names=cfg["label_names"], label_descriptions=cfg["label_descriptions"])
    assert _labels(cfg, 3) == [info.index_to_description(i) for i in range(3)] == [
        "Chihuahua", "tabby, tabby cat", "tench, Tinca tinca"]
    assert _labels({"label_names": {"0": "a", "1": "b"}}, 2) == ["a", "b"]
    assert _labels({"label_names": ["a", "b"]}, 3) == ["class_0", "class_1", "class_2"]  # not this model's
