"""The pure modules stay pure: importing them (and everything they import) loads no Ray, vLLM
or DeepSpeed, so objectives, parsers, filters and statistics can be read, tested and reused
without the distributed stack."""

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

PURE = ["rlkd.losses", "rlkd.distill_losses", "rlkd.answer", "rlkd.filters", "rlkd.stats", "rewards",
        "rewards.gsm8k", "rewards.format"]
HEAVY = ("ray", "vllm", "deepspeed")
PROBE = ("import importlib, sys\n"
         "importlib.import_module(sys.argv[1])\n"
         "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2:]))))")


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_distributed_stack(module):
    proc = subprocess.run([sys.executable, "-c", PROBE, module, *HEAVY], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"{module} loads {proc.stdout.strip()}"


def test_the_probe_sees_a_heavy_import():
    # The same probe on a module that does import Ray must report it (or the test above could
    # never fail).
    proc = subprocess.run([sys.executable, "-c", PROBE, "rlkd.recovery", *HEAVY], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120)
    assert "ray" in proc.stdout.split(), proc.stderr[-2000:]
