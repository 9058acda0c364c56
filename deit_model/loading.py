"""Find a checkpoint and load it: hub id, local directory or fsspec URI.

Everything the scorer needs (architecture, labels, preprocessing) is read from
the checkpoint's own files; nothing about a particular model is written here.
Backend errors (huggingface_hub, fsspec, transformers) are translated into
:class:`ModelLoadError` at this one boundary so callers can report one line.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Files a classification checkpoint needs. safetensors weights are preferred;
# pickled .bin weights are fetched only when a repo has no safetensors, and are
# then loaded with torch.load(weights_only=True), which refuses pickled code.
_CHECKPOINT_FILES = ["*.json", "*.safetensors"]
_PICKLED_WEIGHTS = ["pytorch_model*.bin"]
_HUB_PROBE_TIMEOUT_S = 5.0
# "name" or "org/name", as the hub spells repository ids; anything else is a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint resolved to a local directory.

    ``name`` is what goes into the output's ``model`` column: the hub id, or the
    directory's name for local and remote checkpoint directories.
    """

    name: str
    local_dir: str
    source: str
    revision: str | None = None


def cache_root() -> Path:
    """Where downloaded remote checkpoints are kept (``DEIT_SCORING_CACHE``)."""
    default = Path.home() / ".cache" / "deit-batch-scoring"
    return Path(os.environ.get("DEIT_SCORING_CACHE", default))


def resolve_checkpoint(
    model: str, revision: str | None = None, storage_options: dict | None = None, identify: bool = True
) -> CheckpointRef:
    """Resolve ``model`` (hub id, ``timm:<name>``, local dir or fsspec URI) to a local directory.

    A directory's revision is its :func:`content_hash`; ``identify=False``
    leaves it None, for callers that only read the directory's configuration
    (hashing DeiT-base's weights is most of a second of a core).
    """
    if model.startswith("timm:"):
        # timm's pretrained weights live on the hub as timm/<name>[.<tag>]
        name = model[len("timm:"):]
        ref = _fetch_hub(name if "/" in name else f"timm/{name}", revision)
        return CheckpointRef(model, ref.local_dir, model, ref.revision)
    if "://" in model and not model.startswith("file://"):
        _no_branch_of_a_directory(model, revision)
        return _fetch_remote_dir(model, storage_options or {}, identify)
    local = model[len("file://"):] if model.startswith("file://") else model
    if os.path.isdir(local):
        _no_branch_of_a_directory(model, revision)
        local = os.path.abspath(local)  # workers may run elsewhere than the driver's cwd
        try:
            _check_weights(local)
            return CheckpointRef(Path(local).name, local, local, content_hash(local) if identify else None)
        except OSError as exc:  # a weights "file" that is a folder, a dangling link, no permission
            raise ModelLoadError(f"cannot read checkpoint directory {model!r}: {exc}") from exc
    if os.path.isfile(local):
        raise ModelLoadError(f"model {model!r} is a file; pass the checkpoint's directory (save_pretrained format)")
    if not _HUB_ID.fullmatch(model):
        raise ModelLoadError(
            f"model directory {model!r} does not exist; pass an existing checkpoint "
            "directory (save_pretrained format) or a hub id such as "
            "facebook/deit-base-distilled-patch16-224"
        )
    return _fetch_hub(model, revision)


def _no_branch_of_a_directory(model: str, revision: str | None) -> None:
    """A checkpoint directory has no branches, tags or commits: its revision is its content hash."""
    if revision is not None and not revision.startswith("sha256:"):
        raise ModelLoadError(
            f"revision {revision!r} names a hub branch, tag or commit, but model {model!r} is a checkpoint "
            "directory; drop the revision, or give the directory's content hash (sha256:..., in a run's manifest) "
            "to check its weights")


def _fetch_hub(repo_id: str, revision: str | None) -> CheckpointRef:
    try:  # a cached snapshot works offline and needs no network round trip
        path = _snapshot(repo_id, revision, local_files_only=True)
        return CheckpointRef(repo_id, path, repo_id, _commit_of(path))
    except ModelLoadError:
        raise
    except Exception:  # not cached: fall through to the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            "set; download it first or pass a local checkpoint directory"
        )
    endpoint = hub_endpoint()
    problem = probe_hub(endpoint)
    if problem:
        raise ModelLoadError(
            f"cannot download model {repo_id!r}: the hub at {endpoint} is unreachable "
            f"({problem}); set HF_ENDPOINT to a reachable mirror or pass a local checkpoint "
            "directory with --model"
        )
    try:
        path = _snapshot(repo_id, revision, local_files_only=False)
    except ModelLoadError:
        raise
    except Exception as exc:  # RepositoryNotFound, RevisionNotFound, HTTP errors
        raise ModelLoadError(f"cannot download model {repo_id!r} from {endpoint}: {exc}") from exc
    return CheckpointRef(repo_id, path, repo_id, _commit_of(path))


def _snapshot(repo_id: str, revision: str | None, local_files_only: bool) -> str:
    from huggingface_hub import snapshot_download

    # huggingface_hub reads HF_ENDPOINT and HF_HOME once, at import; read them now
    # so a long-lived worker honours the environment it is given.
    kwargs = dict(revision=revision, local_files_only=local_files_only,
                  endpoint=hub_endpoint(), cache_dir=hub_cache_dir())
    path = snapshot_download(repo_id, allow_patterns=_CHECKPOINT_FILES, **kwargs)
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        # older repos (facebook/deit-* on main among them) carry only pytorch_model.bin
        path = snapshot_download(repo_id, allow_patterns=_PICKLED_WEIGHTS, **kwargs)
    _check_weights(path)
    return path


def _commit_of(snapshot_path: str) -> str:
    # the hub cache keeps each revision under snapshots/<commit sha>/
    return Path(snapshot_path).name


def hub_endpoint() -> str:
    """The hub base URL, honouring ``HF_ENDPOINT``."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache_dir() -> str:
    """The hub cache, honouring ``HF_HUB_CACHE`` and ``HF_HOME`` as huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return os.path.join(home, "hub")


def probe_hub(endpoint: str | None = None) -> str | None:
    """Return None when the hub answers, else a short reason.

    One quick request, because huggingface_hub's own retries take ~25 s to give
    up on a machine without network.
    """
    import urllib.error
    import urllib.request

    url = (endpoint or hub_endpoint()) + "/api/models?limit=1"
    try:
        with urllib.request.urlopen(url, timeout=_HUB_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: the server is reachable
    except Exception as exc:  # URLError, timeouts, DNS failures
        return str(getattr(exc, "reason", exc))


def _fetch_remote_dir(uri: str, storage_options: dict, identify: bool = True) -> CheckpointRef:
    """Copy a checkpoint directory from object storage into the local cache, again once it changes.

    The copy is named by the URI and by what the store lists under it (names, sizes, ETags or
    times): one listing per resolve, so new weights at the same URI are fetched, where a copy
    kept by URI alone was used for ever.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        listing = {name: info for name, info in fs.find(path, detail=True).items()
                   if info.get("type") != "directory" and not name.endswith("/")}
        if not listing:
            raise FileNotFoundError(uri)
        target = cache_root() / "checkpoints" / _listing_key(uri, path, listing)
        if not (target / ".complete").exists():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for remote in listing:
                rel = os.path.relpath(remote, path.rstrip("/"))
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(tmp / rel))
            (tmp / ".complete").write_text(uri)
            os.replace(tmp, target) if not target.exists() else None
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model directory {uri!r} does not exist or is empty") from exc
    except Exception as exc:  # OSError, and what drivers raise besides: unknown scheme, no credentials
        detail = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise ModelLoadError(f"cannot read model directory {uri!r}: {type(exc).__name__}: {detail}") from exc
    _check_weights(str(target))
    return CheckpointRef(uri.rstrip("/").rsplit("/", 1)[-1], str(target), uri,
                         content_hash(str(target)) if identify else None)


def _listing_key(uri: str, root: str, listing: dict) -> str:
    """16 hex digits naming one version of a remote directory: its URI, files, sizes and versions."""
    digest = hashlib.sha256(uri.rstrip("/").encode())
    for name in sorted(listing):
        info = listing[name]
        version = next((info[k] for k in ("ETag", "etag", "md5Hash", "LastModified", "updated", "mtime")
                        if info.get(k) is not None), "")
        digest.update(f"\0{os.path.relpath(name, root.rstrip('/'))}\0{info.get('size')}\0{version}".encode())
    return digest.hexdigest()[:16]


_HASHED = (".json", ".safetensors", ".bin")
_hashes: dict[tuple, str] = {}  # per process: (directory, its files' names, sizes, mtimes) -> hash


def content_hash(local_dir: str) -> str:
    """``sha256:<hex>`` over the checkpoint's config, preprocessing and weight files.

    Identifies the exact weights of a local or remote checkpoint directory,
    which have no hub commit to name them. Remembered per process while the
    files' sizes and modification times stay the same: a run's command
    resolves the model three times (checks, plan, score).
    """
    names = sorted(n for n in os.listdir(local_dir) if n.endswith(_HASHED))
    stats = [os.stat(os.path.join(local_dir, n)) for n in names]
    key = (os.path.abspath(local_dir), tuple((n, st.st_size, st.st_mtime_ns) for n, st in zip(names, stats)))
    if key not in _hashes:
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode() + b"\0")
            with open(os.path.join(local_dir, name), "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        if len(_hashes) >= 16:  # a long-lived worker that sees many checkpoints: keep it bounded
            _hashes.clear()
        _hashes[key] = "sha256:" + digest.hexdigest()[:32]
    return _hashes[key]


def _check_weights(local_dir: str) -> None:
    names = os.listdir(local_dir)
    if "config.json" not in names:
        raise ModelLoadError(f"{local_dir!r} has no config.json: not a save_pretrained checkpoint")
    if not any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin"))
               for n in names):
        raise ModelLoadError(
            f"{local_dir!r} has no model weights (model.safetensors or pytorch_model.bin)"
        )
