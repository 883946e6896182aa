"""The target-token loss equals transformers' loss, value and gradients, and trains to the same curve."""

import json
import math

import pytest
import torch
from test_trainer import run, train_flags

import glmtune.speed.loss
from glmtune.arguments import LoraArguments, PtuningArguments
from glmtune.data import target_index
from glmtune.lora import add_lora
from glmtune.ptuning import add_prefix_encoder
from glmtune.speed.loss import TargetTokenLoss


def adapted(model, method):
    if method == "ptuning":
        return add_prefix_encoder(model, PtuningArguments(pre_seq_len=4, prefix_dropout=0.0))
    model = add_lora(model, LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all"))
    for name, p in model.named_parameters():  # non-zero B so that LoRA changes the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def batch(tokenizer):
    prompts, answers = ["类型#裙*颜色#白色", "类型#上衣*风格#简约*图案#刺绣"], ["白色的裙子很好看。", "简约的上衣。"]
    rows = [tokenizer.encode(p) + tokenizer.encode(a) + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.masked_fill(mask == 0, -100)
    for row, prompt in enumerate(prompts):
        labels[row, : len(tokenizer.encode(prompt))] = -100
    return {"input_ids": input_ids, "attention_mask": mask}, labels


@pytest.mark.parametrize("method", ["ptuning", "lora"])
@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize("index_from_collator", [False, True])
def test_value_and_gradients_equal_transformers_loss(
    model, tokenizer, monkeypatch, method, num_items, index_from_collator
):
    """Also with the target positions handed over by the collator (glmtune.data.target_index: no host sync)."""
    monkeypatch.setattr(glmtune.speed.loss, "CHUNK_TOKENS", 5)  # several chunks, the last one partial
    model = adapted(model, method).train()
    inputs, labels = batch(tokenizer)
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    reference = model(**inputs, labels=labels, **extra).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert TargetTokenLoss.supports(causal_lm)
    loss_fn = TargetTokenLoss(causal_lm)
    with loss_fn.capture():
        model(**inputs, logits_to_keep=1)
    loss = loss_fn(labels, num_items, target_index(labels) if index_from_collator else None)
    loss.backward()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    for name, grad in expected.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_training_curve_is_unchanged(tiny_model_dir, tmp_path, method):
    curves = []
    for flag in ("True", "False"):
        out = tmp_path / flag
        run(method, tiny_model_dir, out, *train_flags(method, steps=4, save_steps=10), "--target_token_loss", flag)
        state = json.loads((out / "trainer_state.json").read_text())
        curves.append([entry["loss"] for entry in state["log_history"] if "loss" in entry])
    assert len(curves[0]) == 4
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


@pytest.mark.slow
def test_compiled_layers_give_the_same_loss_and_gradients(model, tokenizer):
    """--compile_layers changes how the layers run, not what they compute (about a minute of compiling)."""
    import copy

    from glmtune.speed import compile_decoder_layers

    eager = adapted(copy.deepcopy(model), "ptuning").train()
    compiled = adapted(model, "ptuning").train()
    compiled.prefix_encoder.load_state_dict(eager.prefix_encoder.state_dict())
    compile_decoder_layers(compiled)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    inputs, labels = batch(tokenizer)
    for variant in (eager, compiled):
        variant(**inputs, labels=labels, use_cache=False).loss.backward()  # as training calls it
    # one graph for every layer: the first layer's input requires grad like the others' (a frozen embedding's
    # output did not, which compiled the first layer separately; torch's own counter, read to see it)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(
        compiled(**inputs, labels=labels, use_cache=False).loss, eager(**inputs, labels=labels, use_cache=False).loss
    )
    torch.testing.assert_close(
        compiled.prefix_encoder.embedding.weight.grad, eager.prefix_encoder.embedding.weight.grad, atol=1e-6, rtol=1e-5
    )


def train_curve(
    model, tokenizer, tmp_path, steps=8, collator=None, callbacks=None, trainer_class=None, **training_args
) -> list:
    """AdamW steps of FastStepTrainer on batches of two samples (right-padded unless ``collator``);
    the logged losses."""
    from transformers import Seq2SeqTrainingArguments

    from glmtune.data import Collator
    from glmtune.speed import FastStepTrainer

    inputs, labels = batch(tokenizer)
    samples = [
        {"input_ids": ids[mask.bool()].tolist(), "labels": lab[mask.bool()].tolist()}
        for ids, mask, lab in zip(inputs["input_ids"], inputs["attention_mask"], labels)
    ] * steps
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        label_names=["labels"],
        seed=5,
        **training_args,
    )
    trainer = (trainer_class or FastStepTrainer)(
        model=model,
        args=args,
        train_dataset=samples,
        callbacks=callbacks,
        data_collator=collator or Collator(tokenizer.pad_token_id, "right"),
    )
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("nan_filter", [True, False])
def test_nan_losses_are_filtered_as_trainer_does(model, tokenizer, tmp_path, nan_filter):
    """--logging_nan_inf_filter, applied on the device by FastStepTrainer (Trainer's own check syncs every
    step): once the loss turns nan, a logged step counts as the average of the steps since the last log,
    which is 0 here (one step per log), exactly what Trainer logs; without the filter the nan shows."""
    from transformers import TrainerCallback

    class PoisonAfterTwoSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    run.prefix_encoder.embedding.weight.fill_(float("nan"))

    run = adapted(model, "ptuning")
    curve = train_curve(
        run, tokenizer, tmp_path, steps=4, callbacks=[PoisonAfterTwoSteps()], logging_nan_inf_filter=nan_filter
    )
    assert all(math.isfinite(loss) and loss > 1 for loss in curve[:2])
    assert curve[2:] == [0.0, 0.0] if nan_filter else all(math.isnan(loss) for loss in curve[2:])


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_every_layer_trains_in_every_step(model, tokenizer, tmp_path, method):
    """FastStepTrainer skips Trainer's per-step model.train() walk only when every submodule is in training
    mode: a PEFT wrapper starts in training mode around a base from_pretrained left in eval mode, and its
    layers must still train (dropout, gradient checkpointing), also after an evaluation switched them off."""
    from transformers import TrainerCallback

    seen = []

    class EvaluateAfterTwoSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                run.eval()  # as Trainer's evaluation loop leaves it

    run = adapted(model, method)
    assert not model.model.layers[0].training  # from_pretrained's eval mode
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    train_curve(run, tokenizer, tmp_path, steps=4, callbacks=[EvaluateAfterTwoSteps()])
    assert len(seen) == 4 * len(model.model.layers) and all(seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path's kernels need a CUDA GPU")
@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_bf16_cuda_training_curve_matches_the_previous_path(model, tokenizer, tmp_path, method):
    """The previous path -- transformers' padding mask (masked SDPA), PEFT's float32 LoRA branch -- against
    flash attention for right-padded batches and LoRA in bf16: the same curve within bf16 noise."""
    import copy

    from glmtune.speed.attention import use_fast_attention
    from glmtune.speed.fast_lora import lora_in_base_dtype

    base = model.to("cuda", torch.bfloat16)
    curves = []
    for fast in (True, False):
        torch.manual_seed(0)
        run = adapted(copy.deepcopy(base), method)  # adapters after the copy: the prefix hook holds its model's layers
        if fast:
            use_fast_attention(run)
            if method == "lora":
                assert lora_in_base_dtype(run) == 2 * 6
        curves.append(train_curve(run, tokenizer, tmp_path / str(fast)))
    assert len(curves[0]) == 8 and curves[0][-1] < curves[0][0]
    assert curves[0] == pytest.approx(curves[1], rel=2e-2)
