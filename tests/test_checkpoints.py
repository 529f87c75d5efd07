"""One checkpoint reader for every consumer, both formats, weights_only everywhere; checkpoints
written by other frameworks (MMPretrain, microsoft/SimMIM, timm, DDP / EMA / compile wrappers,
safetensors) recognised or refused in one line. Each test builds its own small checkpoints."""
import ast
import inspect
from pathlib import Path

import pytest
import torch

from simmim.core.errors import CheckpointError
from simmim.trainer import checkpoint, checkpoint_reader
from simmim.trainer.checkpoint import DCPCheckpointer, TorchSaveCheckpointer, newest_readable_checkpoint
from simmim.trainer.checkpoint_reader import read_checkpoint
from simmim.trainer.finetune import Classifier, build_classifier, evaluate_checkpoint, load_pretrained
from simmim.trainer.finetune_options import FinetuneConfig
from simmim.trainer.layouts import Kind
from simmim.trainer.model import build_simmim, param_groups

ROOT = Path(__file__).resolve().parents[1]
PRE_CFG = {"model": {"arch": "swin_micro", "window_size": 2}, "data": {"img_size": 64, "mask_patch_size": 32}}


def test_no_torch_load_without_weights_only():
    """Every torch.load call in the tree passes weights_only=True (a literal): nothing is unpickled
    beyond tensors and plain containers."""
    offenders = []
    for folder in ("core", "kernels", "pipeline", "trainer", "benchmarks", "cli", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_writing_and_reading_modules_each_own_their_names():
    """checkpoint.py (writing, listing a run folder) and checkpoint_reader.py (reading) list in
    `__all__` only names defined in them (no re-exports: one home per name), and the reader never
    imports the writer, so the two cannot import each other in a circle."""
    for module in (checkpoint, checkpoint_reader):
        for name in module.__all__:
            obj = getattr(module, name)
            home = obj.__module__ if inspect.isclass(obj) or inspect.isfunction(obj) else module.__name__  # constants
            assert home == module.__name__, f"{module.__name__}.{name} is {home}'s"
    tree = ast.parse(Path(checkpoint_reader.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "checkpoint" not in imported and "simmim.trainer.checkpoint" not in imported


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
    inner = checkpoint_reader._contents

    def spy(path, fmt, raw, extra=None):
        seen.append((Path(path), fmt))
        return inner(path, fmt, raw, extra)

    monkeypatch.setattr(checkpoint_reader, "_contents", spy)
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
    assert whole.settings == {"img_size": 64, "window_size": 2, "patch_size": 4, "in_chans": 3}
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
    with checkpoint_reader.one_process(True):
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


# ---------------------------------------------------------------- checkpoints of other frameworks

def _simmim_micro(arch="swin_micro", img=64, window=2):
    torch.manual_seed(0)
    return build_simmim(arch, img, 32, window)


def _same_encoder(net, simmim) -> None:
    theirs = simmim.encoder.swin.state_dict()
    for k, v in net.state_dict().items():
        if not k.startswith("head") and not k.endswith(("relative_position_index", "attn_mask")):
            assert torch.equal(v, theirs[k]), k


def _to_mmpretrain(original: dict) -> dict:
    """The original Swin naming -> MMPretrain's (its swin_to_mmpretrain renames), written from the
    module names of its SwinTransformer; patch merging reordered to nn.Unfold's channel order."""
    import re

    perm = [0, 2, 1, 3]
    out = {}
    for key, value in original.items():
        key = re.sub(r"^layers\.", "stages.", key).replace(".attn.", ".attn.w_msa.")
        key = key.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        key = key.replace("patch_embed.proj.", "patch_embed.projection.")
        key = re.sub(r"^norm\.", "norm3.", key)
        if ".downsample." in key and key.endswith(("reduction.weight", "norm.weight", "norm.bias")):
            rows = value.reshape(-1, 4, value.shape[-1] // 4)  # (out, position, c)
            value = rows[:, perm, :].transpose(1, 2).reshape(value.shape).contiguous()  # (out, c, k) flat
        out[key] = value
    return out


def test_mmpretrain_patch_merging_order_is_unfolds():
    """The test's MMPretrain conversion is right about the channel order: mmcv's PatchMerging
    (nn.Unfold 2x2) with the converted weights computes what the original Swin merge computes."""
    C, out = 6, 12
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, C, generator=g)
    weight, nw, nb = torch.randn(out, 4 * C, generator=g), torch.randn(4 * C, generator=g), torch.randn(4 * C, generator=g)
    merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)  # the original
    ref = torch.nn.functional.layer_norm(merged, (4 * C,), nw, nb) @ weight.T
    mm = _to_mmpretrain({"layers.0.downsample.reduction.weight": weight, "layers.0.downsample.norm.weight": nw,
                         "layers.0.downsample.norm.bias": nb})
    unfolded = torch.nn.Unfold(2, stride=2)(x.permute(0, 3, 1, 2)).transpose(1, 2)  # (1, L, 4C), mmcv's order
    got = torch.nn.functional.layer_norm(unfolded, (4 * C,), mm["stages.0.downsample.norm.weight"],
                                         mm["stages.0.downsample.norm.bias"]) @ mm["stages.0.downsample.reduction.weight"].T
    torch.testing.assert_close(got, ref.reshape(1, -1, out))


@pytest.fixture
def mmengine_objects(monkeypatch):
    """A stand-in for mmengine's HistoryBuffer, importable under its real name while saving."""
    import sys
    import types

    class HistoryBuffer:
        def __init__(self):
            self._log_history = [1.0, 2.0]

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = "mmengine.logging.history_buffer", "HistoryBuffer"
    module = types.ModuleType("mmengine.logging.history_buffer")
    module.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, module)
    return HistoryBuffer


def test_mmpretrain_simmim_checkpoint_loads(tmp_path, mmengine_objects, monkeypatch):
    """MMSelfSup / MMPretrain's SimMIM checkpoint (open-mmlab/mmselfsup#391): weights under
    "state_dict", keys "backbone.*" in its Swin naming, mmengine's objects beside them, its config
    as text under "meta". It used to end in a 43-line AttributeError from timm's filter."""
    from simmim.trainer.export import swin_original_state_dict

    simmim = _simmim_micro()
    backbone = _to_mmpretrain(swin_original_state_dict(simmim.encoder.swin))
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state["backbone.mask_token"] = simmim.encoder.mask_token.detach().reshape(1, 1, -1)
    state["neck.decoder.0.weight"], state["neck.decoder.0.bias"] = torch.zeros(3072, 256, 1, 1), torch.zeros(3072)
    cfg = ("model = dict(type='SimMIM', backbone=dict(type='SimMIMSwinTransformer', arch='micro', img_size=64, "
           "stage_cfgs=dict(block_cfgs=dict(window_size=2))), neck=dict(type='SimMIMLinearDecoder'))\n"
           "train_pipeline = [dict(type='RandomResizedCrop', scale=192)]")
    torch.save({"meta": {"cfg": cfg, "epoch": 100}, "state_dict": state,
                "message_hub": {"log_scalars": {"train/loss": mmengine_objects()}}}, tmp_path / "epoch_100.pth")
    import sys

    for name in ("mmengine.logging.history_buffer", "mmengine.logging", "mmengine"):  # read without mmengine
        monkeypatch.delitem(sys.modules, name)
    contents = read_checkpoint(tmp_path / "epoch_100.pth")
    assert (contents.layout, contents.kind, contents.encoder_prefix) == ("MMPretrain/MMSelfSup", Kind.PRETRAINING,
                                                                          "backbone.")
    assert contents.settings == {"img_size": 64, "window_size": 2, "patch_size": 4, "in_chans": 3}
    net = build_classifier("swin_micro", 64, 5, 2, 0.0)
    report = load_pretrained(net, tmp_path / "epoch_100.pth", "swin_micro")
    assert report["missing"] == ["head.fc.weight", "head.fc.bias"] and report["unexpected"] == []
    _same_encoder(net, simmim)


@pytest.mark.parametrize("wrap", ["ddp", "compiled", "lightning", "timm_train_ema", "only_ema", "bare", "safetensors"])
def test_wrappers_and_prefixes_load(tmp_path, wrap):
    """The wrappers training code puts around the same weights: DDP's module., torch.compile's
    _orig_mod., a Lightning module's state_dict with its attribute prefix, a timm train script's
    state_dict + state_dict_ema (EMA noted, not used), an EMA copy alone, a bare state dict, a
    .safetensors file."""
    simmim = _simmim_micro()
    sd = simmim.state_dict()
    enc = {k.removeprefix("encoder.swin."): v for k, v in sd.items() if k.startswith("encoder.swin.")}
    path = tmp_path / "w.pth"
    note = None
    if wrap == "ddp":
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif wrap == "compiled":
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}}, path)
    elif wrap == "lightning":
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                    "hyper_parameters": {"lr": 1e-3}}, path)
    elif wrap == "timm_train_ema":
        torch.save({"state_dict": enc, "state_dict_ema": {k: v + 1 for k, v in enc.items()}, "epoch": 3}, path)
        note = "an EMA copy 'state_dict_ema' is there too, not used"
    elif wrap == "only_ema":
        torch.save({"model_ema": sd}, path)
        note = "only an EMA copy of the weights ('model_ema') is there: using it"
    elif wrap == "bare":
        torch.save(enc, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in enc.items()}, path)
    net = build_classifier("swin_micro", 64, 5, 2, 0.0)
    report = load_pretrained(net, path, "swin_micro")
    assert report["missing"] == ["head.fc.weight", "head.fc.bias"] and report["unexpected"] == [], report
    _same_encoder(net, simmim)
    assert (note in report["notes"][0]) if note else report["notes"] == []


def test_timm_export_folder_loads_with_its_config(tmp_path):
    """`simmim export`'s folder (timm / HF hub: model.safetensors + config.json) is a checkpoint too;
    its sizes come from config.json."""
    from simmim.trainer.export import export

    simmim = _simmim_micro()
    torch.save({"model": simmim.state_dict(), "config": PRE_CFG}, tmp_path / "c.pt")
    folder = export(tmp_path / "c.pt", tmp_path / "exported")
    contents = read_checkpoint(folder)
    assert (contents.format, contents.layout, contents.kind) == ("safetensors", "timm", Kind.ENCODER)
    assert contents.settings == {"img_size": 64, "window_size": 2, "patch_size": 4, "in_chans": 3}
    net = build_classifier("swin_micro", 64, 5, 2, 0.0)
    assert load_pretrained(net, folder, "swin_micro")["unexpected"] == []
    _same_encoder(net, simmim)


def test_swinv2_uses_the_recorded_window_or_says_it_cannot_know(tmp_path):
    """A SwinV2 position bias is normalised by its pre-training window: the released code's config
    gives it; a bare state dict cannot, and fine-tuning says so in one line naming the keys, then
    uses them."""
    simmim = _simmim_micro("swinv2_micro", 64, 2)
    enc = {f"encoder.{k.removeprefix('encoder.swin.')}": v for k, v in simmim.state_dict().items()
           if k.startswith("encoder.swin.")}
    released = {"MODEL": {"TYPE": "swinv2", "SWINV2": {"WINDOW_SIZE": 2, "PATCH_SIZE": 4}}, "DATA": {"IMG_SIZE": 64}}
    torch.save({"model": enc, "config": released}, tmp_path / "released.pth")
    net = build_classifier("swinv2_micro", 64, 5, 4, 0.0)
    report = load_pretrained(net, tmp_path / "released.pth", "swinv2_micro")
    assert report["layout"] == "microsoft/SimMIM" and net.layers[0].blocks[0].attn.pretrained_window_size == (2, 2)
    torch.save({k.removeprefix("encoder."): v for k, v in enc.items()}, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="does not record the img_size and window_size .* set "
                                              "finetune.pretrained_img_size, finetune.pretrained_window_size") as e:
        load_pretrained(build_classifier("swinv2_micro", 64, 5, 4, 0.0), tmp_path / "bare.pth", "swinv2_micro")
    assert "\n" not in str(e.value)
    net = build_classifier("swinv2_micro", 64, 5, 4, 0.0)
    load_pretrained(net, tmp_path / "bare.pth", "swinv2_micro", {"img_size": 64, "window_size": 2})
    assert net.layers[0].blocks[0].attn.pretrained_window_size == (2, 2)


def test_unknown_layouts_are_one_line(tmp_path):
    torch.save({"state_dict": {"swin.embeddings.patch_embeddings.projection.weight": torch.zeros(4, 3, 4, 4)}},
               tmp_path / "hf.bin")
    torch.save({"model": {"conv1.weight": torch.zeros(4, 3, 7, 7)}}, tmp_path / "resnet.pth")
    torch.save({"epoch": 3, "args": [1, 2]}, tmp_path / "nothing.pth")
    for name, message in (("hf.bin", "is a Hugging Face transformers model"),
                          ("resnet.pth", "holds no encoder this project knows"), ("nothing.pth", "holds no model weights")):
        with pytest.raises(CheckpointError, match=message) as e:
            load_pretrained(build_classifier("swin_micro", 64, 5, 2, 0.0), tmp_path / name, "swin_micro")
        assert "\n" not in str(e.value) and "expected a simmim checkpoint" in str(e.value), str(e.value)


# ---------------------------------------------------------------- class names

def _always_predicts_last_class(tmp_path, classes) -> Path:
    """A fine-tuning checkpoint (this project's layout) whose classifier predicts the last class for
    every image, with `classes` recorded (None: not recorded, as the released code's)."""
    cfg = FinetuneConfig()
    cfg.model.arch, cfg.model.window_size, cfg.data.img_size = "swin_micro", 2, 64
    cfg.data.num_workers, cfg.data.batch_size, cfg.train.device = 0, 8, "cpu"
    net = build_classifier("swin_micro", 64, 5, 2, 0.0)
    with torch.no_grad():
        net.head.fc.weight.zero_()
        net.head.fc.bias.copy_(torch.tensor([0.0, 0, 0, 0, 50]))
    model = Classifier(net)
    extra = {"classes": classes} if classes is not None else {}
    return TorchSaveCheckpointer(tmp_path / "ft", True).save(
        1, model, torch.optim.AdamW(model.parameters()), {"train_state": {}, "config": cfg.to_dict(), **extra})


def _val_copy(sample_root, dst: Path, drop=(), add=()) -> Path:
    import shutil

    shutil.copytree(sample_root / "val", dst)
    for name in drop:
        shutil.rmtree(dst / name)
    for name in add:
        first = next((sample_root / "val").rglob("*.JPEG"))
        (dst / name).mkdir()
        shutil.copy(first, dst / name / first.name)
    return dst


def test_evaluation_maps_class_folders_by_name(tmp_path, sample_root):
    """A missing class folder moves no other label (it used to shift every later one: top-1 76.9%
    -> 7.7% on the same images, exit 0); a folder the head does not know is one line (it used to be
    an IndexError traceback)."""
    from simmim.core.errors import DatasetError

    classes = sorted(p.name for p in (sample_root / "val").iterdir())
    per_class = {c: len(list((sample_root / "val" / c).glob("*.JPEG"))) for c in classes}
    total = sum(per_class.values())
    ckpt = _always_predicts_last_class(tmp_path, classes)
    assert read_checkpoint(ckpt).classes == classes
    full = evaluate_checkpoint(str(ckpt), str(sample_root / "val"), "torch")
    assert full["top1"] == pytest.approx(100 * per_class[classes[-1]] / total)
    missing = _val_copy(sample_root, tmp_path / "missing", drop=[classes[0]])
    result = evaluate_checkpoint(str(ckpt), str(missing), "torch")
    assert result["val_images"] == total - per_class[classes[0]]
    assert result["top1"] == pytest.approx(100 * per_class[classes[-1]] / (total - per_class[classes[0]]))
    extra = _val_copy(sample_root, tmp_path / "extra", add=["aardvark"])
    with pytest.raises(DatasetError, match=r"has classes the classifier was not trained on: aardvark \(it knows 5") as e:
        evaluate_checkpoint(str(ckpt), str(extra), "torch")
    assert "\n" not in str(e.value)


def test_class_map_without_names_keeps_indices():
    from simmim.core.errors import DatasetError
    from simmim.trainer.finetune import class_map

    assert class_map(["b", "c"], ["a", "b", "c"], 3, "x").tolist() == [1, 2]
    assert class_map(["0", "1"], ["a", "b", "c"], 3, "x") is None  # a list file without its classes file
    assert class_map(["a", "b"], None, 3, "x") is None  # a checkpoint that records no names
    with pytest.raises(DatasetError, match="has 4 classes; the classifier has 3 outputs"):
        class_map(["a", "b", "c", "d"], None, 3, "x")
