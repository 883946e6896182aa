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

It works with any transformers model whose attention goes through ``AttentionInterface`` and knows its
``layer_idx`` (GLM, GLM-4, Llama, Qwen2, Mistral, ...), whatever the base's dtype or quantization.
"""

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

ATTENTION_NAME = "glmtune_prefix_sdpa"


class PrefixEncoder(nn.Module):
    """``pre_seq_len`` rows -> per-layer prefix keys and values.

    Without projection the embedding row is the prefix itself (width ``num_layers * 2 * kv_heads *
    head_dim``); with projection an embedding of ``embedding_dim`` goes through Linear-Tanh-Linear.
    The output layout matches ChatGLM's: the flat width is (layer, key/value, head, head_dim).
    """

    def __init__(self, pre_seq_len, num_layers, kv_heads, head_dim, projection=False, embedding_dim=None,
                 hidden_size=None, dropout=0.0):
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


def prefix_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention over [prefix keys/values] + the layer's own keys/values.

    The forward pre-hook of :func:`attach_prefix` leaves each layer its ``[2, kv_heads, pre_seq_len,
    head_dim]`` slice in ``module.prefix_key_value`` (a plain tensor attribute, not a buffer: it is an
    activation). Reading it there rather than indexing by ``layer_idx`` keeps the code identical for
    every layer, so ``torch.compile`` compiles it once.

    With no mask (purely causal: see :func:`prefix_mask`) it runs the flash kernel where it can, whose
    causal mask is aligned to the last keys: exactly "every query sees the whole prefix, then its past".
    Other masks (padding in generation, additive float masks) take the explicit-mask route.

    Without a prefix (LoRA under ``--compile_layers``) it is transformers' SDPA attention, except that a
    causal call without mask or cache also goes to the flash op: on an H100, SDPA picks cuDNN there,
    which builds a new cuDNN graph (hundreds of milliseconds) for every new batch length.
    """
    prefix = getattr(module, "prefix_key_value", None)
    if prefix is None:
        if _plain_causal(module, query, key, attention_mask, kwargs) and _flash_applies(query, key):
            return _flash_lower_right(query, key, value, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    prefix_keys, prefix_values = prefix.to(key.dtype).unsqueeze(1).expand(-1, key.shape[0], -1, -1, -1)
    key = torch.cat([prefix_keys, key], dim=2)
    value = torch.cat([prefix_values, value], dim=2)
    if attention_mask is None and _flash_applies(query, key):
        return _flash_lower_right(query, key, value, **kwargs)
    mask = _mask_with_prefix(attention_mask, query, key, prefix_keys.shape[2])
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


def _plain_causal(module, query, key, attention_mask, kwargs) -> bool:
    """Causal attention of every query over exactly as many keys (no cache), with no mask or bias."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    return (attention_mask is None and causal and kwargs.get("position_bias") is None
            and query.shape[2] == key.shape[2] and not kwargs.get("output_attentions", False))


def _flash_applies(query, key) -> bool:
    """The flash kernel's own limits: CUDA, half precision, head size a multiple of 8 up to 256, and
    key/value heads dividing the query heads (it runs grouped-query attention without copying keys)."""
    head_dim = query.shape[-1]
    return (
        query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0 and head_dim <= 256 and query.shape[1] % key.shape[1] == 0
    )


def _flash_lower_right(query, key, value, dropout=0.0, scaling=None, **_):
    """Causal attention with the queries aligned to the last keys (the prefix and any cache come first).

    ``F.scaled_dot_product_attention(is_causal=True)`` aligns top-left and refuses flash when keys
    outnumber queries; the flash op itself aligns bottom-right (as ``torch.nn.attention.bias.
    causal_lower_right`` relies on), and it is a plain aten op with a backward, so it compiles.
    """
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _mask_with_prefix(attention_mask, query, key, pre_seq_len):
    """Prepend ``pre_seq_len`` always-visible columns to the real tokens' mask.

    ``key`` already holds the prefix. transformers passes ``None`` when the mask is purely causal (it
    relies on SDPA's ``is_causal``, which aligns top-left and so would be wrong once the prefix makes keys
    longer than queries): build the causal mask explicitly then, aligning the queries to the last keys.
    """
    q_len, k_len = query.shape[2], key.shape[2] - pre_seq_len
    if attention_mask is None:
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        attention_mask = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None]
    attention_mask = attention_mask[..., -k_len:]
    shape = (*attention_mask.shape[:-1], pre_seq_len)
    if attention_mask.dtype == torch.bool:
        visible = torch.ones(shape, dtype=torch.bool, device=attention_mask.device)
    else:  # additive float mask: 0 means visible
        visible = torch.zeros(shape, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([visible, attention_mask], dim=-1)


def prefix_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    """transformers' SDPA mask, except that a right-padded batch without cache gets none (pure causal).

    Right padding only hides keys that come after every real token of their row, which causality hides
    anyway: the outputs at real positions are the same with and without the padding mask, and padded
    positions carry no loss and feed no real position. Without a mask the attention runs the flash
    kernel instead of a masked one (training batches are right-padded). Any other pattern -- sliding
    windows, packed sequences, custom mask functions, a KV cache, left padding -- keeps transformers' mask.
    """
    if (allow_is_causal_skip and mask_function is causal_mask_function and local_size is None
            and q_offset == 0 and kv_offset == 0 and q_length == kv_length
            and _right_padded(attention_mask, kv_length)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def _right_padded(padding_mask, length: int) -> bool:
    """Every row is real tokens then padding (one host sync per forward, outside the compiled layers)."""
    if padding_mask is None or padding_mask.dim() != 2 or padding_mask.shape[-1] != length:
        return False
    if torch.compiler.is_compiling():
        return False
    visible = padding_mask.bool()
    return not bool((visible[:, 1:] & ~visible[:, :-1]).any())


def register_attention() -> None:
    """Make ``ATTENTION_NAME`` known to transformers (idempotent); masks are built as for SDPA (:func:`prefix_mask`)."""
    AttentionInterface.register(ATTENTION_NAME, prefix_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, prefix_mask)


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
