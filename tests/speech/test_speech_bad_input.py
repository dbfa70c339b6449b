"""LibriSpeech-layout reading under bad input, tried systematically (hypothesis): a small good corpus written in
tmp_path, then one defect. Every case ends in a ValueError naming the file (and line), or, with skip_bad, in a counted
and logged skip of exactly the bad utterance; docs/reliability.md lists the cases and what each gives."""

from __future__ import annotations

import logging
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyformer.domains.speech.data import SpeechDataset, read_split

# deterministic runs of a stated size: the counts in docs/reliability.md are these max_examples
BAD_INPUT = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RATE = 16_000
WORDS = st.lists(st.text(string.ascii_uppercase + "'", min_size=1, max_size=6), min_size=1, max_size=4).map(" ".join)
# one character of a line (no line break, no surrogate) that LibriSpeech's transcripts never hold
FOREIGN = st.characters(exclude_characters=set(string.ascii_uppercase + "' "), exclude_categories=["Cs"]).filter(
    lambda c: len(f"A{c}B".splitlines()) == 1)


def write_flac(path: Path, seconds: float, *, rate: int = RATE, channels: int = 1, seed: int = 0) -> None:
    noise = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(seconds * rate), channels)).astype(np.float32)
    sf.write(path, noise if channels > 1 else noise[:, 0], rate, format="FLAC")


@st.composite
def corpus(draw, tmp_path: Path) -> tuple[Path, list[tuple[Path, list[str]]]]:
    """A good split 'dev': 1-2 chapters of 2-3 utterances; returns the root and (transcript file, its lines)."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    chapters = []
    for speaker in range(draw(st.integers(1, 2))):
        folder = root / "LibriSpeech" / "dev" / f"{100 + speaker}" / "7"
        folder.mkdir(parents=True)
        lines = []
        for utt in range(draw(st.integers(2, 3))):
            utt_id = f"{100 + speaker}-7-{utt:04d}"
            write_flac(folder / f"{utt_id}.flac", draw(st.floats(0.05, 0.3)), seed=utt)
            lines.append(f"{utt_id} {draw(WORDS)}")
        chapters.append((folder / f"{100 + speaker}-7.trans.txt", lines))
    return root, chapters


def write_transcripts(chapters) -> None:
    for transcript_file, lines in chapters:
        transcript_file.write_text("\n".join(lines) + "\n")


SKIPPABLE = ["wrong_rate", "stereo", "no_audio", "no_transcript", "foreign_character", "malformed_line",
             "repeated_line", "corrupt_flac"]


@pytest.mark.parametrize("defect", SKIPPABLE)
@settings(max_examples=25, **BAD_INPUT)
@given(data=st.data())
def test_one_defect_is_an_error_naming_the_file_or_a_counted_skip(tmp_path, caplog, defect, data):
    root, chapters = data.draw(corpus(tmp_path))
    good = sum(len(lines) for _, lines in chapters)
    transcript_file, lines = chapters[data.draw(st.integers(0, len(chapters) - 1))]
    line = data.draw(st.integers(0, len(lines) - 1))
    utt_id = lines[line].split(" ")[0]
    audio = transcript_file.parent / f"{utt_id}.flac"
    names = [f"{transcript_file}:{line + 1}"]  # what the message must name
    skips = 1
    if defect == "wrong_rate":
        rate = data.draw(st.sampled_from([8000, 11025, 22050, 44100, 48000]))
        write_flac(audio, 0.1, rate=rate)
        names = [str(audio), f"found {rate} Hz"]
    elif defect == "stereo":
        write_flac(audio, 0.1, channels=data.draw(st.integers(2, 4)))
        names = [str(audio), "expected mono"]
    elif defect == "no_audio":
        audio.unlink()
        names += [f"{utt_id} has no audio"]
    elif defect == "no_transcript":
        lines.pop(line)
        names = [str(audio), "without a transcript line"]
    elif defect == "foreign_character":
        words = lines[line].partition(" ")[2]
        cut = data.draw(st.integers(0, len(words)))
        lines[line] = f"{utt_id} A{words[:cut]}{data.draw(FOREIGN)}{words[cut:]}A"  # inside: never stripped
        names += ["has character"]
    elif defect == "malformed_line":
        lines[line] = data.draw(st.sampled_from([utt_id, f"{utt_id}   ", f"../{utt_id} HELLO", f"x/{utt_id} A"]))
        names += ["expected '<utterance-id> TRANSCRIPT'"]
        if "/" in lines[line]:  # the line names no audio of this chapter: the audio it meant is left without one
            skips = 2
    elif defect == "repeated_line":
        lines.insert(line + 1, lines[line])
        names = [f"{transcript_file}:{line + 2}", f"first at {transcript_file}:{line + 1}"]
        good += 1  # the repeated line is the bad one; the first stays
    else:  # corrupt_flac: random bytes, a cut, or flipped bytes
        data_bytes = audio.read_bytes()
        kind = data.draw(st.sampled_from(["random", "cut", "flip"]))
        if kind == "random":
            data_bytes = data.draw(st.binary(max_size=2000))
        elif kind == "cut":
            data_bytes = data_bytes[: data.draw(st.integers(0, len(data_bytes) - 1))]
        else:
            flipped = bytearray(data_bytes)
            for position in data.draw(st.lists(st.integers(0, len(flipped) - 1), min_size=1, max_size=20)):
                flipped[position] ^= 0xFF
            data_bytes = bytes(flipped)
        audio.write_bytes(data_bytes)
        names = [str(audio)]
    write_transcripts(chapters)

    try:
        utterances = read_split(root, "dev")
    except ValueError as error:
        assert all(name in str(error) for name in names), (names, str(error))
    else:
        # only a corrupt FLAC whose header still reads gets this far: decoding it must fail naming it, or give the
        # whole utterance
        assert defect == "corrupt_flac", f"{defect} was accepted"
        for utterance in utterances:
            try:
                wave, _, _ = SpeechDataset([utterance])[0]
            except ValueError as error:
                assert str(utterance.path) in str(error), str(error)
            else:
                assert len(wave) == round(utterance.duration * RATE) and np.isfinite(wave.numpy()).all()
        return

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polyformer.domains.speech.data"):
        kept = read_split(root, "dev", skip_bad=True)
    assert len(kept) == good - 1
    assert f"skipped {skips} bad utterances (skip_bad=True), kept {good - 1}" in caplog.text
    assert all(name in caplog.text for name in names), (names, caplog.text)


@settings(max_examples=25, **BAD_INPUT)
@given(data=st.data())
def test_a_transcript_file_that_is_not_utf8_is_an_error_naming_it(tmp_path, data):
    root, chapters = data.draw(corpus(tmp_path))
    write_transcripts(chapters)
    transcript_file = chapters[0][0]
    text = transcript_file.read_bytes()
    cut = data.draw(st.integers(0, len(text)))
    bad = data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80abc"]))
    transcript_file.write_bytes(text[:cut] + bad + text[cut:])
    for skip_bad in (False, True):  # a file that cannot be read at all is not one utterance to skip
        with pytest.raises(ValueError, match=f"{transcript_file}: expected UTF-8 text"):
            read_split(root, "dev", skip_bad=skip_bad)
