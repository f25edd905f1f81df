"""The tiny random BERT the transformer tests share: built from a config, nothing downloads."""

from __future__ import annotations

from typing import Any

VOCAB = 64


def tiny_bert_config(transformers: Any) -> Any:
    """A 2-layer, 32-wide ``BertConfig`` over a 64-token vocabulary (``transformers`` passed in, so a test
    module decides when it is imported)."""
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
