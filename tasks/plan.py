"""Plan a run: give it an id and write the list of images it will score."""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from . import storage
from .enumerate import IMAGE_EXTENSIONS, list_images, write_plan
from .settings import ScoreSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """Identity of one run and where its bookkeeping lives."""

    run_id: str
    run_date: str  # UTC date of the run's start: the run_date partition
    started_at: str  # ISO 8601, UTC
    output: str

    @property
    def run_dir(self) -> str:
        """``<output>/_runs/<run_id>``: plan and manifest of this run."""
        return storage.join(self.output, "_runs", self.run_id)

    @property
    def plan_uri(self) -> str:
        return storage.join(self.run_dir, "plan.parquet")


def new_run(settings: ScoreSettings, now: datetime | None = None) -> RunInfo:
    """A RunInfo for ``settings``; the id is time-based unless the user set one."""
    now = now or datetime.now(timezone.utc)
    run_id = settings.run_id or f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    return RunInfo(run_id, f"{now:%Y-%m-%d}", now.isoformat(timespec="seconds"), settings.output)


def plan_run(settings: ScoreSettings, run: RunInfo) -> int:
    """List the input and write the run's plan file; return the number of images."""
    objects = list_images(settings.input, settings.storage_options)
    count = write_plan(objects, run.plan_uri, settings.storage_options)
    if count == 0:
        logger.warning("no images found under %s (extensions: %s)", settings.input,
                       ", ".join(sorted(IMAGE_EXTENSIONS)))
    return count
