"""LoRA in the base dtype (glmtune.speed.fast_lora): PEFT's computation in float32, bf16 rounding in bf16."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_loss import batch

from glmtune.arguments import LoraArguments
from glmtune.lora import add_lora
from glmtune.speed import FastStepTrainer
from glmtune.speed.fast_lora import lora_in_base_dtype


def lora_model(model, dropout=0.0):
    model = add_lora(model, LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=dropout, lora_target="all"))
    torch.manual_seed(3)
    for name, p in model.named_parameters():  # non-zero B so that LoRA changes the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def loss_and_gradients(model, inputs, labels, seed=0):
    torch.manual_seed(seed)  # the same dropout draws for both variants
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_float32_equals_peft_with_the_same_dropout_draws(model, tokenizer, dropout):
    peft_model = lora_model(model, dropout).train()
    fast = copy.deepcopy(peft_model)
    assert lora_in_base_dtype(fast) == 2 * 6  # q, k, v, o, gate_up, down in each of the 2 layers
    inputs, labels = batch(tokenizer)
    (loss, grads), (reference_loss, reference_grads) = (
        loss_and_gradients(m, inputs, labels) for m in (fast, peft_model)
    )
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-6)
    assert reference_grads.keys() == grads.keys() and len(grads) == 2 * 2 * 6
    for name, grad in reference_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5)


def test_bf16_base_differs_from_peft_by_bf16_rounding_only(model, tokenizer):
    peft_model = lora_model(model.to(torch.bfloat16)).train()
    fast = copy.deepcopy(peft_model)
    lora_in_base_dtype(fast)
    assert all(p.dtype == torch.float32 for n, p in fast.named_parameters() if p.requires_grad)  # fp32 master weights
    inputs, labels = batch(tokenizer)
    (loss, grads), (reference_loss, reference_grads) = (
        loss_and_gradients(m, inputs, labels) for m in (fast, peft_model)
    )
    torch.testing.assert_close(loss, reference_loss, atol=0, rtol=1e-2)
    for name, grad in reference_grads.items():  # 1-3% here: bf16 rounding of x A^T and B, amplified by a random model
        assert grads[name].dtype == torch.float32
        assert (grads[name] - grad).norm() <= 0.05 * grad.norm(), name


def test_bf16_training_curve_matches_peft(model, tokenizer, tmp_path):
    """Six AdamW steps on a bf16 base: the loss curves agree within bf16 noise."""
    from transformers import Seq2SeqTrainingArguments

    inputs, labels = batch(tokenizer)
    samples = [
        {"input_ids": ids[mask.bool()].tolist(), "labels": lab[mask.bool()].tolist()}
        for ids, mask, lab in zip(inputs["input_ids"], inputs["attention_mask"], labels)
    ] * 8
    base = lora_model(model.to(torch.bfloat16))
    curves = []
    for fast in (True, False):
        run = copy.deepcopy(base)
        if fast:
            lora_in_base_dtype(run)
        args = Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / str(fast)),
            per_device_train_batch_size=2,
            max_steps=6,
            learning_rate=1e-2,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            remove_unused_columns=False,
            label_names=["labels"],
            seed=5,
        )
        from glmtune.data import Collator

        trainer = FastStepTrainer(
            model=run, args=args, train_dataset=samples, data_collator=Collator(tokenizer.pad_token_id, "right")
        )
        trainer.train()
        curves.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(curves[0]) == 6 and curves[0][-1] < curves[0][0]  # it trains
    assert curves[0] == pytest.approx(curves[1], rel=2e-2)


def test_quantized_or_merged_layers_keep_peft_forward(model, tokenizer):
    fast = lora_model(model)
    lora_in_base_dtype(fast)
    inputs, _ = batch(tokenizer)
    with torch.no_grad():
        before = fast(**inputs).logits
        fast.merge_adapter()  # merged: the base weights carry the update, PEFT's path is taken
        merged = fast(**inputs).logits
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)


def test_rslora_scale_is_what_the_fast_path_adds(model, tokenizer):
    """rsLoRA scales by alpha / sqrt(r) (4 here, not alpha / r = 2): the fast path reads PEFT's scale, so a layer
    computes W x + b + 4 B A x, and the model PEFT's logits."""
    peft_model = add_lora(
        model, LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all", use_rslora=True)
    )
    torch.manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fast = copy.deepcopy(peft_model)
    assert lora_in_base_dtype(fast) == 2 * 6
    layer = fast.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    base, lora_a, lora_b = layer.get_base_layer(), layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = F.linear(x, base.weight, base.bias) + 4.0 * (x @ lora_a.T @ lora_b.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
        inputs, _ = batch(tokenizer)
        torch.testing.assert_close(fast(**inputs).logits, peft_model(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "variant, kept",
    [
        ({"use_dora": True}, "PEFT's own forward kept for 12 DoraLinearVariant"),
        ({"lora_variant": "adalora", "adalora_init_rank": 6}, "PEFT's own forward kept for 12 SVDLinear"),
    ],
)
def test_dora_and_adalora_layers_keep_peft_forward_and_the_log_says_so(model, tokenizer, caplog, variant, kept):
    """DoRA rescales the whole adapted weight and AdaLoRA's layers are in SVD form: neither is a sum of the base's
    product and B A x, so the fast path leaves them to PEFT, in the log rather than silently."""
    args = LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all", **variant)
    peft_model = add_lora(model, args, total_steps=10)
    fast = copy.deepcopy(peft_model)
    caplog.set_level("INFO", logger="glmtune.speed.fast_lora")
    assert lora_in_base_dtype(fast) == 0
    assert kept in caplog.text
    inputs, _ = batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, peft_model(**inputs).logits, atol=0, rtol=0)
