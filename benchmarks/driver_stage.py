"""The host's share of scoring alone, with the model left out: how many images per second it carries.

On a GPU the model runs at thousands of images per second, so what stays on
the CPU per image matters: the scoring actor's result rows (top-k labels,
embedding, lineage: ``tasks.score.ScoringActor``) and the driver's loop
(results through Ray, Parquet written and staged, progress:
``tasks.pipeline.stream_plan`` and ``tasks.write.DatasetWriter``). This
replays model outputs (random values in DeiT-base's shapes: top-5 of the
1,000 ImageNet labels, 768-float embeddings) through the real pool, driver
loop and writer, and reports images per second and the CPU seconds each
side spent per image; and Parquet writing alone, with the pipeline's
options (``tasks.schema.parquet_options``) against pyarrow's defaults. Not measured here: pixels reaching the actor
(benchmarks/decode_stage.py) and the forward pass (the ceiling).

    python benchmarks/driver_stage.py --images 20000 --batch-size 256
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from deit_model.scorer import Scorer
from tasks.score import ScoringActor

logger = logging.getLogger(__name__)


class ReplayScorer(Scorer):
    """A ``deit_model.Scorer`` whose forward pass is replaced by random outputs of its shapes.

    No model is loaded; labels, activation and streams are the Scorer's own.
    """

    def __init__(self, embedding_dim: int, top_k: int):  # noqa: super().__init__ would load a model
        import torch

        from deit_model import CheckpointRef
        from deit_model.random_checkpoint import imagenet_labels

        self.device, self.activation, self.id2label = torch.device("cpu"), "softmax", imagenet_labels()
        self.top_k, self.embedding_dim = top_k, embedding_dim
        self.ref = CheckpointRef("replayed", "", "replayed", "replayed")
        self.rng = np.random.default_rng(0)

    def score(self, n: int, token_features: bool = False):
        """``n`` images' outputs: label ids, scores (descending) and embeddings, as a model's."""
        from deit_model import ScoreResult

        ids = self.rng.integers(0, len(self.id2label), (n, self.top_k), dtype=np.int32)
        scores = -np.sort(-self.rng.random((n, self.top_k), dtype=np.float32), axis=1)
        return ScoreResult(ids, scores, self.rng.standard_normal((n, self.embedding_dim), dtype=np.float32))


class ReplayActor(ScoringActor):
    """A scoring actor whose model outputs are replayed; everything after the forward pass is the real one."""

    EMBEDDING_DIM = 768

    def __init__(self, *, model, revision, device, dtype, top_k, storage_options):  # noqa: ARG002 - the pool's
        self._attach(ReplayScorer(self.EMBEDDING_DIM, top_k), None)  # no preprocessing: no pixels

    def preprocessing(self) -> dict:
        return {"replayed": True}

    def score_batch(self, batch: dict, context):
        """Plan rows, as if decode had succeeded for each (no pixels: they are not this stage's)."""
        from dataclasses import replace

        n = len(batch["uri"])
        decoded = {"decoded": np.ones(n, dtype=bool), "error_type": np.full(n, None, dtype=object),
                   "error_message": np.full(n, None, dtype=object)}
        return super().score_batch({**batch, **decoded}, replace(context, decode=None))

    def _model_input(self, batch: dict):
        return batch, int(np.count_nonzero(batch["decoded"]))  # ReplayScorer.score takes the count

    def cpu_seconds(self) -> float:
        return time.process_time()


def plan_table(n: int) -> pa.Table:
    """A plan of ``n`` objects with realistic URIs and metadata."""
    from tasks.schema import PLAN_SCHEMA

    now = datetime.now(timezone.utc)
    return pa.table({"uri": [f"s3://bucket/images/2026/12/{i // 1000:04d}/img-{i:08d}.jpg" for i in range(n)],
                     "source_size": np.full(n, 110_000, dtype=np.int64),
                     "source_etag": [f"{i:032x}" for i in range(n)], "source_mtime": [now] * n}, schema=PLAN_SCHEMA)


def measure(images: int, batch_size: int, out_dir: str) -> dict:
    """Stream ``images`` replayed results through one actor and the driver into Parquet; rates and CPU."""
    import ray

    import pyarrow.dataset as ds

    from deit_model import CheckpointRef
    from tasks.actor_pool import PoolSpec, ScorerPool
    from tasks.pipeline import stream_plan
    from tasks.placement import Placement
    from tasks.schema import OutputSpec
    from tasks.settings import ScoreSettings
    from tasks.write import DatasetWriter

    if __name__ != "__main__":  # imported (the tests): Ray's workers cannot import this directory
        import sys

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    settings = ScoreSettings(input="replayed", output=out_dir, batch_size=batch_size, device="cpu",
                             decode_cpus=0)  # no decode: the actor is handed plan rows
    spec = PoolSpec("replayed", None, "cpu", "fp32", settings.top_k, "{}", 1, 1.0, 0.0)
    pool = ScorerPool(spec, actor_cls=ReplayActor)
    pool.preprocessing()  # the actor is up
    writer = DatasetWriter(os.path.join(out_dir, "_staging"), model_name="replayed", run_id="bench",
                           run_date="2026-12-02", spec=OutputSpec(ReplayActor.EMBEDDING_DIM),
                           rows_per_file=settings.rows_per_file)
    plan, ref = plan_table(images), CheckpointRef("replayed", out_dir, "replayed", "replayed")
    try:
        actor_cpu, cpu, start = ray.get(pool.actors[0].cpu_seconds.remote()), time.process_time(), time.perf_counter()
        stream_plan(settings, plan, ref, pool, writer, "bench", Placement("cpu", 0.0, 1.0, batch_size=batch_size), None, 0,
                    None)
        result = writer.close()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        actor_cpu = ray.get(pool.actors[0].cpu_seconds.remote()) - actor_cpu
    finally:
        pool.close()
    paths = [f.removeprefix("file://") for f in result.files]
    rows, size = ds.dataset(paths, format="parquet").count_rows(), sum(os.path.getsize(p) for p in paths)
    return {"images": images, "batch_size": batch_size, "rows_read_back": rows, "img_per_s": images / wall,
            "driver_cpu_ms_per_image": 1000 * cpu / images, "actor_cpu_ms_per_image": 1000 * actor_cpu / images,
            "parquet_bytes_per_image": size / images}


def measure_writer(images: int, batch_size: int, rounds: int = 3) -> dict:
    """ms and bytes per image of Parquet writing alone: the pipeline's options against pyarrow's defaults.

    The same replayed predictions (as the driver receives them), written to
    memory; the two alternate for ``rounds`` rounds and each reports its fastest.
    """
    import io

    import pyarrow.parquet as pq

    from tasks.actor_pool import plan_batches
    from tasks.score import BatchContext
    from tasks.schema import OutputSpec, parquet_options, split_scored
    from tasks.write import ROW_GROUP_ROWS

    actor = ReplayActor(model=None, revision=None, device=None, dtype=None, top_k=5, storage_options={})
    spec = OutputSpec(ReplayActor.EMBEDDING_DIM)
    context = BatchContext("bench", "replayed", spec)
    preds = [split_scored(actor.score_batch(b, context), spec)[0] for b in plan_batches(plan_table(images), batch_size)]
    schema, out = preds[0].schema, {}
    ours = parquet_options(schema)
    for _ in range(rounds):
        for name, options in (("ours", ours), ("pyarrow_defaults", {"compression": ours["compression"]})):
            buf, start = io.BytesIO(), time.perf_counter()
            with pq.ParquetWriter(buf, schema, **options) as writer:
                for table in preds:
                    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            ms = 1000 * (time.perf_counter() - start) / images
            out[name] = {"ms_per_image": min(ms, out.get(name, {}).get("ms_per_image", ms)),
                         "bytes_per_image": len(buf.getvalue()) / images}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print it as one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = {**measure(args.images, args.batch_size, tmp), "cpu": os.cpu_count()}
        result["writer"] = measure_writer(min(args.images, 10_240), args.batch_size)
    finally:
        ray.shutdown()
    logger.info("%s", json.dumps(result, indent=2))
    return 0 if result["rows_read_back"] == args.images else 1


if __name__ == "__main__":
    raise SystemExit(main())
