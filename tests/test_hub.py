"""The hub download path, for real, against a local hub served over HTTP (HF_ENDPOINT)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deit_model import create_random_timm_checkpoint, create_scorer, load_preprocessor, resolve_checkpoint

from .conftest import TINY_MODEL
from .hub_server import LocalHub


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # a cold cache per test
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with LocalHub() as local:
        monkeypatch.setenv("HF_ENDPOINT", local.endpoint)
        local.sha = local.add(TINY_MODEL, tiny_checkpoint)
        yield local


def test_hub_id_downloads_through_hf_endpoint(hub, tiny_checkpoint, photos, tmp_path):
    ref = resolve_checkpoint(TINY_MODEL)
    assert ref.name == TINY_MODEL and ref.revision == hub.sha  # the commit, not "main"
    assert ref.local_dir.startswith(str(tmp_path / "hf-home"))
    assert any("/resolve/" in r and r.endswith("model.safetensors") for r in hub.requests)
    img = [Image.open(photos / "china.jpg").convert("RGB")]
    a = create_scorer(TINY_MODEL, device="cpu", dtype="fp32").score(load_preprocessor(ref.local_dir)(img))
    b = create_scorer(str(tiny_checkpoint), device="cpu", dtype="fp32").score(load_preprocessor(ref.local_dir)(img))
    np.testing.assert_array_equal(a.label_ids, b.label_ids)


def test_pinned_revision_and_offline_cache(hub, monkeypatch):
    assert resolve_checkpoint(TINY_MODEL).revision == hub.sha  # "main" resolves to the commit
    assert resolve_checkpoint(TINY_MODEL, revision=hub.sha).revision == hub.sha
    with pytest.raises(Exception, match="cannot download"):
        resolve_checkpoint(TINY_MODEL, revision="0" * 40)
    # once cached, offline mode needs no server at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    assert resolve_checkpoint(TINY_MODEL).revision == hub.sha
    assert hub.requests == []


def test_unknown_repo_is_one_clear_error(hub):
    with pytest.raises(Exception) as err:
        resolve_checkpoint("facebook/no-such-model")
    assert "cannot download model 'facebook/no-such-model'" in str(err.value)


def test_timm_name_downloads_timm_repo(hub, tmp_path):
    pytest.importorskip("timm")
    ckpt = create_random_timm_checkpoint("deit_base_distilled_patch16_224.fb_in1k", tmp_path / "t",
                                         depth=1, embed_dim=32, num_heads=2)
    sha = hub.add("timm/deit_base_distilled_patch16_224.fb_in1k", ckpt)
    ref = resolve_checkpoint("timm:deit_base_distilled_patch16_224.fb_in1k")
    assert ref.name == "timm:deit_base_distilled_patch16_224.fb_in1k" and ref.revision == sha
    scorer = create_scorer("timm:deit_base_distilled_patch16_224.fb_in1k", device="cpu", dtype="fp32")
    assert scorer.embedding_dim == 32 and scorer.model.info.backend == "timm"
