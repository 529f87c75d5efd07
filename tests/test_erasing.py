"""Batched random erasing (`augment.random_erasing`): timm's RandomErasing semantics (mode 'pixel',
one box) for a whole batch, without a loop over the images."""
import torch

from simmim.pipeline.augment import random_erasing


def erased_boxes(before: torch.Tensor, after: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """Per image, (top, left, h, w) of the changed pixels (checked to form one full box), or None."""
    boxes = []
    for a, b in zip(before, after):
        changed = (a != b).any(0)
        if not changed.any():
            boxes.append(None)
            continue
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        top, left = int(rows[0]), int(cols[0])
        h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
        assert changed[top:top + h, left:left + w].all() and int(changed.sum()) == h * w  # one full box
        boxes.append((top, left, h, w))
    return boxes


def test_every_image_gets_one_box_of_the_drawn_size():
    torch.manual_seed(0)
    images = torch.zeros(64, 3, 48, 40)
    out = random_erasing(images, 1.0)
    assert out.shape == images.shape and out.dtype == images.dtype
    boxes = erased_boxes(images, out)
    assert all(b is not None for b in boxes)
    for top, left, h, w in boxes:
        assert h < 48 and w < 40 and top + h <= 48 and left + w <= 40
        # area fraction in timm's (0.02, 1/3), up to the rounding of h and w
        assert 0.02 * 0.5 <= h * w / (48 * 40) <= 1 / 3 * 1.5
        assert 0.3 / 1.5 <= h / w <= 3.3 * 1.5
    erased = out[0][:, boxes[0][0]:boxes[0][0] + boxes[0][2], boxes[0][1]:boxes[0][1] + boxes[0][3]]
    assert abs(float(erased.std()) - 1) < 0.3  # N(0, 1) noise per pixel and channel


def test_probability_seeding_and_dtype():
    images = torch.zeros(2000, 3, 16, 16, dtype=torch.bfloat16)
    torch.manual_seed(1)
    out = random_erasing(images, 0.25)
    share = sum(b is not None for b in erased_boxes(images, out)) / len(images)
    assert abs(share - 0.25) < 0.04 and out.dtype == torch.bfloat16
    torch.manual_seed(1)
    assert torch.equal(random_erasing(images, 0.25), out)  # a function of the generator's state
    assert torch.equal(random_erasing(images, 0.0), images)


def test_box_positions_cover_the_image():
    """Positions are uniform over where the box fits (timm's randint, inclusive): both edges reached."""
    torch.manual_seed(2)
    images = torch.zeros(3000, 1, 12, 12)
    boxes = [b for b in erased_boxes(images, random_erasing(images, 1.0)) if b is not None]
    assert any(top == 0 for top, _, _, _ in boxes) and any(top + h == 12 for top, _, h, _ in boxes)
    assert any(left == 0 for _, left, _, _ in boxes) and any(left + w == 12 for _, left, _, w in boxes)
    mean_area = sum(h * w for _, _, h, w in boxes) / len(boxes) / 144
    assert 0.1 < mean_area < 0.25, mean_area  # E[U(0.02, 1/3)] = 0.177, less the draws that do not fit
