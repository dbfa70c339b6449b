"""A tiny synthetic LibriSpeech-layout corpus (espeak-ng), built once per test session."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_synthetic_librispeech.py"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required for the speech tests: apt-get install -y espeak-ng fortunes")
    out = tmp_path_factory.mktemp("synthetic_librispeech")
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--train-utterances", "24", "--dev", "6",
                    "--test", "6", "--heldout", "6", "--max-words", "8", "--workers", "2", "--seed", "3"],
                   check=True, capture_output=True)
    return out
