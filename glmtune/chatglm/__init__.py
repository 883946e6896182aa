"""The original ChatGLM-6B (v1), ChatGLM2-6B (v2) and ChatGLM3-6B (v3) on current transformers, no remote code.

Model folders saved by THUDM (config.json with ``model_type: "chatglm"``, the original state-dict keys,
``ice_text.model`` or ``tokenizer.model``) load unchanged through glmtune's own implementations:

* ``modeling_v1`` - ChatGLM-6B: 2-D rotary positions, bidirectional attention over the context up to
  ``<sop>``, GELU MLP, alpha-scaled residuals.
* ``modeling_v2`` - ChatGLM2-6B / ChatGLM3-6B (same architecture): multi-query attention, rotary on half
  the head dimension, RMSNorm, SwiGLU, ``rope_ratio``.
* ``tokenization`` - the three SentencePiece tokenizers with their special tokens and prompt builders.

Contract with the rest of glmtune (what makes P-Tuning v2, LoRA, the target-token loss and layer
compilation work on these models exactly as on native transformers models):

* attention modules carry ``layer_idx``, ``config`` and a ``query_key_value`` linear, and call the function
  registered under ``config._attn_implementation`` in transformers' ``ALL_ATTENTION_FUNCTIONS`` with
  ``(module, query [B,H,Q,D], key [B,Hkv,K,D], value, attention_mask, dropout=0.0, scaling=...)``, rotary
  already applied and the KV cache already updated, so ``glmtune.prefix`` can join its prefix there;
* ``get_decoder()`` returns the module that runs the layers (its output's first element is the final
  hidden state, after the final norm) and has a ``layers`` attribute listing the decoder layers;
  ``get_output_embeddings()`` is the output head; ``forward`` accepts ``logits_to_keep``;
* configs answer the standard names ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``,
  ``vocab_size``, ``hidden_size``, ``num_attention_heads``.
"""
