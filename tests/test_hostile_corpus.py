"""Every built-in reward on a corpus of 270+ hostile completions (tests/hostile_corpus.py):
each call returns a valid score within 1 s, on the main thread and off it."""

import threading
import time

import pytest
from hostile_corpus import corpus

from rewards import REGISTRY, compute_rewards
from rlkd.answer import answers_match

LIMIT_S = 1.0
CORPUS = corpus()


@pytest.fixture(scope="module", autouse=True)
def warm_verifier():
    # The first math-verify fallback starts the helper process (~1 s); don't time that.
    assert answers_match(r"3 \times 6", "18")


def test_corpus_is_large_and_hostile():
    assert len(CORPUS) >= 100
    assert max(map(len, CORPUS.values())) >= 1_000_000


@pytest.mark.parametrize("reward", REGISTRY)
def test_each_call_returns_a_valid_score_within_a_second(reward):
    fn, slow, bad = REGISTRY[reward], [], []
    for name, text in CORPUS.items():
        start = time.perf_counter()
        scores = fn([text], answer=["18"])
        elapsed = time.perf_counter() - start
        if elapsed > LIMIT_S:
            slow.append(f"{name}: {elapsed:.2f}s")
        if not (isinstance(scores, list) and len(scores) == 1 and isinstance(scores[0], float)
                and 0.0 <= scores[0] <= 1.0):
            bad.append(f"{name}: {str(scores)[:80]}")
    assert not slow, f"{reward} slower than {LIMIT_S}s on: {slow}"
    assert not bad, f"{reward} returned invalid scores on: {bad}"


def test_whole_corpus_off_the_main_thread_scores_without_errors():
    # Trainers score in worker threads, where signal-based timeouts silently fail.
    texts = list(CORPUS.values())
    result = {}

    def score():
        start = time.perf_counter()
        result["out"] = compute_rewards(REGISTRY, {}, texts, answer=["18"] * len(texts))
        result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    totals, raw, errors = result["out"]
    assert errors == dict.fromkeys(REGISTRY, 0)
    assert len(totals) == len(texts) and all(0.0 <= t <= len(REGISTRY) for t in totals)
    assert result["seconds"] < LIMIT_S * len(texts)
    # The corpus holds a few completions that are right despite the noise ("1 MB of text").
    assert sum(raw["gsm8k_correct"]) >= 1
