"""Long-range data: the ListOps generator and LRA's TSVs, byte-level reviews, Pathfinder images, batching."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from polyformer.domains.longrange import ListOpsDataModule, ListOpsSpec, LoaderConfig, PathfinderSpec, TextDataModule
from polyformer.domains.longrange import listops, pathfinder
from polyformer.domains.longrange.data import BYTE_OFFSET, PAD, collate, read_reviews


@pytest.mark.parametrize("source, value", [
    ("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]", 5),
    ("[SM 7 8 [SM 9 9 ] ]", (7 + 8 + 8) % 10),
    ("[MED 1 2 3 4 ]", 2),  # the median 2.5 truncated
    ("[MIN 5 [MAX 0 9 ] 6 ]", 5),
])
def test_listops_values(source, value):
    def parse(symbols):
        symbol = symbols.pop(0)
        if symbol.isdigit():
            return int(symbol)
        arguments = []
        while symbols[0] != listops.END:
            arguments.append(parse(symbols))
        symbols.pop(0)
        return symbol, arguments

    tree = parse(source.split())
    assert listops.evaluate(tree) == value
    assert " ".join(listops.symbols(tree)) == source
    # LRA's parenthesised text tokenises to the same symbols
    assert listops.tokenize(listops.with_parentheses(tree), "x").tolist() == listops.tokenize(source, "x").tolist()


def test_listops_generator_lengths_and_seed(tmp_path):
    spec = ListOpsSpec(train=30, val=5, test=5, min_len=50, max_len=120, seed=3)
    paths = listops.generate(spec, tmp_path, workers=1)
    sequences, labels = listops.read_tsv(paths["train"])
    assert len(sequences) == 30 and all(50 <= len(s) <= 120 for s in sequences)
    assert set(labels) <= set(range(10))
    again = listops.generate(spec, tmp_path / "again", workers=2)
    assert again["train"].read_text() == paths["train"].read_text()  # the files do not depend on the workers
    rng = random.Random(0)
    for _ in range(50):  # a node at depth 10 is always a digit: no tree is deeper than 10 levels
        tree = listops.draw_tree(rng)

        def depth(t):
            return 1 if isinstance(t, int) else 1 + max(depth(a) for a in t[1])
        assert depth(tree) <= listops.MAX_DEPTH


def test_listops_tsv_bad_input(tmp_path):
    bad_header = tmp_path / "header.tsv"
    bad_header.write_text("Input\tLabel\n[MAX 1 2 ]\t2\n")
    with pytest.raises(ValueError, match=r"header.tsv:1: expected the header 'Source\\tTarget'"):
        listops.read_tsv(bad_header)
    bad_token = tmp_path / "token.tsv"
    bad_token.write_text("Source\tTarget\n( [MAX 1 2 ] )\t2\n( [MAX 1 [AVG 3 ] ] )\t3\n")
    with pytest.raises(ValueError, match=r"token.tsv:3: '\[AVG' is not a ListOps token"):
        listops.read_tsv(bad_token)
    bad_label = tmp_path / "label.tsv"
    bad_label.write_text("Source\tTarget\n[MAX 1 2 ]\t12\n")
    with pytest.raises(ValueError, match=r"label.tsv:2: Target must be a digit"):
        listops.read_tsv(bad_label)


def test_listops_data_module_reads_given_files(tmp_path):
    spec = ListOpsSpec(train=8, val=4, test=4, min_len=10, max_len=40)
    official = tmp_path / "official.tsv"
    official.write_text("Source\tTarget\n( ( ( [MAX 1 ) 7 ) 2 ] )\t7\n( ( ( [SM 3 ) 4 ) ] )\t7\n")
    data = ListOpsDataModule(spec, test_file=str(official), cache=str(tmp_path / "cache"),
                             loader=LoaderConfig(batch_size=2))
    data.prepare_data()
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch["labels"].tolist() == [7, 7]
    assert batch["tokens"][1].tolist() == [listops.VOCAB[s] for s in ("[SM", "3", "4", "]")] + [PAD]
    assert batch["padding"][1].tolist() == [False] * 4 + [True]  # padded to the batch's longest


def _write_reviews(root, texts):
    for i, (label, text) in enumerate(texts):
        folder = root / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}_7.txt").write_bytes(text)


def test_reviews_as_bytes_invalid_utf8_counted(tmp_path):
    _write_reviews(tmp_path, [("pos", "Très bien".encode()), ("neg", b"bad \xff\xfe bytes"), ("neg", b"x" * 50)])
    sequences, labels, invalid = read_reviews(tmp_path / "train", max_len=20)
    assert invalid == 1 and sorted(labels) == [0, 0, 1]
    assert (sequences[0] - BYTE_OFFSET).tolist() == list("Très bien".encode())  # bytes, not characters
    assert max(len(s) for s in sequences) == 20  # truncated to max_len
    with pytest.raises(FileNotFoundError, match="no reviews in"):
        read_reviews(tmp_path / "missing", 20)


def test_text_splits_are_disjoint_and_seeded(tmp_path):
    _write_reviews(tmp_path, [("pos" if i % 2 else "neg", f"review {i}".encode()) for i in range(40)])
    data = TextDataModule(root=str(tmp_path), val_size=5, heldout_size=7, seed=1)
    data.setup("fit")
    sizes = {split: len(d) for split, d in data.splits.items()}
    assert sizes == {"val": 5, "test": 7, "train": 28}
    texts = {split: {bytes((np.asarray(s) - BYTE_OFFSET).astype(np.uint8)) for s in d.sequences}
             for split, d in data.splits.items()}
    assert not (texts["val"] & texts["train"]) and not (texts["test"] & texts["train"])
    other = TextDataModule(root=str(tmp_path), val_size=5, heldout_size=7, seed=1)
    other.setup("fit")
    assert [s.tolist() for s in other.splits["val"].sequences] == [s.tolist() for s in data.splits["val"].sequences]


def test_pathfinder_images(tmp_path):
    spec = PathfinderSpec(train=6, val=2, test=2, seed=1)
    paths = pathfinder.generate(spec, tmp_path, workers=1)
    images, labels = pathfinder.read_split(paths["train"])
    assert images.shape == (6, 32, 32) and images.dtype == np.uint8 and set(np.unique(images)) <= {0, 255}
    rng = np.random.default_rng(0)
    connected = pathfinder.draw_image(rng, spec, connected=True)
    assert (connected > 0).sum() > 3 * spec.contour_length  # three contours and two dots
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"bad.npz: expected Pathfinder-32 images \(N, 32, 32\), found shape"):
        pathfinder.read_split(bad)


def test_collate_and_token_budget_batches(tmp_path):
    batch = collate([(torch.tensor([5, 6, 7]), 1), (torch.tensor([8]), 0)])
    assert batch["tokens"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["padding"].tolist() == [[False, False, False], [False, True, True]]
    spec = ListOpsSpec(train=40, val=4, test=4, min_len=10, max_len=60)
    data = ListOpsDataModule(spec, cache=str(tmp_path), loader=LoaderConfig(max_tokens=200, num_buckets=2))
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert sum(len(b["labels"]) for b in batches) == 40  # every example once
    assert all(b["tokens"].numel() <= 200 for b in batches)


def test_listops_stage_draws_only_the_splits_it_needs(tmp_path):
    """Evaluating needs no training split: validate draws val alone, and it is the val split a fit would draw."""
    spec = ListOpsSpec(train=40, val=6, test=6, min_len=50, max_len=120, seed=5)
    evaluating = ListOpsDataModule(spec=spec, cache=str(tmp_path / "a"))
    evaluating.setup("validate")
    folder = tmp_path / "a" / f"listops-{spec.key()}"
    assert sorted(p.name for p in folder.glob("*.tsv")) == ["basic_val.tsv"] and list(evaluating.splits) == ["val"]
    fitting = ListOpsDataModule(spec=spec, cache=str(tmp_path / "b"))
    fitting.setup("fit")
    assert sorted(fitting.splits) == ["train", "val"]
    assert (tmp_path / "b" / f"listops-{spec.key()}" / "basic_val.tsv").read_text() == \
        (folder / "basic_val.tsv").read_text()


@pytest.mark.parametrize("task, cut, expected", [
    ("listops", "short", {"data.init_args.spec.min_len": 50, "data.init_args.spec.max_len": 250,
                          "data.init_args.spec.train": 20000, "data.init_args.loader.max_tokens": 8000}),
    ("text", "1k", {"data.init_args.max_len": 1024, "model.init_args.model.transformer.max_len": 1024,
                    "data.init_args.val_size": 1000, "data.init_args.loader.max_tokens": 16384}),
])
def test_a_diagnostic_cut_overrides_the_cpu_config_and_keeps_the_rest(task, cut, expected):
    """configs/longrange/cuts/<task>_<cut>.yaml (bench_longrange.py --cut) after the CPU config: its lengths and
    batches replace the CPU config's, the CPU config's split sizes stay, for the fine-tuning and pre-training
    configs alike."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    configs = Path(__file__).resolve().parents[2] / "configs" / "longrange"
    for stem in (task, f"{task}_pretrain"):
        printed = subprocess.run(
            [sys.executable, "-m", "polyformer.cli", "fit", "-c", str(configs / f"{stem}.yaml"),
             "-c", str(configs / "cpu" / f"{task}.yaml"), "-c", str(configs / "cuts" / f"{task}_{cut}.yaml"),
             "--print_config"], capture_output=True, text=True, check=True).stdout
        config = yaml.safe_load(printed)
        for key, value in expected.items():
            found = config
            for part in key.split("."):
                found = found[part]
            assert found == value, (stem, key, found)
        assert config["trainer"]["val_check_interval"] == 300
