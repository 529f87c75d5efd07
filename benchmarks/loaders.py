"""Images/sec of every loader on the same images, same output size, same workers, in one run.

    simmim bench loaders [--data data/sample/train | --synthetic N] [--size 192] [--batch 64]
                         [--workers 2] [--epochs 3] [--backends torch,ffcv,dali]

The source folder is converted to a .beton first (conversion images/sec is reported too); each
loader then runs one warm-up epoch (FFCV's numba compilation, worker start-up, DALI's pipeline
build: reported separately as start-up) and `--epochs` timed epochs, touching every batch on the
training device. On a GPU, DALI runs with 'mixed' decoding both with the hardware JPEG decoder
(hw_decoder_load 0.65) and without it (0), and on the CPU as well. `--synthetic N` writes N JPEGs
at ImageNet-like sizes (long side ~500 px, quality 90) instead of reading a folder. Writes
loaders.md, loaders.json and loaders.png under a results folder naming the device.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, build_loader
from simmim.pipeline.options import DALIOptions
from simmim.pipeline.loaders import available

from .report import device_name, results_dir, write_bar_chart


def synthetic_jpegs(root: Path, n: int, seed: int = 0, classes: int = 10, distinct: int = 64) -> Path:
    """n JPEGs shaped like ImageNet's (long side 400-500 px, 4:3 / 3:4 / 1:1), smooth content with
    noise so they compress like photographs (~100-150 KB). `distinct` different images are drawn
    and the rest are byte copies of them (decoding cost is the same; writing is fast)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    encoded = []
    for i in range(min(n, distinct)):
        long = int(rng.integers(400, 501))
        w, h = [(long, long * 3 // 4), (long * 3 // 4, long), (long, long)][i % 3]
        low = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    for i in range(n):
        d = root / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.JPEG").write_bytes(encoded[i % len(encoded)])
    return root


def time_loader(loader, epochs: int, device: torch.device) -> dict:
    """Warm-up epoch, then `epochs` timed ones. Each batch is touched on the device (a corner
    pixel summed, so the consumer costs next to nothing), and the total read back at the end of
    each epoch, so asynchronous copies are counted. Besides the overall rate, the epoch start (until
    the first batch: worker start-up, DALI's per-epoch pipeline, prefetch fill) is timed apart, and
    the steady rate counts the batches after it: on ImageNet, with 10,000 batches an epoch, the
    steady rate is what training sees; on a small benchmark set the start weighs more."""
    def run_epoch(epoch: int) -> tuple[int, int, float, float]:
        loader.set_epoch(epoch)
        n, acc = 0, torch.zeros((), device=device)
        t0 = time.perf_counter()
        n_first, t_first = 0, 0.0
        for batch in loader:
            acc += batch[0][:, 0, 0, 0].float().sum() + batch[1][:, 0, 0].sum()
            n += len(batch[0])
            if not n_first:
                n_first, t_first = n, time.perf_counter() - t0
        float(acc)  # synchronise
        return n, n_first, t_first, time.perf_counter() - t0

    t0 = time.perf_counter()
    run_epoch(0)
    startup = time.perf_counter() - t0
    runs = [run_epoch(e) for e in range(1, epochs + 1)]
    images, seconds = sum(r[0] for r in runs), sum(r[3] for r in runs)
    steady_images, steady_seconds = sum(r[0] - r[1] for r in runs), sum(r[3] - r[2] for r in runs)
    return {"images": images, "seconds": round(seconds, 3), "img_per_s": images / seconds,
            "steady_img_per_s": steady_images / steady_seconds if steady_seconds > 0 else None,
            "epoch_start_s": round(sum(r[2] for r in runs) / len(runs), 3), "warmup_epoch_s": round(startup, 2)}


def configurations(backends: list[str], cuda: bool) -> list[tuple[str, str, dict]]:
    """(label, backend, LoaderSpec fields) for each loader to time."""
    out = []
    for b in backends:
        if b == "dali" and cuda:
            out += [("dali mixed+hw", "dali", {"dali": DALIOptions(device="mixed", hw_decoder_load=0.65)}),
                    ("dali mixed", "dali", {"dali": DALIOptions(device="mixed", hw_decoder_load=0.0)}),
                    ("dali cpu", "dali", {"dali": DALIOptions(device="cpu")})]
        else:
            out.append((b, b, {}))
    return out


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = next((r["img_per_s"] for r in rows if r["loader"] == "torch"), None)
    lines = [f"# Loaders on {result['device']}",
             "",
             f"{result['images']} source images ({result['source']}), output {result['size']}x{result['size']}, "
             f"batch {result['batch']}, {result['workers']} workers each, {result['epochs']} timed epochs after "
             f"one warm-up epoch; same images for every loader (FFCV from the .beton converted from them).",
             "",
             "Steady: images/sec after each epoch's first batch; epoch start: mean time to the first batch.",
             "",
             "| loader | images/sec | x reference | steady images/sec | epoch start (s) | warm-up epoch (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['img_per_s'] / base:.2f}" if base else "n/a"
        steady = f"{r['steady_img_per_s']:.0f}" if r.get("steady_img_per_s") else "n/a"
        lines.append(f"| {r['loader']} | {r['img_per_s']:.0f} | {ratio} | {steady} | {r['epoch_start_s']:.2f} | "
                     f"{r['warmup_epoch_s']:.1f} |")
    if result.get("conversion"):
        c = result["conversion"]
        lines += ["", f"Conversion to .beton: {c['written']} images in {c['write_seconds']:.1f} s "
                      f"({c['images_per_sec']:.0f} images/sec, {result['workers']} workers; scan "
                      f"{c['seconds']:.1f} s), max side {c['max_resolution']}, {c['write_mode']}."]
    return "\n".join(lines) + "\n"


def parser(cuda: bool) -> argparse.ArgumentParser:
    """`simmim bench loaders`'s options; the default batch is larger on a GPU (`cuda`)."""
    ap = argparse.ArgumentParser(prog="simmim bench loaders", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/sample/train", help="class-folder tree to read")
    ap.add_argument("--synthetic", type=int, default=0, help="write N ImageNet-sized JPEGs and read those")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--batch", type=int, default=128 if cuda else 32)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--backends", default="torch,ffcv,dali")
    ap.add_argument("--max-resolution", type=int, default=256, help=".beton longer side")
    ap.add_argument("--out", default="results")
    return ap


def source_images(data: str, synthetic: int, tmp: Path) -> Path:
    """The class-folder tree to read: `synthetic` JPEGs written under `tmp` (if > 0), else `data`
    (the sample dataset, built on first use when it is the default and missing)."""
    src = Path(data)
    if synthetic:
        t0 = time.perf_counter()
        src = synthetic_jpegs(tmp / "synthetic", synthetic)
        print(f"wrote {synthetic} synthetic JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
    elif not src.exists() and str(src) == "data/sample/train":
        from simmim.pipeline.sample_data import build_sample_dataset

        src = build_sample_dataset("data/sample") / "train"
    return src


def write_results(result: dict, out_root: str, synthetic: int) -> None:
    """loaders[-synthetic<N>].json, .md (printed too) and .png (images/sec per loader) in the
    results folder under `out_root` for this device."""
    rows = result["rows"]
    out = results_dir(out_root, "loaders")
    tag = "loaders" + (f"-synthetic{synthetic}" if synthetic else "")
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    report = markdown(result)
    (out / f"{tag}.md").write_text(report)
    write_bar_chart(out / f"{tag}.png", [r["loader"] for r in rows], {"images/sec": [r["img_per_s"] for r in rows]},
                    ylabel="images / second",
                    title=f"Loaders, {result['size']}px, {result['workers']} workers, {device_name()}")
    print(report)
    print(f"wrote {out}/{tag}.md, .json, .png")


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    args = parser(cuda).parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if cuda else "cpu")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    missing = [b for b in backends if not available(b)]
    if missing:
        print(f"not installed, left out: {', '.join(missing)}")
        backends = [b for b in backends if b not in missing]

    with tempfile.TemporaryDirectory(prefix="simmim-bench-loaders-") as tmp:
        src = source_images(args.data, args.synthetic, Path(tmp))
        conversion, beton = None, Path(tmp) / "bench.beton"
        if "ffcv" in backends:
            from simmim.pipeline.convert import convert

            conversion = convert(str(src), str(beton), max_resolution=args.max_resolution,
                                 workers=args.workers, progress=False)
            print(f"conversion: {conversion['images_per_sec']:.0f} images/sec", flush=True)
        aug = Augmentation(size=args.size)
        masks = MaskGenerator(args.size, 32, 0.6)
        rows = []
        for label, backend, options in configurations(backends, cuda):
            path = str(beton) if backend == "ffcv" else str(src)
            spec = LoaderSpec(backend, path, aug, args.batch, args.workers, **options)
            loader = build_loader(spec, masks, device)
            row = {"loader": label, **time_loader(loader, args.epochs, device)}
            del loader
            print(f"{label}: {row['img_per_s']:.0f} img/s, steady {row['steady_img_per_s'] or 0:.0f}, epoch start "
                  f"{row['epoch_start_s']:.2f}s (warm-up epoch {row['warmup_epoch_s']:.1f}s)", flush=True)
            rows.append(row)
        n_images = sum(1 for p in Path(src).rglob("*") if p.is_file())
    result = {"device": device_name(), "source": "synthetic" if args.synthetic else str(args.data),
              "images": n_images, "size": args.size, "batch": args.batch, "workers": args.workers,
              "epochs": args.epochs, "conversion": conversion and {k: v for k, v in conversion.items()
                                                                     if k != "bad_files"},
              "rows": rows}
    write_results(result, args.out, args.synthetic)
    return result
