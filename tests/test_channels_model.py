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
