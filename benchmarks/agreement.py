"""Measure how far fast JPEG decoding and low-precision CPU inference move DeiT scores.

Images: 8 photographs shipped with scikit-learn and scikit-image, each as a JPEG at its
original size, at 500 px long side and upscaled to ~12 MP (LANCZOS; re-encoded at quality 90).

1. fast decode (``decode_image(draft_side=preprocessor.min_decode_side())``, the pipeline's
   ``--fast-decode``) vs exact decode, random-weight transformers DeiT-base-distilled-224,
   fp32 on CPU: top-1 agreement, top-5 set overlap, embedding cosine (min, mean), max |diff|
   over all 1000 class probabilities, per size group; how many images draft() reduced; the
   change of the model input in 8-bit levels; decode/preprocess ms per image (median of 3);
2. bf16 and fp16 vs fp32 on CPU on the same exact-decoded pixels;
3. fast vs exact decode for timm's deit_base_distilled_patch16_224.fb_in1k (random weights).
1 and 2 run with the default init (initializer_range=0.02: near-flat softmax) and with
initializer_range=0.2 ("peaked"). Random weights make labels meaningless; agreement between two
decodings or dtypes of the SAME weights still measures numerical drift.

Run:  .venv/bin/python benchmarks/agreement.py --out docs/agreement.md
(--smoke uses 2-layer models to check the script quickly; its numbers mean nothing.)
If --out exists and holds the markers below, only the text between them is replaced.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

import deit_model as dm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, like throughput.py
from report import write_out  # noqa: E402

HF_NAME = "facebook/deit-base-distilled-patch16-224"
TIMM_NAME = "deit_base_distilled_patch16_224.fb_in1k"
SEED = 0
GROUPS = ("original", "500px", "12MP")
BEGIN, END = "<!-- agreement:begin -->", "<!-- agreement:end -->"


def sources() -> list[tuple[str, Path]]:
    """The real photographs the tables use: (name, path), from scikit-learn and scikit-image."""
    import sklearn
    import skimage.data

    skl = Path(sklearn.__file__).parent / "datasets" / "images"
    ski = Path(skimage.data.__path__[0])
    files = "rocket.jpg hubble_deep_field.jpg retina.jpg astronaut.png chelsea.png coffee.png".split()
    return ([(n, skl / f"{n}.jpg") for n in ("china", "flower")]
            + [(f.split(".")[0].split("_")[0], ski / f) for f in files])


def to_jpeg(img: Image.Image, size=None) -> bytes:
    """``img`` as JPEG bytes, resized to ``size`` first (LANCZOS) when given."""
    if size:
        img = img.resize(size, Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_images() -> list[dict]:
    """Each photo as three JPEGs: the original file (a PNG re-encoded), 500 px on its long side, and 12 MP."""
    out = []
    for name, path in sources():
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s12, s5 = (12e6 / (w * h)) ** 0.5, 500 / max(w, h)
        for group, data in (("original", path.read_bytes() if path.suffix == ".jpg" else to_jpeg(img)),
                            ("500px", to_jpeg(img, (round(w * s5), round(h * s5)))),
                            ("12MP", to_jpeg(img, (round(w * s12), round(h * s12))))):
            out.append({"name": name, "group": group, "data": data,
                        "png": path.read_bytes() if group == "original" and path.suffix == ".png" else None})
    return out


def median_ms(fn, repeats=3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in ms."""
    return statistics.median(timeit.repeat(fn, timer=time.perf_counter, number=1, repeat=repeats)) * 1e3


def decode_all(images, prep) -> dict:
    """Exact and fast decodes, their pixels, sizes and timings."""
    side = prep.min_decode_side()
    r = {"side": side, "exact": [], "fast": [], "rows": []}
    for im in images:
        ex, fa = dm.decode_image(im["data"]), dm.decode_image(im["data"], draft_side=side)
        r["exact"].append(ex)
        r["fast"].append(fa)
        r["rows"].append({
            "name": im["name"], "group": im["group"], "exact_size": ex.size, "fast_size": fa.size,
            "reduced": fa.size != ex.size,
            "dec_exact": median_ms(lambda: dm.decode_image(im["data"])),
            "dec_fast": median_ms(lambda: dm.decode_image(im["data"], draft_side=side)),
            "prep_exact": median_ms(lambda: prep([ex])), "prep_fast": median_ms(lambda: prep([fa]))})
    r["px_exact"], r["px_fast"] = prep(r["exact"]), prep(r["fast"])
    for rw, d in zip(r["rows"], levels(prep, r["px_fast"], r["px_exact"])):
        rw["dpix"] = d
    # yardstick: what JPEG q90 re-encoding of the PNG sources does to the same model input
    pngs = [im for im in images if im["png"]]
    r["yardstick"] = [(im["name"], d) for im, d in zip(pngs, levels(
        prep, prep([dm.decode_image(im["data"]) for im in pngs]), prep([dm.decode_image(im["png"]) for im in pngs])))]
    return r


def levels(prep, a, b) -> list[float]:
    """Per-image mean |a - b| of preprocessed inputs, in 8-bit levels (model-independent drift)."""
    cfg = prep.to_dict()
    std = np.asarray(cfg.get("image_std") or cfg.get("std"), dtype=np.float32).reshape(1, 3, 1, 1)
    return [float(d.mean()) for d in np.abs(a - b) * std * 255]


def score_all(ckpt: str, pixels: np.ndarray, dtype="fp32", batch=8):
    """Full probability vectors (N, 1000), embeddings and forward ms/image."""
    scorer = dm.create_scorer(ckpt, device="cpu", dtype=dtype, top_k=1000)
    probs, embs, t0 = [], [], time.perf_counter()
    for i in range(0, len(pixels), batch):
        res = scorer.score(pixels[i:i + batch])
        full = np.zeros((len(res.label_ids), scorer.top_k), dtype=np.float64)
        np.put_along_axis(full, res.label_ids.astype(np.int64), res.scores, axis=1)
        probs.append(full)
        embs.append(res.embedding.astype(np.float64))
    ms = (time.perf_counter() - t0) * 1e3 / len(pixels)
    return np.concatenate(probs), np.concatenate(embs), ms


def compare(a, b, idx) -> dict:
    """Agreement of run b with reference run a on the rows idx."""
    (pa, ea, _), (pb, eb, _) = a, b
    pa, pb, ea, eb = pa[idx], pb[idx], ea[idx], eb[idx]
    t5a, t5b = np.argsort(-pa, 1)[:, :5], np.argsort(-pb, 1)[:, :5]
    cos = (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
    srt = np.sort(pa, 1)
    return {"n": len(idx), "top1": float((t5a[:, 0] == t5b[:, 0]).mean()),
            "top5": float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(t5a, t5b)])),
            "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "dp": float(np.abs(pa - pb).max()), "p1": float(srt[:, -1].mean()),
            "margin": float(np.median(srt[:, -1] - srt[:, -2]))}


HDR = ("| {} | n | top-1 agree | top-5 overlap | emb cos min | emb cos mean | max abs dp "
       "| mean top-1 p (ref) | median top1-top2 margin (ref) |\n|---|" + "---|" * 8)


def row(label, c) -> str:
    """One markdown table row of the agreement figures ``c``."""
    return (f"| {label} | {c['n']} | {c['top1']:.3f} | {c['top5']:.3f} | {c['cos_min']:.6f} | "
            f"{c['cos_mean']:.6f} | {c['dp']:.2e} | {c['p1']:.4f} | {c['margin']:.2e} |")


def fast_table(title, a, b, rows) -> list[str]:
    """Markdown lines: fast decode against exact decode, per image group."""
    lines = [f"**{title}**: fast decode vs exact decode (reference: exact), fp32, CPU", "", HDR.format("group")]
    for g in GROUPS:
        idx = [i for i, r in enumerate(rows) if r["group"] == g]
        red = sum(rows[i]["reduced"] for i in idx)
        lines.append(row(f"{g} ({red}/{len(idx)} reduced by draft)", compare(a, b, idx)))
    lines.append(row(f"all ({sum(r['reduced'] for r in rows)}/{len(rows)} reduced)", compare(a, b, range(len(rows)))))
    return lines + [""]


def dtype_table(title, ckpt, px, ref) -> list[str]:
    """Markdown lines: each dtype against fp32 on the same pixels."""
    lines = [f"**{title}**: dtype vs fp32 on CPU, same exact-decoded pixels "
             f"(ms/image = one pass in batches of 8, warm-up included; fp32 {ref[2]:.0f} ms/image)", "",
             HDR.format("dtype")]
    for dt in ("bf16", "fp16"):
        try:
            run = score_all(ckpt, px, dt)
            lines.append(row(f"{dt} ({run[2]:.0f} ms/image)", compare(ref, run, range(len(px)))))
        except Exception as exc:  # noqa: BLE001 - an unsupported dtype is a result to report
            lines.append(f"| {dt} | FAILED: `{type(exc).__name__}: {str(exc).splitlines()[0][:200]}` |")
    return lines + [""]


def decode_tables(dec_hf, dec_timm) -> list[str]:
    """Markdown lines: decoded sizes and times per image, fast and exact."""
    lines = ["**Decode sizes and time per image** (ms, median of 3; preprocessing = the model's own transform "
             "of that one decoded image; input mean abs diff = mean |fast - exact| of the preprocessed 224x224 "
             "model input, in 8-bit levels, independent of the weights)", "",
             f"| image | group | exact size | fast size, HF (side {dec_hf['side']}) | fast size, timm "
             f"(side {dec_timm['side']}) | decode exact | decode fast (HF) | preprocess exact | preprocess fast "
             "| input mean abs diff HF / timm |", "|---|" + "---|" * 9]
    for r, t in zip(dec_hf["rows"], dec_timm["rows"]):
        sz = lambda s: "x".join(map(str, s))  # noqa: E731
        lines.append(f"| {r['name']} | {r['group']} | {sz(r['exact_size'])} | {sz(r['fast_size'])} | "
                     f"{sz(t['fast_size'])} | {r['dec_exact']:.1f} | {r['dec_fast']:.1f} | "
                     f"{r['prep_exact']:.1f} | {r['prep_fast']:.1f} | {r['dpix']:.2f} / {t['dpix']:.2f} |")
    lines += ["", "| group | n | reduced (HF) | reduced (timm) | median decode exact | median decode fast "
              "| median decode+preprocess exact | median decode+preprocess fast | input mean abs diff, max image, "
              "HF / timm |", "|---|" + "---|" * 8]
    for g in GROUPS:
        rs = [r for r in dec_hf["rows"] if r["group"] == g]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        tot = lambda s: statistics.median(r["dec_" + s] + r["prep_" + s] for r in rs)  # noqa: E731
        red_t = sum(r["reduced"] for r in dec_timm["rows"] if r["group"] == g)
        lines.append(f"| {g} | {len(rs)} | {sum(r['reduced'] for r in rs)} | {red_t} | {med('dec_exact'):.1f} | "
                     f"{med('dec_fast'):.1f} | {tot('exact'):.1f} | {tot('fast'):.1f} | "
                     f"{max(r['dpix'] for r in rs):.2f} / "
                     f"{max(r['dpix'] for r in dec_timm['rows'] if r['group'] == g):.2f} |")
    lines.append("Yardstick, JPEG q90 re-encode vs the PNG source, input mean abs diff HF / timm: " + ", ".join(
        f"{n} {a:.2f} / {b:.2f}" for (n, a), (_, b) in zip(dec_hf["yardstick"], dec_timm["yardstick"])) + ".")
    return lines + [""]


def machine() -> str:
    """One line naming the CPU and the library versions, for the tables' heading."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    import timm
    import transformers
    return (f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
            f"- CPU: {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}, "
            f"capability {torch.backends.cpu.get_cpu_capability()}); GPU: "
            f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}\n"
            f"- Python {platform.python_version()}, torch {torch.__version__}, PIL {PIL.__version__}, "
            f"transformers {transformers.__version__}, timm {timm.__version__}; seed {SEED}\n"
            f"- at start: {load()}")


def load() -> str:
    """Load average and CPU pressure: other processes on the box inflate the timings."""
    psi = open("/proc/pressure/cpu").readline().split()[2] if os.path.exists("/proc/pressure/cpu") else "avg60=?"
    return f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min), CPU pressure some {psi}%"


def main() -> None:
    """Build the images, run every comparison and write the tables to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file to write the tables to")
    ap.add_argument("--smoke", action="store_true", help="2-layer models, to test the script only")
    args = ap.parse_args()
    t_start = time.perf_counter()
    hf_small = {"num_hidden_layers": 2} if args.smoke else {}
    images = build_images()
    out = [f"Command: `.venv/bin/python benchmarks/agreement.py --out {args.out}{' --smoke' if args.smoke else ''}`"
           + (" (2-layer models: numbers are meaningless)" if args.smoke else ""), "", machine(), "",
           f"{len(images)} JPEGs: 8 sources x (original size, 500 px long side, ~12 MP), LANCZOS-resized, "
           "quality 90 (native JPEGs at original size are the shipped files).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        hf_default = str(dm.create_random_checkpoint(HF_NAME, Path(tmp, "hf"), seed=SEED, **hf_small))
        hf_peaked = str(dm.create_random_checkpoint(HF_NAME, Path(tmp, "hfp"), seed=SEED,
                                                    initializer_range=0.2, **hf_small))
        timm_ckpt = str(dm.create_random_timm_checkpoint(TIMM_NAME, Path(tmp, "timm"), seed=SEED,
                                                         **({"depth": 2} if args.smoke else {})))
        dec_hf = decode_all(images, dm.load_preprocessor(hf_default))
        dec_timm = decode_all(images, dm.load_preprocessor(timm_ckpt))
        out += decode_tables(dec_hf, dec_timm)
        for title, ckpt in (("transformers DeiT-base-distilled-224, default init (initializer_range=0.02)",
                             hf_default),
                            ("transformers DeiT-base-distilled-224, peaked init (initializer_range=0.2)", hf_peaked)):
            ref = score_all(ckpt, dec_hf["px_exact"])
            out += fast_table(title, ref, score_all(ckpt, dec_hf["px_fast"]), dec_hf["rows"])
            out += dtype_table(title, ckpt, dec_hf["px_exact"], ref)
        out += fast_table(f"timm {TIMM_NAME}, random init", score_all(timm_ckpt, dec_timm["px_exact"]),
                          score_all(timm_ckpt, dec_timm["px_fast"]), dec_timm["rows"])
    out.append(f"Total run time: {time.perf_counter() - t_start:.0f} s; at end: {load()}.")
    text = "\n".join(out)
    print(text)
    path = Path(args.out)
    write_out(path, text, markers=(BEGIN, END), title="Agreement: fast decode and CPU dtypes")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
