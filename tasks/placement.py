"""Where a run's scoring actors go: GPU or CPU, how many, and the CPUs left for decoding.

What the settings leave unset is chosen for the cluster (:func:`resolve_layout`);
a layout that cannot run is refused before anything starts (:class:`ResourceError`),
or, with ``resource_wait_seconds``, asked of the autoscaler and waited for.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .ray_cluster import cluster_resources
from .settings import ScoreSettings

logger = logging.getLogger(__name__)

# The batch sizes an unset --batch-size resolves to, the fastest measured end to end (docs/benchmarks.md):
# a GPU's forward pass gains little past 128 (DeiT-base bf16 on an H200: 9,936 img/s at 128, 10,149 at
# 256) while each batch in flight holds more memory; a 1-thread CPU actor runs faster on batches of 16
# than of 32 (DeiT-tiny, 2 cores: 4 % in three alternating pairs), its activations staying in cache.
GPU_BATCH_SIZE = 128
CPU_BATCH_SIZE = 16


class ResourceError(ValueError):
    """The requested actors cannot fit the cluster alongside the decode stage."""


@dataclass(frozen=True)
class Placement:
    """How scoring actors are placed: device and resources per actor, how many, and the decode stage."""

    device: str
    num_gpus: float
    num_cpus: float
    spare_cpus: float = 0.0  # the cluster's CPUs the actors leave, for decode tasks
    num_actors: int = 1
    decode_cpus: float = 0.0  # CPUs per decode task; 0: the actors decode
    batch_size: int = CPU_BATCH_SIZE  # images per forward pass


def resolve_layout(settings: ScoreSettings, cpus: float, gpus: float) -> tuple[bool, int, float]:
    """(GPU actors?, actors, CPUs per decode task): the settings, with what they leave unset chosen for the cluster.

    Unset, the layout is the fastest measured (docs/benchmarks.md): GPU actors on every GPU,
    fed by decode tasks of 1 CPU on the CPUs they leave; on a cluster without GPUs, one actor
    per ``cpus_per_actor`` of its CPUs, each decoding its own images, since there decode and
    model share the cores (on 2 cores 1.5 times the rate of 1 actor beside decode tasks).
    """
    use_gpu = gpus > 0 and settings.device != "cpu" and settings.gpus_per_actor > 0
    decode = settings.decode_cpus
    if decode is None:  # device=cuda on a cluster still without GPUs: its GPU actors will want them
        decode = 1.0 if use_gpu or settings.device == "cuda" else 0.0
    actors = settings.num_actors
    if actors is None:
        if use_gpu:
            per = gpus // settings.gpus_per_actor
        elif settings.device == "cuda":  # no GPUs yet to count: one GPU actor is what it asks for
            per = 1
        else:
            per = (cpus - decode) // settings.cpus_per_actor
        actors = max(1, int(per))
    return use_gpu, actors, decode


def plan_placement(settings: ScoreSettings, cpus: float, gpus: float) -> Placement:
    """Choose GPU or CPU actors and how many, refusing layouts that would starve decode (and hang)."""
    use_gpu, actors, decode = resolve_layout(settings, cpus, gpus)
    if settings.device == "cuda" and not use_gpu:
        raise ResourceError("device=cuda but the Ray cluster has no GPUs; use --device auto or cpu")
    if use_gpu and actors * settings.gpus_per_actor > gpus:
        raise ResourceError(
            f"{actors} actors x {settings.gpus_per_actor} GPU exceed the cluster's "
            f"{gpus:g} GPUs; lower --num-actors or --gpus-per-actor")
    needed = actors * settings.cpus_per_actor + decode
    if needed > cpus:
        raise ResourceError(
            f"{actors} actors x {settings.cpus_per_actor:g} CPU + {decode:g} "
            f"CPU for decoding need {needed:g} CPUs but the cluster has {cpus:g}; lower "
            "--num-actors, --cpus-per-actor or --decode-cpus")
    return Placement("cuda" if use_gpu else "cpu", settings.gpus_per_actor if use_gpu else 0.0,
                     settings.cpus_per_actor, cpus - actors * settings.cpus_per_actor, actors, decode,
                     settings.batch_size or default_batch_size(use_gpu))


def default_batch_size(gpu: bool) -> int:
    """The batch size an unset ``batch_size`` resolves to: for GPU actors, or for CPU ones."""
    return GPU_BATCH_SIZE if gpu else CPU_BATCH_SIZE


def await_placement(settings: ScoreSettings) -> tuple[Placement, bool]:
    """(placement, whether resources were requested): plan_placement, waiting for an autoscaler.

    A cluster that scales from zero (docs/production.md) has no GPU workers
    when a run starts; with ``resource_wait_seconds`` the run asks the
    autoscaler for its actors and decode CPUs and waits for them to join.
    """
    resources = cluster_resources()
    try:
        return plan_placement(settings, *resources), False
    except ResourceError:
        if settings.resource_wait_seconds <= 0:
            raise
    _, actors, decode_cpus = resolve_layout(settings, *resources)
    actor = {"CPU": settings.cpus_per_actor}
    if settings.device == "cuda":
        actor["GPU"] = settings.gpus_per_actor
    decode = [{"CPU": decode_cpus}] if decode_cpus > 0 else []
    _request_resources([dict(actor) for _ in range(actors)] + decode)
    logger.info("waiting up to %.0f s for the cluster to provide %d x %s + %g decode CPUs",
                settings.resource_wait_seconds, actors, actor, decode_cpus)
    deadline = time.monotonic() + settings.resource_wait_seconds
    try:
        while True:
            time.sleep(2.0)
            try:
                return plan_placement(settings, *cluster_resources()), True
            except ResourceError as exc:
                if time.monotonic() > deadline:
                    raise ResourceError(f"{exc} (still, after waiting {settings.resource_wait_seconds:g} s "
                                        "for the autoscaler)") from None
    except BaseException:  # the deadline, Ctrl-C, a failing cluster: the request must not outlive the run
        release_resources()
        raise


def release_resources() -> None:
    """Withdraw this run's standing autoscaler request, so the cluster may scale down again."""
    _request_resources([])


def _request_resources(bundles: list[dict]) -> None:
    """Ask the autoscaler for ``bundles`` (none: withdraw the request), from inside the cluster.

    Why a task: ``ray.autoscaler.sdk`` needs the process's own GCS client, which a driver
    connected through Ray Client (``ray://``, as the Kubernetes work pool's runs are) does
    not have. A task with no CPU runs on a node of the cluster, even one with none free.
    """
    import ray

    @ray.remote(num_cpus=0, max_retries=3)
    def request(bundles: list[dict]) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)

    ray.get(request.remote(bundles))
