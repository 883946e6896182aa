"""Evaluation's generation with a static key/value cache (compiled decoding on a GPU): the same greedy answers
as the dynamic cache, for the base, a P-Tuning v2 prefix and a LoRA adapter. In float32, where they are the
same function to the last bit that matters; in bf16 the longer (masked) keys of the static cache sum in another
order, which can flip a near-tied token of a barely trained model."""

import pytest
from conftest import TOY_DEV
from test_trainer import run


@pytest.mark.parametrize("method", ["base", "ptuning", "lora"])
def test_static_cache_gives_the_dynamic_caches_answers(tiny_model_dir, ptuning_checkpoint, lora_checkpoint, tmp_path,
                                                       method):  # fmt: skip
    flag = {"base": [], "ptuning": ["--ptuning_checkpoint", str(ptuning_checkpoint)],
            "lora": ["--lora_checkpoint", str(lora_checkpoint)]}[method]  # fmt: skip
    entry = "lora" if method == "lora" else "ptuning"
    answers = {}
    for cache in ("dynamic", "static"):
        out = tmp_path / cache
        run(
            entry,
            tiny_model_dir,
            out,
            "--do_predict",
            "--test_file",
            str(TOY_DEV),
            "--max_predict_samples",
            "24",
            "--per_device_eval_batch_size",
            "8",
            "--torch_dtype",
            "bfloat16",
            "--cache_implementation",
            cache,
            *flag,
        )
        answers[cache] = (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(answers["static"]) == 24 and answers["static"] == answers["dynamic"]
