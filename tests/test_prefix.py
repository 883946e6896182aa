"""P-Tuning v2 prefix encoder: what trains, what it computes, and that it survives checkpointing and generation."""

import copy
import math

import pytest
import torch
from transformers import DynamicCache

from glmtune.arguments import PtuningArguments
from glmtune.ptuning import add_prefix_encoder, attention_layers, prefix_attention
from glmtune.speed.attention import _flash_applies, fast_attention

PRE_SEQ_LEN = 5


def prefixed(model, projection=False, dropout=0.0):
    model = add_prefix_encoder(
        model,
        PtuningArguments(
            pre_seq_len=PRE_SEQ_LEN, prefix_projection=projection, prefix_hidden_size=16, prefix_dropout=dropout
        ),
    )
    torch.manual_seed(1)
    for p in model.prefix_encoder.parameters():  # visible prefixes: N(0, 1) keys dominate a random tiny model
        torch.nn.init.normal_(p, std=1.0)
    return model


def batch(tokenizer, texts, side="left"):
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side=side)


@pytest.mark.parametrize("projection", [False, True])
def test_only_prefix_parameters_receive_gradients(model, tokenizer, projection):
    model = prefixed(model, projection=projection).train()
    inputs = batch(tokenizer, ["类型#裙*颜色#白色", "类型#上衣"], side="right")
    model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prefix_encoder.embedding.weight"}
    if projection:
        expected |= {f"prefix_encoder.trans.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert trainable == expected
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in expected)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)


def test_attention_equals_explicit_softmax_with_prefix_keys(model):
    """The attention function against softmax(QK^T/sqrt(d) + mask)V written out, prefix keys given explicitly."""
    model = prefixed(model)
    layer = attention_layers(model)[1]
    layer.prefix_key_value = model.prefix_encoder().detach()[1]
    batch_size, heads, kv_heads, q_len, dim = 2, 4, 2, 6, 32
    torch.manual_seed(0)
    query = torch.randn(batch_size, heads, q_len, dim)
    key, value = torch.randn(2, batch_size, kv_heads, q_len, dim)
    pad = torch.tensor([[True] * q_len, [False, False] + [True] * (q_len - 2)])  # second row left-padded by 2
    causal = torch.tril(torch.ones(q_len, q_len, dtype=torch.bool))
    mask = (causal[None] & pad[:, None, :])[:, None]  # [B, 1, Q, K] as transformers builds it for SDPA
    out, _ = prefix_attention(layer, query, key, value, mask, scaling=dim**-0.5, dropout=0.0)

    prefix_keys, prefix_values = layer.prefix_key_value  # [kv_heads, P, D] each
    full_keys = torch.cat([prefix_keys.expand(batch_size, -1, -1, -1), key], dim=2).repeat_interleave(2, dim=1)
    full_values = torch.cat([prefix_values.expand(batch_size, -1, -1, -1), value], dim=2).repeat_interleave(2, dim=1)
    scores = query @ full_keys.transpose(-1, -2) / math.sqrt(dim)
    visible = torch.cat([torch.ones(batch_size, 1, q_len, PRE_SEQ_LEN, dtype=torch.bool), mask], dim=-1)
    expected = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ full_values).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_model_equals_prefix_given_as_kv_cache_with_unshifted_positions(model, tokenizer):
    """Independent route: the plain model with the prefix pre-filled in its KV cache, real positions from 0."""
    reference = copy.deepcopy(model)
    model = prefixed(model)
    inputs = batch(tokenizer, ["类型#裙*颜色#白色*风格#简约", "类型#上衣"], side="left")
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0, as generate() counts them
    with torch.no_grad():
        logits = model(**inputs, position_ids=positions).logits
        prefix = model.prefix_encoder()
        cache = DynamicCache(config=reference.config)
        for layer_idx, (keys, values) in enumerate(prefix):
            cache.update(keys.expand(2, -1, -1, -1), values.expand(2, -1, -1, -1), layer_idx)
        expected = reference(
            input_ids=inputs["input_ids"],
            position_ids=positions,
            past_key_values=cache,
            attention_mask=torch.cat([torch.ones(2, PRE_SEQ_LEN, dtype=mask.dtype), mask], dim=-1),
        ).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    plain = reference(**inputs, position_ids=positions).logits
    assert (logits[real] - plain[real]).abs().max() > 1e-2  # the prefix does change the output


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model, tokenizer):
    inputs = batch(tokenizer, ["类型#裙*颜色#白色", "类型#裤*材质#牛仔布*风格#街头"], side="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    results = []
    for checkpointing in (False, True):
        run = prefixed(copy.deepcopy(model), projection=True).train()
        if checkpointing:
            run.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = run(**inputs, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in run.named_parameters() if p.requires_grad}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_plain.keys() == grads_ckpt.keys() and grads_plain
    for name in grads_plain:
        assert grads_plain[name].abs().sum() > 0
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5)


def test_left_padded_batched_generation_matches_one_at_a_time(model, tokenizer):
    model = prefixed(model)
    prompts = ["类型#上衣*颜色#白色*风格#简约*图案#刺绣", "类型#裙", "类型#裤*材质#牛仔布"]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    inputs = batch(tokenizer, prompts, side="left")
    together = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = batch(tokenizer, [prompt])
        single = model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
        assert together[row].tolist() == single.tolist()


def test_kv_cache_generation_matches_full_recomputation(model, tokenizer):
    """With the cache, each new token attends to prefix + cached real tokens exactly as without it."""
    model = prefixed(model)
    inputs = batch(tokenizer, ["类型#上衣*颜色#白色", "类型#裙*裙长#长裙*图案#碎花"], side="left")
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert cached.tolist() == uncached.tolist()


def test_prefix_dropout_is_active_only_in_training(model, tokenizer):
    model = prefixed(model, dropout=0.5)
    inputs = batch(tokenizer, ["类型#上衣"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
        model.train()
        assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Glm4ForCausalLM"])
def test_other_architectures_match_the_kv_cache_route_and_train_only_the_prefix(tokenizer, architecture):
    """Any transformers decoder whose attention goes through AttentionInterface takes the same prefix."""
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    base = getattr(transformers, architecture)(config).eval()
    test_model_equals_prefix_given_as_kv_cache_with_unshifted_positions(base, tokenizer)
    test_only_prefix_parameters_receive_gradients(copy.deepcopy(base), tokenizer, projection=False)


# ----------------------------------------------------------------------------- masks and the flash route


def right_padded_batch(tokenizer):
    inputs = batch(tokenizer, ["类型#裙*颜色#白色*风格#简约", "类型#上衣"], side="right")
    return inputs, inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


def loss_and_gradients(model, inputs, labels):
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_right_padded_batches_skip_the_mask_with_the_same_loss_and_gradients(model, tokenizer):
    """prefix_mask drops the padding mask of right-padded batches: same loss, same gradients as transformers' mask."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from glmtune.speed.attention import ATTENTION_NAME, register_attention, use_fast_attention

    inputs, labels = right_padded_batch(tokenizer)
    assert not inputs["attention_mask"].all()  # the batch is padded
    results = []
    try:
        for mask_function in (None, sdpa_mask):  # None: glmtune's registration
            run = prefixed(copy.deepcopy(model), projection=True).train()
            use_fast_attention(run)
            if mask_function is not None:
                AttentionMaskInterface.register(ATTENTION_NAME, mask_function)
            results.append(loss_and_gradients(run, inputs, labels))
    finally:
        register_attention()
    (loss, grads), (reference_loss, reference_grads) = results
    torch.testing.assert_close(loss, reference_loss, atol=0, rtol=1e-6)
    for name, grad in reference_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[name], grad, atol=1e-7, rtol=1e-5)


def test_prefix_mask_is_none_only_for_right_padding_without_cache():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    from glmtune.speed.attention import prefix_mask

    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    assert prefix_mask(2, 4, 4, attention_mask=right) is None
    cases = [
        dict(attention_mask=left),
        dict(attention_mask=holes),
        dict(attention_mask=right, allow_is_causal_skip=False),
        dict(attention_mask=right, local_size=2, mask_function=sliding_window_causal_mask_function(2)),
    ]
    for case in cases:
        torch.testing.assert_close(
            prefix_mask(2, 4, 4, **case), sdpa_mask(batch_size=2, q_length=4, kv_length=4, **case)
        )
    cached = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # one new token after four cached ones
    torch.testing.assert_close(
        prefix_mask(2, 1, 5, q_offset=4, attention_mask=cached),
        sdpa_mask(batch_size=2, q_length=1, kv_length=5, q_offset=4, attention_mask=cached),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel needs a CUDA GPU")
@pytest.mark.parametrize("q_len, cached, pre_seq_len", [(64, 0, 16), (1, 40, 16), (24, 40, 16), (64, 0, 0)])
def test_flash_route_equals_the_explicit_mask_route(q_len, cached, pre_seq_len):
    """bf16 on CUDA: no mask -> flash, bottom-right causal; against the explicit-mask route in float32
    (pre_seq_len 0: no prefix, as for LoRA, against transformers' SDPA attention)."""
    torch.manual_seed(0)
    layer = torch.nn.Module()
    heads, kv_heads, dim = 8, 2, 128
    layer.num_key_value_groups = heads // kv_heads
    tensors = [
        torch.randn(2, heads, q_len, dim),
        torch.randn(2, kv_heads, cached + q_len, dim),
        torch.randn(2, kv_heads, cached + q_len, dim),
        torch.randn(kv_heads, max(pre_seq_len, 1), dim),
    ]
    results = []
    for dtype in (torch.bfloat16, torch.float32):  # float32 on CUDA takes the explicit-mask route
        query, key, value, prefix = [t.to("cuda", dtype).requires_grad_() for t in tensors]
        assert _flash_applies(query, key) == (dtype == torch.bfloat16)
        layer.prefix_key_value = torch.stack([prefix, prefix.flip(-1)]) if pre_seq_len else None
        out, _ = fast_attention(layer, query, key, value, None, scaling=dim**-0.5, dropout=0.0)
        out.float().square().sum().backward()
        grads = [t.grad.float() for t in (query, key, value, prefix) if t.grad is not None]
        results.append([out.float(), *grads])
    assert len(results[0]) == len(results[1]) == (5 if pre_seq_len else 4)
    for got, expected in zip(*results):  # bf16 rounding: about 0.4% of the norm
        assert (got - expected).norm() <= 1e-2 * expected.norm()
