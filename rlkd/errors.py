"""rlkd's own errors: each is one line naming the culprit, which the CLI prints without a
traceback (`rlkd: error: ...`); the classes tell the CLI what exit code and hint to give."""


class InputError(ValueError):
    """Bad user input (config, data, model, reward, checkpoint) found before heavy work starts;
    the message is one line naming the culprit, and the CLI prints it without a traceback."""


class ConfigError(InputError):
    """A bad recipe, key or value; the message is one line naming the culprit."""


class DataError(InputError):
    """A missing source or a malformed row; the message is one line naming where."""


class RunStopped(RuntimeError):
    """A run stopped on purpose (repeated actor failures, NaN steps); one line says why and what
    to resume from, and the CLI prints it without a traceback."""


class Interrupted(RunStopped):
    """Ctrl-C: the run saved what it could; the message says where and how to continue (the CLI
    prints it and exits 130)."""
