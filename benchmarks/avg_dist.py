"""The paper's Figure 3a: AvgDist (mean distance from a masked pixel to the nearest visible one)
against mask ratio, for mask patch sizes 4 to 64, at a 192x192 input.

    simmim bench avgdist [--out results/avgdist] [--samples 512]

Prints the table, and writes avgdist.json and avgdist.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from simmim.pipeline.masking import MaskGenerator, avg_dist

RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 10))
PATCH_SIZES = (4, 8, 16, 32, 64)


def avg_dist_table(input_size: int = 192, samples: int = 512, seed: int = 0,
                   ratios=RATIOS, patch_sizes=PATCH_SIZES) -> dict[int, dict[float, float]]:
    """{patch size: {ratio: AvgDist}}; nan where every cell is masked (no visible pixel)."""
    g = torch.Generator().manual_seed(seed)
    table = {}
    for p in patch_sizes:
        table[p] = {}
        for r in ratios:
            gen = MaskGenerator(input_size, p, r)
            table[p][r] = avg_dist(gen.sample(samples, generator=g), p)
    return table


def format_table(table: dict) -> str:
    ratios = next(iter(table.values())).keys()
    lines = ["| mask patch | " + " | ".join(f"{r:.1f}" for r in ratios) + " |",
             "|---:|" + "---:|" * len(ratios)]
    for p, row in table.items():
        lines.append(f"| {p} | " + " | ".join("n/a" if v != v else f"{v:.2f}" for v in row.values()) + " |")
    return "\n".join(lines)


def plot(table: dict, path: Path, input_size: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for p, row in table.items():
        ax.plot(list(row.keys()), list(row.values()), marker="o", label=f"{p}px cells")
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("AvgDist (pixels)")
    ax.set_yscale("log")
    ax.set_title(f"AvgDist vs mask ratio ({input_size}x{input_size} input)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="simmim bench avgdist", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/avgdist", help="output folder")
    ap.add_argument("--input-size", type=int, default=192)
    ap.add_argument("--samples", type=int, default=512, help="masks drawn per (ratio, patch size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    table = avg_dist_table(args.input_size, args.samples, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"AvgDist in pixels, {args.input_size}x{args.input_size} input, {args.samples} masks each")
    print(format_table(table))
    (out / "avgdist.json").write_text(json.dumps(
        {"input_size": args.input_size, "samples": args.samples,
         "avg_dist": {str(p): {f"{r:.1f}": v for r, v in row.items()} for p, row in table.items()}}, indent=1))
    plot(table, out / "avgdist.png", args.input_size)
    print(f"wrote {out / 'avgdist.json'} and {out / 'avgdist.png'}")
    return table


if __name__ == "__main__":
    main()
