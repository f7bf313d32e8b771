"""Rollout-side pieces that need no engine: sharding prompts and gathering in order, and the
watchdog that turns a dead vLLM engine into a dead (so restarted) actor."""

import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

from rlkd.actors.rollout import prompt_seed, shard
from rlkd.sampling import repeat_each
from rlkd.types import Generation


@pytest.mark.parametrize("n, k", [(0, 1), (1, 3), (5, 2), (7, 3), (16, 4)])
def test_shards_are_contiguous_balanced_and_complete(n, k):
    items = list(range(n))
    parts = shard(items, k)
    assert len(parts) == k
    assert [x for p in parts for x in p] == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _gen(prompts, n, seconds):
    return Generation(
        prompt_ids=[[p] for p in prompts],
        completion_ids=[[p, i] for p in prompts for i in range(n)],
        logprobs=[[-0.1, -0.2] for _ in prompts for _ in range(n)],
        texts=[f"{p}.{i}" for p in prompts for i in range(n)],
        truncated=[False for _ in prompts for _ in range(n)],
        seconds=seconds,
    )


def test_concat_restores_prompt_major_order():
    parts = [_gen([0, 1], 2, 3.0), _gen([2], 2, 5.0), _gen([], 2, 0.0)]
    gen = Generation.concat(parts)
    assert gen.texts == ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1"]
    assert gen.prompt_ids == [[0], [1], [2]]
    assert gen.num_tokens == 12
    assert gen.seconds == 5.0  # shards run in parallel: the slowest one is the wall time
    # Rewards and advantages are laid out per completion; prompts repeat group_size times.
    assert repeat_each(gen.prompt_ids, 2) == [[0], [0], [1], [1], [2], [2]]


def _watchdog(dead: bool, stopping: bool, dies_at_exit: bool = False) -> subprocess.CompletedProcess:
    """A process with the watchdog on an engine client whose `resources.engine_dead` flag (what
    vLLM's liveness monitor sets) is `dead`; it exits by itself within 5 s or times out.
    `dies_at_exit`: an exit hook registered before the engine starts (as vLLM's is) marks the
    engine dead and takes 3 s to finish, as vLLM's shutdown of its engine process does."""
    code = textwrap.dedent(f"""
        import atexit, threading, time, types
        from rlkd.actors.rollout import _exit_when_engine_dies
        stop = threading.Event()
        if {stopping}:
            stop.set()
        client = types.SimpleNamespace(resources=types.SimpleNamespace(engine_dead=False))
        def engine_shutdown():
            client.resources.engine_dead = True
            time.sleep(3)
        if {dies_at_exit}:
            atexit.register(engine_shutdown)
        _exit_when_engine_dies(client, stop)
        client.resources.engine_dead = {dead}
        time.sleep(0 if {dies_at_exit} else 5)
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_dead_engine_ends_the_actor_process():
    done = _watchdog(dead=True, stopping=False)
    assert done.returncode == 1
    assert "the vLLM engine process died" in done.stderr


@pytest.mark.parametrize("dead, stopping", [(False, False), (True, True)])
def test_live_or_deliberately_stopped_engine_leaves_the_process_alone(dead, stopping):
    assert _watchdog(dead, stopping).returncode == 0


def test_the_engine_shut_down_at_interpreter_exit_is_not_a_death():
    assert _watchdog(dead=False, stopping=False, dies_at_exit=True).returncode == 0


def test_prompt_seed_streams_never_overlap():
    # vLLM draws sample i of a request from seed + i; every (step, prompt) stream must be its own.
    n, spans = 16, []
    for step in range(200):
        for j in range(64):
            s = prompt_seed(1_000_003 + step, j)
            assert 0 <= s < 2**63 - n
            spans.append((s, s + n))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
