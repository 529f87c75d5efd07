"""Images/sec of our loaders beside the plain pipelines a user would otherwise write: same images,
output size, batch and workers, in one run, interleaved rounds, medians.

    simmim bench loaders [--data data/sample/train | --synthetic N] [--size 192] [--batch 32]
                         [--workers 2] [--rounds 5] [--epochs 1] [--backends torch,ffcv,dali,stream]

Loaders: ours (`torch`, `ffcv`, `dali`; on a GPU DALI as 'mixed' with and without the hardware JPEG
decoder, and on the CPU; `stream` from shards in a local folder and `stream s3` from the same shards
in an S3-compatible server, moto's, that the benchmark starts in its own process on 127.0.0.1:
its CPU counts in the main process; each also as `stream ... dali`, decoded by DALI with
`data.stream.decode: dali`, when DALI is installed) and, always beside them, the plain pipelines of
`plain_loaders.py`: torchvision's ImageFolder + RandomResizedCrop (`torchvision (plain)`), the
released SimMIM loader's transform (`released SimMIM`), and for each of our backends its library's
own pipeline on the same data (`ffcv (plain)` on the same .beton, `dali ... (plain)` with the same
DALI device, `stream ... (plain)`: StreamingDataset + PIL + torchvision on the same shards).

Every loader is built and runs one warm-up epoch (numba compilation, worker start-up, DALI's
build: reported as warm-up); then `--rounds` rounds each run `--epochs` epochs of every loader in
turn, the order rotated by one each round, so a machine that slows down or speeds up during the run
weighs on all loaders alike. Each batch is touched on the device and the total read back at the
end of the epoch, so asynchronous copies count. A loader's figure is the median over rounds
(min-max beside it); each of ours is given as a ratio to its plain counterpart, to plain
torchvision and to the released SimMIM loader, each ratio taken per round (the two ran back to
back) and its median and min-max reported. A ratio carries across machines where images/sec do
not. Besides wall time, the CPU time of the process and its workers per image (`cpu ms/img`: all
the work the loader costs, whatever the machine's other load) and that of the main process alone
(`main ms/img`: the trainer's process, FFCV's and DALI's pipeline threads included).

`--synthetic N` writes N JPEGs at ImageNet-like sizes (long side ~500 px, quality 90). Writes
loaders[-synthetic<N>].md, .json and .png under a results folder naming the device, after every
round (a run stopped early leaves the rounds it finished). See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, build_loader
from simmim.pipeline.convert import convert
from simmim.pipeline.loaders import available
from simmim.pipeline.options import DALIOptions, StreamOptions
from simmim.pipeline.sample_data import build_sample_dataset

from . import plain_loaders as plain
from .report import device_name, results_dir, write_bar_chart, write_results as write_md_json

TORCHVISION, RELEASED = "torchvision (plain)", "released SimMIM"


def synthetic_jpegs(root: Path, n: int, seed: int = 0, classes: int = 10, distinct: int = 64) -> Path:
    """n JPEGs shaped like ImageNet's (long side 400-500 px, 4:3 / 3:4 / 1:1), smooth content with
    noise so they compress like photographs (~100-150 KB). `distinct` different images are drawn
    and the rest are byte copies of them (decoding cost is the same; writing is fast)."""
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


@dataclass
class Entry:
    """One loader to time: `build()` returns an object with set_epoch(epoch) whose iteration yields
    (images, masks or None, ...) per batch; `plain` names its plain counterpart (ours only)."""
    label: str
    build: Callable[[], object]
    ours: bool = False
    plain: str | None = None


def descendants(pid: int) -> list[int]:
    """The live descendants of process `pid`, from /proc (empty where /proc is missing)."""
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                found = [int(c) for c in task.read_text().split()]
            except OSError:  # ended meanwhile
                continue
            out += found
            todo += found
    return out


def cpu_seconds() -> tuple[float, float]:
    """(this process's CPU seconds, all threads; that plus its descendants'), user + system.

    A live descendant's from /proc/PID/stat (utime, stime, and cutime, cstime for the children it
    reaped); the children this process reaped from getrusage(RUSAGE_CHILDREN). So a worker that
    ends between two calls moves from one term to another instead of taking its seconds with it.
    """
    main = time.process_time()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = reaped.ru_utime + reaped.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in descendants(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children += sum(int(f) for f in fields[11:15]) / tick
    return main, main + children


def run_epoch(loader, epoch: int, device: torch.device) -> dict:
    """One epoch of `loader`, every batch touched on the device (a corner pixel and a mask summed:
    the consumer costs next to nothing), the total read back at the end. Wall and CPU seconds."""
    loader.set_epoch(epoch)
    n, acc = 0, torch.zeros((), device=device)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    n_first, t_first = 0, 0.0
    for batch in loader:
        acc += batch[0][:, 0, 0, 0].float().sum()
        if len(batch) > 1 and batch[1] is not None:
            acc += batch[1][:, 0, 0].float().sum()
        n += len(batch[0])
        if not n_first:
            n_first, t_first = n, time.perf_counter() - t0
    float(acc)  # synchronise
    seconds, cpu1 = time.perf_counter() - t0, cpu_seconds()
    main = cpu1[0] - cpu0[0]
    # A descendant that ends and is reaped by another process (not this one) takes its seconds out of
    # the sum: the descendants' share can then come out negative; it is never below zero.
    descendants = max(0.0, (cpu1[1] - cpu1[0]) - (cpu0[1] - cpu0[0]))
    return {"images": n, "seconds": seconds, "first_images": n_first, "first_seconds": t_first,
            "cpu_main": main, "cpu_all": main + descendants}


def epochs_figures(runs: list[dict]) -> dict:
    """One round's figures from its epochs: images/sec overall and after each epoch's first batch
    (steady), mean epoch start, CPU milliseconds per image (main process; with its workers)."""
    images, seconds = sum(r["images"] for r in runs), sum(r["seconds"] for r in runs)
    steady_n = sum(r["images"] - r["first_images"] for r in runs)
    steady_s = sum(r["seconds"] - r["first_seconds"] for r in runs)
    return {"images": images, "img_per_s": images / seconds,
            "steady_img_per_s": steady_n / steady_s if steady_s > 0 else None,
            "epoch_start_s": sum(r["first_seconds"] for r in runs) / len(runs),
            "main_cpu_ms_per_img": 1000 * sum(r["cpu_main"] for r in runs) / max(1, images),
            "cpu_ms_per_img": 1000 * sum(r["cpu_all"] for r in runs) / max(1, images)}


def entries(backends: list[str], cuda: bool, src: Path, beton: Path, size: int, batch: int,
            workers: int, shards: dict[str, tuple[str, Path]] | None = None) -> list[Entry]:
    """Our loaders of `backends` and the plain pipelines beside them (module docstring). `shards`:
    {label: (shard folder or s3:// URL, a folder for the caches)} for the stream backend."""
    aug, device = Augmentation(size=size), torch.device("cuda" if cuda else "cpu")
    masks = MaskGenerator(size, 32, 0.6)

    def ours(backend: str, path: Path, **options):
        return lambda: build_loader(LoaderSpec(backend, str(path), aug, batch, workers, **options), masks, device)

    out = [Entry(TORCHVISION, lambda: plain.PlainTorchvision(str(src), aug, batch, workers, device)),
           Entry(RELEASED, lambda: plain.PlainTorchvision(str(src), aug, batch, workers, device, released=True))]
    for b in backends:
        if b == "torch":
            out.append(Entry("torch", ours("torch", src), True, TORCHVISION))
        elif b == "ffcv":
            out += [Entry("ffcv (plain)", lambda: plain.PlainFFCV(str(beton), aug, batch, workers, device)),
                    Entry("ffcv", ours("ffcv", beton), True, "ffcv (plain)")]
        elif b == "dali":
            modes = [("dali mixed+hw", "mixed", 0.65), ("dali mixed", "mixed", 0.0), ("dali cpu", "cpu", 0.0)]
            for label, mode, hw in modes if cuda else [("dali", "cpu", 0.0)]:
                out += [Entry(f"{label} (plain)", lambda m=mode, h=hw: plain.PlainDALI(
                            str(src), aug, batch, workers, device, m, h)),
                        Entry(label, ours("dali", src, dali=DALIOptions(device=mode, hw_decoder_load=hw)), True,
                              f"{label} (plain)")]
        elif b == "stream":
            for label, (path, caches) in (shards or {}).items():  # one cache folder each: streaming's rule
                out += [Entry(f"{label} (plain)", lambda p=path, c=caches: plain.PlainStreaming(
                            p, aug, batch, workers, device, str(c / "plain"))),
                        Entry(label, ours("stream", path, stream=StreamOptions(cache_dir=str(caches / "ours"),
                                                                                decode="pil")),
                              True, f"{label} (plain)")]
                if available("dali"):  # the same shards decoded by DALI (mixed on a GPU)
                    out.append(Entry(f"{label} dali", ours(
                        "stream", path, stream=StreamOptions(cache_dir=str(caches / "ours-dali"), decode="dali"),
                        dali=DALIOptions(device="mixed" if cuda else "cpu")), True, f"{label} (plain)"))
    return out


def interval(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(table: list[Entry], rounds: list[dict[str, dict]], warmup: dict[str, float]) -> list[dict]:
    """A row per loader: medians (min-max) over rounds, and for ours the per-round ratios to the
    plain counterpart, plain torchvision and the released SimMIM loader."""
    rows = []
    for e in table:
        per = [r[e.label] for r in rounds if e.label in r]
        if not per:
            continue
        row = {"loader": e.label, "ours": e.ours, "plain": e.plain, "rounds": len(per),
               "images": per[0]["images"], "warmup_epoch_s": round(warmup[e.label], 2),
               "img_per_s_rounds": [round(p["img_per_s"], 1) for p in per]}
        for key in ("img_per_s", "steady_img_per_s", "epoch_start_s", "main_cpu_ms_per_img", "cpu_ms_per_img"):
            values = [p[key] for p in per if p[key] is not None]
            row[key] = statistics.median(values) if values else None
            if key == "img_per_s":
                row["img_per_s_min"], row["img_per_s_max"] = min(values), max(values)
        row["ratios"] = {}
        for name, other in (("x plain", e.plain), ("x torchvision", TORCHVISION), ("x released", RELEASED)):
            pairs = [r[e.label]["img_per_s"] / r[other]["img_per_s"] for r in rounds
                     if e.ours and other and e.label in r and other in r]
            if pairs:
                row["ratios"][name] = interval(pairs)
        rows.append(row)
    return rows


def measure(table: list[Entry], rounds: int, epochs: int, device: torch.device,
            report: Callable[[list[dict]], None]) -> list[dict]:
    """Builds every loader, runs its warm-up epoch, then `rounds` interleaved rounds of `epochs`
    epochs each (module docstring); `report(rows)` after every round. Returns the rows."""
    loaders, warmup, results = {}, {}, []
    for e in table:
        t0 = time.perf_counter()
        loaders[e.label] = e.build()
        run_epoch(loaders[e.label], 0, device)
        warmup[e.label] = time.perf_counter() - t0
        print(f"{e.label}: built, warm-up epoch {warmup[e.label]:.1f}s", flush=True)
    rows = []
    for r in range(rounds):
        this = {}
        for e in table[r % len(table):] + table[:r % len(table)]:
            runs = [run_epoch(loaders[e.label], 1 + r * epochs + k, device) for k in range(epochs)]
            this[e.label] = epochs_figures(runs)
        results.append(this)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v['img_per_s']:.0f}" for k, v in this.items()),
              flush=True)
        rows = summarise(table, results, warmup)
        report(rows)
    for loader in loaders.values():
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return rows


def ratio_text(row: dict, name: str) -> str:
    r = row["ratios"].get(name)
    return f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]" if r else ""


def markdown(result: dict) -> str:
    lines = [f"# Loaders on {result['device']}",
             "",
             f"{result['images']} source images ({result['source']}), output {result['size']}x{result['size']}, "
             f"batch {result['batch']}, {result['workers']} workers each; {result['rounds_done']} of "
             f"{result['rounds']} interleaved rounds of {result['epochs']} epoch(s) per loader after one warm-up "
             f"epoch; same images for every loader (FFCV from the .beton converted from them).",
             "",
             "images/sec: median over rounds [min-max]. Ratios (ours only): per-round images/sec of ours over "
             "its plain counterpart, plain torchvision and the released SimMIM loader, median [min-max]. "
             "CPU ms/img: CPU time of the process and its workers per image; main: the main process alone "
             "(pipeline threads included). Steady: after each epoch's first batch.",
             "",
             "| loader | images/sec | x plain | x torchvision | x released | cpu ms/img | main ms/img | "
             "steady images/sec | epoch start (s) | warm-up (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        steady = f"{r['steady_img_per_s']:.0f}" if r.get("steady_img_per_s") else "n/a"
        lines.append(f"| {r['loader']}{' (ours)' if r['ours'] else ''} | {r['img_per_s']:.0f} "
                     f"[{r['img_per_s_min']:.0f}-{r['img_per_s_max']:.0f}] | {ratio_text(r, 'x plain')} | "
                     f"{ratio_text(r, 'x torchvision')} | {ratio_text(r, 'x released')} | "
                     f"{r['cpu_ms_per_img']:.2f} | {r['main_cpu_ms_per_img']:.2f} | {steady} | "
                     f"{r['epoch_start_s']:.2f} | {r['warmup_epoch_s']:.1f} |")
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
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are taken over them)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of each loader per round")
    ap.add_argument("--backends", default="torch,ffcv,dali,stream", help="ours to time; the plain ones always run")
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
        src = build_sample_dataset("data/sample") / "train"
    return src


@contextlib.contextmanager
def shard_sets(src: Path, tmp: Path, workers: int):
    """{label: (shards, cache folder)} for the stream backend: `src` written by `simmim shard` into a
    local folder, and into a bucket of moto's S3-compatible server, started here on 127.0.0.1 (the
    environment points streaming and boto3 at it until the block ends). Without moto: the local
    folder only."""
    from simmim.pipeline.shards import shard_command

    shard_command(str(src), str(tmp / "shards"), workers=workers, progress=False)
    sets = {"stream": (str(tmp / "shards"), tmp / "cache-local")}
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("moto not installed (the test extra): stream s3 left out", flush=True)
        yield sets
        return
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's web server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server._server.server_port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url, "S3_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="simmim-bench")
        shard_command(str(src), "s3://simmim-bench/train", workers=workers, progress=False)
        yield {**sets, "stream s3": ("s3://simmim-bench/train", tmp / "cache-s3")}
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def write_results(result: dict, out_root: str, synthetic: int, quiet: bool = False) -> Path:
    """loaders[-synthetic<N>].json, .md (printed unless `quiet`) and .png (images/sec per loader)
    in the results folder under `out_root` for this device, each written atomically."""
    rows = result["rows"]
    out = results_dir(out_root, "loaders")
    tag = "loaders" + (f"-synthetic{synthetic}" if synthetic else "")
    report = markdown(result)
    write_md_json(out, tag, report, result)
    write_bar_chart(out / f"{tag}.png", [r["loader"] for r in rows], {"images/sec": [r["img_per_s"] for r in rows]},
                    ylabel="images / second (median of rounds)",
                    title=f"Loaders, {result['size']}px, {result['workers']} workers, {device_name()}")
    if not quiet:
        print(report)
        print(f"wrote {out}/{tag}.md, .json, .png")
    return out


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

    with tempfile.TemporaryDirectory(prefix="simmim-bench-loaders-") as tmp, contextlib.ExitStack() as stack:
        src = source_images(args.data, args.synthetic, Path(tmp))
        shards = stack.enter_context(shard_sets(src, Path(tmp), args.workers)) if "stream" in backends else None
        conversion, beton = None, Path(tmp) / "bench.beton"
        if "ffcv" in backends:
            conversion = convert(str(src), str(beton), max_resolution=args.max_resolution,
                                 workers=args.workers, progress=False)
            print(f"conversion: {conversion['images_per_sec']:.0f} images/sec", flush=True)
        result = {"device": device_name(), "source": "synthetic" if args.synthetic else str(args.data),
                  "images": sum(1 for p in Path(src).rglob("*") if p.is_file()), "size": args.size,
                  "batch": args.batch, "workers": args.workers, "rounds": args.rounds, "epochs": args.epochs,
                  "rounds_done": 0, "conversion": conversion and {k: v for k, v in conversion.items()
                                                                  if k != "bad_files"}, "rows": []}

        def report(rows: list[dict]) -> None:
            result.update(rows=rows, rounds_done=result["rounds_done"] + 1)
            write_results(result, args.out, args.synthetic, quiet=True)

        table = entries(backends, cuda, src, beton, args.size, args.batch, args.workers, shards)
        measure(table, args.rounds, args.epochs, device, report)
    write_results(result, args.out, args.synthetic)
    return result
