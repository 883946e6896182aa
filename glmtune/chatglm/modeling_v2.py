"""ChatGLM2-6B and ChatGLM3-6B (one architecture) as an ordinary transformers model, without remote code.

It loads THUDM's folders unchanged: config.json in the original format (``model_type: "chatglm"``) and the
original state-dict keys (``transformer.embedding.word_embeddings``, ``transformer.encoder.layers.N.*``,
``transformer.output_layer``, ...), from safetensors or ``pytorch_model-0000N-of-0000M.bin`` shards. In
float32 it reproduces the original code's logits to ~1e-6 (tests/test_chatglm_v2.py, against goldens of
THUDM/chatglm2-6b 8fd7fba and chatglm3-6b 456aa87). What the original computes, and so what this does:

* multi-query attention: ``query_key_value`` is split [heads*d | groups*d | groups*d]; each key/value
  group serves ``heads/groups`` consecutive query heads;
* rotary embedding on the first ``kv_channels/2`` dims of each head, as interleaved pairs (x[2i],
  x[2i+1]), base ``10000 * rope_ratio`` (the 32k/128k variants), recomputed at every call: the
  checkpoint's ``transformer.rotary_pos_emb.inv_freq`` is kept only so the keys match, never read;
* RMSNorm before attention and MLP, SwiGLU MLP (``silu(first half) * second half``), final RMSNorm;
* SDPA with the default 1/sqrt(d) scale (``apply_query_key_layer_scaling`` cancels out in float32);
* padding: left-padded query rows attend to everything (their outputs are never read, and no softmax
  row is ever empty), real rows are causal over real keys; positions are given by the caller (0 on pads,
  0,1,2... on real tokens, as ChatGLM's tokenizer, glmtune's collator and ``generate()`` give them).

Attention goes through transformers' ``ALL_ATTENTION_FUNCTIONS`` with rotary applied and the KV cache
updated, so ``glmtune.prefix`` joins its P-Tuning v2 prefix there, unrotated and unshifted, as the original.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from glmtune.chatglm.common import embed_and_cache
from glmtune.errors import GlmtuneError


class ChatGLM2Config(PreTrainedConfig):
    """The original config.json fields, unchanged; defaults are ChatGLM2-6B's.

    Fields read only by the original's P-Tuning / quantization code (``pre_seq_len``, ``prefix_projection``,
    ``quantization_bit``) or by kernels it does not use here (``attention_softmax_in_fp32``,
    ``bias_dropout_fusion``, ``original_rope``, ``apply_query_key_layer_scaling``) are kept and ignored.
    """

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "vocab_size": "padded_vocab_size",
        "num_key_value_heads": "multi_query_group_num",
        "head_dim": "kv_channels",
        "intermediate_size": "ffn_hidden_size",
        "max_position_embeddings": "seq_length",
    }

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 32768
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    rope_ratio: float = 1.0
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    bias_dropout_fusion: bool = True
    fp32_residual_connection: bool = False
    original_rope: bool = True
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    quantization_bit: int = 0
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    bos_token_id: int | None = None


class RMSNorm(nn.Module):
    """The original's RMSNorm: statistics in float32, the product cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (self.weight * (hidden_states * torch.rsqrt(variance + self.eps))).to(input_dtype)


def make_norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLM2RotaryEmbedding(nn.Module):
    """cos/sin of position * theta for the rotated half of each head, theta from ``10000 * rope_ratio``.

    ``inv_freq`` exists only so that ``transformer.rotary_pos_emb.inv_freq`` loads and saves under the
    original key; like the original's ``forward_impl``, theta is recomputed from the config every call.
    """

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dim = config.kv_channels // 2
        self.base = 10000 * config.rope_ratio
        self.register_buffer("inv_freq", self.theta(), persistent=True)

    def theta(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim
        return 1.0 / (self.base**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, S]`` positions -> cos, sin ``[B, 1, S, dim/2]`` in float32, then cast (as the original's cache)."""
        angles = position_ids[:, None, :, None].float() * self.theta(position_ids.device)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the first ``2 * cos.shape[-1]`` dims; the rest pass."""
    rot_dim = 2 * cos.shape[-1]
    rotated, passed = x[..., :rot_dim], x[..., rot_dim:]
    pairs = rotated.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, passed], dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """softmax(QK^T * scaling + mask) V written out; ``None`` mask means causal over the last keys."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None:
        q_len, k_len = query.shape[2], key.shape[2]
        hidden = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
        scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ChatGLM2Attention(nn.Module):
    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        if not config.multi_query_attention:
            # Its per-head interleaved q/k/v layout is not covered by any golden; every released v2/v3 uses MQA.
            raise GlmtuneError("ChatGLM2/3 config.json: multi_query_attention false is not supported")
        if config.quantization_bit:  # chatglm2-6b-int4 & co. store packed weights for THUDM's own kernels
            raise GlmtuneError(
                f"config.json: quantization_bit {config.quantization_bit} (THUDM's own int4/int8 checkpoints) is not "
                "supported; load the fp16 checkpoint and use --quantization_bit (bitsandbytes) instead"
            )
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.multi_query_group_num
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.kv_channels
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.query_key_value = nn.Linear(
            config.hidden_size, q_size + 2 * kv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(q_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        query, key, value = self.query_key_value(hidden_states).split(self.split_sizes, dim=-1)
        query = query.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = value.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        return self.dense(output.reshape(batch, length, -1))


class ChatGLM2MLP(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class ChatGLM2Block(GradientCheckpointingLayer):
    """One GLMBlock: pre-norm attention and MLP, each with a residual (optionally from the normed input)."""

    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attention = ChatGLM2Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = ChatGLM2MLP(config)
        self.residual_from_norm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        normed = self.input_layernorm(hidden_states)
        attended = self.self_attention(normed, position_embeddings, attention_mask, past_key_values, **kwargs)
        residual = normed if self.residual_from_norm else hidden_states
        hidden_states = residual + F.dropout(attended, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.residual_from_norm else hidden_states
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class ChatGLM2Embedding(nn.Module):
    """Holds ``word_embeddings`` under the original key ``transformer.embedding.word_embeddings``."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class ChatGLM2Encoder(nn.Module):
    """The original's GLMTransformer: the layers and the final norm, under ``transformer.encoder``."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.layers = nn.ModuleList(ChatGLM2Block(config, i) for i in range(config.num_layers))
        self.final_layernorm = make_norm(config) if config.post_layer_norm else nn.Identity()


class ChatGLM2PreTrainedModel(PreTrainedModel):
    config_class = ChatGLM2Config
    config: ChatGLM2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLM2Block"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_missing = [r"rotary_pos_emb\.inv_freq"]  # unused: never make it a load error

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ChatGLM2RotaryEmbedding):
            init.copy_(module.inv_freq, module.theta(module.inv_freq.device))


def default_position_ids(attention_mask, batch: int, length: int, past_len: int, device) -> torch.Tensor:
    """As ``generate()`` and glmtune's collator give them: real tokens count from 0, padding gets 0."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + length, device=device).expand(batch, -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def attention_bias(attention_mask, q_len: int, past_len: int, dtype: torch.dtype, device):
    """Additive mask ``[B, 1, Q, K]`` (0 visible, dtype min hidden), or ``None`` for plain causal attention.

    ``attention_mask`` is the usual 2-D padding mask over cached + current tokens (1 = real). Real query
    rows see real keys up to their own position. As in the original's ``get_masks``, padding query rows of
    a first forward see every key: their outputs are never read, and no softmax row is ever empty, which
    in SDPA would give NaN that then leaks through the values of masked keys. A finite minimum instead of
    -inf keeps even a degenerate all-hidden row finite.

    ``None`` wherever causality alone gives the real tokens the same outputs, so that SDPA can run its
    flash kernel: no padding, or (first forward) padding only after each row's real tokens, as in
    right-padded training batches; there only the never-read padding rows differ from the original.
    """
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(
            f"ChatGLM2: attention_mask must be 2-D [batch, keys] (1 = token), got {tuple(attention_mask.shape)}"
        )
    if attention_mask is None or (q_len == 1 and bool(attention_mask.all())):
        return None if past_len == 0 or q_len == 1 else _bias(_causal(q_len, past_len, device)[None], dtype)
    if past_len == 0 and _padded_only_at_end(attention_mask):
        return None
    k_len = past_len + q_len
    if attention_mask.shape[-1] != k_len:
        raise ValueError(
            f"ChatGLM2: attention_mask covers {attention_mask.shape[-1]} tokens, expected "
            f"{k_len} (cached {past_len} + current {q_len})"
        )
    real = attention_mask.to(device).bool()
    visible = _causal(q_len, past_len, device)[None] & real[:, None, :]
    if past_len == 0:
        visible = visible | ~real[:, :, None]
    return _bias(visible, dtype)


def _causal(q_len: int, past_len: int, device) -> torch.Tensor:
    """``[Q, K]`` bool, True where query i (at position past_len + i) may see key j."""
    rows = torch.arange(q_len, device=device)[:, None] + past_len
    return torch.arange(past_len + q_len, device=device)[None, :] <= rows


def _bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def _padded_only_at_end(attention_mask: torch.Tensor) -> bool:
    """No row has a real token after a padding one (one host sync per forward, outside the layers)."""
    real = attention_mask.bool()
    return not bool((real[:, 1:] & ~real[:, :-1]).any())


class ChatGLM2Model(ChatGLM2PreTrainedModel):
    """``transformer``: the decoder. Its forward returns the final hidden states only; the output head
    ``output_layer`` lives here (the original key) but is applied by :class:`ChatGLM2ForCausalLM`."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        self.embedding = ChatGLM2Embedding(config)
        self.rotary_pos_emb = ChatGLM2RotaryEmbedding(config)
        self.encoder = ChatGLM2Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.embedding.word_embeddings = value

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
        inputs_embeds, past_key_values, past_len = embed_and_cache(
            self, self.embedding, input_ids, inputs_embeds, past_key_values, use_cache
        )
        batch, length = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch, length, past_len, inputs_embeds.device)
        mask = attention_bias(attention_mask, length, past_len, inputs_embeds.dtype, inputs_embeds.device)
        position_embeddings = self.rotary_pos_emb(position_ids, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        for layer in self.encoder.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                past_key_values=past_key_values,
                **kwargs,
            )
        hidden_states = self.encoder.final_layernorm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=past_key_values if use_cache else None
        )


class ChatGLM2ForCausalLM(ChatGLM2PreTrainedModel, GenerationMixin):
    """ChatGLM2-6B / ChatGLM3-6B with the output head; ``model.generate()`` works as for any causal LM."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        self.transformer = ChatGLM2Model(config)
        self.post_init()

    def get_decoder(self) -> ChatGLM2Model:
        return self.transformer

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.transformer.output_layer = new_embeddings

    @can_return_tuple
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
        """``labels``: the loss is the shifted cross-entropy over targets other than -100, in float32 (the
        mean, as the original, or the sum over ``num_items_in_batch`` when the Trainer passes it)."""
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
        logits = self.transformer.output_layer(outputs.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.padded_vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
