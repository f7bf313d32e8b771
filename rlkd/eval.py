"""`python -m rlkd.eval`: evaluation and paired comparison (the work is in rlkd/tasks/eval.py)."""

import sys

from rlkd.tasks.eval import main

if __name__ == "__main__":
    main(sys.argv[1:])
