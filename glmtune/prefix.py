"""P-Tuning v2: a trainable prefix of keys and values in front of every attention layer.

Why our own and not PEFT's ``PrefixTuningConfig``: PEFT feeds the prefix in through the KV cache, which
refuses gradient checkpointing (transformers 5.17 / peft 0.21) and shifts every real token's position by
``pre_seq_len``. Here the prefix is joined to each layer's keys/values inside the attention function,
after rotary embedding and after the cache update, exactly as ChatGLM's P-Tuning v2 does:

* prefix keys get no rotary embedding; real tokens keep their own positions;
* every query sees the whole prefix; padding and causality among real tokens are masked as usual;
* the KV cache holds only real tokens, so batched, left-padded generation works unchanged;
* the prefix is computed once per forward outside the decoder layers, so checkpointed layers read the
  same tensor when they are recomputed (non-reentrant checkpointing carries its gradient).

The attention itself is ``glmtune.attention``. It works with any transformers model whose attention goes
through ``AttentionInterface`` and knows its ``layer_idx`` (GLM, GLM-4, Llama, Qwen2, Mistral, ...),
whatever the base's dtype or quantization.
"""

import torch
from torch import nn

from glmtune.attention import ATTENTION_NAME, register_attention


class PrefixEncoder(nn.Module):
    """``pre_seq_len`` rows -> per-layer prefix keys and values.

    Without projection the embedding row is the prefix itself (width ``num_layers * 2 * kv_heads *
    head_dim``); with projection an embedding of ``embedding_dim`` goes through Linear-Tanh-Linear.
    The output layout matches ChatGLM's: the flat width is (layer, key/value, head, head_dim).
    """

    def __init__(
        self,
        pre_seq_len,
        num_layers,
        kv_heads,
        head_dim,
        projection=False,
        embedding_dim=None,
        hidden_size=None,
        dropout=0.0,
    ):
        super().__init__()
        self.shape = (num_layers, 2, kv_heads, head_dim)
        kv_size = num_layers * 2 * kv_heads * head_dim
        if projection:
            self.embedding = nn.Embedding(pre_seq_len, embedding_dim)
            self.trans = nn.Sequential(
                nn.Linear(embedding_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size)
            )
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        """Returns ``[num_layers, 2, kv_heads, pre_seq_len, head_dim]``."""
        prefix = self.embedding.weight
        if hasattr(self, "trans"):
            prefix = self.trans(prefix)
        prefix = self.dropout(prefix)
        return prefix.view(prefix.shape[0], *self.shape).permute(1, 2, 3, 0, 4)


def attention_layers(model) -> list:
    """The model's self-attention modules, one per decoder layer, in layer order."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and _projects_qkv(m)]
    return sorted(layers, key=lambda m: m.layer_idx)


def _projects_qkv(module) -> bool:
    return any(hasattr(module, name) for name in ("q_proj", "qkv_proj", "query_key_value", "c_attn"))


def attach_prefix(model, encoder: PrefixEncoder) -> None:
    """Install ``encoder`` on ``model``: every forward computes the prefix once, every layer reads it."""
    register_attention()
    layers = attention_layers(model)
    num_layers = encoder.shape[0]
    if len(layers) != num_layers:
        raise ValueError(
            f"P-Tuning v2 found {len(layers)} attention layers with a layer index in this model, expected "
            f"{num_layers}: its attention does not go through transformers' AttentionInterface"
        )
    model.prefix_encoder = encoder
    model.set_attn_implementation(ATTENTION_NAME)

    def compute_prefix(module, args, kwargs):
        for layer, key_value in zip(layers, encoder()):
            layer.prefix_key_value = key_value

    # On the decoder, not the LM wrapper: glmtune.loss calls through to it, and so does generate().
    model.get_decoder().register_forward_pre_hook(compute_prefix, with_kwargs=True)
