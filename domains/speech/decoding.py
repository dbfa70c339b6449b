"""CTC decoding: greedy (best path) and lexicon-free beam search through torchaudio's flashlight `ctc_decoder`."""

from __future__ import annotations

import torch
from torch import Tensor

from polyformer.domains.speech.tokens import BLANK


def greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks. log_probs: (b n v), lengths: (b,)."""
    best = log_probs.argmax(dim=-1).cpu()
    hypotheses = []
    for path, length in zip(best, lengths.cpu().tolist()):
        ids = torch.unique_consecutive(path[:length])
        hypotheses.append([i for i in ids.tolist() if i != BLANK])
    return hypotheses


class BeamSearchDecoder:
    """Lexicon-free beam search without a language model (flashlight-text's CTC decoder)."""

    def __init__(self, tokens: list[str], word_separator: str, beam_size: int = 20):
        try:
            from torchaudio.models.decoder import ctc_decoder

            self.decoder = ctc_decoder(lexicon=None, tokens=tokens, lm=None, beam_size=beam_size,
                                       blank_token=tokens[BLANK], sil_token=word_separator)
        except (ImportError, RuntimeError) as error:
            raise ImportError(
                "beam-search decoding needs flashlight-text (`pip install flashlight-text`); "
                f"use decoding='greedy' otherwise ({error})"
            ) from None

    def __call__(self, log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
        results = self.decoder(log_probs.float().cpu().contiguous(), lengths.cpu().int())
        return [[i for i in best[0].tokens.tolist() if i != BLANK] for best in results]
