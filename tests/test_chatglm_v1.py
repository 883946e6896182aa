"""ChatGLM-6B (v1) model class against the original code's outputs (shared/golden/chatglm-v1).

Tolerances from shared/golden/README.md: logits at the stored vocabulary columns atol/rtol 1e-4,
logsumexp over the whole vocabulary atol 1e-4, argmax exact, losses 1e-5, greedy generations exact.
With the original's own inputs (4-D mask, 2-channel positions, or nothing) every position is compared,
padding included; with glmtune's inputs (2-D padding mask, 1-D positions) only real tokens are.
"""

import json

import pytest
import torch
from conftest import GOLDEN, SHARED, needs_shared
from golden import golden_prefix_encoder, parity_errors
from safetensors.torch import load_file

from glmtune.chatglm.modeling_v1 import (
    ChatGLMConfig,
    ChatGLMForCausalLM,
    glm_attention_mask,
    glm_position_ids,
    rotary_frequencies,
)
from glmtune.errors import GlmtuneError
from glmtune.ptuning import attach_prefix

V1 = GOLDEN / "chatglm-v1"
pytestmark = needs_shared
VARIANTS = ["base", "ptuning_proj_false", "ptuning_proj_true"]
PAD = 3


def load_model(variant="base", path=V1, attn="sdpa"):
    """The golden weights with the variant's golden prefix attached, in eval mode."""
    model = ChatGLMForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    if variant != "base":
        attach_prefix(model, golden_prefix_encoder(model.config, V1, projection=variant.endswith("true")))
    return model.eval()


def train_file(variant):
    return V1 / ("forward_train.safetensors" if variant == "base" else f"forward_train_{variant}.safetensors")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_infer_left_padded(attn):
    golden = load_file(V1 / "forward_infer.safetensors")
    with torch.no_grad():
        logits = load_model(attn=attn)(
            input_ids=golden["input_ids"], attention_mask=golden["attention_mask"], position_ids=golden["position_ids"]
        ).logits
    parity_errors(logits, golden)  # padding rows too: fully masked, they attend uniformly as in the original


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_forward_infer_with_prefix(variant):
    golden = load_file(V1 / f"forward_infer_{variant}_lastpos.safetensors")
    with torch.no_grad():
        logits = load_model(variant)(
            input_ids=golden["input_ids"], attention_mask=golden["attention_mask"], position_ids=golden["position_ids"]
        ).logits
    parity_errors(logits[:, -1], golden, name="logits_last")


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_train_derives_mask_and_positions(variant):
    """input_ids and labels only: the model builds the prefix-LM mask and 2-D positions itself."""
    golden = load_file(train_file(variant))
    input_ids = golden["input_ids"]
    assert torch.equal(glm_position_ids(input_ids, None, ChatGLMConfig()), golden["derived_position_ids"])
    mask = glm_attention_mask(input_ids, None, 0, ChatGLMConfig(), torch.float32)
    assert torch.equal(mask < 0, golden["derived_attention_mask"])
    with torch.no_grad():
        output = load_model(variant)(input_ids=input_ids, labels=golden["labels"])
    parity_errors(output.logits, golden)
    assert output.loss.dtype == torch.float32
    torch.testing.assert_close(output.loss, golden["loss"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_glmtune_collator_inputs_give_the_golden_loss(variant):
    """A 2-D padding mask and 1-D positions (glmtune's collator, right padding): the 1-D positions are ignored."""
    golden = load_file(train_file(variant))
    padding = (golden["input_ids"] != PAD).long()
    with torch.no_grad():
        output = load_model(variant)(
            input_ids=golden["input_ids"],
            attention_mask=padding,
            position_ids=(padding.cumsum(-1) - 1).clamp(min=0),
            labels=golden["labels"],
        )
    parity_errors(output.logits, golden, real=padding.bool())
    torch.testing.assert_close(output.loss, golden["loss"][0], atol=1e-5, rtol=0)


def test_target_token_loss_gives_the_golden_loss():
    """glmtune's loss: decoder output captured by a hook, head applied only at answer positions."""
    from glmtune.speed.loss import TargetTokenLoss

    golden = load_file(train_file("ptuning_proj_true"))
    model = load_model("ptuning_proj_true")
    assert TargetTokenLoss.supports(model)
    loss = TargetTokenLoss(model)
    with torch.no_grad(), loss.capture():
        model(input_ids=golden["input_ids"], attention_mask=(golden["input_ids"] != PAD).long(), logits_to_keep=1)
    torch.testing.assert_close(loss(golden["labels"]), golden["loss"][0], atol=1e-5, rtol=0)


def test_padding_mask_derivation_matches_the_original_tokenizer():
    """From a left-padded batch's 2-D mask we build exactly the 4-D mask and positions the v1 tokenizer builds."""
    inputs = json.loads((V1 / "generate.json").read_text())["inputs"]
    input_ids = torch.tensor(inputs["input_ids"])
    padding = (input_ids != PAD).long()
    assert torch.equal(glm_position_ids(input_ids, padding, ChatGLMConfig()), torch.tensor(inputs["position_ids"]))
    mask = glm_attention_mask(input_ids, padding, 0, ChatGLMConfig(), torch.float32)
    assert torch.equal(mask < 0, torch.tensor(inputs["attention_mask"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_batched_and_single(variant):
    generated = json.loads((V1 / "generate.json").read_text())
    expected = generated[variant]
    model = load_model(variant)
    input_ids = torch.tensor(generated["inputs"]["input_ids"])
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=1)
    batched = model.generate(input_ids=input_ids, attention_mask=(input_ids != PAD).long(), **kwargs)
    assert batched.tolist() == expected["output_ids"]
    single = model.generate(input_ids=torch.tensor(generated["single_inputs"]["input_ids"]), **kwargs)
    assert single.tolist() == expected["single_output_ids"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_from_the_original_tokenizers_padded_batch(variant):
    """ChatGLM-6B's own batch call: the tokenizer's 4-D mask and 2-channel positions go straight to generate();
    each row's greedy answer is the golden one and the one the text gets alone."""
    from glmtune.chatglm.tokenization import load_chatglm_tokenizer

    generated = json.loads((V1 / "generate.json").read_text())
    tokenizer = load_chatglm_tokenizer(SHARED / "tokenizers" / "chatglm-6b")
    model = load_model(variant)
    batch = tokenizer(generated["texts"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].dim() == 4 and batch["position_ids"].dim() == 3  # the original's inputs
    output = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert output.tolist() == generated[variant]["output_ids"]
    for row, text in enumerate(generated["texts"]):
        alone = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=8, do_sample=False)
        assert alone[0, -8:].tolist() == output[row, -8:].tolist()


def test_generate_refuses_a_4d_mask_it_would_not_rebuild():
    generated = json.loads((V1 / "generate.json").read_text())
    input_ids = torch.tensor(generated["inputs"]["input_ids"])
    mask = torch.tensor(generated["inputs"]["attention_mask"])
    mask[0, 0, 0, 1] = True  # one more hidden key: not the prefix-LM mask of these ids
    with pytest.raises(ValueError, match="4-D attention_mask must be the tokenizer's prefix-LM mask"):
        load_model().generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_generate_with_explicit_positions_and_without_cache():
    """The tokenizer's [batch, 2, length] positions continue as the original's; the KV cache changes nothing."""
    generated = json.loads((V1 / "generate.json").read_text())
    model = load_model("ptuning_proj_true")
    input_ids = torch.tensor(generated["inputs"]["input_ids"])
    kwargs = dict(input_ids=input_ids, attention_mask=(input_ids != PAD).long(), max_new_tokens=8, do_sample=False)
    explicit = model.generate(position_ids=torch.tensor(generated["inputs"]["position_ids"]), **kwargs)
    uncached = model.generate(use_cache=False, **kwargs)
    assert explicit.tolist() == uncached.tolist() == generated["ptuning_proj_true"]["output_ids"]


@pytest.mark.parametrize("variant", ["base", "ptuning_proj_true"])
def test_gradient_checkpointing_same_loss_and_gradients(variant):
    golden = load_file(train_file(variant))
    padding = (golden["input_ids"] != PAD).long()
    results = []
    for checkpointing in (False, True):
        model = load_model(variant).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(input_ids=golden["input_ids"], attention_mask=padding, labels=golden["labels"]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 4
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_save_pretrained_round_trip(tmp_path):
    golden = load_file(V1 / "forward_infer.safetensors")
    model = load_model()
    model.save_pretrained(tmp_path)
    reloaded = ChatGLMForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.lm_head.weight is reloaded.transformer.word_embeddings.weight
    inputs = {k: golden[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_original_bin_shards_with_lm_head_and_inv_freq(tmp_path):
    """THUDM's layout: pytorch_model-0000N-of-0000M.bin + index, lm_head.weight stored, inv_freq ignored."""
    state = load_file(V1 / "model.safetensors")
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    for key in [k for k in state if k.endswith("rotary_emb.inv_freq")]:
        state[key] = torch.full_like(state[key], 0.5)  # nonsense: the original recomputes them, and so do we
    shards = [
        ["transformer.word_embeddings.weight", "lm_head.weight"],
        [k for k in state if ".layers." in k],
        ["transformer.final_layernorm.weight", "transformer.final_layernorm.bias"],
    ]
    assert sum(map(len, shards)) == len(state)
    weight_map = {}
    for number, keys in enumerate(shards, 1):
        name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(keys, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((V1 / "config.json").read_text())
    golden = load_file(V1 / "forward_train.safetensors")
    with torch.no_grad():
        output = load_model(path=tmp_path)(input_ids=golden["input_ids"], labels=golden["labels"])
    parity_errors(output.logits, golden)
    torch.testing.assert_close(output.loss, golden["loss"][0], atol=1e-5, rtol=0)


def test_lora_targets_the_original_linear_layers():
    from peft import LoraConfig, get_peft_model

    golden = load_file(V1 / "forward_train.safetensors")
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    model = get_peft_model(load_model(), LoraConfig(r=4, target_modules=targets))
    adapted = {name.split(".")[-4] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == set(targets)
    with torch.no_grad():  # LoRA's B starts at zero: the loss is the base model's
        loss = model(input_ids=golden["input_ids"], labels=golden["labels"]).loss
    torch.testing.assert_close(loss, golden["loss"][0], atol=1e-5, rtol=0)


def test_rotary_frequencies_are_the_originals_fp16_rounded_ones():
    """Too small to show in the tiny model's logits at 10 positions, but 1e-3 relative in the real model."""
    stored = load_file(V1 / "model.safetensors")["transformer.layers.0.attention.rotary_emb.inv_freq"]
    assert rotary_frequencies(8) == tuple(stored.tolist()) == (1.0, 0.01000213623046875)
    real = torch.tensor(rotary_frequencies(128))  # ChatGLM-6B: 32 heads of 128
    exact = 1.0 / (10000 ** (torch.arange(0, 64, 2).double() / 64))
    assert torch.equal(real.half().float(), real) and not torch.equal(real.double(), exact)


def test_unsupported_configs_and_inputs_are_refused():
    with pytest.raises(GlmtuneError, match="position_encoding_2d"):
        ChatGLMForCausalLM(
            ChatGLMConfig(
                hidden_size=32, num_attention_heads=4, num_layers=1, vocab_size=64, position_encoding_2d=False
            )
        )
    config = ChatGLMConfig()
    with pytest.raises(ValueError, match=r"no \[gMASK\] or \[MASK\]"):
        glm_position_ids(torch.tensor([[5, 6, config.bos_token_id, 7]]), None, config)
