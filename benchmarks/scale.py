"""ImageNet scale: listing, scan, convert, epoch orders, DALI epoch start and loader-worker memory
on an ImageNet-shaped tree of N entries, in one run.

    simmim bench scale [--n 1281167] [--classes 1000] [--tree /tmp/simmim-scale-tree] [--keep-tree]
                       [--scan-n 160000] [--convert-side-by-side 2000] [--orders 1281167,14197122]
                       [--steps listing,scan,convert,orders,dali,memory,inspect] [--out results]

The tree is `root/<class>/<image>.JPEG`, N hard links to a few hundred distinct real photographs
(the sample dataset's JPEGs, cut from scikit-image's photographs at ImageNet-like sizes): building
1.28M entries takes a few minutes and next to no disk. It is removed at the end unless `--keep-tree`
(an existing complete tree at `--tree` is reused). Each step runs in a fresh process so its
memory figures are its own:

- listing: `scan_folder` over the tree: seconds; memory the list holds and the peak (tracemalloc).
- scan: `scan_images` bookkeeping with the decode stubbed out, at `--scan-n` / 4 and `--scan-n`
  (the ratio is 4 when linear, 16 when quadratic), and real images/sec on `--scan-real` images.
- convert: seconds until `simmim convert` of the whole tree writes its first bytes into the
  output (stopped then), and `simmim convert` against a plain FFCV `DatasetWriter` script on
  the same `--convert-side-by-side` distinct clean JPEGs, side by side (best of two each).
- orders: one rank's epoch order with a mid-epoch resume position (8 ranks), at each size in
  `--orders` (no files needed): seconds and peak memory added.
- dali: time to the first batch of each of 5 epochs (2 batches read each) on the whole tree (as a
  list), DALI on the CPU, and resident memory after each.
- memory: private memory (USS) of each reference-loader worker after its first batch and after
  `--memory-batches` more; with decoding stubbed (`--memory-stub`, default) the loader can walk
  25% of an epoch at 1.28M in minutes, and what grows is the sample list's bookkeeping alone.
- inspect: `simmim convert --limit` of `--inspect-n` images, one sample's JPEG data overwritten
  with noise, and the seconds `simmim inspect` takes to name it.

Writes scale.md, scale.json and scale.png under a results folder naming the device.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simmim.pipeline import (Augmentation, LoaderSpec, MaskGenerator, ReferenceLoader, ShardedSampler, build_loader, folder,
                             scan_folder)
from simmim.pipeline import scan as scan_module
from simmim.pipeline.convert import convert, inspect, open_beton
from simmim.pipeline.sample_data import CLASSES, build_sample_dataset
from simmim.pipeline.scan import write_file_list

from .report import device_name, results_dir, write_bar_chart

STEPS = ("listing", "scan", "convert", "orders", "dali", "memory", "inspect")
COMPLETE = ".complete"


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def distinct_jpegs(tmp: Path, count: int = 300) -> list[Path]:
    """`count` distinct real JPEGs (the sample dataset: 15 photographs x count/15 random views)."""
    per_photo = -(-count // sum(len(v) for v in CLASSES.values()))
    root = build_sample_dataset(tmp / "sources", per_photo=per_photo, val_per_photo=0)
    return sorted((root / "train").rglob("*.JPEG"))[:count]


def build_tree(root: Path, n: int, classes: int, sources: list[Path]) -> Path:
    """root/c#####/######.JPEG, n entries as hard links to `sources` in turn; reused if complete."""
    marker = root / COMPLETE
    if marker.is_file() and marker.read_text().split() == [str(n), str(classes)]:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    per_class = -(-n // classes)
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir()
        for i in range(c * per_class, min(n, (c + 1) * per_class)):
            os.link(sources[i % len(sources)], d / f"n{c:08d}_{i}.JPEG")
    marker.write_text(f"{n} {classes}\n")
    return root


# --- the steps: each runs in its own process (`--step NAME`) and prints one JSON line -----------------

def step_listing(args) -> dict:
    """Seconds of a plain run, then the Python heap the sample list holds and the peak while it is
    built, from a second run under tracemalloc (numpy registers its buffers there too)."""
    t0 = time.perf_counter()
    samples, classes = scan_folder(args.tree)
    seconds = time.perf_counter() - t0
    del samples
    tracemalloc.start()
    samples, classes = scan_folder(args.tree)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"entries": len(samples), "classes": len(classes), "seconds": round(seconds, 2),
            "held_mib": round(held / 2**20, 1), "peak_mib": round(peak / 2**20, 1)}


def step_scan(args) -> dict:
    samples, classes = scan_folder(args.tree)
    real = samples[:args.scan_real]
    t0 = time.perf_counter()
    result = scan_module.scan_images(real, classes, workers=args.workers, progress=False)
    real_rate = len(real) / (time.perf_counter() - t0)
    scan_module.check_image = lambda path, max_pixels=None: (None, (1, 1))  # bookkeeping only (forks inherit it)
    out = {"real_images": len(real), "real_img_per_s": round(real_rate, 1), "real_bad": len(result.bad)}
    for n in (args.scan_n // 4, args.scan_n):
        subset = samples[:n]
        t0 = time.perf_counter()
        scan_module.scan_images(subset, classes, workers=args.workers, progress=False)
        out[f"bookkeeping_s_{n}"] = round(time.perf_counter() - t0, 2)
    small, large = out[f"bookkeeping_s_{args.scan_n // 4}"], out[f"bookkeeping_s_{args.scan_n}"]
    out["ratio_4x"] = round(large / max(small, 1e-9), 2)
    return out


def first_bytes_seconds(cmd: list[str], folder: Path, name: str, timeout: float) -> tuple[float | None, float]:
    """Starts `cmd` (a conversion to folder/name), returns the seconds until its temporary output
    grows past its first size (the first written sample), then stops it (None after `timeout`),
    and the CPU seconds its processes had used by then (the load-independent figure on a shared
    machine)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0, first_size, got, cpu = time.perf_counter(), None, None, 0.0
    ps = psutil.Process(proc.pid)

    def cpu_now() -> float:
        total = 0.0
        for p in [ps] + ps.children(recursive=True):
            try:
                c = p.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return total

    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            tmps = list(folder.glob(f".{name}.*.tmp"))
            if tmps:
                size = tmps[0].stat().st_size if tmps[0].exists() else 0
                if first_size is None:
                    first_size = size
                elif size > first_size:
                    got = time.perf_counter() - t0
                    cpu = cpu_now()
                    break
            cpu = cpu_now()
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
    return got, round(cpu, 1)


PLAIN_WRITER = """
import sys, time
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from torchvision.datasets import ImageFolder
src, dst, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
writer = DatasetWriter(dst, {"image": RGBImageField(write_mode="jpg", max_resolution=256, jpeg_quality=90,
                                                     compress_probability=0.5), "label": IntField()},
                       num_workers=workers)
writer.from_indexed_dataset(ImageFolder(src), chunksize=100)
print(time.perf_counter() - t0)
"""


def step_convert(args) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="simmim-scale-convert-", dir=args.tree.parent) as tmp:
        tmp = Path(tmp)
        simmim = [sys.executable, "-m", "simmim.trainer.cli"]
        if args.convert_timeout > 0:
            first, cpu = first_bytes_seconds([*simmim, "convert", str(args.tree), str(tmp / "all.beton"),
                                              "--workers", str(args.workers)], tmp, "all.beton", args.convert_timeout)
            out["first_sample_s"] = round(first, 1) if first is not None else None
            out["first_sample_cpu_s"] = cpu
            out["first_sample_timeout_s"] = args.convert_timeout
        if args.convert_side_by_side:
            src = tmp / "clean"
            build_tree(src, args.convert_side_by_side, 10, distinct_jpegs(tmp, args.convert_side_by_side))
            (src / COMPLETE).unlink()
            plain, ours = [], []
            for rep in range(2):
                for label, runs in (("plain", plain), ("ours", ours)):
                    dst = tmp / f"{label}{rep}.beton"
                    t0 = time.perf_counter()
                    if label == "plain":
                        subprocess.run([sys.executable, "-c", PLAIN_WRITER, str(src), str(dst), str(args.workers)],
                                       check=True, stdout=subprocess.DEVNULL)
                    else:
                        subprocess.run([*simmim, "convert", str(src), str(dst), "--workers", str(args.workers)],
                                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    runs.append(time.perf_counter() - t0)
            out.update({"side_by_side_images": args.convert_side_by_side, "plain_writer_s": round(min(plain), 2),
                        "convert_s": round(min(ours), 2), "convert_speed_vs_plain": round(min(plain) / min(ours), 3)})
    return out


def order_once(n: int, world_size: int) -> dict:
    """One rank's epoch order with a resume position half way through (in a fresh process, so the
    peak memory is this order's own)."""
    base, t0, c0 = rss_mib(), time.perf_counter(), time.process_time()
    sampler = ShardedSampler(n, rank=world_size - 1, world_size=world_size, seed=0)
    sampler.set_epoch(7, start=n // world_size // 2)
    order = sampler.indices()
    return {"s": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3),
            "peak_added_mib": round(peak_rss_mib() - base, 1), "len": len(order)}


def step_orders(args) -> dict:
    out = {}
    ctx = multiprocessing.get_context("spawn")
    for n in args.orders:
        for world_size in (1, 8):
            with ctx.Pool(1) as pool:
                got = pool.apply(order_once, (n, world_size))
            out[f"order_s_{n}_world{world_size}"] = got["s"]
            out[f"order_cpu_s_{n}_world{world_size}"] = got["cpu_s"]
            out[f"order_peak_added_mib_{n}_world{world_size}"] = got["peak_added_mib"]
    return out


def step_dali(args) -> dict:
    """DALI reads a list of the tree (written here, unchecked: every entry links to one of the
    checked source JPEGs; a folder path would make the loader scan 1.28M copies of 300 files)."""
    listed = args.tree.parent / f"{args.tree.name}.list.txt"
    write_file_list(listed, scan_folder(args.tree)[0])
    try:
        loader = build_loader(LoaderSpec("dali", str(listed), Augmentation(size=64), 32, args.workers),
                              MaskGenerator(64, 32, 0.6), torch.device("cpu"))
        starts, rss = [], []
        for epoch in range(5):
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            for k, _ in enumerate(loader):
                if k == 0:
                    starts.append(round(time.perf_counter() - t0, 2))
                if k == 1:
                    break
            rss.append(round(rss_mib(), 1))
    finally:
        listed.unlink(missing_ok=True)
    return {"epoch_start_s": starts, "rss_mib": rss}


def step_memory(args) -> dict:
    import psutil

    if args.memory_stub:  # what grows is the sample list: leave decoding out so 25% of an epoch fits
        tiny = Image.new("RGB", (40, 40))
        folder.decode_rgb = lambda path, *args, **kwargs: tiny.copy()
    batch = 64
    loader = ReferenceLoader(LoaderSpec("torch", str(args.tree), Augmentation(size=32), batch, args.workers),
                             MaskGenerator(32, 32, 0.6), torch.device("cpu"))
    batches = args.memory_batches or len(loader) // 4
    children = []

    def uss() -> list[float]:
        return [round(c.memory_full_info().uss / 2**20, 1) for c in children]

    first = None
    for k, _ in enumerate(loader):
        if k == 0:
            time.sleep(1.0)
            children = psutil.Process().children()
            first = uss()
        if k >= batches:
            break
    last = uss()
    return {"batches": batches, "batch": batch, "fraction_of_epoch": round(batches / len(loader), 3),
            "decode_stubbed": bool(args.memory_stub), "worker_uss_first_mib": first, "worker_uss_last_mib": last,
            "worker_growth_mib": [round(b - a, 1) for a, b in zip(first, last)]}


def step_inspect(args) -> dict:
    """`simmim convert --limit` of the tree to a .beton, garbage over one sample's JPEG data, and
    the seconds `inspect` takes to name it."""
    with tempfile.TemporaryDirectory(prefix="simmim-scale-inspect-", dir=args.tree.parent) as tmp:
        dst = Path(tmp) / "inspect.beton"
        t0 = time.perf_counter()
        convert(str(args.tree), str(dst), workers=args.workers, limit=args.inspect_n, progress=False)
        convert_s = time.perf_counter() - t0
        reader = open_beton(dst)
        victim = int(reader.num_samples) // 2
        ptr = int(reader.metadata["f0"]["data_ptr"][victim])
        size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr][0])
        with open(dst, "r+b") as f:
            f.seek(ptr + size // 3)
            f.write(np.random.default_rng(0).integers(0, 255, size - size // 3, dtype=np.uint8).tobytes())
        t0 = time.perf_counter()
        info = inspect(str(dst), workers=args.workers)
        return {"samples": int(reader.num_samples), "convert_s": round(convert_s, 1),
                "inspect_s": round(time.perf_counter() - t0, 1), "corrupted": victim,
                "found": info.get("decode_failures")}


STEP_FNS = {"listing": step_listing, "scan": step_scan, "convert": step_convert, "orders": step_orders,
            "dali": step_dali, "memory": step_memory, "inspect": step_inspect}


def run_step(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "simmim.benchmarks.scale", "--step", name, *argv],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(lines[-1])


def markdown(result: dict) -> str:
    r, n = result["steps"], result["n"]
    rows = []
    if "listing" in r:
        x = r["listing"]
        rows.append(("listing", f"{x.get('seconds')} s; list holds {x.get('held_mib')} MiB "
                     f"(peak {x.get('peak_mib')} MiB while built)", f"N={n}"))
    if "scan" in r:
        x = r["scan"]
        keys = sorted(k for k in x if k.startswith("bookkeeping_s_"))
        rows.append(("scan bookkeeping (decode stubbed)",
                     ", ".join(f"{x[k]} s at {k.rsplit('_', 1)[1]}" for k in keys) + f"; ratio {x.get('ratio_4x')}",
                     "target ratio < 5"))
        rows.append(("scan, real decode", f"{x.get('real_img_per_s')} img/s", f"{x.get('real_images')} images"))
    if "convert" in r:
        x = r["convert"]
        if "first_sample_timeout_s" in x:
            first = x["first_sample_s"]
            rows.append(("convert: first sample written", (f"{first} s" if first is not None else
                         f"none within {x['first_sample_timeout_s']} s") + f" ({x.get('first_sample_cpu_s')} s CPU)",
                         f"N={n}; target < 30 s"))
        if "plain_writer_s" in x:
            rows.append(("convert vs plain FFCV writer", f"{x['convert_s']} s vs {x['plain_writer_s']} s: "
                         f"{x['convert_speed_vs_plain']}x", f"{x['side_by_side_images']} JPEGs; target >= 1"))
    if "orders" in r:
        x = r["orders"]
        for size in result["orders"]:
            for world_size in (1, 8):
                rows.append((f"epoch order + resume, {size} images, {world_size} rank(s)",
                             f"{x.get(f'order_s_{size}_world{world_size}')} s "
                             f"({x.get(f'order_cpu_s_{size}_world{world_size}')} s CPU), "
                             f"+{x.get(f'order_peak_added_mib_{size}_world{world_size}')} MiB peak",
                             "target < 2 s, < 300 MiB at 14M"))
    if "dali" in r:
        x = r["dali"]
        rows.append(("DALI epoch start, epochs 0-4", f"{x.get('epoch_start_s')} s", f"N={n}; target < 1 s after epoch 0"))
        rows.append(("DALI resident memory after each", f"{x.get('rss_mib')} MiB", "target: no growth"))
    if "memory" in r:
        x = r["memory"]
        rows.append(("reference worker private memory growth", f"{x.get('worker_growth_mib')} MiB",
                     f"after {x.get('fraction_of_epoch')} of an epoch at N={n}"
                     f"{' (decode stubbed)' if x.get('decode_stubbed') else ''}; target < 10 MiB"))
    if "inspect" in r:
        x = r["inspect"]
        rows.append(("inspect: one corrupted sample", f"{x.get('inspect_s')} s, found {x.get('found')} "
                     f"(corrupted {x.get('corrupted')})", f"{x.get('samples')} samples; target < 60 s"))
    errors = [(k, v["error"]) for k, v in r.items() if "error" in v]
    lines = [f"# Scale on {result['device']}", "",
             f"ImageNet-shaped tree: {n} entries in {result['classes']} classes, hard links to "
             f"{result['distinct']} distinct JPEGs; {result['workers']} workers.", "",
             "| measure | result | at |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [f"\n{k}: failed: {e}" for k, e in errors]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """`simmim bench scale`'s options (`--step` runs one step in a child process: hidden)."""
    ap = argparse.ArgumentParser(prog="simmim bench scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_281_167, help="entries in the tree")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--distinct", type=int, default=300, help="distinct JPEGs the tree links to")
    ap.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "simmim-scale-tree")
    ap.add_argument("--keep-tree", action="store_true", help="leave the tree for the next run")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--scan-n", type=int, default=160_000, help="the larger of the two bookkeeping sizes")
    ap.add_argument("--scan-real", type=int, default=2000, help="images decoded for the real scan rate")
    ap.add_argument("--convert-timeout", type=float, default=300.0, help="give up on the first sample after this")
    ap.add_argument("--convert-side-by-side", type=int, default=2000, help="0: skip the plain-writer comparison")
    ap.add_argument("--orders", default="1281167,14197122", help="dataset sizes for the order step")
    ap.add_argument("--memory-batches", type=int, default=0, help="batches of 64 (0: 25%% of an epoch)")
    ap.add_argument("--inspect-n", type=int, default=20_000, help="samples in the inspect step's .beton")
    ap.add_argument("--memory-stub", type=int, default=1, help="1: stub decoding in the memory step")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="results")
    return ap


def write_chart(result: dict, out: Path, n: int, scan_n: int, orders: list[int]) -> None:
    """scale.png: the seconds of listing, the larger scan bookkeeping size, convert's first sample,
    each epoch order (one rank) and the last DALI epoch start, those the steps run measured."""
    seconds = {"listing": result["steps"].get("listing", {}).get("seconds"),
               "scan 4N bookkeeping": result["steps"].get("scan", {}).get(f"bookkeeping_s_{scan_n}"),
               "convert first sample": result["steps"].get("convert", {}).get("first_sample_s"),
               **{f"order {s}": result["steps"].get("orders", {}).get(f"order_s_{s}_world1") for s in orders}}
    dali = result["steps"].get("dali", {}).get("epoch_start_s")
    if dali:
        seconds["DALI epoch start (last)"] = dali[-1]
    seconds = {k: float(v) for k, v in seconds.items() if isinstance(v, (int, float))}
    if seconds:
        write_bar_chart(out / "scale.png", list(seconds), {"seconds": list(seconds.values())}, ylabel="seconds",
                        title=f"Scale, N={n}, {device_name()}")


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    args.orders = [int(x) for x in str(args.orders).split(",") if x]
    if args.step:  # a child process: one step, one JSON line
        print(json.dumps(STEP_FNS[args.step](args)), flush=True)
        return {}
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    forward = [a for a in (argv if argv is not None else sys.argv[1:])]
    result = {"device": device_name(), "n": args.n, "classes": args.classes, "distinct": args.distinct,
              "workers": args.workers, "orders": args.orders, "steps": {}}
    needs_tree = set(steps) - {"orders"}
    try:
        if needs_tree:
            with tempfile.TemporaryDirectory(prefix="simmim-scale-src-") as tmp:
                t0 = time.perf_counter()
                build_tree(args.tree, args.n, args.classes, distinct_jpegs(Path(tmp), args.distinct))
                result["tree_build_s"] = round(time.perf_counter() - t0, 1)
                print(f"tree: {args.n} entries at {args.tree} ({result['tree_build_s']} s)", flush=True)
        for name in steps:
            t0 = time.perf_counter()
            result["steps"][name] = run_step(name, forward)
            print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(result['steps'][name])}", flush=True)
    finally:
        if needs_tree and not args.keep_tree:
            shutil.rmtree(args.tree, ignore_errors=True)
    out = results_dir(args.out, "scale")
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    report = markdown(result)
    (out / "scale.md").write_text(report)
    write_chart(result, out, args.n, args.scan_n, args.orders)
    print(report)
    print(f"wrote {out}/scale.md, .json, .png")
    return result


if __name__ == "__main__":
    main()
