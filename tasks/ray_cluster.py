"""Connect to Ray: an existing cluster by address, or a local one we start and stop."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger(__name__)


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the already-initialised Ray, else connect to ``address``, else start locally.

    A cluster this function started is shut down on exit; one it merely
    joined (or found initialised) is left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=True)
    # with no address, ray.init joins a cluster already running on this machine
    # (ray start) or starts a private one; either way it is ours to disconnect from
    logger.info("ray: connected to %s with %s", address or "a local cluster", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))
