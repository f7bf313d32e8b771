"""rlkd.tasks.study without running a model: its config, the stages it plans, the arguments it gives
each CLI (composed through the real config loader), skipping finished stages, rerunning killed
ones, and the report it writes, all with a fake executor that plays every stage's CLI."""

import json
import math
import random
import re
from pathlib import Path

import pytest

from rlkd.compose import changes, hydra_value, load_config, parse_argv
from rlkd.config_distill import SCALES, StudyScale, sizes
from rlkd.config_distill import StudyVariant as V
from rlkd.errors import ConfigError, RunStopped
from rlkd.filters import apply_filters, report_markdown
from rlkd.stats import wilson_interval
from rlkd.tasks import study
from rlkd.tasks.study import (
    Study,
    confidence_threshold,
    inherited,
    run_subprocess,
    validate,
)


def study_cfg(*overrides: str):
    return load_config("distill_gsm8k", ["study.scale=tiny", "data.path=/data/gsm8k", *overrides])


def stage_config(args: list[str]):
    """The config a stage's rlkd.train / rlkd.eval / rlkd.quantize --eval arguments compose to."""
    if not any(a.startswith("recipe=") for a in args):
        return load_config("eval_gsm8k", ["task=eval", *(a for a in args if a != "--eval")])
    recipe, overrides = parse_argv(args)
    return load_config(recipe, overrides)


class FakeStages:
    """Plays each CLI: writes the outputs the real one would, just enough for the next stage and
    the report. `teacher_right` is the share of plain CoT samples with a correct answer."""

    def __init__(self, tmp: Path, teacher_right: float = 0.5, fail: str = ""):
        self.tmp, self.teacher_right, self.fail = tmp, teacher_right, fail
        self.calls: list[tuple[str, list[str]]] = []
        self.configs = {}

    def __call__(self, argv: list[str], log: Path, tick) -> int:
        module, args = argv[2], argv[3:]
        tick()  # the study bar's redraw, as run_subprocess calls it while a stage runs
        self.calls.append((log.parent.name, args))
        log.write_text("fake stage\n")
        if self.fail and self.fail in str(log.parent):
            return 1
        if module == "rlkd.prune":
            self.model_dir(Path(args[1]), 40)
        elif module == "rlkd.quantize" and args[0] != "--eval":
            self.model_dir(Path(args[1]), 8, "model.pt")
        else:
            cfg = stage_config(args)
            self.configs[str(log.parent).split("/study/", 1)[1]] = cfg
            getattr(self, cfg.task.value)(cfg, Path(cfg.run.dir))
        return 0

    def model_dir(self, path: Path, mb: int, weights: str = "model.safetensors") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        with (path / weights).open("wb") as f:
            f.truncate(mb << 20)  # sparse: the size the report reads, without writing it
        return path

    def cot(self, cfg, run: Path) -> None:
        c = cfg.cot
        if c.samples:
            samples = [json.loads(x) for x in (Path(c.samples) / "samples.jsonl").read_text().splitlines()]
        else:
            rng = random.Random(cfg.run.seed)
            samples = []
            for q in range(c.num_questions):
                for t in [None] if c.prompt_mode.value == "gold" else c.temperatures:
                    right = c.prompt_mode.value != "plain" or rng.random() < self.teacher_right
                    samples.append({
                        "id": f"gsm8k:train:{q}", "question": f"What is {q} + 2?", "gold": str(q + 2),
                        "text": f"{q} + 2 = {q + 2}\n#### {q + 2 if right else q}", "num_tokens": 10 + q,
                        "gold_tokens": 12, "mean_logprob": -rng.random() if t is not None else math.nan,
                        "min_logprob": -2.0, "temperature": t, "prompt_mode": c.prompt_mode.value,
                        "sample_index": 0, "truncated": False, "teacher": cfg.model.name, "seed": cfg.run.seed})
        kept, report = apply_filters(samples, cfg.filter)
        (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        (run / "kept.jsonl").write_text("".join(json.dumps(s) + "\n" for s in kept))
        (run / "filter_report.json").write_text(json.dumps(report))
        (run / "filter_report.md").write_text(report_markdown(report, cfg.filter))

    def sft(self, cfg, run: Path) -> None:
        self._train(run, cfg.trainer.max_steps, "train/loss")

    def grpo(self, cfg, run: Path) -> None:
        self._train(run, cfg.trainer.max_steps, "reward/total_mean")

    def distill(self, cfg, run: Path) -> None:
        self._train(run, cfg.trainer.max_steps, "train/single_step_kl")

    def _train(self, run: Path, steps: int, key: str) -> None:
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, key: 1.0 / s}) + "\n"
                                                   for s in range(1, steps + 1)))
        self.model_dir(run / f"checkpoint-{steps}", 40)

    def eval(self, cfg, run: Path) -> None:
        model = Path(cfg.model.name)
        if not model.is_dir():  # the teacher, by its embedded name
            model = self.model_dir(self.tmp / "teacher-model", 60)
        rng = random.Random(cfg.model.name)
        preds = []
        for i in range(cfg.eval.num_samples):
            right = rng.random() < 0.4
            preds.append({"id": f"gsm8k:test:{i}", "gold": "7", "correct": right, "num_tokens": 20,
                          "completion": f"3 + 4 = {7 if rng.random() < 0.8 else 8}\n#### {7 if right else 1}"})
        (run / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        k, n = sum(p["correct"] for p in preds), len(preds)
        lo, hi = wilson_interval(k, n)
        (run / "metrics.json").write_text(json.dumps({
            "model": str(model), "accuracy": k / n, "accuracy_ci_low": lo, "accuracy_ci_high": hi,
            "num_samples": n, "num_correct": k, "mean_completion_tokens": 20.0 + rng.random(),
            "tokens_per_s": 100.0, "latency_per_sample_s": 0.5, "peak_memory_gb": 1.5, "parameters": 80e6}))


def cells(report: str) -> list[list[str]]:
    """Cells of every model row of the report's per-seed tables."""
    rows = []
    for block in re.findall(r"## Seed \d+\n\n(.*?)\n\n", report, re.S):
        for line in block.splitlines()[2:]:
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


# --- config -------------------------------------------------------------------------------------


def test_recipe_is_the_whole_study_at_the_default_scale():
    cfg = load_config("distill_gsm8k")
    assert cfg.task.value == "study" and cfg.study.scale == StudyScale.default
    assert set(cfg.study.variants) == set(V)


def test_unknown_variant_is_a_one_line_error_naming_it():
    with pytest.raises(ConfigError) as info:
        load_config("distill_gsm8k", ["study.variants=[no_kd,cot_filtered]"])
    message = str(info.value)
    assert "\n" not in message and "'cot_filtered'" in message and "cot_correct" in message


@pytest.mark.parametrize("overrides, expected", [
    (["study.variants=[no_kd,no_kd]"], "must name each variant once"),
    (["study.seeds=[]"], "study.seeds=[]"),
    (["study.variants=[no_kd,grpo]", "study.rl_base=cot_correct"], "study.rl_base=cot_correct is not in study.variants"),
    (["study.rl_base=teacher"], "study.rl_base=teacher"),
    (["study.confidence_quantile=1.0"], "study.confidence_quantile=1.0"),
    (["study.quant_group_size=48"], "study.quant_group_size=48"),
    (["study.sft_steps=-1"], "study.sft_steps=-1"),
])
def test_study_errors_are_one_line_and_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate(study_cfg(*overrides))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_explicit_counts_override_the_scale():
    z = sizes(study_cfg("study.eval_questions=30", "study.sft_steps=7").study)
    assert (z.eval_questions, z.sft_steps) == (30, 7)
    assert z.cot_questions == SCALES[StudyScale.tiny].cot_questions


@pytest.mark.parametrize("text", ["/tmp/a b/ckpt-1", "it's", "c:\\x\\", "back\\slash", "", "a=b,c"])
def test_hydra_value_round_trips_strings(text):
    assert load_config(None, [f"model.name={hydra_value(text)}"]).model.name == text


def test_stages_inherit_what_the_study_config_changed():
    cfg = study_cfg("rollout.kv_cache_gb=1", "model.max_model_len=512", "model.name=other", "learner.lr=1e-4")
    args = inherited(changes(cfg), "sft")
    assert "rollout.kv_cache_gb=1" in args and "model.max_model_len=512" in args
    assert "data.path='/data/gsm8k'" in args and "learner.lr=0.0001" in args
    assert not any(a.startswith("model.name=") for a in args)
    assert not any(a.startswith("learner.") for a in inherited(changes(cfg), "eval"))


def test_confidence_threshold_is_a_quantile_of_the_teachers_confidence(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"mean_logprob": -i / 10}) + "\n" for i in range(1, 11))
                    + json.dumps({"mean_logprob": None}) + "\n")
    assert confidence_threshold(path, 0.5) == pytest.approx(-0.55, abs=0.01)
    assert confidence_threshold(path, 0.9) > confidence_threshold(path, 0.1)


# --- the plan -----------------------------------------------------------------------------------


def test_plan_of_a_small_selection(tmp_path):
    names = [s.name for s in Study(study_cfg("study.variants=[no_kd,teacher]"), tmp_path).plan()]
    assert names == ["student", "eval-teacher", "eval-no_kd"]
    given = Study(study_cfg("study.variants=[no_kd]", "study.student=/ckpt"), tmp_path).plan()
    assert [s.name for s in given] == ["eval-no_kd"]


def test_plan_runs_seed_free_stages_once(tmp_path):
    stages = Study(study_cfg("study.seeds=[0,1]"), tmp_path).plan()
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    for shared in ("student", "cot-gold", "eval-teacher", "eval-no_kd"):
        assert shared in names
    per_seed = [n for n in names if n.startswith("seed-0/")]
    assert [n.replace("seed-0/", "seed-1/") for n in per_seed] == [n for n in names if n.startswith("seed-1/")]
    assert {f"seed-0/eval-{v.value}" for v in V if v not in (V.teacher, V.no_kd, V.int4)} <= set(names)


# --- running it ---------------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path):
    """A whole tiny study played by FakeStages."""
    fake = FakeStages(tmp_path)
    root = tmp_path / "study"
    Study(study_cfg("rollout.kv_cache_gb=1", "study.seeds=[3]"), root, fake).run()
    return root, fake


def test_every_stage_gets_a_valid_command_with_its_sizes(finished):
    root, fake = finished
    z, cfgs = SCALES[StudyScale.tiny], fake.configs
    assert cfgs["seed-3/cot-plain"].cot.temperatures == list(z.temperatures)
    assert cfgs["seed-3/cot-plain"].run.seed == 3 and cfgs["seed-3/cot-plain"].rollout.kv_cache_gb == 1
    assert cfgs["seed-3/data-cot_unfiltered"].filter.correct is False
    confident = cfgs["seed-3/data-cot_confident"].filter
    assert confident.correct is False and -1 < confident.min_mean_logprob < 0
    for v in ("answer_only", "cot_correct", "gold"):
        sft = cfgs[f"seed-3/sft-{v}"]
        assert sft.trainer.max_steps == z.sft_steps and sft.model.name == str(root / "student" / "model")
        assert sft.sft.batch_size <= z.sft_batch and sft.learner.lr == 3e-5
    assert cfgs["seed-3/sft-answer_only"].sft.target.value == "answer_only"
    base = cfgs["seed-3/sft-gold"]
    assert cfgs["seed-3/grpo"].model.name == str(root / "seed-3" / "sft-gold" / f"checkpoint-{base.trainer.max_steps}")
    minillm = cfgs["seed-3/minillm"]
    assert minillm.task.value == "distill" and minillm.student.init.value == "model"
    assert minillm.distill.teachers == ["smollm2-135m-instruct"]
    assert cfgs["seed-3/eval-int4"].model.name == str(root / "seed-3" / "int4" / "model")
    assert cfgs["seed-3/eval-int4_ref"].model.name == str(root / "seed-3" / "minillm" / f"checkpoint-{z.rl_steps}")
    assert cfgs["eval-teacher"].eval.num_samples == z.eval_questions
    assert cfgs["eval-teacher"].data.split == "test"


def test_report_has_every_column_of_every_row_and_the_figures(finished):
    root, _ = finished
    report = (root / "report.md").read_text()
    rows = cells(report)
    assert len(rows) == 12  # 11 variants, int4 with its fp32 reference
    for row in rows:
        assert len(row) == 14 and all(row), row
    int4, ref = rows[-1], rows[-2]
    assert "int4" in int4[0] and int4[6] == "8.0" and ref[6] == "40.0"  # disk (MB)
    for name in ("accuracy.png", "efficiency.png", "training.png"):
        assert (root / name).stat().st_size > 5000
    assert "## Training data" in report and "#### cot-plain" in report and "#### cot-gold" in report
    states = json.loads((root / "stages.json").read_text())
    assert {s["status"] for s in states.values()} == {"done"}
    assert all(s["seed"] == 3 for name, s in states.items() if name.startswith("seed-3/"))


def test_a_second_run_skips_every_stage(finished, capsys):
    root, fake = finished
    calls = len(fake.calls)
    Study(study_cfg("rollout.kv_cache_gb=1", "study.seeds=[3]"), root, fake).run()
    assert len(fake.calls) == calls
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert lines and all(x.endswith("done earlier, skipped") for x in lines)
    log = [json.loads(x) for x in (root / "study.jsonl").read_text().splitlines()]
    assert [e["status"] for e in log[-len(lines):]] == ["skipped"] * len(lines)


def test_a_changed_setting_stops_the_rerun_naming_the_stage_and_the_value(finished):
    root, fake = finished
    calls = len(fake.calls)
    with pytest.raises(RunStopped, match=r"stage eval-teacher in .* ran with eval.num_samples=12, this study "
                                         r"would run it with eval.num_samples=5: .*delete .*eval-teacher"):
        Study(study_cfg("rollout.kv_cache_gb=1", "study.seeds=[3]", "study.eval_questions=5"), root, fake).run()
    assert len(fake.calls) == calls
    assert (root / "eval-teacher" / "stage.json").is_file()


def test_a_moved_study_resumes_without_rerunning(finished):
    root, fake = finished
    moved = root.rename(root.with_name("moved"))
    calls = len(fake.calls)
    Study(study_cfg("rollout.kv_cache_gb=1", "study.seeds=[3]"), moved, fake).run()
    assert len(fake.calls) == calls


def test_a_killed_stage_is_rerun_from_scratch_and_nothing_else(finished):
    root, fake = finished
    (root / "seed-3" / "sft-gold" / "stage.json").unlink()  # killed before its marker
    (root / "seed-3" / "sft-gold" / "half-written").write_text("x")
    calls = len(fake.calls)
    Study(study_cfg("rollout.kv_cache_gb=1", "study.seeds=[3]"), root, fake).run()
    assert [name for name, _ in fake.calls[calls:]] == ["sft-gold"]
    assert not (root / "seed-3" / "sft-gold" / "half-written").exists()


def test_a_failed_stage_stops_the_study_and_the_rerun_continues(tmp_path):
    root = tmp_path / "study"
    cfg = study_cfg("study.variants=[no_kd,gold,teacher]", "study.rl_base=gold")
    with pytest.raises(RunStopped, match=r"stage seed-0/sft-gold failed \(exit 1\).*run\.dir="):
        Study(cfg, root, FakeStages(tmp_path, fail="sft-gold")).run()
    assert not (root / "seed-0" / "sft-gold" / "stage.json").exists()
    fake = FakeStages(tmp_path)
    Study(cfg, root, fake).run()
    assert [name for name, _ in fake.calls] == ["sft-gold", "eval-gold"]


def test_a_dataset_the_filters_empty_is_reported_not_trained(tmp_path):
    root = tmp_path / "study"
    fake = FakeStages(tmp_path, teacher_right=0.0)
    Study(study_cfg("study.variants=[no_kd,cot_correct,cot_unfiltered,teacher]", "study.rl_base=no_kd"),
          root, fake).run()
    assert "sft-cot_correct" not in [name for name, _ in fake.calls]
    report = (root / "report.md").read_text()
    assert "## Not run" in report and "seed-0/sft-cot_correct: the filters of seed-0/cot-plain kept 0" in report
    assert "seed-0/eval-cot_correct: seed-0/sft-cot_correct made no checkpoint" in report
    rows = cells(report)
    assert len(rows) == 3 and all(all(row) for row in rows)


def test_several_seeds_get_a_table_each_and_a_summary(tmp_path):
    root = tmp_path / "study"
    Study(study_cfg("study.variants=[no_kd,gold]", "study.rl_base=gold", "study.seeds=[0,1]"), root,
          FakeStages(tmp_path)).run()
    report = (root / "report.md").read_text()
    assert "## Seed 0" in report and "## Seed 1" in report and "## Across seeds" in report
    assert len(cells(report)) == 4


def test_a_typo_in_stage_args_stops_before_any_stage(tmp_path):
    fake = FakeStages(tmp_path)
    with pytest.raises(ConfigError) as info:
        Study(study_cfg("study.sft_args=['learner.lrr=1e-5']"), tmp_path / "study", fake).run()
    message = str(info.value)
    assert message.startswith("study.sft_args") and "'learner.lr'" in message and "\n" not in message
    assert fake.calls == []


def test_the_study_bar_counts_stages_and_stage_lines_print_above_it(tmp_path, capsys):
    Study(study_cfg("study.variants=[no_kd,gold,teacher]", "study.rl_base=gold"), tmp_path / "study",
          FakeStages(tmp_path)).run()
    captured = capsys.readouterr()
    stages = [x for x in captured.out.splitlines() if x.startswith("[")]
    assert stages and all(re.match(r"\[\d+/\d+\] ", x) for x in stages)
    total = int(stages[0].split("/")[1].split("]")[0])
    assert f"{total}/{total}" in captured.err and "study" in captured.err and "stage" in captured.err


def test_run_subprocess_ticks_while_a_stage_runs_and_returns_its_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "TICK_S", 0.05)
    ticks = []
    rc = run_subprocess(["python", "-c", "import time, sys; print('hi'); time.sleep(0.4); sys.exit(3)"],
                        tmp_path / "stage.log", lambda: ticks.append(1))
    assert rc == 3 and len(ticks) >= 3 and (tmp_path / "stage.log").read_text() == "hi\n"
