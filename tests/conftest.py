"""Shared test constants. GSM8K lives in ../shared/data/gsm8k beside the checkout (as in CI)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO_ROOT.parent / "shared" / "data" / "gsm8k"
