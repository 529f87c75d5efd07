"""The paper's Figure 3a for every masking strategy: AvgDist (mean distance from a masked pixel to
the nearest visible one) against mask ratio, for mask patch sizes 4 to 64, at a 192x192 input;
and example masks of each strategy.

    simmim bench avgdist [--out results/avgdist] [--samples 512] [--strategies random,square,block]

Prints one table per strategy (AvgDist, and the masked fraction, which the square strategy rounds),
and writes avgdist.json, avgdist.png (one panel per strategy) and masks_<strategy>.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from simmim.core.io import atomic_write, write_json
from simmim.pipeline.masking import MASK_STRATEGIES, MaskGenerator, avg_dist

RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 10))
PATCH_SIZES = (4, 8, 16, 32, 64)


def avg_dist_table(input_size: int = 192, samples: int = 512, seed: int = 0, ratios=RATIOS,
                   patch_sizes=PATCH_SIZES, strategy: str = "random") -> dict[int, dict[float, float]]:
    """{patch size: {ratio: AvgDist in pixels}} over `samples` masks each; nan where every cell is
    masked (no visible pixel)."""
    g = torch.Generator().manual_seed(seed)
    table = {}
    for p in patch_sizes:
        table[p] = {}
        for r in ratios:
            gen = MaskGenerator(input_size, p, r, strategy)
            table[p][r] = avg_dist(gen.sample(samples, generator=g), p)
    return table


def masked_fraction(input_size: int, strategy: str, ratios=RATIOS, patch_sizes=PATCH_SIZES) -> dict:
    """{patch size: {ratio: masked cells / cells}}: the ratio itself up to the ceiling (random,
    block), side^2 / cells for the square."""
    return {p: {r: (g := MaskGenerator(input_size, p, r, strategy)).count / g.cells for r in ratios}
            for p in patch_sizes}


def format_table(table: dict, digits: int = 2) -> str:
    ratios = next(iter(table.values())).keys()
    lines = ["| mask patch | " + " | ".join(f"{r:.1f}" for r in ratios) + " |",
             "|---:|" + "---:|" * len(ratios)]
    for p, row in table.items():
        lines.append(f"| {p} | " + " | ".join("n/a" if v != v else f"{v:.{digits}f}" for v in row.values()) + " |")
    return "\n".join(lines)


def plot(tables: dict, path: Path, input_size: int) -> None:
    """One panel per strategy: AvgDist (log) against ratio, a line per mask patch size."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    fig = Figure(figsize=(4.2 * len(tables), 4))
    axes = fig.subplots(1, len(tables), sharey=True, squeeze=False)[0]
    for ax, (strategy, table) in zip(axes, tables.items()):
        for p, row in table.items():
            ax.plot(list(row.keys()), list(row.values()), marker="o", label=f"{p}px cells")
        ax.set_xlabel("mask ratio")
        ax.set_yscale("log")
        ax.set_title(f"{strategy} ({input_size}x{input_size})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("AvgDist (pixels)")
    axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_examples(strategy: str, path: Path, input_size: int, patch: int, seed: int = 0,
                  ratios=(0.2, 0.4, 0.6, 0.8), per_ratio: int = 6) -> None:
    """A grid of masks (white = masked): a row per ratio, `per_ratio` draws each."""
    from matplotlib.figure import Figure

    g = torch.Generator().manual_seed(seed)
    fig = Figure(figsize=(1.3 * per_ratio, 1.4 * len(ratios)))
    axes = fig.subplots(len(ratios), per_ratio, squeeze=False)
    for row, r in zip(axes, ratios):
        gen = MaskGenerator(input_size, patch, r, strategy)
        for i, (ax, m) in enumerate(zip(row, gen.sample(per_ratio, generator=g))):
            ax.imshow(m.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(f"r={r} ({gen.count}/{gen.cells})", fontsize=8)
    fig.suptitle(f"{strategy} masks, {patch}px cells at {input_size}x{input_size}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simmim bench avgdist", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/avgdist", help="output folder")
    ap.add_argument("--input-size", type=int, default=192)
    ap.add_argument("--samples", type=int, default=512, help="masks drawn per (strategy, ratio, patch size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default=",".join(MASK_STRATEGIES), help="comma-separated, of "
                    + ", ".join(MASK_STRATEGIES))
    ap.add_argument("--example-patch", type=int, default=16, help="mask patch size of the example-mask figures")
    return ap


def main(argv: list[str] | None = None) -> dict:
    """{strategy: {patch size: {ratio: AvgDist}}}, printed and written under --out."""
    args = parser().parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    if not strategies or set(strategies) - set(MASK_STRATEGIES):
        raise SystemExit(f"simmim bench avgdist: --strategies must name some of {', '.join(MASK_STRATEGIES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables, fractions = {}, {}
    for s in strategies:
        tables[s] = avg_dist_table(args.input_size, args.samples, args.seed, strategy=s)
        fractions[s] = masked_fraction(args.input_size, s)
        print(f"\n{s}: AvgDist in pixels, {args.input_size}x{args.input_size} input, {args.samples} masks each")
        print(format_table(tables[s]))
        if s == "square":
            print(f"{s}: masked fraction (side = round(sqrt(ratio * cells)))")
            print(format_table(fractions[s]))
        plot_examples(s, out / f"masks_{s}.png", args.input_size, args.example_patch, args.seed)

    def keyed(t):
        return {str(p): {f"{r:.1f}": v for r, v in row.items()} for p, row in t.items()}

    write_json(out / "avgdist.json", {"input_size": args.input_size, "samples": args.samples,
                                      "avg_dist": {s: keyed(t) for s, t in tables.items()},
                                      "masked_fraction": {s: keyed(t) for s, t in fractions.items()}})
    plot(tables, out / "avgdist.png", args.input_size)
    print(f"wrote {out / 'avgdist.json'}, {out / 'avgdist.png'} and masks_<strategy>.png")
    return tables


if __name__ == "__main__":
    main()
