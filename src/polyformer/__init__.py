"""Polyformer: one transformer core (attention, positions, blocks, encoder/decoder, training base) for many domains."""

from polyformer.attention import LayerCache, MultiHeadAttention, linear_attention, local_attention
from polyformer.deformable import MultiScaleDeformableAttention, multi_scale_deformable_sampling
from polyformer.layers import DropPath, FeedForward, LayerScale, make_dropout, make_norm
from polyformer.positions import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_slopes,
    resample_1d,
    resample_2d,
)
from polyformer.transformer import KVCache, TransformerBlock, TransformerConfig, TransformerDecoder, TransformerEncoder

__version__ = "0.1.0"
