"""Entry point: `python -m rlkd.train recipe=NAME [key=value ...]` (`--help` lists every key)."""

import sys

from rlkd import eval as evaluation
from rlkd import grpo
from rlkd.config import Task, from_cli
from rlkd.tracking import make_run_dir

TASKS = {Task.grpo: grpo.train, Task.eval: evaluation.evaluate}


def main(argv: list[str]) -> None:
    cfg, recipe = from_cli(argv, default_recipe=None)
    run_dir = make_run_dir(cfg, recipe)
    print(f"rlkd: {cfg.task.value} run in {run_dir}")
    TASKS[cfg.task](cfg, run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
