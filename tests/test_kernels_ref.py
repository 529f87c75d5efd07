import pytest
import torch

from simmim.kernels import mask_token_fill, masked_loss


def loss_by_formula(pred, target, masks):
    """sum(|pred - target| * m) / (sum(m) + 1e-5) / C with m materialised at pixel resolution."""
    B, C, H, W = pred.shape
    sy, sx = H // masks.shape[1], W // masks.shape[2]
    m = masks.float().repeat_interleave(sy, 1).repeat_interleave(sx, 2)[:, None]  # (B, 1, H, W)
    return ((pred - target).abs() * m).sum() / (m.sum() + 1e-5) / C


@pytest.mark.parametrize("shape,grid", [((2, 3, 192, 192), (6, 6)), ((1, 3, 224, 224), (7, 7)),
                                        ((3, 5, 28, 42), (4, 6)), ((2, 7, 13, 11), (13, 11))])
def test_masked_l1_matches_formula_with_grads(shape, grid):
    pred = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(shape, dtype=torch.float64)
    masks = torch.rand(shape[0], *grid) < 0.6
    masks[0, 0, 0] = True
    got = masked_loss(pred, target, masks)
    (g_got,) = torch.autograd.grad(got, pred)
    pred2 = pred.detach().clone().requires_grad_(True)
    want = loss_by_formula(pred2, target, masks)
    (g_want,) = torch.autograd.grad(want, pred2)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-5, atol=1e-9)
    unmasked = ~masks.repeat_interleave(shape[2] // grid[0], 1).repeat_interleave(shape[3] // grid[1], 2)
    assert (g_got.permute(1, 0, 2, 3)[:, unmasked] == 0).all()


def test_masked_l1_no_mask_is_zero_and_bad_shapes():
    x = torch.randn(2, 3, 64, 64)
    assert masked_loss(x, x + 1, torch.zeros(2, 2, 2, dtype=torch.bool)) == 0
    with pytest.raises(ValueError):
        masked_loss(x, x, torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        masked_loss(x, x[:, :2], torch.zeros(2, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("B,h,w,s,D", [(2, 6, 6, 8, 16), (1, 7, 7, 2, 5), (3, 3, 5, 1, 7), (2, 4, 2, 3, 13)])
def test_mask_token_fill_touches_exactly_masked_cells(B, h, w, s, D):
    x = torch.randn(B, h * s * w * s, D, requires_grad=True)
    token = torch.randn(D, requires_grad=True)
    masks = torch.rand(B, h, w) < 0.5
    out = mask_token_fill(x, masks, token)
    # independent token-resolution mask, row-major over an (h*s) x (w*s) grid
    tok_mask = masks.repeat_interleave(s, 1).repeat_interleave(s, 2).reshape(B, -1)
    assert torch.equal(out[tok_mask], token.detach().expand(int(tok_mask.sum()), D))
    assert torch.equal(out[~tok_mask], x.detach()[~tok_mask])
    g = torch.randn_like(out)
    gx, gt = torch.autograd.grad(out, (x, token), g)
    assert torch.equal(gx[tok_mask], torch.zeros_like(gx[tok_mask]))
    assert torch.equal(gx[~tok_mask], g[~tok_mask])
    # a sum of ~1000 fp32 terms: summation order alone moves it by ~1e-5, so compare to fp64
    torch.testing.assert_close(gt, g[tok_mask].double().sum(0).float(), rtol=1e-5, atol=1e-4)


def test_mask_token_fill_bad_grid():
    with pytest.raises(ValueError):
        mask_token_fill(torch.randn(1, 10, 4), torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(4))


@pytest.mark.parametrize("dynamic", [False, True])
def test_references_compile_without_graph_breaks(dynamic):
    """`simmim bench kernels` times torch.compile of the references against the fused kernels: a
    graph break (e.g. math.isqrt on a symbolic size) would time a split graph, not the best that
    the compiler does. fullgraph=True raises on any break; the "eager" backend keeps this on the
    CPU in seconds. Two shapes per reference, as the benchmark's two models, and the results equal
    the uncompiled reference's."""
    from simmim.kernels.mask_fill import mask_token_fill_ref
    from simmim.kernels.loss import masked_loss_ref

    g = torch.Generator().manual_seed(0)
    for (B, h, w, s, D, stride) in ((2, 6, 6, 8, 16, 32), (3, 7, 7, 2, 24, 16)):
        masks = torch.rand(B, h, w, generator=g) < 0.6
        x = torch.randn(B, h * s * w * s, D, generator=g)
        token = torch.randn(D, generator=g)
        target = torch.randn(B, 3, h * stride, w * stride, generator=g)
        pred = torch.randn(B, 3, h * stride, w * stride, generator=g)
        head = torch.randn(B, 3 * stride * stride, h, w, generator=g).to(memory_format=torch.channels_last)
        for ref, args in ((mask_token_fill_ref, (x, masks, token)), (masked_loss_ref, (pred, target, masks)),
                          (masked_loss_ref, (head, target, masks))):
            torch._dynamo.reset()
            compiled = torch.compile(ref, backend="eager", fullgraph=True, dynamic=dynamic)
            torch.testing.assert_close(compiled(*args), ref(*args), rtol=0, atol=0)
