"""Judging an encoder before fine-tuning (docs/evaluation.md): `simmim reconstruct`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.core.errors import UserError
from simmim.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from simmim.trainer.checkpoint import DCPCheckpointer, TorchSaveCheckpointer
from simmim.trainer.export import swin_original_state_dict
from simmim.trainer.model import build_simmim
from simmim.trainer.reconstruct import (evaluation_view, load_pretrained_model, make_masks, panels, predict,
                                        reconstruct)

CFG = {"model": {"arch": "swin_micro", "window_size": 2}, "data": {"img_size": 64, "mask_patch_size": 32}}


def _model(seed=0):
    torch.manual_seed(seed)
    model = build_simmim("swin_micro", 64, 32, window_size=2)
    with torch.no_grad():  # a head that predicts something other than zero
        model.decoder[0].bias.normal_()
    return model.eval()


def _save(model, tmp_path, fmt):
    if fmt == "released":  # microsoft/SimMIM: encoder.<original Swin names>, yacs config as a dict
        enc = {f"encoder.{k}": v for k, v in swin_original_state_dict(model.encoder.swin).items()}
        enc["encoder.mask_token"] = model.encoder.mask_token.detach().view(1, 1, -1)
        enc.update({f"decoder.0.{k}": v for k, v in model.decoder[0].state_dict().items()})
        cfg = {"MODEL": {"TYPE": "swin", "SWIN": {"WINDOW_SIZE": 2, "PATCH_SIZE": 4}},
               "DATA": {"IMG_SIZE": 64, "MASK_PATCH_SIZE": 32}}
        torch.save({"model": enc, "config": cfg}, tmp_path / "simmim_pretrain.pth")
        return tmp_path / "simmim_pretrain.pth"
    make = TorchSaveCheckpointer if fmt == "torch.save" else DCPCheckpointer
    ck = make(tmp_path, True, keep_last=1)
    opt = torch.optim.AdamW(model.parameters())
    ck.save(3, model, opt, {"train_state": {"epoch": 0, "step_in_epoch": 3}, "scaler": {}, "config": CFG})
    return ck.checkpoints()[-1][1]


def _image(path, size=(80, 70), seed=0):
    rng = np.random.default_rng(seed)  # values away from mid-grey, so a grey cell always differs
    pixels = rng.choice(np.r_[0:100, 160:256], size=(size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("fmt", ["torch.save", "dcp", "released"])
def test_checkpoint_formats_rebuild_the_same_model(tmp_path, fmt):
    model = _model()
    pre = load_pretrained_model(_save(model, tmp_path, fmt))
    assert (pre.arch, pre.img_size, pre.mask_patch_size) == ("swin_micro", 64, 32)
    images, masks = torch.randn(2, 3, 64, 64), torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 1]]], dtype=torch.bool)
    assert torch.allclose(predict(pre.model, images, masks), predict(model, images, masks), atol=1e-5)


def test_user_mask_and_pasted_prediction(tmp_path):
    model = _model()
    path = _save(model, tmp_path, "torch.save")
    mask_png = tmp_path / "mask.png"
    hand = np.zeros((50, 90), np.uint8)  # another size than the image: white over the left column of cells
    hand[:, :40] = 255
    Image.fromarray(hand).save(mask_png)
    masks = make_masks(str(mask_png), 1, 64, 16, 0.6, 0)
    assert masks.shape == (1, 4, 4) and masks[0, :, :2].all() and not masks[0, :, 2:].any()

    pre = load_pretrained_model(path)
    view = evaluation_view(_image(tmp_path / "a.png"), 64)
    assert view.shape == (3, 64, 64) and view.dtype == torch.uint8
    images = normalize(view[None], IMAGENET_MEAN, IMAGENET_STD)
    original, masked, pasted, full = panels(images, masks, predict(pre.model, images, masks))
    pixel = masks[0].repeat_interleave(16, 0).repeat_interleave(16, 1)  # (64, 64)
    differs = (masked[0] != original[0]).any(0)
    assert torch.equal(differs, pixel)  # exactly the masked cells
    _, out = model(images, masks, return_pred=True)
    expected = denormalize(out, IMAGENET_MEAN, IMAGENET_STD)[0]
    assert torch.allclose(pasted[0][:, pixel], expected[:, pixel], atol=1e-5)
    assert torch.equal(pasted[0][:, ~pixel], original[0][:, ~pixel])
    assert torch.allclose(full[0], expected, atol=1e-5)


def test_figure_with_several_patch_sizes(tmp_path):
    path = _save(_model(), tmp_path, "dcp")
    folder = tmp_path / "imgs"
    folder.mkdir()
    _image(folder / "a.png"), _image(folder / "b.jpg", seed=1)
    out = reconstruct(str(path), [str(folder)], str(tmp_path / "fig.png"), "block", 0.5, [16, 32], seed=3,
                      device="cpu")
    with Image.open(out) as fig:
        assert fig.height > fig.width  # 4 rows (2 images x 2 patch sizes) of 4 columns


def test_refusals_are_one_line(tmp_path):
    model = _model()
    path = _save(model, tmp_path, "torch.save")
    encoder_only = tmp_path / "encoder.pt"
    torch.save(model.encoder.swin.state_dict(), encoder_only)
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not an image")
    good = _image(tmp_path / "good.png")
    cases = [
        lambda: reconstruct(str(encoder_only), [str(good)], str(tmp_path / "f.png")),
        lambda: reconstruct(str(path), [str(bad_image)], str(tmp_path / "f.png")),
        lambda: reconstruct(str(path), [str(good)], str(tmp_path / "f.png"), mask=str(bad_image)),
        lambda: reconstruct(str(path), [str(good)], str(tmp_path / "f.png"), mask="nothing-here"),
        lambda: reconstruct(str(path), [str(good)], str(tmp_path / "f.png"), patch_sizes=[6]),
        lambda: reconstruct(str(path), [str(good)], str(tmp_path / "f.png"), mask_ratio=1.5),
    ]
    for case in cases:
        with pytest.raises(UserError) as e:
            case()
        assert "\n" not in str(e.value) and str(e.value).startswith("reconstruct:"), str(e.value)
    assert "pre-training" in str(pytest.raises(UserError, cases[0]).value)


# ---------------------------------------------------------------- kNN monitor (trainer/knn.py)

def test_knn_matches_a_brute_force_reference():
    from simmim.trainer.knn import knn_predict

    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g)
    queries = torch.randn(25, 8, generator=g)
    got = knn_predict(bank, labels, queries, 4, k=5, temperature=0.07, chunk=7)
    for q, pred in zip(queries, got):  # one query at a time, the formula written out
        cos = [float(q @ b / (q.norm() * b.norm())) for b in bank]
        nearest = sorted(range(60), key=lambda i: -cos[i])[:5]
        votes = [sum(np.exp(cos[i] / 0.07) for i in nearest if labels[i] == c) for c in range(4)]
        assert int(pred) == int(np.argmax(votes))
    assert (knn_predict(bank, labels, bank, 4, k=1) == labels).all()  # each point is its own nearest


def _knn_monitor(sample_root, rank, world_size):
    from simmim.trainer.distributed import DistInfo
    from simmim.trainer.knn import KNNMonitor

    dist = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    return KNNMonitor(str(sample_root / "train"), str(sample_root / "val"), 64, 4, 30, 8, 0, 0, dist)


def _knn_rank(rank, world_size, store, sample_root, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size)
    top1 = _knn_monitor(sample_root, rank, world_size)(_model())
    if rank == 0:
        out.write_text(repr(top1))
    dist.destroy_process_group()


@pytest.mark.slow
def test_knn_figure_is_the_same_on_one_and_two_ranks(tmp_path, sample_root):
    one = _knn_monitor(sample_root, 0, 1)(_model())
    torch.multiprocessing.spawn(_knn_rank, args=(2, str(tmp_path / "store"), sample_root, tmp_path / "top1"),
                                nprocs=2)
    assert float((tmp_path / "top1").read_text()) == pytest.approx(one, abs=1e-9) and 0 <= one <= 100


@pytest.mark.slow
def test_pretraining_logs_the_knn_figure(tmp_path, sample_root):
    import json

    from simmim.trainer.config import load_config
    from simmim.trainer.pretrain import pretrain

    out = tmp_path / "run"
    pretrain(load_config("demo", [f"data.path={sample_root / 'train'}", f"data.val_path={sample_root / 'val'}",
                                  f"run.out_dir={out}", "data.img_size=64", "data.batch_size=8", "data.num_workers=0",
                                  "model.arch=swin_micro", "model.window_size=2", "run.progress=false",
                                  "train.epochs=2", "run.knn_every=1", "run.knn_train_samples=20", "run.vis_every=5"]))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = [r["knn_top1"] for r in recs if "knn_top1" in r]
    assert len(knn) == 2 and all(0 <= v <= 100 for v in knn) and (out / "curves.png").is_file()


# ---------------------------------------------------------------- linear probe (trainer/probe.py)

def _colour_classes(root, per_class=12, seed=0):
    """Classes that differ only in colour: each image one hue plus noise, random size."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for name, rgb in (("blue", (40, 60, 200)), ("green", (50, 190, 60)), ("red", (200, 50, 40))):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(60, 90, size=2)
                pixels = np.clip(np.array(rgb) + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _probe_cfg(root, out, *extra):
    from simmim.trainer.config import load_config
    from simmim.trainer.probe import ProbeConfig

    return load_config("probe_demo", [f"data.path={root / 'train'}", f"probe.val_path={root / 'val'}",
                                      f"run.out_dir={out}", "data.img_size=64", "data.batch_size=8",
                                      "data.num_workers=0", "model.arch=swin_micro", "model.window_size=2",
                                      "run.progress=false", *extra], ProbeConfig)


def test_probe_of_a_random_encoder_reaches_logistic_regression(tmp_path):
    """A fixed random encoder: the probe's top-1 on colour classes against scikit-learn's
    LogisticRegression on the same (frozen, pooled) features of the evaluation view."""
    LogisticRegression = pytest.importorskip("sklearn.linear_model").LogisticRegression
    from simmim.pipeline.augment import Augmentation
    from simmim.pipeline.folder import ImageFolder
    from simmim.trainer.probe import probe

    root = _colour_classes(tmp_path / "data")
    result = probe(_probe_cfg(root, tmp_path / "run", "train.epochs=6", "probe.optimizer=lars", "optim.base_lr=50"))
    from simmim.trainer.checkpoint import checkpoints
    from simmim.trainer.checkpoint_reader import read_checkpoint
    from simmim.trainer.finetune import build_classifier
    from simmim.trainer.probe import LinearProbe

    state = read_checkpoint(checkpoints(tmp_path / "run")[-1][1]).model
    model = LinearProbe(build_classifier("swin_micro", 64, 3, 2, 0.0), "swin", 3)
    model.load_state_dict(state)
    model.eval()

    def feats(split):
        ds = ImageFolder(root / split, Augmentation(size=64), train=False)
        items = [ds[(i, 0)] for i in range(len(ds))]
        x = normalize(torch.stack([a for a, _ in items]), IMAGENET_MEAN, IMAGENET_STD)
        return model.features(x).numpy(), np.array([b for _, b in items])

    (xt, yt), (xv, yv) = feats("train"), feats("val")
    reference = 100 * LogisticRegression(max_iter=2000).fit(xt, yt).score(xv, yv)
    assert reference > 60  # colour survives a random encoder
    print(f"probe top-1 {result['top1']:.1f}%, LogisticRegression {reference:.1f}%")
    assert result["top1"] >= reference - 100 / len(yv) - 1e-6, (result, reference)  # at most one image fewer


def test_probe_resume_is_exact(tmp_path):
    """Interrupted after epoch 1's checkpoint (the newer one removed, as a kill before it was
    written), the resumed run ends with the same head, BatchNorm statistics and optimizer state."""
    from simmim.trainer.checkpoint import checkpoints
    from simmim.trainer.checkpoint_reader import read_checkpoint
    from simmim.trainer.probe import probe

    root = _colour_classes(tmp_path / "data", per_class=6)
    extra = ("train.epochs=2", "run.save_every=1", "run.keep_last=0")
    probe(_probe_cfg(root, tmp_path / "ref", *extra))
    probe(_probe_cfg(root, tmp_path / "cut", *extra))
    checkpoints(tmp_path / "cut")[-1][1].unlink()
    probe(_probe_cfg(root, tmp_path / "cut", *extra))
    a, b = (read_checkpoint(checkpoints(tmp_path / r)[-1][1]) for r in ("ref", "cut"))
    assert a.model.keys() == b.model.keys() and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert str(a.optimizer) == str(b.optimizer)


def test_probe_command_line(tmp_path, capsys, monkeypatch):
    """`simmim probe CKPT --config RECIPE key=value`: the overrides after the recipe reach the config;
    a missing checkpoint is one line and exit status 2."""
    from simmim.trainer import cli, probe as probe_mod

    seen = {}
    monkeypatch.setattr(probe_mod, "probe", lambda cfg: seen.setdefault("cfg", cfg))
    ap, _ = cli.build_parser()
    cli.run(ap.parse_args(["probe", "ck.pt", "--config", "probe_demo", "probe.layer=2", "train.epochs=3"]))
    cfg = seen["cfg"]
    assert (cfg.probe.pretrained, cfg.probe.layer, cfg.train.epochs) == ("ck.pt", 2, 3)
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        cli.run(ap.parse_args(["probe", str(tmp_path / "none.pt"), "--config", "probe_demo"]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "none.pt" in err


def test_a_mask_image_that_masks_no_cell_is_one_line(tmp_path):
    """A coloured or inverted mask (no cell over half white) would give a figure with nothing
    predicted: refused in one line, while a white square masks exactly its cells."""
    from PIL import Image

    from simmim.trainer.reconstruct import mask_from_image

    Image.new("RGB", (60, 60), (255, 0, 0)).save(tmp_path / "red.png")
    with pytest.raises(UserError, match="masks no cell") as e:
        mask_from_image(tmp_path / "red.png", (6, 6))
    assert "\n" not in str(e.value)
    img = Image.new("L", (60, 60), 0)
    img.paste(255, (0, 0, 20, 30))
    img.save(tmp_path / "corner.png")
    got = mask_from_image(tmp_path / "corner.png", (6, 6))
    assert got.sum() == 6 and got[:3, :2].all()


@pytest.mark.parametrize("rows", [1, 4, 12])
def test_figure_title_clears_the_column_headings(tmp_path, monkeypatch, rows):
    """The suptitle sits above the column headings and the row labels beside the images at any
    number of rows (tight_layout put a 12-row figure's title over the headings)."""
    from simmim.trainer import reconstruct as rec

    drawn = []
    real = rec.save_png
    monkeypatch.setattr(rec, "save_png", lambda fig, out, title: drawn.append(fig) or real(fig, out, title))
    image = torch.rand(3, 64, 64)
    rec._figure([(f"image {r}\nmask 32px", [image] * len(rec.COLUMNS)) for r in range(rows)],
                str(tmp_path / "fig.png"), "checkpoint-00000003.pt (swin_micro), mask random")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = drawn[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # as savefig drew it (the layout engine runs again, a one-off layout stays)
    title = fig._suptitle.get_window_extent(renderer)
    headings = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(headings) == len(rec.COLUMNS)
    assert all(title.y0 >= h.y1 for h in headings), (title, headings)  # display coordinates: y up
    assert title.y1 <= fig.bbox.y1 + 0.5  # and inside the figure
