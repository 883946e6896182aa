"""The original ChatGLM-6B (v1), ChatGLM2-6B (v2) and ChatGLM3-6B (v3) on current transformers, no remote code.

Model folders saved by THUDM (config.json with ``model_type: "chatglm"``, the original state-dict keys,
``ice_text.model`` or ``tokenizer.model``) load unchanged through glmtune's own implementations:

* ``modeling_v1`` - ChatGLM-6B: 2-D rotary positions, bidirectional attention over the context up to
  ``<sop>``, GELU MLP, alpha-scaled residuals.
* ``modeling_v2`` - ChatGLM2-6B / ChatGLM3-6B (same architecture): multi-query attention, rotary on half
  the head dimension, RMSNorm, SwiGLU, ``rope_ratio``.
* ``tokenization`` - which tokenizer a folder needs, and loading it; the tokenizers themselves (SentencePiece,
  the original special tokens and prompt builders) in ``tokenization_v1`` / ``tokenization_v2`` over
  ``tokenization_base``.

Contract with the rest of glmtune (what makes P-Tuning v2, LoRA, the target-token loss and layer
compilation work on these models exactly as on native transformers models):

* attention modules carry ``layer_idx``, ``config`` and a ``query_key_value`` linear, and call the function
  registered under ``config._attn_implementation`` in transformers' ``ALL_ATTENTION_FUNCTIONS`` with
  ``(module, query [B,H,Q,D], key [B,Hkv,K,D], value, attention_mask, dropout=0.0, scaling=...)``, rotary
  already applied and the KV cache already updated, so ``glmtune.ptuning`` can join its prefix there;
* ``get_decoder()`` returns the module that runs the layers (its output's first element is the final
  hidden state, after the final norm) and has a ``layers`` attribute listing the decoder layers;
  ``get_output_embeddings()`` is the output head; ``forward`` accepts ``logits_to_keep``;
* configs answer the standard names ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``,
  ``vocab_size``, ``hidden_size``, ``num_attention_heads``.
"""

import json
import os

MODEL_TYPE = "chatglm"


def read_config(path: str) -> dict:
    """config.json of a model folder as a dict ({} when there is none or it is not JSON)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_chatglm_folder(path: str) -> bool:
    return read_config(path).get("model_type") == MODEL_TYPE


def architecture(config: dict) -> str:
    """'v1' (ChatGLM-6B) or 'v2' (ChatGLM2-6B and ChatGLM3-6B, one architecture), from config.json's fields."""
    if "padded_vocab_size" in config or "multi_query_attention" in config or "kv_channels" in config:
        return "v2"
    return "v1"


def causal_lm_class(path: str):
    """glmtune's model class for the ChatGLM folder at ``path`` (imported lazily: most runs never need it)."""
    if architecture(read_config(path)) == "v1":
        from glmtune.chatglm.modeling_v1 import ChatGLMForCausalLM

        return ChatGLMForCausalLM
    from glmtune.chatglm.modeling_v2 import ChatGLM2ForCausalLM

    return ChatGLM2ForCausalLM


def load_config(path: str):
    return causal_lm_class(path).config_class.from_pretrained(path)


def is_chatglm_config(model_config) -> bool:
    return getattr(model_config, "model_type", None) == MODEL_TYPE
