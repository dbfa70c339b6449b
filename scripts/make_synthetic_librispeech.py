"""Writes a speech corpus in exactly the LibriSpeech layout, synthesised with espeak-ng from natural English text.

    python scripts/make_synthetic_librispeech.py --out data/synthetic_librispeech --train-minutes 80

Layout: <out>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac (16 kHz mono FLAC) and
<speaker>-<chapter>.trans.txt with upper-case transcripts of letters, apostrophes and spaces; SPEAKERS.TXT maps
speaker ids to espeak-ng voices. A speaker is one voice (espeak-ng voice + variant), a chapter one speaking rate.

Sentences come from any plain-text sources (default: the Debian `fortunes` collection, installed with apt-get when
missing): fortunes are split on '%' lines, then into sentences; sentences of 3-16 words made only of letters,
apostrophes and ordinary punctuation are kept (no digits or symbols, which espeak-ng would read out). Every sentence
is spoken once, so the splits never share a sentence:
  train         sentences spoken by the training voices at the training rates
  dev, test     unseen sentences, training voices and rates
  heldout       unseen sentences, a voice of an accent absent from training (en-gb-scotland) at an unseen rate
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from polyformer.domains.speech.text import read_sources, sentences_from

SAMPLE_RATE = 16_000
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# (espeak-ng voice, variant): 8 training voices over 6 accents, 4 male and 4 female variants
TRAIN_VOICES = [
    ("en-us", "m1"), ("en-us", "f2"), ("en-gb", "m3"), ("en-gb", "f1"),
    ("en-gb-x-rp", "m2"), ("en-029", "f3"), ("en-gb-x-gbclan", "m4"), ("en-gb-x-gbcwmd", "f4"),
]
TRAIN_RATES = [130, 160, 190]  # words per minute
HELDOUT_VOICES = [("en-gb-scotland", "m1"), ("en-gb-scotland", "f2")]  # an accent no training voice has
HELDOUT_RATE = 175


def ensure_fortunes() -> None:
    if FORTUNES_DIR.is_dir():
        return
    print("fortunes not found: installing the Debian package 'fortunes'", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "fortunes"], check=True, stdout=subprocess.DEVNULL)


def _one_thread() -> None:
    """Each worker resamples short clips: intra-op threads only contend with the other workers (10x slower)."""
    torch.set_num_threads(1)


def synthesise(job: tuple[str, str, int, str, str]) -> float:
    """Speaks one sentence with espeak-ng, resamples to 16 kHz and writes FLAC; returns its duration in seconds."""
    voice, variant, rate, text, path = job
    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run(["espeak-ng", "-v", f"{voice}+{variant}", "-s", str(rate), "-w", wav.name, text.lower()],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        audio, rate_in = sf.read(wav.name, dtype="float32")
    audio = AF.resample(torch.from_numpy(audio), rate_in, SAMPLE_RATE).numpy()
    audio = np.trim_zeros(np.where(np.abs(audio) < 1e-4, 0.0, audio)) if np.abs(audio).max() > 0 else audio
    audio = np.pad(audio, (1600, 1600))  # 0.1 s of silence either side, as in read speech
    sf.write(path, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return len(audio) / SAMPLE_RATE


def plan_split(split: str, sentences: list[str], voices: list[tuple[str, str]], rates: list[int], first_speaker: int,
               out: Path, rng: random.Random) -> tuple[list[tuple], dict[Path, list[str]]]:
    """Assigns each sentence a (voice, rate); returns synthesis jobs and the transcript lines per chapter file."""
    jobs, transcripts = [], {}
    counters: dict[tuple[int, int], int] = {}
    for text in sentences:
        v, r = rng.randrange(len(voices)), rng.randrange(len(rates))
        speaker, chapter = first_speaker + v, 1000 + rates[r]
        utt = counters.get((speaker, chapter), 0)
        counters[(speaker, chapter)] = utt + 1
        folder = out / "LibriSpeech" / split / str(speaker) / str(chapter)
        folder.mkdir(parents=True, exist_ok=True)
        utt_id = f"{speaker}-{chapter}-{utt:04d}"
        jobs.append((*voices[v], rates[r], text, str(folder / f"{utt_id}.flac")))
        transcripts.setdefault(folder / f"{speaker}-{chapter}.trans.txt", []).append(f"{utt_id} {text}")
    return jobs, transcripts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/synthetic_librispeech"))
    parser.add_argument("--source", type=Path, nargs="*", default=None,
                        help="plain-text files or folders (default: /usr/share/games/fortunes)")
    parser.add_argument("--train-minutes", type=float, default=80.0, help="stop adding training sentences here")
    parser.add_argument("--train-utterances", type=int, default=None, help="exact number instead of --train-minutes")
    parser.add_argument("--dev", type=int, default=200)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: install it with `apt-get install -y espeak-ng`")
    if args.source is None:
        ensure_fortunes()
    sentences = sentences_from(read_sources(args.source or [FORTUNES_DIR]), args.min_words, args.max_words)
    rng = random.Random(args.seed)
    rng.shuffle(sentences)
    n_eval = args.dev + args.test + args.heldout
    # ~2.6 words/s at the training rates: a first guess of how many sentences fill --train-minutes, trimmed after
    words_per_sentence = sum(len(s.split()) for s in sentences[:2000]) / max(1, min(2000, len(sentences)))
    n_train = args.train_utterances or int(args.train_minutes * 60 * 2.6 / words_per_sentence * 1.15) + 1
    if n_eval + n_train > len(sentences):
        raise SystemExit(f"need {n_eval + n_train} sentences, the sources give only {len(sentences)}")
    eval_sentences, train_sentences = sentences[:n_eval], sentences[n_eval:n_eval + n_train]
    print(f"{len(sentences)} usable sentences, "
          f"{len({w for s in sentences for w in s.split()})} distinct words; synthesising {n_train} train, "
          f"{args.dev}/{args.test}/{args.heldout} dev/test/heldout", file=sys.stderr)

    if (args.out / "LibriSpeech").exists():
        shutil.rmtree(args.out / "LibriSpeech")
    splits = {
        "train": (train_sentences, TRAIN_VOICES, TRAIN_RATES, 100),
        "dev": (eval_sentences[:args.dev], TRAIN_VOICES, TRAIN_RATES, 100),
        "test": (eval_sentences[args.dev:args.dev + args.test], TRAIN_VOICES, TRAIN_RATES, 100),
        "heldout": (eval_sentences[args.dev + args.test:], HELDOUT_VOICES, [HELDOUT_RATE], 200),
    }
    summary = {}
    with ProcessPoolExecutor(args.workers, initializer=_one_thread) as pool:
        for split, (texts, voices, rates, first_speaker) in splits.items():
            jobs, transcripts = plan_split(split, texts, voices, rates, first_speaker, args.out, rng)
            durations = list(pool.map(synthesise, jobs, chunksize=16))
            if split == "train" and args.train_utterances is None:
                durations, jobs, transcripts = trim_to_minutes(durations, jobs, transcripts, args.train_minutes)
            for path, lines in transcripts.items():
                path.write_text("\n".join(sorted(lines)) + "\n")
            summary[split] = {"utterances": len(jobs), "minutes": round(sum(durations) / 60, 2)}
            print(f"{split}: {summary[split]}", file=sys.stderr)
    speakers = [f"{first + i} | {voice}+{variant} | {split}" for split, (_, vs, _, first) in splits.items()
                for i, (voice, variant) in enumerate(vs) if split in ("train", "heldout")]
    (args.out / "LibriSpeech" / "SPEAKERS.TXT").write_text(
        "; ID | espeak-ng voice+variant | first split (chapter = 1000 + words per minute)\n" + "\n".join(speakers) + "\n")
    (args.out / "LibriSpeech" / "corpus.json").write_text(json.dumps(
        {"seed": args.seed, "train_rates": TRAIN_RATES, "heldout_rate": HELDOUT_RATE, "splits": summary}, indent=2))
    print(json.dumps(summary))


def trim_to_minutes(durations: list[float], jobs: list[tuple], transcripts: dict[Path, list[str]],
                    minutes: float) -> tuple[list[float], list[tuple], dict[Path, list[str]]]:
    """Drops training utterances past `minutes` of audio (files and transcript lines), keeping the plan's order."""
    keep, total = 0, 0.0
    while keep < len(durations) and total < minutes * 60:
        total += durations[keep]
        keep += 1
    dropped = {Path(job[4]).stem for job in jobs[keep:]}
    for job in jobs[keep:]:
        Path(job[4]).unlink()
    for path in transcripts:
        transcripts[path] = [line for line in transcripts[path] if line.split(" ", 1)[0] not in dropped]
    transcripts = {path: lines for path, lines in transcripts.items() if lines}
    return durations[:keep], jobs[:keep], transcripts


if __name__ == "__main__":
    main()
