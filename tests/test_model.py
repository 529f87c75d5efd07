import pytest
import torch

from simmim.pipeline.masking import MaskGenerator
from simmim.kernels import LossOptions
from simmim.trainer.model import ARCHS, build_simmim, param_groups


@pytest.mark.parametrize("arch,size", [("swin_micro", 128), ("vit_micro", 64), ("swin_micro", 64)])
def test_forward_backward_shapes(arch, size):
    torch.manual_seed(0)
    model = build_simmim(arch, size, 32, window_size=2 if size == 64 and arch.startswith("swin") else 0)
    x = torch.randn(2, 3, size, size)
    masks = MaskGenerator(size, 32, 0.6).sample(2)
    loss, pred = model(x, masks, return_pred=True)
    assert loss.dim() == 0 and pred.shape == x.shape
    loss.backward()
    assert model.encoder.mask_token.grad is not None and model.encoder.mask_token.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("arch,size,stride,params", [("swin_base", 192, 32, 86_725_304),
                                                     ("vit_base", 224, 16, 85_666_128)])
def test_paper_models_build_and_run(arch, size, stride, params):
    """The full-size encoders of the paper, built, run forward and backward on the meta device
    (shapes only: no memory, no compute); their parameter counts exactly."""
    with torch.device("meta"):
        model = build_simmim(arch, size, 32)
        x = torch.empty(2, 3, size, size)
    assert model.stride == stride
    head = model.decoder[0]
    assert head.out_channels == stride * stride * 3 and head.kernel_size == (1, 1)
    masks = MaskGenerator(size, 32, 0.6).sample(2).to("meta")
    with torch.no_grad():
        feats = model.encoder(x, masks)
    assert feats.shape == (2, model.encoder.num_features, size // stride, size // stride)
    loss = model(x, masks)
    loss.backward()
    assert loss.shape == () and all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert sum(p.numel() for p in model.encoder.parameters()) == params  # Swin-B ~88M, ViT-B ~86M


def test_mask_token_changes_only_masked_regions_input():
    """Masked pixels must not leak into the encoder: changing them leaves the output unchanged."""
    torch.manual_seed(0)
    model = build_simmim("vit_micro", 64, 32).eval()
    masks = torch.tensor([[[True, False], [False, True]]])
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, :32, :32] += 5.0  # inside a masked cell
    with torch.no_grad():
        _, p1 = model(x, masks, return_pred=True)
        _, p2 = model(y, masks, return_pred=True)
        z = x.clone()
        z[:, :, :32, 32:] += 5.0  # inside a visible cell
        _, p3 = model(z, masks, return_pred=True)
    torch.testing.assert_close(p1, p2)
    assert not torch.allclose(p1, p3)


def test_weight_decay_groups():
    model = build_simmim("swin_micro", 128, 32, window_size=4)
    decay, no_decay = param_groups(model, 0.05, "swin", rule="intended")
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "encoder.mask_token" in nd
    assert any("relative_position_bias_table" in n for n in nd)
    assert all(not n.endswith(".bias") and "norm" not in n for n in d)
    assert any(n.endswith("qkv.weight") for n in d) and "decoder.0.weight" in d
    vit = build_simmim("vit_micro", 64, 32)
    vnames = {id(p): n for n, p in vit.named_parameters()}
    vnd = {vnames[id(p)] for p in param_groups(vit, 0.05, "vit", rule="intended")[1]["params"]}
    assert {"encoder.vit.rel_pos_bias.relative_position_bias_table", "encoder.vit.cls_token",
            "encoder.mask_token"} <= vnd


@pytest.mark.parametrize("kwargs", [dict(arch="nope", img_size=192, mask_patch_size=32),
                                    dict(arch="swin_base", img_size=192, mask_patch_size=30),
                                    dict(arch="swin_base", img_size=160, mask_patch_size=32, window_size=7),
                                    dict(arch="vit_micro", img_size=64, mask_patch_size=32,
                                         loss=LossOptions(kind="l3")),
                                    dict(arch="vit_micro", img_size=64, mask_patch_size=32,
                                         loss=LossOptions(norm_target=4))])
def test_bad_model_arguments(kwargs):
    with pytest.raises(ValueError):
        build_simmim(**kwargs)


def test_archs_are_complete():
    assert {"swin_base", "swin_large", "vit_base"} <= set(ARCHS)


@pytest.mark.parametrize("arch,size,window", [("swin_micro", 64, 2), ("vit_micro", 64, 0)])
def test_activation_checkpointing_same_gradients(arch, size, window):
    torch.manual_seed(0)
    model = build_simmim(arch, size, 32, window_size=window)
    x = torch.randn(2, 3, size, size)
    masks = MaskGenerator(size, 32, 0.6).sample(2, generator=torch.Generator().manual_seed(0))
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.encoder.set_grad_checkpointing(enable)
        model(x, masks).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])
