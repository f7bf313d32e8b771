"""End-to-end evaluation through the real CLI and vLLM on the embedded model."""

import json
import subprocess
import sys

import pytest
from conftest import GSM8K_DIR, REPO_ROOT

pytestmark = pytest.mark.e2e


def test_eval_cli(tmp_path):
    run_dir = tmp_path / "eval"
    cmd = [sys.executable, "-m", "rlkd.eval", "model.name=smollm2-135m-instruct",
           f"data.path={GSM8K_DIR}", "eval.num_samples=8", "eval.max_new_tokens=96",
           f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "95% CI" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_samples"] == 8
    assert 0 <= metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"] <= 1
    assert metrics["parameters"] == 134_515_008
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_gb"] > 0.5
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"gsm8k:test:{i}" for i in range(8)]
    assert {"question", "gold", "completion", "parsed", "correct"} <= rows[0].keys()
    # Comparing a run with itself: no discordant pairs, p = 1.
    cmp_dir = tmp_path / "cmp"
    preds = run_dir / "predictions.jsonl"
    proc = subprocess.run([sys.executable, "-m", "rlkd.eval", f"eval.compare=[{preds},{preds}]",
                           f"run.dir={cmp_dir}"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((cmp_dir / "comparison.json").read_text())["p_value"] == 1.0
