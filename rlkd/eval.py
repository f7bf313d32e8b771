"""`python -m rlkd.eval`: evaluation and paired comparison (the work is in rlkd/tasks/eval.py),
run by rlkd.train's runner: the same console, log, errors and Ctrl-C as training."""

import sys

from rlkd.train import main

if __name__ == "__main__":
    main(sys.argv[1:], restore_output=False, default_recipe="eval_gsm8k", forced=("task=eval",))
