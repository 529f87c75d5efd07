"""`simmim bench loaders` of two source trees side by side: an earlier commit's loaders against this
tree's, on the same images, in alternating runs, medians of per-round ratios.

    git worktree add /tmp/old-d837e5f d837e5f        # read-only use
    python -m simmim.benchmarks.compare_trees --old /tmp/old-d837e5f [--synthetic 2000] [--rounds 5]
                                              [--batch 32] [--workers 2] [--size 192]

Each round runs the other tree's `bench loaders` (one timed epoch per loader) and this tree's (one
round: ours and the plain pipelines), in a fresh process each, the order of the two alternating
between rounds. The other tree runs from its folders mapped into a `simmim` namespace package on
PYTHONPATH (as benchmarks/gpu_check.sh runs this one), with this interpreter's packages. Reported
per loader: images/sec of each tree (median [min-max]), new / old per round, and this tree's
ratios to the plain pipelines of the same run. Writes old_vs_new.md and .json under a results
folder naming the device.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .loaders import synthetic_jpegs
from .report import device_name, results_dir, write_results

HERE = Path(__file__).resolve().parents[1]


def run_bench(tree: Path, work: Path, name: str, args: argparse.Namespace, data: Path, new: bool) -> dict:
    """One `bench loaders` run of `tree` in a fresh process; its JSON."""
    path = work / f"path-{name}" / "simmim"
    path.mkdir(parents=True, exist_ok=True)
    for p in ("core", "kernels", "pipeline", "trainer", "benchmarks", "cli"):  # those the tree has (core/, cli/: later)
        if (tree / p).is_dir() and not (path / p).exists():
            (path / p).symlink_to(tree / p)
    out = work / f"out-{name}"
    # the module itself, not the CLI: the CLI's layout differs between versions
    cmd = [sys.executable, "-c", "import sys; from simmim.benchmarks.loaders import main; main(sys.argv[1:])",
           "--data", str(data),
           "--size", str(args.size), "--batch", str(args.batch), "--workers", str(args.workers),
           "--backends", args.backends, "--epochs", "1", "--out", str(out)] + (["--rounds", "1"] if new else [])
    env = {**os.environ, "PYTHONPATH": str(path.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(cmd, env=env, check=True, cwd=tree, stdout=subprocess.DEVNULL)
    (result,) = [json.loads(p.read_text()) for p in out.glob("loaders-*/loaders.json")]
    return result


def summary(old: list[dict], new: list[dict]) -> list[dict]:
    """Per loader of ours: old and new images/sec, new / old per round, new's ratios to plain."""
    rows = []
    for label in [r["loader"] for r in new[0]["rows"] if r.get("ours")]:
        o = [next((x["img_per_s"] for x in run["rows"] if x["loader"] == label), None) for run in old]
        n = [next(x["img_per_s"] for x in run["rows"] if x["loader"] == label) for run in new]
        pairs = [b / a for a, b in zip(o, n) if a]
        row = {"loader": label, "new": n, "old": o, "new_over_old": pairs}
        for name in ("x plain", "x torchvision", "x released"):
            row[name] = [next(x for x in run["rows"] if x["loader"] == label)["ratios"][name]["median"]
                         for run in new]
        rows.append(row)
    return rows


def text(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    med = statistics.median(values)
    fmt = ".0f" if med > 20 else ".2f"
    return f"{med:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def markdown(rows: list[dict], args: argparse.Namespace, device: str, rounds: int) -> str:
    lines = [f"# Loaders, {args.old} against this tree, on {device}", "",
             f"{args.synthetic or args.data} images, {args.size} px, batch {args.batch}, {args.workers} workers; "
             f"{rounds} rounds, each one epoch of every loader in each tree (fresh processes, order alternating). "
             "Median [min-max] over rounds; ratios per round.", "",
             "| loader | old images/sec | new images/sec | new / old | new x plain | new x torchvision | "
             "new x released |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['loader']} | {text(r['old'])} | {text(r['new'])} | {text(r['new_over_old'])} | "
                     f"{text(r['x plain'])} | {text(r['x torchvision'])} | {text(r['x released'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m simmim.benchmarks.compare_trees", description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the other source tree (a git worktree of an earlier commit)")
    ap.add_argument("--data", default="", help="class-folder tree to read (default: --synthetic JPEGs)")
    ap.add_argument("--synthetic", type=int, default=2000)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backends", default="torch,ffcv,dali")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    old_tree = Path(args.old).resolve()
    if not (old_tree / "benchmarks" / "loaders.py").is_file():
        raise SystemExit(f"--old {args.old}: not a simmim source tree (no benchmarks/loaders.py)")

    with tempfile.TemporaryDirectory(prefix="simmim-compare-trees-") as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else synthetic_jpegs(work / "images", args.synthetic)
        old, new = [], []
        for r in range(args.rounds):
            for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                tree = old_tree if which == "old" else HERE
                result = run_bench(tree, work, f"{which}{r}", args, data, which == "new")
                (old if which == "old" else new).append(result)
            rows = summary(old, new)
            report = markdown(rows, args, device_name(), r + 1)
            write_results(results_dir(args.out, "old-vs-new"), "old_vs_new", report, {"rows": rows})
            print(report, flush=True)
    return rows


if __name__ == "__main__":
    main()
