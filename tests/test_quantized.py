"""4/8-bit bases on the CPU (bitsandbytes' CPU backend): what glmtune's fast path does to their layers.

bitsandbytes quantizes on the CPU too, so these run in CI; training speed on such bases is measured on a GPU
(docs/benchmarks.md). glmtune's own loader puts quantized bases on the GPU, so the bases are loaded here with
transformers directly, as glmtune.model does, on the CPU.
"""

import logging

import pytest
import torch

from glmtune.arguments import LoraArguments, PtuningArguments
from glmtune.lora import add_lora
from glmtune.ptuning import add_prefix_encoder
from glmtune.speed.fast_lora import lora_in_base_dtype
from glmtune.speed.int8 import dequantize, dequantized_int8_training, int8_weights

bnb = pytest.importorskip("bitsandbytes")


def quantized(folder, bits: int):
    from transformers import AutoModelForCausalLM

    from glmtune.model import quantization_config

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=quantization_config(bits, torch.bfloat16),
        device_map={"": "cpu"},
    )  # fmt: skip


def int8_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]


def prefixed(model):
    model = add_prefix_encoder(model, PtuningArguments(pre_seq_len=4, prefix_dropout=0.0))
    torch.manual_seed(0)
    torch.nn.init.normal_(model.prefix_encoder.embedding.weight)
    return model.train()


def loss_and_grad(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.prefix_encoder.embedding.weight.grad.clone()
    model.prefix_encoder.embedding.weight.grad = None
    return loss.detach(), grad


def test_int8_layer_computes_with_the_dequantized_weight_in_the_compute_dtype(tiny_model_dir):
    layer = int8_layers(quantized(tiny_model_dir, 8))[0]
    assert dequantized_int8_training(layer, torch.bfloat16) == 1
    layer.train()
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float32, requires_grad=True)  # float32 arrives: cast
    out = layer(x)
    weight = dequantize(*int8_weights(layer), torch.bfloat16)
    reference = torch.nn.functional.linear(x.detach().bfloat16(), weight, layer.bias.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    out.float().square().sum().backward()
    expected = (2 * reference.float()).bfloat16() @ weight
    torch.testing.assert_close(x.grad, expected.float(), atol=1e-2, rtol=1e-2)


def test_int8_training_equals_bitsandbytes_dequantized_product_with_activations_in_bf16(tiny_model_dir):
    """On the CPU bitsandbytes itself trains through a dequantized product (MatMul8bitFp): glmtune's path gives
    the same loss and prefix gradient, and every 8-bit layer receives bf16 activations."""
    ids = torch.randint(5, 200, (2, 12))
    reference = loss_and_grad(prefixed(quantized(tiny_model_dir, 8)), ids)
    model = prefixed(quantized(tiny_model_dir, 8))
    assert dequantized_int8_training(model, torch.bfloat16) == 12
    seen = []
    for layer in int8_layers(model):
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    loss, grad = loss_and_grad(model, ids)
    assert set(seen) == {torch.bfloat16} and len(seen) == 12
    torch.testing.assert_close(loss, reference[0], atol=0, rtol=0)
    torch.testing.assert_close(grad, reference[1], atol=0, rtol=0)


def test_int8_evaluation_says_the_cast_once(tiny_model_dir, caplog):
    """bitsandbytes logs its float16 cast on every 8-bit call in evaluation; glmtune's loader lets one through."""
    from glmtune.model import _say_int8_casting_once

    model = quantized(tiny_model_dir, 8).eval()
    _say_int8_casting_once()
    caplog.set_level(logging.WARNING, logger="bitsandbytes")
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=torch.randint(5, 200, (1, 6)))
    casts = [r for r in caplog.records if r.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert len(casts) <= 1


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_branch_in_the_compute_dtype_on_a_quantized_base(tiny_model_dir, bits):
    """glmtune's LoRA branch on bitsandbytes layers: the same loss and LoRA gradients as PEFT's (bf16 noise)."""
    ids = torch.randint(5, 200, (2, 12))
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = add_lora(
            quantized(tiny_model_dir, bits),
            LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all"),
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if fast:
            assert lora_in_base_dtype(model) == 2 * 6
        if bits == 8:
            dequantized_int8_training(model, torch.bfloat16)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (fast_loss, fast_grads) = results
    torch.testing.assert_close(fast_loss, loss, atol=2e-2, rtol=1e-2)
    for name, grad in grads.items():
        assert (fast_grads[name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_false_leaves_bitsandbytes_layers_to_peft(tiny_model_dir, bits, caplog):
    """The benchmark's --quantized_lora_branch peft: no bitsandbytes layer switched, and the log says so."""
    model = add_lora(
        quantized(tiny_model_dir, bits), LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all")
    )
    with caplog.at_level(logging.INFO, logger="glmtune.speed.fast_lora"):
        assert lora_in_base_dtype(model, quantized=False) == 0
    kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert f"LoRA in the base dtype: 0 layers; PEFT's own forward kept for 12 {kind}" in caplog.text
