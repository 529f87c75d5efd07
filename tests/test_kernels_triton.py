"""The fused Triton kernels against their fp32 references: forward and every gradient, awkward
shapes, all dtypes, outputs poisoned so unwritten elements fail. On CPU the kernels run in
Triton's interpreter (TRITON_INTERPRET=1, set by conftest); on a GPU machine, compiled."""
import math

import pytest
import torch

from simmim.kernels import (LossOptions, dispatch, mask_token_fill, mask_token_fill_ref, masked_loss,
                            masked_loss_ref)

pytestmark = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
# fp32 losses are sums over thousands of terms, reduced in another order than the reference's
SUM_TOL = TOL[torch.float32]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every float buffer the kernels allocate starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() and t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype).requires_grad_(grad)


# (B, h, w, s, D): Swin-B 192 (6x6 cells of 8x8 tokens, D 128), ViT-B 224 (7x7 cells of 2x2, D 768,
# trimmed), prime D, non-square grids, one token per cell; batch 1 to 3
FILL_SHAPES = [(1, 6, 6, 8, 128), (1, 7, 7, 2, 96), (1, 3, 5, 1, 7), (3, 4, 2, 3, 13), (2, 1, 1, 4, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,h,w,s,D", FILL_SHAPES)
def test_mask_token_fill(B, h, w, s, D, dtype):
    x = rand(B, h * s * w * s, D, dtype=dtype, grad=True)
    token = rand(D, grad=True)
    masks = torch.rand(B, h, w, device=DEVICE) < 0.6
    out = mask_token_fill(x, masks, token, backend="triton")
    want = mask_token_fill_ref(x.detach().float(), masks, token.detach())
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), want, **TOL[dtype])
    g = rand(*out.shape, dtype=dtype)
    gx, gt = torch.autograd.grad(out, (x, token), g)
    xr, tr = x.detach().float().requires_grad_(), token.detach().clone().requires_grad_()
    gxr, gtr = torch.autograd.grad(mask_token_fill_ref(xr, masks, tr), (xr, tr), g.float())
    assert not gx.isnan().any() and not gt.isnan().any()
    torch.testing.assert_close(gx.float(), gxr, **TOL[dtype])
    torch.testing.assert_close(gt, gtr, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * math.sqrt(x.shape[1]))


# (pred shape, mask grid): Swin 192/32, ViT 224/32, batch 1, prime channels, non-square, 1x1 cells
LOSS_SHAPES = [((1, 3, 192, 192), (6, 6)), ((1, 3, 224, 224), (7, 7)), ((2, 5, 28, 42), (4, 6)),
               ((1, 7, 13, 11), (13, 11)), ((3, 3, 32, 64), (1, 2))]
OPTIONS = [LossOptions(), LossOptions(kind="l2"), LossOptions(kind="smooth_l1", beta=0.3), LossOptions(all_pixels=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,grid", LOSS_SHAPES)
def test_masked_loss(shape, grid, dtype):
    for opts in OPTIONS if dtype == torch.float32 else OPTIONS[:1]:
        pred = rand(*shape, dtype=dtype, grad=True)
        target = rand(*shape)
        masks = torch.rand(shape[0], *grid, device=DEVICE) < 0.6
        got = masked_loss(pred, target, masks, opts, backend="triton")
        (g,) = torch.autograd.grad(got * 0.37, pred)  # upstream gradient != 1: the rescale path
        pr = pred.detach().float().requires_grad_()
        want = masked_loss_ref(pr, target, masks, opts)
        (gr,) = torch.autograd.grad(want * 0.37, pr)
        assert got.dtype == torch.float32 and not g.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # fp32 accumulation whatever the dtype
        torch.testing.assert_close(g.float(), gr.to(g.dtype).float(), **TOL[dtype])
        (g1,) = torch.autograd.grad(masked_loss(pred, target, masks, opts, backend="triton"), pred)
        torch.testing.assert_close(g1.float(), (gr / 0.37).to(g.dtype).float(), **TOL[dtype])


CL = torch.channels_last


@pytest.mark.parametrize("s,grid,layout", [(32, (2, 3), CL), (16, (2, 2), CL), (32, (2, 3), None)])
def test_masked_loss_reads_pre_pixelshuffle_layout(s, grid, layout):
    """The model's head output (B, 3*s*s, H/s, W/s) is channels-last (a 1x1 conv over
    channels-last features): read in place, its gradient written in the same layout."""
    target = rand(2, 3, 64, 96 if grid[1] == 3 else 64)
    pred = rand(2, 3 * s * s, target.shape[2] // s, target.shape[3] // s)
    pred = (pred.to(memory_format=layout) if layout else pred).requires_grad_()
    masks = torch.rand(2, *grid, device=DEVICE) < 0.5
    masks[0, 0, 0] = True
    got = masked_loss(pred, target, masks, backend="triton")
    (g,) = torch.autograd.grad(got, pred)
    shuffled = torch.nn.functional.pixel_shuffle(pred.detach(), s).requires_grad_()
    want = masked_loss_ref(shuffled, target, masks)
    (gr,) = torch.autograd.grad(want, shuffled)
    torch.testing.assert_close(got, want, **SUM_TOL)
    assert g.stride() == pred.stride()
    torch.testing.assert_close(torch.nn.functional.pixel_shuffle(g, s), gr)


@pytest.mark.parametrize("pred_layout,target_layout", [(CL, None), (None, CL), (CL, CL), ("slice", "slice")])
def test_masked_loss_any_strides(pred_layout, target_layout):
    """Channels-last pred and target are read through their strides (the gradient keeps pred's
    layout); a non-dense slice is copied once and still correct."""
    def make(layout, grad=False):
        t = rand(2, 3, 64, 80 if layout == "slice" else 64)
        t = t[..., 8:72] if layout == "slice" else t.to(memory_format=layout) if layout else t
        return t.requires_grad_(grad)

    pred, target = make(pred_layout, grad=True), make(target_layout)
    masks = torch.rand(2, 4, 4, device=DEVICE) < 0.6
    got = masked_loss(pred, target, masks, LossOptions(kind="l2"), backend="triton")
    (g,) = torch.autograd.grad(got, pred)
    pr = pred.detach().contiguous().requires_grad_()
    want = masked_loss_ref(pr, target.contiguous(), masks, LossOptions(kind="l2"))
    (gr,) = torch.autograd.grad(want, pr)
    torch.testing.assert_close(got, want, **SUM_TOL)
    torch.testing.assert_close(g, gr)
    if pred_layout == CL:
        assert g.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_norm_target_matches(loss):
    """Per-window normalised targets: the loss and its gradient (the target is a constant)."""
    pred, target = rand(2, 3, 32, 32, grad=True), rand(2, 3, 32, 32)
    masks = torch.rand(2, 4, 4, device=DEVICE) < 0.6
    got = masked_loss(pred, target, masks, LossOptions(kind=loss, norm_target=7), backend="triton")
    (g,) = torch.autograd.grad(got, pred)
    pr = pred.detach().clone().requires_grad_()
    want = masked_loss_ref(pr, target, masks, LossOptions(kind=loss, norm_target=7))
    (gr,) = torch.autograd.grad(want, pr)
    torch.testing.assert_close(got, want, **SUM_TOL)
    torch.testing.assert_close(g, gr)
    assert g.abs().sum() > 0


def test_unmasked_cells_cost_nothing_and_no_grad_forward():
    pred, target = rand(2, 3, 64, 64, grad=True), rand(2, 3, 64, 64)
    none = torch.zeros(2, 2, 2, dtype=torch.bool, device=DEVICE)
    loss = masked_loss(pred, target, none, backend="triton")
    (g,) = torch.autograd.grad(loss, pred)
    assert loss.item() == 0 and (g == 0).all()
    with torch.no_grad():
        val = masked_loss(pred, target, ~none, backend="triton")
    torch.testing.assert_close(val, masked_loss_ref(pred.detach(), target, ~none), **SUM_TOL)


def test_deterministic():
    pred, target = rand(4, 3, 96, 96, grad=True), rand(4, 3, 96, 96)
    masks = torch.rand(4, 3, 3, device=DEVICE) < 0.6
    runs = [masked_loss(pred, target, masks, backend="triton") for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)


def test_dispatch(monkeypatch):
    x = rand(1, 4, 2)
    m = torch.ones(1, 2, 2, dtype=torch.bool, device=DEVICE)
    assert dispatch.use_triton(x, backend="auto") == x.is_cuda
    assert not dispatch.use_triton(x, backend="reference")
    monkeypatch.setenv("SIMMIM_KERNELS", "bogus")
    with pytest.raises(ValueError, match="SIMMIM_KERNELS"):
        mask_token_fill(x, m, torch.zeros(2, device=DEVICE))
    monkeypatch.setenv("SIMMIM_KERNELS", "reference")
    with dispatch.use_backend("triton"):
        assert dispatch.use_triton(x) == (dispatch.interpreting() or x.is_cuda)


@pytest.mark.parametrize("fused_shuffle,head,target_size", [(False, "linear", 0), (True, "linear", 0),
                                                             (True, "mlp", 32), (True, "inverse_swin_t", 0),
                                                             (False, "inverse_swin_t", 16)])
def test_model_uses_kernels_and_matches_reference(fused_shuffle, head, target_size):
    from simmim.trainer.model import build_simmim

    torch.manual_seed(0)
    model = build_simmim("vit_micro", 64, 32, fused_shuffle=fused_shuffle, head=head,
                         loss=LossOptions(target_size=target_size)).to(DEVICE)
    x = rand(2, 3, 64, 64)
    masks = torch.rand(2, 2, 2, device=DEVICE) < 0.6
    grads = []
    for backend in ("triton", "reference"):
        model.zero_grad()
        with dispatch.use_backend(backend):
            loss = model(x, masks)
        loss.backward()
        grads.append((loss.detach(), model.encoder.mask_token.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph():
    """The ops are opaque custom ops with fake and autograd registrations: fullgraph=True fails on
    any graph break. On CPU the aot_eager backend traces them (the interpreter cannot be compiled);
    on a GPU, inductor compiles the surrounding graph."""
    torch._dynamo.reset()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def step(x, token, pred, target, masks, kernels="triton"):
        filled = mask_token_fill(x, masks, token, backend=kernels)
        return masked_loss(pred * 2, target, masks, backend=kernels) + filled.square().mean()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    x, token = rand(2, 16, 8, grad=True), rand(8, grad=True)
    pred, target = rand(2, 3, 64, 64, grad=True), rand(2, 3, 64, 64)
    masks = torch.rand(2, 2, 2, device=DEVICE) < 0.5
    got = compiled(x, token, pred, target, masks)
    grads = torch.autograd.grad(got, (x, token, pred))
    want = step(x, token, pred, target, masks, kernels="reference")
    wants = torch.autograd.grad(want, (x, token, pred))
    torch.testing.assert_close(got, want, **SUM_TOL)
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b)


def plain_masked_loss(pred_px: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, f) -> torch.Tensor:
    """The paper's formula written out with a pixel-resolution mask (the kernels never build one):
    pred_px and target (B, C, T, T'), f elementwise (B, C, T, T') -> values."""
    B, C, H, W = target.shape
    m = masks.float().repeat_interleave(H // masks.shape[1], 1).repeat_interleave(W // masks.shape[2], 2)
    return (f(pred_px.float(), target.float()) * m[:, None]).sum() / (m.sum() + 1e-5) / C


# (B, image, token grid g, mask grid, target T): the paper's Table 4 at Swin-B 192 (g = 6, targets
# 6^2 ... 192^2), ViT-B 224 (g = 14, 7x7 cells), and awkward ones: prime grids, non-power-of-two
# pixels per token, batch 1 and 3, a mask grid finer than the token grid
TARGET_SHAPES = [(2, 192, 6, 6, 6), (1, 192, 6, 6, 12), (2, 192, 6, 6, 24), (1, 192, 6, 6, 48),
                 (1, 192, 6, 6, 96), (1, 192, 6, 6, 192), (1, 224, 14, 7, 28), (3, 45, 5, 3, 15),
                 (1, 35, 7, 7, 35), (2, 66, 2, 6, 6)]


@pytest.mark.parametrize("B,size,g,mg,T", TARGET_SHAPES)
@pytest.mark.parametrize("layout", [CL, None])
def test_masked_loss_at_every_target_size(B, size, g, mg, T, layout):
    """loss.target_size: the head's pre-shuffle output (B, 3*p*p, g, g), p = T/g, against the
    image average-pooled to T x T, masked at T/mg pixels per cell: the fused kernel's loss and
    gradient equal the formula written out in plain PyTorch (upstream gradient 0.37: the rescale)."""
    from simmim.kernels import loss_target

    p = T // g
    images = rand(B, 3, size, size)
    target = loss_target(images, LossOptions(target_size=T))
    assert target.shape == (B, 3, T, T)
    pooled = images.view(B, 3, T, size // T, T, size // T).mean(dim=(3, 5))
    torch.testing.assert_close(target, pooled)
    pred = rand(B, 3 * p * p, g, g)
    pred = (pred.to(memory_format=layout) if layout else pred).requires_grad_()
    masks = torch.rand(B, mg, mg, device=DEVICE) < 0.6
    masks[0, 0, 0] = True
    got = masked_loss(pred, target, masks, backend="triton")
    (grad,) = torch.autograd.grad(got * 0.37, pred)
    pr = pred.detach().clone().requires_grad_()
    want = plain_masked_loss(torch.nn.functional.pixel_shuffle(pr, p), pooled, masks, lambda a, b: (a - b).abs())
    (gr,) = torch.autograd.grad(want * 0.37, pr)
    torch.testing.assert_close(got, want, **SUM_TOL)
    assert grad.stride() == pred.stride() and not grad.isnan().any()
    torch.testing.assert_close(grad, gr)


@pytest.mark.parametrize("bins", [8, 256, 5])
@pytest.mark.parametrize("B,size,mg,T,p", [(2, 32, 2, 0, 1), (1, 24, 3, 12, 2), (3, 20, 5, 10, 5)])
def test_bins_cross_entropy_equals_plain_reference(bins, B, size, mg, T, p):
    """loss.kind=bins: 0-255 colours binned exactly (bin = value * bins // 256, whatever float
    error normalisation left), and the masked cross-entropy and its gradient equal the formula
    written out, on every backend, from the shuffled or pre-shuffle head layout."""
    from simmim.kernels import loss_target

    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    colours = torch.randint(0, 256, (B, 3, size, size))
    colours[0, 0, 0, :2] = torch.tensor([0, 255])
    images = (colours / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    opts = LossOptions(kind="bins", bins=bins, target_size=T)
    target = loss_target(images.to(DEVICE), opts, mean.to(DEVICE), std.to(DEVICE))
    t = T or size
    if not T:
        assert torch.equal(target.cpu(), colours * bins // 256)
    else:  # pooled colours, binned: the mean of the window's 0-255 values, rounded
        pooled = colours.float().view(B, 3, t, size // t, t, size // t).mean(dim=(3, 5))
        assert (target.cpu() - torch.div(pooled.round() * bins, 256, rounding_mode="floor")).abs().max() <= 1
    logits = rand(B, 3 * bins * p * p, t // p, t // p, grad=True)
    masks = torch.rand(B, mg, mg, device=DEVICE) < 0.6
    masks[0, 0, 0] = True
    lr = logits.detach().clone().requires_grad_()
    shuffled = torch.nn.functional.pixel_shuffle(lr, p).view(B, 3, bins, t, t)
    nll = -shuffled.log_softmax(2).gather(2, target[:, :, None]).squeeze(2)  # (B, 3, t, t)
    want = plain_masked_loss(nll, torch.zeros_like(nll), masks, lambda a, b: a)
    (gr,) = torch.autograd.grad(want, lr)
    for backend in ("triton", "reference"):
        got = masked_loss(logits, target, masks, opts, backend=backend)
        (g,) = torch.autograd.grad(got, logits)
        torch.testing.assert_close(got, want, **SUM_TOL)
        torch.testing.assert_close(g, gr)
