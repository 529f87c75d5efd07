"""The fused kernels against their references, at the paper's shapes (batch 128):

    Swin-B 192: mask fill on (128, 48*48, 128) fp32 tokens (after Swin's patch norm), 6x6 cells;
                masked L1 on (128, 3, 192, 192) bf16 predictions, and on the head's output
                before PixelShuffle, (128, 3*32*32, 6, 6) channels-last, as the model feeds it
    ViT-B 224:  mask fill on (128, 14*14, 768) bf16 tokens, 7x7 cells;
                masked L1 on (128, 3, 224, 224) bf16 predictions, and on (128, 3*16*16, 14, 14)

    simmim bench kernels [--out results] [--batch 128]

On CUDA: forward+backward time of the fused kernel, the eager reference and torch.compile of the
reference (measured side by side in one run), the bytes each op must move at least (its floor),
and the achieved GB/s against the device's measured copy bandwidth. On CPU: correctness only
(Triton interpreter vs reference, at batch 2). Writes kernels.md, kernels.json, kernels.png; the
.md and .json are rewritten after every shape's checks and every op's timings.
"""
from __future__ import annotations

import argparse

import torch

from simmim.kernels import dispatch
from simmim.kernels.mask_fill import mask_token_fill, mask_token_fill_ref
from simmim.kernels.loss import masked_loss, masked_loss_ref

from .report import device_name, results_dir, write_bar_chart, write_results

SHAPES = {  # name: (fill tokens (L, D, cell span s, grid), fill dtype, image size, encoder stride)
    "swin_b_192": ((48 * 48, 128, 8, 6), torch.float32, 192, 32),
    "vit_b_224": ((14 * 14, 768, 2, 7), torch.bfloat16, 224, 16),
}
OPS = ("mask_fill", "masked_l1", "l1_head")


def make_inputs(name: str, batch: int, device: str, seed: int = 0) -> dict:
    (L, D, s, grid), fill_dtype, size, stride = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(seed)
    masks = torch.rand(batch, grid, grid, generator=g, device=device) < 0.6
    head = torch.randn(batch, 3 * stride * stride, size // stride, size // stride, generator=g, device=device)
    return {
        "head": head.to(torch.bfloat16, memory_format=torch.channels_last).requires_grad_(),
        "x": torch.randn(batch, L, D, generator=g, device=device).to(fill_dtype).requires_grad_(),
        "token": torch.zeros(D, device=device).requires_grad_(),
        "pred": torch.randn(batch, 3, size, size, generator=g, device=device).to(torch.bfloat16).requires_grad_(),
        "target": torch.randn(batch, 3, size, size, generator=g, device=device),
        "masks": masks,
    }


GRADS = ("x", "token", "pred", "head")


def fill_step(fn, inp):
    out = fn(inp["x"], inp["masks"], inp["token"])
    out.backward(torch.ones_like(out))


def loss_step(fn, inp):
    fn(inp["pred"], inp["target"], inp["masks"]).backward()


def head_step(fn, inp):
    """The loss on the head's output: fused reads it in place, the reference pixel-shuffles first."""
    fn(inp["head"], inp["target"], inp["masks"]).backward()


def floor_bytes(op: str, inp: dict) -> int:
    """What the op must read and write at least, forward + backward."""
    masks = inp["masks"]
    r = masks.float().mean().item()  # masked fraction of cells = of tokens = of pixels
    if op == "mask_fill":
        x = inp["x"]
        n = x.numel() * x.element_size()
        return int(n * (1 - r) + n + n + n)  # read visible x, write out; read grad, write grad_x
    pred, target = inp["pred"], inp["target"]
    return int(r * (pred.numel() * pred.element_size() + target.numel() * target.element_size())
               + pred.numel() * pred.element_size())  # read masked pred+target, write grad


def copy_bandwidth(device: str) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() * 4 / ms / 1e6


CANDIDATES = (("mask_fill", fill_step, mask_token_fill, mask_token_fill_ref),
              ("masked_l1", loss_step, masked_loss, masked_loss_ref),
              ("l1_head", head_step, masked_loss, masked_loss_ref))


def compile_reference(ref):
    """torch.compile of a reference for one shape: dynamo's caches emptied first, so each (op,
    shape) gets its own static graph (no recompilation with dynamic shapes from the op or shape
    timed before it), as a model compiled for one input size would. The references compile
    without graph breaks (tests/test_kernels_ref.py checks)."""
    torch._dynamo.reset()
    return torch.compile(ref, dynamic=False)


def time_candidates(name: str, batch: int, device: str):
    """Yields, op by op, the three rows (fused, eager ref, compiled ref) of one shape."""
    from triton.testing import do_bench

    inp = make_inputs(name, batch, device)
    for op, step, fused, ref in CANDIDATES:
        floor = floor_bytes(op, inp)
        rows = []
        for label, fn in (("fused", lambda *a: fused(*a, backend="triton")), ("eager ref", ref),
                          ("compiled ref", compile_reference(ref))):
            for p in GRADS:
                inp[p].grad = None
            ms = do_bench(lambda: step(fn, inp), warmup=10, rep=50, grad_to_none=[inp[p] for p in GRADS])
            rows.append({"shape": name, "op": op, "impl": label, "ms": ms, "floor_bytes": floor,
                         "gb_s": floor / ms / 1e6})
        yield rows


def check_correctness(name: str, device: str) -> list[dict]:
    """Fused vs reference on one small batch: max abs error of outputs and gradients."""
    inp = make_inputs(name, 2, device, seed=1)
    rows = []
    for op in OPS:
        results = []
        for backend in ("triton", "reference"):
            for p in GRADS:
                inp[p].grad = None
            if op == "mask_fill":
                out = mask_token_fill(inp["x"], inp["masks"], inp["token"], backend=backend)
                out.float().square().sum().backward()
                results.append([out.float(), inp["x"].grad.float(), inp["token"].grad.float()])
            else:
                pred = inp["pred" if op == "masked_l1" else "head"]
                out = masked_loss(pred, inp["target"], inp["masks"], backend=backend)
                out.backward()
                results.append([out.float(), pred.grad.float()])
        errs = [(a - b).abs().max().item() for a, b in zip(*results)]
        rows.append({"shape": name, "op": op, "max_abs_err": max(errs), "ok": max(errs) < 5e-2})
    return rows


def markdown(rows: list[dict], checks: list[dict], bw: float | None, device: str) -> str:
    lines = [f"# Kernels on {device}", ""]
    if bw:
        lines += [f"Measured copy bandwidth: {bw:.0f} GB/s. Floor = bytes the op must move (forward + "
                  "backward); % = achieved floor GB/s over copy bandwidth.", "",
                  "| shape | op | impl | ms (fwd+bwd) | GB/s | % of copy | speed-up of fused |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in rows:
            fused = next(x["ms"] for x in rows if x["shape"] == r["shape"] and x["op"] == r["op"]
                         and x["impl"] == "fused")
            lines.append(f"| {r['shape']} | {r['op']} | {r['impl']} | {r['ms']:.3f} | {r['gb_s']:.0f} | "
                         f"{100 * r['gb_s'] / bw:.0f}% | {r['ms'] / fused:.2f}x |")
        lines.append("")
    lines += ["| shape | op | max abs error, fused vs reference (output and grads) | ok |", "|---|---|---:|---|"]
    lines += [f"| {c['shape']} | {c['op']} | {c['max_abs_err']:.2e} | {'yes' if c['ok'] else 'NO'} |" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="simmim bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dispatch.HAS_TRITON:
        raise SystemExit("simmim bench kernels: Triton is not installed")
    if device == "cpu" and not dispatch.interpreting():
        raise SystemExit("simmim bench kernels: on CPU run it with TRITON_INTERPRET=1 (correctness only)")
    out = results_dir(args.out, "kernels")
    checks, rows, bw = [], [], None

    def save() -> None:  # after every shape's checks and every op's timings: a stopped run keeps them
        write_results(out, "kernels", markdown(rows, checks, bw, device_name()),
                      {"device": device_name(), "batch": args.batch, "copy_gb_s": bw, "timings": rows,
                       "checks": checks})

    for name in SHAPES:
        checks += check_correctness(name, device)
        save()
    if device == "cuda":
        bw = copy_bandwidth(device)
        for name in SHAPES:
            for op_rows in time_candidates(name, args.batch, device):
                rows += op_rows
                save()
                print(f"{name} {op_rows[0]['op']}: " + ", ".join(f"{r['impl']} {r['ms']:.3f} ms" for r in op_rows),
                      flush=True)
    report = markdown(rows, checks, bw, device_name())
    if rows:
        write_bar_chart(out / "kernels.png", [f"{r['shape']}\n{r['op']}" for r in rows if r["impl"] == "fused"],
                        {impl: [r["ms"] for r in rows if r["impl"] == impl]
                         for impl in ("fused", "eager ref", "compiled ref")},
                        ylabel="ms, forward + backward", title=f"Kernels, batch {args.batch}, {device_name()}")
    print(report)
    print(f"wrote {out}/kernels.md, kernels.json" + (", kernels.png" if rows else ""))
    if not all(c["ok"] for c in checks):
        raise SystemExit("simmim bench kernels: fused kernels disagree with the reference")
    return {"timings": rows, "checks": checks, "copy_gb_s": bw}


if __name__ == "__main__":
    main()
