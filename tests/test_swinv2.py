"""SwinV2 encoders: SimMIM forward/backward, the published sizes (counted on the meta device),
weight-decay groups, and fine-tuning at another window through the continuous position bias."""
import pytest
import torch

from simmim.pipeline.masking import MaskGenerator
from simmim.trainer.finetune import build_classifier, layer_id, load_pretrained
from simmim.trainer.model import ARCHS, build_simmim, param_groups, timm_model


def test_swinv2_forward_backward_shapes():
    torch.manual_seed(0)
    model = build_simmim("swinv2_mini", 64, 32, window_size=2)
    x = torch.randn(2, 3, 64, 64)
    masks = MaskGenerator(64, 32, 0.6).sample(2)
    feats = model.encoder(x, masks)
    assert feats.shape == (2, 64 * 8, 2, 2)  # (B, 8C, H/32, W/32)
    loss, pred = model(x, masks, return_pred=True)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and pred.shape == x.shape
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.encoder.mask_token.grad.abs().sum() > 0


def test_swinv2_mask_token_hides_masked_pixels():
    torch.manual_seed(0)
    model = build_simmim("swinv2_mini", 64, 32, window_size=2).eval()
    masks = torch.tensor([[[True, False], [False, True]]])
    x = torch.randn(1, 3, 64, 64)
    y, z = x.clone(), x.clone()
    y[:, :, :32, :32] += 5.0  # a masked cell
    z[:, :, :32, 32:] += 5.0  # a visible cell
    with torch.no_grad():
        a, b, c = (model.encoder(t, masks) for t in (x, y, z))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


# Published sizes of the ImageNet-1K classifiers (SwinV2 paper, Table 1 / timm): B 88M, L 197M;
# SimMIM / SwinV2 papers: H 658M, G 3.0B.
@pytest.mark.parametrize("arch,published", [("swinv2_base", 88e6), ("swinv2_large", 197e6),
                                            ("swinv2_huge", 658e6), ("swinv2_giant", 3.0e9)])
def test_swinv2_parameter_counts_on_meta(arch, published):
    with torch.device("meta"):
        net = timm_model(ARCHS[arch], 192, num_classes=1000)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - published) / published < 0.02, (arch, n)


def test_swinv2_weight_decay_of_position_mlp_and_logit_scale():
    """"intended": the continuous-position-bias MLP and the logit scales take no weight decay;
    "released": the released code's prefixed keywords miss them in pre-training (they decay)."""
    model = build_simmim("swinv2_mini", 64, 32, window_size=2)
    names = {id(p): n for n, p in model.named_parameters()}
    for rule, exempt in (("intended", True), ("released", False)):
        decay, no_decay = param_groups(model, 0.05, "swinv2", rule)
        nd = {names[id(p)] for p in no_decay["params"]}
        d = {names[id(p)] for p in decay["params"]}
        special = {n for n in names.values() if "cpb_mlp.0.weight" in n or "logit_scale" in n}
        assert special and (special <= nd if exempt else special <= d), rule
        assert any(n.endswith("qkv.weight") for n in d)


def test_swinv2_finetune_at_another_window(tmp_path):
    """192/window 12-style change in small: 64 px window 2 -> window 4. Every weight loads as is
    (no table to resize); the position coordinates are normalised by the pre-training window."""
    torch.manual_seed(0)
    simmim = build_simmim("swinv2_mini", 64, 32, window_size=2)
    cfg = {"model": {"arch": "swinv2_mini", "window_size": 2}, "data": {"img_size": 64}}
    torch.save({"model": simmim.state_dict(), "config": cfg}, tmp_path / "c.pt")
    net = build_classifier("swinv2_mini", 64, 5, 4, 0.0)
    report = load_pretrained(net, tmp_path / "c.pt", "swinv2_mini")
    assert report["missing"] == ["head.fc.weight", "head.fc.bias"] and report["unexpected"] == []
    assert report["resized"] and "window 2 -> 4" in report["resized"][0]
    theirs = simmim.encoder.swin.state_dict()
    for k, v in net.state_dict().items():
        if not k.startswith("head") and k in theirs:
            assert torch.equal(v, theirs[k]), k
    attn = net.layers[0].blocks[0].attn
    assert attn.pretrained_window_size == (2, 2) and attn.window_size == (4, 4)
    # offset 1 gives the MLP the same input as in pre-training (offset 1 of window 2)
    pre = build_classifier("swinv2_mini", 64, 5, 2, 0.0).layers[0].blocks[0].attn.relative_coords_table
    table = attn.relative_coords_table  # (1, 7, 7, 2) over offsets -3..3
    torch.testing.assert_close(table[0, 4, 3], pre[0, 2, 1])
    logits = net(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    assert layer_id("layers.2.blocks.1.attn.qkv.weight", "swinv2_mini") == 6


def test_swinv2_recipes():
    from simmim.trainer.config import load_config

    c = load_config("swinv2_base_800ep")  # as released for SimMIM SwinV2-B
    assert (c.model.arch, c.data.img_size, c.model.window_size, c.model.drop_path, c.loss.norm_target) == \
        ("swinv2_base", 192, 12, 0.1, 47)
    assert (c.optim.base_lr, c.optim.warmup_lr, c.train.warmup_epochs, c.optim.scheduler, c.optim.milestones,
            c.optim.gamma, c.optim.weight_decay, c.train.epochs) == (1e-4, 5e-7, 10, "step", [700], 0.1, 0.05, 800)
    for name, gpus in (("swinv2_huge_800ep", 32), ("swinv2_giant_800ep", 64)):
        r = load_config(name)
        assert r.train.parallel == "fsdp" and r.data.batch_size * gpus == 2048
        assert (r.optim.base_lr, r.loss.norm_target, r.model.window_size) == (1e-4, 47, 12)
