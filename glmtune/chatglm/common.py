"""What the ChatGLM-6B and ChatGLM2/3 model classes share."""

from transformers.cache_utils import DynamicCache


def embed_and_cache(model, embed, input_ids, inputs_embeds, past_key_values, use_cache):
    """The start of a decoder forward: embeddings, the KV cache to fill (a new one when caching and none is
    given), and how many positions that cache already holds."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{type(model).__name__}: pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = embed(input_ids)
    use_cache = model.config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=model.config)
    past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
    return inputs_embeds, past_key_values, past_length
