"""PromptCBLUE's LLaMA-7B recipe in small: a Llama whose tokenizer has words its embeddings lack (Chinese-LLaMA's
extended vocabulary), LoRA with --modules_to_save embed_tokens,lm_head. Training resizes the base, the adapter
carries the resized embeddings and head, every loader (evaluation, serving, merging) resizes the base to the
tokenizer saved with the adapter, and merged chains of adapters load with transformers alone. Expected numbers
come from the files alone: the base's weights plus alpha / r * B @ A for every LoRA pair, saved modules in place
of the base's, adapter after adapter."""

import json
import math
import shutil

import pytest
import torch
from conftest import TOY_DEV
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapter_config import PEFT_0_6_2_KEYS
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from glmtune.cli import main as cli_main

TEXT = "类型#裙*裙长#连衣裙*风格#显瘦*图案#碎花"
SAVED = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
PREFIX = "base_model.model."


def merged_by_hand(base_dir, adapters, lora=True) -> dict:
    """The base's state dict with each adapter folded in, in order, computed from the saved files (``lora``
    False: the saved modules only)."""
    state = load_file(base_dir / "model.safetensors")
    for folder in adapters:
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        weights = load_file(folder / "adapter_model.safetensors")
        for key, tensor in weights.items():
            name = key.removeprefix(PREFIX)
            if ".lora_A." in name and lora:
                weight = name.split(".lora_A.")[0] + ".weight"
                state[weight] = state[weight] + scale * weights[key.replace(".lora_A.", ".lora_B.")] @ tensor
            elif ".lora_" not in name:  # a module saved in full (modules_to_save): it replaces the base's
                state[name] = tensor
    return state


def logits_of(state: dict, base_dir, input_ids) -> torch.Tensor:
    config = AutoConfig.from_pretrained(base_dir)
    config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def input_ids(llama_model_dir):
    """A prompt holding added words (ids past the base's vocabulary)."""
    ids = AutoTokenizer.from_pretrained(llama_model_dir)(TEXT)["input_ids"]
    assert max(ids) >= AutoConfig.from_pretrained(llama_model_dir).vocab_size
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def second_adapter(llama_adapter, tmp_path_factory):
    """Another adapter of the same base: the first one's weights moved (so that the order of a chain shows)."""
    folder = shutil.copytree(llama_adapter, tmp_path_factory.mktemp("second") / "adapter")
    weights = load_file(folder / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    moved = {key: tensor + 0.3 * torch.randn(tensor.shape, generator=generator) for key, tensor in weights.items()}
    save_file(moved, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def test_the_tiny_llama_has_words_its_embeddings_lack(llama_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_model_dir)
    vocab_size = AutoConfig.from_pretrained(llama_model_dir).vocab_size
    assert len(tokenizer) == vocab_size + 24
    assert [len(tokenizer.tokenize(word)) for word in ("裙长", "显瘦", "碎花")] == [1, 1, 1]


def test_the_adapter_carries_the_resized_embeddings_and_head(llama_model_dir, llama_adapter):
    rows = len(AutoTokenizer.from_pretrained(llama_model_dir))
    with safe_open(llama_adapter / "adapter_model.safetensors", framework="pt") as f:
        whole = {key: f.get_slice(key).get_shape() for key in f.keys() if ".lora_" not in key}
    assert whole == dict.fromkeys(SAVED, [rows, 64])  # once each: not PEFT's extra copies of the wrappers
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"] and set(config) <= PEFT_0_6_2_KEYS
    assert len(AutoTokenizer.from_pretrained(llama_adapter)) == rows  # the tokenizer it was trained with
    base = load_file(llama_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    trained = load_file(llama_adapter / "adapter_model.safetensors")[PREFIX + "model.embed_tokens.weight"]
    changed = (trained[: base.shape[0]] != base).any(-1)
    assert 0 < changed.sum() < base.shape[0]  # rows of the tokens trained on moved, the others did not


def test_serving_and_evaluation_resize_the_base_to_the_adapters_tokenizer(
    llama_model_dir, llama_adapter, input_ids, tmp_path
):
    from glmtune.serve.tuned import load_tuned

    tuned = load_tuned(str(llama_model_dir), str(llama_adapter), torch_dtype="float32")
    with torch.no_grad():
        logits = tuned.model(input_ids=input_ids).logits
    expected = logits_of(merged_by_hand(llama_model_dir, [llama_adapter]), llama_model_dir, input_ids)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    modules_only = logits_of(merged_by_hand(llama_model_dir, [llama_adapter], lora=False), llama_model_dir, input_ids)
    assert (expected - modules_only).abs().max() > 1e-3  # the LoRA pairs count as well as the saved modules

    out = tmp_path / "predict"
    flags = {
        "--test_file": TOY_DEV,
        "--model_name_or_path": llama_model_dir,
        "--lora_checkpoint": llama_adapter,
        "--output_dir": out,
        "--max_predict_samples": 2,
        "--max_source_length": 32,
        "--max_new_tokens": 4,
        "--report_to": "none",
    }
    cli_main("lora", ["--do_predict", *(str(x) for pair in flags.items() for x in pair)])
    assert (out / "generated_predictions.txt").read_text(encoding="utf-8").count("\n") == 2


def merge(capsys, *flags) -> tuple:
    """scripts/merge_lora.py's main in this process; (exit code, stderr)."""
    from test_merge_lora import run_in_process

    return run_in_process(capsys, *flags)


def test_a_merged_chain_loads_with_transformers_alone_in_shards(
    llama_model_dir, llama_adapter, second_adapter, input_ids, tmp_path, capsys
):
    output = tmp_path / "merged"
    chain = f"{llama_adapter},{second_adapter}"
    flags = ["--model_name_or_path", llama_model_dir, "--checkpoint", chain, "--output", output]
    code, err = merge(capsys, *flags, "--max_shard_size", "200KB")
    assert code == 0, err

    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and sorted(p.name for p in output.glob("*.safetensors")) == shards
    for shard in shards:  # 200KB: 200,000 bytes of tensors (the largest tensor, 624 x 64 float32, fits)
        with safe_open(output / shard, framework="pt") as f:
            assert sum(4 * math.prod(f.get_slice(key).get_shape()) for key in f.keys()) <= 200_000

    merged = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    rows = len(AutoTokenizer.from_pretrained(llama_model_dir))
    assert len(AutoTokenizer.from_pretrained(output)) == merged.config.vocab_size == rows
    with torch.no_grad():
        logits = merged(input_ids=input_ids).logits
    in_order = logits_of(merged_by_hand(llama_model_dir, [llama_adapter, second_adapter]), llama_model_dir, input_ids)
    reversed_ = logits_of(merged_by_hand(llama_model_dir, [second_adapter, llama_adapter]), llama_model_dir, input_ids)
    torch.testing.assert_close(logits, in_order, atol=1e-5, rtol=1e-5)
    assert (in_order - reversed_).abs().max() > 1e-2  # the second adapter's saved modules win: order matters

    from glmtune.serve.tuned import load_tuned

    served = load_tuned(str(output), None, torch_dtype="float32")
    assert served.method == "base"
    with torch.no_grad():
        torch.testing.assert_close(served.model(input_ids=input_ids).logits, in_order, atol=1e-5, rtol=1e-5)
    assert isinstance(served.generate([TEXT], max_new_tokens=3)[0], str)


def test_saved_modules_train_in_float32_on_a_bfloat16_base(llama_model_dir, input_ids):
    """As the LoRA matrices: PEFT would train the modules_to_save copies in the base's dtype."""
    from peft import LoraConfig, get_peft_model

    from glmtune.arguments import LoraArguments
    from glmtune.lora import add_lora

    def base():
        model = AutoModelForCausalLM.from_pretrained(llama_model_dir, dtype=torch.bfloat16)
        model.resize_token_embeddings(input_ids.max().item() + 1, mean_resizing=False)
        return model

    args = LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="q_proj,v_proj")
    ours = add_lora(base(), LoraArguments(**{**vars(args), "modules_to_save": "embed_tokens,lm_head"}))
    peft_own = get_peft_model(
        base(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    )
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for n, p in peft_own.named_parameters() if p.requires_grad and ".lora_" not in n} == {
        torch.bfloat16
    }
    losses = [m(input_ids=input_ids, labels=input_ids).loss for m in (ours, peft_own)]
    assert losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[0], losses[1], atol=2e-2, rtol=0)  # the same model, up to bf16 rounding
    losses[0].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)


@pytest.mark.slow
def test_the_shell_scripts_take_modules_to_save_and_a_chain(llama_model_dir, second_adapter, input_ids, tmp_path):
    """lora/train.sh's MODULES_TO_SAVE, lora/merge.sh's comma-separated CHECKPOINT (OUTPUT named after the last)."""
    from test_scripts import bash

    run = dict(MODEL=str(llama_model_dir), MODULES_TO_SAVE="embed_tokens,lm_head", LORA_RANK="4", BATCH_SIZE="4")
    run.update(MAX_STEPS="2", SAVE_STEPS="2", MAX_SOURCE_LENGTH="32", MAX_TARGET_LENGTH="16", OUTPUT_DIR="trained")
    bash("lora/train.sh", "--max_train_samples", "8", "--report_to", "none", cwd=tmp_path, **run)
    trained = tmp_path / "trained"
    assert json.loads((trained / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "lm_head"]
    bash("lora/merge.sh", cwd=tmp_path, MODEL=str(llama_model_dir), CHECKPOINT=f"trained,{second_adapter}")
    merged = AutoModelForCausalLM.from_pretrained(f"{second_adapter}-merged", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(input_ids=input_ids).logits
    expected = logits_of(merged_by_hand(llama_model_dir, [trained, second_adapter]), llama_model_dir, input_ids)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
