"""The one-command distillation study (task=study): every variant from one recipe, one report.

    python -m rlkd.train recipe=distill_gsm8k run.dir=runs/study

    the student (pruned out of the teacher) -> GSM8K's gold rationales as a dataset
    for each seed:
        teacher CoT, plain and ground-truth-primed -> filters: none, correctness, confidence
        -> SFT of the student on each dataset (and on answers only, and on gold rationales)
        -> GRPO and MiniLLM from study.rl_base -> 4-bit copy of the final student
        -> every model graded on the same test questions
    -> report.md and figures (rlkd.tasks.study_report)

Every stage is a subprocess of an existing CLI (`rlkd.train`, `rlkd.eval`, `rlkd.prune`,
`rlkd.quantize`) writing into its own directory of the study dir, so each frees its Ray, vLLM and
DeepSpeed memory, and is run by the same code as when launched by hand. A stage that exits 0 gets
a `stage.json` marker (written last, atomically); a rerun of the same command skips every stage
that has one and starts an unmarked stage afresh, so an interrupted study resumes. Each stage's
command, seed and wall time go to study.jsonl (one line per event) and stages.json (the latest
state of each); its output to <stage>/stage.log.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from rlkd.compose import changes, hydra_value, load_config
from rlkd.config import Config
from rlkd.config_distill import StudyVariant as V
from rlkd.config_distill import sizes
from rlkd.console import out, terminal
from rlkd.errors import ConfigError, Interrupted, RunStopped
from rlkd.hardware import rollout_dtype
from rlkd.tasks.study_report import Row, write_report

VARIANTS: dict[V, str] = {
    V.no_kd: "the student as initialised, no training (no KD)",
    V.answer_only: "SFT on question -> '#### answer', no rationale",
    V.cot_unfiltered: "SFT on the teacher's CoT as written",
    V.cot_correct: "SFT on the teacher's CoT with a correct final answer",
    V.cot_confident: "SFT on the teacher's most confident CoT (no answer labels used)",
    V.cot_gt_primed: "SFT on correct CoT the teacher wrote after being told the answer",
    V.gold: "SFT on GSM8K's human rationales",
    V.grpo: "GRPO from study.rl_base",
    V.minillm: "MiniLLM (on-policy reverse-KL distillation) from study.rl_base",
    V.teacher: "the teacher itself (upper bound)",
    V.int4: "the final student with 4-bit weights, and its fp32 reference on the same engine",
}
SFT_VARIANTS = (V.answer_only, V.cot_unfiltered, V.cot_correct, V.cot_confident, V.cot_gt_primed, V.gold)
PLAIN_COT = {V.cot_unfiltered, V.cot_correct, V.cot_confident}
# Which stage directory holds each SFT variant's kept.jsonl ({seed} is the seed's directory).
DATA = {V.answer_only: "cot-gold", V.gold: "cot-gold", V.cot_correct: "{seed}/cot-plain",
        V.cot_unfiltered: "{seed}/data-cot_unfiltered", V.cot_confident: "{seed}/data-cot_confident",
        V.cot_gt_primed: "{seed}/cot-gt_primed"}
# Filters that turn the plain CoT samples into the other datasets (the plain stage keeps the
# default ones: correct, answer line, untruncated, no near-duplicates, shortest per question).
UNFILTERED = ["filter.correct=false", "filter.answer_line=false", "filter.drop_truncated=false",
              "filter.dedup_jaccard=0", "filter.select=first"]
CONFIDENT = ["filter.correct=false", "filter.select=confident"]
MARKER = "stage.json"
TICK_S = 5  # seconds between redraws of the study bar while a stage runs


# Sections of the study's own config each kind of stage inherits, as overrides of what differs
# from the defaults (data.path, model.max_model_len, rollout.kv_cache_gb, learner.gpus, ...).
INHERITED = {"cot": ("data", "model", "rollout", "ray", "cot", "filter"),
             "sft": ("data", "model", "rollout", "learner", "ray", "sft", "trainer"),
             "grpo": ("data", "model", "rollout", "learner", "ray", "trainer", "grpo", "rewards"),
             "minillm": ("data", "model", "rollout", "learner", "ray", "trainer", "grpo", "rewards",
                         "distill", "student"),
             "eval": ("data", "model", "rollout", "eval")}
RECIPES = {"cot": "cot_gsm8k", "sft": "sft_gsm8k", "grpo": "grpo_gsm8k", "minillm": "minillm_gsm8k"}


def validate(cfg: Config) -> None:
    """What the schema cannot say about study.*, as one-line ConfigErrors."""
    s = cfg.study
    on = set(s.variants)
    if not s.variants or len(on) != len(s.variants):
        raise ConfigError(f"study.variants={[v.value for v in s.variants]} must name each variant once")
    if not s.seeds or len(set(s.seeds)) != len(s.seeds):
        raise ConfigError(f"study.seeds={s.seeds} must hold distinct seeds")
    if s.rl_base not in (V.no_kd, *SFT_VARIANTS):
        raise ConfigError(f"study.rl_base={s.rl_base.value}: GRPO and MiniLLM start from no_kd or an "
                          f"SFT variant ({', '.join(v.value for v in SFT_VARIANTS)})")
    if on & {V.grpo, V.minillm} and s.rl_base != V.no_kd and s.rl_base not in on:
        raise ConfigError(f"study.rl_base={s.rl_base.value} is not in study.variants: add it, or start "
                          f"GRPO/MiniLLM from another one")
    if not 0.0 < s.confidence_quantile < 1.0:
        raise ConfigError(f"study.confidence_quantile={s.confidence_quantile} must be in (0, 1)")
    if s.quant_group_size not in (32, 64, 128, 256):
        raise ConfigError(f"study.quant_group_size={s.quant_group_size}: one of 32, 64, 128, 256")
    for key in ("cot_questions", "eval_questions", "sft_steps", "rl_steps"):
        if getattr(s, key) < 0:
            raise ConfigError(f"study.{key}={getattr(s, key)} must be >= 0 (0: the scale's)")


def inherited(changed: dict[str, str], kind: str) -> list[str]:
    """The changed keys a `kind` stage inherits: those of its INHERITED sections."""
    return [arg for key, arg in changed.items() if key.split(".", 1)[0] in INHERITED[kind]]


class NoInput(Exception):
    """A stage whose input an earlier stage could not make (the filters kept nothing)."""


@dataclass
class Stage:
    name: str
    """Its directory, relative to the study dir."""
    module: str
    """Run as `python -m <module> <args>`."""
    args: Callable[[], list[str]]
    """Built when the stage is due, since it may read what earlier stages wrote; raises NoInput."""
    seed: int | None = None


def latest_checkpoint(run_dir: Path) -> Path:
    """The highest-step checkpoint of a training stage (a killed one leaves only *.tmp dirs)."""
    checkpoints = sorted(run_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not checkpoints:
        raise NoInput(f"{'/'.join(run_dir.parts[-2:])} made no checkpoint")
    return checkpoints[-1]


def kept_count(data_dir: Path) -> int:
    """Samples a filter stage kept: SFT's batch and epochs are sized from it."""
    path = data_dir / "kept.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def confidence_threshold(samples: Path, quantile: float) -> float:
    """The `quantile` of the finite mean token logprobs of the teacher's samples (always < 0,
    since filter.min_mean_logprob=0 turns the filter off)."""
    values = []
    for line in samples.read_text().splitlines():
        lp = json.loads(line).get("mean_logprob") if line.strip() else None
        if isinstance(lp, int | float) and math.isfinite(lp):
            values.append(lp)
    if len(values) < 2:
        raise NoInput(f"{samples} holds {len(values)} samples with a teacher confidence")
    return min(statistics.quantiles(values, n=1000)[round(quantile * 1000) - 1], -1e-6)


def run_subprocess(argv: list[str], log: Path, tick: Callable[[], None]) -> int:
    """Run one stage with its output in `log`, calling `tick` every few seconds (the progress
    bar's clock); on Ctrl-C wait for it to stop its own actors (it got the same signal), since
    killing it would orphan them."""
    with log.open("w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    return proc.wait(timeout=TICK_S)
                except subprocess.TimeoutExpired:
                    tick()
        except KeyboardInterrupt:
            proc.wait()
            raise


class Study:
    """The study's stages, in order, and the loop that runs or skips them."""

    def __init__(self, cfg: Config, root: Path,
                 execute: Callable[[list[str], Path, Callable[[], None]], int] = run_subprocess):
        self.cfg, self.s, self.root, self.execute = cfg, cfg.study, root.resolve(), execute
        self.bar: tqdm | None = None
        self.on, self.z, self.changed = set(cfg.study.variants), sizes(cfg.study), changes(cfg)

    # --- what each stage runs ----------------------------------------------------------------

    def _dir(self, name: str) -> str:
        return hydra_value(str(self.root / name))

    def _train(self, kind: str, name: str, seed: int | None, own: list[str], extra: list[str]) -> list[str]:
        seed_args = [f"run.seed={seed}"] if seed is not None else []
        return [f"recipe={RECIPES[kind]}", *inherited(self.changed, kind), f"run.dir={self._dir(name)}",
                *seed_args, *own, *extra]

    def student(self) -> str:
        """The untrained student: study.student, or the one the prune stage writes."""
        return self.s.student or str(self.root / "student" / "model")

    def cot(self, name: str, mode: str, seed: int | None) -> Stage:
        z = self.z
        own = [f"model.name={hydra_value(self.s.teacher)}", f"data.split={hydra_value(self.cfg.data.split)}",
               f"cot.prompt_mode={mode}", f"cot.num_questions={z.cot_questions}",
               f"cot.temperatures={hydra_value(list(z.temperatures))}", f"cot.max_new_tokens={z.cot_max_tokens}"]
        return Stage(name, "rlkd.train", lambda: self._train("cot", name, seed, own, self.s.cot_args), seed)

    def refilter(self, name: str, source: str, filters: Callable[[], list[str]], seed: int) -> Stage:
        def args() -> list[str]:
            own = [f"cot.samples={self._dir(source)}", *filters()]
            return self._train("cot", name, seed, own, self.s.cot_args)
        return Stage(name, "rlkd.train", args, seed)

    def sft(self, variant: V, seed: int, d: str) -> Stage:
        name, data = f"{d}/sft-{variant.value}", DATA[variant].format(seed=d)

        def args() -> list[str]:
            # The same steps and batch for every variant: a small dataset is seen more often.
            n = kept_count(self.root / data)
            train = n - min(self.cfg.sft.held_out, n // 5)
            if train < 1:
                raise NoInput(f"the filters of {data} kept {n} samples")
            batch = min(self.z.sft_batch, train)
            steps = self.z.sft_steps
            own = [f"model.name={hydra_value(self.student())}",
                   f"sft.data={hydra_value(str(self.root / data / 'kept.jsonl'))}",
                   f"sft.target={'answer_only' if variant == V.answer_only else 'cot'}", "sft.num_examples=0",
                   f"sft.batch_size={batch}", f"sft.epochs={math.ceil(steps / (train // batch))}",
                   f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // 4)}",
                   "sft.eval_accuracy=false", "trainer.save_every=0", "trainer.save_state=false"]
            return self._train("sft", name, seed, own, self.s.sft_args)
        return Stage(name, "rlkd.train", args, seed)

    def rl(self, variant: V, seed: int, d: str) -> Stage:
        name, z = f"{d}/{variant.value}", self.z

        def args() -> list[str]:
            own = [f"model.name={hydra_value(str(self.model(self.s.rl_base, d)))}",
                   f"trainer.max_steps={z.rl_steps}", "trainer.eval_every=0", "trainer.save_every=0",
                   "trainer.save_state=false", f"grpo.prompts_per_step={z.rl_prompts}",
                   f"grpo.group_size={z.rl_group}", f"rollout.max_new_tokens={z.rl_max_tokens}",
                   f"data.split={hydra_value(self.cfg.data.split)}"]
            if variant == V.minillm:
                own += ["student.init=model", f"distill.teachers=[{hydra_value(self.s.teacher)}]"]
                return self._train("minillm", name, seed, own, self.s.minillm_args)
            return self._train("grpo", name, seed, own, self.s.grpo_args)
        return Stage(name, "rlkd.train", args, seed)

    def evaluate(self, name: str, model: Callable[[], str], seed: int | None, engine: str = "vllm") -> Stage:
        def args() -> list[str]:
            seed_args = [f"run.seed={seed}"] if seed is not None else []
            head = ["--eval"] if engine == "transformers" else []
            return [*head, *inherited(self.changed, "eval"), f"model.name={hydra_value(model())}",
                    f"data.split={hydra_value(self.cfg.data.eval_split)}",
                    f"eval.num_samples={self.z.eval_questions}", f"eval.max_new_tokens={self.z.eval_max_tokens}",
                    f"run.dir={self._dir(name)}", *seed_args, *self.s.eval_args]
        return Stage(name, "rlkd.eval" if engine == "vllm" else "rlkd.quantize", args, seed)

    def model(self, variant: V, d: str) -> Path | str:
        """Where a variant's model is (raises NoInput when its training never ran)."""
        if variant == V.teacher:
            return self.s.teacher
        if variant == V.no_kd:
            return self.student()
        if variant in (V.grpo, V.minillm):
            return latest_checkpoint(self.root / d / variant.value)
        return latest_checkpoint(self.root / d / f"sft-{variant.value}")

    @staticmethod
    def made(where: Callable[[], Path | str]) -> Path | None:
        """A model's path if its stage made it, else None (its row is then reported as not run)."""
        try:
            return Path(where())
        except NoInput:
            return None

    def final(self) -> V:
        """The student int4 quantizes: the last one the pipeline trains."""
        for v in (V.minillm, V.grpo, self.s.rl_base):
            if v in self.on:
                return v
        return V.no_kd

    def final_model(self, d: str) -> str:
        """The checkpoint int4 quantizes, and its fp32 reference evaluates."""
        return str(self.model(self.final(), d))

    def int4_model(self, d: str) -> str:
        """The quantized checkpoint (raises NoInput when its source never trained)."""
        path = self.root / d / "int4" / "model"
        if not path.is_dir():
            raise NoInput(f"{d}/int4 made no model")
        return str(path)

    # --- the study ---------------------------------------------------------------------------

    def plan(self) -> list[Stage]:
        on, s, stages = self.on, self.s, []
        if not s.student:
            stages.append(Stage("student", "rlkd.prune", lambda: [s.teacher, self.student(), self.cfg.student.layers]))
        if on & {V.gold, V.answer_only}:
            stages.append(self.cot("cot-gold", "gold", None))
        if V.teacher in on:  # greedy evaluations do not depend on the seed
            stages.append(self.evaluate("eval-teacher", lambda: s.teacher, None))
        if V.no_kd in on:
            stages.append(self.evaluate("eval-no_kd", self.student, None))
        for seed in s.seeds:
            d = f"seed-{seed}"
            if on & PLAIN_COT:
                stages.append(self.cot(f"{d}/cot-plain", "plain", seed))
            if V.cot_unfiltered in on:
                stages.append(self.refilter(f"{d}/data-cot_unfiltered", f"{d}/cot-plain", lambda: UNFILTERED, seed))
            if V.cot_confident in on:
                samples = self.root / d / "cot-plain" / "samples.jsonl"
                stages.append(self.refilter(f"{d}/data-cot_confident", f"{d}/cot-plain", lambda samples=samples: [
                    *CONFIDENT, f"filter.min_mean_logprob={confidence_threshold(samples, s.confidence_quantile):.6f}"],
                    seed))
            if V.cot_gt_primed in on:
                stages.append(self.cot(f"{d}/cot-gt_primed", "gt_primed", seed))
            stages += [self.sft(v, seed, d) for v in SFT_VARIANTS if v in on]
            stages += [self.rl(v, seed, d) for v in (V.grpo, V.minillm) if v in on]
            trained = [v for v in (*SFT_VARIANTS, V.grpo, V.minillm) if v in on]
            stages += [self.evaluate(f"{d}/eval-{v.value}", lambda v=v, d=d: str(self.model(v, d)), seed)
                       for v in trained]
            if V.int4 in on:
                stages.append(Stage(f"{d}/int4", "rlkd.quantize", lambda d=d: [
                    self.final_model(d), str(self.root / d / "int4" / "model"),
                    f"--group-size={s.quant_group_size}"], seed))
                stages.append(self.evaluate(f"{d}/eval-int4_ref", lambda d=d: self.final_model(d), seed,
                                            "transformers"))
                stages.append(self.evaluate(f"{d}/eval-int4", lambda d=d: self.int4_model(d), seed,
                                            "transformers"))
        return stages

    def rows(self, seed: int) -> list[Row]:
        """The report's rows for one seed, in the order of VARIANTS."""
        d, base, final = f"seed-{seed}", self.s.rl_base.value, self.final().value
        vllm = f"vLLM, {rollout_dtype(self.cfg)}"
        rows = []
        for v in VARIANTS:
            if v not in self.on:
                continue
            if v in (V.teacher, V.no_kd):
                rows.append(Row(v.value, f"{v.value}: {VARIANTS[v]}", self.root / f"eval-{v.value}", vllm,
                                model=self.made(self.student) if v == V.no_kd and not self.s.student else None))
            elif v in SFT_VARIANTS:
                rows.append(Row(v.value, f"{v.value}: {VARIANTS[v]}", self.root / d / f"eval-{v.value}", vllm,
                                self.root / DATA[v].format(seed=d), curves=self.root / d / f"sft-{v.value}" /
                                "metrics.jsonl", curve_kind="sft", model=self.made(lambda v=v: self.model(v, d))))
            elif v in (V.grpo, V.minillm):
                data = self.root / DATA[self.s.rl_base].format(seed=d) if self.s.rl_base != V.no_kd else None
                rows.append(Row(v.value, f"{v.value}: {VARIANTS[v].replace('study.rl_base', base)}",
                                self.root / d / f"eval-{v.value}", vllm, data,
                                f"{base} + {v.value} on GSM8K train", self.root / d / v.value / "metrics.jsonl",
                                v.value, self.made(lambda v=v: self.model(v, d))))
            else:
                rows += [Row("int4_ref", f"{final}, fp32 reference for int4", self.root / d / "eval-int4_ref",
                             "transformers, float32", data_note=f"as {final}",
                             model=self.made(lambda: self.final_model(d))),
                         Row("int4", f"{final}, int4 weights (torchao, group {self.s.quant_group_size})",
                             self.root / d / "eval-int4", "transformers, int4 + bf16", data_note=f"as {final}",
                             model=self.made(lambda: self.int4_model(d)))]
        return rows

    def preflight(self) -> None:
        """The user's own overrides for each kind of stage, checked before any stage starts."""
        for kind, extra in (("cot", self.s.cot_args), ("sft", self.s.sft_args), ("grpo", self.s.grpo_args),
                            ("minillm", self.s.minillm_args), ("eval", self.s.eval_args)):
            recipe, forced = (RECIPES[kind], []) if kind != "eval" else ("eval_gsm8k", ["task=eval"])
            try:
                load_config(recipe, [*forced, *inherited(self.changed, kind), *extra])
            except ConfigError as e:
                raise ConfigError(f"study.{kind}_args or the study's own keys: {e}") from None

    def run(self) -> Path:
        validate(self.cfg)
        self.preflight()
        stages = self.plan()
        out(f"rlkd: study of {len(stages)} stages in {self.root} (seeds {self.s.seeds}, scale "
              f"{self.s.scale.value}); rerun with run.dir={self.root} to resume")
        start = time.perf_counter()
        # One bar over the stages (each stage's own bars go to its stage.log); the stage lines
        # print above it.
        self.bar = tqdm(total=len(stages), desc="study", unit="stage", file=terminal(), dynamic_ncols=True)
        try:
            for i, stage in enumerate(stages, 1):
                self.bar.set_postfix_str(stage.name)
                self.run_stage(stage, f"[{i}/{len(stages)}] {stage.name}")
                self.bar.update(1)
        finally:
            self.bar.close()
            self.bar = None
        path = write_report(self.root, self.header(), {seed: self.rows(seed) for seed in self.s.seeds},
                            self.states(), self.not_run())
        out(f"rlkd: study finished in {_clock(time.perf_counter() - start)}: {path}")
        return path

    def run_stage(self, stage: Stage, tag: str) -> None:
        d = self.root / stage.name
        if (d / MARKER).is_file():
            done = json.loads((d / MARKER).read_text())
            self.check_unchanged(stage, done)
            self.note(f"{tag}: done earlier, skipped")
            self.log(stage, "skipped", done)
            return
        try:
            args = stage.args()
        except NoInput as e:
            self.note(f"{tag}: not run: {e}")
            self.log(stage, "no_input", {"reason": str(e)})
            return
        shutil.rmtree(d, ignore_errors=True)  # what a killed attempt left
        d.mkdir(parents=True)
        argv = [sys.executable, "-m", stage.module, *args]
        record = {"command": shlex.join(["python", "-m", stage.module, *args]), "seed": stage.seed,
                  "root": str(self.root)}
        self.note(f"{tag}: running ({d / 'stage.log'})")
        started = time.perf_counter()
        try:
            rc = self.execute(argv, d / "stage.log", self.bar.refresh if self.bar else lambda: None)
        except KeyboardInterrupt:  # the stage got the Ctrl-C too, and has stopped
            self.log(stage, "interrupted", record)
            raise Interrupted(f"interrupted in stage {stage.name} ({tag.split(']')[0]}]); the stages finished "
                              f"before it are kept: rerun the same command with run.dir={self.root} to "
                              "continue from this one") from None
        record["seconds"] = time.perf_counter() - started
        if rc != 0:
            self.log(stage, "failed", {**record, "exit": rc})
            tail = (d / "stage.log").read_text(errors="replace").splitlines()[-15:] if (d / "stage.log").exists() else []
            self.note("\n".join(f"    {line}" for line in tail))
            raise RunStopped(f"stage {stage.name} failed (exit {rc}), log {d / 'stage.log'}; fix it and rerun "
                             f"the same command with run.dir={self.root} to resume")
        _write_json(d / MARKER, {**record, "finished": datetime.now().isoformat(timespec="seconds")})
        self.note(f"{tag}: done in {_clock(record['seconds'])}")
        self.log(stage, "done", record)

    def note(self, line: str) -> None:
        """A stage's line, printed above the study's bar."""
        if self.bar is not None:
            self.bar.clear()
        out(line)
        if self.bar is not None:
            self.bar.refresh()

    def check_unchanged(self, stage: Stage, done: dict) -> None:
        """Reuse a finished stage only if this study would run it the same way: a changed key
        (study.eval_questions, a size, a filter) must not mix old numbers into the new report.
        Paths are compared relative to the study dir, so a moved study still resumes."""
        try:
            now = [stage.module, *stage.args()]
        except NoInput:
            return  # its input is gone (e.g. deleted by hand) but its own output is complete
        then = shlex.split(done["command"])[2:]
        old_root = done.get("root", str(self.root))
        then = [a.replace(old_root, "<study>") for a in then]
        now = [a.replace(str(self.root), "<study>") for a in now]
        if then == now:
            return
        i = next((i for i, (a, b) in enumerate(zip(then, now, strict=False)) if a != b), min(len(then), len(now)))
        was, will = (then[i] if i < len(then) else "nothing"), (now[i] if i < len(now) else "nothing")
        raise RunStopped(f"stage {stage.name} in {self.root} ran with {was}, this study would run it with "
                         f"{will}: rerun with the earlier settings, pick a new run.dir, or delete "
                         f"{self.root / stage.name} and the stages built on it to redo them")

    def log(self, stage: Stage, status: str, record: dict) -> None:
        entry = {"stage": stage.name, "status": status, "seed": stage.seed, **record,
                 "time": datetime.now().isoformat(timespec="seconds")}
        with (self.root / "study.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        states = self.states()
        states[stage.name] = entry
        _write_json(self.root / "stages.json", states)

    def states(self) -> dict[str, dict]:
        path = self.root / "stages.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def not_run(self) -> dict[str, str]:
        """Stages that could not run for lack of input, and why: the report lists them."""
        return {name: s["reason"] for name, s in self.states().items() if s["status"] == "no_input"}

    def header(self) -> list[str]:
        """The report's opening lines: who teaches whom, at which sizes and seeds."""
        z = self.z
        return [f"- teacher: `{self.s.teacher}`; student: `{self.s.student or 'pruned from the teacher, layers ' + self.cfg.student.layers}`",
                f"- scale `{self.s.scale.value}`: {z.cot_questions or 'all'} training questions x "
                f"{len(z.temperatures) * self.cfg.cot.samples_per_temperature} teacher samples (T={', '.join(map(str, z.temperatures))}, <= {z.cot_max_tokens} tokens); "
                f"SFT {z.sft_steps} steps of {z.sft_batch}; GRPO/MiniLLM {z.rl_steps} steps of {z.rl_prompts}x{z.rl_group} "
                f"from `{self.s.rl_base.value}`; {z.eval_questions or 'all'} `{self.cfg.data.eval_split}` questions, greedy, "
                f"<= {z.eval_max_tokens} tokens",
                f"- seeds {self.s.seeds}: each stage's run.seed is in the stage table; rerunning with the "
                "same seeds reproduces the numbers on CPU (GRPO/MiniLLM up to vLLM's ~1e-6 logprob noise)"]


def _write_json(path: Path, data: dict) -> None:
    """Write-then-rename: a kill mid-write never leaves a half marker that looks done."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run(cfg: Config, run_dir: Path) -> Path:
    """task=study."""
    return Study(cfg, run_dir).run()

