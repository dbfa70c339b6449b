"""Word-level decoding: the Witten–Bell ARPA writer (each history's distribution sums to one; hand-checked
values), the lexicon, beam search constrained to words with the language model, and the CLI switching decoding at
test time over a checkpoint's training-time setting."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from polyformer.domains.speech.decoding import LexiconDecoder
from polyformer.domains.speech.lm import EOS, UNK, lexicon_lines, witten_bell_arpa
from polyformer.domains.speech.tokens import CharTokenizer

SENTENCES = [s.split() for s in ["THE CAT SAT", "THE DOG SAT", "A CAT RAN", "THE CAT RAN AWAY"]]


def read_arpa(text: str) -> dict[tuple, tuple[float, float]]:
    """n-gram → (log10 probability, log10 backoff)."""
    table, order = {}, 0
    for line in text.splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1])
        elif order and line.strip() and not line.startswith("\\"):
            fields = line.split("\t")
            table[tuple(fields[1].split())] = (float(fields[0]), float(fields[2]) if len(fields) > 2 else 0.0)
    return table


def arpa_probability(table, history: tuple, word: str) -> float:
    if history + (word,) in table:
        return 10 ** table[history + (word,)][0]
    return 10 ** table.get(history, (0.0, 0.0))[1] * arpa_probability(table, history[1:], word)


def test_witten_bell_distributions_sum_to_one_and_match_hand_values():
    table = read_arpa(witten_bell_arpa(SENTENCES, order=3))
    vocabulary = [w for (w,), _ in [(g, v) for g, v in table.items() if len(g) == 1] if w != "<s>"]
    assert EOS in vocabulary and UNK in vocabulary
    for history in [(), ("THE",), ("<s>", "THE"), ("CAT", "RAN"), ("DOG",), ("AWAY",)]:
        assert sum(arpa_probability(table, history, w) for w in vocabulary) == pytest.approx(1.0, abs=1e-5)
    # unigrams: 17 tokens (words and </s>), 8 distinct, |V| = 9 with <unk>: P(THE) = (3 + 8/9) / (17 + 8)
    assert 10 ** table[("THE",)][0] == pytest.approx((3 + 8 / 9) / 25, rel=1e-5)
    # after THE: CAT twice, DOG once → 2 distinct of 3: P(CAT | THE) = (2 + 2 P(CAT)) / 5, backoff 2 / 5
    p_cat = (3 + 8 / 9) / 25
    assert 10 ** table[("THE", "CAT")][0] == pytest.approx((2 + 2 * p_cat) / 5, rel=1e-4)
    assert 10 ** table[("THE",)][1] == pytest.approx(2 / 5, rel=1e-5)
    with pytest.raises(ValueError, match="at least one sentence"):
        witten_bell_arpa([], 2)


def peaky(tokenizer: CharTokenizer, text: str) -> torch.Tensor:
    """CTC log-probabilities that spell `text`, a blank after every character, each character a little uncertain."""
    ids = [i for c in text for i in (tokenizer.encode(c)[0], 0)]
    log_probs = torch.full((len(ids), tokenizer.num_classes), -6.0)
    log_probs[torch.arange(len(ids)), ids] = 0.0
    return log_probs.log_softmax(-1)[None]


def test_lexicon_and_language_model_correct_a_misspelt_word(tmp_path):
    (tmp_path / "lm.arpa").write_text(witten_bell_arpa(SENTENCES, 2))
    (tmp_path / "lexicon.txt").write_text("\n".join(lexicon_lines({w for s in SENTENCES for w in s})) + "\n")
    assert (tmp_path / "lexicon.txt").read_text().splitlines()[0] == "A\tA |"
    tokenizer = CharTokenizer()
    tokens, separator = tokenizer.beam_tokens()
    decoder = LexiconDecoder(tokens, separator, str(tmp_path / "lexicon.txt"), str(tmp_path / "lm.arpa"),
                             beam_size=10)
    log_probs = peaky(tokenizer, "THE CAX SAT")  # CAX is no word: the lexicon and the LM make it CAT
    assert decoder(log_probs, torch.tensor([log_probs.shape[1]])) == ["THE CAT SAT"]
    with pytest.raises(FileNotFoundError, match="lm .*missing.arpa does not exist"):
        LexiconDecoder(tokens, separator, str(tmp_path / "lexicon.txt"), str(tmp_path / "missing.arpa"))


def fitted_tiny_cli(root: Path, split: str, runs: Path) -> tuple[list[str], Path]:
    """The command-line arguments of a tiny recognizer on `root`'s `split` (train, val and test alike but train when
    `root` has one), and the checkpoint of one training step with them."""
    from polyformer.cli import PolyformerCLI

    model = {"class_path": "polyformer.domains.speech.SpeechRecognitionTask",
             "init_args": {"model": {"subsampling_channels": 8, "conformer": {"dim": 32, "depth": 1, "heads": 2,
                                                                             "kernel_size": 5}}}}
    train = "train" if (root / "LibriSpeech" / "train").is_dir() else split
    data = {"class_path": "polyformer.domains.speech.LibriSpeechDataModule",
            "init_args": {"root": str(root), "train_splits": [train], "val_splits": [split], "test_splits": [split],
                          "audio": {"stats_utterances": 3},
                          "loader": {"batch_seconds": 30.0, "num_workers": 0}}}
    common = [f"--model={json.dumps(model)}", f"--data={json.dumps(data)}", f"--run.root={runs}",
              "--run.domain=speech", "--run.name=tiny", "--trainer.enable_progress_bar=false"]
    PolyformerCLI(args=["fit", *common, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    return common, next(runs.rglob("last.ckpt"))


def test_decoding_is_chosen_at_test_time(tiny_corpus, tmp_path):
    """A checkpoint trained with greedy decoding is tested with the lexicon and LM the command line names."""
    from polyformer.cli import PolyformerCLI

    (tmp_path / "lm.arpa").write_text(witten_bell_arpa(SENTENCES, 2))
    (tmp_path / "lexicon.txt").write_text("\n".join(lexicon_lines({w for s in SENTENCES for w in s})) + "\n")
    common, checkpoint = fitted_tiny_cli(tiny_corpus, "test", tmp_path / "runs")
    cli = PolyformerCLI(args=["test", *common, f"--ckpt_path={checkpoint}", "--model.init_args.decoding=lexicon",
                              f"--model.init_args.lexicon={tmp_path / 'lexicon.txt'}",
                              f"--model.init_args.lm={tmp_path / 'lm.arpa'}", "--trainer.limit_test_batches=1"])
    assert cli.model.decoding == "lexicon" and isinstance(cli.model._beam, LexiconDecoder)
    assert {"test/cer", "test/wer"} <= set(cli.trainer.callback_metrics)  # one test split: no split in the name


def test_predict_prints_and_writes_reference_and_hypothesis(tmp_path, capsys):
    """The demo's path: `polyformer predict` on the three real utterances shipped in domains/speech/samples."""
    from polyformer.cli import PolyformerCLI

    samples = Path(__file__).resolve().parents[2] / "domains" / "speech" / "samples"
    common, checkpoint = fitted_tiny_cli(samples, "dev", tmp_path)
    PolyformerCLI(args=["predict", *common, f"--ckpt_path={checkpoint}"])
    rows = list(csv.reader(open(next(tmp_path.rglob("transcripts.tsv")), encoding="utf-8"), delimiter="\t"))
    assert sorted(row[0] for row in rows) == ["4088-158079-0011", "4406-16883-0004", "4406-16883-0006"]
    assert any(row[1] == "BY THE RIVERS OF BABYLON THERE WE SATE DOWN" for row in rows)
    assert "reference:  BY THE RIVERS OF BABYLON" in capsys.readouterr().out
