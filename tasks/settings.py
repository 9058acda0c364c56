"""The run's settings: one typed model, the single definition of every parameter.

The Prefect flow's signature, the server-side parameter schema and the CLI's
options are all generated from :class:`ScoreSettings`, so a field added here
appears everywhere with the same type, default, bounds and help.
"""
from __future__ import annotations

import inspect
import os
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .storage import GLOB_CHARS

DEFAULT_MODEL = "facebook/deit-base-distilled-patch16-224"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# In the parameter schema too, so that the server refuses a flow run before a worker starts it;
# the validators below say the same in words (pydantic's own pattern error would only quote the regex)
_NOT_BLANK = {"minLength": 1, "pattern": r"\S"}


class ScoreSettings(BaseModel):
    """Parameters of one scoring run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="images to score: a local path, an fsspec URI prefix (s3://bucket/dir), a glob, "
                                   "or a manifest file (.txt, .csv or .parquet with a uri column)",
                       json_schema_extra=_NOT_BLANK)
    output: str = Field(description="where the Parquet dataset is written: a local path or an fsspec URI",
                        json_schema_extra=_NOT_BLANK)
    model: str = Field(DEFAULT_MODEL, description="hub id, timm:<name>, local checkpoint directory or fsspec URI of one",
                       json_schema_extra=_NOT_BLANK)
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit) of the model")
    top_k: int = Field(5, ge=1, le=1000, description="how many labels to keep per image")
    batch_size: Optional[int] = Field(
        None, ge=1, le=4096, description="images per model forward pass; unset: 128 with GPU actors, 16 without "
                                         "(the fastest measured, docs/benchmarks.md)")
    num_actors: Optional[int] = Field(
        None, ge=1, le=1024, description="scoring actors, each holding one model copy; unset: one per GPU "
                                         "(--gpus-per-actor each) on a cluster with GPUs, else one per "
                                         "--cpus-per-actor of the CPUs that decode tasks leave")
    gpus_per_actor: float = Field(
        1.0, ge=0, le=8, description="GPUs each actor asks for when the cluster has GPUs (fractions share a GPU)")
    cpus_per_actor: float = Field(1.0, gt=0, le=64, description="CPUs each scoring actor reserves")
    decode_cpus: Optional[float] = Field(
        None, ge=0, le=64, description="CPUs each decode task reserves; 0 decodes inside the scoring actors; unset: "
                                       "1 with GPU actors, 0 without (where decode and model share the cores, "
                                       "decoding in the actors is fastest)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="model precision: auto is bf16 on GPUs that support it, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where actors run the model")
    ray_address: Optional[str] = Field(
        None, description="address of an existing Ray cluster (RAY_ADDRESS also works); unset starts a local one")
    resource_wait_seconds: float = Field(
        0, ge=0, le=86_400, description="when the cluster is too small for the actors, ask the Ray autoscaler for "
                                        "the missing resources and wait up to this long (0: fail at once)")
    run_id: Optional[str] = Field(
        None, description="id for this run; generated when unset. Rerunning an unfinished run's id resumes it",
        json_schema_extra={"pattern": f"^{_RUN_ID.pattern}$"})
    include: list[str] = Field(
        default_factory=list, description="only objects whose path (relative to input) matches one of these globs")
    exclude: list[str] = Field(
        default_factory=list, description="skip objects whose path (relative to input) matches one of these globs")
    modified_after: Optional[datetime] = Field(None, description="only objects modified at or after this time (ISO 8601)")
    modified_before: Optional[datetime] = Field(None, description="only objects modified before this time (ISO 8601)")
    limit: Optional[int] = Field(
        None, ge=1, description="score at most this many of the objects left to score (after already scored ones are skipped)")
    force: bool = Field(False, description="rescore every listed object, even those already scored (after a model upgrade, say)")
    only_failed: Optional[str] = Field(
        None, description="rescore only objects that failed: in this run id, or 'any' for those whose latest result is an error")
    max_failed: Optional[int] = Field(None, ge=0, description="fail the run when more images than this fail")
    max_failed_fraction: Optional[float] = Field(
        None, ge=0, le=1, description="fail the run when more than this share of its images fail (0.05 = 5%)")
    checkpoint_seconds: float = Field(
        300, gt=0, description="finish a staged file at least this often, bounding the work a crash can lose")
    progress_seconds: float = Field(
        10, gt=0, le=3600, description="seconds between progress lines (images done, rate, failures) while scoring")
    token_features: bool = Field(
        False, description="also write the unpooled final-norm token features (T x D floats per image)")
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32", description="storage type of embeddings (and token features); float16 halves their size")
    fast_decode: bool = Field(
        False, description="decode JPEGs at reduced scale (DCT domain); faster, changes pixels slightly")
    device_decode: bool = Field(
        False, description="decode plain JPEGs on the scoring device (nvJPEG on a GPU) instead of with PIL on CPU "
                           "workers; for GPUs that CPU decoding cannot keep busy; changes pixels slightly")
    max_pixels: int = Field(178_956_970, ge=1, description="images with more pixels are rejected as too large")
    max_bytes: int = Field(
        2**30, ge=1, description="objects larger than this many bytes (as listed) are not read: they become "
                                 "too_many_bytes error rows")
    rows_per_file: int = Field(50_000, ge=1, description="rows per Parquet file before a new file is started")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for input/output/model (for example endpoint_url); keep secrets in the environment")

    @field_validator("input", "output", "model")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            # a deployment's "{{ $VAR }}" whose variable was unset at `prefect deploy` is '' (Prefect 3)
            raise ValueError("must not be empty (from a deployment: set the variable its parameter names, "
                             "then deploy again)")
        return v.strip()

    @field_validator("output")
    @classmethod
    def _output_literal(cls, v: str) -> str:
        # fsspec reads '*', '?' and '[' as patterns wherever it lists, moves or deletes: under
        # "scores [v2]" the commit would find none of the run's staged files and discard them
        if GLOB_CHARS & set(v):
            raise ValueError("must not contain '*', '?' or '[' (the storage layer reads them as patterns); "
                             "choose a folder name without them")
        return v

    @field_validator("run_id")
    @classmethod
    def _run_id_safe(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _RUN_ID.fullmatch(v):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 128)")
        return v

    @field_validator("only_failed")
    @classmethod
    def _a_run_or_any(cls, v: Optional[str]) -> Optional[str]:
        # '' ran an ordinary incremental run, recorded as only_failed '' (found in review)
        if v is not None and not _RUN_ID.fullmatch(v.strip()):
            raise ValueError("must name a run id (score-images runs lists them) or be 'any'")
        return v if v is None else v.strip()

    @model_validator(mode="after")
    def _one_decode_shortcut(self) -> "ScoreSettings":
        if self.fast_decode and self.device_decode:
            raise ValueError("fast_decode and device_decode are alternative ways to decode faster: choose one")
        if self.device == "cuda" and self.gpus_per_actor == 0:
            raise ValueError("device=cuda needs gpus_per_actor above 0 (actors without a GPU run on the CPU)")
        after, before = self.modified_after, self.modified_before
        if after and before and as_utc(after) >= as_utc(before):
            raise ValueError(f"modified_after ({after.isoformat()}) must be earlier than modified_before "
                             f"({before.isoformat()}): no object can be in that window")
        return self

    def resolved_ray_address(self) -> Optional[str]:
        """The Ray address to connect to: the setting, else ``RAY_ADDRESS``."""
        return self.ray_address or os.environ.get("RAY_ADDRESS") or None


def as_utc(t: datetime) -> datetime:
    """A time as UTC; a naive one is taken as UTC, as the listing takes it (runs.md)."""
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def settings_signature(model: type[BaseModel] = ScoreSettings) -> inspect.Signature:
    """A keyword-only signature mirroring ``model``'s fields (types, bounds, defaults)."""
    params = []
    for name, field in model.model_fields.items():
        default = inspect.Parameter.empty
        if not field.is_required():
            default = field.default_factory() if field.default_factory else field.default
        annotation = Annotated[(field.annotation, *field.metadata,
                                Field(description=field.description, json_schema_extra=field.json_schema_extra))]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return inspect.Signature(params)


def settings_docstring(summary: str, model: type[BaseModel] = ScoreSettings) -> str:
    """``summary`` plus a Google-style Args section; Prefect reads parameter help from it."""
    args = "\n".join(f"    {name}: {field.description}" for name, field in model.model_fields.items())
    return f"{summary}\n\nArgs:\n{args}\n"


# a field's name in a message: those with an underscore, or any before '=' ("device=cuda"); plain
# words such as "input" or "model" are left as they are
_FIELDS = sorted(ScoreSettings.model_fields, key=len, reverse=True)
_FIELD_IN_TEXT = re.compile(r"\b(?:" + "|".join(n for n in _FIELDS if "_" in n) + r")\b"
                            r"|\b(?:" + "|".join(_FIELDS) + r")(?==)")


def name_fields(text: str, name=str) -> str:
    """``text`` with the settings' names in it (those with an underscore) as ``name`` spells them."""
    return _FIELD_IN_TEXT.sub(lambda m: name(m.group(0)), text)


def format_validation_error(exc, name=str, whole: str = "settings") -> str:
    """One line from a pydantic ValidationError: 'field: message (got X)' per problem.

    ``name`` turns a field's name into what the reader typed (the CLI: ``top_k`` ->
    ``--top-k``); ``whole`` names a rule between fields.
    """
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        message = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own ValueErrors
        if not loc:  # a rule between fields names them in its message: as the reader typed them too
            message = name_fields(message, name)
        parts.append(f"{name(loc) if loc else whole}: {message}{shown}")
    return "; ".join(parts)
