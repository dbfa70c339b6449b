"""Output units for CTC: characters (default) or a SentencePiece unigram model trained from the training transcripts.

Id 0 is always the CTC blank. Transcripts are LibriSpeech-style: upper-case letters, apostrophes and spaces.
The SentencePiece model is kept as a uint8 buffer inside the tokenizer module, so it is saved in the model's
state_dict (and in weights-only checkpoints) beside the weights that depend on it.
"""

from __future__ import annotations

import io
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

BLANK = 0


@dataclass
class TokenizerConfig:
    kind: Literal["char", "unigram"] = "char"
    vocab_size: int = 128  # SentencePiece pieces (unigram only); the CTC head has vocab_size + 1 outputs

    def __post_init__(self) -> None:
        if self.kind not in ("char", "unigram"):
            raise ValueError(f"tokenizer.kind must be 'char' or 'unigram', found {self.kind!r}")
        if self.kind == "unigram" and self.vocab_size < 8:
            raise ValueError(f"tokenizer.vocab_size must be at least 8 for unigram, found {self.vocab_size}")


class CharTokenizer(nn.Module):
    """blank, space, apostrophe, A-Z: 29 classes. Other characters in a transcript are an error."""

    symbols = [" ", "'"] + list(string.ascii_uppercase)

    def __init__(self):
        super().__init__()
        self.index = {s: i + 1 for i, s in enumerate(self.symbols)}

    @property
    def num_classes(self) -> int:
        return len(self.symbols) + 1

    @property
    def trained(self) -> bool:
        return True

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as error:
            raise ValueError(f"transcript {text!r} has character {error.args[0]!r}; expected upper-case A-Z, "
                             f"apostrophe and space") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.symbols[i - 1] for i in ids if i != BLANK)

    def beam_tokens(self) -> tuple[list[str], str]:
        """Token strings for torchaudio's ctc_decoder (index = class id) and its word-separator token."""
        return ["-", "|"] + self.symbols[1:], "|"


class SentencePieceTokenizer(nn.Module):
    """A unigram SentencePiece model (Kudo 2018) trained on demand; piece i is class i + 1."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("model_proto", torch.zeros(0, dtype=torch.uint8))
        self._processor = None
        # a checkpoint's proto has its own length: resize the empty buffer before the copy
        self._register_load_state_dict_pre_hook(self._resize_proto)

    def _resize_proto(self, state_dict, prefix, *args) -> None:
        key = prefix + "model_proto"
        if key in state_dict:
            self.model_proto = torch.zeros_like(state_dict[key])
            self._processor = None

    @property
    def num_classes(self) -> int:
        return self.vocab_size + 1

    @property
    def trained(self) -> bool:
        return self.model_proto.numel() > 0

    def train_from(self, transcripts: Iterable[str]) -> None:
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(transcripts)), model_writer=model, vocab_size=self.vocab_size,
            model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
            num_threads=1, minloglevel=2,
        )
        self.model_proto = torch.frombuffer(bytearray(model.getvalue()), dtype=torch.uint8).to(self.model_proto.device)
        self._processor = None

    @property
    def processor(self):
        if not self.trained:
            raise ValueError("the SentencePiece tokenizer has not been trained yet (call train_from(transcripts))")
        if self._processor is None:
            import sentencepiece as spm

            self._processor = spm.SentencePieceProcessor(model_proto=bytes(self.model_proto.cpu().numpy()))
        return self._processor

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.processor.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([i - 1 for i in ids if i != BLANK])

    def beam_tokens(self) -> tuple[list[str], str]:
        pieces = [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())]
        pieces += [f"<unused{i}>" for i in range(self.vocab_size - len(pieces))]
        return ["<blank>"] + pieces, pieces[0]


def make_tokenizer(config: TokenizerConfig) -> CharTokenizer | SentencePieceTokenizer:
    return CharTokenizer() if config.kind == "char" else SentencePieceTokenizer(config.vocab_size)
