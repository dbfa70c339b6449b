"""ListOps (Nangia & Bowman 2018, https://arxiv.org/abs/1804.06028) in Long Range Arena's setting (Tay et al. 2021,
https://arxiv.org/abs/2011.04006 §3.1): nested lists of digits under MIN, MAX, MED and SM; the label is the value.

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]  →  5

The generator, written from the papers' description: a node is a digit 0–9 with probability 0.75 (always at depth 10),
otherwise an operator over 2–10 arguments, each a node one level deeper; trees are drawn until their token count lies
in [min_len, max_len] (LRA: 500–2,000). MED is the median truncated to an integer, SM the sum mod 10.

Files are LRA's TSV: a header `Source\\tTarget`, then the expression with the binarised tree's parentheses and the
value. Parentheses carry no information (LRA strips them before tokenising); so does `read_tsv`, and `write_tsv`
writes them, so that LRA's official files and this generator's are read alike.

Departure: the length window counts the tokens the model sees (without parentheses).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
# token ids: 0 is padding, 1 the mask token of self-pretraining, then the 15 symbols
PAD, MASK = 0, 1
VOCAB = {symbol: i + 2 for i, symbol in enumerate(DIGITS + OPERATORS + (END,))}
VOCAB_SIZE = len(VOCAB) + 2
NUM_CLASSES = 10
VALUE_P = 0.75  # probability that a node above the deepest level is a digit
MAX_ARGS = 10
MAX_DEPTH = 10
HEADER = ("Source", "Target")


@dataclass(frozen=True)
class ListOpsSpec:
    """What a generated split is: sizes, lengths and seed (its cache file is named after these)."""

    train: int = 96_000
    val: int = 2_000
    test: int = 2_000
    min_len: int = 500
    max_len: int = 2_000
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.train, self.val, self.test) < 1:
            raise ValueError(f"ListOps split sizes must be at least 1, found train={self.train}, val={self.val}, "
                             f"test={self.test}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"ListOps lengths: expected 1 <= min_len <= max_len, found {self.min_len}, {self.max_len}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]



def draw_tree(rng: random.Random, depth: int = 1):
    """A random tree: a digit (int), or (operator, arguments)."""
    if depth >= MAX_DEPTH or rng.random() < VALUE_P:
        return rng.randrange(10)
    return rng.choice(OPERATORS), [draw_tree(rng, depth + 1) for _ in range(rng.randint(2, MAX_ARGS))]


def evaluate(tree) -> int:
    if isinstance(tree, int):
        return tree
    operator, arguments = tree
    values = [evaluate(a) for a in arguments]
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10


def symbols(tree) -> Iterator[str]:
    """The tokens of a tree in order (no parentheses)."""
    if isinstance(tree, int):
        yield str(tree)
        return
    operator, arguments = tree
    yield operator
    for argument in arguments:
        yield from symbols(argument)
    yield END


def with_parentheses(tree) -> str:
    """LRA's source text: the tree binarised left to right, each pair in parentheses."""
    if isinstance(tree, int):
        return str(tree)
    operator, arguments = tree
    text = operator
    for argument in arguments:
        text = f"( {text} {with_parentheses(argument)} )"
    return f"( {text} {END} )"


def draw_example(rng: random.Random, min_len: int, max_len: int) -> tuple[str, int]:
    """(source text with parentheses, value) of a tree drawn until its length is in the window."""
    while True:
        tree = draw_tree(rng)
        length = sum(1 for _ in symbols(tree))
        if min_len <= length <= max_len:
            return with_parentheses(tree), evaluate(tree)


def _draw_split(arguments: tuple[int, int, int, int]) -> list[tuple[str, int]]:
    seed, count, min_len, max_len = arguments
    rng = random.Random(seed)
    return [draw_example(rng, min_len, max_len) for _ in range(count)]


SPLITS = ("train", "val", "test")


def generate(spec: ListOpsSpec, folder: Path, workers: int = 2, splits: tuple[str, ...] = SPLITS) -> dict[str, Path]:
    """The `splits` as LRA-format TSVs in folder/listops-<key>/ (each reused when present); returns their paths.
    Each split is drawn in chunks of 1,000 from seeds derived from the spec's seed and the split, so a file depends
    neither on `workers` nor on which other splits were drawn (evaluating needs no training split)."""
    out = folder / f"listops-{spec.key()}"
    paths = {split: out / f"basic_{split}.tsv" for split in splits}
    missing = [split for split in splits if not paths[split].is_file()]
    if not missing:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": spec.train, "val": spec.val, "test": spec.test}
    for split in missing:
        index, count = SPLITS.index(split), counts[split]
        chunks = [(spec.seed * 1_000_003 + index * 10_007 + c, min(1000, count - c * 1000), spec.min_len,
                   spec.max_len) for c in range((count + 999) // 1000)]
        with Pool(workers) as pool:
            examples = [example for chunk in pool.map(_draw_split, chunks) for example in chunk]
        write_tsv(paths[split], examples)
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return paths


def write_tsv(path: Path, examples: list[tuple[str, int]]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent writers of one split replace it whole
    with tmp.open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(examples)
    tmp.replace(path)


def tokenize(source: str, where: str) -> np.ndarray:
    """Token ids (uint8) of a source text; parentheses are dropped. An unknown symbol raises naming `where`."""
    symbols_ = source.replace("(", " ").replace(")", " ").split()
    try:
        return np.fromiter((VOCAB[symbol] for symbol in symbols_), dtype=np.uint8, count=len(symbols_))
    except KeyError as error:
        raise ValueError(f"{where}: {error.args[0]!r} is not a ListOps token (expected digits 0-9, "
                         f"{', '.join(OPERATORS)}, {END!r} or parentheses)") from None


def read_tsv(path: Path) -> tuple[list[np.ndarray], list[int]]:
    """(token ids per example, labels) of an LRA ListOps TSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ListOps file {path} not found")
    sequences, labels = [], []
    with path.open(newline="") as file:
        rows = csv.reader(file, delimiter="\t")
        header = next(rows, None)
        if header is None or tuple(h.strip() for h in header[:2]) != HEADER:
            raise ValueError(f"{path}:1: expected the header 'Source\\tTarget', found {header!r}")
        for line, row in enumerate(rows, start=2):
            if len(row) != 2:
                raise ValueError(f"{path}:{line}: expected 2 tab-separated fields (Source, Target), found {len(row)}")
            source, target = row
            if target.strip() not in DIGITS:
                raise ValueError(f"{path}:{line}: Target must be a digit 0-9, found {target!r}")
            sequences.append(tokenize(source, f"{path}:{line}"))
            labels.append(int(target))
    if not sequences:
        raise ValueError(f"{path}: no examples after the header")
    return sequences, labels
