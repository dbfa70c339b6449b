"""Streaming data (polyformer.streaming, litdata): `polyformer stream` writes a data module's splits as chunks that
the same data module reads back sample for sample; two ranks are dealt disjoint samples that together are the whole
split, every epoch; a run killed mid-epoch and resumed sees exactly the samples an uninterrupted run sees; streams of
another data set or format are refused naming both."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polyformer.cli import main
from polyformer.domains.longrange.data import ListOpsDataModule, TextDataModule
from polyformer.domains.longrange.listops import ListOpsSpec
from polyformer.streaming import MANIFEST, StreamConfig, StreamError

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from record_batches import sample_id  # noqa: E402
from subprocess_fit import polyformer_fit  # noqa: E402

CONFIG = ROOT / "configs" / "longrange" / "listops.yaml"
# 48 training expressions of 20-60 tokens and a 2.7 k-parameter model: 6 batches of 8 an epoch
TINY = ["--data.init_args.spec.train=48", "--data.init_args.spec.val=16", "--data.init_args.spec.test=16",
        "--data.init_args.spec.min_len=20", "--data.init_args.spec.max_len=60", "--data.init_args.max_len=60",
        "--model.init_args.model.transformer.dim=16", "--model.init_args.model.transformer.depth=1",
        "--model.init_args.model.transformer.max_len=60"]
FIT = ["--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=0",
       "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.max_time=null"]


def write_listops_stream(folder: Path) -> Path:
    main(["stream", "-c", str(CONFIG), *TINY, f"--data.init_args.cache={folder / 'cache'}", "--out",
          str(folder / "stream")])
    return folder / "stream"


@pytest.fixture(scope="module")
def listops_stream(tmp_path_factory) -> Path:
    return write_listops_stream(tmp_path_factory.mktemp("listops"))


def in_memory(folder: Path, stage: str = "fit") -> ListOpsDataModule:
    data = ListOpsDataModule(spec=ListOpsSpec(train=48, val=16, test=16, min_len=20, max_len=60, seed=0),
                             max_len=60, cache=str(folder / "cache"))
    data.setup(stage)
    return data


def ids(dataset) -> list[str]:
    return [sample_id(tokens, torch.zeros(len(tokens), dtype=torch.bool)) for tokens, _ in dataset]


def test_a_stream_reads_back_every_sample_of_each_split(listops_stream):
    memory = in_memory(listops_stream.parent)
    streamed = ListOpsDataModule(max_len=60, stream=StreamConfig(str(listops_stream)))
    streamed.setup("fit")
    for split in ("train", "val"):
        manifest = json.loads((listops_stream / split / MANIFEST).read_text())
        assert manifest["dataset"] == "longrange.listops" and manifest["samples"] == len(memory.splits[split])
        expected = {sample_id(t, torch.zeros(len(t), dtype=torch.bool)): label for t, label in memory.splits[split]}
        found = {sample_id(t, torch.zeros(len(t), dtype=torch.bool)): label for t, label in streamed.splits[split]}
        assert found == expected, split
    # the training split is shuffled per epoch from the run's seed, validation read in order
    loader = streamed.train_dataloader()
    epochs = [[sample_id(t, p) for batch in loader for t, p in zip(batch["tokens"], batch["padding"])]
              for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(ids(memory.splits["train"]))
    assert epochs[0] != epochs[1]
    assert [sample_id(t, p) for b in streamed.val_dataloader() for t, p in zip(b["tokens"], b["padding"])] == \
        ids(memory.splits["val"])


def test_a_stream_of_another_data_set_or_format_is_refused_naming_both(listops_stream, tmp_path):
    with pytest.raises(StreamError, match="written from data set 'longrange.listops', but this data module reads "
                                          "'longrange.text'"):
        TextDataModule(stream=StreamConfig(str(listops_stream))).setup("fit")
    old = tmp_path / "old"
    for split in ("train", "val"):
        (old / split).mkdir(parents=True)
        manifest = json.loads((listops_stream / split / MANIFEST).read_text())
        (old / split / MANIFEST).write_text(json.dumps({**manifest, "format": 0, "polyformer": "0.0.1"}))
    with pytest.raises(StreamError, match=r"written by Polyformer 0.0.1 \(stream format 0\), this is Polyformer .* "
                                          r"\(stream format 1\): write it again"):
        ListOpsDataModule(max_len=60, stream=StreamConfig(str(old))).setup("fit")
    with pytest.raises(ValueError, match=r"was written for \{'max_len': 60, 'num_classes': 10, 'vocab_size': 17\}, "
                                         r"this data module expects .*'max_len': 2000"):
        ListOpsDataModule(stream=StreamConfig(str(listops_stream))).setup("fit")
    with pytest.raises(StreamError, match="expected a split folder written by `polyformer stream`.*no such folder"):
        ListOpsDataModule(stream=StreamConfig(str(tmp_path / "nothing"))).setup("fit")
    with pytest.raises(SystemExit, match="expected a new or empty folder"):
        main(["stream", "-c", str(CONFIG), *TINY, f"--data.init_args.cache={listops_stream.parent / 'cache'}",
              "--out", str(listops_stream), "--splits", "val"])


def fit(folder: Path, stream: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """`polyformer fit` of tiny ListOps on the stream in its own process(es), recording every step's samples."""
    return polyformer_fit(folder, [CONFIG], "record_batches.RecordBatches", *TINY, *FIT,
                          f"--data.init_args.stream.uri={stream}", *extra, kill_at=kill_at, timeout=600)


def steps(folder: Path, rank: int = 0) -> dict[int, dict]:
    """step → its record; a step recorded twice (begun, killed, resumed) keeps its last record."""
    lines = (folder / f"batches_rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


@pytest.mark.timeout(600)
def test_two_ranks_are_dealt_disjoint_samples_that_cover_the_split_every_epoch(listops_stream, tmp_path):
    result = fit(tmp_path, listops_stream, "--trainer.devices=2", "--trainer.strategy=ddp",
                 "--data.init_args.stream.batch_size=8", "--trainer.max_epochs=2")
    assert result.returncode == 0, result.stderr[-4000:]
    every = sorted(ids(in_memory(listops_stream.parent).splits["train"]))
    ranks = [steps(tmp_path, rank) for rank in (0, 1)]
    for epoch in (0, 1):
        seen = [[s for r in rank.values() if r["epoch"] == epoch for s in r["samples"]] for rank in ranks]
        assert len(seen[0]) == len(seen[1]) == 24, epoch  # 48 samples: 3 batches of 8 on each rank
        assert not set(seen[0]) & set(seen[1]), f"epoch {epoch}: a sample went to both ranks"
        assert sorted(seen[0] + seen[1]) == every, f"epoch {epoch}: a sample was lost or repeated"


@pytest.mark.timeout(600)
def test_a_run_killed_mid_epoch_resumes_with_exactly_the_samples_of_an_uninterrupted_run(listops_stream, tmp_path):
    common = ["--trainer.max_epochs=3", "--data.init_args.stream.batch_size=8",
              "--checkpoint.every_n_train_steps=2"]
    whole = fit(tmp_path / "whole", listops_stream, *common)
    assert whole.returncode == 0, whole.stderr[-4000:]
    killed = fit(tmp_path / "killed", listops_stream, *common, kill_at=9)  # 6 steps an epoch: mid-way through the 2nd
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    resumed = fit(tmp_path / "killed", listops_stream, *common, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected, found = steps(tmp_path / "whole"), steps(tmp_path / "killed")
    assert sorted(found) == sorted(expected) == list(range(18))
    for step in expected:
        assert found[step]["samples"] == expected[step]["samples"], f"step {step}"


def test_the_epoch_after_a_resumed_epoch_cut_short_starts_afresh(listops_stream):
    """Lightning can end an epoch before the loader is exhausted (limit_train_batches): the resumed epoch's
    position must not be replayed in the next."""
    def loader():
        data = ListOpsDataModule(max_len=60, stream=StreamConfig(str(listops_stream), batch_size=8))
        data.setup("fit")
        return data.train_dataloader()

    first = loader()
    batches = iter(first)
    next(batches), next(batches)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    batches = iter(resumed)
    next(batches)  # the resumed epoch, cut short after one of its remaining four batches
    del batches
    assert len(list(resumed)) == 6  # the next epoch: all of its batches


def test_a_remote_manifest_is_read_through_fsspec_and_a_missing_one_is_refused(listops_stream):
    import fsspec

    from polyformer.streaming import read_manifest

    memory = fsspec.filesystem("memory")
    text = (listops_stream / "train" / MANIFEST).read_text()
    memory.pipe("/bucket/listops/train/" + MANIFEST, text.encode())
    try:
        assert read_manifest("memory://bucket/listops/train") == json.loads(text)
        with pytest.raises(StreamError, match=r"stream memory://bucket/listops/val: cannot read its polyformer.json"):
            read_manifest("memory://bucket/listops/val")
        with pytest.raises(StreamError, match=r"stream nosuch://bucket/train: cannot open its protocol"):
            read_manifest("nosuch://bucket/train")
    finally:
        memory.rm("/bucket", recursive=True)
