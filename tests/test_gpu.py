"""CUDA-only paths: a 4-bit / 8-bit (bitsandbytes) frozen base under both methods. Skipped without a GPU."""

import pytest
import torch

from glmtune.adapters import add_lora, add_prefix_encoder
from glmtune.arguments import LoraArguments, ModelArguments, PtuningArguments
from glmtune.model import load_base_model

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("bitsandbytes")


def quantized(tiny_model_dir, bits):
    return load_base_model(ModelArguments(model_name_or_path=str(tiny_model_dir), quantization_bit=bits))


def train_step(model, tokenizer):
    inputs = tokenizer(["类型#裙*颜色#白色", "类型#上衣*风格#简约*图案#刺绣"], return_tensors="pt", padding=True,
                       padding_side="right").to("cuda")
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
    model = add_lora(quantized(tiny_model_dir, bits), LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all"))
    assert torch.isfinite(train_step(model, tokenizer))
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)


def test_quantized_prefix_batched_generation_matches_single(tiny_model_dir, tokenizer):
    model = add_prefix_encoder(quantized(tiny_model_dir, 4), PtuningArguments(pre_seq_len=8)).eval()
    prompts = ["类型#上衣*颜色#白色*风格#简约", "类型#裙"]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    together = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to("cuda")
    batched = model.generate(**together, **kwargs)[:, together["input_ids"].shape[1]:]
    for row, prompt in enumerate(prompts):
        alone = tokenizer([prompt], return_tensors="pt").to("cuda")
        assert model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1]:].tolist() == batched[row].tolist()
