"""A run never continues, reports on or overwrites another run's results (glmtune.runs)."""

import json

import pytest
import torch
from conftest import TOY_TRAIN
from test_trainer import METHOD_FLAGS, run, train_flags, trained_weights


def files(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def exits(code, capsys, *args):
    with pytest.raises(SystemExit) as info:
        run(*args)
    assert info.value.code == code
    return capsys.readouterr().err


def test_a_new_run_moves_the_previous_runs_files_aside(tiny_model_dir, tmp_path):
    """train.sh passes --overwrite_output_dir: the first run's checkpoints no longer sit beside the second run's,
    so --resume_from_checkpoint last continues the second run, not the first."""
    out = tmp_path / "out"
    run("lora", tiny_model_dir, out, *train_flags("lora", steps=6, save_steps=3))
    first = trained_weights(out, "lora")
    run("lora", tiny_model_dir, out, *train_flags("lora", steps=2, save_steps=2), "--overwrite_output_dir",
        "--learning_rate", "2e-2")  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    (aside,) = tmp_path.glob("out.previous-*")
    assert sorted(p.name for p in aside.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    torch.testing.assert_close(trained_weights(aside, "lora"), first, atol=0, rtol=0)
    # the second run continued to 4 steps, from its own checkpoint-2
    run("lora", tiny_model_dir, out, *train_flags("lora", steps=4, save_steps=2), "--learning_rate", "2e-2",
        "--resume_from_checkpoint", "last")  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "change, difference",
    [
        (["--per_device_train_batch_size", "2"], "effective_batch 4 there, 2 here"),
        (["--lora_rank", "8"], '"lora_rank": 4'),
    ],
)
def test_resuming_another_runs_checkpoint_is_refused(tiny_model_dir, tmp_path, capsys, change, difference):
    out = tmp_path / "out"
    run("lora", tiny_model_dir, out, *train_flags("lora", steps=2, save_steps=2))
    before = files(out)
    err = exits(2, capsys, "lora", tiny_model_dir, out, *train_flags("lora", steps=4, save_steps=2), *change,
                "--resume_from_checkpoint", "last")  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "belongs to another run" in errors[0] and difference in errors[0], err
    assert files(out) == before


def test_resuming_with_the_other_method_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run("lora", tiny_model_dir, out, *train_flags("lora", steps=2, save_steps=2))
    before = files(out)
    err = exits(2, capsys, "ptuning", tiny_model_dir, out, *train_flags("ptuning", steps=4, save_steps=2),
                "--resume_from_checkpoint", str(out / "checkpoint-2"))  # fmt: skip
    assert "method lora there, ptuning here" in err and "Traceback" not in err
    assert files(out) == before


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny_model_dir, tmp_path, capsys, method):
    out = tmp_path / "out"
    run(method, tiny_model_dir, out, *train_flags(method, steps=4, save_steps=2))
    before = files(out)
    err = exits(0, capsys, method, tiny_model_dir, out, *train_flags(method, steps=4, save_steps=2),
                "--resume_from_checkpoint", "last")  # fmt: skip
    assert "already finished (global step 4 of --max_steps 4): nothing to do" in err
    assert files(out) == before


def test_a_new_run_without_overwrite_refuses_a_folder_holding_results(tiny_model_dir, tmp_path, capsys):
    """Not only checkpoints: the final weights and results of a run saved without step checkpoints."""
    out = tmp_path / "out"
    run("lora", tiny_model_dir, out, "--do_train", "--train_file", str(TOY_TRAIN), "--max_steps", "1",
        "--save_strategy", "no", *METHOD_FLAGS["lora"])  # fmt: skip
    assert not list(out.glob("checkpoint-*"))
    before = files(out)
    err = exits(2, capsys, "lora", tiny_model_dir, out, *train_flags("lora", steps=1))
    assert "holds another run's files" in err and files(out) == before
