"""Workers of tests/test_lumina_next_tp.py: a LayerNorm over all heads sharded over the ranks."""
from __future__ import annotations

from diffpar.engines.tp_shard import LAYER_NORM
from workers.head_sharded_norms import norm_pieces


def layer_norm_pieces(width: int, ranges: list, offset: float = 3.0):
    """Every rank gets only its features of the input and normalizes them with its shard of a seeded LayerNorm
    (weight and bias random); returns its piece of the output, the whole LayerNorm's output, the sizes it holds
    and the all-reduces one call issued."""
    return norm_pieces(LAYER_NORM, width, ranges, offset)
