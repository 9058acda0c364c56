"""The scoring actor pool: batches, both decoding layouts, and the hand-over of an early pool."""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from tasks.actor_pool import MAX_WINDOW, plan_batches, window_for
from tasks.score import ScoringActor
from tasks.schema import ERRORS_SCHEMA, PLAN_SCHEMA, OutputSpec, split_scored
from tasks.settings import ScoreSettings

from .test_device_decode import bad_huffman


def test_plan_batches_cover_the_plan_once_as_numpy():
    plan = pa.table({"uri": [f"u{i}" for i in range(70)], "source_size": [None] + list(range(69)),
                     "source_etag": ["e"] * 70, "source_mtime": [None] * 70}, schema=PLAN_SCHEMA)
    batches = list(plan_batches(plan, 32))
    assert [len(b["uri"]) for b in batches] == [32, 32, 6]
    assert [u for b in batches for u in b["uri"]] == plan["uri"].to_pylist()
    first = batches[0]
    assert all(isinstance(v, np.ndarray) for v in first.values())
    assert np.isnan(first["source_size"][0]) and first["source_size"][1] == 0  # nulls as NaN, as Ray Data gave
    assert list(plan_batches(plan.slice(0, 0), 32)) == []


class _ServesUris:
    """A scoring actor without a model (these tests are about the pool's scheduling, and a model's
    restart costs ~8 s here): each call returns its batch's URIs and the actor's id, and its process
    dies on a batch holding a "poison" image. Calls take 0.3 s: the driver learns of a death ~2 s
    after it, and meanwhile another actor must not score every batch left."""

    def __init__(self, **_):
        pass

    def preprocessing(self):
        return {}

    def score_batch(self, batch, context):
        import time

        import ray

        if any("poison" in str(u) for u in batch["uri"]):
            os._exit(1)
        time.sleep(0.3)
        n = len(batch["uri"])
        return pa.table({"uri": list(batch["uri"]), "actor": [ray.get_runtime_context().get_actor_id()] * n})


def _uri_pool(num_actors: int, monkeypatch):
    """A pool of ``num_actors`` real _ServesUris actors (0.5 CPU each) on the session cluster, all up."""
    import ray

    from tasks import actor_pool

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    monkeypatch.setattr(actor_pool, "CALL_RETRIES", 0)  # a call that dies is not retried: fewer restarts
    spec = actor_pool.PoolSpec("m", None, "cpu", "fp32", 3, "{}", num_actors, 0.5, 0.0)
    pool = actor_pool.ScorerPool(spec, actor_cls=_ServesUris)
    ray.get([actor.preprocessing.remote() for actor in pool.actors], timeout=120)  # none starts late
    return pool


def _uri_plan(n: int, poison: int) -> pa.Table:
    uris = [f"file:///images/{i:02d}{'-poison' if i == poison else ''}.jpg" for i in range(n)]
    return pa.table({"uri": uris, "source_size": [1] * n, "source_etag": ["e"] * n, "source_mtime": [None] * n},
                    schema=PLAN_SCHEMA)


def _actors_in_order(tables: list) -> list:
    """Each yielded table's actor id (None for the driver's process_died rows), in the order yielded."""
    return [t["actor"][0].as_py() if "actor" in t.column_names else None for t in tables]


def test_after_a_poison_image_every_actor_still_gets_batches(ray_cluster, monkeypatch):
    """The bisection's calls run alone on actor 0; their load once went uncounted, so that after
    one poison image every later batch went to actor 0 and the others idled (found in review)."""
    from tasks.score import BatchContext

    plan = _uri_plan(48, poison=1)  # in the first batch, which goes to actor 0
    pool = _uri_pool(2, monkeypatch)
    try:
        ids = [actor._actor_id.hex() for actor in pool.actors]
        tables = list(pool.imap(plan_batches(plan, 2), BatchContext("r", "m", OutputSpec(8), {}), window=2))
    finally:
        pool.close()
    uris = [u for t in tables for u in t["uri"].to_pylist()]
    assert sorted(uris) == plan["uri"].to_pylist()  # every image once
    order = _actors_in_order(tables)
    # the bisection runs at least 3 calls alone on actor 0 (the poison's batch, the poison, its
    # batch-mate); after the poison's error row come its batch-mate's (and any neighbour batch's that
    # died with it, alone too), then the batches sent once the bisection is over: both actors' again
    assert order.count(None) == 1
    after = order[order.index(None) + 1:]
    assert len(after) >= 8, (ids, order)  # the premise: the bisection ended with batches still to score
    assert after.count(ids[1]) >= 2, (ids, order)


def test_only_deaths_alone_count_against_the_crash_budget(ray_cluster, monkeypatch):
    """Calls in flight beside the one that killed a process die with it, and must not use up the budget."""
    from tasks import crashes
    from tasks.score import BatchContext

    monkeypatch.setattr(crashes, "CRASH_BUDGET", 2)  # the poison's own deaths alone: 2 (its pair, then it)
    plan = _uri_plan(8, poison=0)
    pool = _uri_pool(1, monkeypatch)
    try:  # window 3: the calls queued behind the poison's on the one actor die with its process
        tables = list(pool.imap(plan_batches(plan, 2), BatchContext("r", "m", OutputSpec(8), {}), window=3))
    finally:
        pool.close()
    assert sorted(u for t in tables for u in t["uri"].to_pylist()) == plan["uri"].to_pylist()  # every image once
    died = [t for t in tables if "actor" not in t.column_names]  # the driver's process_died rows
    assert [t["uri"].to_pylist() for t in died] == [["file:///images/00-poison.jpg"]]


@pytest.mark.parametrize("decode_cpus, spare, actors, concurrency, window", [
    (0, 0, 2, 1, 2),  # in-actor decoding: one call scoring, one queued
    (0, 0, 1, 2, 3),  # a GPU actor running two calls at once: both, and one queued
    (1, 15, 1, 2, 16),  # a GPU actor and 15 decode CPUs: a call per decode task it can feed, + 1
    (0.5, 1, 2, 1, 2),
    (1, 1000, 1, 2, MAX_WINDOW),
])
def test_window_keeps_every_decode_task_busy_within_a_bound(decode_cpus, spare, actors, concurrency, window):
    assert window_for(decode_cpus, spare, actors, concurrency) == window


def test_gpu_actors_run_two_calls_on_uint8_pixels_and_cpu_actors_two_only_where_they_read(tiny_checkpoint):
    from tasks.actor_pool import GPU_CONCURRENCY, READ_AHEAD_CONCURRENCY, pool_spec
    from tasks.placement import Placement

    settings = ScoreSettings(input="x", output="y", model=str(tiny_checkpoint))
    gpu = pool_spec(settings, "m", None, Placement("cuda", 1.0, 1.0))
    reads = pool_spec(settings, "m", None, Placement("cpu", 0.0, 1.0))  # decodes its own images
    fed = pool_spec(settings, "m", None, Placement("cpu", 0.0, 1.0, spare_cpus=1.0, decode_cpus=1.0))
    assert (gpu.concurrency, gpu.uint8_pixels) == (GPU_CONCURRENCY, True) and GPU_CONCURRENCY == 2
    assert (reads.concurrency, reads.uint8_pixels) == (READ_AHEAD_CONCURRENCY, False) and READ_AHEAD_CONCURRENCY == 2
    assert (fed.concurrency, fed.uint8_pixels) == (1, False)


def test_a_cpu_actor_reads_one_batch_while_it_decodes_and_scores_another_never_two(
        tiny_checkpoint, photos, tmp_path, monkeypatch):
    """Two calls on one CPU actor (no Ray: its two call threads): the second's read runs while the
    first holds the core, and decoding and scoring never run in both at once, and always on one
    thread of the actor's (one malloc arena keeps the forward pass's buffers, not two)."""
    import threading

    from tasks import score

    settings, plan, decode, _ = _setup(tiny_checkpoint, photos, tmp_path)
    actor = ScoringActor(model=str(tiny_checkpoint), revision=None, device="cpu", dtype="fp32", top_k=3,
                         storage_options={})
    first_inside, second_read, inside, most, workers = threading.Event(), threading.Event(), [0], [0], set()
    real_read, real_decode = score.read_batch, score.decode_batch

    def read(batch, options, max_bytes):
        if batch["uri"][0] == plan["uri"][4].as_py():  # the second batch
            second_read.set()
        return real_read(batch, options, max_bytes)

    def decode_batch(batch, **kw):
        workers.add(threading.get_ident())
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            if batch["uri"][0] == plan["uri"][0].as_py():  # the first batch keeps the core until the second is read
                first_inside.set()
                assert second_read.wait(10), "the second call did not read while the first worked"
            return real_decode(batch, **kw)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(score, "read_batch", read)
    monkeypatch.setattr(score, "decode_batch", decode_batch)
    batches = list(plan_batches(plan, 4))[:2]
    context = score.BatchContext("r", "m", OutputSpec(64), decode)
    out = {}

    def call(i):
        out[i] = actor.score_batch(batches[i], context)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    threads[0].start()
    assert first_inside.wait(30)
    threads[1].start()  # the second call comes while the first decodes
    for t in threads:
        t.join(60)
    assert sorted(out) == [0, 1] and most[0] == 1
    assert [len(out[i]) for i in range(2)] == [4, 4]
    assert len(workers) == 1 and workers.isdisjoint(t.ident for t in threads)


def _setup(tiny_checkpoint, photos, tmp_path, **kw):
    from tasks.enumerate import list_images, plan_table
    from tasks.placement import Placement
    from tasks.actor_pool import pool_spec

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "bad-huffman.jpg").write_bytes(bad_huffman((photos / "china.jpg").read_bytes()))
    for p in photos.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    settings = ScoreSettings(input=str(tmp_path), output=str(tmp_path / "o"), model=str(tiny_checkpoint),
                             batch_size=4, top_k=3, **kw)
    plan = plan_table(list(list_images(settings.input)))
    decode = {"max_pixels": settings.max_pixels, "fast_decode": False, "storage_options": {}}
    spec = pool_spec(settings, str(tiny_checkpoint), None, Placement("cpu", 0.0, 0.5))
    return settings, plan, decode, spec


def test_both_layouts_score_the_same_rows(ray_cluster, tiny_checkpoint, photos, tmp_path):
    """Actors that decode, or decode tasks (8-bit pixels) feeding a GPU-style actor that runs two
    calls at once and normalises them: the same rows, each image once. And so with device
    decoding (the "device" here is the CPU: exact for a transformers checkpoint), in both layouts."""
    from tasks.actor_pool import ScorerPool
    from tasks.score import BatchContext

    settings, plan, decode, spec = _setup(tiny_checkpoint, photos, tmp_path)
    gpu_like = spec.__class__(**{**spec.__dict__, "concurrency": 2, "uint8_pixels": True})
    pool, threaded = ScorerPool(spec), ScorerPool(gpu_like)
    context = BatchContext("r", "m", OutputSpec(64), decode)
    try:
        assert pool.preprocessing()["library"] == "transformers"  # the actors' own, for lineage
        fused = pa.concat_tables(list(pool.imap(plan_batches(plan, 4), context, window=2)))
        apart = pa.concat_tables(list(threaded.imap(plan_batches(plan, 4), context, window=3, decode_cpus=0.5)))
        on_device = replace(context, decode={**decode, "device_jpeg": True})
        device_fused = pa.concat_tables(list(pool.imap(plan_batches(plan, 4), on_device, window=2)))
        device_apart = pa.concat_tables(list(threaded.imap(plan_batches(plan, 4), on_device, window=3,
                                                            decode_cpus=0.5)))
    finally:
        pool.close()
        threaded.close()
    assert sorted(apart["uri"].to_pylist()) == sorted(plan["uri"].to_pylist())  # each once, any order
    by_uri = [("uri", "ascending")]
    expected = fused.sort_by(by_uri).drop(["scored_at"])
    for table in (apart, device_fused, device_apart):
        assert table.sort_by(by_uri).drop(["scored_at"]).equals(expected)
    assert apart["error_type"].to_pylist().count("not_an_image") == 1
    assert apart["error_type"].to_pylist().count("corrupt_image") == 1  # bad-huffman.jpg, refused by both decoders


def test_an_early_pool_serves_the_run_only_if_it_matches(ray_cluster, tiny_checkpoint, photos, tmp_path):
    import ray

    from tasks import early_pool

    _, _, _, spec = _setup(tiny_checkpoint, photos, tmp_path)
    early_pool.start_early(spec)
    early = early_pool._early.future.result()
    assert early_pool.take_pool(spec) is early  # handed over, actors and all
    assert early_pool._early is None  # and no longer the module's to stop
    early.close()

    early_pool.start_early(spec)
    stale = early_pool._early.future.result()
    stale_actor = stale.actors[0]
    other = early_pool.take_pool(spec.__class__(**{**spec.__dict__, "top_k": 5}))
    try:
        assert other is not stale and other.spec.top_k == 5
        assert stale.actors == []  # the mismatched pool was stopped, not leaked
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(stale_actor.score_batch.remote({}, None), timeout=60)
    finally:
        other.close()
    early_pool.discard_early()  # nothing left: a no-op


def test_decode_workers_are_readied_with_the_early_pool(ray_cluster, tiny_checkpoint, photos, tmp_path):
    """One warm task per decode task the spare CPUs hold, each run in a live worker process
    (not the driver) that loads the checkpoint's preprocessing; none where the actors decode."""
    import ray

    from tasks.early_pool import warm_decode_workers

    _, _, _, spec = _setup(tiny_checkpoint, photos, tmp_path)
    assert warm_decode_workers(spec, 0.0, 2.0) == []  # decoding in the actors: no decode workers
    refs = warm_decode_workers(spec, 0.5, 1.0)
    pids = ray.get(refs, timeout=120)
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in set(pids):
        os.kill(pid, 0)  # alive, kept by Ray for the decode tasks (ProcessLookupError otherwise)


def test_a_staggered_pool_discarded_while_starting_is_stopped_once_up(ray_cluster, tiny_checkpoint, photos,
                                                                      tmp_path):
    """The CLI starts CPU actors one after another on a thread; a run that ends first must not leak them."""
    import threading
    import time

    from tasks import early_pool

    _, _, _, spec = _setup(tiny_checkpoint, photos, tmp_path)
    spec = spec.__class__(**{**spec.__dict__, "num_actors": 2})
    starter = threading.Thread(target=early_pool.start_early, args=(spec,), kwargs={"stagger": True})
    starter.start()
    while early_pool._early is None:
        time.sleep(0.01)
    early = early_pool._early
    early_pool.discard_early()  # while the first actor is still importing torch
    assert not early.future.done()
    starter.join(timeout=120)
    pool = early.future.result()
    assert pool.actors == []  # the starter stopped it once it was up
    assert early_pool._early is None


class _DiesOnPoison(ScoringActor):
    """A scoring process that dies (as on a decoder segfault) on any batch holding a "poison" image."""

    def score_batch(self, batch, context):
        if any("poison" in str(u) for u in batch["uri"]):
            os._exit(1)
        return super().score_batch(batch, context)


def _crashing_pool(spec, monkeypatch):
    import ray

    from tasks import actor_pool

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    monkeypatch.setattr(actor_pool, "CALL_RETRIES", 0)  # fewer restarts; retries are Ray's, not ours
    return actor_pool.ScorerPool(spec, actor_cls=_DiesOnPoison)


def test_an_image_that_kills_its_process_becomes_an_error_row_and_the_rest_is_scored(
        ray_cluster, tiny_checkpoint, photos, tmp_path, monkeypatch):
    from tasks.score import BatchContext

    from deit_model import resolve_checkpoint

    (tmp_path / "poison.jpg").write_bytes(next(photos.iterdir()).read_bytes())
    settings, plan, decode, spec = _setup(tiny_checkpoint, photos, tmp_path)
    revision = resolve_checkpoint(str(tiny_checkpoint)).revision  # the actors' own: they refuse another
    pool = _crashing_pool(spec, monkeypatch)
    try:
        # batches of 2: the poison's batch dies, dies again alone, and is halved down to the poison
        # alone (each death a process restart, the test's cost: one fewer than with batches of 4)
        out = pa.concat_tables(list(pool.imap(plan_batches(plan, 2), BatchContext("r", "m", OutputSpec(64), decode,
                                                                                  model_revision=revision), window=2)))
    finally:
        pool.close()
    assert sorted(out["uri"].to_pylist()) == sorted(plan["uri"].to_pylist())  # every image once
    by_uri = {r["uri"]: r for r in out.to_pylist()}
    poison = by_uri[f"file://{tmp_path / 'poison.jpg'}"]
    assert poison["error_type"] == "process_died" and "died on this image" in poison["error_message"]
    assert poison["label_ids"] is None and poison["model_revision"] == revision
    others = [r for u, r in by_uri.items() if "poison" not in u]
    assert all(r["label_ids"] is not None for r in others if r["error_type"] is None)
    assert [r["error_type"] for r in others].count("process_died") == 0  # no neighbour blamed
    _, errors = split_scored(out, OutputSpec(64))  # as the writer routes it: into the errors table
    assert errors.schema.equals(ERRORS_SCHEMA) and "process_died" in errors["error_type"].to_pylist()


def test_processes_that_keep_dying_fail_the_run_naming_the_batch(ray_cluster, tiny_checkpoint, photos, tmp_path,
                                                                 monkeypatch):
    from tasks import crashes
    from tasks.score import BatchContext

    (tmp_path / "poison-a.jpg").write_bytes(next(photos.iterdir()).read_bytes())
    (tmp_path / "poison-b.jpg").write_bytes(next(photos.iterdir()).read_bytes())
    settings, plan, decode, spec = _setup(tiny_checkpoint, photos, tmp_path)
    monkeypatch.setattr(crashes, "CRASH_BUDGET", 1)
    pool = _crashing_pool(spec, monkeypatch)
    try:
        with pytest.raises(crashes.ScoringProcessDied, match=r"died 2 times; the last on a batch of \d+ images"):
            list(pool.imap(plan_batches(plan, 4), BatchContext("r", "m", OutputSpec(64), decode), window=2))
    finally:
        pool.close()


class _DiesAsItRestarts:
    """An actor whose process dies on its first batch and then in every restart's constructor."""

    def __init__(self, model, **_):
        self.marker = model
        if os.path.exists(self.marker):
            os._exit(1)

    def preprocessing(self):
        return {}

    def score_batch(self, batch, context):
        open(self.marker, "w").close()
        os._exit(1)


def test_an_actor_that_cannot_come_back_fails_the_run_instead_of_hanging(ray_cluster, tmp_path, monkeypatch):
    """Ray restarts it for ever and holds its calls meanwhile: the driver's wait once did too."""
    import ray

    from tasks import actor_pool, actor_watch, crashes
    from tasks.score import BatchContext

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(actor_watch, "WATCH_EVERY_S", 1.0)
    monkeypatch.setattr(actor_watch, "ACTOR_RESTART_LIMIT", 2)
    spec = actor_pool.PoolSpec(str(tmp_path / "dead"), None, "cpu", "fp32", 3, "{}", 1, 0.5, 0.0)
    pool = actor_pool.ScorerPool(spec, actor_cls=_DiesAsItRestarts)
    plan = pa.table({"uri": ["file:///a.jpg"], "source_size": [1], "source_etag": ["e"], "source_mtime": [None]},
                    schema=PLAN_SCHEMA)
    try:
        with pytest.raises(crashes.ScoringProcessDied, match=r"scoring actor 0 has been RESTARTING .* restarted"):
            list(pool.imap(plan_batches(plan, 1), BatchContext("r", "m", OutputSpec(8), {}), window=1))
    finally:
        pool.close()


def _decode_dies_on_poison(batch, options):
    """A decode task that dies (as PIL segfaulting on one image would) on a batch holding a poison image."""
    from tasks.decode import _decode

    if any("poison" in str(u) for u in batch["uri"]):
        os._exit(1)
    return _decode(batch, options)


def test_a_decode_task_that_dies_is_isolated_as_an_actor_death_is(ray_cluster, tiny_checkpoint, photos, tmp_path,
                                                                  monkeypatch):
    """With decode tasks the process that dies may be the task's, not the actor's: the call then fails with
    the task's WorkerCrashedError, and the same isolation finds the image."""
    import ray

    from tasks import actor_pool
    from tasks.score import BatchContext

    (tmp_path / "poison.jpg").write_bytes((photos / "china.jpg").read_bytes())
    settings, plan, decode, spec = _setup(tiny_checkpoint, photos, tmp_path)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # no retries of the dying task either: fewer worker restarts (each imports the model libraries)
    real = actor_pool.decode_task_for(0.5)
    assert real.options(max_retries=0) is not None  # the suspect's call: options apply again
    monkeypatch.setattr(actor_pool, "decode_task_for", lambda cpus: ray.remote(num_cpus=cpus, max_retries=0)(
        _decode_dies_on_poison))
    monkeypatch.setattr(actor_pool, "CALL_RETRIES", 0)
    pool = actor_pool.ScorerPool(spec)
    try:
        out = pa.concat_tables(list(pool.imap(plan_batches(plan, 4), BatchContext("r", "m", OutputSpec(64), decode),
                                              window=2, decode_cpus=0.5)))
    finally:
        pool.close()
    assert sorted(out["uri"].to_pylist()) == sorted(plan["uri"].to_pylist())  # every image once
    died = [r["uri"] for r in out.to_pylist() if r["error_type"] == "process_died"]
    assert died == [f"file://{tmp_path / 'poison.jpg'}"]  # that image alone, no neighbour blamed
    assert out.filter(pa.compute.is_null(out["error_type"])).num_rows == len(list(photos.iterdir()))
