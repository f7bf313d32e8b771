"""A user reward loaded by file path in tests/test_rewards.py."""

NOT_CALLABLE = 42


def length_penalty(completions, **_):
    """-0.001 per character, to check that file-loaded rewards are called like built-ins."""
    return [-0.001 * len(c) for c in completions]
