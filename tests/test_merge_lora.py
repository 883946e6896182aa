"""scripts/merge_lora.py: a LoRA adapter merged into its base gives a plain transformers model with the
same logits as base + adapter; P-Tuning checkpoints, quantized merges and existing outputs are refused."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = REPO / "scripts" / "merge_lora.py"
TEXTS = ["类型#裙*颜色#白色*风格#简约", "类型#上衣"]


def load_script():
    spec = importlib.util.spec_from_file_location("merge_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(capsys, *flags):
    """The script's main in this process (cheap: no second import of torch); returns (exit code, stderr)."""
    capsys.readouterr()  # drop what came before (progress bars of earlier loads)
    try:
        load_script().main([str(flag) for flag in flags])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def plain(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def padded_batch(tokenizer):
    rows = [tokenizer(text)["input_ids"] for text in TEXTS]
    width = max(map(len, rows))
    assert min(map(len, rows)) < width  # the batch really is padded
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, mask


def logits(model, batch):
    input_ids, mask = batch
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits[mask.bool()]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, lora_checkpoint, tmp_path_factory):
    """The 2-step adapter with its lora_B scaled up, so that it clearly changes the logits."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(plain(tiny_model_dir), str(lora_checkpoint))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    out = tmp_path_factory.mktemp("scaled-lora")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapter):
    """Base and base + adapter (PEFT, unmerged) logits on a padded batch."""
    from peft import PeftModel

    batch = padded_batch(AutoTokenizer.from_pretrained(tiny_model_dir))
    base = logits(plain(tiny_model_dir), batch)
    tuned = logits(PeftModel.from_pretrained(plain(tiny_model_dir), str(adapter)).eval(), batch)
    assert (tuned - base).abs().max() > 1e-2  # the adapter really changes the model
    return batch, base, tuned


def test_merged_folder_loads_with_transformers_alone_and_matches_base_plus_adapter(
    tiny_model_dir, adapter, expected, tmp_path
):
    output = tmp_path / "merged"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--checkpoint",
            str(adapter),
            "--output",
            str(output),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(output) in result.stdout
    names = {path.name for path in output.iterdir()}
    assert names >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert not {name for name in names if name.startswith("adapter_")}
    assert not (tmp_path / "merged.partial").exists()
    config = json.loads((output / "config.json").read_text())
    assert config["use_cache"] is True and "quantization_config" not in config

    batch, base, tuned = expected
    merged = plain(output)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), tuned, atol=1e-5, rtol=0)
    assert (
        AutoTokenizer.from_pretrained(output)("类型#裙")["input_ids"]
        == AutoTokenizer.from_pretrained(tiny_model_dir)("类型#裙")["input_ids"]
    )


def test_small_shards_an_existing_output_and_overwrite(tiny_model_dir, adapter, expected, tmp_path, capsys):
    output = tmp_path / "sharded"
    flags = [
        "--model_name_or_path",
        tiny_model_dir,
        "--checkpoint",
        adapter,
        "--output",
        output,
        "--max_shard_size",
        "1MB",
    ]
    assert run_in_process(capsys, *flags)[0] == 0
    shards = sorted(path.name for path in output.glob("*.safetensors"))
    assert len(shards) >= 2 and (output / "model.safetensors.index.json").is_file()
    batch, base, tuned = expected
    torch.testing.assert_close(logits(plain(output), batch), tuned, atol=1e-5, rtol=0)

    (output / "marker").write_text("old")
    code, stderr = run_in_process(capsys, *flags)
    assert code == 2 and stderr.splitlines() == [
        f"error: --output {output} already exists: pass --overwrite to replace it, or choose another folder"
    ]
    assert (output / "marker").exists()
    assert run_in_process(capsys, *flags, "--overwrite")[0] == 0
    assert not (output / "marker").exists() and len(list(output.glob("*.safetensors"))) == len(shards)


def test_ptuning_checkpoints_and_quantized_merges_are_refused(
    tiny_model_dir, ptuning_checkpoint, lora_checkpoint, tmp_path, capsys
):
    code, stderr = run_in_process(
        capsys, "--model_name_or_path", tiny_model_dir, "--checkpoint", ptuning_checkpoint, "--output", tmp_path / "out"
    )
    assert code == 2 and len(stderr.splitlines()) == 1
    assert "is a P-Tuning v2 checkpoint" in stderr and "cannot be merged" in stderr

    code, stderr = run_in_process(
        capsys,
        "--model_name_or_path",
        tiny_model_dir,
        "--checkpoint",
        lora_checkpoint,
        "--output",
        tmp_path / "out",
        "--quantization_bit",
        "4",
    )
    assert code == 2 and len(stderr.splitlines()) == 1
    assert (
        "--quantization_bit 4" in stderr and "full-precision base" in stderr and "quantize the merged model" in stderr
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    code, stderr = run_in_process(
        capsys,
        "--model_name_or_path",
        tiny_model_dir,
        "--checkpoint",
        lora_checkpoint,
        "--output",
        tiny_model_dir,
        "--overwrite",
    )
    assert code == 2 and "would replace --model_name_or_path" in stderr


def test_a_loftq_adapter_is_not_merged_into_the_full_precision_base(tiny_model_dir, lora_checkpoint, tmp_path, capsys):
    """LoftQ's adapter corrects its 4-bit base (B A starts as W - Q(W)): added to W it would count the error twice.
    PEFT's config does not say LoftQ (a plain start, then replaced); the run.json glmtune writes beside it does."""
    import shutil

    adapter = shutil.copytree(lora_checkpoint, tmp_path / "loftq")
    identity = json.loads((adapter / "run.json").read_text())
    identity["trained_weights"]["init_lora_weights"] = "loftq"
    (adapter / "run.json").write_text(json.dumps(identity))
    code, stderr = run_in_process(
        capsys, "--model_name_or_path", tiny_model_dir, "--checkpoint", adapter, "--output", tmp_path / "out"
    )
    assert code == 2 and len(stderr.splitlines()) == 1
    assert "trained with --init_lora_weights loftq" in stderr and "unmerged on the 4-bit base" in stderr
    assert not (tmp_path / "out").exists()
