"""The summary table that benchmarks/gpu_check.sh prints last: each step's status in run order,
then the figures, read from the JSON (and pytest JUnit XML) files the steps wrote, never re-derived.

    python3 benchmarks/gpu_summary.py RESULTS STEPS_TSV [--title TEXT]

RESULTS is the folder the benchmarks wrote into (`<name>-<device>/...json`, `pytest-*.xml`);
STEPS_TSV holds one line per step, tab-separated: name, status (OK | FAILED | SKIPPED), seconds,
note. Standard library only, so the table prints even where torch or simmim do not import.
A missing or unreadable figure file is reported on its own line; it never hides the others.
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def status_table(steps_tsv: Path) -> list[str]:
    lines = [f"{'#':>2}  {'step':<32} {'status':<8} {'seconds':>7}  note"]
    rows = [ln.split("\t") for ln in steps_tsv.read_text().splitlines() if ln.strip()] if steps_tsv.exists() else []
    for i, r in enumerate(rows, 1):
        name, status, seconds, note = (r + ["", "", ""])[:4]
        lines.append(f"{i:>2}  {name:<32} {status:<8} {seconds:>7}  {note}")
    return lines


def by_run_order(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)


def pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def pytest_lines(root: Path) -> list[str]:
    out = []
    for path in by_run_order(root, "pytest-*.xml"):
        suites = ET.parse(path).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = [c.get("name") for s in suites for c in s.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        out.append(f"tests ({path.name}): {passed} passed, {n['failures']} failed, {n['errors']} errors, "
                   f"{n['skipped']} skipped" + (f"; failed: {', '.join(failed[:8])}" if failed else ""))
    return out


def kernel_lines(root: Path) -> list[str]:
    out = []
    for path in by_run_order(root, "kernels-*/kernels.json"):
        r = json.loads(path.read_text())
        checks = r["checks"]
        ok = sum(c["ok"] for c in checks)
        out.append(f"kernels on {r['device']}: fused vs reference {ok}/{len(checks)} checks ok "
                   f"(max abs error {max((c['max_abs_err'] for c in checks), default=0):.1e})")
        if not r["timings"]:
            out.append("  no timings (timed on CUDA only)")
            continue
        bw = r["copy_gb_s"]
        out.append(f"  batch {r['batch']}, measured copy bandwidth {bw:.0f} GB/s; GB/s of the bytes each op must "
                   f"move (forward + backward), % of copy bandwidth in brackets")
        out.append(f"  {'shape':<11} {'op':<10} {'fused':>13} {'eager':>13} {'compiled':>13} {'vs eager':>9} "
                   f"{'vs compiled':>11}")
        for shape in dict.fromkeys(t["shape"] for t in r["timings"]):
            for op in dict.fromkeys(t["op"] for t in r["timings"] if t["shape"] == shape):
                t = {x["impl"]: x for x in r["timings"] if x["shape"] == shape and x["op"] == op}
                cell = {k: f"{v['gb_s']:.0f} ({100 * v['gb_s'] / bw:.0f}%)" for k, v in t.items()}
                f, e, c = (t[k]["ms"] for k in ("fused", "eager ref", "compiled ref"))
                out.append(f"  {shape:<11} {op:<10} {cell['fused']:>13} {cell['eager ref']:>13} "
                           f"{cell['compiled ref']:>13} {e / f:>8.2f}x {c / f:>10.2f}x")
    return out


def step_lines(root: Path) -> list[str]:
    rows = []
    for path in by_run_order(root, "step-*/step-*.json"):
        r = json.loads(path.read_text())
        rows += [(r["device"], x) for x in r["rows"]]
    if not rows:
        return []
    out = [f"training step on {rows[0][0]} (the trainer's step; MFU over the bf16/TF32 dense peak)",
           f"  {'model':<15} {'batch':>5} {'prec':<5} {'compiled':<8} {'data':<10} {'shuffle':<12} {'img/s':>9} "
           f"{'MFU':>6} {'data wait':>9} {'peak GiB':>8}"]
    for _, x in rows:
        mem = "n/a" if x.get("peak_mem_gib") is None else f"{x['peak_mem_gib']:.1f}"
        data = x.get("loader") or x["data"]
        out.append(f"  {x['model'] + ' ' + str(x['image_size']):<15} {x['batch']:>5} {x['precision']:<5} "
                   f"{'yes' if x['compiled'] else 'no':<8} {data:<10} "
                   f"{'in loss' if x['fused_shuffle'] else 'PixelShuffle':<12} {x['img_per_s']:>9.1f} "
                   f"{pct(x['mfu_pct']):>6} {pct(x['data_wait_pct']):>9} {mem:>8}")
    return out


def loader_lines(root: Path) -> list[str]:
    """Each loader's median images/sec and, for ours, the median per-round ratio to its plain
    counterpart and to plain torchvision (`bench loaders`)."""
    out = []
    for path in by_run_order(root, "loaders-*/loaders*.json"):
        r = json.loads(path.read_text())
        out.append(f"loaders on {r['device']}: {r['images']} {r['source']} images, {r['size']} px, batch {r['batch']}, "
                   f"{r['workers']} workers, {r.get('rounds_done', r['epochs'])} rounds")
        for x in r["rows"]:
            ratios = x.get("ratios") or {}
            ratio = "  ".join(f"{v['median']:5.2f}{k}" for k, v in ratios.items() if k != "x released")
            out.append(f"  {x['loader']:<22} {x['img_per_s']:9.0f} img/s  steady "
                       f"{x.get('steady_img_per_s') or 0:9.0f}  epoch start {x['epoch_start_s']:.2f} s  {ratio}")
    return out


def claims_lines(root: Path) -> list[str]:
    out = []
    f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    for path in by_run_order(root, "claims-*/claims.json"):
        r = json.loads(path.read_text())
        out.append(f"claims on {r['device']}, ViT-B/16 (total cost = per image x each paper's epochs, x SimMIM)")
        out.append(f"  {'method':<8} {'img/s':>8} {'time/img':>8} {'cost, time':>10} {'cost, FLOPs':>11} {'claim':>6}")
        for x in r["rows"]:
            out.append(f"  {x['method']:<8} {f(x.get('img_per_s'), 1):>8} {f(x.get('time_vs_simmim_per_image')):>8} "
                       f"{f(x.get('cost_vs_simmim_time')):>10} {f(x.get('cost_vs_simmim_flops')):>11} "
                       f"{f(x['claimed'], 1):>6}")
        for h in r.get("heads", []):
            paper = f" (paper {h['claimed']}x)" if h.get("claimed") else ""
            out.append(f"  head {h['head']:<15} x linear: FLOPs {h['flops_vs_linear']:.2f}, time "
                       f"{f(h.get('time_vs_linear')) or 'n/a'}{paper}")
    return out


def memory_lines(root: Path) -> list[str]:
    out = []
    for path in by_run_order(root, "memory-*/memory.json"):
        r = json.loads(path.read_text())
        out.append(f"memory per GPU (GB), activations measured on {r['device']}, {r['precision']}, "
                   f"FSDP2 over {r['gpus']} GPUs (+ AC: activation checkpointing)")
        cols = list(r["results"][0]["total_gb"]) if r["results"] else []
        out.append(f"  {'encoder':<13} {'params':>7} {'batch':>5} " + " ".join(f"{c:>14}" for c in cols))
        for x in r["results"]:
            out.append(f"  {x['arch']:<13} {x['params'] / 1e6:6.0f}M {x['batch_per_gpu']:>5} "
                       + " ".join(f"{x['total_gb'][c]:>14.1f}" for c in cols))
    return out


def summary(results: Path, steps_tsv: Path, title: str) -> str:
    lines = [f"================ {title}", *status_table(steps_tsv)]
    for section in (pytest_lines, kernel_lines, step_lines, loader_lines, claims_lines, memory_lines):
        try:
            block = section(results)
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, ET.ParseError) as e:
            block = [f"{section.__name__.removesuffix('_lines')}: figures unreadable ({type(e).__name__}: {e})"]
        if block:
            lines += ["", *block]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="gpu_summary.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("steps", type=Path)
    ap.add_argument("--title", default="gpu_check summary")
    args = ap.parse_args(argv)
    print(summary(args.results, args.steps, args.title), flush=True)


if __name__ == "__main__":
    main()
