"""Our scorer against the reference library, on real photographs, same weights.

The reference is transformers itself: ``AutoImageProcessor.from_pretrained``
(the torchvision-backed processor of transformers 5) and the checkpoint's
model class, plus ``pipeline("image-classification")`` and the bare
``DeiTModel``/``ViTModel`` backbones for the embedding definition.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoModelForImageClassification, DeiTModel, ViTModel,
                          pipeline)

from deit_model import create_random_checkpoint, create_scorer, load_preprocessor, to_model_input

from .conftest import TINY_OVERRIDES


def _photos(photos):
    return [Image.open(p).convert("RGB") for p in sorted(photos.iterdir())]


def _reference(ckpt, images):
    proc = AutoImageProcessor.from_pretrained(ckpt)
    model = AutoModelForImageClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        logits = model(**proc(images, return_tensors="pt")).logits
    return logits


def test_distilled_matches_transformers(tiny_checkpoint, photos):
    images = _photos(photos)
    scorer = create_scorer(str(tiny_checkpoint), top_k=5, device="cpu", dtype="fp32")
    ours = scorer.score(load_preprocessor(str(tiny_checkpoint))(images))
    probs = _reference(tiny_checkpoint, images).softmax(-1)
    ref_scores, ref_ids = probs.topk(5)
    assert np.array_equal(ours.label_ids, ref_ids.numpy())
    np.testing.assert_allclose(ours.scores, ref_scores.numpy(), atol=1e-5)
    assert np.all(np.diff(ours.scores, axis=1) <= 0)  # best first
    # embedding: mean of final-norm class and distillation tokens of the bare backbone
    proc = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    backbone = DeiTModel.from_pretrained(tiny_checkpoint, add_pooling_layer=False).eval()
    with torch.no_grad():
        h = backbone(**proc(images, return_tensors="pt")).last_hidden_state
    ref_emb = ((h[:, 0] + h[:, 1]) / 2).numpy()
    cos = (ours.embedding * ref_emb).sum(1) / np.linalg.norm(ours.embedding, axis=1) / np.linalg.norm(ref_emb, axis=1)
    assert ours.embedding.shape == (len(images), TINY_OVERRIDES["hidden_size"])
    assert cos.min() > 0.9999
    np.testing.assert_allclose(ours.embedding, ref_emb, atol=1e-5)


def test_distilled_matches_transformers_pipeline(tiny_checkpoint, photos):
    images = _photos(photos)[:3]
    pipe = pipeline("image-classification", model=str(tiny_checkpoint), device="cpu")
    ref = pipe(images, top_k=3)
    scorer = create_scorer(str(tiny_checkpoint), top_k=3, device="cpu", dtype="fp32")
    ours = scorer.score(load_preprocessor(str(tiny_checkpoint))(images))
    for i, row in enumerate(ref):
        assert [r["label"] for r in row] == scorer.labels(ours.label_ids)[i]
        np.testing.assert_allclose([r["score"] for r in row], ours.scores[i], atol=1e-5)
        alone = scorer.score(load_preprocessor(str(tiny_checkpoint))(images[i:i + 1]))  # as the pipeline runs
        assert alone.scores[0].tolist() == [r["score"] for r in row]  # to the last bit


def test_non_distilled_vit_class_checkpoint(tmp_path, photos):
    ckpt = create_random_checkpoint("facebook/deit-tiny-patch16-224", tmp_path / "vit", **TINY_OVERRIDES)
    images = _photos(photos)
    scorer = create_scorer(str(ckpt), top_k=4, device="cpu", dtype="fp32")
    processor = load_preprocessor(str(ckpt))
    assert list(processor.to_dict()["image_mean"]) == [0.5, 0.5, 0.5]  # its own preprocessing, not ImageNet's
    ours = scorer.score(processor(images))
    ref_scores, ref_ids = _reference(ckpt, images).softmax(-1).topk(4)
    assert np.array_equal(ours.label_ids, ref_ids.numpy())
    np.testing.assert_allclose(ours.scores, ref_scores.numpy(), atol=1e-5)
    backbone = ViTModel.from_pretrained(ckpt, add_pooling_layer=False).eval()
    with torch.no_grad():
        h = backbone(**AutoImageProcessor.from_pretrained(ckpt)(images, return_tensors="pt")).last_hidden_state
    np.testing.assert_allclose(ours.embedding, h[:, 0].numpy(), atol=1e-5)


@pytest.mark.parametrize("name", [
    "facebook/deit-tiny-distilled-patch16-224", "facebook/deit-small-distilled-patch16-224",
    "facebook/deit-base-distilled-patch16-224", "facebook/deit-base-distilled-patch16-384",
    "facebook/deit-tiny-patch16-224", "facebook/deit-small-patch16-224", "facebook/deit-base-patch16-224",
])
def test_every_hub_checkpoint_matches_transformers(name, tmp_path, photos):
    """Each published configuration (small width, real preprocessing) against transformers itself."""
    from deit_model import inspect_checkpoint

    ckpt = create_random_checkpoint(name, tmp_path / "c", **TINY_OVERRIDES)
    rng = np.random.default_rng(1)  # and odd shapes: one pixel, three rows, three columns
    images = _photos(photos) + [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                                for h, w in ((1, 1), (3, 7), (7, 3), (3, 3), (401, 3))]
    pre = load_preprocessor(str(ckpt))
    ref_proc = AutoImageProcessor.from_pretrained(ckpt)
    ref_x = ref_proc(images, return_tensors="pt")["pixel_values"].numpy()
    np.testing.assert_array_equal(pre(images), ref_x)
    # the decode tasks' half (8-bit resize and crop), finished on the actor's device: the same pixels
    assert pre.splits_exactly()
    np.testing.assert_array_equal(to_model_input(pre.to_uint8(images), pre, torch.device("cpu")).numpy(), ref_x)
    ours = create_scorer(str(ckpt), top_k=5, device="cpu", dtype="fp32").score(pre(images))
    ref_scores, ref_ids = _reference(ckpt, images).softmax(-1).topk(5)
    np.testing.assert_array_equal(ours.label_ids, ref_ids.numpy())
    np.testing.assert_allclose(ours.scores, ref_scores.numpy(), atol=1e-4)
    distilled = "distilled" in name
    backbone = (DeiTModel if distilled else ViTModel).from_pretrained(ckpt, add_pooling_layer=False).eval()
    with torch.no_grad():
        h = backbone(**ref_proc(images, return_tensors="pt")).last_hidden_state
    ref_emb = ((h[:, 0] + h[:, 1]) / 2 if distilled else h[:, 0]).numpy()
    cos = (ours.embedding * ref_emb).sum(1) / np.linalg.norm(ours.embedding, axis=1) / np.linalg.norm(ref_emb, axis=1)
    assert cos.min() >= 0.9999
    side = 384 if "384" in name else 224
    assert pre(images[:1]).shape == (1, 3, side, side)
    assert inspect_checkpoint(str(ckpt)).architecture == (
        "DeiTForImageClassificationWithTeacher" if distilled else "ViTForImageClassification")


def test_multi_class_fine_tune_with_its_own_labels(tmp_path, photos):
    """An Azure fridgeObjects-style multi-class fine-tune: its own label set, softmax."""
    fridge = ["can", "carton", "milk_bottle", "water_bottle"]
    ckpt = create_random_checkpoint("facebook/deit-base-patch16-224", tmp_path / "fridge", labels=fridge,
                                    **TINY_OVERRIDES)
    images = _photos(photos)[:3]
    scorer = create_scorer(str(ckpt), top_k=5, device="cpu", dtype="fp32")
    ours = scorer.score(load_preprocessor(str(ckpt))(images))
    assert scorer.activation == "softmax" and ours.label_ids.shape == (3, 4)  # top_k capped at 4 labels
    np.testing.assert_allclose(ours.scores.sum(axis=1), 1.0, atol=1e-5)
    pipe = pipeline("image-classification", model=str(ckpt), device="cpu")
    for i, row in enumerate(pipe(images, top_k=4)):
        assert [r["label"] for r in row] == scorer.labels(ours.label_ids)[i]
        assert set(r["label"] for r in row) == set(fridge)


def test_multi_label_checkpoint_uses_sigmoid(tmp_path, photos):
    ckpt = create_random_checkpoint(
        "facebook/deit-tiny-distilled-patch16-224", tmp_path / "ml", num_labels=4,
        problem_type="multi_label_classification", **TINY_OVERRIDES)
    images = _photos(photos)[:2]
    scorer = create_scorer(str(ckpt), top_k=4, device="cpu", dtype="fp32")
    ours = scorer.score(load_preprocessor(str(ckpt))(images))
    assert scorer.activation == "sigmoid"
    ref = torch.sigmoid(_reference(ckpt, images))
    np.testing.assert_allclose(np.sort(ours.scores, axis=1), np.sort(ref.numpy(), axis=1), atol=1e-5)
    assert scorer.labels(ours.label_ids)[0][0].startswith("class_")


@pytest.mark.parametrize("kind, config, activation", [
    ("one_logit", dict(num_labels=1), "sigmoid"),
    ("regression", dict(num_labels=3, problem_type="regression"), "none"),
    # confident multi-label logits saturate sigmoid to exactly 1.0: ties, in ascending label order
    ("saturated", dict(num_labels=8, problem_type="multi_label_classification", initializer_range=3.0), "sigmoid"),
])
def test_activation_and_tie_order_follow_the_pipeline(tmp_path, photos, kind, config, activation):
    overrides = {**TINY_OVERRIDES, **config}
    ckpt = create_random_checkpoint("facebook/deit-tiny-distilled-patch16-224", tmp_path / kind, **overrides)
    images = _photos(photos)
    scorer = create_scorer(str(ckpt), top_k=3, device="cpu", dtype="fp32")
    ours = scorer.score(load_preprocessor(str(ckpt))(images))
    assert scorer.activation == activation
    pipe = pipeline("image-classification", model=str(ckpt), device="cpu")
    for i, row in enumerate(pipe(images, top_k=3)):
        assert scorer.labels(ours.label_ids)[i] == [r["label"] for r in row]
        np.testing.assert_allclose(ours.scores[i], [r["score"] for r in row], rtol=1e-5, atol=1e-6)
    if kind == "saturated":
        assert (ours.scores == 1.0).sum() >= 2  # the case is really a tie
    # one image at a time, as the pipeline runs them (fp32 logits depend on the batch's size):
    # the same scores to the last bit, the pipeline's numpy activation and not torch's
    pixels = load_preprocessor(str(ckpt))(images)
    for i, row in enumerate(pipe(images, top_k=3)):
        alone = scorer.score(pixels[i:i + 1])
        assert alone.scores[0].tolist() == [r["score"] for r in row], kind
        assert scorer.labels(alone.label_ids)[0] == [r["label"] for r in row]


def test_pipeline_top_k_orders_as_a_stable_sort_and_looks_past_its_candidates():
    from deit_model.scorer import pipeline_top_k

    exact = np.array([[0.1, 0.5, 0.5, 0.2, 0.5], [0.9, 0.1, 0.3, 0.3, 0.0]], np.float32)
    # the device's order put id 2 before 1 (its ulp differed) and missed id 4 in row 0
    candidates = np.array([[2, 1, 3], [0, 3, 2]])
    scores, ids = pipeline_top_k(exact, candidates, 2)
    assert ids.tolist() == [[1, 2], [0, 2]] and scores.tolist() == [[0.5, 0.5], [0.8999999761581421, 0.30000001192092896]]
    scores, ids = pipeline_top_k(exact, candidates, 3)
    assert ids.tolist()[0] == [1, 2, 4]  # id 4 ties the third: the row is sorted whole


def test_full_size_base_shapes(tmp_path, photos):
    """One full-size configuration: DeiT-base distilled, 768-d embedding, 198 tokens."""
    ckpt = create_random_checkpoint("facebook/deit-base-distilled-patch16-224", tmp_path / "base")
    scorer = create_scorer(str(ckpt), top_k=5, device="cpu", dtype="fp32")
    px = load_preprocessor(str(ckpt))(_photos(photos)[:1])
    assert px.shape == (1, 3, 224, 224)
    out = scorer.model(torch.as_tensor(px))
    assert out.features.shape == (1, 198, 768)
    assert out.logits.shape == (1, 1000) and scorer.embedding_dim == 768
    assert scorer.id2label[0] == "tench, Tinca tinca"


@pytest.mark.parametrize("dtype", ["bf16"])
def test_low_precision_on_cpu_agrees_roughly(tiny_checkpoint, photos, dtype):
    images = _photos(photos)
    px = load_preprocessor(str(tiny_checkpoint))(images)
    fp32 = create_scorer(str(tiny_checkpoint), top_k=1, device="cpu", dtype="fp32").score(px)
    low = create_scorer(str(tiny_checkpoint), top_k=1, device="cpu", dtype=dtype).score(px)
    assert low.scores.dtype == np.float32 and low.embedding.dtype == np.float32
    cos = (fp32.embedding * low.embedding).sum(1) / (
        np.linalg.norm(fp32.embedding, axis=1) * np.linalg.norm(low.embedding, axis=1))
    assert cos.min() > 0.99


def test_processor_is_handed_its_own_tensor_layout(tiny_checkpoint, photos):
    """PIL images reach the processor as the tensor it would make of them: it copies nothing more."""
    pre = load_preprocessor(str(tiny_checkpoint))
    [tensor] = pre._inputs(_photos(photos)[:1])["images"]
    assert tensor.dtype == torch.uint8 and tensor.shape[0] == 3
    out = pre.processor.process_image(tensor, input_data_format="channels_first")
    assert out.data_ptr() == tensor.data_ptr()  # the processor kept it as given


def test_processor_without_torchvision_conversion_gets_pil_images(tiny_checkpoint, photos):
    """A processor with no ``process_image`` (another backend) is given the PIL images themselves."""
    from deit_model.preprocess import HFPreprocessor

    class Wrapped:  # the real processor's call, without its torchvision internals
        def __init__(self, processor):
            self.call = processor

        def __call__(self, **kwargs):
            assert "input_data_format" not in kwargs and all(isinstance(i, Image.Image) for i in kwargs["images"])
            return self.call(**kwargs)

    images = _photos(photos)
    ref = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    assert HFPreprocessor(Wrapped(ref))._convert is None
    np.testing.assert_array_equal(HFPreprocessor(Wrapped(ref))(images), ref(images, return_tensors="pt")["pixel_values"])
