"""Rollout-side pieces that need no engine: sharding prompts and gathering in order."""

import pytest

from rlkd.grpo import repeat_each
from rlkd.rollout import Generation, shard


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
