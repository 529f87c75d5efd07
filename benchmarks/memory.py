"""Per-GPU memory of SimMIM pre-training for each encoder, under DDP and under FSDP2 on N GPUs,
with and without activation checkpointing; which configurations fit on 80 GB and 141 GB GPUs.

    simmim bench memory [--models swin_base,...,swinv2_giant] [--gpus 8] [--batch 0] [--out results]

How each part is obtained (all in GB = 1e9 bytes, per GPU, at the recipe's batch per GPU):
- Parameters P, and per block, are counted on the meta device (nothing is allocated).
- DDP (fp32 weights, bf16 autocast, AdamW): weights 4P + gradients 4P + AdamW's two moments 8P
  + DDP's gradient buckets 4P (a second copy of the gradients; gradient_as_bucket_view is off)
  + autocast's bf16 weight copies 2P (kept from forward to backward) = 22 bytes per parameter.
- FSDP2 on N GPUs (fully_shard per block and root; bf16 parameters in compute, fp32 reduction):
  the fp32 shard of weights, gradients and both moments, 16P/N; plus what is unsharded at once:
  the root's own parameters (patch embedding, merges, final norm, head) and two blocks (the one
  running and the one prefetched), each at 2 bytes (bf16 weights) + 2 (bf16 gradients) + 4 (fp32
  gradients for the reduce-scatter) per parameter.
- Activations are MEASURED: the bytes autograd saves for backward (torch.autograd.graph
  saved_tensors_hooks, each storage counted once, weight casts and parameters excluded) through a model of the same widths with two blocks per stage, under the recipe's precision
  (bf16 autocast) on the device this runs on, attributed per block, at batch 1 and 2 (the
  difference is the per-image part; the rest, e.g. SwinV2's position-bias MLP, is per forward);
  then scaled to each stage's depth and to the batch. With activation checkpointing (timm's
  per-block checkpoint) only each block's input is kept, plus one block's full activations while
  it is recomputed in backward. Not counted: the transient gradients of activations in backward,
  the CUDA context (~0.5-1 GB) and allocator fragmentation, hence "fits" leaves 10% headroom.
- CPU autocast keeps softmax in bf16 where CUDA's runs it in fp32, so figures measured on a CPU
  understate attention activations; run this on a GPU for that device's figures.

Writes memory.md, memory.json and memory.png under a results folder naming the device.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch import nn

from simmim.pipeline import MaskGenerator
from simmim.trainer.config import load_config
from simmim.trainer.model import ARCHS, build_simmim
from simmim.trainer.precision import autocast

from .report import device_name, results_dir

GB = 1e9
RECIPES = {"swin_base": "swin_base_800ep", "swin_large": "swin_large_800ep", "swinv2_base": "swinv2_base_800ep",
           "swinv2_large": "swinv2_large_800ep", "swinv2_huge": "swinv2_huge_800ep",
           "swinv2_giant": "swinv2_giant_800ep"}
CAPACITIES = {"80 GB": 80.0, "141 GB": 141.0}
HEADROOM = 0.9  # of a GPU's memory usable by these terms
DDP_BYTES = 4 + 4 + 8 + 4 + 2  # weights, grads, AdamW moments, DDP buckets, autocast bf16 copies
SHARD_BYTES = 4 + 4 + 8  # fp32 weights, grads and moments, divided over N
GATHERED_BYTES = 2 + 2 + 4  # unsharded bf16 weights, bf16 grads, fp32 grads for reduce-scatter


def blocks_of(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(stage, block) for every transformer block of a Swin / SwinV2 SimMIM model, in order."""
    swin = model.encoder.swin
    return [(i, b) for i, stage in enumerate(swin.layers) for b in stage.blocks]


def parameter_counts(arch: str, img_size: int, window: int) -> dict:
    """Parameters of the SimMIM model of `arch` on the meta device: total, largest block, root
    (everything outside the blocks: embedding, merges, norms, head, mask token)."""
    with torch.device("meta"):
        model = build_simmim(arch, img_size, 32, window)
    total = sum(p.numel() for p in model.parameters())
    per_block = [sum(p.numel() for p in b.parameters()) for _, b in blocks_of(model)]
    return {"total": total, "max_block": max(per_block), "root": total - sum(per_block)}


VIEWS = {"ToCopyBackward0", "TBackward0", "TransposeBackward0", "ViewBackward0", "ExpandBackward0",
         "PermuteBackward0", "UnsqueezeBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"}


def is_weight(t: torch.Tensor, params: set) -> bool:
    """A parameter, or autocast's cast of one (possibly transposed / viewed), as autograd saves it."""
    if t.untyped_storage().data_ptr() in params:
        return True
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in VIEWS:
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return fn is not None and type(fn).__name__ == "AccumulateGrad"


def saved_bytes(model: nn.Module, batch: int, img_size: int, device, amp_dtype) -> tuple[dict, dict]:
    """One forward of `batch` images: bytes saved for backward per block ((stage, index) keys) and
    outside blocks ("other"), and each block's input bytes."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list = ["other"]
    saved: dict = defaultdict(int)
    inputs: dict = {}
    seen: set = set()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and not is_weight(t, params):
            seen.add(key)
            saved[current[0]] += storage.nbytes()
        return t

    handles = []
    for idx, (stage, block) in enumerate(blocks_of(model)):
        def pre(mod, args, key=(stage, idx)):
            current[0] = key
            inputs[key] = args[0].numel() * args[0].element_size()

        def post(mod, args, out):
            current[0] = "other"
        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    masks = MaskGenerator(img_size, 32, 0.6).sample(batch, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device.type, amp_dtype):
            loss = model(images, masks)
        del loss
    finally:
        for h in handles:
            h.remove()
    return saved, inputs


def measure_activations(arch: str, img_size: int, window: int, device: torch.device,
                        amp_dtype: torch.dtype | None) -> dict:
    """Activation bytes of `arch`, measured on `device` through a model of its widths with two
    blocks per stage at batch 1 and 2: the per-image slope and the batch-independent part (SwinV2's
    position-bias MLP runs once per forward), each as `other` (outside blocks) and per stage the mean
    over its blocks of (saved bytes, block-input bytes)."""
    a = ARCHS[arch]
    reduced = f"_memory_{arch}"
    ARCHS[reduced] = type(a)(a.family, a.embed_dim, tuple(2 for _ in a.depths), a.num_heads, a.window_size,
                             a.patch_size)
    try:
        torch.manual_seed(0)
        model = build_simmim(reduced, img_size, 32, window).to(device)
    finally:
        del ARCHS[reduced]
    (s1, i1), (s2, i2) = (saved_bytes(model, b, img_size, device, amp_dtype) for b in (1, 2))

    def split(saved: dict, inputs: dict) -> dict:
        stages: dict = defaultdict(lambda: [0, 0, 0])  # stage -> [saved, inputs, blocks]
        for (stage, idx), n in inputs.items():
            stages[stage][0] += saved[(stage, idx)]
            stages[stage][1] += n
            stages[stage][2] += 1
        return {"other": saved["other"],
                "per_stage": [(s / k, i / k) for s, i, k in (stages[j] for j in range(len(a.depths)))]}

    one, two = split(s1, i1), split(s2, i2)
    per_image = {"other": two["other"] - one["other"],
                 "per_stage": [(b[0] - a_[0], b[1] - a_[1]) for a_, b in zip(one["per_stage"], two["per_stage"])]}
    fixed = {"other": one["other"] - per_image["other"],
             "per_stage": [(a_[0] - p[0], a_[1] - p[1]) for a_, p in zip(one["per_stage"], per_image["per_stage"])]}
    return {"per_image": per_image, "fixed": fixed}


def activation_bytes(act: dict, depths: tuple[int, ...], batch: int, checkpointing: bool) -> float:
    """Activation bytes of a full-depth model at `batch` from measure_activations' parts."""
    def part(p: dict, n: int) -> float:
        if not checkpointing:
            return n * (p["other"] + sum(d * s for d, (s, _) in zip(depths, p["per_stage"])))
        kept = sum(d * i for d, (_, i) in zip(depths, p["per_stage"]))
        return n * (p["other"] + kept)
    total = part(act["per_image"], batch) + part(act["fixed"], 1)
    if checkpointing:  # one block's full activations while it is recomputed in backward
        total += max(batch * s + f for (s, _), (f, _) in zip(act["per_image"]["per_stage"], act["fixed"]["per_stage"]))
    return total


def plan(arch: str, gpus: int, batch: int | None, device: torch.device, amp_dtype) -> dict:
    """The memory terms of `arch` at its recipe's batch (or `batch`) under DDP and FSDP2 on `gpus`."""
    cfg = load_config(RECIPES[arch])
    img, window = cfg.data.img_size, cfg.model.window_size
    batch = batch or cfg.data.batch_size
    counts = parameter_counts(arch, img, window)
    act = measure_activations(arch, img, window, device, amp_dtype)
    depths = ARCHS[arch].depths
    P = counts["total"]
    ddp_static = DDP_BYTES * P
    fsdp_static = SHARD_BYTES * P / gpus + GATHERED_BYTES * (counts["root"] + 2 * counts["max_block"])
    rows = {}
    for ac in (False, True):
        a = activation_bytes(act, depths, batch, ac)
        suffix = " + AC" if ac else ""
        rows["DDP" + suffix] = (ddp_static + a) / GB
        rows[f"FSDP2 x{gpus}" + suffix] = (fsdp_static + a) / GB
    return {"arch": arch, "recipe": RECIPES[arch], "img_size": img, "window": window, "batch_per_gpu": batch,
            "params": P, "max_block_params": counts["max_block"], "root_params": counts["root"],
            "ddp_static_gb": ddp_static / GB, "fsdp_static_gb": fsdp_static / GB,
            "activations_gb": activation_bytes(act, depths, batch, False) / GB,
            "activations_ac_gb": activation_bytes(act, depths, batch, True) / GB,
            "activation_bytes_per_image": act, "total_gb": rows}


def fits(gb: float) -> str:
    ok = [name for name, cap in CAPACITIES.items() if gb <= HEADROOM * cap]
    return ", ".join(ok) if ok else "neither"


def format_markdown(results: list[dict], gpus: int, device: str) -> str:
    cols = list(results[0]["total_gb"])
    lines = [f"Per-GPU memory (GB) at the recipe's batch per GPU; activations measured on {device}; "
             f"'fits' = within {HEADROOM:.0%} of an 80 GB / 141 GB GPU, for the cheapest configuration "
             f"that fits.", "",
             "| encoder | params | batch/GPU | " + " | ".join(cols) + " | fits (cheapest) |",
             "|---|---:|---:|" + "---:|" * len(cols) + "---|"]
    for r in results:
        cells = " | ".join(f"{v:.1f}" for v in r["total_gb"].values())
        verdicts = []
        for cap_name, cap in CAPACITIES.items():
            first = next((c for c in cols if r["total_gb"][c] <= HEADROOM * cap), None)
            verdicts.append(f"{cap_name}: {first or 'none'}")
        lines.append(f"| {r['arch']} | {r['params'] / 1e6:.0f}M | {r['batch_per_gpu']} | {cells} | "
                     f"{'; '.join(verdicts)} |")
    return "\n".join(lines) + "\n"


def write_chart(path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(results[0]["total_gb"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        xs = [g + (i - (len(cols) - 1) / 2) * width for g in range(len(results))]
        bars = ax.bar(xs, [r["total_gb"][c] for r in results], width, label=c)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    for name, cap in CAPACITIES.items():
        ax.axhline(cap, ls="--", lw=0.8, color="k")
        ax.text(len(results) - 0.5, cap, name, fontsize=7, va="bottom", ha="right")
    ax.set_yscale("log")
    ax.set_xticks(range(len(results)), [f"{r['arch']}\n{r['params'] / 1e6:.0f}M, b{r['batch_per_gpu']}"
                                        for r in results], fontsize=8)
    ax.set_ylabel("GB per GPU (log)")
    ax.set_title("SimMIM pre-training memory per GPU")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="simmim bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs the FSDP2 shards are spread over")
    ap.add_argument("--batch", type=int, default=0, help="images per GPU; 0: each recipe's data.batch_size")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", default="results", help="results folder")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in RECIPES]
    if unknown:
        raise SystemExit(f"simmim bench memory: unknown model(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if args.gpus < 1 or args.batch < 0:
        raise SystemExit("simmim bench memory: --gpus must be >= 1 and --batch >= 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if args.precision == "bf16" else None
    results = []
    for m in models:
        results.append(plan(m, args.gpus, args.batch or None, device, amp))
        print(f"{m}: {results[-1]['params'] / 1e6:.0f}M parameters, "
              + ", ".join(f"{k} {v:.1f} GB" for k, v in results[-1]["total_gb"].items()), flush=True)
    out = results_dir(args.out, "memory")
    md = format_markdown(results, args.gpus, device_name())
    (out / "memory.md").write_text(md)
    (out / "memory.json").write_text(json.dumps({"device": device_name(), "gpus": args.gpus,
                                                 "precision": args.precision, "results": results}, indent=1))
    write_chart(out / "memory.png", results)
    print(md)
    print(f"wrote {out / 'memory.md'}, memory.json and memory.png")
    return results


if __name__ == "__main__":
    main()
