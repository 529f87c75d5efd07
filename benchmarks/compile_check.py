"""Every Triton kernel specialisation the model launches, compiled for NVIDIA GPUs on any machine.

    simmim bench compile [--arch 90,80] [--out results]

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that they compile. This
runs the real launchers at the model's shapes (Swin-B 192, ViT-B 224; fp32 / bf16 / fp16; every
loss option; the head's channels-last output before and after PixelShuffle) with a stand-in Triton
driver whose target is the chosen GPU architecture and whose launches stop once the kernel is
built: each specialisation goes through Triton's whole pipeline to a cubin (ptxas, shipped with
Triton), exactly as the first launch on that GPU would build it. ptxas reports registers and spill
bytes; the PTX shows each global load and store's width (128-bit: vectorised, coalesced access).
No GPU is needed and nothing runs; run it without TRITON_INTERPRET. Writes compile.md and .json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from simmim.kernels import dispatch, loss, mask_fill

CL = torch.channels_last


def cases() -> list[tuple[str, callable]]:
    """(label, thunk calling a launcher) for every specialisation the model and tests use."""
    out = []
    for name, (L, D, grid) in {"swin_b_192": (48 * 48, 128, 6), "vit_b_224": (14 * 14, 768, 7)}.items():
        masks = torch.rand(2, grid, grid) < 0.6
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x, token = torch.randn(2, L, D, dtype=dtype), torch.randn(D)
            tag = str(dtype).removeprefix("torch.")
            out.append((f"mask_fill fwd {name} {tag}", lambda x=x, m=masks, t=token: mask_fill._fill_fwd(x, m, t)))
            out.append((f"mask_fill bwd {name} {tag}", lambda x=x, m=masks: mask_fill._fill_bwd(x, m)))
    for name, (size, stride) in {"swin_b_192": (192, 32), "vit_b_224": (224, 16)}.items():
        masks = torch.rand(2, size // 32, size // 32) < 0.6
        target = torch.randn(2, 3, size, size)
        head = torch.randn(2, 3 * stride * stride, size // stride, size // stride)
        preds = {"pred": torch.randn(2, 3, size, size), "pred channels-last": torch.randn(2, 3, size, size).to(
            memory_format=CL), "head channels-last": head.to(memory_format=CL), "head": head}
        for layout, pred in preds.items():
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                p = pred.to(dtype)
                tag = str(dtype).removeprefix("torch.")
                out.append((f"masked_l1 {name} {layout} {tag}",
                            lambda p=p, t=target, m=masks: loss._loss_fwd(p, t, m, 0, 1.0, False, 0, True)))
        p = preds["head channels-last"].to(torch.bfloat16)
        for kind, opts in (("l2", (1, 1.0, False)), ("smooth_l1", (2, 0.5, False)), ("all pixels", (0, 1.0, True))):
            out.append((f"masked_l1 {name} head {kind} bf16",
                        lambda p=p, t=target, m=masks, o=opts: loss._loss_fwd(p, t, m, *o, 0, True)))
        out.append((f"masked_l1 {name} no grad (eval)",
                    lambda p=p, t=target, m=masks: loss._loss_fwd(p, t, m, 0, 1.0, False, 0, False)))
        out.append((f"scale_ {name} bf16", lambda p=p: loss._scale_(p.clone(), torch.tensor(0.5))))
    return out


class _StandInDriver:
    """The parts of a Triton driver that compiling needs, for a GPU that is not there."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target, self.arch = GPUTarget("cuda", arch, 32), arch

    def get_current_device(self):  # kernels cache their binders per device: one per architecture
        return f"stand-in sm_{self.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int, built: list):
    """Launches compile for `arch` and return without running; each built kernel is appended."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run, previous = JITFunction.run, getattr(driver, "_active", None)

    def build(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        built.append((self.fn.__name__, kernel))
        return kernel

    driver.set_active(_StandInDriver(arch))
    JITFunction.run = build
    try:
        yield
    finally:
        JITFunction.run = run
        driver.set_active(previous)  # None: the real driver, found on next use


def accesses(ptx: str, op: str) -> dict[str, int]:
    """Global accesses of kind op (ld | st) in the PTX by width, widest first, e.g.
    {'v4.b32': 3, 'b32': 1}: 'v4.b32' is a 128-bit (vectorised) access, 'b16' a scalar bf16 one."""
    found = re.findall(rf"\b{op}\.global(?:\.[a-z_]+)*?\.((?:v\d\.)?[bfu]\d+)\b", ptx)

    def bits(width: str) -> int:  # 'v4.b32' -> 128, 'b16' -> 16
        lanes, _, ty = width.rpartition(".")
        return int(lanes[1:] or 1) * int(ty[1:])

    counts = {w: found.count(w) for w in set(found)}
    return dict(sorted(counts.items(), key=lambda kv: -bits(kv[0])))


def _fmt(counts: dict[str, int]) -> str:
    return " ".join(f"{n}x {w}" for w, n in counts.items()) or "none"


def ptxas_info(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        suffix = "a" if arch >= 90 else ""
        r = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", "/dev/null"],
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {r.stderr.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = [int(s) + int(t) for s, t in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills)}


def compile_all(arch: int) -> list[dict]:
    if dispatch.interpreting():
        raise RuntimeError("simmim bench compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    rows = []
    for label, call in cases():
        built: list = []
        t0 = time.perf_counter()
        try:
            with compile_only(arch, built):
                call()
        except Exception as e:  # reported per case; the caller fails the run
            rows.append({"case": label, "arch": arch, "kernel": "?", "ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        seconds = (time.perf_counter() - t0) / max(1, len(built))
        for name, kernel in built:
            ptx = kernel.asm["ptx"]
            row = {"case": label, "arch": arch, "kernel": name, "ok": True, "num_warps": kernel.metadata.num_warps,
                   "shared_bytes": kernel.metadata.shared, "cubin_bytes": len(kernel.asm["cubin"]),
                   "loads": accesses(ptx, "ld"), "stores": accesses(ptx, "st"),
                   "compile_s": round(seconds, 2)}
            try:
                row.update(ptxas_info(ptx, arch))
            except Exception as e:
                row.update(ok=False, error=str(e))
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# Triton kernels compiled for NVIDIA GPUs (no GPU needed)", "",
             "Global loads and stores in the PTX by width (v4.b32: 128-bit, vectorised; b16: one bf16).",
             "", "| arch | case | kernel | regs | spill bytes | warps | loads | stores | ok |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| sm_{r['arch']} | {r['case']} | {r['kernel']} | | | | | | NO: {r['error'][:200]} |")
            continue
        lines.append(f"| sm_{r['arch']} | {r['case']} | {r['kernel']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['num_warps']} | {_fmt(r['loads'])} | {_fmt(r['stores'])} | yes |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="simmim bench compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)

    if not dispatch.HAS_TRITON:
        raise SystemExit("simmim bench compile: Triton is not installed")
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    try:
        rows = [r for a in archs for r in compile_all(a)]
    except RuntimeError as e:
        raise SystemExit(str(e))
    out = Path(args.out) / f"compile-sm{'-'.join(map(str, archs))}"
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(rows)
    (out / "compile.md").write_text(report)
    (out / "compile.json").write_text(json.dumps({"rows": rows}, indent=1))
    print(report)
    print(f"wrote {out}/compile.md, compile.json")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        raise SystemExit(f"simmim bench compile: {len(failed)} kernel(s) failed to compile, first: "
                         f"{failed[0]['case']}: {failed[0]['error'][:300]}")
    return rows


if __name__ == "__main__":
    main()
