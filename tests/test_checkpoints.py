"""One checkpoint reader for every consumer, both formats, weights_only everywhere; checkpoints
written by other frameworks (MMPretrain, microsoft/SimMIM, timm, DDP / EMA / compile wrappers,
safetensors) recognised or refused in one line. Each test builds its own small checkpoints."""
import ast
from pathlib import Path

import pytest
import torch

from simmim.trainer import checkpoint as ckpt_mod
from simmim.trainer.checkpoint import (CheckpointError, DCPCheckpointer, Kind, TorchSaveCheckpointer,
                                       newest_readable_checkpoint, read_checkpoint)
from simmim.trainer.finetune import Classifier, build_classifier, evaluate_checkpoint, load_pretrained
from simmim.trainer.finetune_options import FinetuneConfig
from simmim.trainer.model import build_simmim, param_groups

ROOT = Path(__file__).resolve().parents[1]
PRE_CFG = {"model": {"arch": "swin_micro", "window_size": 2}, "data": {"img_size": 64, "mask_patch_size": 32}}


def test_no_torch_load_without_weights_only():
    """Every torch.load call in the tree passes weights_only=True (a literal): nothing is unpickled
    beyond tensors and plain containers."""
    offenders = []
    for folder in ("pipeline", "kernels", "trainer", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def _trained_pair(seed: int = 0):
    torch.manual_seed(seed)
    model = build_simmim("swin_micro", 64, 32, window_size=2)
    opt = torch.optim.AdamW(param_groups(model, 0.05, "swin"), lr=1e-3)
    model(torch.randn(1, 3, 64, 64), torch.ones(1, 2, 2, dtype=torch.bool)).backward()
    opt.step()
    return model, opt


@pytest.fixture
def reads(monkeypatch):
    """The paths the one reader recognised (its `_contents` step), in order."""
    seen = []
    inner = ckpt_mod._contents

    def spy(path, fmt, raw, extra=None):
        seen.append((Path(path), fmt))
        return inner(path, fmt, raw, extra)

    monkeypatch.setattr(ckpt_mod, "_contents", spy)
    return seen


@pytest.mark.parametrize("fmt", ["torch.save", "dcp"])
def test_every_consumer_reads_a_pretraining_checkpoint_through_the_one_reader(tmp_path, fmt, reads):
    """resume (newest readable, then the checkpointer's load), finetune.pretrained and export read
    a .pt file and a DCP folder through read_checkpoint, and get the same weights."""
    from simmim.trainer.export import build_encoder, read_pretraining_checkpoint

    model, opt = _trained_pair()
    make = TorchSaveCheckpointer if fmt == "torch.save" else DCPCheckpointer
    ck = make(tmp_path, True, keep_last=2)
    ck.save(7, model, opt, {"train_state": {"epoch": 0, "step_in_epoch": 7}, "scaler": {}, "config": PRE_CFG})
    path = ck.checkpoints()[-1][1]

    contents, bad = ck.newest_readable()  # resume
    assert contents.path == path and contents.format == fmt and not bad and contents.config == PRE_CFG
    fresh, fresh_opt = _trained_pair(seed=1)
    assert ck.load(contents, fresh, fresh_opt)["train_state"]["step_in_epoch"] == 7
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    whole = read_checkpoint(path)
    assert (whole.kind, whole.layout, whole.encoder_prefix) == (Kind.PRETRAINING, "simmim", "encoder.swin.")
    assert whole.settings == {"img_size": 64, "window_size": 2, "patch_size": 4}
    assert all(torch.equal(whole.model[k], v) for k, v in model.state_dict().items())

    net = build_classifier("swin_micro", 64, 5, 2, 0.0)  # simmim finetune finetune.pretrained=...
    report = load_pretrained(net, path, "swin_micro")
    assert report["missing"] == ["head.fc.weight", "head.fc.bias"] and report["layout"] == "simmim"
    assert torch.equal(net.patch_embed.proj.weight, model.encoder.swin.patch_embed.proj.weight)

    state, config = read_pretraining_checkpoint(path)  # simmim export
    assert config == PRE_CFG and build_encoder(config, state)[1] == "swin"
    assert reads and {p for p, _ in reads} == {path} and {f for _, f in reads} == {fmt}


@pytest.mark.parametrize("fmt", ["torch.save", "dcp"])
def test_evaluate_reads_a_finetuned_checkpoint_in_both_formats(tmp_path, fmt, reads, sample_root):
    cfg = FinetuneConfig()
    cfg.model.arch, cfg.model.window_size, cfg.data.img_size = "swin_micro", 2, 64
    cfg.data.num_workers, cfg.data.batch_size, cfg.train.device = 0, 8, "cpu"
    torch.manual_seed(0)
    model = Classifier(build_classifier("swin_micro", 64, 5, 2, 0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    make = TorchSaveCheckpointer if fmt == "torch.save" else DCPCheckpointer
    path = make(tmp_path, True).save(3, model, opt, {"train_state": {}, "config": cfg.to_dict()})
    contents = read_checkpoint(path)
    assert (contents.kind, contents.layout, contents.encoder_prefix) == (Kind.FINETUNING, "simmim", "net.")
    result = evaluate_checkpoint(str(path), str(sample_root / "val"), "torch")
    assert result["val_images"] == len(list((sample_root / "val").rglob("*.JPEG")))
    assert {f for _, f in reads} == {fmt}


UNPICKLED = []


def _mark():
    UNPICKLED.append(True)
    return "{}"


class Payload:
    """Unpickles by calling `_mark`: what a weights_only load refuses and a plain one runs."""

    def __reduce__(self):
        return _mark, ()


def test_dcp_entries_are_unpickled_weights_only(tmp_path):
    """A DCP folder whose non-tensor entry is an arbitrary object is refused in one line before DCP's
    own (unrestricted) unpickling runs it."""
    import torch.distributed.checkpoint as dcp

    state = {"app": {"model": {"patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)}, "optim": {"x": torch.zeros(1)}},
             "train": {"json": Payload()}}
    with ckpt_mod.one_process(True):
        dcp.save(state, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    with pytest.raises(CheckpointError, match="cannot be read .*Unpickling") as e:
        read_checkpoint(tmp_path / "c")
    assert "\n" not in str(e.value) and UNPICKLED == []


def test_newest_readable_skips_a_file_without_optimizer_state(tmp_path):
    model, opt = _trained_pair()
    ck = TorchSaveCheckpointer(tmp_path, True, keep_last=5)
    ck.save(1, model, opt, {"train_state": {"epoch": 0}, "config": PRE_CFG})
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint-00000002.pt")  # weights only: not a resume
    contents, bad = newest_readable_checkpoint(tmp_path)
    assert contents.path.name == "checkpoint-00000001.pt"
    assert [p.name for p, _ in bad] == ["checkpoint-00000002.pt"] and "no model and optimizer" in str(bad[0][1])
