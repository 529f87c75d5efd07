"""`data.backend: stream` decoded by DALI (`data.stream.decode: dali`; issue 27, item 4), run on
DALI's CPU decoder here (`device_id=None`): the file loader's DALI views bit for bit and the PIL
path's to the JPEG decoder, the stream loader's order, masks and exact resume, the evaluation view,
a lost shard and an undecodable file in one line, and the choice of decoder."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("streaming", reason="the stream extra (pip install -e '.[stream]')")
pytest.importorskip("nvidia.dali", reason="the dali extra (pip install -e '.[dali]')")

from test_stream import AUG, TINY, epoch, loader, shards  # noqa: E402,F401 - the shards fixture too

from simmim.core.errors import ConfigError, DatasetError, ShardError  # noqa: E402
from simmim.pipeline import MaskGenerator, loaders  # noqa: E402
from simmim.pipeline.options import DALIOptions  # noqa: E402
from simmim.pipeline.dali_loader import DALILoader  # noqa: E402
from simmim.pipeline.stream_dali import StreamDALILoader  # noqa: E402
from simmim.pipeline.stream_dataset import StreamShards  # noqa: E402
from simmim.pipeline.stream_loader import StreamLoader  # noqa: E402
from helpers import HOSTILE_GOOD, make_loader, make_hostile  # noqa: E402

MASKS = MaskGenerator(64, 32, 0.6)


def dali(path, **kw):
    return loader(path, decode="dali", **kw)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised batches in uint8 levels."""
    return ((a - b) * torch.tensor(AUG.std).view(1, 3, 1, 1) * 255).abs().round()


def test_views_are_the_dali_file_loaders_and_the_pil_paths_to_the_decoder(sample_root, shards):
    """Each training view is, bit for bit, the DALI file loader's view of one sample (the same box
    keyed by its index, the same decoder), each sample once; against the PIL path (same order,
    same masks) only the JPEG decoder differs: within a uint8 level."""
    got = epoch(dali(shards, masks=MASKS), 2)
    files = make_loader(DALILoader, str(sample_root / "train"), AUG, None, 4, 1, seed=3)
    ref = torch.cat([b[0] for b in epoch(files, 2)])
    views = torch.cat([b[0] for b in got])
    match = [[j for j in range(len(ref)) if torch.equal(v, ref[j])] for v in views]
    assert all(len(m) == 1 for m in match) and len({m[0] for m in match}) == len(views) == 60
    pil = epoch(loader(shards, masks=MASKS), 2)
    assert len(pil) == len(got) == 15 and all(torch.equal(a[1], b[1]) for a, b in zip(pil, got))
    diff = levels(torch.cat([b[0] for b in pil]), views)
    assert float(diff.max()) <= 1 and float(diff.mean()) < 0.05


def test_resume_and_any_epoch_sequence_with_workers(shards):
    """Resumed at batch 6 with 2 workers: the uninterrupted epoch's batches 6.. bit for bit; an
    epoch left after two batches, then others run, again or skipped: each epoch's batches."""
    full = epoch(dali(shards, masks=MASKS), 1)
    resumed = dali(shards, masks=MASKS, workers=2)
    assert [torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[6:], epoch(resumed, 1, 6))] \
        == [True] * 9
    it = iter(resumed.set_epoch(4) or resumed)
    next(it), next(it)
    it.close()
    main = dali(shards, masks=MASKS)
    for e, start in [(1, 0), (0, 3), (1, 0)]:
        got, want = epoch(resumed, e, start), epoch(main, e, start)
        assert len(got) == len(want) == 15 - start and all(torch.equal(a[0], b[0]) for a, b in zip(got, want))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, epoch(main, 1)))


def test_evaluation_view_reads_every_sample_once(shards):
    got = epoch(dali(shards, batch_size=7, train=False), 0)
    pil = epoch(loader(shards, batch_size=7, train=False), 0)
    assert [len(b[0]) for b in got] == [len(b[0]) for b in pil] == [7] * 8 + [4]
    assert float(levels(torch.cat([b[0] for b in got]), torch.cat([b[0] for b in pil])).max()) <= 1


def test_a_lost_shard_ends_the_epoch_in_one_line_after_the_batches_before_it(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "shard.00003.mds").unlink()
    ld, got = dali(broken), []
    ld.set_epoch(0)
    with pytest.raises(ShardError, match=r"^shard shard\.00003\.mds of .*broken is missing; write the set again"):
        for batch in ld:
            got.append(batch)
    assert 0 < len(got) < 15  # the batches before the shard were handed over
    assert len(epoch(dali(shards), 0)) == 15  # the intact set, for comparison


def test_a_file_dali_cannot_decode_is_one_line_naming_it(shards, tmp_path, monkeypatch):
    """The shards hold checked files, so only a damaged shard gets here: a stored file replaced
    by a truncated JPEG (its header reads, DALI refuses the rest) is named with the fix."""
    bad = make_hostile(tmp_path) / "n0" / "truncated.JPEG"
    real = StreamShards.encoded_sample

    def damaged(obj, label):
        sample = real(obj, label)
        if sample.index == 7:
            data = np.fromfile(bad, np.uint8)
            return sample._replace(data=data, size=real({"image": data.tobytes(), "index": 7}, label).size,
                                   path="n0/truncated.JPEG")
        return sample

    monkeypatch.setattr(StreamShards, "encoded_sample", staticmethod(damaged))
    with pytest.raises(DatasetError) as e:
        epoch(dali(shards), 0)
    msg = str(e.value)
    assert "\n" not in msg and "cannot decode 'n0/truncated.JPEG'" in msg and "simmim shard SRC" in msg, msg


def test_the_decoder_is_chosen_by_data_stream_decode(shards, monkeypatch):
    assert type(loader(shards)) is StreamLoader  # auto on the CPU: PIL, the torch backend's pixels
    assert type(dali(shards)) is StreamDALILoader
    assert loaders.stream_decoder("auto", torch.device("cuda")) == "dali"  # DALI is installed here
    monkeypatch.setattr(loaders, "available", lambda backend: backend != "dali")
    assert loaders.stream_decoder("auto", torch.device("cuda")) == "pil"
    with pytest.raises(DatasetError, match=r"data.stream.decode=dali needs DALI, which is not installed: pip"):
        dali(shards)
    with pytest.raises(ConfigError, match="data.stream.decode must be one of auto, pil, dali, got 'nvjpeg'"):
        loaders.stream_decoder("nvjpeg", torch.device("cpu"))


def test_pretrain_decodes_shards_with_dali(shards, tmp_path):
    """A run from the command line's config with data.stream.decode=dali trains, says what
    decodes, and resumes (with the PIL decoder: the data is the same)."""
    from simmim.trainer.checkpoint import all_checkpoints
    from simmim.trainer.config import load_config
    from simmim.trainer.pretrain import pretrain

    args = [f"data.path={shards}", f"run.out_dir={tmp_path / 'run'}", *TINY, "data.stream.decode=dali"]
    pretrain(load_config("demo", [*args, "train.epochs=1"]))
    assert " data stream (DALI decoding on the CPU): 60 images" in (tmp_path / "run" / "log.txt").read_text()
    pretrain(load_config("demo", [*args, "train.epochs=2", "data.stream.decode=pil"]))  # a decoder may change
    assert all_checkpoints(tmp_path / "run")[-1][0] == 14  # two epochs of 7 steps
    with pytest.raises(ConfigError, match="data.stream.decode"):
        load_config("demo", [*args, "data.stream.decode=gpu"])


def test_a_process_that_leaves_an_epoch_with_workers_exits(shards):
    """The workers hand over the stored files through their result pipe (not shared memory): a
    process that leaves an epoch with batches still queued must still exit (a worker flushing a
    full pipe at interpreter exit used to block it forever)."""
    script = (f"from test_stream import loader\n"
              f"ld = loader({str(shards)!r}, workers=1, decode='dali', predownload=64)\n"
              f"ld.set_epoch(0)\nit = iter(ld)\nnext(it)\nprint('left the epoch', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "left the epoch" in out.stdout, out.stderr[-2000:]


def test_gpu_graph_is_valid(shards):
    """The GPU graph over the shards' feed (nvJPEG with the hardware decoder, DALI's resize and
    normalisation) cannot run here, but DALI checks every operator's device and arguments against
    its schema when the pipeline is serialised: the same graph as the file loader's, fed in process."""
    ld = loader(shards, decode="dali", dali=DALIOptions(hw_decoder_load=0.5))
    ld.graph.decode = "mixed"  # as chosen on a CUDA device; device_id stays None to build no GPU state
    for train in (True, False):
        ld.graph.train = train
        graph = ld.graph.pipeline(ld.feed, 0, 0).serialize()
        assert graph.count(b"mixed") >= 1 and graph.count(b"gpu") >= 2 and b"hw_decoder_load" in graph
