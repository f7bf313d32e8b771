"""Filters over teacher chain-of-thought samples, and the report of what they dropped.

A sample is a plain dict (one line of samples.jsonl, written by `rlkd.tasks.cot`). Per-sample filters
are pure predicates in the `SAMPLE_FILTERS` registry; each returns True to keep. All of them run
on every sample, so the report can say both how many samples each filter rejects on its own and
which filter dropped each sample first. Then, per question, near-duplicates are removed and the
selection rule keeps at most `max_per_question` survivors.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable

from rewards.format import format_answer_line
from rlkd.answer import is_correct
from rlkd.config import FilterConfig, Select

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def strip_calculator(rationale: str) -> str:
    """`48/2 = <<48/2=24>>24` -> `48/2 = 24`: GSM8K's calculator annotations are not prose."""
    return _CALCULATOR_RE.sub("", rationale)


def _correct(s: dict, cfg: FilterConfig) -> bool:
    return not cfg.correct or is_correct(s["text"], s["gold"])


def _answer_line(s: dict, cfg: FilterConfig) -> bool:
    return not cfg.answer_line or format_answer_line([s["text"]])[0] == 1.0


def _length(s: dict, cfg: FilterConfig) -> bool:
    n = s["num_tokens"]
    return n >= cfg.min_tokens and (cfg.max_tokens <= 0 or n <= cfg.max_tokens)


def _truncated(s: dict, cfg: FilterConfig) -> bool:
    return not (cfg.drop_truncated and s.get("truncated", False))


def _concise(s: dict, cfg: FilterConfig) -> bool:
    gold = s.get("gold_tokens") or 0
    return cfg.max_gold_ratio <= 0 or gold <= 0 or s["num_tokens"] <= cfg.max_gold_ratio * gold


def _confident(s: dict, cfg: FilterConfig) -> bool:
    # Gold rationales carry no teacher logprob (NaN/None): confidence cannot judge them.
    lp = s.get("mean_logprob")
    if cfg.min_mean_logprob >= 0 or lp is None or math.isnan(lp):
        return True
    return lp >= cfg.min_mean_logprob


SAMPLE_FILTERS: dict[str, Callable[[dict, FilterConfig], bool]] = {
    "length": _length,
    "truncated": _truncated,
    "answer_line": _answer_line,
    "correct": _correct,
    "concise": _concise,
    "confidence": _confident,
}


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = _WORD_RE.findall(text.lower())
    return {tuple(words[i:i + 3]) for i in range(max(len(words) - 2, 1))} if words else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_ORDER: dict[Select, Callable[[dict], float]] = {
    Select.shortest: lambda s: s["num_tokens"],
    Select.confident: lambda s: -(s.get("mean_logprob") or 0.0),
    Select.first: lambda s: 0.0,
}


def select_per_question(survivors: list[dict], cfg: FilterConfig) -> tuple[list[dict], int, int]:
    """(kept, dropped as near-duplicates, dropped by the per-question cap) for one question."""
    ordered = sorted(survivors, key=_ORDER[cfg.select])  # stable: ties keep generation order
    kept, grams, duplicates = [], [], 0
    for s in ordered:
        g = trigrams(s["text"])
        if cfg.dedup_jaccard > 0 and any(jaccard(g, k) >= cfg.dedup_jaccard for k in grams):
            duplicates += 1
            continue
        kept.append(s)
        grams.append(g)
    cap = cfg.max_per_question if cfg.max_per_question > 0 else len(kept)
    return kept[:cap], duplicates, max(len(kept) - cap, 0)


def apply_filters(samples: list[dict], cfg: FilterConfig) -> tuple[list[dict], dict]:
    """Kept samples (each tagged `kept`/`drop_reason` in place) and the filter report."""
    rejects: Counter[str] = Counter()  # each filter on its own
    first: Counter[str] = Counter()  # the first failing filter, so counts add up to the drops
    by_question: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        failed = [name for name, keep in SAMPLE_FILTERS.items() if not keep(s, cfg)]
        rejects.update(failed)
        s["failed_filters"] = failed
        s["drop_reason"] = failed[0] if failed else None
        if failed:
            first[failed[0]] += 1
        else:
            by_question[s["id"]].append(s)
        by_question.setdefault(s["id"], [])
    kept, duplicates, capped = [], 0, 0
    for survivors in by_question.values():
        chosen, dup, cap = select_per_question(survivors, cfg)
        duplicates, capped = duplicates + dup, capped + cap
        chosen_ids = {id(s) for s in chosen}
        for s in survivors:
            if id(s) not in chosen_ids:
                s["drop_reason"] = "near_duplicate_or_cap"
        kept += chosen
    for s in samples:
        s["kept"] = s["drop_reason"] is None
    questions = len(by_question)
    covered = len({s["id"] for s in kept})
    report = {
        "samples": len(samples),
        "questions": questions,
        "kept": len(kept),
        "dropped": len(samples) - len(kept),
        "coverage": covered / questions if questions else 0.0,
        "questions_covered": covered,
        "rejected_by_filter": {name: rejects[name] for name in SAMPLE_FILTERS},
        "dropped_first_by": {name: first[name] for name in SAMPLE_FILTERS},
        "dropped_near_duplicate": duplicates,
        "dropped_per_question_cap": capped,
        "mean_tokens_all": _mean([s["num_tokens"] for s in samples]),
        "mean_tokens_kept": _mean([s["num_tokens"] for s in kept]),
        "kept_by_temperature": _rate_by(samples, "temperature"),
        "kept_by_prompt_mode": _rate_by(samples, "prompt_mode"),
    }
    return kept, report


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _rate_by(samples: list[dict], key: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        groups[str(s.get(key))].append(s["drop_reason"] is None)
    return {k: {"samples": len(v), "kept": sum(v), "kept_frac": sum(v) / len(v)} for k, v in groups.items()}


def report_markdown(report: dict, config: FilterConfig) -> str:
    lines = [
        "# Filter report",
        "",
        f"- samples: {report['samples']} over {report['questions']} questions",
        f"- kept: {report['kept']} ({report['kept'] / max(report['samples'], 1):.1%})",
        f"- coverage: {report['coverage']:.1%} of questions keep at least one sample "
        f"({report['questions_covered']}/{report['questions']})",
        f"- mean tokens: all {report['mean_tokens_all']:.1f}, kept {report['mean_tokens_kept']:.1f}",
        "",
        "| filter | rejects on its own | dropped (first failing filter) |",
        "|---|---:|---:|",
    ]
    for name in SAMPLE_FILTERS:
        lines.append(f"| {name} | {report['rejected_by_filter'][name]} | {report['dropped_first_by'][name]} |")
    lines += [
        f"| near-duplicate (Jaccard >= {config.dedup_jaccard}) | | {report['dropped_near_duplicate']} |",
        f"| per-question cap ({config.max_per_question}, {config.select.value}) | | "
        f"{report['dropped_per_question_cap']} |",
        "",
        "| temperature | samples | kept | kept % |",
        "|---|---:|---:|---:|",
    ]
    for t, r in sorted(report["kept_by_temperature"].items()):
        lines.append(f"| {t} | {r['samples']} | {r['kept']} | {r['kept_frac']:.1%} |")
    return "\n".join(lines) + "\n"
