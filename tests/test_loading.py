"""Checkpoint resolution: local dirs, fsspec URIs, the hub, and refusals."""
from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

from deit_model import ModelLoadError, inspect_checkpoint, resolve_checkpoint


def test_local_directory_is_absolute_and_named(tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tiny_checkpoint.parent)
    ref = resolve_checkpoint(tiny_checkpoint.name)
    assert ref.local_dir == str(tiny_checkpoint) and ref.source == str(tiny_checkpoint)
    assert ref.name == "ckpt-tiny"


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))


def test_directory_without_weights_or_with_garbage_weights(tmp_path, tiny_checkpoint):
    from deit_model import create_scorer

    bad = tmp_path / "noweights"
    bad.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", bad)
    with pytest.raises(ModelLoadError, match="no model weights"):
        resolve_checkpoint(str(bad))
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ModelLoadError, match="refused to load|cannot load weights"):
        create_scorer(str(bad), device="cpu")


def test_unsupported_architecture(tmp_path, tiny_checkpoint):
    import json

    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not supported"):
        inspect_checkpoint(resolve_checkpoint(str(other)).local_dir)


def test_checkpoint_from_s3_is_fetched_once_per_version(tiny_checkpoint, s3fs_client, s3_bucket, s3_server,
                                                        tmp_path):
    s3fs_client.put(str(tiny_checkpoint), f"{s3_bucket}/models/tiny", recursive=True)
    uri, options = f"s3://{s3_bucket}/models/tiny", {"endpoint_url": s3_server}
    ref = resolve_checkpoint(uri, storage_options=options)
    assert ref.name == "tiny" and ref.source == uri
    assert inspect_checkpoint(ref.local_dir).embedding_dim == 64
    marker = os.path.join(ref.local_dir, ".complete")
    copied_at = os.stat(marker).st_mtime_ns
    again = resolve_checkpoint(uri, storage_options=options)
    assert again.local_dir == ref.local_dir and os.stat(marker).st_mtime_ns == copied_at  # not copied again
    # new weights at the same URI (a nightly job's model updated in place): a new copy, a new revision
    weights = bytearray((tiny_checkpoint / "model.safetensors").read_bytes())
    weights[-4:] = b"\1\2\3\4"
    (tmp_path / "model.safetensors").write_bytes(bytes(weights))
    s3fs_client.put(str(tmp_path / "model.safetensors"), f"{s3_bucket}/models/tiny/model.safetensors")
    updated = resolve_checkpoint(uri, storage_options=options)
    assert updated.local_dir != ref.local_dir and updated.revision != ref.revision
    s3fs_client.rm(f"{s3_bucket}/models/tiny", recursive=True)
    with pytest.raises(ModelLoadError, match="does not exist or is empty"):
        resolve_checkpoint(uri, storage_options=options)


def test_unreachable_hub_fails_fast_with_one_clear_line(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        resolve_checkpoint("facebook/deit-small-distilled-patch16-224")
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "\n" not in message and "unreachable" in message and "--model" in message


def test_offline_mode_without_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("facebook/deit-small-distilled-patch16-224")


def test_local_revision_is_a_content_hash(tmp_path, tiny_checkpoint):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    first = resolve_checkpoint(str(copy)).revision
    assert first.startswith("sha256:") and first == resolve_checkpoint(str(tiny_checkpoint)).revision
    # rewritten in place, same size: the remembered hash is not reused (the files' times changed)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    assert resolve_checkpoint(str(copy)).revision != first
    assert resolve_checkpoint(str(copy), identify=False).revision is None  # for readers of the config only


def test_a_directory_has_no_branches_and_its_hash_checks_its_weights(tmp_path, tiny_checkpoint):
    """A hub revision given for a checkpoint directory was once ignored without a word."""
    from tasks.plan import CheckpointChanged, run_checkpoint
    from tasks.settings import ScoreSettings

    with pytest.raises(ModelLoadError, match="'v2' names a hub branch.*is a checkpoint directory"):
        resolve_checkpoint(str(tiny_checkpoint), revision="v2")
    revision = resolve_checkpoint(str(tiny_checkpoint)).revision
    settings = ScoreSettings(input="in", output="out", model=str(tiny_checkpoint), revision=revision)
    assert run_checkpoint(settings).revision == revision
    other = settings.model_copy(update={"revision": "sha256:" + "0" * 64})
    with pytest.raises(CheckpointChanged, match=f"is revision {revision}, not the sha256:0+ that"):
        run_checkpoint(other)


def test_content_hash_is_computed_once_per_process(tmp_path, tiny_checkpoint, monkeypatch):
    import builtins

    from deit_model import loading

    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    first = loading.content_hash(str(copy))
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert loading.content_hash(str(copy)) == first and opened == []  # the weights are not read again


def test_bin_weights_load_with_weights_only(tmp_path, tiny_checkpoint, photos):
    """A pytorch_model.bin holding only tensors loads and scores like the safetensors copy."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from deit_model import create_scorer, load_preprocessor

    binary = tmp_path / "bin"
    binary.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_checkpoint / name, binary)
    torch.save(load_file(tiny_checkpoint / "model.safetensors"), binary / "pytorch_model.bin")
    px = load_preprocessor(str(tiny_checkpoint))([Image.open(photos / "china.jpg").convert("RGB")])
    a = create_scorer(str(tiny_checkpoint), device="cpu", dtype="fp32").score(px)
    b = create_scorer(str(binary), device="cpu", dtype="fp32").score(px)
    np.testing.assert_array_equal(a.label_ids, b.label_ids)
    np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.getcwd, ())  # any callable: weights_only must refuse to call it


def test_checkpoint_with_pickled_code_is_refused(tmp_path, tiny_checkpoint):
    import torch
    from safetensors.torch import load_file

    from deit_model import create_scorer

    evil = tmp_path / "evil"
    evil.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_checkpoint / name, evil)
    state = load_file(tiny_checkpoint / "model.safetensors")
    state["payload"] = _RunsCode()
    torch.save(state, evil / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refused to load .*possibly code"):
        create_scorer(str(evil), device="cpu")


def test_inspecting_a_checkpoint_does_not_import_torch(tiny_checkpoint):
    """deit_model imports its submodules on first use, so the command line's checks stay cheap."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        import deit_model
        info = deit_model.inspect_checkpoint(deit_model.resolve_checkpoint({str(tiny_checkpoint)!r}).local_dir)
        print(info.architecture, "torch" in sys.modules)
        print(deit_model.Scorer.__module__, "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["DeiTForImageClassificationWithTeacher", "False", "deit_model.scorer", "True"], \
        out.stderr
    import deit_model

    with pytest.raises(AttributeError):
        deit_model.no_such_name  # noqa: B018
    assert set(deit_model.__all__) <= set(dir(deit_model))


def test_an_unreadable_checkpoint_directory_or_a_file_is_a_model_load_error(tmp_path, tiny_checkpoint):
    """They were tracebacks (IsADirectoryError, FileNotFoundError from the content hash), exit 1 (found in review)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "old.safetensors").symlink_to(tmp_path / "gone")  # a dangling link among the weights
    with pytest.raises(ModelLoadError, match="cannot read checkpoint directory .*old.safetensors"):
        resolve_checkpoint(str(ckpt))
    (ckpt / "old.safetensors").unlink()
    (ckpt / "more.safetensors").mkdir()  # a folder where a weights file should be
    with pytest.raises(ModelLoadError, match="cannot read checkpoint directory .*Is a directory"):
        resolve_checkpoint(str(ckpt))
    with pytest.raises(ModelLoadError, match="is a file; pass the checkpoint's directory"):
        resolve_checkpoint(str(ckpt / "config.json"))
