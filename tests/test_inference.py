"""glmtune.serve.tuned: one loader for every consumer of a checkpoint; the same answers as evaluation."""

import json

import pytest
from conftest import TOY_DEV
from test_trainer import PREDICT, run

from glmtune.errors import GlmtuneError
from glmtune.serve.tuned import checkpoint_method, load_tuned


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_batched_and_streamed_answers_match_the_evaluation_predictions(tiny_model_dir, tmp_path, request, method):
    checkpoint = request.getfixturevalue(f"{method}_checkpoint")
    flag = "--ptuning_checkpoint" if method == "ptuning" else "--lora_checkpoint"
    run(method, tiny_model_dir, tmp_path / "eval", *PREDICT, flag, str(checkpoint))
    expected = [json.loads(line)["predict"] for line in (tmp_path / "eval" / "generated_predictions.txt").open()]
    queries = [json.loads(line)["content"] for line in TOY_DEV.open()][: len(expected)]
    tuned = load_tuned(str(tiny_model_dir), str(checkpoint), max_source_length=32)
    assert tuned.method == method
    assert tuned.generate(queries, max_new_tokens=8) == expected
    assert "".join(tuned.stream(queries[0], max_new_tokens=8)).strip() == expected[0]


def test_a_failing_streamed_generation_raises_instead_of_hanging(tiny_model_dir):
    """generate() runs in its own thread while stream() reads the text: its error must reach the reader (the
    API server's worker reads there, and hung for good). Sampling at temperature 1e-300 overflows the logits."""
    import threading

    tuned = load_tuned(str(tiny_model_dir))
    outcome = []

    def read():
        try:
            outcome.append("".join(tuned.stream("类型#裙", do_sample=True, temperature=1e-300, max_new_tokens=4)))
        except RuntimeError as error:
            outcome.append(error)

    greedy = tuned.generate(["类型#裙"], max_new_tokens=4)[0]
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "stream() still waits for text from a generation that failed"
    assert isinstance(outcome[0], RuntimeError) and "probability tensor" in str(outcome[0])
    assert "".join(tuned.stream("类型#裙", max_new_tokens=4)).strip() == greedy


def test_checkpoint_kinds_and_errors(tmp_path, ptuning_checkpoint, lora_checkpoint, tiny_model_dir):
    assert checkpoint_method(None) == "base"
    assert checkpoint_method(str(ptuning_checkpoint)) == "ptuning"
    assert checkpoint_method(str(lora_checkpoint)) == "lora"
    with pytest.raises(GlmtuneError, match="no such folder"):
        checkpoint_method(str(tmp_path / "missing"))
    with pytest.raises(GlmtuneError, match="neither a P-Tuning v2 checkpoint"):
        checkpoint_method(str(tmp_path))
    # a fully fine-tuned folder given as the checkpoint: say where it goes
    with pytest.raises(GlmtuneError, match=r"a whole model folder .* give it as the model \(--model_name_or_path"):
        checkpoint_method(str(tiny_model_dir))
    with pytest.raises(GlmtuneError, match="not a model folder"):
        load_tuned(str(tmp_path), str(lora_checkpoint))


def other_base(tmp_path, **shape):
    """A differently shaped tiny GLM (its tokenizer is trained on the same toy data)."""
    from conftest import TOY_TRAIN

    from scripts import build_tiny_model as tiny

    out = tmp_path / "other-base"
    tiny.build(str(TOY_TRAIN), str(out), steps=0, **shape)
    return out


@pytest.mark.parametrize(
    "shape, named",
    [
        ({"num_hidden_layers": 3}, "num_layers 2 there, 3 here"),
        ({"hidden_size": 64, "head_dim": 16}, "head_dim 32 there, 16 here"),
    ],
)
def test_prefix_checkpoint_on_a_different_base_is_refused(tmp_path, ptuning_checkpoint, shape, named):
    with pytest.raises(GlmtuneError, match=named):
        load_tuned(str(other_base(tmp_path, **shape)), str(ptuning_checkpoint))


def test_lora_adapter_whose_targets_do_not_exist_is_refused(tmp_path, lora_checkpoint, tokenizer):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    with pytest.raises(GlmtuneError, match="cannot load this adapter"):
        load_tuned(str(tmp_path / "llama"), str(lora_checkpoint))  # GLM's gate_up_proj is not in Llama
