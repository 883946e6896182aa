"""The adapter_config.json glmtune writes: PEFT 0.6-0.13 load it (they refuse keys they do not know), settings
that change the adapter's meaning are kept so that old PEFT fails loudly, and today's PEFT loads it to the very
logits of the config it wrote itself."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from glmtune.adapter_config import make_portable, portable

# The fields of peft 0.6.2's LoraConfig with those it inherits (peft/tuners/lora/config.py, peft/config.py at
# v0.6.2): PeftConfig.from_pretrained there calls LoraConfig(**json), a TypeError on any other key.
PEFT_0_6_2_KEYS = {
    "r",
    "target_modules",
    "lora_alpha",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "base_model_name_or_path",
    "revision",
    "peft_type",
    "task_type",
    "inference_mode",
    "auto_mapping",
}
TEXT = "类型#裙*颜色#白色*风格#简约"


def peft_written(tmp_path, **settings) -> dict:
    """adapter_config.json as the installed PEFT writes it."""
    LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], **settings).save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_peft_today_writes_keys_old_peft_refuses(tmp_path):
    """Why the rewrite exists (and a check on the fact list: the portable keys are all in it)."""
    written = peft_written(tmp_path)
    assert set(written) - PEFT_0_6_2_KEYS  # e.g. use_dora, peft_version, alora_invocation_tokens
    assert set(portable(written, ["q_proj", "v_proj"])) == PEFT_0_6_2_KEYS


def test_a_trained_adapters_config_has_old_peft_keys_only(lora_checkpoint, model):
    config = json.loads((lora_checkpoint / "adapter_config.json").read_text())
    assert set(config) <= PEFT_0_6_2_KEYS
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert config["target_modules"] == sorted(linear - {"lm_head"})  # --lora_target all, spelled out
    assert config["init_lora_weights"] is True and (config["r"], config["lora_alpha"]) == (4, 32)


@pytest.mark.parametrize("setting", [{"use_rslora": True}, {"use_dora": True}, {"layer_replication": [[0, 2]]}])
def test_settings_that_change_the_adapter_are_kept(tmp_path, setting):
    written = portable(peft_written(tmp_path, **setting), ["q_proj", "v_proj"])
    ((key, value),) = setting.items()
    assert written[key] == value and key not in PEFT_0_6_2_KEYS  # old PEFT fails on it instead of loading wrongly


@pytest.mark.parametrize(
    ("init", "written"),
    [("gaussian", True), (False, True), ("orthogonal", True), ("pissa", "pissa"), ("loftq", "loftq")],
)
def test_init_lora_weights_is_true_for_plain_lora_weights(tmp_path, init, written):
    """PiSSA / LoftQ weights are not plain LoRA over the base (new PEFT runs their initialisation at load)."""
    config = {**peft_written(tmp_path), "init_lora_weights": init, "loftq_config": {"loftq_bits": 4}}
    result = portable(config, ["q_proj"])
    assert result["init_lora_weights"] == written and type(result["init_lora_weights"]) is type(written)
    assert ("loftq_config" in result) == (written is not True)


def test_all_linear_becomes_the_adapted_names(tmp_path):
    config = {**peft_written(tmp_path), "target_modules": "all-linear"}
    assert portable(config, ["v_proj", "q_proj", "q_proj"])["target_modules"] == ["q_proj", "v_proj"]


def test_peft_today_loads_it_to_the_logits_of_its_own_config(tiny_model_dir, lora_checkpoint, tmp_path):
    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    tuned = PeftModel.from_pretrained(base(), str(lora_checkpoint))
    with torch.no_grad():  # a 2-step adapter barely moves the logits: make it count
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    tuned.save_pretrained(tmp_path / "peft")  # PEFT's own config
    shutil.copytree(tmp_path / "peft", tmp_path / "portable")
    make_portable(str(tmp_path / "portable"))
    assert json.loads((tmp_path / "portable" / "adapter_config.json").read_text()).keys() <= PEFT_0_6_2_KEYS

    from transformers import AutoTokenizer

    input_ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT)["input_ids"]])
    with torch.no_grad():
        logits = {
            name: PeftModel.from_pretrained(base(), tmp_path / name)(input_ids).logits for name in ("peft", "portable")
        }
        untuned = base()(input_ids).logits
    assert torch.equal(logits["portable"], logits["peft"])
    assert (logits["peft"] - untuned).abs().max() > 1e-2  # the adapter really is applied
