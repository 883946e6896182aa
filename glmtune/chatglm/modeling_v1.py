"""ChatGLM-6B (v1) on current transformers: the original checkpoints, the original numbers, no remote code.

Parity with THUDM's ``modeling_chatglm.py`` (final revision) is checked against its own outputs in
``tests/test_chatglm_v1.py``. What makes v1 unusual, and is reproduced here on purpose:

* 2-D rotary positions: the first half of each head is rotated by the token position, the second half by
  the block position (0 over the context, 1, 2, ... from ``<sop>`` on); every token from ``<sop>`` on takes
  the position of ``[gMASK]``/``[MASK]``. Frequencies are rounded to fp16 as the original computes them,
  and a checkpoint's ``rotary_emb.inv_freq`` is ignored, as the original ignores it.
* a prefix-LM mask: bidirectional over the context before ``<sop>``, causal from ``<sop>`` on;
* post-LN-style residuals ``LN(x) * alpha + f(LN(x))`` with alpha = sqrt(2 * 28) whatever the depth (the
  original's GLMBlock keeps its own default of 28 layers);
* the original's GELU, ``0.5x(1 + tanh(0.79788456(x + 0.044715x^3)))``: torch's tanh-approximate GELU, which
  computes it in one kernel and keeps one tensor for backward (the formula written out keeps seven); the
  two differ by float rounding (5e-7 in float32).

Inputs: ``position_ids`` of shape [batch, 2, length] and 4-D masks (bool, True = masked, as the original
tokenizer builds them; or float, additive) are used as given. Otherwise (glmtune's collator: a 2-D padding
mask and 1-D positions) the 2-D positions and the prefix-LM mask are derived per row from input_ids and
the padding mask, and 1-D positions are ignored. Masks reach attention as additive float masks with a
finite minimum, so padding rows that see nothing attend uniformly (as the original's -10000 fill does)
instead of producing NaN.
"""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from glmtune.chatglm.common import embed_and_cache
from glmtune.errors import GlmtuneError

RESIDUAL_ALPHA = (2 * 28) ** 0.5  # GLMBlock's default num_layers=28, never overridden by the original


class ChatGLMConfig(PreTrainedConfig):
    """The original config.json fields, unchanged, plus the standard transformers names."""

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "max_sequence_length",
        "intermediate_size": "inner_hidden_size",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int | None = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 130004  # <sop>
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int = 3
    use_cache: bool = True
    quantization_bit: int = 0
    pre_seq_len: int | None = None  # the original's built-in P-Tuning; glmtune attaches its own prefix
    prefix_projection: bool = False
    tie_word_embeddings: bool = True  # the original ties lm_head to the word embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads


def check_supported(config: ChatGLMConfig) -> None:
    """Refuse the variants whose weights or positions this implementation does not reproduce."""
    if not config.position_encoding_2d:
        raise GlmtuneError("config.json: position_encoding_2d false is not supported (ChatGLM-6B uses 2-D positions)")
    if config.quantization_bit:
        raise GlmtuneError(
            f"config.json: quantization_bit {config.quantization_bit} (THUDM's own int4/int8 checkpoints) is not "
            "supported; load the fp16 checkpoint and use --quantization_bit (bitsandbytes) instead"
        )
    if config.head_dim % 4:
        raise GlmtuneError(f"config.json: the head dimension {config.head_dim} must be a multiple of 4 for 2-D rotary")


# ---- positions and masks, derived from the [gMASK]/[MASK] and <sop> tokens -------------------------------


def _first_index(hits: torch.Tensor, default: int) -> torch.Tensor:
    """Per row, the index of the first True (``default`` where there is none)."""
    found = hits.any(dim=-1)
    return torch.where(found, hits.int().argmax(dim=-1), torch.full_like(found, default, dtype=torch.long))


def glm_position_ids(input_ids: torch.Tensor, padding_mask, config: ChatGLMConfig) -> torch.Tensor:
    """[batch, 2, length] positions as the original tokenizer and model build them.

    Channel 0 counts real tokens from 0 (left padding does not shift it), and every token from ``<sop>``
    on takes the position of the row's ``[gMASK]`` (else ``[MASK]``); channel 1 is 0 before ``<sop>`` and
    1, 2, ... from it. Padding gets 0 in both. A row without ``<sop>`` is all context.
    """
    length = input_ids.shape[1]
    real = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    sop = _first_index(input_ids == config.bos_token_id, default=length)[:, None]
    gmask = _first_index(input_ids == config.gmask_token_id, default=-1)
    mask_at = torch.where(gmask >= 0, gmask, _first_index(input_ids == config.mask_token_id, default=-1))
    if bool(((mask_at < 0) & (sop[:, 0] < length)).any()):
        raise ValueError("ChatGLM-6B input: a row has <sop> but no [gMASK] or [MASK] (the prompt must end with both)")
    counted = (real.long().cumsum(-1) - 1).clamp(min=0)
    mask_position = counted.gather(1, mask_at.clamp(min=0)[:, None])
    index = torch.arange(length, device=input_ids.device)[None, :]
    positions = torch.where(index >= sop, mask_position, counted)
    blocks = (index - sop + 1).clamp(min=0)
    return torch.stack((positions, blocks), dim=1) * real[:, None, :]


def glm_attention_mask(input_ids, padding_mask, past_length: int, config: ChatGLMConfig, dtype) -> torch.Tensor:
    """Additive [batch, 1, new tokens, all tokens] prefix-LM mask (0 = visible).

    Keys before ``<sop>`` are visible to every query, later keys causally; padded keys are hidden, and
    padded queries see nothing (uniform attention, finite). Without ``<sop>`` in the new tokens, a prompt
    (empty cache) is all context and tokens continuing a cache are causal.
    """
    batch, new = input_ids.shape
    total = past_length + new
    if padding_mask is None:
        padding_mask = torch.ones(batch, total, dtype=torch.bool, device=input_ids.device)
    if padding_mask.shape[-1] != total:
        raise ValueError(
            f"ChatGLM-6B: a 2-D attention_mask must cover all {total} tokens (cache + new), "
            f"got length {padding_mask.shape[-1]}"
        )
    real = padding_mask.bool()
    sop = _first_index(input_ids == config.bos_token_id, default=-1)
    context = torch.where(sop >= 0, past_length + sop, total if past_length == 0 else past_length)
    keys = torch.arange(total, device=input_ids.device)[None, None, :]
    queries = torch.arange(past_length, total, device=input_ids.device)[None, :, None]
    visible = (keys <= queries) | (keys < context[:, None, None])
    visible = visible & real[:, None, :] & real[:, past_length:, None]
    return _additive(~visible[:, None], dtype)


def padding_mask_from(mask_4d: torch.Tensor, input_ids, config: ChatGLMConfig) -> torch.Tensor:
    """The 2-D padding mask (1 = token) of a prompt's 4-D prefix-LM mask (bool, True = masked, as the original
    tokenizer builds it; or additive float): a row's last query sees every real token. Raises ValueError when
    the mask is not the one :func:`glm_attention_mask` builds from that padding mask."""
    masked = mask_4d if mask_4d.dtype == torch.bool else mask_4d < 0
    padding = (~masked[:, 0, -1, :]).long()
    fits = input_ids is not None and masked.shape[-1] == input_ids.shape[-1]
    if not fits or not torch.equal(masked, glm_attention_mask(input_ids, padding, 0, config, torch.float32) < 0):
        raise ValueError(
            "ChatGLM-6B generate(): a 4-D attention_mask must be the tokenizer's prefix-LM mask of input_ids "
            "(the mask is rebuilt at every step); pass a 2-D padding mask instead"
        )
    return padding


def _additive(masked: torch.Tensor, dtype) -> torch.Tensor:
    """Bool (True = masked) -> float mask with the dtype's finite minimum where masked."""
    return torch.zeros(masked.shape, dtype=dtype, device=masked.device).masked_fill(masked, torch.finfo(dtype).min)


# ---- layers ----------------------------------------------------------------------------------------------


def rotary_frequencies(head_dim: int) -> tuple:
    """The original's ``inv_freq``: computed in fp32 over a quarter-head rotary half, then rounded to fp16."""
    dim = head_dim // 2
    # On the CPU explicitly: from_pretrained builds modules under a meta-device context.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cpu").float() / dim))
    return tuple(inv_freq.half().float().tolist())


def rotary_tables(position_ids: torch.Tensor, inv_freq: tuple, dtype) -> tuple:
    """cos/sin [batch, 1, length, head_dim]: first half from positions, second half from block positions."""
    frequencies = torch.tensor(inv_freq, dtype=torch.float32, device=position_ids.device)
    angles = position_ids[..., None].float() * frequencies  # [batch, 2, length, head_dim / 4]
    angles = torch.cat((angles, angles), dim=-1)
    angles = torch.cat((angles[:, 0], angles[:, 1]), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """rotate-half applied to each half of the head separately (each half has its own rotary)."""
    a1, a2, b1, b2 = x.chunk(4, dim=-1)
    return torch.cat((-a2, a1, -b2, b1), dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain softmax attention with an additive float mask (softmax in float32, as the original)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ChatGLMAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # the prefix-LM mask is always passed explicitly
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        # The original's layout: per head, [query | key | value] of head_dim each.
        mixed = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = mixed.transpose(1, 2).split(self.head_dim, dim=-1)
        cos, sin = position_embeddings
        query = query * cos + _rotate_halves(query) * sin
        key = key * cos + _rotate_halves(key) * sin
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self.dense(output.reshape(batch, length, -1)), weights


class ChatGLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size)

    def forward(self, hidden_states):
        return self.dense_4h_to_h(nn.functional.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLMMLP(config)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None, **kwargs):
        # The residual is the *normalised* input, scaled by alpha (the original's DeepNorm-like block).
        attention_input = self.input_layernorm(hidden_states)
        attention_output, _ = self.attention(
            attention_input, position_embeddings, attention_mask, past_key_values, **kwargs
        )
        mlp_input = self.post_attention_layernorm(attention_input * RESIDUAL_ALPHA + attention_output)
        return mlp_input * RESIDUAL_ALPHA + self.mlp(mlp_input)


# ---- models ----------------------------------------------------------------------------------------------


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # the prefix-LM mask is arbitrary; flash kernels take no mask
    _supports_flex_attn = False
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]  # recomputed, as the original does


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embeddings, GLM blocks and the final LayerNorm (the original's ``transformer``)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        check_supported(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.inv_freq = rotary_frequencies(config.head_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        inputs_embeds, past_key_values, past_length = embed_and_cache(
            self, self.word_embeddings, input_ids, inputs_embeds, past_key_values, use_cache
        )
        position_ids = self._position_ids(input_ids, attention_mask, position_ids, past_length)
        mask = self._attention_mask(input_ids, attention_mask, past_length, inputs_embeds.dtype)
        position_embeddings = rotary_tables(position_ids, self.inv_freq, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.final_layernorm(hidden_states),
            past_key_values=past_key_values if use_cache else None,
        )

    def _position_ids(self, input_ids, attention_mask, position_ids, past_length):
        if position_ids is not None and position_ids.dim() == 3:
            return position_ids
        if past_length:
            raise ValueError(
                "ChatGLM-6B: continuing a KV cache needs position_ids of shape [batch, 2, new tokens] "
                "(they depend on the whole sequence's [gMASK]/<sop>; generate() passes them)"
            )
        if input_ids is None:
            raise ValueError("ChatGLM-6B: with inputs_embeds, pass position_ids [batch, 2, length] and a 4-D mask")
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        return glm_position_ids(input_ids, padding, self.config)

    def _attention_mask(self, input_ids, attention_mask, past_length, dtype):
        if attention_mask is not None and attention_mask.dim() == 4:
            # The original's convention: a bool mask is True where attention is *not* allowed.
            return _additive(attention_mask, dtype) if attention_mask.dtype == torch.bool else attention_mask.to(dtype)
        if input_ids is None:
            raise ValueError("ChatGLM-6B: with inputs_embeds, pass position_ids [batch, 2, length] and a 4-D mask")
        return glm_attention_mask(input_ids, attention_mask, past_length, self.config, dtype)


class ChatGLMForCausalLM(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.transformer

    def set_decoder(self, decoder):
        self.transformer = decoder

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep])
        loss = None
        if labels is not None:  # shifted mean cross-entropy in float32 over targets != -100, as the original
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

    # ---- generation: v1's positions continue as the original's (channel 0 stays, channel 1 counts on) ----

    def generate(self, inputs=None, attention_mask=None, **kwargs):
        """transformers' generate, also from the original tokenizer's padded batch, as ChatGLM-6B's own batch
        example calls it: ``model.generate(**tokenizer(texts, padding=True, return_tensors="pt"))``.

        generate() accepts only a 2-D mask, and the tokenizer's is the 4-D prefix-LM mask: it becomes the 2-D
        padding mask it was built from, from which every step rebuilds the same 4-D mask (checked here, so that
        a mask of any other shape is refused rather than replaced). The tokenizer's 2-channel positions are the
        ones the model derives, and continue as the original's.
        """
        if attention_mask is not None and attention_mask.dim() == 4:
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            attention_mask = padding_mask_from(attention_mask, input_ids, self.config)
        return super().generate(inputs, attention_mask=attention_mask, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        if inputs_tensor.dtype.is_floating_point:  # inputs_embeds: the caller must give 2-D positions
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        mask = model_kwargs.get("attention_mask")
        return glm_position_ids(inputs_tensor, mask if mask is not None and mask.dim() == 2 else None, self.config)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        positions = kwargs.get("position_ids")
        if positions is None or positions.dim() != 3:  # e.g. a collator's 1-D positions: derive v1's own
            mask = kwargs.get("attention_mask")
            kwargs["position_ids"] = glm_position_ids(
                input_ids, mask if mask is not None and mask.dim() == 2 else None, self.config
            )
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        positions = model_kwargs.get("position_ids")
        if positions is None or positions.dim() != 3:
            return super()._update_model_kwargs_for_generation(
                outputs, model_kwargs, is_encoder_decoder, num_new_tokens
            )
        model_kwargs["position_ids"] = None
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder, num_new_tokens
        )
        last = positions[..., -1:]
        steps = torch.arange(1, num_new_tokens + 1, device=positions.device)
        new = torch.stack((last[:, 0].expand(-1, num_new_tokens), last[:, 1] + steps), dim=1)
        model_kwargs["position_ids"] = torch.cat((positions, new), dim=-1)
        return model_kwargs


__all__ = ["ChatGLMConfig", "ChatGLMForCausalLM", "ChatGLMModel", "glm_attention_mask", "glm_position_ids"]
