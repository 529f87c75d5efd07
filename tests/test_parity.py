"""Parity with the released SimMIM code (microsoft/SimMIM), each part against an independent
computation: the paper's ViT-B (BEiT-style, its parameter count and initialisation), the cosine
schedule (timm's CosineLRScheduler itself), the weight-decay groups (the released rule, restated
here on the released parameter names), the relative-position-table resize (the released formula,
restated with a different spline routine) and the released checkpoint layouts (written here from a
description of the original Swin / BEiT key layout, not by this project's saver)."""
import math
import re

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.interpolate import make_interp_spline

from simmim.core.errors import CheckpointError, ConfigError
from simmim.pipeline import MaskGenerator
from simmim.trainer.config import load_config
from simmim.trainer.finetune import (build_classifier, evaluate_checkpoint, layer_decay_groups, load_pretrained,
                                     load_weights, resize_rel_pos_bias)
from simmim.trainer.model import ARCHS, build_simmim, no_weight_decay, param_groups
from simmim.trainer.schedule import LRSchedule

# ---------------------------------------------------------------- 1. the paper's ViT-B


def test_vit_base_is_the_papers_beit_style_vit():
    with torch.device("meta"):
        model = build_simmim("vit_base", 224, 32, drop_path=0.1)
    assert sum(p.numel() for p in model.parameters()) == 86_256_720  # the released SimMIM ViT-B
    v = model.encoder.vit
    names = dict(v.named_parameters())
    assert v.pos_embed is None and "pos_embed" not in names  # no absolute position embedding
    assert names["rel_pos_bias.relative_position_bias_table"].shape == (27 * 27 + 3, 12)  # one shared table
    assert not any(n.endswith("attn.relative_position_bias_table") for n in names)
    assert v.cls_token.shape == (1, 1, 768) and model.encoder.mask_token.shape == (768,)
    for i, blk in enumerate(v.blocks):
        assert blk.attn.q_bias.shape == (768,) and blk.attn.v_bias.shape == (768,)
        assert f"blocks.{i}.attn.k_bias" not in names  # a zero buffer, not a weight
        assert blk.norm1.eps == 1e-6 and blk.gamma_1.shape == blk.gamma_2.shape == (768,)
    dpr = [getattr(b.drop_path1, "drop_prob", 0.0) for b in v.blocks]
    assert dpr[0] == 0.0 and dpr[-1] == pytest.approx(0.1)


def test_vit_released_initialisation():
    """Truncated normal at +-1 sigma (std 0.02 -> 0.02 x truncnorm(-1, 1).std() = 0.0108), attn.proj /
    mlp.fc2 of block i divided by sqrt(2 i), gammas 0.1, shared table and biases 0."""
    torch.manual_seed(0)
    model = build_simmim("vit_micro", 64, 32)
    v = model.encoder.vit
    eff = 0.02 * stats.truncnorm(-1, 1).std()
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in v.blocks])
    assert qkv.abs().max() <= 0.02 and qkv.std().item() == pytest.approx(eff, rel=0.02)
    for i, blk in enumerate(v.blocks, start=1):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            s = w.std().item() * math.sqrt(2 * i)
            assert w.abs().max() <= 0.02 / math.sqrt(2 * i) + 1e-9 and s == pytest.approx(eff, rel=0.1)
        assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1)
        assert torch.all(blk.attn.q_bias == 0) and torch.all(blk.mlp.fc1.bias == 0)
    for t in (v.patch_embed.proj.weight, v.cls_token, model.encoder.mask_token):
        assert 0 < t.abs().max() <= 0.02
    assert torch.all(v.rel_pos_bias.relative_position_bias_table == 0)


def test_vit_encoder_is_timm_beit_forward_after_the_mask_fill():
    """Our encoder = timm's own Beit.forward_features on the mask-filled patch tokens (cls token
    prepended after the fill, the shared bias in every block, cls dropped at the output)."""
    torch.manual_seed(0)
    model = build_simmim("vit_micro", 64, 32).eval()
    v = model.encoder.vit
    with torch.no_grad():
        v.rel_pos_bias.relative_position_bias_table.normal_()  # make the bias matter
    x = torch.randn(2, 3, 64, 64)
    masks = MaskGenerator(64, 32, 0.6).sample(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encoder(x, masks)  # (B, D, 4, 4)
        tokens = v.patch_embed(x)
        w = masks.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)[..., None].float()
        filled = tokens * (1 - w) + model.encoder.mask_token * w
        embed, v.patch_embed.forward = v.patch_embed.forward, lambda _: filled
        ref = v.forward_features(x)[:, 1:]  # (B, L, D)
        v.patch_embed.forward = embed
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), ref)


def test_vit_finetuning_per_block_tables_pooling_and_layer_decay(tmp_path):
    torch.manual_seed(0)
    simmim = build_simmim("vit_micro", 64, 32)
    with torch.no_grad():
        simmim.encoder.vit.rel_pos_bias.relative_position_bias_table.normal_()
    torch.save({"model": simmim.state_dict(), "config": {"model": {"arch": "vit_micro"}}}, tmp_path / "v.pt")
    net = build_classifier("vit_micro", 64, 5, 0, 0.1)
    report = load_pretrained(net, tmp_path / "v.pt", "vit_micro")
    assert sorted(report["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report["unexpected"]) == ["norm.bias", "norm.weight"]  # as the released: norm -> fc_norm
    shared = simmim.encoder.vit.rel_pos_bias.relative_position_bias_table
    for blk in net.blocks:  # one copy per block, independent parameters
        assert torch.equal(blk.attn.relative_position_bias_table, shared)
    assert len({blk.attn.relative_position_bias_table.data_ptr() for blk in net.blocks}) == len(net.blocks)
    assert net.global_pool == "avg" and isinstance(net.fc_norm, torch.nn.LayerNorm)
    # layer decay: the released get_vit_layer, restated: cls/patch_embed 0, blocks.i -> i + 1, rest L + 1
    depth, decay = ARCHS["vit_micro"].depths[0], 0.65
    groups = layer_decay_groups(net, "vit_micro", 0.05, decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in net.named_parameters():
        m = re.match(r"blocks\.(\d+)\.", name)
        layer = 0 if name.startswith(("cls_token", "patch_embed")) else int(m.group(1)) + 1 if m else depth + 1
        assert scale_of[id(p)] == pytest.approx(decay ** (depth + 1 - layer)), name
    assert scale_of[id(net.blocks[2].gamma_1)] == scale_of[id(net.blocks[2].attn.relative_position_bias_table)] \
        == pytest.approx(decay ** (depth - 2))


# ---------------------------------------------------------------- 2. the cosine schedule

def timm_cosine(total, warmup, lr, warmup_lr, min_lr):
    """The released code's scheduler: timm's CosineLRScheduler per iteration."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup,
                              cycle_limit=1, t_in_epochs=False)

    def at(t):
        sched.step_update(t)
        return opt.param_groups[0]["lr"]
    return at


def test_cosine_released_matches_timm_and_the_issue_figures():
    cfg = load_config("swin_base_100ep")
    o, per_epoch = cfg.optim, 2048 // 512  # global batch 2048: lr x 4
    total, warmup = cfg.train.epochs * 625, cfg.train.warmup_epochs * 625
    s = LRSchedule(lr=o.base_lr * per_epoch, warmup_lr=o.warmup_lr * per_epoch, min_lr=o.min_lr * per_epoch,
                   warmup_steps=warmup, total_steps=total, anchor=o.cosine_anchor)
    assert o.cosine_anchor == "released"
    ref = timm_cosine(total, warmup, s.lr, s.warmup_lr, s.min_lr)
    for t in list(range(0, total, 97)) + [warmup - 1, warmup, total - 1]:
        assert s(t) == pytest.approx(ref(t), rel=1e-12, abs=1e-15), t
    assert s(6250) == pytest.approx(7.81e-4, abs=5e-7) and s(31250) == pytest.approx(4.20e-4, abs=5e-7)
    assert s(total - 1) == pytest.approx(4.0e-5, abs=5e-8)
    other = LRSchedule(s.lr, s.warmup_lr, s.min_lr, warmup, total, anchor="warmup_end")
    assert other(6250) == pytest.approx(8.0e-4) and other(31250) == pytest.approx(4.86e-4, abs=5e-7)
    with pytest.raises(ConfigError, match="optim.cosine_anchor"):  # checked at load, once
        load_config(None, ["optim.cosine_anchor=peak"])


# ---------------------------------------------------------------- 3. weight decay groups

def released_no_decay(released_names: dict, pretrain: bool, family: str) -> set:
    """The released rule on the released names {name: shape}: 1-D, '.bias', an exact name from the
    encoder's no_weight_decay(), or a keyword from no_weight_decay_keywords() as a substring; in
    pre-training the SimMIM wrapper prefixes both lists with 'encoder.'."""
    skip = {"swin": {"absolute_pos_embed", "mask_token"} if pretrain else {"absolute_pos_embed"},
            "vit": {"pos_embed", "cls_token"}}[family]
    keywords = {"swin": {"relative_position_bias_table"}, "vit": set()}[family]
    if pretrain:
        skip, keywords = {"encoder." + k for k in skip}, {"encoder." + k for k in keywords}
    return {n for n, shape in released_names.items()
            if len(shape) == 1 or n.endswith(".bias") or n in skip or any(k in n for k in keywords)}


def as_released(name: str, shape) -> tuple[str, tuple]:
    """This project's SimMIM parameter name / shape -> the released code's (mask token (1, 1, C))."""
    name = name.replace("encoder.swin.", "encoder.").replace("encoder.vit.", "encoder.")
    return name, (1, 1, shape[0]) if name == "encoder.mask_token" else tuple(shape)


@pytest.mark.parametrize("arch,size,family", [("swin_base", 192, "swin"), ("vit_base", 224, "vit")])
def test_pretraining_weight_decay_is_the_released_rule(arch, size, family):
    with torch.device("meta"):
        model = build_simmim(arch, size, 32)
    decay, no_decay = param_groups(model, 0.05, family)
    ours = {as_released(n, p.shape)[0] for n, p in model.named_parameters()
            if any(p is q for q in no_decay["params"])}
    released = dict(as_released(n, p.shape) for n, p in model.named_parameters())
    assert ours == released_no_decay(released, pretrain=True, family=family)
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert all(any(p is q for q in decay["params"]) for p in tables)
    if family == "swin":
        assert len(tables) == 24 and sum(p.numel() for p in tables) == 45_496
    else:
        assert any(model.encoder.mask_token is q for q in decay["params"])
    intended = param_groups(model, 0.05, family, rule="intended")[1]["params"]
    assert all(any(p is q for q in intended) for p in tables + [model.encoder.mask_token])


@pytest.mark.parametrize("arch,family", [("swin_micro", "swin"), ("vit_micro", "vit")])
def test_finetuning_weight_decay_is_the_released_rule(arch, family):
    net = build_classifier(arch, 128, 5, 4 if family == "swin" else 0, 0.0)
    groups = layer_decay_groups(net, arch, 0.05, 0.9)
    ours = {n for n, p in net.named_parameters() for g in groups if g["weight_decay"] == 0
            and any(p is q for q in g["params"])}
    assert ours == released_no_decay({n: tuple(p.shape) for n, p in net.named_parameters()}, False, family)


def test_weight_decay_rule_is_checked():
    with pytest.raises(ValueError, match="weight_decay_rule"):
        no_weight_decay("x.weight", torch.nn.Parameter(torch.zeros(2, 2)), "swin", rule="paper")


# ---------------------------------------------------------------- 4. relative-position table resize

def released_resize(table: np.ndarray, dst: int) -> np.ndarray:
    """The released formula restated: the ratio q found by bisection on [1.01, 1.5] to 1e-6 such that
    1 + q + ... + q^(n-1) = dst // 2 (n = src // 2); source offsets at 0, +-1, +-(1 + q), ...; a cubic
    interpolating spline (here: SciPy's make_interp_spline, not-a-knot, one axis after the other,
    the same space as FITPACK's s=0 fit) evaluated at the integer target offsets."""
    src = math.isqrt(table.shape[0])
    n, m = src // 2, dst // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if (1 - q ** n) / (1 - q) > m:
            hi = q
        else:
            lo = q
    pos = [1.0]
    for i in range(1, n):
        pos.append(pos[-1] + q ** i)
    x = np.array([-p for p in reversed(pos)] + [0.0] + pos)
    t = np.arange(-m, m + 1, dtype=np.float64)
    out = []
    for h in range(table.shape[1]):
        z = table[:, h].reshape(src, src).astype(np.float64)
        rows = make_interp_spline(x, z, k=3, axis=0)(t)  # (dst, src)
        out.append(make_interp_spline(x, rows, k=3, axis=1)(t).reshape(-1))
    return np.stack(out, -1)


def test_rel_pos_resize_is_the_released_geometric_spline():
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.arange(11.) - 5, np.arange(11.) - 5, indexing="ij")
    smooth = np.stack([np.sin(xx / 3 + h) * np.cos(yy / 4) + 0.05 * xx * yy for h in range(4)], -1).reshape(121, 4)
    rough = rng.standard_normal((121, 3))
    for table in (smooth, rough):
        got = resize_rel_pos_bias(torch.from_numpy(table).float(), 13).double().numpy()
        ref = released_resize(table.astype(np.float32), 13)
        np.testing.assert_allclose(got, ref, atol=1e-5)  # float32 tables
        g, s = got.reshape(13, 13, -1), table.reshape(11, 11, -1)
        for dy in (-1, 0, 1):  # offsets -1, 0, +1 land exactly on -1, 0, +1
            for dx in (-1, 0, 1):
                np.testing.assert_allclose(g[6 + dy, 6 + dx], s[5 + dy, 5 + dx], atol=1e-6)
    # BEiT tables: the 3 cls entries at the end are kept
    beit = torch.randn(11 * 11 + 3, 2)
    out = resize_rel_pos_bias(beit, 13, extra=3)
    assert out.shape == (13 * 13 + 3, 2) and torch.equal(out[-3:], beit[-3:])
    # beyond the released search's ratio range (q > 1.5, here window 4 -> 8: q = 2) the ends still land
    big = torch.from_numpy(rng.standard_normal((49, 1))).float()
    out = resize_rel_pos_bias(big, 15).reshape(15, 15)
    src = big.reshape(7, 7)
    for (i, j), (a, b) in {(0, 0): (0, 0), (14, 14): (6, 6), (7, 7): (3, 3), (7, 8): (3, 4)}.items():
        assert out[i, j].item() == pytest.approx(src[a, b].item(), abs=1e-5)


# ---------------------------------------------------------------- 5. released checkpoints

def released_swin_state(arch: str, img: int, window: int, pretrain: bool, num_classes: int = 0, seed: int = 0):
    """A state dict in the layout of the released SimMIM Swin (the original Swin code), written from
    its description: patch_embed.{proj, norm}; layers.i.blocks.j.{norm1, attn.{qkv, proj,
    relative_position_bias_table, relative_position_index}, norm2, mlp.{fc1, fc2}} and attn_mask on
    shifted blocks; layers.i.downsample.{reduction (bias-free), norm} at the END of stages 0..2;
    norm; pre-training: encoder. prefix, mask_token (1, 1, C) and decoder.0; fine-tuned: head."""
    a = ARCHS[arch]
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    C, s = a.embed_dim, {}
    s["patch_embed.proj.weight"], s["patch_embed.proj.bias"] = r(C, 3, 4, 4), r(C)
    s["patch_embed.norm.weight"], s["patch_embed.norm.bias"] = r(C), r(C)
    res = img // 4
    for i, (depth, heads) in enumerate(zip(a.depths, a.num_heads)):
        d, w = C * 2 ** i, min(window, res)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            for norm in ("norm1", "norm2"):
                s[p + norm + ".weight"], s[p + norm + ".bias"] = r(d), r(d)
            s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = r(3 * d, d), r(3 * d)
            s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = r(d, d), r(d)
            s[p + "attn.relative_position_bias_table"] = r((2 * w - 1) ** 2, heads)
            s[p + "attn.relative_position_index"] = torch.randint(0, (2 * w - 1) ** 2, (w * w, w * w), generator=g)
            s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = r(4 * d, d), r(4 * d)
            s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = r(d, 4 * d), r(d)
            if j % 2 and res > w:
                s[p + "attn_mask"] = r((res // w) ** 2, w * w, w * w)
        if i < len(a.depths) - 1:
            s[f"layers.{i}.downsample.reduction.weight"] = r(2 * d, 4 * d)
            s[f"layers.{i}.downsample.norm.weight"], s[f"layers.{i}.downsample.norm.bias"] = r(4 * d), r(4 * d)
            res //= 2
    F = C * 2 ** (len(a.depths) - 1)
    s["norm.weight"], s["norm.bias"] = r(F), r(F)
    if not pretrain:
        s["head.weight"], s["head.bias"] = r(num_classes, F), r(num_classes)
        return s
    s = {"encoder." + k: v for k, v in s.items()}
    s["encoder.mask_token"] = r(1, 1, C)
    s["decoder.0.weight"], s["decoder.0.bias"] = r(32 * 32 * 3, F, 1, 1), r(32 * 32 * 3)
    return s


def timm_swin_name(released: str) -> str:
    """Where a released Swin weight lives in timm's layout: downsample of stage i -> start of i + 1."""
    name = released.removeprefix("encoder.")
    name = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", name)
    return name.replace("head.", "head.fc.")


@pytest.mark.parametrize("img,window", [(128, 4), (160, 5)])  # 160 / 5: tables resized (7x7 -> 9x9 offsets)
def test_released_swin_pretraining_checkpoint_loads(tmp_path, img, window):
    state = released_swin_state("swin_micro", 128, 4, pretrain=True)
    torch.save({"model": state}, tmp_path / "released.pth")
    net = build_classifier("swin_micro", img, 5, window, 0.0)
    report = load_pretrained(net, tmp_path / "released.pth", "swin_micro")
    assert sorted(report["missing"]) == ["head.fc.bias", "head.fc.weight"] and report["unexpected"] == []
    own = net.state_dict()
    checked = 0
    for key, value in state.items():
        if key.startswith("decoder.") or key.endswith(("mask_token", "relative_position_index", "attn_mask")):
            continue
        mine = own[timm_swin_name(key)]
        if key.endswith("relative_position_bias_table") and mine.shape != value.shape:
            ref = released_resize(value.numpy(), math.isqrt(mine.shape[0]))
            np.testing.assert_allclose(mine.double().numpy(), ref, atol=1e-5)
        else:
            assert torch.equal(mine, value), key
        checked += 1
    assert checked == len([k for k in own if not k.endswith(("relative_position_index", "attn_mask"))]) - 2
    assert bool(report["resized"]) == (window == 5)


def test_released_file_with_its_yacs_config_loads(tmp_path, monkeypatch):
    """The released code saves {model, optimizer, lr_scheduler, max_accuracy, epoch, config} with its
    yacs CfgNode config pickled in: read with weights_only=True, without yacs installed."""
    import sys
    import types

    class CfgNode(dict):  # pickles as yacs does: dict items, then an attribute dict holding a set
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__new_allowed__": False})

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    config.CfgNode, yacs.config = CfgNode, config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    state = released_swin_state("swin_micro", 128, 4, pretrain=True)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"t": 1},
                "max_accuracy": 0.0, "epoch": 99,
                "config": CfgNode({"MODEL": CfgNode({"TYPE": "swin"}), "DATA": CfgNode({"IMG_SIZE": 192})})},
               tmp_path / "released.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    net = build_classifier("swin_micro", 128, 5, 4, 0.0)
    report = load_pretrained(net, tmp_path / "released.pth", "swin_micro")
    assert sorted(report["missing"]) == ["head.fc.bias", "head.fc.weight"] and report["unexpected"] == []
    assert torch.equal(net.state_dict()["layers.1.downsample.reduction.weight"],
                       state["encoder.layers.0.downsample.reduction.weight"])


def test_checkpoint_of_another_family_is_refused_in_one_line(tmp_path):
    vit = released_vit_state("vit_micro", 64)
    torch.save({"model": vit}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="holds a vit encoder; model.arch swin_micro is a swin"):
        load_pretrained(build_classifier("swin_micro", 128, 5, 4, 0.0), tmp_path / "vit.pth", "swin_micro")
    torch.save({"model": released_swin_state("swin_micro", 128, 4, pretrain=True)}, tmp_path / "swin.pth")
    with pytest.raises(CheckpointError, match="holds a swin encoder; model.arch vit_micro is a vit"):
        load_pretrained(build_classifier("vit_micro", 64, 5, 0, 0.0), tmp_path / "swin.pth", "vit_micro")


def test_released_swin_finetuned_checkpoint_evaluates(tmp_path, sample_root):
    state = released_swin_state("swin_micro", 128, 4, pretrain=False, num_classes=5)
    net = build_classifier("swin_micro", 128, 5, 4, 0.0)
    report = load_weights(net, state, "swin_micro", "released")
    assert report["missing"] == [] and report["unexpected"] == []
    own = net.state_dict()
    for key, value in state.items():
        if not key.endswith(("relative_position_index", "attn_mask")):
            assert torch.equal(own[timm_swin_name(key)], value), key
    # `simmim evaluate` on it: no config in the file, the model comes from the command line
    torch.save({"model": state}, tmp_path / "released_ft.pth")
    result = evaluate_checkpoint(str(tmp_path / "released_ft.pth"), str(sample_root / "val"), "torch",
                                 ["model.arch=swin_micro", "data.img_size=128", "model.window_size=4",
                                  "data.num_workers=0", "data.batch_size=8", "train.device=cpu"])
    assert result["val_images"] == len(list((sample_root / "val").rglob("*.JPEG")))
    # as the released code saves it, with its (yacs) config: that config is not ours and is ignored
    torch.save({"model": state, "config": {"MODEL": {"TYPE": "swin"}, "DATA": {"IMG_SIZE": 192}}, "epoch": 99},
               tmp_path / "released_ft_cfg.pth")
    again = evaluate_checkpoint(str(tmp_path / "released_ft_cfg.pth"), str(sample_root / "val"), "torch",
                                ["model.arch=swin_micro", "data.img_size=128", "model.window_size=4",
                                 "data.num_workers=0", "data.batch_size=8", "train.device=cpu"])
    assert again["top1"] == result["top1"] and again["val_loss"] == pytest.approx(result["val_loss"])
    with pytest.raises(CheckpointError, match="does not match model.arch swin_tiny"):
        evaluate_checkpoint(str(tmp_path / "released_ft.pth"), str(sample_root / "val"), "torch",
                            ["model.arch=swin_tiny", "data.img_size=128", "model.window_size=4",
                             "data.num_workers=0", "train.device=cpu"])


def released_vit_state(arch: str, img: int, seed: int = 0) -> dict:
    """The released SimMIM ViT pre-training layout (BEiT's): encoder.{cls_token (1,1,D), mask_token
    (1,1,D), patch_embed.proj, rel_pos_bias.{relative_position_bias_table ((2g-1)^2 + 3, heads),
    relative_position_index}, blocks.i.{gamma_1, gamma_2, norm1, attn.{qkv (no bias), q_bias, v_bias,
    proj}, norm2, mlp.{fc1, fc2}}, norm}, decoder.0."""
    a = ARCHS[arch]
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    D, heads, grid = a.embed_dim, a.num_heads[0], img // a.patch_size
    s = {"cls_token": r(1, 1, D), "mask_token": r(1, 1, D), "patch_embed.proj.weight": r(D, 3, 16, 16),
         "patch_embed.proj.bias": r(D), "rel_pos_bias.relative_position_bias_table": r((2 * grid - 1) ** 2 + 3, heads),
         "rel_pos_bias.relative_position_index": torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long),
         "norm.weight": r(D), "norm.bias": r(D)}
    for i in range(a.depths[0]):
        p = f"blocks.{i}."
        for n, shape in (("gamma_1", (D,)), ("gamma_2", (D,)), ("norm1.weight", (D,)), ("norm1.bias", (D,)),
                         ("attn.qkv.weight", (3 * D, D)), ("attn.q_bias", (D,)), ("attn.v_bias", (D,)),
                         ("attn.proj.weight", (D, D)), ("attn.proj.bias", (D,)), ("norm2.weight", (D,)),
                         ("norm2.bias", (D,)), ("mlp.fc1.weight", (4 * D, D)), ("mlp.fc1.bias", (4 * D,)),
                         ("mlp.fc2.weight", (D, 4 * D)), ("mlp.fc2.bias", (D,))):
            s[p + n] = r(*shape)
    s = {"encoder." + k: v for k, v in s.items()}
    s["decoder.0.weight"], s["decoder.0.bias"] = r(16 * 16 * 3, D, 1, 1), r(16 * 16 * 3)
    return s


def test_released_vit_pretraining_checkpoint_loads(tmp_path):
    state = released_vit_state("vit_micro", 64)
    torch.save({"model": state}, tmp_path / "released.pth")
    net = build_classifier("vit_micro", 64, 5, 0, 0.0)
    report = load_pretrained(net, tmp_path / "released.pth", "vit_micro")
    assert sorted(report["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report["unexpected"]) == ["norm.bias", "norm.weight"]
    own = net.state_dict()
    shared = state["encoder.rel_pos_bias.relative_position_bias_table"]
    for i in range(ARCHS["vit_micro"].depths[0]):
        assert torch.equal(own[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    for key, value in state.items():
        name = key.removeprefix("encoder.")
        if name in own and not name.endswith("relative_position_index"):
            assert torch.equal(own[name], value), key
    # and into the SimMIM ViT itself: the same names under encoder.vit., mask token (1, 1, D) -> (D,)
    simmim = build_simmim("vit_micro", 64, 32)
    mine = simmim.encoder.vit.state_dict()
    assert {k for k in mine if not k.endswith(("relative_position_index", "k_bias"))} == \
        {k.removeprefix("encoder.") for k in state
         if k.startswith("encoder.") and not k.endswith(("mask_token", "relative_position_index"))}


def test_vit_exports_as_timm_beit(tmp_path):
    """`simmim export` of the BEiT-style encoder: timm loads it back as its own Beit, same features."""
    import timm

    from simmim.trainer.export import export_timm

    torch.manual_seed(0)
    model = build_simmim("vit_micro", 64, 32).eval()
    with torch.no_grad():
        model.encoder.vit.rel_pos_bias.relative_position_bias_table.normal_()
    export_timm(model.encoder.vit, "vit", 64, tmp_path / "out")
    back = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), model.encoder.vit.forward_features(x))
