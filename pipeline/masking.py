"""SimMIM's masks (random, the paper's square, BEiT's block-wise) and the paper's AvgDist statistic.

A mask is a bool tensor (B, h, w) at mask-cell resolution, True = masked. Every consumer (the
model, the kernels, the figures) expands it by index arithmetic; nothing here builds a
pixel-resolution mask except `avg_dist`, which is an analysis tool.

The strategies (`data.mask_strategy`), the ablations of the paper's Table 1 / Figure 3:
- random: exactly ceil(r * cells) cells, uniformly without replacement (the paper's default).
- square: one axis-aligned square of side round(sqrt(r * cells)) cells (rounded half up, at most
  the grid's shorter side), uniformly placed; it masks side^2 cells, so the masked fraction is
  side^2 / cells, not r. On the paper's 6x6 grid (192 px, 32 px cells), for r = 0.1 ... 0.9:
  side 2, 3, 3, 4, 4, 5, 5, 5, 6 -> 4, 9, 9, 16, 16, 25, 25, 25, 36 of 36 cells
  (0.11, 0.25, 0.25, 0.44, 0.44, 0.69, 0.69, 0.69, 1.0). The paper's "central region" masking,
  relaxed to a random position.
- block: BEiT's block-wise masking (Bao et al. 2022, Algorithm 1; `MaskingGenerator` of its code)
  at cell resolution, reaching exactly ceil(r * cells) cells (see `block_masks`).

Every strategy draws a whole batch with a few tensor operations on the generator's device (no
loop over samples), so `GlobalBatchMasks` draws an optimizer step's global batch in one call.
"""
from __future__ import annotations

import math

import torch

MASK_STRATEGIES = ("random", "square", "block")  # data.mask_strategy
BLOCK_MIN_CELLS = 16  # BEiT's min_num_patches (its pre-training recipe's --min_mask_patches_per_block)
BLOCK_ASPECT = 0.3  # BEiT's min_aspect: aspect ratios log-uniform in [0.3, 1/0.3]
BLOCK_TRIES = 10  # candidate blocks per round: BEiT's attempts per `_mask` call


def num_masked(cells: int, mask_ratio: float) -> int:
    """ceil(mask_ratio * cells), immune to float noise such as 0.7 * 10 = 7.000000000000001."""
    return math.ceil(round(mask_ratio * cells, 9))


def square_side(grid: tuple[int, int], mask_ratio: float) -> int:
    """The square strategy's side in cells: round(sqrt(ratio * cells)), half up, clamped to [1, min(h, w)]."""
    side = math.floor(math.sqrt(mask_ratio * grid[0] * grid[1]) + 0.5)
    return max(1, min(side, *grid))


class MaskGenerator:
    """Draws SimMIM masks of one strategy (see the module docstring) on a fixed cell grid.

    input_size: image side in pixels (an int, or (H, W)); mask_patch_size: the cell side in pixels;
    mask_ratio in (0, 1); strategy: one of MASK_STRATEGIES. `count` is the cells every mask has:
    ceil(ratio * cells) (random, block) or side^2 (square). ValueError for arguments that do not fit
    (the trainer's config validation turns them into ConfigErrors first).
    """

    def __init__(self, input_size: int | tuple[int, int] = 192, mask_patch_size: int = 32,
                 mask_ratio: float = 0.6, strategy: str = "random"):
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if mask_patch_size <= 0 or height <= 0 or width <= 0:
            raise ValueError(f"input size {input_size} and mask patch size {mask_patch_size} must be positive")
        if height % mask_patch_size or width % mask_patch_size:
            raise ValueError(f"input size {input_size} is not divisible by mask patch size {mask_patch_size}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask ratio must lie in (0, 1), got {mask_ratio}")
        if strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask strategy must be one of {', '.join(MASK_STRATEGIES)}, got {strategy!r}")
        self.grid = (height // mask_patch_size, width // mask_patch_size)
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.strategy = strategy
        self.cells = self.grid[0] * self.grid[1]
        self.side = square_side(self.grid, mask_ratio) if strategy == "square" else 0
        self.count = self.side ** 2 if strategy == "square" else num_masked(self.cells, mask_ratio)

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Returns (B, h, w) bool, True = masked. Reproducible from `generator` (on `device`)."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        if self.strategy == "square":
            return square_masks(batch_size, self.grid, self.side, generator, device)
        if self.strategy == "block":
            return block_masks(batch_size, self.grid, self.count, generator, device)
        noise = torch.rand(batch_size, self.cells, generator=generator, device=device)  # (B, N)
        # The `count` cells with the smallest noise are masked: a uniform draw without replacement.
        chosen = noise.argsort(dim=1)[:, :self.count]
        masks = torch.zeros(batch_size, self.cells, dtype=torch.bool, device=device)
        masks.scatter_(1, chosen, True)
        return masks.view(batch_size, *self.grid)

    def __repr__(self) -> str:
        return (f"MaskGenerator(strategy={self.strategy}, grid={self.grid}, mask_patch_size={self.mask_patch_size}, "
                f"mask_ratio={self.mask_ratio}, masked_cells={self.count}/{self.cells})")


def _rectangles(top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) bool: per sample the cells [top, top + height) x [left, left + width); inputs (B,) int64."""
    rows = torch.arange(grid[0], device=top.device)
    cols = torch.arange(grid[1], device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # (B, h)
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (B, w)
    return in_rows[:, :, None] & in_cols[:, None, :]


def square_masks(batch_size: int, grid: tuple[int, int], side: int, generator: torch.Generator | None,
                 device) -> torch.Tensor:
    """(B, h, w) bool: one side x side square per sample, its top-left corner uniform over the
    (h - side + 1) x (w - side + 1) positions where it fits."""
    corner = torch.rand(batch_size, 2, generator=generator, device=device)
    top = (corner[:, 0] * (grid[0] - side + 1)).long()
    left = (corner[:, 1] * (grid[1] - side + 1)).long()
    side_t = torch.full_like(top, side)
    return _rectangles(top, left, side_t, side_t, grid)


def _block_candidates(remaining: torch.Tensor, min_cells: int, grid: tuple[int, int], tries: int,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """BEiT's candidate blocks, `tries` per sample: (top, left, height, width), each (B, tries) int64.

    area ~ U(min_cells, remaining) (the interval read either way round, as Python's random.uniform
    does when remaining < min_cells), aspect = exp(U(log 0.3, log 1/0.3)), height = round(sqrt(area *
    aspect)), width = round(sqrt(area / aspect)), top ~ U{0 .. h - height}, left ~ U{0 .. w - width}.
    """
    u = torch.rand(4, remaining.shape[0], tries, generator=generator, device=remaining.device)
    area = min_cells + (remaining[:, None].float() - min_cells) * u[0]
    log_aspect = math.log(BLOCK_ASPECT) + (math.log(1 / BLOCK_ASPECT) - math.log(BLOCK_ASPECT)) * u[1]
    height = torch.sqrt(area * log_aspect.exp()).round().long()
    width = torch.sqrt(area / log_aspect.exp()).round().long()
    top = (u[2] * (grid[0] - height + 1).clamp(min=1)).long()
    left = (u[3] * (grid[1] - width + 1).clamp(min=1)).long()
    return top, left, height, width


def _block_round(masks: torch.Tensor, count: int, min_cells: int, generator: torch.Generator | None) -> torch.Tensor:
    """One BEiT `_mask` call for every sample at once: BLOCK_TRIES candidates, the first that BEiT
    accepts (strictly inside the grid, adding between 1 and `remaining` new cells) is masked."""
    B, h, w = masks.shape
    remaining = count - masks.flatten(1).sum(1)  # (B,)
    top, left, height, width = _block_candidates(remaining, min_cells, (h, w), BLOCK_TRIES, generator)
    # masked cells inside each candidate, from the per-sample integral image: (B, tries)
    integral = torch.nn.functional.pad(masks.long().cumsum(1).cumsum(2), (1, 0, 1, 0)).flatten(1)
    bottom, right = (top + height).clamp(max=h), (left + width).clamp(max=w)

    def at(y, x):
        return integral.gather(1, y * (w + 1) + x)

    covered = at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left)
    new = height * width - covered
    ok = (height < h) & (width < w) & (new > 0) & (new <= remaining[:, None])
    first = ok.long().argmax(1, keepdim=True)  # first accepted try (0 where none: masked out below)
    pick = [t.gather(1, first)[:, 0] for t in (top, left, height, width)]
    return masks | (_rectangles(*pick, (h, w)) & ok.any(1)[:, None, None])


def block_rounds(count: int) -> int:
    """Rounds `block_masks` runs before its top-up: 32 + ceil(count / 64), from a simulation of
    2,000 masks per setting (docs/experiments.md): every mask of 6x6, 12x12 and 24x24 grids at ratio
    0.6 and 14x14 at BEiT's 75 cells is complete within 32 rounds; 48x48 (4 px cells at 192) needs
    48 rounds at ratio 0.6 and about 64 at 0.9, which the count term gives."""
    return 32 + math.ceil(count / 64)


def block_masks(batch_size: int, grid: tuple[int, int], count: int, generator: torch.Generator | None,
                device, rounds: int | None = None) -> torch.Tensor:
    """(B, h, w) bool with exactly `count` masked cells per sample: BEiT's block-wise masking.

    BEiT (Algorithm 1, `MaskingGenerator`) adds blocks until `count` cells are masked; a block is
    drawn by `_block_candidates` with min_cells = min(16, count) and accepted if it lies strictly
    inside the grid and adds between 1 and the remaining number of cells (overlaps allowed). A call
    that has 10 candidates rejected in a row gives up, leaving the mask short (BEiT's own masks are
    short in 31% of draws at its 75 of 14x14 cells, 21% at SimMIM's 22 of 6x6; 2,000 draws each). Here each round runs one such call
    for every sample at once (the first accepted of 10 candidates, in draw order: the same as
    BEiT's sequential attempts), and a rejected round is simply followed by the next instead of
    giving up. So on every draw where BEiT reaches the count, the masks are BEiT's, with its
    distribution of block shapes and positions; only where BEiT would stop short do more blocks
    follow. After `rounds` rounds (default `block_rounds(count)`) a sample still short (rare: see
    `block_rounds`) gets its last cells uniformly among its unmasked ones, so the count is always
    exact. generator: on `device` (or None: the default generator). Source: BEiT's
    `masking_generator.py`, restated batched; the constants are its pre-training defaults.
    """
    min_cells = min(BLOCK_MIN_CELLS, count)
    masks = torch.zeros(batch_size, *grid, dtype=torch.bool, device=device)
    for _ in range(block_rounds(count) if rounds is None else rounds):  # a fixed number: no host sync to ask whether every sample is done
        masks = _block_round(masks, count, min_cells, generator)
    # top-up: the `remaining` unmasked cells with the smallest noise (as the random strategy)
    flat = masks.flatten(1)
    remaining = count - flat.sum(1, keepdim=True)
    noise = torch.rand(flat.shape, generator=generator, device=device).masked_fill(flat, 2.0)
    rank = noise.argsort(1).argsort(1)
    return (flat | (rank < remaining)).view(batch_size, *grid)


def avg_dist(masks: torch.Tensor, cell_size: int) -> float:
    """The paper's AvgDist: mean Euclidean distance (pixels) from each masked pixel to the nearest
    visible pixel, averaged over all masked pixels of the batch.

    masks: (B, h, w) bool at cell resolution; each cell is cell_size x cell_size pixels, and a
    pixel is its integer centre. Exact: the distance from a pixel to a visible cell is its
    distance to the nearest pixel of that rectangle, and the minimum over cells is taken in two
    separable passes (columns, then rows), so no (pixels x cells) table is built. Images with no
    visible pixel have no defined distance and are left out; if none is left, returns nan.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, h, w), got shape {tuple(masks.shape)}")
    masks = masks.bool()
    keep = ~masks.flatten(1).all(dim=1)
    masks = masks[keep]
    if masks.numel() == 0 or not masks.any():
        return float("nan")
    B, h, w = masks.shape
    device = masks.device

    def axis_dist2(cells: int) -> torch.Tensor:
        # (cells * cell_size, cells): squared 1-D distance from pixel p to cell j's pixel span.
        p = torch.arange(cells * cell_size, device=device, dtype=torch.float32)[:, None]
        lo = torch.arange(cells, device=device, dtype=torch.float32)[None, :] * cell_size
        d = torch.clamp(torch.maximum(lo - p, p - (lo + cell_size - 1)), min=0)
        return d * d

    dx2 = axis_dist2(w)  # (W, w)
    dy2 = axis_dist2(h)  # (H, h)
    inf = torch.tensor(float("inf"), device=device)
    visible = ~masks  # (B, h, w)
    # Pass 1: per cell row i and pixel column x, the nearest visible cell in that row.
    row_best = torch.where(visible[:, :, None, :], dx2[None, None, :, :], inf).amin(dim=-1)  # (B, h, W)
    # Pass 2: over cell rows. (B, H, h, W) -> (B, H, W)
    d2 = (dy2[None, :, :, None] + row_best[:, None, :, :]).amin(dim=2)
    pixel_masked = masks.repeat_interleave(cell_size, 1).repeat_interleave(cell_size, 2)  # (B, H, W)
    return d2.sqrt()[pixel_masked].mean().item()
