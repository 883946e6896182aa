"""Entry point shared by ptuning/main.py and lora/main.py: parse, run, and turn known problems into
one clear ``error:`` line per problem and exit status 2 (no traceback)."""

import logging
import sys

from glmtune.errors import GlmtuneError, exit_with


def main(method: str, argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from glmtune.parsing import parse_args  # imported here so that --help stays fast
    from glmtune.report import quiet_progress_bars
    from glmtune.runs import RunFinished
    from glmtune.workflow import run

    try:
        config = parse_args(method, argv)
        if quiet_progress_bars():
            config.training.disable_tqdm = True  # Trainer then prints each step's log line instead of a bar
        return run(config)
    except RunFinished as finished:  # not an error: the run asked for is complete
        print(f"glmtune: {finished}", file=sys.stderr)
        sys.exit(0)
    except GlmtuneError as error:
        exit_with(error)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group of a torchrun run while the interpreter is fully alive: left to the exit,
    gloo's worker threads can abort the process (SIGABRT, "terminate called without an active exception";
    seen once in CI after the last step of a 2-process run; cf. pytorch/pytorch#179291)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
