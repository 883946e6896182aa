"""Interrupted training loses nothing: checkpoints appear complete or not at all (tmp-checkpoint-N, then one
rename), and a run SIGKILLed at random moments, resumed with --resume_from_checkpoint last each time, ends
with the same weights as an uninterrupted run (scripts/kill_resume.py runs the same with more kills)."""

import importlib.util
import os

import pytest
from conftest import REPO
from test_trainer import run, train_flags, trained_weights

_spec = importlib.util.spec_from_file_location("kill_resume", REPO / "scripts" / "kill_resume.py")
kill_resume = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_resume)

KILLS = int(os.environ.get("GLMTUNE_KILLS", "2"))  # per method; scripts/kill_resume.py --kills 10 for more


@pytest.mark.parametrize("method", ["ptuning", "lora", "finetune"])
def test_checkpoints_are_complete_and_no_temporary_folder_remains(tiny_model_dir, tmp_path, method):
    out = tmp_path / "out"
    (out / "tmp-checkpoint-99").mkdir(parents=True)  # what a run killed mid-save leaves behind
    (out / "tmp-checkpoint-99" / "partial").write_text("")
    run(
        method,
        tiny_model_dir,
        out,
        *train_flags(method, steps=6, save_steps=2),
        "--save_total_limit",
        "2",
        "--overwrite_output_dir",
    )
    assert not list(out.glob("tmp-checkpoint-*"))  # the leftover is cleared, the new ones renamed
    assert kill_resume.checkpoints(out) == [4, 6]  # rotation still keeps the newest save_total_limit
    for step in (4, 6):
        folder = out / f"checkpoint-{step}"
        assert kill_resume.CHECKPOINT_FILES <= {p.name for p in folder.iterdir()}
        assert trained_weights(folder, method)


def test_a_killed_save_is_not_resumed_from(tiny_model_dir, tmp_path):
    """A partial checkpoint under its temporary name: --resume_from_checkpoint last takes the complete one."""
    from glmtune.parsing import parse_args
    from glmtune.runs import resume_checkpoint

    out = tmp_path / "out"
    run("ptuning", tiny_model_dir, out, *train_flags("ptuning", steps=2, save_steps=2))
    (out / "tmp-checkpoint-4" / "checkpoint-4").mkdir(parents=True)
    common = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--max_source_length", "32",
              "--max_target_length", "16", "--per_device_train_batch_size", "4"]  # fmt: skip
    config = parse_args("ptuning", [*common, *train_flags("ptuning", steps=4, save_steps=2),
                                    "--resume_from_checkpoint", "last"])  # fmt: skip
    assert resume_checkpoint(config) == str(out / "checkpoint-2")


@pytest.mark.parametrize("method", ["ptuning", "lora", "finetune"])
def test_sigkilled_runs_resume_to_the_uninterrupted_weights(tiny_model_dir, tmp_path, method, kills=KILLS):
    result = kill_resume.trial(method, tiny_model_dir, tmp_path, kills=kills, seed=7)
    assert result["kills"] == kills and result["kills_during_save"] >= 1, result
    assert max(result["resumed_from"]) > 0, result  # some restart did resume from a checkpoint
    # check_output (inside trial) asserted: global_step 12, steps 1..12 logged, no tmp folder, complete checkpoints.
    # On CPU every op here is deterministic and the resumed run restores model, optimizer, scheduler, RNG and
    # data order, so the weights are bitwise those of the uninterrupted run.
    assert result["equal"] and result["max_abs_diff"] == 0.0, result
