"""End-to-end distillation study: the real CLI, Ray, vLLM, DeepSpeed and torchao on the embedded
model, at the tiny scale. Rows cover every kind of stage (pruning, the gold-rationale dataset,
SFT, GRPO and MiniLLM on top of it, vLLM and transformers evaluations, 4-bit quantization); the
teacher-CoT stages are the ones tests/test_e2e_cot_sft.py runs. The report must have every
cell filled, the figures must exist, and a second invocation must skip every stage.
About 8 minutes on 2 cores (13 stages, most of it process start-up)."""

import json
import re
import subprocess
import sys

import pytest
from conftest import GSM8K_DIR, REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VARIANTS = ["no_kd", "gold", "grpo", "minillm", "teacher", "int4"]


def _study(run_dir):
    cmd = [sys.executable, "-m", "rlkd.train", "recipe=distill_gsm8k", "study.scale=tiny",
           f"data.path={GSM8K_DIR}", f"run.dir={run_dir}", f"study.variants=[{','.join(VARIANTS)}]",
           "study.rl_base=gold", "rollout.kv_cache_gb=1", "model.max_model_len=512"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("study") / "run"
    first = _study(run_dir)
    return run_dir, first, _study(run_dir)


def test_report_has_every_cell_of_every_row(study):
    run_dir, _, _ = study
    report = (run_dir / "report.md").read_text()
    table = re.search(r"## Seed 0\n\n(.*?)\n\n", report, re.S).group(1).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in table[2:]]
    assert len(header) == 14 and len(rows) == len(VARIANTS) + 1  # int4 comes with its fp32 reference
    for row in rows:
        assert len(row) == len(header) and all(row), dict(zip(header, row, strict=False))
    assert "## Not run" not in report
    for name in ("accuracy.png", "efficiency.png", "training.png"):
        assert (run_dir / name).stat().st_size > 5000
    quant = json.loads((run_dir / "seed-0" / "int4" / "model" / "quantization.json").read_text())
    assert quant["bits"] == 4 and quant["quantized_linears"] > 0


def test_second_invocation_skips_every_stage(study):
    run_dir, first, second = study
    stages = json.loads((run_dir / "stages.json").read_text())
    progress = [line for line in second.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == len(stages) and all(line.endswith("done earlier, skipped") for line in progress)
    assert "running" in first.stdout and "running" not in second.stdout
    assert all((run_dir / name / "stage.json").is_file() for name in stages)
