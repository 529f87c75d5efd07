"""Do the paper's efficiency claims hold? SimMIM (ViT-B, 800 epochs) is said to cost 2.0x, 1.8x,
~4.0x and 1.5x less to pre-train than DINO, MoCo v3, ViT (masked patch prediction) and BEiT
(SimMIM Table 2, "pre-training costs").

    simmim bench claims [--out results] [--batch B] [--steps N] [--no-timing] [--no-head-timing]
                        [--methods SimMIM,MAE,...]

Each method's training step is built on the same ViT-B/16 backbone, faithful in what costs compute,
with random weights (cost, not accuracy): SimMIM (all tokens, linear head); MAE (encoder on 25% of
tokens, 8-block 512-wide decoder); BEiT (a DALL-E-dVAE-sized tokenizer forward at 112x112 without
gradients, ViT-B, 8192-way head on masked tokens); DINO (2 global 224 + 10 local 96 crops through
the student, the global crops through an EMA teacher); MoCo v3 (2 views, momentum encoder,
projector + predictor, symmetric loss); ViT's masked patch prediction at 384 (512-way colour head);
supervised DeiT-B. Training FLOPs per image are counted exactly (torch.utils.flop_counter, on the
meta device, so full sizes cost nothing); images/sec are measured on the current device. Total
cost = cost per image x the epochs each method's paper used, relative to SimMIM. The report also
holds the head ablation (benchmarks/heads.py): linear vs 2-layer MLP vs inverse Swin-B head.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from simmim.pipeline.masking import MaskGenerator
from simmim.trainer.model import build_simmim
from simmim.trainer.precision import autocast

from .heads import head_markdown, head_table
from .measure import count_flops, seconds_per_call
from .report import device_name, results_dir, write_bar_chart, write_results

# Pre-training epochs of each method's ViT-B result (ImageNet-1K), from the papers.
EPOCHS = {
    "SimMIM": (800, "SimMIM, Xie et al. 2022 (ViT-B, 800 epochs, 83.8% fine-tuned)"),
    "MAE": (1600, "MAE, He et al. 2022 (ViT-B, 1600 epochs, 83.6%)"),
    "BEiT": (800, "BEiT, Bao et al. 2022 (ViT-B, 800 epochs, 83.2%)"),
    "DINO": (400, "DINO, Caron et al. 2021 (ViT-B/16, 400 epochs)"),
    "MoCo v3": (300, "MoCo v3, Chen et al. 2021 (ViT-B, 300 epochs, 83.2%)"),
    "ViT-MPP": (None, "ViT, Dosovitskiy et al. 2021, masked patch prediction: trained by steps on JFT, "
                      "no ImageNet epoch count; cost compared per image only"),
    "DeiT-B": (300, "DeiT, Touvron et al. 2021, 300 epochs supervised (81.8%)"),
}
CLAIMED = {"DINO": 2.0, "MoCo v3": 1.8, "ViT-MPP": 4.0, "BEiT": 1.5}


def vit(img_size=224, dynamic=False, num_classes=0, **kw) -> VisionTransformer:
    return VisionTransformer(img_size=img_size, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                             num_classes=num_classes, dynamic_img_size=dynamic, **kw)


def mlp(dims: list[int], bn: bool = True, last_bn: bool = False) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not bn))
        if (bn and not last) or (last and last_bn):
            layers.append(nn.BatchNorm1d(b, affine=not last))
        if not last:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class DalleBlock(nn.Module):
    """The DALL-E dVAE encoder block: 3x3, 3x3, 3x3, 1x1 convolutions at out/4 width, residual."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        hid = cout // 4
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.res = nn.Sequential(nn.ReLU(), nn.Conv2d(cin, hid, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hid, hid, 3, padding=1), nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(hid, cout, 1))

    def forward(self, x):
        return self.skip(x) + self.res(x)


def dalle_encoder(width: int = 256, vocab: int = 8192) -> nn.Sequential:
    """112x112 -> 14x14 token logits, 4 groups of 2 blocks at 1, 2, 4, 8 x width."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, padding=3)]
    cin = width
    for g, mult in enumerate((1, 2, 4, 8)):
        layers += [DalleBlock(cin, width * mult), DalleBlock(width * mult, width * mult)]
        cin = width * mult
        if g < 3:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(cin, vocab, 1))


def features_with(v: VisionTransformer, x: torch.Tensor, patches=None, tokens=None) -> torch.Tensor:
    """timm's public `v.forward_features(x)` (patch embedding, class token and position embedding,
    blocks, norm), with `patches` applied to the patch embeddings (B, L, D) and `tokens` to the
    blocks' input (B, 1 + L, D), through torch forward hooks: methods that edit the token sequence
    need no private timm method (`_pos_embed`). Needs v.blocks to run as one module call (no
    gradient checkpointing, which calls the blocks one by one); tests/test_benchmarks.py checks
    that both hooks take effect."""
    if getattr(v, "grad_checkpointing", False):
        raise ValueError("features_with: the blocks' hook does not run under gradient checkpointing")
    hooks = []
    if patches is not None:
        hooks.append(v.patch_embed.register_forward_hook(lambda module, args, out: patches(out)))
    if tokens is not None:
        hooks.append(v.blocks.register_forward_pre_hook(lambda module, args: (tokens(args[0]),)))
    try:
        return v.forward_features(x)
    finally:
        for h in hooks:
            h.remove()


def masked_tokens(v: VisionTransformer, x: torch.Tensor, masks: torch.Tensor, token: torch.Tensor):
    """ViT tokens with masked patches replaced before the position embedding (masks at patch
    resolution, (B, L) bool); the class token dropped at the end."""
    def fill(t):  # (B, L, D) patch embeddings
        return torch.where(masks[..., None], token.to(t.dtype), t)

    return features_with(v, x, patches=fill)[:, v.num_prefix_tokens:]


def random_patch_mask(b: int, n: int, ratio: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) bool mask with exactly round(ratio * n) True per row, and those positions (B, k): a
    fixed count keeps every shape static (the meta device cannot run boolean indexing)."""
    idx = torch.rand(b, n, device=device).argsort(1)[:, :int(round(ratio * n))]
    return torch.zeros(b, n, dtype=torch.bool, device=device).scatter(1, idx, True), idx


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, n, ...) at positions idx (B, k) -> (B*k, ...)."""
    return torch.gather(t, 1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])).flatten(0, 1)


@torch.no_grad()
def ema_update(targets: list[nn.Module], sources: list[nn.Module], m: float) -> None:
    """Momentum / teacher weights: target = m * target + (1 - m) * source, parameter by parameter."""
    for t, s in zip(targets, sources):
        for a, b in zip(t.parameters(), s.parameters()):
            a.mul_(m).add_(b.detach(), alpha=1 - m)


class Method(nn.Module):
    """One method's trainable parts plus its frozen ones; step(images) returns the loss."""


class SimMIMStep(Method):
    def __init__(self):
        super().__init__()
        self.model = build_simmim("vit_base", 224, 32)
        self.masks = MaskGenerator(224, 32, 0.6)

    def forward(self, x):
        return self.model(x, self.masks.sample(x.shape[0], device=x.device))


class MAEStep(Method):
    def __init__(self, ratio: float = 0.75):
        super().__init__()
        self.enc, self.ratio = vit(), ratio
        self.embed = nn.Linear(768, 512)
        self.mask_token = nn.Parameter(torch.zeros(512))
        self.pos = nn.Parameter(torch.zeros(1, 197, 512))
        self.dec = nn.Sequential(*[Block(512, 16) for _ in range(8)], nn.LayerNorm(512))
        self.pred = nn.Linear(512, 16 * 16 * 3)

    def forward(self, x):
        B, n = x.shape[0], self.enc.patch_embed.num_patches  # 196
        keep = int(n * (1 - self.ratio))
        order = torch.rand(B, n, device=x.device).argsort(1)
        idx = order[:, :keep, None].expand(-1, -1, 768)

        def kept(t):  # (B, 197, 768) -> cls + 25%
            return torch.cat([t[:, :1], torch.gather(t[:, 1:], 1, idx)], 1)

        z = self.embed(features_with(self.enc, x, tokens=kept))  # encoder on 25% + cls
        full = self.mask_token.expand(B, n, 512).to(z.dtype).scatter(1, order[:, :keep, None].expand(-1, -1, 512), z[:, 1:])
        y = self.pred(self.dec(torch.cat([z[:, :1], full], 1) + self.pos)[:, 1:])  # (B, 196, 768)
        target = F.unfold(x, 16, stride=16).transpose(1, 2)
        masked = torch.ones(B, n, device=x.device).scatter(1, order[:, :keep], 0.0)
        return (((y - target) ** 2).mean(-1) * masked).sum() / masked.sum()


class BEiTStep(Method):
    def __init__(self):
        super().__init__()
        self.tokenizer = dalle_encoder().requires_grad_(False)
        self.enc = vit()
        self.mask_token = nn.Parameter(torch.zeros(768))
        self.head = nn.Linear(768, 8192)

    def forward(self, x):
        with torch.no_grad():
            labels = self.tokenizer(F.interpolate(x, size=112, mode="bilinear")).argmax(1).flatten(1)  # (B, 196)
        masks, idx = random_patch_mask(x.shape[0], 196, 0.4, x.device)
        z = masked_tokens(self.enc, x, masks, self.mask_token)
        return F.cross_entropy(self.head(take(z, idx)), take(labels, idx))


class DINOHead(nn.Module):
    def __init__(self, out_dim: int = 65536):
        super().__init__()
        self.mlp = mlp([768, 2048, 2048, 256], bn=False)
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(256, out_dim, bias=False))

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DINOStep(Method):
    def __init__(self):
        super().__init__()
        self.student, self.s_head = vit(dynamic=True), DINOHead()
        self.teacher, self.t_head = vit(dynamic=True).requires_grad_(False), DINOHead().requires_grad_(False)

    def forward(self, x):
        g = [x, x.flip(-1)]
        local = [F.interpolate(x, size=96, mode="bilinear") for _ in range(10)]
        with torch.no_grad():
            t = [F.softmax(self.t_head(self.teacher.forward_features(c)[:, 0]) / 0.04, -1) for c in g]
        s = [F.log_softmax(self.s_head(self.student.forward_features(c)[:, 0]) / 0.1, -1)
             for c in [torch.cat(g)] + [torch.cat(local)]]
        s = list(s[0].chunk(2)) + list(s[1].chunk(10))
        loss = sum(-(ti * si).sum(-1).mean() for i, ti in enumerate(t) for j, si in enumerate(s) if i != j)
        return loss / (2 * 11)

    def ema(self):
        ema_update([self.teacher, self.t_head], [self.student, self.s_head], 0.996)


class MoCoV3Step(Method):
    def __init__(self):
        super().__init__()
        self.base, self.proj = vit(), mlp([768, 4096, 4096, 256], last_bn=True)
        self.pred = mlp([256, 4096, 256], last_bn=True)
        self.mom, self.mom_proj = vit().requires_grad_(False), mlp([768, 4096, 4096, 256], last_bn=True).requires_grad_(False)

    def forward(self, x):
        views = [x, x.flip(-1)]
        q = [self.pred(self.proj(self.base.forward_features(v)[:, 0])) for v in views]
        with torch.no_grad():
            k = [self.mom_proj(self.mom.forward_features(v)[:, 0]) for v in views]

        def nce(a, b):
            logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.2
            return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device)) * 0.4

        return nce(q[0], k[1]) + nce(q[1], k[0])

    def ema(self):
        ema_update([self.mom, self.mom_proj], [self.base, self.proj], 0.99)


class ViTMPPStep(Method):
    """ViT's self-supervised masked patch prediction at 384: 50% of patches corrupted, the mean
    3-bit colour of each corrupted patch predicted (512 classes)."""

    def __init__(self):
        super().__init__()
        self.enc = vit(img_size=384)
        self.mask_token = nn.Parameter(torch.zeros(768))
        self.head = nn.Linear(768, 512)

    def forward(self, x):
        x = F.interpolate(x, size=384, mode="bilinear")
        masks, idx = random_patch_mask(x.shape[0], 576, 0.5, x.device)
        z = masked_tokens(self.enc, x, masks, self.mask_token)
        colour = (F.avg_pool2d(x.sigmoid(), 16).clamp(0, 0.999) * 8).long()  # (B, 3, 24, 24) in 0..7
        labels = (colour[:, 0] * 64 + colour[:, 1] * 8 + colour[:, 2]).flatten(1)
        return F.cross_entropy(self.head(take(z, idx)), take(labels, idx))


class DeiTStep(Method):
    def __init__(self):
        super().__init__()
        self.model = vit(num_classes=1000)

    def forward(self, x):
        return F.cross_entropy(self.model(x), torch.randint(0, 1000, (x.shape[0],), device=x.device))


METHODS = {"SimMIM": SimMIMStep, "MAE": MAEStep, "BEiT": BEiTStep, "DINO": DINOStep, "MoCo v3": MoCoV3Step,
           "ViT-MPP": ViTMPPStep, "DeiT-B": DeiTStep}


def train_step(method: Method, x: torch.Tensor, amp_dtype) -> torch.Tensor:
    with autocast(x.device.type, amp_dtype):
        loss = method(x)
    loss.backward()
    if hasattr(method, "ema"):
        method.ema()
    return loss


def flops_per_image(name: str, batch: int = 2) -> float:
    """Exact training FLOPs per image, counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        method = METHODS[name]()
        x = torch.empty(batch, 3, 224, 224)
    return count_flops(lambda: train_step(method, x, None)) / batch


def images_per_sec(name: str, batch: int, steps: int, device: torch.device, amp_dtype) -> float:
    torch.manual_seed(0)
    method = METHODS[name]().to(device)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 224, 224, device=device)

    def step():
        train_step(method, x, amp_dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch / seconds_per_call(step, steps, device)


def build_table(flops: dict, ips: dict | None) -> list[dict]:
    rows = []
    base_epochs = EPOCHS["SimMIM"][0]
    for name in METHODS:
        epochs, source = EPOCHS[name]
        row = {"method": name, "gflops_per_image": flops[name] / 1e9,
               "flops_vs_simmim_per_image": flops[name] / flops["SimMIM"], "epochs": epochs, "source": source,
               "claimed": CLAIMED.get(name)}
        if ips and name in ips:
            row["img_per_s"] = ips[name]
            row["time_vs_simmim_per_image"] = ips["SimMIM"] / ips[name]
        if epochs:
            row["cost_vs_simmim_flops"] = row["flops_vs_simmim_per_image"] * epochs / base_epochs
            if "time_vs_simmim_per_image" in row:
                row["cost_vs_simmim_time"] = row["time_vs_simmim_per_image"] * epochs / base_epochs
        rows.append(row)
    return rows


def verdict(row: dict) -> str:
    """Whether the claim reproduces (total cost by FLOPs within 25% of it), and why, from the two
    factors. FLOPs, being exact, decide; the measured-time column shows what a device adds."""
    if row["claimed"] is None:
        return ""
    per_img = row["flops_vs_simmim_per_image"]
    ours = row.get("cost_vs_simmim_flops")
    if ours is None:
        return (f"not comparable: {per_img:.2f}x per image, but no ImageNet epoch count to multiply by "
                f"(the claim needs ~{row['claimed'] / per_img * EPOCHS['SimMIM'][0]:.0f} SimMIM-equivalent epochs)")
    why = f"{per_img:.2f}x per image x {row['epochs']}/{EPOCHS['SimMIM'][0]} epochs = {ours:.2f}x"
    if abs(ours - row["claimed"]) / row["claimed"] <= 0.25:
        return f"reproduces: {why}"
    need = row["claimed"] / per_img * EPOCHS["SimMIM"][0]
    return (f"does not reproduce: {why}; the claim would need {need:.0f} epochs, or costs that FLOPs and "
            f"a single-device step do not show (e.g. large-batch communication)")


def markdown(rows: list[dict], device: str, timed: bool) -> str:
    f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"# SimMIM's efficiency claims, ViT-B/16, on {device}", "",
             "| method | GFLOP/img (train step) | x SimMIM per img | img/s | epochs | total cost x SimMIM (FLOPs) | "
             "total cost x SimMIM (time) | paper's claim | verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {f(r['gflops_per_image'], 1)} | {f(r['flops_vs_simmim_per_image'])} | "
                     f"{f(r.get('img_per_s'), 1) if timed else 'n/a'} | {r['epochs'] or 'n/a'} | "
                     f"{f(r.get('cost_vs_simmim_flops'))} | {f(r.get('cost_vs_simmim_time'))} | "
                     f"{f(r['claimed'], 1) + 'x' if r['claimed'] else ''} | {verdict(r)} |")
    lines += ["", "Epochs: " + "; ".join(f"{k}: {v[1]}" for k, v in EPOCHS.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="simmim bench claims", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--batch", type=int, default=64 if cuda else 2)
    ap.add_argument("--steps", type=int, default=10 if cuda else 1)
    ap.add_argument("--no-timing", action="store_true", help="FLOPs only")
    ap.add_argument("--no-head-timing", action="store_true", help="the head ablation by FLOPs only")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma list of the methods to time (SimMIM among them); the others get FLOPs only")
    args = ap.parse_args(argv)
    flops = {name: flops_per_image(name) for name in METHODS}
    timed = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in timed if n not in METHODS]
    if unknown or "SimMIM" not in timed:
        raise SystemExit(f"simmim bench claims: --methods must include SimMIM and name only {', '.join(METHODS)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    timed.sort(key=lambda n: n != "SimMIM")  # every ratio divides by SimMIM's rate: time it first
    out = results_dir(args.out, "claims")

    def save(ips: dict | None, heads: list[dict]) -> tuple[list[dict], str]:
        """claims.md and claims.json as they stand; rewritten after every method, so a run stopped at
        a time limit keeps the methods it timed."""
        rows = build_table(flops, ips)
        report = markdown(rows, device_name(), ips is not None) + ("\n" + head_markdown(heads) if heads else "")
        write_results(out, "claims", report, {"device": device_name(), "rows": rows, "heads": heads})
        return rows, report

    ips = None
    if not args.no_timing:
        device = torch.device("cuda" if cuda else "cpu")
        amp = torch.bfloat16 if cuda else None
        ips = {}
        save(ips, [])  # the FLOPs, before any timing
        for name in timed:
            ips[name] = images_per_sec(name, args.batch, args.steps, device, amp)
            print(f"{name}: {ips[name]:.1f} img/s", flush=True)
            save(ips, [])
    heads = head_table(not (args.no_timing or args.no_head_timing), max(1, args.batch // 2), args.steps)
    rows, report = save(ips, heads)
    write_bar_chart(out / "claims.png", [r["method"] for r in rows],
                    {"FLOPs per image x SimMIM": [r["flops_vs_simmim_per_image"] for r in rows],
                     **({"time per image x SimMIM": [r.get("time_vs_simmim_per_image", 0) for r in rows]}
                        if ips else {})},
                    ylabel="relative to SimMIM", title=f"Pre-training step cost, ViT-B/16, {device_name()}")
    print(report)
    print(f"wrote {out}/claims.md, claims.json, claims.png")
    return rows


if __name__ == "__main__":
    main()
