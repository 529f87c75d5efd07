import json
import math

import pytest
import torch

from simmim.benchmarks import avg_dist, kernels, step


def test_avgdist_bench_writes_outputs(tmp_path):
    tables = avg_dist.main(["--out", str(tmp_path), "--samples", "16"])
    assert set(tables) == {"random", "square", "block"}
    table = tables["random"]
    assert set(table) == {4, 8, 16, 32, 64} and len(table[32]) == 9
    assert table[4][0.6] < table[8][0.6] < table[16][0.6] < table[32][0.6] < table[64][0.6]
    assert math.isnan(table[64][0.9])  # 9 cells at 192/64: ceil(0.9 * 9) = 9 masks them all
    # one square lies further from the visible pixels than scattered cells of the same size
    assert tables["square"][8][0.5] > 2 * table[8][0.5] and tables["block"][8][0.5] > table[8][0.5]
    assert (tmp_path / "avgdist.png").stat().st_size > 0
    assert all((tmp_path / f"masks_{s}.png").stat().st_size > 0 for s in tables)
    saved = json.loads((tmp_path / "avgdist.json").read_text())
    assert saved["input_size"] == 192 and saved["masked_fraction"]["square"]["32"]["0.6"] == 25 / 36


def test_kernels_bench_checks_correctness_on_cpu(tmp_path):
    out = kernels.main(["--out", str(tmp_path)])
    assert len(out["checks"]) == 6 and all(c["ok"] for c in out["checks"])  # 2 shapes x 3 ops
    assert list(tmp_path.glob("kernels-*/kernels.md"))


def test_step_bench_synthetic_and_loader(tmp_path, sample_root):
    rows = step.main(["--models", "vit_micro", "--batch", "4", "--steps", "2", "--warmup", "1",
                      "--out", str(tmp_path), "--kernels", "reference"])
    (r,) = rows
    assert r["img_per_s"] > 0 and r["gflops_per_image"] > 0.1 and r["mfu_pct"] is None
    rows = step.main(["--models", "vit_micro", "--batch", "4", "--steps", "2", "--warmup", "1", "--data", "loader",
                      "--data-path", str(sample_root / "train"), "--workers", "0", "--out", str(tmp_path),
                      "--no-fused-shuffle"])
    assert not rows[0]["fused_shuffle"] and r["fused_shuffle"]
    assert rows[0]["data_wait_pct"] > 0
    files = {p.name for p in next(tmp_path.glob("step-*")).iterdir()}
    assert {"step-fp32-reference-synthetic.md", "step-fp32-auto-loader-shuffle.json",
            "step-fp32-auto-loader-shuffle.png"} <= files


def test_flops_counted_exactly_at_full_size():
    """ViT-B/16 at 224 is ~17.6 G multiply-adds forward, 35 GFLOPs; a step (forward + backward) ~3x.
    Counted on the meta device: shapes only, no memory, no compute."""
    import torch

    from simmim.trainer.model import build_simmim

    meta = torch.device("meta")
    with meta:
        model = build_simmim("vit_base", 224, 32)
    gflops = step.flops_per_image(model, 224, 1, meta, None) / 1e9
    assert 95 < gflops < 112
    assert step.flops_per_image(model, 224, 2, meta, None) / 1e9 == gflops  # per image, whatever the batch


def test_bench_runs_through_the_simmim_command(tmp_path, capsys):
    """`simmim bench NAME` runs through the `simmim` console script (cli/main.py); the trainer's CLI has
    no bench."""
    from simmim.cli.main import main
    from simmim.trainer import cli as trainer_cli

    main(["bench", "avgdist", "--out", str(tmp_path), "--samples", "4", "--strategies", "random"])
    assert (tmp_path / "avgdist.json").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        trainer_cli.main(["bench", "avgdist"])
    assert e.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err


def test_claims_flop_table_at_full_size(tmp_path):
    from simmim.benchmarks import claims

    rows = {r["method"]: r for r in claims.main(["--no-timing", "--out", str(tmp_path)])}
    assert set(rows) == set(claims.METHODS)
    assert 100 < rows["SimMIM"]["gflops_per_image"] < 112  # ViT-B/16 step, all tokens
    assert rows["MAE"]["flops_vs_simmim_per_image"] < 0.7  # encoder on a quarter of the tokens
    assert rows["DINO"]["flops_vs_simmim_per_image"] > 4  # 12 crops through the student, 2 through the teacher
    assert 2.4 < rows["MoCo v3"]["flops_vs_simmim_per_image"] < 2.9  # 2 views + momentum encoder forward
    assert rows["BEiT"]["cost_vs_simmim_flops"] > 1.2  # tokenizer forward on top of the same ViT-B
    report = next(tmp_path.glob("claims-*/claims.md")).read_text()
    assert "paper's claim" in report and "reproduces" in report
    heads = json.loads(next(tmp_path.glob("claims-*/claims.json")).read_text())["heads"]
    assert [h["head"] for h in heads] == ["linear", "mlp", "inverse_swin_t", "inverse_swin_b"]
    assert heads[1]["flops_vs_linear"] < 1.05 and 1.5 < heads[3]["flops_vs_linear"] < 2.6


def test_loaders_bench_same_images_every_loader(tmp_path, sample_root):
    """Ours beside the plain pipelines, interleaved rounds, every ratio per round (FFCV, whose two
    numba compilations take a minute, is in the slow tier's tests/test_loader_ratios.py)."""
    from simmim.benchmarks import loaders

    out = loaders.main(["--data", str(sample_root / "val"), "--size", "64", "--batch", "4", "--workers", "1",
                        "--rounds", "2", "--backends", "torch,dali", "--out", str(tmp_path)])
    rows = {r["loader"]: r for r in out["rows"]}
    assert list(rows) == ["torchvision (plain)", "released SimMIM", "torch", "dali (plain)", "dali"]
    n = out["images"] // 4 * 4
    assert all(r["images"] == n and r["img_per_s"] > 0 and r["rounds"] == 2 for r in rows.values())
    # each epoch's start (time to its first batch) is timed apart, and a steady rate given beside
    # the overall one (no ordering between the two is asserted: that would be a timed test)
    assert all(r["epoch_start_s"] >= 0 and r["steady_img_per_s"] > 0 for r in rows.values())
    assert all(r["cpu_ms_per_img"] >= r["main_cpu_ms_per_img"] > 0 for r in rows.values())
    assert rows["torch"]["plain"] == "torchvision (plain)" and rows["dali"]["plain"] == "dali (plain)"
    for name in ("torch", "dali"):  # a per-round ratio: its median lies within its own min-max
        ratio = rows[name]["ratios"]["x plain"]
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
        assert set(rows[name]["ratios"]) == {"x plain", "x torchvision", "x released"}
    assert not rows["torchvision (plain)"]["ratios"] and out["rounds_done"] == 2
    folder = next(tmp_path.glob("loaders-*"))
    assert {p.name for p in folder.iterdir()} == {"loaders.md", "loaders.json", "loaders.png"}
    assert "x plain" in (folder / "loaders.md").read_text()


def test_released_simmim_transform_masks_like_the_release():
    """The restated released SimMIM mask: ceil(0.6 * 36) = 22 of the 6 x 6 cells, each an 8 x 8
    block of the 48 x 48 patch grid (Swin's 4 px patches at 192 px)."""
    import numpy as np
    from PIL import Image

    from simmim.benchmarks.plain_loaders import ReleasedSimMIMTransform

    t = ReleasedSimMIMTransform(lambda img: np.asarray(img), 192)
    image, mask = t(Image.new("L", (200, 150)))
    assert image.shape == (150, 200, 3) and mask.shape == (48, 48)
    cells = mask.reshape(6, 8, 6, 8)
    assert (cells == cells[:, :1, :, :1]).all() and cells[:, 0, :, 0].sum() == 22


def test_synthetic_jpegs_are_imagenet_sized(tmp_path):
    from PIL import Image

    from simmim.benchmarks.loaders import synthetic_jpegs

    root = synthetic_jpegs(tmp_path, 6, classes=2)
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 6 and len({f.parent for f in files}) == 2
    sizes = [Image.open(f).size for f in files]
    assert all(400 <= max(s) <= 500 and min(s) >= 300 for s in sizes)


def test_memory_bench_extrapolates_activations_and_counts_on_meta():
    """The activation estimate from a two-blocks-per-stage model, scaled to the real depths,
    matches a direct measurement of the real model; parameters are counted on the meta device."""
    import torch

    from simmim.benchmarks.memory import (DDP_BYTES, activation_bytes, measure_activations, parameter_counts,
                                          saved_bytes)
    from simmim.trainer.model import ARCHS, build_simmim

    act = measure_activations("swinv2_micro", 64, 2, torch.device("cpu"), None)
    assert act["per_image"]["other"] > 0 and all(s > 0 and i > 0 for s, i in act["per_image"]["per_stage"])
    torch.manual_seed(0)
    model = build_simmim("swinv2_micro", 64, 32, 2)  # depths (1, 1, 2, 1)
    saved, _ = saved_bytes(model, 3, 64, torch.device("cpu"), None)
    direct = sum(saved.values())
    estimate = activation_bytes(act, ARCHS["swinv2_micro"].depths, 3, False)
    assert abs(estimate - direct) / direct < 0.05, (estimate, direct)
    with_ac = activation_bytes(act, ARCHS["swinv2_micro"].depths, 3, True)
    assert 0 < with_ac < estimate
    counts = parameter_counts("swinv2_giant", 192, 12)
    assert 2.95e9 < counts["total"] < 3.1e9 and counts["max_block"] < counts["total"] / 10
    assert DDP_BYTES == 22


@pytest.mark.slow  # ~15 s of CPU: four child processes each import torch
def test_scale_bench_small_tree(tmp_path):
    """The scale bench end to end on a 60-entry tree (listing, scan, orders): a table, JSON and
    PNG, and the tree it built removed."""
    from simmim.benchmarks import scale

    tree = tmp_path / "tree"
    result = scale.main(["--n", "60", "--classes", "4", "--distinct", "15", "--tree", str(tree), "--workers", "1",
                         "--steps", "listing,scan,orders", "--scan-n", "400", "--scan-real", "20",
                         "--orders", "1000", "--out", str(tmp_path / "results")])
    steps = result["steps"]
    assert not any("error" in v for v in steps.values()), steps
    assert steps["listing"]["entries"] == 60 and steps["scan"]["real_bad"] == 0
    assert steps["orders"]["order_s_1000_world8"] >= 0
    assert not tree.exists()
    out = next((tmp_path / "results").glob("scale-*"))
    assert (out / "scale.png").stat().st_size > 0 and "scan bookkeeping" in (out / "scale.md").read_text()


class Stopped(Exception):
    """Stands in for the time limit's TERM arriving while a benchmark runs."""


def test_stopped_benchmarks_keep_what_they_finished(tmp_path, monkeypatch):
    """gpu_check.sh stops a step at its limit: step, kernels and claims write their JSON after every
    model, shape and method, so what finished is in the archive. Here the second of each stops."""
    import pytest

    from simmim.benchmarks import claims

    def second_stops(real):
        calls = []

        def wrapped(*args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise Stopped
            return real(*args, **kw)
        return wrapped

    monkeypatch.setattr(step, "measure", second_stops(lambda name, *a, **k: {
        "model": name, "image_size": 128, "batch": 1, "precision": "fp32", "compiled": False, "kernels": "reference",
        "fused_shuffle": True, "data": "synthetic", "loader": None, "img_per_s": 5.0, "step_ms": 200.0,
        "data_wait_pct": 0.0, "gflops_per_image": 1.0, "tflops": 0.005, "mfu_pct": None, "peak_mem_gib": None}))
    with pytest.raises(Stopped):
        step.main(["--models", "vit_micro,swin_mini", "--out", str(tmp_path), "--tag", "t"])
    saved = json.loads(next(tmp_path.glob("step-*/step-fp32-auto-synthetic-t.json")).read_text())
    assert [r["model"] for r in saved["rows"]] == ["vit_micro"]

    monkeypatch.setattr(kernels, "check_correctness", second_stops(kernels.check_correctness))
    with pytest.raises(Stopped):
        kernels.main(["--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("kernels-*/kernels.json")).read_text())
    assert {c["shape"] for c in saved["checks"]} == {"swin_b_192"} and len(saved["checks"]) == 3

    monkeypatch.setattr(claims, "images_per_sec", second_stops(lambda *a: 7.0))
    with pytest.raises(Stopped):
        claims.main(["--methods", "MAE,SimMIM", "--steps", "1", "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("claims-*/claims.json")).read_text())
    timed = {r["method"]: r.get("img_per_s") for r in saved["rows"]}
    assert timed["SimMIM"] == 7.0 and timed["MAE"] is None  # SimMIM timed first, whatever the order given
    assert len(timed) == len(claims.METHODS) and saved["heads"] == []
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes leave no temporary files


def test_claims_edits_tokens_through_public_timm_api():
    """claims.features_with reaches inside timm's ViT only through forward_features and torch
    hooks (no private `_pos_embed`): both hooks take effect, and the masked encoder matches the
    computation written out by hand (class token, position table, blocks, norm)."""
    from timm.models.vision_transformer import VisionTransformer

    from simmim.benchmarks import claims

    v = VisionTransformer(img_size=48, patch_size=16, embed_dim=16, depth=1, num_heads=2, num_classes=0).eval()
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(claims.features_with(v, x), v.forward_features(x))
    assert claims.features_with(v, x, tokens=lambda t: t[:, :4]).shape == (2, 4, 16)  # cls + 3 of 9
    masks = torch.zeros(2, 9, dtype=torch.bool)
    masks[0, [1, 5]] = masks[1, 8] = True
    token = torch.randn(16)
    t = torch.where(masks[..., None], token, v.patch_embed(x))
    ref = v.norm(v.blocks(torch.cat([v.cls_token.expand(2, -1, -1), t], 1) + v.pos_embed))[:, 1:]
    torch.testing.assert_close(claims.masked_tokens(v, x, masks, token), ref)


def test_compare_trees_pairs_rounds_and_reads_the_ratios():
    """Old against new: per-round new / old of each of ours, the new run's ratios to plain beside."""
    import argparse

    from simmim.benchmarks import compare_trees

    def new_run(torch_rate, plain_ratio):
        ratios = {k: {"median": plain_ratio} for k in ("x plain", "x torchvision", "x released")}
        return {"rows": [{"loader": "torchvision (plain)", "ours": False, "img_per_s": 100.0, "ratios": {}},
                         {"loader": "torch", "ours": True, "img_per_s": torch_rate, "ratios": ratios}]}

    old = [{"rows": [{"loader": "torch", "img_per_s": 50.0}]}, {"rows": [{"loader": "torch", "img_per_s": 80.0}]}]
    rows = compare_trees.summary(old, [new_run(100.0, 1.3), new_run(120.0, 1.2)])
    assert [r["loader"] for r in rows] == ["torch"]
    assert rows[0]["new_over_old"] == [2.0, 1.5] and rows[0]["x plain"] == [1.3, 1.2]
    args = argparse.Namespace(old="/old", synthetic=10, data="", size=192, batch=32, workers=2)
    table = compare_trees.markdown(rows, args, "CPU", 2)
    assert "| torch | 65 [50-80] | 110 [100-120] | 1.75 [1.50-2.00] | 1.25 [1.20-1.30] |" in table
