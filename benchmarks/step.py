"""What one SimMIM training step costs: images/sec, the share of time spent waiting for data,
peak memory, and MFU (model FLOPs counted exactly with torch.utils.flop_counter, over the device's
peak).

    simmim bench step [--models swin_base,vit_base] [--batch 128] [--precision bf16]
                      [--compile] [--kernels auto|triton|reference] [--data synthetic|loader]
                      [--loader torch|dali] [--synthetic N] [--no-fused-shuffle] [--tag NAME]

On CUDA the paper's models (Swin-B 192, ViT-B 224) at batch 128; on CPU their small variants. Each
configuration runs the trainer's own step (engine.Trainer.train_epoch) after a warm-up, so the numbers
are the trainer's. Writes step-<tag>.md, .json and .png under a results folder naming the device
(<tag>: precision, compiled, kernels, data, shuffle, then --tag); the .md and .json are rewritten
after every model, so a run stopped at a time limit keeps the models it finished.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from simmim.kernels import dispatch
from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, build_loader
from simmim.trainer.engine import StepOptions, Trainer
from simmim.trainer.model import ARCHS, build_simmim, param_groups
from simmim.trainer.precision import autocast

from .loaders import synthetic_jpegs
from .measure import count_flops
from .report import device_name, results_dir, write_bar_chart, write_results

MODELS = {  # name: (arch, image size, window)
    "swin_base": ("swin_base", 192, 6), "vit_base": ("vit_base", 224, 0),
    "swin_mini": ("swin_mini", 128, 4), "vit_micro": ("vit_micro", 128, 0),
}
# Dense bf16 and TF32 tensor-core peaks in TFLOP/s (NVIDIA data sheets); the first name that the
# device's name contains wins, so the PCIe / NVL variants come before the plain H100 (SXM).
PEAK_TFLOPS = [("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 418.0), ("H100", 989.0, 494.0),
               ("H200", 989.0, 494.0), ("A100", 312.0, 156.0), ("L40S", 362.0, 183.0)]


def peak_tflops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, bf16, tf32 in PEAK_TFLOPS:
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def flops_per_image(model, size: int, batch: int, device, amp_dtype) -> float:
    """Forward + backward FLOPs of one training step, per image (matmuls, convolutions, attention)."""
    x = torch.randn(batch, 3, size, size, device=device)
    masks = MaskGenerator(size, 32, 0.6).sample(batch, device=device)

    def step():
        with autocast(device.type, amp_dtype):
            loss = model(x, masks)
        loss.backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops / batch


class SyntheticData:
    """Endless (images, masks) already on the device: the step with no input pipeline."""

    def __init__(self, batch: int, size: int, device):
        self.images = torch.randn(batch, 3, size, size, device=device)
        self.masks = MaskGenerator(size, 32, 0.6).sample(batch, device=device)

    def __iter__(self):
        return itertools.repeat((self.images, self.masks))


class TimedIter:
    """Wraps a loader; sums the host time spent waiting in next()."""

    def __init__(self, it):
        self.it, self.wait = iter(it), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        item = next(self.it)
        self.wait += time.perf_counter() - t
        return item


def measure(name: str, batch: int, steps: int, warmup: int, precision: str, compile_: bool,
            data: str, data_path: str, workers: int, device, fused_shuffle: bool = True,
            loader: str = "torch") -> dict:
    arch, size, window = MODELS[name]
    torch.manual_seed(0)
    model = build_simmim(arch, size, 32, window, fused_shuffle=fused_shuffle).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    flops = flops_per_image(model, size, min(batch, 8), device, amp_dtype)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, ARCHS[arch].family), lr=1e-4, fused=True)
    train_model = torch.compile(model) if compile_ else model
    if data == "loader":
        source = build_loader(LoaderSpec(loader, data_path, Augmentation(size=size), batch, workers),
                              MaskGenerator(size, 32, 0.6), device)
        source = itertools.chain.from_iterable(itertools.repeat(source))  # epochs back to back
    else:
        source = SyntheticData(batch, size, device)
    it = TimedIter(source)

    def run(n: int) -> None:
        options = StepOptions(clip_grad=5.0, amp_dtype=amp_dtype, log_every=n, max_skipped_streak=n + 1)
        Trainer(model, optimizer, lambda s: 1e-4, options, steps_per_epoch=n, train_model=train_model,
                device=device).train_epoch(it, epoch=0)

    run(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    it.wait = 0.0
    start = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    ips = batch * steps / wall
    peak = peak_tflops(precision)
    return {"model": name, "image_size": size, "batch": batch, "precision": precision, "compiled": compile_,
            "kernels": "triton" if dispatch.use_triton(torch.empty(0, device=device)) else "reference",
            "fused_shuffle": fused_shuffle, "data": data,
            "loader": loader if data == "loader" else None, "img_per_s": ips, "step_ms": 1000 * wall / steps,
            "data_wait_pct": 100 * it.wait / wall,
            "gflops_per_image": flops / 1e9, "tflops": flops * ips / 1e12,
            "mfu_pct": 100 * flops * ips / (peak * 1e12) if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"# Training step on {device}", "",
             "| model | batch | precision | compiled | kernels | shuffle | data | img/s | step ms | data wait | "
             "GFLOP/img | TFLOP/s | MFU | peak mem |", "|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{r['mfu_pct']:.1f}%" if r["mfu_pct"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['model']} {r['image_size']} | {r['batch']} | {r['precision']} | "
                     f"{'yes' if r['compiled'] else 'no'} | {r['kernels']} | "
                     f"{'in loss' if r['fused_shuffle'] else 'PixelShuffle'} | {r.get('loader') or r['data']} | "
                     f"{r['img_per_s']:.1f} | "
                     f"{r['step_ms']:.1f} | {r['data_wait_pct']:.1f}% | {r['gflops_per_image']:.1f} | "
                     f"{r['tflops']:.2f} | {mfu} | {mem} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="simmim bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="swin_base,vit_base" if cuda else "swin_mini,vit_micro")
    ap.add_argument("--batch", type=int, default=128 if cuda else 16)
    ap.add_argument("--steps", type=int, default=30 if cuda else 4)
    ap.add_argument("--warmup", type=int, default=10 if cuda else 2)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--kernels", choices=dispatch.MODES, default="auto")
    ap.add_argument("--data", choices=["synthetic", "loader"], default="synthetic")
    ap.add_argument("--no-fused-shuffle", dest="fused_shuffle", action="store_false",
                    help="PixelShuffle before the loss (model.fused_shuffle=false), to compare")
    ap.add_argument("--loader", choices=["torch", "dali"], default="torch", help="the loader --data loader uses")
    ap.add_argument("--data-path", default="data/sample/train")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="--data loader reads N ImageNet-sized JPEGs written to a temporary folder, not --data-path")
    ap.add_argument("--workers", type=int, default=8 if cuda else 2)
    ap.add_argument("--out", default="results")
    ap.add_argument("--tag", default="", help="appended to the output file names, e.g. to keep one file per model")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise SystemExit(f"simmim bench step: unknown model {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    out = results_dir(args.out, "step")
    data = args.data if args.data == "synthetic" or args.loader == "torch" else f"loader-{args.loader}"
    tag = (f"{args.precision}{'-compiled' if args.compile else ''}-{args.kernels}-{data}"
           f"{'' if args.fused_shuffle else '-shuffle'}{'-' + args.tag if args.tag else ''}")
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="simmim-bench-step-")
    if args.data == "loader" and args.synthetic:
        args.data_path = str(synthetic_jpegs(Path(tmp.name), args.synthetic))
    with tmp, dispatch.use_backend(args.kernels):
        for name in names:
            row = measure(name, args.batch, args.steps, args.warmup, args.precision, args.compile, args.data,
                          args.data_path, args.workers, device, args.fused_shuffle, args.loader)
            print(f"{name}: {row['img_per_s']:.1f} img/s, data wait {row['data_wait_pct']:.1f}%, "
                  f"MFU {row['mfu_pct'] if row['mfu_pct'] is None else round(row['mfu_pct'], 1)}%", flush=True)
            rows.append(row)
            report = markdown(rows, device_name())
            write_results(out, f"step-{tag}", report, {"device": device_name(), "rows": rows})
    write_bar_chart(out / f"step-{tag}.png", [f"{r['model']} {r['image_size']}" for r in rows],
                    {"images/sec": [r["img_per_s"] for r in rows]}, ylabel="images / second",
                    title=f"SimMIM step ({tag}), {device_name()}")
    print(report)
    print(f"wrote {out}/step-{tag}.md, .json, .png")
    return rows


if __name__ == "__main__":
    main()
