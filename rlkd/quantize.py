"""`python -m rlkd.quantize`: int4 checkpoints and their evaluation (rlkd/tasks/quantize.py).
`--eval` runs through rlkd.train's runner: the same console, log, errors and Ctrl-C as training."""

import sys

from rlkd.train import main as run


def _evaluate(cfg, run_dir) -> None:
    from rlkd.tasks.quantize import evaluate  # torch and torchao load after the config is checked

    evaluate(cfg, run_dir)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--eval"]:
        run(sys.argv[2:], restore_output=False, default_recipe="eval_gsm8k", forced=("task=eval",), task=_evaluate)
    else:
        from rlkd.tasks.quantize import main

        main(sys.argv[1:])
