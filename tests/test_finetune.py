"""Fine-tuning: checkpoint loading, relative-position-bias resizing, layer decay, the
augmentation pipeline, evaluation loaders, and the CLI from pre-training to evaluation."""
import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.core.errors import CheckpointError
from simmim.pipeline import Augmentation, LoaderSpec, build_loader
from simmim.pipeline.views import center_crop
from simmim.trainer.engine import StepOptions, Trainer
from simmim.trainer.finetune import (Classifier, MixupErasing, build_classifier, layer_decay_groups, layer_id,
                                     load_pretrained, num_layers, resize_rel_pos_bias)
from simmim.trainer.finetune_options import FinetuneConfig
from simmim.trainer.model import build_simmim


def save_simmim(path, arch="swin_micro", img=64, window=2):
    torch.manual_seed(0)
    model = build_simmim(arch, img, 32, window)
    torch.save({"model": model.state_dict(), "config": {"model": {"arch": arch}}}, path)
    return model


def test_load_pretrained_same_size_is_exact(tmp_path):
    simmim = save_simmim(tmp_path / "c.pt")
    net = build_classifier("swin_micro", 64, 5, 2, 0.0)
    report = load_pretrained(net, tmp_path / "c.pt", "swin_micro")
    assert report["missing"] == ["head.fc.weight", "head.fc.bias"] and report["unexpected"] == []
    assert report["resized"] == []
    theirs = simmim.encoder.swin.state_dict()
    for k, v in net.state_dict().items():
        if not k.startswith("head") and k in theirs:
            assert torch.equal(v, theirs[k]), k


def test_load_pretrained_resizes_window_tables(tmp_path):
    save_simmim(tmp_path / "c.pt", img=128, window=4)  # 128 px, window 4 -> 8 (7x7 -> 15x15 offset tables)
    net = build_classifier("swin_micro", 128, 5, 8, 0.0)
    report = load_pretrained(net, tmp_path / "c.pt", "swin_micro")
    assert report["resized"] and all(k.endswith("relative_position_bias_table") for k in report["resized"])
    table = net.state_dict()[report["resized"][0]]
    assert table.shape[0] == 225


def test_rel_pos_bias_interpolation():
    t = torch.randn(11 * 11, 4)
    assert resize_rel_pos_bias(t, 11) is t  # exact when sizes match
    const = torch.full((11 * 11, 3), 0.7)
    assert torch.allclose(resize_rel_pos_bias(const, 13), torch.full((13 * 13, 3), 0.7), atol=1e-6)
    with pytest.raises(ValueError, match="cannot resize"):  # 3x3 offsets (window 2) have no tail to stretch
        resize_rel_pos_bias(torch.randn(9, 2), 7)
    # 192/window 6 -> 224/window 7: a smooth bias keeps its shape (centre = zero offset stays the peak)
    yy, xx = torch.meshgrid(torch.arange(11.) - 5, torch.arange(11.) - 5, indexing="ij")
    bump = torch.exp(-(xx ** 2 + yy ** 2) / 8).reshape(-1, 1)
    out = resize_rel_pos_bias(bump, 13).reshape(13, 13)
    assert out.argmax() == 6 * 13 + 6 and torch.allclose(out, out.T, atol=1e-6)


def test_load_pretrained_refuses_other_architecture(tmp_path):
    save_simmim(tmp_path / "vit.pt", arch="vit_micro", img=64, window=0)
    with pytest.raises(CheckpointError, match="is a vit_micro checkpoint; model.arch is swin_micro"):
        load_pretrained(build_classifier("swin_micro", 64, 5, 2), tmp_path / "vit.pt", "swin_micro")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 junk")  # a truncated zip
    with pytest.raises(CheckpointError, match="cannot be read .* another checkpoint of the pre-training run") as e:
        load_pretrained(build_classifier("swin_micro", 64, 5, 2), tmp_path / "junk.pt", "swin_micro")
    assert "delete" not in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"junk")  # not what torch.save writes at all
    with pytest.raises(CheckpointError, match="is not a checkpoint .*: point finetune.pretrained at another checkpoint"):
        load_pretrained(build_classifier("swin_micro", 64, 5, 2), tmp_path / "junk.pt", "swin_micro")
    # a checkpoint without a config naming its arch is still checked by its shapes
    state = build_simmim("swin_tiny", 64, 32, 2).state_dict()
    torch.save({"model": state}, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="does not match model.arch swin_micro"):
        load_pretrained(build_classifier("swin_micro", 64, 5, 2), tmp_path / "tiny.pt", "swin_micro")


def test_evaluate_refuses_incomplete_checkpoints(tmp_path):
    """A fine-tuned checkpoint without its head, or with weights of another arch, is a one-line
    CheckpointError before any data is read (it used to be a bare StopIteration)."""
    from simmim.trainer.finetune import evaluate_checkpoint

    cfg = FinetuneConfig()
    cfg.model.arch, cfg.model.window_size, cfg.data.img_size = "swin_micro", 2, 64
    net = build_classifier("swin_micro", 64, 5, 2, 0.0)
    weights = {f"net.{k}": v for k, v in net.state_dict().items()}
    headless = {k: v for k, v in weights.items() if ".head." not in k}
    torch.save({"model": headless, "config": cfg.to_dict()}, tmp_path / "headless.pt")
    with pytest.raises(CheckpointError, match="has no classification head"):
        evaluate_checkpoint(str(tmp_path / "headless.pt"), data="/not/read")
    cfg.model.arch = "swin_tiny"
    torch.save({"model": weights, "config": cfg.to_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not match model.arch swin_tiny"):
        evaluate_checkpoint(str(tmp_path / "other.pt"), data="/not/read")
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate_checkpoint(str(tmp_path / "none.pt"))


def test_soft_target_loss_and_accuracy_are_timms():
    """Mixed targets go through timm's SoftTargetCrossEntropy, accuracy through timm.utils.accuracy,
    checked against the formulas."""
    from simmim.trainer.finetune import evaluate

    logits = torch.randn(6, 5)
    net = torch.nn.Linear(5, 5)
    with torch.no_grad():
        net.weight.copy_(torch.eye(5)), net.bias.zero_()
    model = Classifier(net, label_smoothing=0.1).train()
    targets = MixupErasing(5, mixup=1.0, cutmix=0.0, label_smoothing=0.1, reprob=0)(logits.clone(), torch.arange(6) % 5)[1]
    assert torch.allclose(model.soft_target_loss(logits, targets),
                          (-targets * torch.log_softmax(logits, -1)).sum(-1).mean())
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)  # classes scored above the label
    result = evaluate(net, [(logits[:4], labels[:4]), (logits[4:], labels[4:])], torch.device("cpu"))
    assert result["val_images"] == 6
    assert result["top1"] == pytest.approx(100 * (ranks == 0).float().mean().item())
    assert result["top5"] == 100.0  # 5 classes: the label is always in the top 5
    assert result["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize("arch,img,window", [("swin_micro", 64, 2), ("vit_micro", 64, 0)])
def test_layer_decay_applied_once_per_group(arch, img, window):
    net = build_classifier(arch, img, 3, window, 0.0)
    decay = 0.75
    groups = layer_decay_groups(net, arch, 0.05, decay)
    layers = sorted({g["layer"] for g in groups})
    assert layers == list(range(num_layers(arch) + 2))  # embeddings, every block, head
    assert layer_id("patch_embed.proj.weight", arch) == 0 and layer_id("head.fc.weight" if "swin" in arch
                                                                      else "head.weight", arch) == layers[-1]
    model = Classifier(net)
    opt = torch.optim.AdamW(groups, lr=1.0, fused=True)  # as the trainer builds it
    batches = [(torch.randn(2, 3, img, img), torch.tensor([0, 1])) for _ in range(3)]
    trainer = Trainer(model, opt, lambda step: 1e-3, StepOptions(), steps_per_epoch=3)
    for epoch in range(2):  # the engine sets the lr from the schedule every step: no compounding
        trainer.train_epoch(iter(batches), epoch)
    lr = {g["layer"]: g["lr"] for g in opt.param_groups}
    assert lr[layers[-1]] == pytest.approx(1e-3)  # the head at the full rate
    for a in layers[:-1]:
        assert lr[a] / lr[a + 1] == pytest.approx(decay, rel=1e-9)


def test_batch_transform_then_loss():
    """The engine's batch transform (random erasing, mixup / cutmix) gives soft targets; the
    classifier's forward only computes: soft-target cross-entropy for them, label-smoothed
    cross-entropy for labels in training, plain cross-entropy in evaluation."""
    images = torch.randn(4, 3, 32, 32).clamp(-2, 2)
    labels = torch.tensor([0, 1, 2, 3])
    transform = MixupErasing(5, mixup=0.8, cutmix=1.0, label_smoothing=0.1, reprob=1.0)
    mixed, targets = transform(images.clone(), labels)  # timm erases and mixes in place
    assert mixed.shape == images.shape and mixed.dtype == images.dtype and not torch.equal(mixed, images)
    assert targets.shape == (4, 5) and torch.allclose(targets.sum(1), torch.ones(4))
    assert targets.max() < 1  # label-smoothed and mixed
    odd, same = MixupErasing(5, reprob=0)(images[:3].clone(), labels[:3])  # timm's batch mixup pairs images
    assert torch.equal(odd, images[:3]) and torch.equal(same, labels[:3])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    model = Classifier(net, label_smoothing=0.1).train()
    loss = model(mixed, targets)
    loss.backward()
    logits = net(mixed)
    assert torch.allclose(loss, (-targets * torch.log_softmax(logits, -1)).sum(-1).mean())
    assert torch.allclose(model(images, labels), torch.nn.functional.cross_entropy(net(images), labels,
                                                                                  label_smoothing=0.1))
    model.eval()
    assert torch.allclose(model(images, labels), torch.nn.functional.cross_entropy(net(images), labels))


def test_batch_transform_is_applied_by_the_engine_seeded_per_step():
    """Trainer.train_epoch applies the task's transform to every micro-batch before the forward, and its
    draws are functions of (seed, epoch, step, micro, rank): equal seeds give equal mixed batches."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, images, targets):
            seen.append((images.clone(), targets.clone()))
            return self.w * 0 + images.float().mean()

    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])) for _ in range(2)]
    runs = []
    for seed in (0, 0, 1):
        seen.clear()
        model = Recorder()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fresh = [(x.clone(), y) for x, y in batches]  # timm changes a batch in place
        Trainer(model, opt, lambda step: 0.1, StepOptions(seed=seed), steps_per_epoch=2,
                batch_transform=MixupErasing(4, reprob=0.5)).train_epoch(iter(fresh), epoch=0)
        runs.append(list(seen))
    assert all(t.shape == (4, 4) and t.is_floating_point() for _, t in runs[0])  # soft targets reached the model
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0][1], runs[0][1][1])  # a fresh draw per step
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[2]))


def test_center_crop_view():
    x = np.arange(200, dtype=np.uint8)
    img = Image.fromarray(np.stack([np.tile(x[None, :], (100, 1))] * 3, -1))  # 200 x 100, red = x
    out = np.asarray(center_crop(img, 50, 0.5))  # centre 50 x 50 square of the shorter side 100
    assert out.shape == (50, 50, 3)
    assert abs(int(out[0, 0, 0]) - 75) <= 1 and abs(int(out[0, -1, 0]) - 124) <= 1


@pytest.mark.parametrize("backend", ["torch", "ffcv", "dali"])
def test_eval_loaders_see_every_image_once(backend, sample_root, tmp_path):
    path = str(sample_root / "val")
    if backend == "ffcv":
        pytest.importorskip("ffcv")
        from simmim.pipeline.convert import convert

        convert(path, str(tmp_path / "val.beton"), workers=1, progress=False)
        path = str(tmp_path / "val.beton")
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    n = len(list((sample_root / "val").rglob("*.JPEG")))
    labels = []
    for rank in range(2):
        spec = LoaderSpec(backend, path, Augmentation(size=32), 4, 1, train=False, labels=True, drop_last=False)
        loader = build_loader(spec, None, torch.device("cpu"), rank, 2)
        got = [(images.shape, lab) for images, lab in loader]
        assert len(got) == len(loader) == -(-len(range(rank, n, 2)) // 4)
        labels += torch.cat([lab for _, lab in got]).tolist()
    assert len(labels) == n  # every image once, none dropped, none padded
    from simmim.pipeline import scan_folder

    assert sorted(labels) == sorted(label for _, label in scan_folder(sample_root / "val")[0])


@pytest.mark.slow
def test_cli_pretrain_finetune_evaluate(sample_root, tmp_path, simmim_cmd):
    common = ["data.img_size=64", "model.arch=swin_micro", "model.window_size=2", "run.progress=false",
              "data.num_workers=0", "data.batch_size=8"]
    run = lambda *a: subprocess.run([*simmim_cmd, *a], capture_output=True, text=True, timeout=600)  # noqa: E731
    out = run("pretrain", "--config", "demo", "data.val_path=", f"data.path={sample_root / 'train'}", "train.epochs=1",
              f"run.out_dir={tmp_path / 'pre'}", *common)
    assert out.returncode == 0, out.stderr[-2000:]
    import yaml

    sections = lambda run: set(yaml.safe_load((tmp_path / run / "config.yaml").read_text()))  # noqa: E731
    assert sections("pre") == {"data", "model", "optim", "train", "run", "loss"}  # no finetune section
    ckpt = sorted((tmp_path / "pre").glob("checkpoint-*.pt"))[-1]
    out = run("evaluate", str(ckpt))
    assert out.returncode == 2 and "is not a fine-tuned checkpoint" in out.stderr
    out = run("finetune", "--config", "finetune_demo", f"data.path={sample_root / 'train'}",
              f"finetune.val_path={sample_root / 'val'}", "train.epochs=2", f"finetune.pretrained={ckpt}",
              f"run.out_dir={tmp_path / 'ft'}", *common)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "missing keys ['head.fc.weight', 'head.fc.bias'], 0 unexpected" in out.stdout
    assert sections("ft") == {"data", "model", "optim", "train", "run", "finetune"}
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "top1" in r]
    assert len(evals) == 2 and all(0 <= r["top1"] <= r["top5"] <= 100 for r in evals)
    final = sorted((tmp_path / "ft").glob("checkpoint-*.pt"))[-1]
    from simmim.trainer.checkpoint_reader import read_checkpoint

    assert read_checkpoint(final).classes == sorted(p.name for p in (sample_root / "train").iterdir())
    out = run("evaluate", str(final), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["val_images"] == len(list((sample_root / "val").rglob("*.JPEG")))
    assert result["top1"] == pytest.approx(evals[-1]["top1"])
    out = run("finetune", "--config", "finetune_demo", "finetune.pretrained=/no/such.pt", *common)
    assert out.returncode == 2 and "finetune.pretrained: '/no/such.pt' does not exist" in out.stderr
