"""Padding-free training batches give the padded batch's loss and gradients, with the prefix and with LoRA."""

import copy
import math

import pytest
import torch
from test_loss import adapted

from glmtune.data import Collator, PaddingFreeCollator
from glmtune.speed.attention import _flash_applies, fast_attention, use_fast_attention
from glmtune.speed.loss import TargetTokenLoss

SAMPLES = [  # prompt tokens labelled -100, answer tokens labelled with themselves; three lengths
    {"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100, -100, -100, 8, 9, 10, 11]},
    {"input_ids": [12, 13, 14], "labels": [-100, 13, 14]},
    {"input_ids": [15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], "labels": [-100] * 6 + [20, 21, 22, 23, 24]},
]


def test_collator_puts_samples_back_to_back():
    batch = PaddingFreeCollator()(SAMPLES)
    assert batch["input_ids"].tolist() == [sum((s["input_ids"] for s in SAMPLES), [])]
    assert batch["position_ids"].tolist() == [list(range(7)) + list(range(3)) + list(range(11))]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 7, 10, 21]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 11
    # every sample's first label is ignored: a sample's last token does not predict the next sample
    labels = batch["labels"][0].tolist()
    assert [labels[i] for i in (0, 7, 10)] == [-100, -100, -100]
    assert sum(t != -100 for t in labels[1:]) == sum(t != -100 for s in SAMPLES for t in s["labels"][1:])
    assert "attention_mask" not in batch
    follows_target = [i for i in range(len(labels) - 1) if labels[i + 1] != -100]
    assert batch["target_index"].tolist() == follows_target


def padded_and_padding_free_runs(model, method, target_token_loss):
    """Loss and gradients of one padded batch and of the same samples without padding."""
    results = []
    for collate in (Collator(0, "right"), PaddingFreeCollator()):
        torch.manual_seed(0)
        run = adapted(copy.deepcopy(model), method).train()
        use_fast_attention(run)
        inputs = collate(SAMPLES)
        labels, index = inputs.pop("labels"), inputs.pop("target_index", None)
        if target_token_loss:
            loss_fn = TargetTokenLoss(run.get_base_model() if method == "lora" else run)
            with loss_fn.capture():
                run(**inputs, logits_to_keep=1)
            loss = loss_fn(labels, target_index=index)
        else:
            loss = run(**inputs, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in run.named_parameters() if p.requires_grad}))
    return results


@pytest.mark.parametrize("method", ["ptuning", "lora"])
@pytest.mark.parametrize("target_token_loss", [True, False])
def test_same_loss_and_gradients_as_the_padded_batch(model, method, target_token_loss):
    (loss, grads), (free_loss, free_grads) = padded_and_padding_free_runs(model, method, target_token_loss)
    torch.testing.assert_close(free_loss, loss, atol=0, rtol=1e-5)
    assert grads.keys() == free_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(free_grads[name], grad, atol=1e-7, rtol=1e-4)


def test_samples_do_not_see_each_other(model):
    """Changing one sample's tokens changes no other sample's outputs (and does change its own)."""
    run = adapted(copy.deepcopy(model), "ptuning").eval()
    use_fast_attention(run)  # the attention that keeps padding-free samples apart (glmtune.speed.prepare)
    changed = copy.deepcopy(SAMPLES)
    changed[1]["input_ids"] = [30, 31, 32]
    with torch.no_grad():
        logits = [
            run(**{k: v for k, v in PaddingFreeCollator()(s).items() if k not in ("labels", "target_index")}).logits[0]
            for s in (SAMPLES, changed)
        ]
    torch.testing.assert_close(logits[1][:7], logits[0][:7])
    torch.testing.assert_close(logits[1][10:], logits[0][10:])
    assert not torch.allclose(logits[1][7:10], logits[0][7:10])


def test_no_search_for_packed_samples(model, monkeypatch):
    """Given positions and no mask, transformers searches the positions for packed samples (a host sync in
    every forward) to build a block-diagonal mask. glmtune's attention keeps the samples apart itself, so
    the search does not run; the loss equals that of transformers' own packed-sample mask under SDPA."""
    import transformers.masking_utils as masking

    searches = []
    search = masking.find_packed_sequence_indices
    monkeypatch.setattr(
        masking, "find_packed_sequence_indices", lambda positions: searches.append(1) or search(positions)
    )
    inputs = PaddingFreeCollator()(SAMPLES)
    inputs.pop("target_index")
    losses = []
    for glmtune_attention in (False, True):
        torch.manual_seed(0)
        run = adapted(copy.deepcopy(model), "lora")
        if glmtune_attention:
            use_fast_attention(run)
        with torch.no_grad():
            losses.append(run(**inputs, use_cache=False).loss)  # as in training (with a cache: no search)
        assert len(searches) == (0 if glmtune_attention else 1)
        searches.clear()
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length flash kernel needs a CUDA GPU")
@pytest.mark.parametrize("pre_seq_len", [16, 0])
def test_flash_route_equals_the_block_mask_route(pre_seq_len):
    """bf16 on CUDA runs flash's variable-length kernel (prefix copied in front of every sample); float32
    takes the explicit block-diagonal mask. Outputs and gradients (prefix included) agree to bf16 rounding."""
    torch.manual_seed(0)
    layer = torch.nn.Module()
    heads, kv_heads, dim, lengths = 8, 2, 128, [37, 5, 64, 20]
    layer.num_key_value_groups = heads // kv_heads
    tokens = sum(lengths)
    cu = torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32, device="cuda")
    tensors = [
        torch.randn(1, heads, tokens, dim),
        torch.randn(1, kv_heads, tokens, dim),
        torch.randn(1, kv_heads, tokens, dim),
        torch.randn(2, kv_heads, max(pre_seq_len, 1), dim),
    ]
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        query, key, value, prefix = [t.to("cuda", dtype).requires_grad_() for t in tensors]
        assert _flash_applies(query, key) == (dtype == torch.bfloat16)
        layer.prefix_key_value = prefix if pre_seq_len else None
        out, _ = fast_attention(
            layer,
            query,
            key,
            value,
            None,
            scaling=dim**-0.5,
            dropout=0.0,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(lengths),
            max_length_k=max(lengths),
        )
        assert out.shape == (1, tokens, heads, dim)
        out.float().square().sum().backward()
        results.append([out.float()] + [t.grad.float() for t in (query, key, value, prefix) if t.grad is not None])
    assert len(results[0]) == len(results[1]) == (5 if pre_seq_len else 4)
    for got, expected in zip(*results):
        assert (got - expected).norm() <= 1e-2 * expected.norm()


def test_block_mask_route_equals_explicit_softmax():
    """CPU route against softmax(QK^T)V written out per sample, the prefix in front of each."""
    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.num_key_value_groups = 2
    pre, dim = 4, 16  # samples of 3 and 5 tokens
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    query, key, value = torch.randn(1, 4, 8, dim), torch.randn(1, 2, 8, dim), torch.randn(1, 2, 8, dim)
    layer.prefix_key_value = torch.randn(2, 2, pre, dim)
    out, _ = fast_attention(layer, query, key, value, None, scaling=dim**-0.5, cu_seq_lens_q=cu, max_length_q=5)
    for start, length in ((0, 3), (3, 5)):
        span = slice(start, start + length)
        keys = torch.cat([layer.prefix_key_value[0], key[0, :, span]], dim=1).repeat_interleave(2, dim=0)
        values = torch.cat([layer.prefix_key_value[1], value[0, :, span]], dim=1).repeat_interleave(2, dim=0)
        scores = query[0, :, span] @ keys.transpose(-1, -2) / math.sqrt(dim)
        visible = torch.cat(
            [torch.ones(length, pre, dtype=torch.bool), torch.tril(torch.ones(length, length, dtype=torch.bool))], 1
        )
        expected = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values).transpose(0, 1)
        torch.testing.assert_close(out[0, span], expected, atol=1e-5, rtol=1e-5)


def test_prefix_is_copied_in_front_of_every_sample():
    """The layout the CUDA route hands to flash: per sample, the prefix rows then its own tokens."""
    from glmtune.speed.attention import _prefix_in_every_sample

    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    prefix = torch.randn(2, 2, 4, 16, requires_grad=True)  # [key/value, kv_heads, pre_seq_len, head_dim]
    key, value = torch.randn(9, 2, 16), torch.randn(9, 2, 16)  # [tokens, kv_heads, head_dim]
    keys, values, cu_k = _prefix_in_every_sample(prefix, key, value, cu)
    assert cu_k.tolist() == [0, 7, 16, 21] and cu_k.dtype == torch.int32
    for i in range(3):
        for joined, own, part in ((keys, key, prefix[0]), (values, value, prefix[1])):
            expected = torch.cat([part.transpose(0, 1), own[cu[i] : cu[i + 1]]])
            torch.testing.assert_close(joined[cu_k[i] : cu_k[i + 1]], expected, atol=0, rtol=0)
    weights = torch.randn(keys.shape)
    (keys * weights).sum().backward()  # the prefix's gradient sums over the samples' copies
    expected = sum(weights[cu_k[i] : cu_k[i] + 4] for i in range(3)).transpose(0, 1)
    torch.testing.assert_close(prefix.grad[0], expected)


@pytest.mark.parametrize("method, base", [("ptuning", "tiny"), ("lora", "tiny"), ("ptuning", "chatglm3")])
def test_entry_point_trains_the_same_curve_and_weights(tiny_model_dir, tmp_path, method, base):
    """``--padding_free True`` through the real entry point: the loss at every step and the saved weights
    equal those of padded batches (dropout off: its draws depend on the batch's shape). Also for glmtune's
    own ChatGLM2/3 class, which builds its masks its own way."""
    import json

    from conftest import GOLDEN, SHARED_MISSING, chatglm_folder
    from test_trainer import run, train_flags, trained_weights

    if base == "chatglm3":
        if not GOLDEN.is_dir():
            pytest.skip(SHARED_MISSING)
        tiny_model_dir = chatglm_folder("v3", tmp_path / "v3")
    curves, weights = [], []
    for flag in ("True", "False"):
        out = tmp_path / flag
        dropout = ["--lora_dropout", "0"] if method == "lora" else []
        run(method, tiny_model_dir, out, *train_flags(method, steps=4, save_steps=10), *dropout, "--padding_free", flag)
        state = json.loads((out / "trainer_state.json").read_text())
        curves.append([entry["loss"] for entry in state["log_history"] if "loss" in entry])
        weights.append(trained_weights(out, method))
    assert len(curves[0]) == 4
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)
    for name, tensor in weights[1].items():  # Adam divides by sqrt(v): float32 noise in tiny gradients shows as ~1e-5
        torch.testing.assert_close(weights[0][name], tensor, atol=1e-4, rtol=1e-4)


def test_refused_for_a_model_that_cannot_keep_samples_apart(tmp_path):
    """ChatGLM-6B derives its positions from [gMASK]: --padding_free True stops with one clear error."""
    from conftest import GOLDEN, SHARED_MISSING, chatglm_folder
    from test_trainer import run, train_flags

    if not GOLDEN.is_dir():
        pytest.skip(SHARED_MISSING)
    folder = chatglm_folder("v1", tmp_path / "v1")
    with pytest.raises(SystemExit) as exit_info:
        run("ptuning", folder, tmp_path / "out", *train_flags("ptuning", steps=1), "--padding_free", "True")
    assert exit_info.value.code != 0
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length flash kernel needs a CUDA GPU")
@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_bf16_cuda_compiled_curve_matches_padded_batches(model, tokenizer, tmp_path, method):
    """The whole fast path as train.sh runs it on a GPU (compiled layers, padding-free batches, flash's
    variable-length kernel) against padded batches in eager mode: the same curve within bf16 noise."""
    from test_loss import train_curve

    from glmtune.speed import compile_decoder_layers

    base = model.to("cuda", torch.bfloat16)
    curves = []
    for fast in (True, False):
        torch.manual_seed(0)
        run = adapted(copy.deepcopy(base), method)
        if fast:
            use_fast_attention(run)
            compile_decoder_layers(run)
        curves.append(
            train_curve(run, tokenizer, tmp_path / str(fast), collator=PaddingFreeCollator() if fast else None)
        )
    assert len(curves[0]) == 8 and curves[0][-1] < curves[0][0]
    assert curves[0] == pytest.approx(curves[1], rel=2e-2)
