"""Full fine-tuning (finetune/, glmtune/finetune.py) through the real entry point, in-process, on the 2-layer GLM:
every weight trains and a checkpoint is a complete model folder that plain transformers, glmtune's evaluation and
its serving tools load as the model; --trainable_layers trains only the last layers; resume continues to the
uninterrupted weights; a ChatGLM base keeps THUDM's format."""

import json
import shutil

import pytest
import torch
from conftest import GOLDEN, TOY_DEV, TOY_TRAIN, chatglm_folder, needs_shared
from safetensors import safe_open
from test_trainer import PREDICT, run
from transformers import AutoModelForCausalLM

from glmtune import finetune

STEPS, SAVE_STEPS = 6, 3
LR = ["--learning_rate", "1e-3"]


def train_flags(steps=STEPS, save_steps=SAVE_STEPS, *extra):
    return ["--do_train", "--train_file", str(TOY_TRAIN), "--max_steps", str(steps), "--save_steps", str(save_steps),
            *LR, *extra]  # fmt: skip


def saved_weights(folder) -> dict:
    """Every tensor of a model folder, from its safetensors files (sharded or not)."""
    weights = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), "pt") as f:
            weights.update({key: f.get_tensor(key) for key in f.keys()})
    return weights


def predictions(folder) -> list:
    return [json.loads(line)["predict"] for line in (folder / "generated_predictions.txt").open(encoding="utf-8")]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    """6 steps of full fine-tuning with checkpoints at 3 and 6, then predictions from the trained model."""
    out = tmp_path_factory.mktemp("finetune") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "MAX_SHARD_SIZE", "2MB")  # the tiny model's 4.7 MB in shards, as a 6B model's are
        run("finetune", tiny_model_dir, out, *train_flags(), *PREDICT)
    return out


def test_every_checkpoint_is_a_complete_sharded_model_folder(full_run):
    for folder in (full_run, full_run / "checkpoint-3", full_run / "checkpoint-6"):
        shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
        assert len(shards) >= 2, shards
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == shards
        assert set(index["weight_map"]) == set(saved_weights(folder))
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True  # generates with its cache
        for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "training_args.bin"):
            assert (folder / name).is_file(), name
        identity = json.loads((folder / "run.json").read_text())
        assert identity["method"] == "finetune" and identity["trained_weights"] == {"trainable_layers": "all"}
    step_files = {p.name for p in (full_run / "checkpoint-3").iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= step_files
    assert not [p for p in full_run.rglob("*") if p.name.startswith("tmp-") or p.suffix == ".tmp"]


def test_every_weight_trains_and_plain_transformers_loads_the_folder(full_run, tiny_model_dir):
    trained = AutoModelForCausalLM.from_pretrained(full_run).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert trained.keys() == base.keys()
    unchanged = [name for name in base if torch.equal(trained[name], base[name])]
    assert not unchanged
    saved = saved_weights(full_run)
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())  # trained weights stay float32
    for name, tensor in saved.items():
        assert torch.equal(trained[name], tensor), name


def test_the_folder_predicts_what_the_trained_model_predicted(full_run, tmp_path):
    """As the model of an evaluation run (finetune/evaluate.sh) and of the serving tools (glmtune/serve/options.py)."""
    from glmtune.serve import options

    run("finetune", full_run, tmp_path / "reloaded", *PREDICT)
    in_memory = predictions(full_run)
    assert len(in_memory) == 6 and predictions(tmp_path / "reloaded") == in_memory
    scores = json.loads((tmp_path / "reloaded" / "predict_results.json").read_text())
    assert {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"} <= scores.keys()

    args = options.parser("test").parse_args(["--model_name_or_path", str(full_run), "--max_source_length", "32"])
    tuned = options.load(args)
    queries = [json.loads(line)["content"] for line in TOY_DEV.open(encoding="utf-8")][: len(in_memory)]
    assert tuned.method == "base" and tuned.generate(queries, max_new_tokens=8) == in_memory


def test_resume_reaches_the_uninterrupted_weights(full_run, tiny_model_dir, tmp_path):
    shutil.copytree(full_run / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")  # what an interrupted run leaves
    run("finetune", tiny_model_dir, tmp_path / "cut", *train_flags(), "--resume_from_checkpoint", "last")
    state = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, STEPS + 1))
    full, resumed = saved_weights(full_run), saved_weights(tmp_path / "cut")
    start = saved_weights(full_run / "checkpoint-3")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-5)
    assert all(not torch.equal(full[key], start[key]) for key in full)  # steps 4-6 changed every weight


def test_resuming_with_other_trainable_layers_is_refused(full_run, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run("finetune", tiny_model_dir, tmp_path / "out", *train_flags(), "--trainable_layers", "1",
            "--resume_from_checkpoint", str(full_run / "checkpoint-3"))  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert 'belongs to another run (trained_weights {"trainable_layers": "all"} there, {"trainable_layers": 1}' in err


def test_trainable_layers_trains_only_the_last_decoder_layers(tiny_model_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="glmtune.workflow")
    run("finetune", tiny_model_dir, tmp_path / "out", *train_flags(2, 2), "--trainable_layers", "1")
    base, trained = saved_weights(tiny_model_dir), saved_weights(tmp_path / "out")
    assert trained.keys() == base.keys()
    for name in base:  # layer 1 of 2 trains; embeddings, layer 0, final norm and output head are the base's bits
        assert torch.equal(trained[name], base[name]) != name.startswith("model.layers.1."), name
    last_layer = sum(tensor.numel() for name, tensor in base.items() if name.startswith("model.layers.1."))
    assert f"Trainable parameters: {last_layer:,} of " in caplog.text


def test_bf16_mixed_precision_keeps_float32_weights_and_the_float32_loss(tiny_model_dir, tmp_path):
    """What runs by default on a GPU with bf16 (float32 weights, bf16 compute), here on the CPU's autocast."""
    run("finetune", tiny_model_dir, tmp_path / "fp32", *train_flags(3, 3), "--save_strategy", "no")
    run("finetune", tiny_model_dir, tmp_path / "bf16", *train_flags(3, 3), "--save_strategy", "no", "--bf16")

    def losses(out):
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "fp32"), rel=2e-2)
    assert losses(tmp_path / "bf16") != losses(tmp_path / "fp32")  # it did compute in bf16
    weights = saved_weights(tmp_path / "bf16")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())


def test_the_8bit_optimizer_keeps_8bit_state(tiny_model_dir, tmp_path):
    """--optim paged_adamw_8bit (bitsandbytes; on the CPU its non-paged fallback): the saved optimizer state of every
    large weight is 8-bit but the embedding's (Trainer keeps it in 32 bits, as bitsandbytes advises), and the step
    moved every weight."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    run("finetune", tiny_model_dir, out, *train_flags(1, 1), "--optim", "paged_adamw_8bit")
    state = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=False)["state"]
    parameters = list(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert len(state) == len(parameters)
    # bitsandbytes keeps weights under 4096 elements in 32 bits; its saved state is nested under this key
    bits = [entry.get("__bnb_optimizer_quant_state__", entry)["state1"].dtype for entry in state.values()]
    large = [name for name, p in parameters if p.numel() >= 4096 and "embed" not in name]
    assert bits.count(torch.uint8) == len(large) > 0
    base, trained = saved_weights(tiny_model_dir), saved_weights(out)
    assert all(not torch.equal(trained[name], base[name]) for name in base)


# ----------------------------------------------------------------------------- ChatGLM bases

TRANSFORMERS_FIELDS = {"architectures", "torch_dtype", "_name_or_path", "transformers_version"}  # rewritten on save


@needs_shared
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_a_finetuned_chatglm_keeps_thudms_format_and_reloads_to_the_same_logits(version, tmp_path):
    from glmtune.arguments import ModelArguments
    from glmtune.model import load_base_model, load_tokenizer
    from glmtune.parsing import parse_args
    from glmtune.workflow import build_model, prepare_data, run_tasks

    base = tmp_path / "base"
    chatglm_folder(version, base)
    _as_thudm_ships_it(base, with_code=version != "v3")  # v3's tokenizer is told from v2's by its code or name
    out = tmp_path / "out"
    config = parse_args("finetune", [
        "--do_train", "--train_file", str(TOY_TRAIN), "--max_train_samples", "8", "--model_name_or_path", str(base),
        "--output_dir", str(out), "--max_source_length", "32", "--max_target_length", "8",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none",
        "--torch_dtype", "float32", *LR,
    ])  # fmt: skip
    tokenizer, prompt_format, datasets = prepare_data(config)
    model = build_model(config, len(tokenizer))
    run_tasks(config, model, tokenizer, prompt_format, datasets)

    inputs = _golden_inputs(version)
    model.eval()
    reloaded = load_base_model(ModelArguments(model_name_or_path=str(out), torch_dtype="float32"))
    untuned = load_base_model(ModelArguments(model_name_or_path=str(base), torch_dtype="float32"))
    assert type(reloaded) is type(model)
    with torch.no_grad():
        trained_logits, reloaded_logits = model(**inputs).logits, reloaded(**inputs).logits
        untuned_logits = untuned(**inputs).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, atol=1e-6, rtol=0)
    assert (trained_logits - untuned_logits).abs().max() > 1e-3  # the two steps changed the model

    weights_dir = "chatglm-v1" if version == "v1" else "chatglm-v2"
    with safe_open(str(GOLDEN / weights_dir / "model.safetensors"), "pt") as f:
        assert set(saved_weights(out)) == set(f.keys())  # THUDM's state-dict keys, no more, no fewer
    original, saved = _json(base / "config.json"), _json(out / "config.json")
    assert {k: v for k, v in original.items() if k not in TRANSFORMERS_FIELDS} == {
        k: saved[k] for k in original if k not in TRANSFORMERS_FIELDS
    }
    assert _json(out / "tokenizer_config.json")["auto_map"] == _json(base / "tokenizer_config.json")["auto_map"]
    if version != "v3":
        assert (out / "modeling_chatglm.py").read_text() == (base / "modeling_chatglm.py").read_text()
    query = "类型#裙*颜色#红色"
    assert load_tokenizer(ModelArguments(str(out))).encode(query) == load_tokenizer(ModelArguments(str(base))).encode(
        query
    )


def _as_thudm_ships_it(folder, with_code: bool) -> None:
    """auto_map entries pointing at the folder's own code, and (a stand-in for) that code."""
    config = _json(folder / "config.json")
    config["auto_map"] = {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if with_code:
        (folder / "modeling_chatglm.py").write_text("# THUDM's model code stands here\n", encoding="utf-8")


def _golden_inputs(version: str) -> dict:
    from safetensors.torch import load_file

    golden = load_file(GOLDEN / ("chatglm-v1" if version == "v1" else "chatglm-v2") / "forward_infer.safetensors")
    return {key: golden[key] for key in ("input_ids", "attention_mask", "position_ids")}


def _json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_trainable_share_counts_zero3_partitioned_weights(caplog):
    """Under ZeRO-3 a base loads partitioned: each parameter's numel() is 0 and DeepSpeed puts its size in ds_numel
    (the attribute deepspeed.zero.Init sets); logging the share of a fully trained model divided by zero."""
    from glmtune.workflow import log_trainable

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sizes = [p.numel() for p in model.parameters()]
    for parameter in model.parameters():
        parameter.ds_numel, parameter.data = parameter.numel(), torch.empty(0)
    model[1].requires_grad_(False)
    caplog.set_level("INFO", logger="glmtune.workflow")
    log_trainable(model)
    assert f"Trainable parameters: {sum(sizes[:2])} of {sum(sizes)} " in caplog.text
