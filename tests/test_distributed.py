"""Several processes give what one process gives: torchrun with 2 CPU processes (gloo), through the shipped
scripts (NUM_GPUS=2), against one in-process run with the same global batch (2 x 2 samples vs 1 x 4).

* the loss logged at every step and the final weights match within float tolerance (the gradients are
  averaged over processes instead of summed in one batch: same value, another summation order);
* only the main process writes checkpoint and prediction files: each folder holds exactly the files of the
  single-process run (plus one rng_state_{rank}.pth per process), and nothing temporary is left;
* generation gathers every test row exactly once and in order (5 rows: the last step repeats a row on the
  second process, which must be dropped): the file equals the single-process one;
* resuming the 2-process run from its middle checkpoint ends with the same weights (bitwise on CPU).

Dropout is off so that the runs draw no random numbers whose order depends on the number of processes.
"""

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import REPO, TOY_DEV, TOY_TRAIN
from safetensors.torch import load_file

from glmtune.cli import main

STEPS, SAVE_STEPS, PER_PROCESS, PROCESSES = 4, 2, 2, 2
SIZES = {"MAX_SOURCE_LENGTH": "24", "MAX_TARGET_LENGTH": "8"}
METHOD = {  # script variables, and the same settings as main.py flags
    "ptuning": (
        {"PRE_SEQ_LEN": "4", "LR": "1e-2"},
        ["--pre_seq_len", "4", "--learning_rate", "1e-2", "--prefix_dropout", "0"],
    ),
    "lora": (
        {"LORA_RANK": "4", "LORA_ALPHA": "8", "LORA_DROPOUT": "0", "LR": "1e-2"},
        ["--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--learning_rate", "1e-2"],
    ),
    "finetune": ({"LR": "1e-3"}, ["--learning_rate", "1e-3"]),
}
COMMON = [
    "--max_train_samples",
    "16",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--seed",
    "7",
    "--max_new_tokens",
    "6",
    "--per_device_eval_batch_size",
    "1",
]
PREDICT = ["--do_predict", "--test_file", str(TOY_DEV), "--max_predict_samples", "5", "--val_max_target_length", "32"]
WEIGHTS = {
    "ptuning": "prefix_encoder.safetensors",
    "lora": "adapter_model.safetensors",
    "finetune": "model.safetensors",
}
RANK_FILES = {f"rng_state_{rank}.pth" for rank in range(PROCESSES)}


def train_script(method, model_dir, out, *flags) -> None:
    """``NUM_GPUS=2 bash <method>/train.sh``: torchrun, 2 processes."""
    env = {
        **os.environ,
        "NUM_GPUS": str(PROCESSES),
        "MODEL": str(model_dir),
        "OUTPUT_DIR": str(out),
        "BATCH_SIZE": str(PER_PROCESS),
        "MAX_STEPS": str(STEPS),
        "SAVE_STEPS": str(SAVE_STEPS),
        **SIZES,
        **METHOD[method][0],
    }
    if method == "ptuning":
        flags = (*flags, "--prefix_dropout", "0")
    result = subprocess.run(
        ["bash", f"{method}/train.sh", *COMMON, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def train_one_process(method, model_dir, out) -> None:
    """The same run in this process with one batch of 2 x 2 samples per step (what train.sh passes, by hand)."""
    main(
        method,
        [
            "--do_train",
            "--model_name_or_path",
            str(model_dir),
            "--train_file",
            str(TOY_TRAIN),
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            str(PER_PROCESS * PROCESSES),
            "--max_steps",
            str(STEPS),
            "--save_steps",
            str(SAVE_STEPS),
            "--max_source_length",
            SIZES["MAX_SOURCE_LENGTH"],
            "--max_target_length",
            SIZES["MAX_TARGET_LENGTH"],
            *COMMON,
            *METHOD[method][1],
        ],
    )


def losses(out) -> list:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def weights(out, method) -> dict:
    return load_file(str(out / WEIGHTS[method]))


def names(folder) -> set:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module", params=["ptuning", "lora", "finetune"])
def runs(request, tiny_model_dir, tmp_path_factory):
    """Per method: the 2-process run (with predictions), the 1-process run, and the 2-process run resumed."""
    method, root = request.param, tmp_path_factory.mktemp(f"distributed-{request.param}")
    train_script(method, tiny_model_dir, root / "two", *PREDICT)
    train_one_process(method, tiny_model_dir, root / "one")
    shutil.copytree(root / "two" / f"checkpoint-{SAVE_STEPS}", root / "resumed" / f"checkpoint-{SAVE_STEPS}")
    train_script(method, tiny_model_dir, root / "resumed", "--resume_from_checkpoint", "last")
    return method, root


def test_loss_curve_and_weights_match_one_process_with_the_same_global_batch(runs, tiny_model_dir):
    method, root = runs
    two, one = losses(root / "two"), losses(root / "one")
    assert len(two) == len(one) == STEPS
    assert two == pytest.approx(one, rel=1e-5)
    two_weights, one_weights = weights(root / "two", method), weights(root / "one", method)
    assert two_weights.keys() == one_weights.keys()
    # Full fine-tuning updates every base weight with Adam, which scales each gradient to about one learning-rate
    # step: summation-order noise in a near-zero gradient moves its weight by up to ~1e-6 (0.1% of a 1e-3 step).
    atol = 1e-5 if method == "finetune" else 1e-6
    for key in one_weights:
        torch.testing.assert_close(two_weights[key], one_weights[key], rtol=1e-5, atol=atol)
    if method == "finetune":  # the tolerance is far below what training moved
        base = load_file(str(tiny_model_dir / "model.safetensors"))
        assert all((one_weights[key] - base[key]).abs().max() > 100 * atol for key in one_weights)


def test_only_the_main_process_writes_files(runs):
    method, root = runs
    two, one = root / "two", root / "one"
    assert names(two) == names(one) | {"generated_predictions.txt", "predict_results.json"}
    for step in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS):
        assert names(two / f"checkpoint-{step}") == names(one / f"checkpoint-{step}") - {"rng_state.pth"} | RANK_FILES
    leftovers = [p for p in two.rglob("*") if p.name.startswith("tmp-") or p.suffix == ".tmp"]
    assert not leftovers


def test_generation_covers_every_row_once_in_order(runs, tiny_model_dir, tmp_path):
    """The 2-process predictions equal one process's predictions from the same weights, row for row."""
    method, root = runs
    if method == "finetune":  # the trained model is a model folder
        model, tuned = root / "two", []
    else:
        model, tuned = tiny_model_dir, [f"--{method}_checkpoint", str(root / "two")]
    main(
        method,
        [
            "--model_name_or_path",
            str(model),
            "--output_dir",
            str(tmp_path),
            *COMMON,
            *PREDICT,
            "--max_source_length",
            SIZES["MAX_SOURCE_LENGTH"],
            *tuned,
        ],
    )
    expected = (tmp_path / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    gathered = (root / "two" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    labels = [json.loads(line)["labels"] for line in expected]
    assert len(expected) == 5 and len(set(labels)) == 5  # five distinct rows, so a repeated or lost row shows
    assert gathered == expected


def test_a_resumed_two_process_run_ends_with_the_same_weights(runs):
    method, root = runs
    assert losses(root / "resumed")[-2:] == losses(root / "two")[-2:]
    resumed, uninterrupted = weights(root / "resumed", method), weights(root / "two", method)
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key


# ----------------------------------------------------------------------------- refusals and configs (no processes)


def test_one_process_seeing_several_gpus_is_refused(tiny_model_dir, tmp_path):
    """transformers would drive them with DataParallel (the ancestors' out-of-memory on GPU 0)."""
    from glmtune.errors import ArgumentsError
    from glmtune.parsing import check_args, parse_args

    config = parse_args(
        "lora",
        [
            "--do_train",
            "--train_file",
            str(TOY_TRAIN),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path),
        ],
    )
    config.training._n_gpu = 2  # what TrainingArguments count on a machine with 2 visible GPUs and no torchrun
    with pytest.raises(ArgumentsError, match="NUM_GPUS=2"):
        check_args(config)


def test_deepspeed_without_a_gpu_is_refused(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            "lora",
            [
                "--do_train",
                "--train_file",
                str(TOY_TRAIN),
                "--model_name_or_path",
                str(tiny_model_dir),
                "--output_dir",
                str(tmp_path),
                "--deepspeed",
                str(REPO / "scripts" / "deepspeed" / "zero3.json"),
            ],
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--deepspeed" in error and ("needs CUDA GPUs" in error or "DeepSpeed, which is not installed" in error)


def test_the_process_group_is_destroyed_when_a_run_ends(tiny_model_dir, tmp_path):
    """Left to the interpreter's exit, gloo's threads can abort a torchrun worker after its last step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit):  # a refused run ends too
            main(
                "lora",
                [
                    "--do_train",
                    "--train_file",
                    str(TOY_TRAIN),
                    "--model_name_or_path",
                    str(tiny_model_dir),
                    "--output_dir",
                    str(tmp_path / "out"),
                    "--pre_seq_len",
                    "4",
                ],
            )
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("value", ["0", "two"])
def test_the_scripts_refuse_a_bad_process_count(tiny_model_dir, tmp_path, value):
    env = {**os.environ, "NUM_GPUS": value, "MODEL": str(tiny_model_dir), "OUTPUT_DIR": str(tmp_path)}
    result = subprocess.run(["bash", "lora/train.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and f"NUM_GPUS must be a positive whole number, got '{value}'" in result.stderr


@pytest.mark.parametrize(
    "name, stage, offload",
    [("zero2", 2, False), ("zero2_offload", 2, True), ("zero3", 3, False), ("zero3_offload", 3, True)],
)
def test_deepspeed_configs_leave_sizes_to_the_trainer(name, stage, offload):
    config = json.loads((REPO / "scripts" / "deepspeed" / f"{name}.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage and ("offload_optimizer" in zero) == offload
    # HF Trainer fills "auto" from the flags, so BATCH_SIZE, GRAD_ACCUM and --bf16 keep their meaning
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
    ):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    if stage == 3:  # gathered at each save: LoRA into a PEFT folder, full fine-tuning into one model folder
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
