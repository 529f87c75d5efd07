"""The paper's head ablation (Table 3): each prediction head's training cost against the linear one.

    simmim bench heads [--arch swin_base --size 192] [--no-timing] [--batch N --steps N]

SimMIM reports that its linear head trains 2.3x cheaper than an inverse Swin-B head (a decoder
mirroring the encoder) with no loss in fine-tuning accuracy. Compared here, as the trainer builds
them (`model.head`, trainer/heads.py): linear (1x1 conv + PixelShuffle), a 2-layer MLP, inverse
Swin-T and inverse Swin-B, each in the whole SimMIM model with its loss. Cost = training-step FLOPs
(forward + backward, counted exactly on the meta device) and, unless --no-timing, the measured step
time (forward, backward and an AdamW step; bf16 autocast on CUDA), one head after the other in one
process. Writes results/heads-<device>/heads.md, .json and .png.
"""
from __future__ import annotations

import argparse

import torch

from simmim.pipeline.masking import MaskGenerator
from simmim.trainer.heads import HEADS
from simmim.trainer.model import build_simmim
from simmim.trainer.precision import autocast

from .measure import count_flops, seconds_per_call
from .report import device_name, results_dir, write_bar_chart, write_results

CLAIMED_INVERSE_SWIN = 2.3  # SimMIM Table 3: inverse Swin-B's training cost, relative to linear


def build(head: str, arch: str, size: int) -> torch.nn.Module:
    return build_simmim(arch, size, 32, head=head)


def step(model: torch.nn.Module, x: torch.Tensor, masks: torch.Tensor, amp_dtype) -> None:
    with autocast(x.device.type, amp_dtype):
        loss = model(x, masks)
    loss.backward()


def head_flops(kind: str, arch: str = "swin_base", size: int = 192, batch: int = 2) -> float:
    """Training-step FLOPs per image of SimMIM `arch` with this head (meta device)."""
    with torch.device("meta"):
        model, x = build(kind, arch, size), torch.empty(batch, 3, size, size)
    masks = MaskGenerator(size, 32, 0.6).sample(batch).to("meta")
    return count_flops(lambda: step(model, x, masks, None)) / batch


def head_step_seconds(kind: str, arch: str, size: int, batch: int, steps: int, device: torch.device,
                      amp_dtype) -> float:
    """Seconds per training step (forward, backward, AdamW) of SimMIM `arch` with this head."""
    torch.manual_seed(0)
    model = build(kind, arch, size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    masks = MaskGenerator(size, 32, 0.6).sample(batch, generator=torch.Generator().manual_seed(0)).to(device)

    def once():
        step(model, x, masks, amp_dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return seconds_per_call(once, steps, device)


def head_table(timing: bool, batch: int, steps: int, arch: str = "swin_base", size: int = 192) -> list[dict]:
    """One row per head: GFLOPs per image, ratios to the linear head, and the paper's figure."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" else None
    rows = [{"head": k, "gflops_per_image": head_flops(k, arch, size) / 1e9} for k in HEADS]
    if timing:
        for r in rows:
            r["step_s"] = head_step_seconds(r["head"], arch, size, batch, steps, device, amp)
    for r in rows:
        r["flops_vs_linear"] = r["gflops_per_image"] / rows[0]["gflops_per_image"]
        if timing:
            r["time_vs_linear"] = r["step_s"] / rows[0]["step_s"]
        r["claimed"] = CLAIMED_INVERSE_SWIN if r["head"] == "inverse_swin_b" else None
    return rows


def head_markdown(rows: list[dict], arch: str = "swin_base", size: int = 192) -> str:
    lines = [f"## Prediction head ({arch} {size}): training cost relative to the linear head", "",
             "| model.head | GFLOP/img (train step) | x linear (FLOPs) | x linear (time) | paper (time) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        t = f"{r['time_vs_linear']:.2f}" if "time_vs_linear" in r else "n/a"
        lines.append(f"| {r['head']} | {r['gflops_per_image']:.1f} | {r['flops_vs_linear']:.2f} | {t} | "
                     f"{str(r['claimed']) + 'x' if r['claimed'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="simmim bench heads", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--arch", default="swin_base", help="the encoder (the paper: swin_base at 192)")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--batch", type=int, default=64 if cuda else 2)
    ap.add_argument("--steps", type=int, default=10 if cuda else 1)
    ap.add_argument("--no-timing", action="store_true", help="FLOPs only")
    args = ap.parse_args(argv)
    rows = head_table(not args.no_timing, args.batch, args.steps, args.arch, args.size)
    out = results_dir(args.out, "heads")
    report = head_markdown(rows, args.arch, args.size) + f"\nDevice: {device_name()}, batch {args.batch}.\n"
    write_results(out, "heads", report, {"device": device_name(), "arch": args.arch, "size": args.size,
                                         "batch": args.batch, "rows": rows})
    series = {"FLOPs": [r["flops_vs_linear"] for r in rows]}
    if not args.no_timing:
        series["step time"] = [r["time_vs_linear"] for r in rows]
    write_bar_chart(out / "heads.png", [r["head"] for r in rows], series, ylabel="x the linear head",
                    title=f"Prediction heads, {args.arch} {args.size}px, {device_name()}")
    print(report)
    print(f"wrote {out}/heads.md, .json, .png")
    return rows
