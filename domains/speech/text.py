"""Transcript text for the speech domain: LibriSpeech-style sentences (upper case, letters, apostrophes, single
spaces) drawn from plain-text sources such as the Debian `fortunes` files — the synthetic corpus's transcripts and the
language model's text (scripts/make_synthetic_librispeech.py, scripts/bench_speech_real.py)."""

from __future__ import annotations

import re
from pathlib import Path

WORD = re.compile(r"^[A-Z]+(?:'[A-Z]+)*$")


def read_sources(paths: list[Path]) -> list[str]:
    """Raw text blocks: one per fortune (files split on '%' lines) or per paragraph of a plain-text file."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text source {path} does not exist (expected a file or a folder of files)")
    blocks = []
    for file in files:
        text = file.read_text(encoding="utf-8", errors="ignore")
        blocks += re.split(r"\n%\n|\n\s*\n", text)
    return blocks


def normalise(sentence: str, min_words: int, max_words: int) -> str | None:
    """Upper-case transcript of letters, apostrophes and single spaces, or None when the sentence is unusable."""
    sentence = " ".join(sentence.split())
    if re.search(r"[0-9@#$%&*/\\_=+<>|\[\]{}~^`]", sentence) or not sentence.isascii():
        return None  # digits and symbols would be read out by espeak-ng and not match the transcript
    words = re.sub(r"[^A-Za-z' ]", " ", sentence.replace("-", " ")).upper().split()
    words = [w.strip("'") for w in words]
    if not min_words <= len(words) <= max_words or not all(WORD.match(w) for w in words):
        return None
    return " ".join(words)


def sentences_from(blocks: list[str], min_words: int, max_words: int) -> list[str]:
    """Distinct usable sentences, in a stable order."""
    seen, kept = set(), []
    for block in blocks:
        if re.search(r"^\s*--", block, flags=re.MULTILINE):
            block = re.split(r"^\s*--", block, flags=re.MULTILINE)[0]  # drop attributions ("-- Mark Twain")
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(block.split())):
            text = normalise(sentence, min_words, max_words)
            if text and text not in seen:
                seen.add(text)
                kept.append(text)
    return kept
