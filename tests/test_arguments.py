"""Tests for glmtune.parsing (argv / dict / .json -> RunConfig, refused combinations) and the CLI's exit path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TOY_DEV, TOY_TRAIN, write_jsonl

from glmtune.errors import ArgumentsError
from glmtune.parsing import RunConfig, parse_args


def _argv(model_dir, output_dir, *extra, train=True, pre_seq_len=None):
    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir)]
    if train:
        argv += ["--do_train", "--train_file", str(TOY_TRAIN)]
    if pre_seq_len is not None:
        argv += ["--pre_seq_len", str(pre_seq_len)]
    return argv + [str(x) for x in extra]


def _problems(method, argv) -> list:
    with pytest.raises(ArgumentsError) as info:
        parse_args(method, argv)
    problems = info.value.problems
    assert str(info.value) == "\n".join(problems)
    return problems


def _names(problems, *needles):
    """Every needle appears in some problem."""
    return all(any(needle in problem for problem in problems) for needle in needles)


# ----------------------------------------------------------------------------- refused combinations


@pytest.mark.parametrize(
    "method, extra, pre_seq_len, needles",
    [
        ("lora", ["--pre_seq_len", 8], None, ["--pre_seq_len", "P-Tuning v2"]),
        ("lora", ["--prefix_projection"], None, ["--prefix_projection", "P-Tuning v2"]),
        ("ptuning", ["--lora_rank", 4], 4, ["--lora_rank", "LoRA"]),
        ("ptuning", [], None, ["--pre_seq_len is required"]),
        ("lora", ["--quantization_bit", 3], None, ["--quantization_bit must be 4 or 8, got 3"]),
        ("lora", ["--max_source_length", 0], None, ["--max_source_length must be a positive integer, got 0"]),
        ("ptuning", ["--max_source_length", -1], 4, ["--max_source_length must be a positive integer, got -1"]),
        ("lora", ["--prompt_template", "bogus"], None, ["--prompt_template", "bogus"]),
        (
            "lora",
            ["--prompt_template", "raw", "--history_column", "history"],
            None,
            ["--prompt_template raw", "--history_column"],
        ),
        ("lora", ["--test_file", TOY_DEV], None, ["--test_file", "--do_predict"]),
        (
            "lora",
            ["--data_format", "sharegpt"],
            None,
            ["--data_format must be one of auto, prompt_response, alpaca, conversations, messages, got 'sharegpt'"],
        ),
        ("lora", ["--data_format", "alpaca", "--history_column", "h"], None, ["--history_column", "fixed fields"]),
        ("lora", ["--keep_columns", "sample_id"], None, ["--keep_columns", "add --do_predict"]),
    ],
    ids=[
        "pre_seq_len-lora",
        "prefix_projection-lora",
        "lora_rank-ptuning",
        "ptuning-no-pre_seq_len",
        "quantization-3",
        "max_source_length-0",
        "max_source_length-minus-1",
        "bogus-template",
        "raw-with-history",
        "test_file-without-do_predict",
        "unknown-data_format",
        "column-flag-with-alpaca",
        "keep_columns-without-do_predict",
    ],
)
def test_refused(tiny_model_dir, tmp_path, method, extra, pre_seq_len, needles):
    problems = _problems(method, _argv(tiny_model_dir, tmp_path / "out", *extra, pre_seq_len=pre_seq_len))
    assert len(problems) == 1, problems  # only the problem at hand
    assert _names(problems, *needles), problems


@pytest.mark.parametrize(
    "keep, needle",
    [
        (
            "sample_id,labels",
            "--keep_columns labels: generated_predictions.txt already has fields of that name (labels, predict)",
        ),
        ("sample_id,,task_type", "--keep_columns 'sample_id,,task_type': a field name is empty"),
    ],
)
def test_keep_columns_must_name_fields_of_the_test_file(tiny_model_dir, tmp_path, keep, needle):
    extra = ["--do_predict", "--test_file", TOY_DEV, "--keep_columns", keep]
    problems = _problems("lora", _argv(tiny_model_dir, tmp_path / "out", *extra, train=False))
    assert problems == [needle]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_4bit_quantization_needs_cuda(tiny_model_dir, tmp_path):
    problems = _problems("lora", _argv(tiny_model_dir, tmp_path / "out", "--quantization_bit", 4))
    assert len(problems) == 1
    assert "--quantization_bit 4 needs a CUDA GPU" in problems[0]


def test_do_train_without_train_file(tiny_model_dir, tmp_path):
    problems = _problems("lora", _argv(tiny_model_dir, tmp_path / "out", "--do_train", train=False))
    assert problems == ["--do_train needs --train_file"]


def test_no_task_flag(tiny_model_dir, tmp_path):
    problems = _problems("lora", _argv(tiny_model_dir, tmp_path / "out", "--validation_file", TOY_DEV, train=False))
    assert len(problems) == 1
    assert "nothing to do" in problems[0] and "--do_train" in problems[0]


def test_missing_train_file(tiny_model_dir, tmp_path):
    missing = tmp_path / "nope.json"
    problems = _problems("lora", _argv(tiny_model_dir, tmp_path / "out", "--train_file", missing))
    assert problems == [f"--train_file {missing}: no such file"]


def test_directory_as_train_file(tiny_model_dir, tmp_path):
    folder = tmp_path / "data.json"
    folder.mkdir()
    problems = _problems("lora", _argv(tiny_model_dir, tmp_path / "out", "--train_file", folder))
    assert len(problems) == 1
    assert problems[0].startswith(f"--train_file {folder}: is a folder")


def test_txt_train_file(tiny_model_dir, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text('{"content": "a", "summary": "b"}\n', encoding="utf-8")
    problems = _problems("lora", _argv(tiny_model_dir, tmp_path / "out", "--train_file", text))
    assert len(problems) == 1
    assert problems[0].startswith(f"--train_file {text}: expected a .json, .jsonl, .csv or .tsv file")


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-model"
    problems = _problems("lora", _argv(missing, tmp_path / "out"))
    assert len(problems) == 1
    assert problems[0].startswith(f"--model_name_or_path {missing}: no such folder")


def test_folder_without_config_json(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    problems = _problems("lora", _argv(folder, tmp_path / "out"))
    assert len(problems) == 1
    assert problems[0].startswith(f"--model_name_or_path {folder}: not a model folder")
    assert "config.json" in problems[0]


def test_output_dir_with_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    problems = _problems("lora", _argv(tiny_model_dir, out))
    assert len(problems) == 1
    assert _names(problems, f"--output_dir {out}", "--overwrite_output_dir", "--resume_from_checkpoint")
    # accepted with --overwrite_output_dir, or when not training
    assert parse_args("lora", _argv(tiny_model_dir, out, "--overwrite_output_dir")).run.overwrite_output_dir
    parse_args("lora", _argv(tiny_model_dir, out, "--do_eval", "--validation_file", TOY_DEV, train=False))


def test_several_problems_reported_together(tmp_path):
    argv = [
        "--model_name_or_path",
        str(tmp_path / "no-model"),
        "--output_dir",
        str(tmp_path / "out"),
        "--do_train",
        "--train_file",
        str(tmp_path / "missing.json"),
        "--test_file",
        str(TOY_DEV),
        "--pre_seq_len",
        "8",
        "--quantization_bit",
        "3",
        "--max_source_length",
        "0",
        "--prompt_template",
        "bogus",
    ]
    problems = _problems("lora", argv)
    assert len(problems) >= 3
    assert _names(
        problems,
        "--pre_seq_len",
        "--quantization_bit",
        "--max_source_length",
        "--prompt_template",
        "--train_file",
        "--model_name_or_path",
        "--test_file",
    )
    assert len(problems) == 7


def test_unknown_method_and_unknown_dict_key(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        parse_args("full", _argv(tiny_model_dir, tmp_path / "out"))
    with pytest.raises(ArgumentsError, match="bogus_key"):
        parse_args("lora", {"model_name_or_path": str(tiny_model_dir), "do_train": True, "bogus_key": 1})


# ----------------------------------------------------------------------------- accepted


def test_valid_ptuning(tiny_model_dir, tmp_path):
    config = parse_args(
        "ptuning",
        _argv(
            tiny_model_dir,
            tmp_path / "out",
            "--do_eval",
            "--validation_file",
            TOY_DEV,
            "--max_target_length",
            48,
            pre_seq_len=4,
        ),
    )
    assert isinstance(config, RunConfig)
    assert config.method == "ptuning"
    assert config.ptuning.pre_seq_len == 4
    assert config.data.max_target_length == 48
    assert config.data.val_max_target_length == 48  # defaulted to max_target_length
    assert config.lora.lora_rank is None and config.lora.lora_target is None  # LoRA defaults only for lora
    assert config.training.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert config.training.do_train and config.training.do_eval
    assert config.training.predict_with_generate is False
    assert config.training.output_dir == str(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # parsing writes nothing


def test_valid_lora_fills_defaults(tiny_model_dir, tmp_path):
    config = parse_args("lora", _argv(tiny_model_dir, tmp_path / "out"))
    assert config.method == "lora"
    assert (config.lora.lora_rank, config.lora.lora_alpha, config.lora.lora_dropout, config.lora.lora_target) == (
        8,
        32,
        0.1,
        "all",
    )
    assert config.data.val_max_target_length == config.data.max_target_length == 128
    assert config.training.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert config.ptuning.pre_seq_len is None


@pytest.mark.parametrize(
    "extra, compiled",
    [
        ([], True),
        (["--quantization_bit", 4], True),  # measured on an H200: nf4 LoRA 1.46x, P-Tuning v2 1.27x (run 22)
        (["--quantization_bit", 8], True),
        (["--quantization_bit", 4, "--use_dora", "True"], False),  # graph breaks in PEFT's DoRA on bitsandbytes
        (["--use_dora", "True"], True),
        (["--lora_variant", "adalora", "--max_steps", 10], False),  # its layers keep PEFT's forward
        (["--compile_layers", "False"], False),
    ],
)
def test_training_on_a_gpu_compiles_the_layers_by_default(tiny_model_dir, tmp_path, monkeypatch, extra, compiled):
    """The default as a GPU machine sees it (the device probe answers yes; nothing is loaded)."""
    import glmtune.parsing

    monkeypatch.setattr(glmtune.parsing, "_cuda_available", lambda: True)
    config = parse_args("lora", _argv(tiny_model_dir, tmp_path / "out", *extra))
    assert config.run.compile_layers is compiled


def test_explicit_values_are_kept(tiny_model_dir, tmp_path):
    config = parse_args(
        "lora",
        _argv(
            tiny_model_dir,
            tmp_path / "out",
            "--lora_rank",
            4,
            "--lora_target",
            "q_proj,v_proj",
            "--max_target_length",
            64,
            "--val_max_target_length",
            16,
        ),
    )
    assert config.lora.lora_rank == 4 and config.lora.lora_target == "q_proj,v_proj"
    assert config.lora.lora_alpha == 32 and config.lora.lora_dropout == 0.1
    assert config.data.val_max_target_length == 16


def test_do_predict_forces_predict_with_generate(tiny_model_dir, tmp_path):
    config = parse_args(
        "lora", _argv(tiny_model_dir, tmp_path / "out", "--do_predict", "--test_file", TOY_DEV, train=False)
    )
    assert config.training.do_predict and config.training.predict_with_generate is True


def _as_dict(model_dir, out):
    return {
        "model_name_or_path": str(model_dir),
        "output_dir": str(out),
        "do_train": True,
        "train_file": str(TOY_TRAIN),
        "pre_seq_len": 4,
        "max_source_length": 32,
        "max_target_length": 24,
    }


def test_parse_from_dict(tiny_model_dir, tmp_path):
    config = parse_args("ptuning", _as_dict(tiny_model_dir, tmp_path / "out"))
    assert config.ptuning.pre_seq_len == 4
    assert config.data.max_source_length == 32
    assert config.data.val_max_target_length == 24
    assert config.training.do_train and config.training.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_parse_from_json_file(tiny_model_dir, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_as_dict(tiny_model_dir, tmp_path / "out")), encoding="utf-8")
    config = parse_args("ptuning", [str(path)])
    assert config.ptuning.pre_seq_len == 4
    assert config.data.train_file == str(TOY_TRAIN)
    assert config.data.val_max_target_length == 24


def test_json_file_is_checked_too(tiny_model_dir, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**_as_dict(tiny_model_dir, tmp_path / "out"), "lora_rank": 8}), encoding="utf-8")
    problems = _problems("ptuning", [str(path)])
    assert len(problems) == 1 and "--lora_rank" in problems[0]


def test_missing_json_config_is_an_arguments_error(tmp_path):
    with pytest.raises(ArgumentsError):
        parse_args("lora", [str(tmp_path / "missing-config.json")])


def test_quoted_number_in_json_config_is_an_arguments_error(tiny_model_dir, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps({**_as_dict(tiny_model_dir, tmp_path / "out"), "max_source_length": "64"}), encoding="utf-8"
    )
    with pytest.raises(ArgumentsError):
        parse_args("ptuning", [str(path)])


# ----------------------------------------------------------------------------- CLI


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def cli_runs(tiny_model_dir, tmp_path_factory):
    """Both CLI runs, started together (each spends ~10 s importing torch/transformers)."""
    tmp = tmp_path_factory.mktemp("cli")
    bad = write_jsonl(tmp / "bad.jsonl", [{"content": "类型#裤", "summary": "裤子。"}, '{"content": "x",'])
    common = ["--model_name_or_path", tiny_model_dir, "--max_steps", 1, "--report_to", "none"]
    runs = {
        "bad_data": (
            "ptuning/main.py",
            ["--do_train", "--train_file", bad, "--pre_seq_len", 4, "--output_dir", tmp / "out-ptuning", *common],
        ),
        "lora_pre_seq_len": (
            "lora/main.py",
            ["--pre_seq_len", 8, "--do_train", "--train_file", TOY_TRAIN, "--output_dir", tmp / "out-lora", *common],
        ),
    }
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(tmp / "hf-cache"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, script, *map(str, argv)],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (script, argv) in runs.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=180)
        results[name] = (process.returncode, stderr)
    return {"tmp": tmp, "bad": bad, **results}


def test_cli_bad_data_exits_2_with_one_clear_line(cli_runs):
    returncode, stderr = cli_runs["bad_data"]
    assert returncode == 2, stderr[-3000:]
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert str(cli_runs["bad"]) in errors[0] and ":2:" in errors[0]
    assert "Traceback" not in stderr
    assert not (cli_runs["tmp"] / "out-ptuning").exists()


def test_cli_refused_flag_exits_2(cli_runs):
    returncode, stderr = cli_runs["lora_pre_seq_len"]
    assert returncode == 2, stderr[-3000:]
    errors = _error_lines(stderr)
    assert len(errors) == 1 and "--pre_seq_len" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (cli_runs["tmp"] / "out-lora").exists()
