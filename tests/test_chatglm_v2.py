"""ChatGLM2-6B / ChatGLM3-6B model class against the original code's outputs (shared/golden/chatglm-v2, -v3).

Tolerances from shared/golden/README.md: logits at the stored vocabulary columns atol/rtol 1e-4,
logsumexp over the whole vocabulary atol 1e-4, argmax exact (non-pad positions; pad positions are a
second, equally strict check), losses 1e-5, greedy generations exact. v3 reuses v2's weights, prefix
files and forward_infer files with its own config.
"""

import json

import pytest
import torch
from conftest import GOLDEN, needs_shared
from golden import golden_prefix_encoder, parity_errors
from safetensors.torch import load_file

from glmtune.chatglm.modeling_v2 import ChatGLM2Config, ChatGLM2ForCausalLM, attention_bias
from glmtune.errors import GlmtuneError
from glmtune.ptuning import attach_prefix

V2, V3 = GOLDEN / "chatglm-v2", GOLDEN / "chatglm-v3"
pytestmark = needs_shared
VARIANTS = ["base", "ptuning_proj_false", "ptuning_proj_true"]


def load_model(config_path=V2 / "config.json", variant="base", attn="sdpa", weights=V2):
    """The golden base weights under ``config_path``, with the variant's golden prefix attached, in eval mode."""
    config = ChatGLM2Config.from_json_file(str(config_path))
    model = ChatGLM2ForCausalLM.from_pretrained(weights, config=config, dtype=torch.float32, attn_implementation=attn)
    if variant != "base":
        attach_prefix(model, golden_prefix_encoder(config, V2, projection=variant.endswith("true")))
    return model.eval()


@pytest.mark.parametrize("config_path", [V2 / "config.json", V3 / "config.json"], ids=["v2", "v3"])
def test_forward_infer_left_padded(config_path):
    golden = load_file(V2 / "forward_infer.safetensors")
    with torch.no_grad():
        logits = load_model(config_path)(
            input_ids=golden["input_ids"], attention_mask=golden["attention_mask"], position_ids=golden["position_ids"]
        ).logits
    pads = golden["attention_mask"] == 0
    parity_errors(logits, golden, real=~pads)
    parity_errors(logits, golden, real=pads)  # the original un-masks padding query rows; so do we


def test_rope_ratio_50():
    golden = load_file(V3 / "extra_rope_ratio50_forward_infer.safetensors")
    model = load_model(V3 / "extra_config_rope_ratio50.json")
    assert model.config.rope_ratio == 50
    with torch.no_grad():
        logits = model(
            input_ids=golden["input_ids"], attention_mask=golden["attention_mask"], position_ids=golden["position_ids"]
        ).logits
    parity_errors(logits, golden, real=golden["attention_mask"] == 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_forward_train_loss_and_logits(version, variant):
    folder = V2 if version == "v2" else V3
    suffix = "" if variant == "base" else f"_{variant}"
    golden = load_file(folder / f"forward_train{suffix}.safetensors")
    with torch.no_grad():  # input_ids and labels only, as the original's training path: causal, positions 0..L-1
        out = load_model(folder / "config.json", variant)(input_ids=golden["input_ids"], labels=golden["labels"])
    assert abs(out.loss.item() - golden["loss"].item()) < 1e-5
    parity_errors(out.logits, golden)


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_forward_infer_with_prefix_last_position(variant):
    golden = load_file(V2 / f"forward_infer_{variant}_lastpos.safetensors")
    with torch.no_grad():
        logits = load_model(variant=variant)(
            input_ids=golden["input_ids"],
            attention_mask=golden["attention_mask"],
            position_ids=golden["position_ids"],
            logits_to_keep=1,
        ).logits
    parity_errors(logits[:, -1], golden, name="logits_last")


def test_right_padded_batch_with_mask_equals_golden_at_real_positions():
    """A right-padded batch needs no mask (causality hides the trailing padding); it runs unmasked SDPA."""
    golden = load_file(V3 / "forward_train.safetensors")
    ids = golden["input_ids"]
    lengths = torch.tensor([int((row != 0).nonzero().max()) + 1 for row in ids])
    real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    assert not real.all()
    assert attention_bias(real.long(), ids.shape[1], 0, torch.float32, "cpu") is None
    with torch.no_grad():
        out = load_model(V3 / "config.json")(input_ids=ids, attention_mask=real.long(), labels=golden["labels"])
    parity_errors(out.logits, golden, real=real)
    assert abs(out.loss.item() - golden["loss"].item()) < 1e-5


@pytest.mark.parametrize("variant", ["base", "ptuning_proj_false"])
def test_prefill_in_chunks_through_the_cache_equals_one_forward(variant):
    """Queries after cached tokens: left-padded (explicit mask with a past) and unpadded (causal with a past)."""
    golden = load_file(V2 / "forward_infer.safetensors")
    model = load_model(variant=variant)
    for rows, mask in ((slice(None), golden["attention_mask"]), (slice(1, 2), None)):
        ids, positions = golden["input_ids"][rows], golden["position_ids"][rows]
        with torch.no_grad():
            whole = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            first = model(
                input_ids=ids[:, :7],
                attention_mask=None if mask is None else mask[:, :7],
                position_ids=positions[:, :7],
                use_cache=True,
            )
            rest = model(
                input_ids=ids[:, 7:],
                attention_mask=mask,
                position_ids=positions[:, 7:],
                past_key_values=first.past_key_values,
                use_cache=True,
            ).logits
        torch.testing.assert_close(torch.cat([first.logits, rest], dim=1)[:, 6:], whole[:, 6:], atol=1e-5, rtol=1e-5)
        if variant == "base":
            parity_errors(
                whole,
                {k: v if k == "logits_vocab_cols" else v[rows] for k, v in golden.items()},
                real=golden["attention_mask"][rows] == 1,
            )


def generate(model, inputs: dict, **kwargs) -> list:
    with torch.no_grad():
        return model.generate(
            **{k: torch.tensor(v) for k, v in inputs.items()}, max_new_tokens=8, do_sample=False, num_beams=1, **kwargs
        ).tolist()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_generate_batched_and_single(version, variant):
    folder = V2 if version == "v2" else V3
    golden = json.loads((folder / "generate.json").read_text())
    model = load_model(folder / "config.json", variant)
    assert generate(model, golden["inputs"]) == golden[variant]["output_ids"]
    assert generate(model, golden["single_inputs"]) == golden[variant]["single_output_ids"]
    # without position_ids, generate() derives the same ones from the attention mask
    inputs = {k: golden["inputs"][k] for k in ("input_ids", "attention_mask")}
    assert generate(model, inputs) == golden[variant]["output_ids"]


@pytest.mark.parametrize("variant", ["base", "ptuning_proj_true"])
def test_cached_generation_equals_uncached(variant):
    golden = json.loads((V3 / "generate.json").read_text())
    model = load_model(V3 / "config.json", variant)
    inputs = {**golden["inputs"], "position_ids": None}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    assert generate(model, inputs, use_cache=True) == generate(model, inputs, use_cache=False)


def test_eager_equals_sdpa():
    golden = load_file(V2 / "forward_infer.safetensors")
    inputs = {k: golden[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        sdpa, eager = (load_model(attn=attn)(**inputs).logits for attn in ("sdpa", "eager"))
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["base", "ptuning_proj_true"])
def test_gradient_checkpointing_same_loss_and_grads(variant):
    golden = load_file(V2 / "forward_train.safetensors")
    results = []
    for checkpointing in (False, True):
        model = load_model(variant=variant).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.get_decoder().layers)
        loss = model(input_ids=golden["input_ids"], labels=golden["labels"], use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=0)
    assert grads_plain.keys() == grads_ckpt.keys()
    assert (
        variant == "base" or {"prefix_encoder.embedding.weight", "prefix_encoder.trans.0.weight"} <= grads_plain.keys()
    )
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_glmtune_target_token_loss_equals_golden_loss():
    """glmtune's training loss (head applied at answer tokens only, via get_decoder/get_output_embeddings)."""
    from glmtune.speed.loss import TargetTokenLoss

    golden = load_file(V3 / "forward_train_ptuning_proj_true.safetensors")
    model = load_model(V3 / "config.json", "ptuning_proj_true")
    assert TargetTokenLoss.supports(model)
    loss = TargetTokenLoss(model)
    with torch.no_grad(), loss.capture():
        model(input_ids=golden["input_ids"], logits_to_keep=1, use_cache=False)
    assert abs(loss(golden["labels"]).item() - golden["loss"].item()) < 1e-5


def test_save_pretrained_round_trip_keeps_original_layout(tmp_path):
    golden = load_file(V2 / "forward_infer.safetensors")
    inputs = {k: golden[k] for k in ("input_ids", "attention_mask", "position_ids")}
    model = load_model(V3 / "extra_config_rope_ratio50.json")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "chatglm" and saved["padded_vocab_size"] == 65024 and saved["rope_ratio"] == 50
    original_keys = json.loads((V2 / "meta.json").read_text())["state_dict_keys"]
    assert {k: list(v.shape) for k, v in load_file(tmp_path / "model.safetensors").items()} == original_keys
    reloaded = ChatGLM2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_loads_sharded_pytorch_bin_with_index(tmp_path):
    """Real ChatGLM2/3-6B folders ship pytorch_model-0000N-of-00007.bin shards and an index."""
    state = load_file(V2 / "model.safetensors")
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, keys in shards.items():
        torch.save({k: state[k].half() for k in keys}, tmp_path / file)  # the real shards are float16
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((V2 / "config.json").read_text())
    model = ChatGLM2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k].half().float()) for k in names)


def test_config_answers_standard_names_and_refuses_unsupported_layout():
    config = ChatGLM2Config.from_json_file(str(V2 / "config.json"))
    standard = (
        config.num_hidden_layers,
        config.num_key_value_heads,
        config.head_dim,
        config.vocab_size,
        config.hidden_size,
        config.num_attention_heads,
    )
    assert standard == (2, 2, 8, 65024, 32, 4)
    config.multi_query_attention = False
    with pytest.raises(GlmtuneError, match="multi_query_attention"):
        ChatGLM2ForCausalLM(config)
    config.multi_query_attention, config.quantization_bit = True, 4  # THUDM's chatglm2-6b-int4 folders
    with pytest.raises(GlmtuneError, match="quantization_bit 4"):
        ChatGLM2ForCausalLM(config)


def test_output_head_kept_out_of_quantization_and_lora_targets_exist():
    from peft import LoraConfig, get_peft_model
    from transformers.quantizers.base import get_keys_to_not_convert

    model = load_model()
    assert model.get_output_embeddings() is model.transformer.output_layer
    assert "transformer.output_layer" in get_keys_to_not_convert(model)
    golden = load_file(V2 / "forward_train.safetensors")
    with torch.no_grad():
        before = model(input_ids=golden["input_ids"]).logits
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    wrapped = {name.split(".")[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(targets)
    with torch.no_grad():  # LoRA starts as the identity (B = 0)
        torch.testing.assert_close(lora(input_ids=golden["input_ids"]).logits, before, atol=0, rtol=0)
