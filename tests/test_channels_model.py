"""Grey (1-channel) and multi-channel (N) images on the model side: the encoder's patch embedding
takes C channels, the head predicts stride^2 * C values per token, the masked loss is normalised by
C, and the fused kernel equals its reference for C = 1 and C = 5 (Triton's interpreter on CPU)."""
import pytest
import torch

from simmim.kernels import LossOptions, dispatch, loss_target, masked_loss, masked_loss_ref
from simmim.pipeline.masking import MaskGenerator
from simmim.trainer.model import build_simmim

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last
needs_triton = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="Triton is not installed")


def tiny(arch: str, chans: int, **kw):
    """A CPU-sized SimMIM model at 64 px for `chans`-channel images."""
    window = 2 if arch.startswith("swin") else 0
    return build_simmim(arch, 64, 32, window, in_chans=chans, **kw)


def paper_formula(pred: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """sum(|pred - img| * m) / (sum(m) + 1e-5) / C with m the pixel mask counted once per pixel."""
    B, C, H, W = images.shape
    m = masks.float().repeat_interleave(H // masks.shape[1], 1).repeat_interleave(W // masks.shape[2], 2)
    return ((pred.float() - images.float()).abs() * m[:, None]).sum() / (m.sum() + 1e-5) / C


@pytest.mark.parametrize("arch", ["swin_micro", "vit_micro"])
@pytest.mark.parametrize("chans", [1, 5])
def test_forward_backward(arch, chans):
    """The patch embedding takes C channels, the head predicts stride^2 * C values per token, the
    prediction is (B, C, H, W), the loss is the paper's formula over C channels, every parameter
    gets a gradient."""
    torch.manual_seed(0)
    model = tiny(arch, chans)
    net = model.encoder.swin if arch.startswith("swin") else model.encoder.vit
    assert net.patch_embed.proj.in_channels == chans
    assert model.decoder[0].out_channels == model.stride ** 2 * chans
    x = torch.randn(2, chans, 64, 64)
    masks = MaskGenerator(64, 32, 0.6).sample(2)
    with dispatch.use_backend("reference"):
        loss, pred = model(x, masks, return_pred=True)
    assert pred.shape == x.shape
    torch.testing.assert_close(loss, paper_formula(pred, x, masks), rtol=1e-5, atol=1e-6)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    with pytest.raises(RuntimeError):  # a 3-channel batch does not fit a C-channel encoder
        model(torch.randn(2, 3, 64, 64), masks)


@needs_triton
@pytest.mark.parametrize("chans", [1, 5])
@pytest.mark.parametrize("opts", [LossOptions(), LossOptions(kind="l2"), LossOptions(kind="smooth_l1", beta=0.3),
                                  LossOptions(all_pixels=True), LossOptions(norm_target=3)])
@pytest.mark.parametrize("layout", [CL, None])
def test_kernel_equals_reference(chans, opts, layout):
    """The fused loss on the head's pre-shuffle output (B, C*s*s, g, g), channels-last as the 1x1 conv
    writes it or contiguous, against the reference: loss and gradient (upstream gradient 0.37)."""
    B, s, g = 2, 8, 3
    pred = torch.randn(B, chans * s * s, g, g, device=DEVICE)
    pred = (pred.to(memory_format=layout) if layout else pred).requires_grad_()
    target = torch.randn(B, chans, s * g, s * g, device=DEVICE)
    masks = torch.rand(B, 3, 3, device=DEVICE) < 0.6
    masks[0, 0, 0] = True
    got = masked_loss(pred, target, masks, opts, backend="triton")
    (grad,) = torch.autograd.grad(got * 0.37, pred)
    pr = pred.detach().clone().requires_grad_()
    want = masked_loss_ref(pr, target, masks, opts)
    (gr,) = torch.autograd.grad(want * 0.37, pr)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grad.stride() == pred.stride()
    torch.testing.assert_close(grad, gr)
    if opts == LossOptions():
        torch.testing.assert_close(want, paper_formula(torch.nn.functional.pixel_shuffle(pr, s), target, masks))


@needs_triton
@pytest.mark.parametrize("chans", [1, 5])
@pytest.mark.parametrize("head,target_size", [("linear", 0), ("mlp", 16)])
def test_model_kernel_equals_reference(chans, head, target_size):
    """A C-channel model's loss and mask-token gradient: the fused kernels against the references."""
    torch.manual_seed(0)
    model = tiny("vit_micro", chans, head=head, loss=LossOptions(target_size=target_size)).to(DEVICE)
    x = torch.randn(2, chans, 64, 64, device=DEVICE)
    masks = torch.rand(2, 2, 2, device=DEVICE) < 0.6
    masks[0, 0, 0] = True
    out = []
    for backend in ("triton", "reference"):
        model.zero_grad()
        with dispatch.use_backend(backend):
            loss = model(x, masks)
        loss.backward()
        out.append((loss.detach(), model.encoder.mask_token.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chans", [1, 5])
def test_bins_per_channel(chans):
    """loss.kind=bins with C channels: C * bins logits per pixel, targets binned with the C-channel
    mean / std, and the prediction returned as a C-channel normalised image."""
    mean, std = tuple(0.1 * (i + 1) for i in range(chans)), tuple(0.2 + 0.05 * i for i in range(chans))
    model = tiny("swin_micro", chans, loss=LossOptions(kind="bins", bins=8), mean=mean, std=std)
    assert model.decoder[0].out_channels == 32 * 32 * chans * 8
    values = torch.randint(0, 256, (2, chans, 64, 64))
    x = (values / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    target = loss_target(x, model.loss_options, model.mean, model.std)
    assert torch.equal(target, values * 8 // 256)
    masks = MaskGenerator(64, 32, 0.6).sample(2)
    loss, pred = model(x, masks, return_pred=True)
    assert torch.isfinite(loss) and pred.shape == x.shape


def test_mean_std_must_fit_the_channels():
    with pytest.raises(ValueError, match="one value per channel"):
        tiny("vit_micro", 1, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


# ---------------------------------------------------------------- checkpoints, export, init_from, figures

GREY_STATS = {"mean": [0.31], "std": [0.22]}
PENTA_STATS = {"mean": [0.1, 0.2, 0.3, 0.4, 0.5], "std": [0.11, 0.12, 0.13, 0.14, 0.15]}


def pretraining_checkpoint(path, arch: str, chans: int, stats: dict | None = None):
    """A simmim pre-training checkpoint file of a `chans`-channel model, as `loop.fit` writes one
    (model, config, the run's normalisation); returns the model."""
    torch.manual_seed(0)
    model = tiny(arch, chans)
    config = {"model": {"arch": arch, "window_size": 2 if arch.startswith("swin") else 0},
              "data": {"img_size": 64, "mask_patch_size": 32, "channels": chans}}
    extra = {"normalization": {"channels": chans, **stats}} if stats else {}
    torch.save({"model": model.state_dict(), "config": config, "train_state": {}, **extra}, path)
    return model


@pytest.mark.parametrize("chans,stats", [(1, GREY_STATS), (5, PENTA_STATS)])
def test_checkpoint_records_channels_and_normalisation(tmp_path, chans, stats):
    from simmim.trainer.checkpoint_reader import read_checkpoint

    pretraining_checkpoint(tmp_path / "c.pt", "swin_micro", chans, stats)
    contents = read_checkpoint(tmp_path / "c.pt")
    assert contents.settings["in_chans"] == chans
    assert contents.normalization() == (tuple(stats["mean"]), tuple(stats["std"]))


@pytest.mark.parametrize("arch", ["swin_micro", "vit_micro"])
def test_export_loads_in_timm_with_one_channel(tmp_path, arch):
    """`simmim export` of a grey encoder: config.json says in_chans 1, input size (1, 64, 64) and the
    run's mean / std; timm rebuilds it from the folder (local-dir:) and from the weights file under
    the registered architecture (pretrained_cfg_overlay), with identical features."""
    import json

    import timm

    from simmim.trainer.export import TIMM_ARCHITECTURES, export

    model = pretraining_checkpoint(tmp_path / "c.pt", arch, 1, GREY_STATS).eval()
    out = export(tmp_path / "c.pt", tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["in_chans"] == 1 and config["pretrained_cfg"]["input_size"] == [1, 64, 64]
    assert (config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"]) == (GREY_STATS["mean"],
                                                                                   GREY_STATS["std"])
    net = model.encoder.swin if arch.startswith("swin") else model.encoder.vit
    x = torch.randn(2, 1, 64, 64)
    family = "swin" if arch.startswith("swin") else "vit"
    data = {k: config["pretrained_cfg"][k] for k in ("input_size", "mean", "std")}  # else the template's
    loaded = [timm.create_model(f"local-dir:{out}", pretrained=True),
              timm.create_model(TIMM_ARCHITECTURES[family], pretrained=True, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), **data))]
    with torch.no_grad():
        want = net.forward_features(x)
        for theirs in loaded:
            assert theirs.patch_embed.proj.in_channels == 1
            assert torch.equal(theirs.eval().forward_features(x), want)
            assert list(timm.data.resolve_data_config({}, model=theirs)["mean"]) == GREY_STATS["mean"]


def test_rgb_checkpoint_adapts_to_a_grey_encoder(tmp_path, caplog):
    """model.init_from (and finetune.pretrained) of an RGB checkpoint into a grey encoder: the patch
    embedding's three filters summed (timm's adapt_input_conv), so a grey image embeds as the RGB
    encoder embeds it replicated to R = G = B; said in the one-line load summary."""
    import logging

    from simmim.trainer.finetune import build_classifier, load_pretrained
    from simmim.trainer.pretrain import init_from

    rgb = pretraining_checkpoint(tmp_path / "rgb.pt", "swin_micro", 3)
    grey = tiny("swin_micro", 1)
    with caplog.at_level(logging.INFO, logger="simmim"):
        init_from(grey, str(tmp_path / "rgb.pt"), "swin_micro", None)
    line = next(r.getMessage() for r in caplog.records if "encoder loaded" in r.getMessage())
    assert "patch embedding adapted from 3 to 1 channels" in line
    g = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey.encoder.swin.patch_embed(g), rgb.encoder.swin.patch_embed(g.expand(-1, 3, -1, -1)))
    for k, v in rgb.encoder.swin.state_dict().items():  # everything but the patch embedding as it was
        if k != "patch_embed.proj.weight":
            assert torch.equal(grey.encoder.swin.state_dict()[k], v), k
    net = build_classifier("swin_micro", 64, 5, 2, 0.0, in_chans=1)
    report = load_pretrained(net, tmp_path / "rgb.pt", "swin_micro")
    assert report["adapted"].startswith("patch embedding adapted from 3 to 1")
    assert report["missing"] == ["head.fc.weight", "head.fc.bias"]


def test_channels_it_cannot_adapt_are_one_line(tmp_path):
    from simmim.core.errors import CheckpointError
    from simmim.trainer.finetune import build_classifier, load_pretrained
    from simmim.trainer.pretrain import init_from

    pretraining_checkpoint(tmp_path / "penta.pt", "vit_micro", 5, PENTA_STATS)
    with pytest.raises(CheckpointError, match="holds a 5-channel encoder; this model takes 3-channel") as e:
        init_from(tiny("vit_micro", 3), str(tmp_path / "penta.pt"), "vit_micro", None)
    assert "\n" not in str(e.value) and "data.channels=5" in str(e.value)
    report = load_pretrained(build_classifier("vit_micro", 64, 4, 0, 0.0, in_chans=5), tmp_path / "penta.pt",
                             "vit_micro")
    assert report["adapted"] == "" and report["missing"] == ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("chans", [1, 5])
def test_training_figure_for_grey_and_multichannel(tmp_path, chans):
    """The pre-training figure of a C-channel batch: a PNG; grey panels are 2-D (grey colormap),
    five channels show their first three."""
    from PIL import Image

    from simmim.trainer.visualize import reconstruction_panels, save_reconstruction

    stats = GREY_STATS if chans == 1 else PENTA_STATS
    model = tiny("swin_micro", chans, mean=stats["mean"], std=stats["std"]).eval()
    x = torch.randn(3, chans, 64, 64)
    masks = MaskGenerator(64, 32, 0.6).sample(3)
    with torch.no_grad():
        _, pred = model(x, masks, return_pred=True)
    panels = reconstruction_panels(x, masks, pred, stats["mean"], stats["std"])
    assert all(p.shape == ((3, 64, 64) if chans == 1 else (3, 64, 64, 3)) for p in panels)
    original = (x * torch.tensor(stats["std"]).view(1, -1, 1, 1) + torch.tensor(stats["mean"]).view(1, -1, 1, 1))
    want = original.clamp(0, 1)[:, 0] if chans == 1 else original.clamp(0, 1)[:, :3].permute(0, 2, 3, 1)
    torch.testing.assert_close(panels[0], want)
    path = save_reconstruction(x, masks, pred, stats["mean"], stats["std"], tmp_path / "fig.png", "t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100


@pytest.mark.parametrize("chans", [1, 5])
def test_reconstruct_figure_for_grey_and_multichannel(tmp_path, chans):
    """`simmim reconstruct` of a C-channel checkpoint: its channels and normalisation read from the
    checkpoint, the inputs read as C-channel images (a grey PNG and a .npy for C = 1, .npy arrays
    for C = 5), normalised with the run's mean / std, a PNG written."""
    import numpy as np
    from PIL import Image

    from simmim.trainer.reconstruct import evaluation_input, load_pretrained_model, reconstruct

    stats = GREY_STATS if chans == 1 else PENTA_STATS
    pretraining_checkpoint(tmp_path / "c.pt", "swin_micro", chans, stats)
    pre = load_pretrained_model(tmp_path / "c.pt")
    assert (pre.in_chans, pre.mean, pre.std) == (chans, tuple(stats["mean"]), tuple(stats["std"]))
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    np.save(folder / "a.npy", rng.integers(0, 65535, (80, 72, chans), dtype=np.uint16))
    if chans == 1:
        Image.fromarray(rng.integers(0, 255, (70, 90), dtype=np.uint8), "L").save(folder / "b.png")
    x = evaluation_input(folder / "a.npy", 64, chans, pre.mean, pre.std)
    assert x.shape == (chans, 64, 64) and x.dtype == torch.float32
    out = reconstruct(str(tmp_path / "c.pt"), [str(folder)], str(tmp_path / "fig.png"), device="cpu")
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_rgb_checkpoint_without_a_record_is_imagenet(tmp_path):
    """An RGB checkpoint that records no normalisation (older runs) is read as ImageNet's."""
    from simmim.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
    from simmim.trainer.reconstruct import load_pretrained_model

    pretraining_checkpoint(tmp_path / "c.pt", "vit_micro", 3)
    pre = load_pretrained_model(tmp_path / "c.pt")
    assert (pre.in_chans, pre.mean, pre.std) == (3, IMAGENET_MEAN, IMAGENET_STD)


def test_evaluate_a_grey_classifier_from_its_tensors(tmp_path, caplog):
    """`simmim evaluate` of another framework's grey fine-tuned weights (a bare state dict, no
    config): the classifier takes the channel count its patch embedding has, and reads the
    validation images as grey."""
    import numpy as np
    from PIL import Image

    from simmim.trainer.finetune import build_classifier, evaluate_checkpoint

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), "L").save(tmp_path / "val" / name / f"{i}.png")
    torch.manual_seed(0)
    net = build_classifier("swin_micro", 64, 2, 2, 0.0, in_chans=1)
    torch.save(net.state_dict(), tmp_path / "grey.pt")
    caplog.set_level("INFO", logger="simmim")
    result = evaluate_checkpoint(str(tmp_path / "grey.pt"), str(tmp_path / "val"), "torch",
                                 ["model.arch=swin_micro", "data.num_workers=0", "data.batch_size=4",
                                  "train.device=cpu", "data.mean=[0.5]", "data.std=[0.25]"])
    assert result["val_images"] == 6
    assert not [r for r in caplog.records if "adapted" in r.getMessage()]  # a 3-channel classifier would adapt
