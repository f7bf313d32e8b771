"""`python -m rlkd.quantize`: int4 checkpoints and their evaluation (rlkd/tasks/quantize.py)."""

import sys

from rlkd.tasks.quantize import main

if __name__ == "__main__":
    main(sys.argv[1:])
