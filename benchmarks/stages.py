"""The benchmark's stage children: each runs in a fresh interpreter, started by throughput.py.

``python stages.py NAME JSON`` runs one stage and reports by printing
``BENCH {json}`` lines, which the parent timestamps as they arrive. Run as a
script, this module is ``__main__``, so Ray pickles the peer's model class by
value into its workers, which cannot import this directory.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import harness  # noqa: E402 - sibling modules, not a package (this directory is sys.path[0])
import images  # noqa: E402


def _event(**fields) -> None:
    print("BENCH " + json.dumps(fields), flush=True)


def child_checkpoint(a: dict) -> None:
    """Write a random-weight checkpoint of hub name ``a['model']`` to ``a['dir']``."""
    from deit_model import create_random_checkpoint, create_random_timm_checkpoint

    if a["model"].startswith("timm:"):
        out = create_random_timm_checkpoint(a["model"][len("timm:"):], a["dir"])
        # save_for_hf records timm's default model_args; the hub's timm configs carry none,
        # and transformers' TimmWrapper (baseline, peer) refuses them twice over num_classes
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("model_args", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        create_random_checkpoint(a["model"], a["dir"])
    _event(event="done")


def child_ceiling(a: dict) -> None:
    """Forward passes of the Scorer's model on a random batch already on the device."""
    import torch

    from deit_model import create_scorer, keep_freed_memory, load_preprocessor

    scorer = create_scorer(a["ckpt"], device=a["device"], dtype=a["dtype"])
    keep_freed_memory()  # as ours' actors do after loading: the model's ceiling with the same malloc
    shape = load_preprocessor(a["ckpt"]).input_shape()
    sync = torch.cuda.synchronize if scorer.device.type == "cuda" else (lambda: None)
    device_name = torch.cuda.get_device_name() if scorer.device.type == "cuda" else harness.hardware()["cpu"]
    for threads in a["threads"] or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for batch in a["batch_sizes"]:
            x = torch.randn(batch, *shape).to(scorer.device, scorer.dtype)
            with torch.inference_mode():
                _timed(lambda: scorer.model(x), sync, min(2.0, a["seconds"] / 4), 2)  # warm-up
                times = _timed(lambda: scorer.model(x), sync, a["seconds"], 5)
            # the median pass: a burst of other work on a shared machine moves the mean, not the median
            median = sorted(times)[len(times) // 2]
            _event(event="ceiling", threads=threads, batch=batch, rate=batch / median,
                   mean_rate=batch * len(times) / sum(times), passes=len(times), device=device_name,
                   dtype=str(scorer.dtype))


def _timed(fn, sync, seconds: float, min_passes: int) -> list[float]:
    """Seconds of each call of ``fn``, called until ``seconds`` and ``min_passes`` are both reached."""
    times: list[float] = []
    while len(times) < min_passes or sum(times) < seconds:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def child_baseline(a: dict) -> None:
    """transformers' pipeline over the file paths, as a user would write it; one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import pipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a["dtype"]]
    pipe = pipeline("image-classification", model=a["ckpt"], device=a["device"], dtype=dtype)
    paths = images.list_images(Path(a["images"]), a["n"])
    rows = {"path": [], "labels": [], "scores": []}
    # a generator makes the pipeline stream results (a list would come back whole at the end);
    # transformers' docs recommend it for large inputs, so a user would write this
    for i, out in enumerate(pipe((p for p in paths), batch_size=a["batch_size"], top_k=5)):
        if i % a["batch_size"] == 0:  # the whole batch is done when its first result comes out
            _event(event="progress", n=min(i + a["batch_size"], len(paths)))
        rows["path"].append(paths[i])
        rows["labels"].append([o["label"] for o in out])
        rows["scores"].append([o["score"] for o in out])
    _event(event="scored", n=len(rows["path"]))
    pq.write_table(pa.table(rows), Path(a["output"]) / "predictions.parquet")
    _event(event="rows", n=pq.read_metadata(Path(a["output"]) / "predictions.parquet").num_rows)


class PeerClassifier:
    """The recipe's model class: loads once per actor, scores a batch, keeps top-1."""

    def __init__(self, ckpt: str, device: str, dtype: str, marks: str):
        import torch
        from transformers import AutoModelForImageClassification

        self.torch = torch
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.device = device
        self.model = AutoModelForImageClassification.from_pretrained(ckpt, dtype=self.dtype).to(device).eval()
        self.labels = self.model.config.id2label
        self.marks = marks

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        x = self.torch.from_numpy(batch["pixel_values"]).to(self.device, self.dtype)
        with self.torch.inference_mode():
            probs = self.model(pixel_values=x).logits.float().softmax(-1)
        score, idx = probs.max(-1)
        with open(self.marks, "a") as fh:  # when each batch was scored, read back by the driver
            fh.write(f"{time.time()} {len(x)}\n")
        return {"path": batch["path"], "label": np.array([self.labels[i] for i in idx.tolist()]),
                "score": score.cpu().numpy()}


def child_peer(a: dict) -> None:
    """Ray Data's batch-inference recipe: read_images -> preprocess -> actor pool -> write_parquet."""
    import pyarrow.dataset as pds
    import ray
    from transformers import AutoImageProcessor

    ray.init(include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False  # as ours: a log, not bars
    processor = AutoImageProcessor.from_pretrained(a["ckpt"])
    filesystem = None
    if a.get("endpoint"):
        import pyarrow.fs

        filesystem = pyarrow.fs.S3FileSystem(
            endpoint_override=a["endpoint"], access_key="testing", secret_key="testing", region="us-east-1")

    def preprocess(batch: dict) -> dict:
        pixels = processor(images=list(batch["image"]), return_tensors="np")["pixel_values"]
        return {"path": batch["path"], "pixel_values": pixels}

    # read tasks reserve 1 CPU by default, which the actors' 1.5 of 2 CPUs leave no room for: the
    # recipe then waits forever (ray-project/ray#44687); they get the decode tasks' share, as ours do
    ds = ray.data.read_images(a["input"], mode="RGB", include_paths=True, filesystem=filesystem,
                              ray_remote_args={"num_cpus": a["decode_cpus"]})
    ds = ds.map_batches(preprocess, num_cpus=a["decode_cpus"])
    ds = ds.map_batches(PeerClassifier, fn_constructor_kwargs={
        "ckpt": a["ckpt"], "device": a["device"], "dtype": a["dtype"], "marks": a["marks"]},
        compute=ray.data.ActorPoolStrategy(size=a["num_actors"]), batch_size=a["batch_size"],
        num_cpus=a["cpus_per_actor"], num_gpus=a["gpus_per_actor"] if a["device"] == "cuda" else 0)
    ds.write_parquet(a["output"])
    _event(event="rows", n=pds.dataset(a["output"], format="parquet").count_rows())
    ray.shutdown()


CHILDREN = {"checkpoint": child_checkpoint, "ceiling": child_ceiling, "baseline": child_baseline,
            "peer": child_peer}


if __name__ == "__main__":
    CHILDREN[sys.argv[1]](json.loads(sys.argv[2]))
