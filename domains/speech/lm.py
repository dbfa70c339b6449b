"""Word n-gram language models in ARPA format, and the lexicon that spells words in CTC tokens, for beam search.

`witten_bell_arpa` estimates an interpolated Witten–Bell model (Witten & Bell 1991; the interpolated form of Chen &
Goodman 1998, §2.5): P(w | h) = (c(h w) + N₁₊(h •) · P(w | h′)) / (c(h) + N₁₊(h •)), h′ being h without its
oldest word, down to a unigram interpolated with the uniform distribution over the vocabulary (and <unk>). In ARPA
form this is exact: a seen n-gram's log10 probability is the interpolated value, and an unseen word after h backs
off with log10 α(h), α(h) = N₁₊(h •) / (c(h) + N₁₊(h •)).

    python -m polyformer.domains.speech.lm --text corpus.txt [more.txt ...] --order 3 --arpa lm.arpa --lexicon lexicon.txt

Text: one sentence per line, upper-case LibriSpeech characters (A–Z, apostrophe, space).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def sentences_from(paths: list[Path]) -> list[list[str]]:
    """Word lists of every non-empty line."""
    return [line.split() for path in paths for line in path.read_text(encoding="utf-8").splitlines() if line.split()]


def witten_bell_arpa(sentences: list[list[str]], order: int = 3) -> str:
    """The ARPA text of an interpolated Witten–Bell model of `order` estimated on `sentences`."""
    if order < 1:
        raise ValueError(f"order must be at least 1, found {order}")
    if not sentences:
        raise ValueError("a language model needs at least one sentence, found none")
    counts: list[Counter] = [Counter() for _ in range(order + 1)]  # counts[k][(w1..wk)]
    for words in sentences:
        padded = [BOS] + words + [EOS]
        for k in range(1, order + 1):
            for i in range(1 if k == 1 else 0, len(padded) - k + 1):  # <s> is never predicted
                counts[k][tuple(padded[i:i + k])] += 1
    vocabulary = sorted({w for (w,) in counts[1]} | {UNK})
    followers: list[dict] = [defaultdict(set) for _ in range(order + 1)]  # N1+(h •)
    context_total: list[Counter] = [Counter() for _ in range(order + 1)]  # c(h) as a context
    for k in range(1, order + 1):
        for gram, c in counts[k].items():
            followers[k][gram[:-1]].add(gram[-1])
            context_total[k][gram[:-1]] += c

    def backoff_weight(history: tuple) -> float:
        k = len(history) + 1
        distinct = len(followers[k].get(history, ()))
        return distinct / (context_total[k][history] + distinct) if distinct else 1.0

    probability: dict[tuple, float] = {}

    def prob(gram: tuple) -> float:
        if gram in probability:
            return probability[gram]
        history, k = gram[:-1], len(gram)
        lower = 1.0 / len(vocabulary) if k == 1 else prob(gram[1:])
        distinct = len(followers[k].get(history, ()))
        total = context_total[k][history]
        value = (counts[k][gram] + distinct * lower) / (total + distinct) if total else lower
        probability[gram] = value
        return value

    lines = ["\\data\\"]
    sections = []
    for k in range(1, order + 1):
        grams = sorted(counts[k]) if k > 1 else [(w,) for w in vocabulary] + [(BOS,)]
        histories = set(followers[k + 1]) if k < order else set()  # the k-grams some longer n-gram continues
        rows = []
        for gram in grams:
            logp = -99.0 if gram == (BOS,) else math.log10(prob(gram))
            row = f"{logp:.6f}\t{' '.join(gram)}"
            if gram in histories:
                row += f"\t{math.log10(backoff_weight(gram)):.6f}"
            rows.append(row)
        lines.append(f"ngram {k}={len(rows)}")
        sections.append((k, rows))
    for k, rows in sections:
        lines += ["", f"\\{k}-grams:", *rows]
    return "\n".join(lines + ["", "\\end\\", ""])


def lexicon_lines(words: set[str]) -> list[str]:
    """torchaudio's ctc_decoder lexicon: each word, then its letters, then the word boundary "|"."""
    return [f"{word}\t{' '.join(word)} |" for word in sorted(words)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, nargs="+", required=True, help="sentences, one per line")
    parser.add_argument("--order", type=int, default=3)
    parser.add_argument("--arpa", type=Path, required=True)
    parser.add_argument("--lexicon", type=Path, required=True)
    args = parser.parse_args()
    sentences = sentences_from(args.text)
    args.arpa.write_text(witten_bell_arpa(sentences, args.order), encoding="utf-8")
    args.lexicon.write_text("\n".join(lexicon_lines({w for s in sentences for w in s})) + "\n", encoding="utf-8")
    print(f"{len(sentences)} sentences → {args.arpa} (order {args.order}), {args.lexicon}")


if __name__ == "__main__":
    main()
