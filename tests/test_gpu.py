"""CUDA-only paths: a 4-bit / 8-bit (bitsandbytes) frozen base under both methods. Skipped without a GPU."""

import pytest
import torch
from conftest import chatglm_folder, needs_shared

from glmtune.arguments import LoraArguments, ModelArguments, PtuningArguments
from glmtune.lora import add_lora
from glmtune.model import load_base_model
from glmtune.ptuning import add_prefix_encoder

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("bitsandbytes")


def quantized(tiny_model_dir, bits):
    return load_base_model(ModelArguments(model_name_or_path=str(tiny_model_dir), quantization_bit=bits))


def train_step(model, tokenizer):
    inputs = tokenizer(
        ["类型#裙*颜色#白色", "类型#上衣*风格#简约*图案#刺绣"], return_tensors="pt", padding=True, padding_side="right"
    ).to("cuda")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("bits", [4, 8])
def test_prefix_on_quantized_base_trains_only_the_prefix(tiny_model_dir, tokenizer, bits):
    model = add_prefix_encoder(quantized(tiny_model_dir, bits), PtuningArguments(pre_seq_len=8, prefix_projection=True))
    assert torch.isfinite(train_step(model, tokenizer))
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("prefix_encoder.") for n in trained)
    assert all(p.dtype == torch.float32 for p in model.prefix_encoder.parameters())


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_base_trains_only_lora(tiny_model_dir, tokenizer, bits):
    model = add_lora(
        quantized(tiny_model_dir, bits), LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all")
    )
    assert torch.isfinite(train_step(model, tokenizer))
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)


def test_quantized_prefix_batched_generation_matches_single(tiny_model_dir, tokenizer):
    model = add_prefix_encoder(quantized(tiny_model_dir, 4), PtuningArguments(pre_seq_len=8)).eval()
    prompts = ["类型#上衣*颜色#白色*风格#简约", "类型#裙"]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    together = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to("cuda")
    batched = model.generate(**together, **kwargs)[:, together["input_ids"].shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = tokenizer([prompt], return_tensors="pt").to("cuda")
        assert model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :].tolist() == batched[row].tolist()


@needs_shared
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_original_chatglm_on_quantized_base_trains_and_generates(version, bits, method, tmp_path):
    from glmtune.model import load_tokenizer

    args = ModelArguments(model_name_or_path=chatglm_folder(version, tmp_path / "model"), quantization_bit=bits)
    tokenizer = load_tokenizer(args)
    model = load_base_model(args)
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear  # the output head stays unquantized
    if method == "ptuning":
        model = add_prefix_encoder(model, PtuningArguments(pre_seq_len=4, prefix_projection=True))
    else:
        model = add_lora(model, LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all"))
    from glmtune.data import Collator  # ChatGLM tokenizers only pad on the left, as the originals did

    rows = [tokenizer.encode(text) for text in ("类型#裙*颜色#白色", "类型#上衣*风格#简约*图案#刺绣")]
    batch = Collator(tokenizer.pad_token_id, "right")([{"input_ids": ids, "labels": ids} for ids in rows])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = model(**{k: v.to("cuda") for k, v in batch.items()}).loss
    loss.backward()
    assert torch.isfinite(loss)
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(("prefix_encoder." in n) if method == "ptuning" else ("lora_" in n) for n in trained)
    model.eval()
    prompt = tokenizer(["类型#裙*颜色#蓝色"], return_tensors="pt").to("cuda")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4 or tokenizer.eos_token_id in out[0].tolist()


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_int8_base_trains_in_bf16_and_says_the_cast_once(tiny_model_dir, tmp_path, method, caplog):
    """An 8-bit base: training runs its layers dequantized in bf16 (no bitsandbytes cast), and the whole run,
    evaluation's generation included, logs bitsandbytes' float16 cast at most once."""
    import logging

    from conftest import TOY_DEV, TOY_TRAIN
    from test_trainer import METHOD_FLAGS, run

    caplog.set_level(logging.WARNING, logger="bitsandbytes")
    run(method, tiny_model_dir, tmp_path / "out", "--do_train", "--train_file", str(TOY_TRAIN), "--max_steps", "3",
        "--save_strategy", "no", "--quantization_bit", "8", "--do_predict", "--test_file", str(TOY_DEV),
        "--max_predict_samples", "8", *METHOD_FLAGS[method])  # fmt: skip
    casts = [r for r in caplog.records if r.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert len(casts) <= 1
    assert (tmp_path / "out" / "generated_predictions.txt").is_file()


@pytest.mark.parametrize("alpha", [4, 32])
def test_loftq_start_makes_up_for_the_4_bit_error(tiny_model_dir, alpha):
    """--init_lora_weights loftq (PEFT's replace_lora_weights_loftq, B divided by the LoRA scale alpha / r): each
    4-bit weight plus the adapter's start is closer to the full-precision weight than the 4-bit weight alone, at any
    alpha. PEFT fits B A to the error R itself: undivided, alpha 32 / r 4 would add 8 R_4 (error 7 R_4 + the rest)."""
    import bitsandbytes as bnb

    args = LoraArguments(lora_rank=4, lora_alpha=alpha, lora_dropout=0.0, lora_target="all", init_lora_weights="loftq")
    model = add_lora(quantized(tiny_model_dir, 4), args)
    full = load_base_model(ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="float32"))
    for name, module in full.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            layer = model.get_base_model().get_submodule(name)
            weight = layer.get_base_layer().weight
            quantized_weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
            update = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
            error = module.weight - quantized_weight
            assert (error - update.float().cpu()).norm() < 0.99 * error.norm(), name
