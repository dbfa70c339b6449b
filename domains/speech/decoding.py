"""CTC decoding: greedy (best path); beam search through torchaudio's flashlight `ctc_decoder`, free of a lexicon or
restricted to a lexicon's words with an optional word n-gram language model (ARPA, see lm.py)."""

from __future__ import annotations

from pathlib import Path

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


def flashlight_decoder(tokens: list[str], word_separator: str, beam_size: int, **options):
    try:
        from torchaudio.models.decoder import ctc_decoder

        return ctc_decoder(tokens=tokens, beam_size=beam_size, blank_token=tokens[BLANK], sil_token=word_separator,
                           **options)
    except (ImportError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and options.get("lexicon"):
            raise ValueError(f"beam search: cannot load lexicon {options['lexicon']} or language model "
                             f"{options.get('lm')}: {error}") from None
        raise ImportError("beam-search decoding needs flashlight-text (`pip install flashlight-text`); use "
                          f"decoding='greedy' otherwise ({error})") from None


class BeamSearchDecoder:
    """Lexicon-free beam search without a language model (flashlight-text's CTC decoder)."""

    def __init__(self, tokens: list[str], word_separator: str, beam_size: int = 20):
        self.decoder = flashlight_decoder(tokens, word_separator, beam_size, lexicon=None, lm=None)

    def __call__(self, log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
        results = self.decoder(log_probs.float().cpu().contiguous(), lengths.cpu().int())
        return [[i for i in best[0].tokens.tolist() if i != BLANK] for best in results]


class LexiconDecoder:
    """Beam search over the words of a lexicon (word → its tokens, then the separator), scored with a word n-gram
    language model when `lm` names an ARPA file: log P_CTC + lm_weight · log P_LM + word_score · words."""

    def __init__(self, tokens: list[str], word_separator: str, lexicon: str, lm: str | None = None,
                 beam_size: int = 50, lm_weight: float = 2.0, word_score: float = 0.0):
        for name, path in (("lexicon", lexicon), ("lm", lm)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"beam search: {name} {path} does not exist (build one with python -m "
                                        f"polyformer.domains.speech.lm)")
        self.decoder = flashlight_decoder(tokens, word_separator, beam_size, lexicon=lexicon, lm=lm,
                                          lm_weight=lm_weight, word_score=word_score, unk_word="<unk>")

    def __call__(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        results = self.decoder(log_probs.float().cpu().contiguous(), lengths.cpu().int())
        return [" ".join(best[0].words) if best else "" for best in results]
