"""The fast attention function: flash routes and padding-free batches, with or without the P-Tuning v2 prefix.

Registered with transformers' ``AttentionInterface`` as ``ATTENTION_NAME`` and switched on by
:func:`use_fast_attention` (``glmtune.speed.prepare``: ``--compile_layers`` or ``--padding_free``). On top of
:func:`glmtune.ptuning.prefix_attention` (transformers' SDPA attention plus the prefix):

* flash routes: causal attention without a mask runs the flash kernel, aligned bottom-right (the prefix and
  any cache come first); right-padded training batches get no mask (:func:`prefix_mask`), so they take it;
* padding-free batches (``glmtune.data.PaddingFreeCollator``): the samples of a batch back to back in one row,
  their boundaries in ``cu_seq_lens_q`` (the name transformers' flash-attention kwargs use). Attention stays
  within each sample: flash's variable-length kernel on CUDA, an explicit block-diagonal mask elsewhere.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from glmtune import ptuning
from glmtune.model import base_causal_lm

ATTENTION_NAME = "glmtune_fast_sdpa"


def fast_attention(module, query, key, value, attention_mask, **kwargs):
    """:func:`glmtune.ptuning.prefix_attention`, with the flash kernel wherever it computes the same thing.

    Without a prefix (LoRA), a causal call without mask or cache also goes to the flash op: on an H100,
    SDPA picks cuDNN there, which builds a new cuDNN graph (hundreds of milliseconds) for every new batch length.
    """
    prefix = getattr(module, "prefix_key_value", None)
    if kwargs.get("cu_seq_lens_q") is not None:
        return _padding_free_attention(module, query, key, value, prefix, **kwargs)
    if prefix is None:
        if _plain_causal(module, query, key, attention_mask, kwargs) and _flash_applies(query, key):
            return _flash_lower_right(query, key, value, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is None and _flash_applies(query, key):  # the prefix changes no shape the check reads
        key, value = ptuning.join_prefix(prefix, key, value)
        return _flash_lower_right(query, key, value, **kwargs)
    return ptuning.prefix_attention(module, query, key, value, attention_mask, **kwargs)


def _plain_causal(module, query, key, attention_mask, kwargs) -> bool:
    """Causal attention of every query over exactly as many keys (no cache), with no mask or bias."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    return (
        attention_mask is None
        and causal
        and kwargs.get("position_bias") is None
        and query.shape[2] == key.shape[2]
        and not kwargs.get("output_attentions", False)
    )


def _flash_applies(query, key) -> bool:
    """The flash kernel's own limits: CUDA, half precision, head size a multiple of 8 up to 256, and
    key/value heads dividing the query heads (it runs grouped-query attention without copying keys)."""
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and query.shape[1] % key.shape[1] == 0
    )


def _flash_lower_right(query, key, value, dropout=0.0, scaling=None, **_):
    """Causal attention with the queries aligned to the last keys (the prefix and any cache come first).

    ``F.scaled_dot_product_attention(is_causal=True)`` aligns top-left and refuses flash when keys
    outnumber queries; the flash op itself aligns bottom-right (as ``torch.nn.attention.bias.
    causal_lower_right`` relies on), and it is a plain aten op with a backward, so it compiles.
    """
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- padding-free batches


def _padding_free_attention(
    module, query, key, value, prefix, cu_seq_lens_q, max_length_q, dropout=0.0, scaling=None, **kwargs
):
    """One row of samples back to back (``[1, heads, tokens, head_dim]``), sample ``i`` at
    ``cu_seq_lens_q[i]:cu_seq_lens_q[i + 1]``; each query sees the prefix and the earlier tokens of its own
    sample only. transformers' mask (block-diagonal from the restarting positions, or none) is not needed."""
    if query.shape[0] != 1:
        raise ValueError(f"padding-free batches are one row of samples, got a batch of {query.shape[0]} rows")
    pre_seq_len = 0 if prefix is None else prefix.shape[2]
    if not _flash_applies(query, key):
        mask = _block_causal_mask(cu_seq_lens_q, query.shape[2], pre_seq_len)
        if prefix is not None:
            key = torch.cat([prefix[0].to(key.dtype)[None], key], dim=2)
            value = torch.cat([prefix[1].to(value.dtype)[None], value], dim=2)
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False
        )
    # flash's variable-length layout: [tokens, heads, head_dim], sequences back to back
    query, key, value = (t[0].transpose(0, 1) for t in (query, key, value))
    cu_seq_lens_k = cu_seq_lens_q
    if prefix is not None:
        key, value, cu_seq_lens_k = _prefix_in_every_sample(prefix.to(key.dtype), key, value, cu_seq_lens_q)
    out = torch.ops.aten._flash_attention_forward(
        query,
        key,
        value,
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_q + pre_seq_len,
        dropout,
        True,
        False,
        scale=scaling,
    )[0]
    return out.unsqueeze(0), None


def _prefix_in_every_sample(prefix, key, value, cu_seq_lens):
    """Keys and values ``[tokens, kv_heads, head_dim]`` with the prefix put in front of every sample, and the
    new boundaries. Flash's causal mask is aligned bottom-right within each sample, so every query sees
    the prefix and its own past. The rows are gathered with a permutation (each source row used once) so
    the backward pass adds no two gradients into one row: deterministic."""
    samples, pre_seq_len = cu_seq_lens.shape[0] - 1, prefix.shape[2]
    cu_seq_lens_k = cu_seq_lens + pre_seq_len * torch.arange(
        samples + 1, device=cu_seq_lens.device, dtype=cu_seq_lens.dtype
    )
    rows = torch.arange(key.shape[0] + samples * pre_seq_len, device=key.device)
    sample = torch.bucketize(rows, cu_seq_lens_k[1:], right=True)
    offset = rows - cu_seq_lens_k[sample]
    # source rows: [sample 0's prefix copy, sample 1's, ..., then the tokens]
    source = torch.where(
        offset < pre_seq_len,
        sample * pre_seq_len + offset,
        samples * pre_seq_len + cu_seq_lens[sample] + offset - pre_seq_len,
    )

    def join(prefix_part, tokens):  # prefix_part [kv_heads, P, D] -> one copy per sample, then the tokens
        copies = prefix_part.transpose(0, 1).unsqueeze(0).expand(samples, -1, -1, -1).reshape(-1, *tokens.shape[1:])
        return torch.cat([copies, tokens]).index_select(0, source)

    return join(prefix[0], key), join(prefix[1], value), cu_seq_lens_k


def _block_causal_mask(cu_seq_lens, length: int, pre_seq_len: int) -> torch.Tensor:
    """``[1, 1, length, pre_seq_len + length]``: the prefix visible to all, then causal within each sample."""
    positions = torch.arange(length, device=cu_seq_lens.device)
    sample = torch.bucketize(positions, cu_seq_lens[1:], right=True)
    own_past = (sample[:, None] == sample[None, :]) & (positions[None, :] <= positions[:, None])
    prefix = torch.ones(length, pre_seq_len, dtype=torch.bool, device=cu_seq_lens.device)
    return torch.cat([prefix, own_past], dim=-1)[None, None]


def supports_padding_free(causal_lm) -> bool:
    """Padding-free batches need the model to hand its keyword arguments down to the attention function
    (transformers' ``_supports_attention_backend``) and to take positions from ``position_ids`` alone
    (ChatGLM-6B derives its 2-D positions from the [gMASK] token instead, and has no such flag)."""
    return bool(getattr(causal_lm, "_supports_attention_backend", False))


# ----------------------------------------------------------------------------- masks and registration


def prefix_mask(
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function=causal_mask_function,
    attention_mask=None,
    local_size=None,
    allow_is_causal_skip=True,
    **kwargs,
):
    """transformers' SDPA mask, except that a right-padded batch without cache gets none (pure causal).

    Right padding only hides keys that come after every real token of their row, which causality hides
    anyway: the outputs at real positions are the same with and without the padding mask, and padded
    positions carry no loss and feed no real position. Without a mask the attention runs the flash
    kernel instead of a masked one (training batches are right-padded). Any other pattern -- sliding
    windows, packed sequences, custom mask functions, a KV cache, left padding -- keeps transformers' mask.
    """
    if (
        allow_is_causal_skip
        and mask_function is causal_mask_function
        and local_size is None
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
        and _right_padded(attention_mask, kv_length)
    ):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        **kwargs,
    )


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
    AttentionInterface.register(ATTENTION_NAME, fast_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, prefix_mask)


def use_fast_attention(model) -> None:
    """Switch a model (or a PEFT wrapper's base) from SDPA or the P-Tuning v2 attention to :func:`fast_attention`;
    other choices are kept. transformers' decoders also get :func:`_no_mask_for_padding_free` (it acts on
    padding-free batches only)."""
    register_attention()
    causal_lm = base_causal_lm(model)
    if causal_lm.config._attn_implementation in ("sdpa", ptuning.ATTENTION_NAME):
        causal_lm.set_attn_implementation(ATTENTION_NAME)
    decoder = causal_lm.base_model
    if type(decoder).__module__.startswith("transformers.") and not hasattr(decoder, "_glmtune_mask_hook"):
        decoder._glmtune_mask_hook = decoder.register_forward_pre_hook(_no_mask_for_padding_free, with_kwargs=True)


def _no_mask_for_padding_free(decoder, args, kwargs):
    """Hand transformers' decoder an empty, "already prepared" 4-D mask for a padding-free batch.

    Given positions and no mask, transformers looks for packed samples in the positions (a host sync in
    every forward: ``find_packed_sequence_indices``) and builds a block-diagonal mask over the whole row,
    which glmtune's attention never reads: it keeps the samples apart with ``cu_seq_lens_q``. A 4-D mask
    is passed down untouched; an empty one fails loudly should any other attention try to use it."""
    if (
        kwargs.get("cu_seq_lens_q") is None
        or kwargs.get("attention_mask") is not None
        or decoder.config._attn_implementation != ATTENTION_NAME
    ):
        return None
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    kwargs["attention_mask"] = torch.empty((1, 1, 0, 0), dtype=torch.bool, device=tokens.device)
    return args, kwargs
