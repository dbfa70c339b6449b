"""Speech: a Conformer-CTC (or Transformer-CTC) recognizer on LibriSpeech-layout corpora, built on the core.

The domain adds its front end (log-mel, normalisation, SpecAugment, ×4 subsampling), the Conformer convolution
module and block, the CTC head and decoding, LibriSpeech data and CER/WER; attention comes from the core.
"""

from polyformer.domains.speech.conformer import Conformer, ConformerBlock, ConformerConfig
from polyformer.domains.speech.data import LibriSpeechDataModule
from polyformer.domains.speech.model import SpeechModelConfig, SpeechRecognizer
from polyformer.domains.speech.task import SpeechRecognitionTask
from polyformer.domains.speech.tokens import CharTokenizer, SentencePieceTokenizer, TokenizerConfig

__all__ = [
    "Conformer", "ConformerBlock", "ConformerConfig", "LibriSpeechDataModule",
    "SpeechModelConfig", "SpeechRecognizer", "SpeechRecognitionTask", "CharTokenizer", "SentencePieceTokenizer",
    "TokenizerConfig",
]
