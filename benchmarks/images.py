"""Benchmark images at realistic sizes: ImageNet-like JPEGs and 12 MP phone photos.

Each image is a smooth multi-colour background, a few dozen soft-edged shapes
and texture at two scales plus fine grain, encoded as a baseline JPEG at
quality 90 with 4:2:0 chroma subsampling, as cameras and ImageNet's files are.
The texture amplitude of each kind is chosen so that the files have the byte
size of the real thing (``small``: 500x375, about 110 KB; ``phone``:
4000x3000, about 3 MB), because JPEG decode time follows the entropy-coded
size and the pixel count, and both are what the benchmark must match.

A set of N images is ``pool`` distinct renders (made in parallel, one process
per core) copied under N distinct names, 1,000 per directory. Every file is
its own object with its own name and inode, but files with the same index
modulo ``pool`` share their bytes. Making 100,000 distinct renders would take
longer than the benchmark; decode cost does not depend on which of the pool's
images a file holds. A marker file records what a directory holds, so a set is
reused by later runs with the same parameters.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PER_DIR = 1000
MARKER = ".benchmark-images.json"


@dataclass(frozen=True)
class Kind:
    """One kind of image: size, texture amplitude and the byte size it aims at."""

    width: int
    height: int
    texture: float  # amplitude of the mid-scale texture, in 8-bit levels
    grain: float  # amplitude of per-pixel grain, in 8-bit levels
    target_bytes: int
    quality: int = 90


# texture and grain were tuned on Pillow's libjpeg-turbo so that the mean file
# size lands within a few percent of target_bytes (tests/test_benchmarks.py checks it)
KINDS = {
    "small": Kind(500, 375, texture=30.0, grain=17.5, target_bytes=110_000),
    "phone": Kind(4000, 3000, texture=12.0, grain=3.5, target_bytes=3_000_000),
}


def render(kind: Kind, seed: int) -> bytes:
    """One JPEG of ``kind``: background, shapes, texture and grain; deterministic per seed."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = kind.width, kind.height
    # a 4x3 grid of random colours, bicubically upsampled: sky/wall-like gradients
    grid = rng.integers(30, 225, (3, 4, 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(12, 30))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.03, 0.3) * w, rng.uniform(0.03, 0.3) * h
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a))
                          for a in np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))], fill=fill)
    # soften the edges as a lens would; 0.1 % of the width keeps phone photos as sharp as small ones
    img = img.filter(ImageFilter.GaussianBlur(max(1.0, w / 1000)))
    pixels = np.asarray(img, dtype=np.float32)
    pixels += _texture(rng, h, w, kind.texture)
    pixels += rng.normal(0.0, kind.grain, (h, w, 1)).astype(np.float32)  # luminance grain
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=kind.quality, subsampling=2)
    return buf.getvalue()


def _texture(rng, h: int, w: int, amplitude: float) -> np.ndarray:
    """Band-limited colour noise (foliage, fabric, gravel): noise at 1/4 scale, upsampled."""
    from PIL import Image

    small = rng.normal(0.0, 1.0, (max(h // 4, 1), max(w // 4, 1), 3))
    small = np.clip(small * 40 + 128, 0, 255).astype(np.uint8)
    up = np.asarray(Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
    return (up - 128.0) * (amplitude / 40.0)


def _render_to(args: tuple) -> int:
    kind, seed, path = args
    data = render(kind, seed)
    Path(path).write_bytes(data)
    return len(data)


def image_path(root: Path, i: int) -> Path:
    """Where image ``i`` of a set lives: ``root/d00012/img00012345.jpg``."""
    return root / f"d{i // PER_DIR:05d}" / f"img{i:08d}.jpg"


def make_images(root: Path, n: int, kind: str = "small", pool: int | None = None, seed: int = 0,
                workers: int | None = None) -> dict:
    """Make (or reuse) N images of ``kind`` under ``root``; return the set's description.

    ``pool`` distinct renders (default: min(n, 256) small, min(n, 16) phone)
    are copied under N names. Returns ``{"n", "kind", "pool", "mean_bytes",
    "total_bytes", ...}``, which is also the marker file's content.
    """
    spec = KINDS[kind]
    pool = min(n, pool or (256 if kind == "small" else 16))
    wanted = {"n": n, "kind": kind, "pool": pool, "seed": seed, "spec": asdict(spec)}
    marker = root / MARKER
    if marker.exists():
        made = json.loads(marker.read_text())
        if {k: made.get(k) for k in wanted} == wanted:
            logger.info("reusing %d %s images in %s", n, kind, root)
            return made
        shutil.rmtree(root)  # a different set: never mix two sets under one input
    root.mkdir(parents=True, exist_ok=True)
    sources = [image_path(root, i) for i in range(pool)]
    for p in {p.parent for p in sources}:
        p.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as ex:
        sizes = list(ex.map(_render_to, [(spec, seed * 1_000_003 + i, str(p)) for i, p in enumerate(sources)]))
    for i in range(pool, n):
        dest = image_path(root, i)
        if i % PER_DIR == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[i % pool], dest)
    total = sum(sizes[i % pool] for i in range(n))
    made = dict(wanted, mean_bytes=round(total / n), total_bytes=total,
                pool_min_bytes=min(sizes), pool_max_bytes=max(sizes))
    marker.write_text(json.dumps(made, indent=2))
    logger.info("made %d %s images (%d distinct, mean %.0f KB) in %s", n, kind, pool, total / n / 1e3, root)
    return made


def list_images(root: Path, n: int) -> list[str]:
    """The N image paths of a set made by :func:`make_images`, in index order."""
    return [str(image_path(root, i)) for i in range(n)]


class S3Source:
    """An image set served by moto's S3 server on 127.0.0.1 (a free port), for ``--source s3``.

    moto keeps objects in this process's memory (about the set's size) and
    answers requests from threads of this process, so at large N the server
    itself is a measurable share of the machine; it is never counted in a
    stage's memory, which covers the stage's own processes only.

    ``latency_ms`` holds every request after the upload that long before moto answers it: a
    stand-in for a real object store's time to first byte (tens of ms for S3), which a
    server on 127.0.0.1 does not have. It waits in the request's own thread, so concurrent
    requests wait side by side, as they do against S3.
    """

    BUCKET = "bench"
    CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, root: Path, n: int, latency_ms: float = 0.0):
        self.root, self.n, self.latency_ms = root, n, latency_ms
        self.prefix = f"{root.name}"
        self.endpoint = ""
        self._server = None

    @property
    def uri(self) -> str:
        return f"s3://{self.BUCKET}/{self.prefix}/"

    def __enter__(self) -> "S3Source":
        import socket

        import s3fs

        os.environ.update(self.CREDENTIALS)  # s3fs signs requests here; children get them via env too
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._server = _server_with_latency(port)
        self.endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, use_listings_cache=False)
        if not fs.exists(self.BUCKET):  # moto's buckets live as long as the process, not the server
            fs.mkdir(self.BUCKET)
        local = list_images(self.root, self.n)
        start = time.perf_counter()
        fs.put(local, [f"{self.BUCKET}/{self.prefix}/{Path(p).relative_to(self.root)}" for p in local])
        logger.info("uploaded %d images to %s in %.1f s", self.n, self.uri, time.perf_counter() - start)
        self._server.latency_s = self.latency_ms / 1000  # the upload is set-up, not measured: no wait there
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.stop()


def _server_with_latency(port: int):
    """moto's threaded server on 127.0.0.1:``port``, whose requests wait ``latency_s`` (set later) first."""
    from moto.moto_server import threaded_moto_server as moto_server

    class Server(moto_server.ThreadedMotoServer):
        latency_s = 0.0

        def _server_entry(self) -> None:  # ThreadedMotoServer's, with the app wrapped
            app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)

            def delayed(environ, start_response):
                if self.latency_s:
                    time.sleep(self.latency_s)
                return app(environ, start_response)

            self._server = moto_server.make_server(self._ip_address, self._port, delayed, True,
                                                   request_handler=moto_server.MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = Server(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def add_served_arguments(parser, latency_ms: list[float], batch_size: int, batches: int, rounds: int) -> None:
    """The options of a benchmark run through :func:`served_to_child`, with its defaults."""
    parser.add_argument("--images", default="/tmp/deit-throughput/images/small-1000",
                        help="a set made by benchmarks/images.py (small-N: N 500x375 JPEGs)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=latency_ms)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--batches", type=int, default=batches, help="batches per mode and round")
    parser.add_argument("--rounds", type=int, default=rounds)


@contextlib.contextmanager
def served_to_child(images: str, target, *args):
    """The small set ``images`` (small-N) served by moto on this process's last core, and a child.

    The child runs ``target(conn, s3_uri, endpoint, *args)`` in a spawned process that pins
    itself to the first core; yields ``(source, conn)``, the other end of the pipe, and
    sends the child ``None`` on the way out. This process keeps to the last core meanwhile,
    so the server's work and the child's never share one, and gets all of them back after.
    """
    import multiprocessing

    root = Path(images)
    n = int(root.name.rsplit("-", 1)[1])
    make_images(root, n, "small")
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[-1]})  # the server's threads
    with contextlib.ExitStack() as stack:
        stack.callback(os.sched_setaffinity, 0, set(cores))
        s3 = stack.enter_context(S3Source(root, n))
        spawn = multiprocessing.get_context("spawn")
        parent, child = spawn.Pipe()
        proc = spawn.Process(target=target, args=(child, s3.uri, s3.endpoint, *args))
        os.sched_setaffinity(0, set(cores))  # the child inherits this; it pins itself
        proc.start()
        os.sched_setaffinity(0, {cores[-1]})
        try:
            yield s3, parent
        finally:
            with contextlib.suppress(OSError):  # a child that failed has gone
                parent.send(None)
            proc.join(60)
