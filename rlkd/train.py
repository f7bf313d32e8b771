"""Entry point: `python -m rlkd.train recipe=NAME [key=value ...]` (`--help` lists every key).

`main` is the one runner of every command (`rlkd.eval` and `rlkd.quantize --eval` call it too):
rlkd's own lines and progress bars on the terminal, library output in the run's log, an error
as one `rlkd: error:` line, Ctrl-C as one line naming what holds the run (exit 130).
"""

import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from rlkd.compose import from_cli
from rlkd.config import Config, Task
from rlkd.console import capture, captured, one_line, out, say, silence
from rlkd.errors import InputError, Interrupted, RunStopped
from rlkd.tracking import make_run_dir

# Task modules import Ray, vLLM and DeepSpeed (~30 s); they load only after the config is
# known to be good, so a typo on the command line is reported at once.


def _grpo(cfg: Config, run_dir) -> None:
    from rlkd.tasks.grpo import train

    train(cfg, run_dir)


def _eval(cfg: Config, run_dir) -> None:
    from rlkd.tasks.eval import evaluate

    evaluate(cfg, run_dir)


def _cot(cfg: Config, run_dir) -> None:
    from rlkd.tasks.cot import run

    run(cfg, run_dir)


def _sft(cfg: Config, run_dir) -> None:
    from rlkd.tasks.sft import train

    train(cfg, run_dir)


def _distill(cfg: Config, run_dir) -> None:
    from rlkd.tasks.distill import train

    train(cfg, run_dir)


def _study(cfg: Config, run_dir) -> None:
    from rlkd.tasks.study import run

    run(cfg, run_dir)


TASKS = {Task.grpo: _grpo, Task.eval: _eval, Task.cot: _cot, Task.sft: _sft, Task.distill: _distill,
         Task.study: _study}


def main(argv: list[str], restore_output: bool = True, *, default_recipe: str | None = None,
         forced: tuple[str, ...] = (), task: Callable[[Config, Path], object] | None = None) -> None:
    """Run the task `argv` names (or `task`, for another command's own engine). With run.quiet
    the library output goes to the run's log until `main` returns (`restore_output`, for callers
    in-process) or until the process exits (the CLI: what vLLM prints while shutting down stays
    in the log too). `default_recipe` and `forced` are those of `rlkd.compose.from_cli`."""
    listen_for_ctrl_c()
    cfg, recipe = from_cli(argv, default_recipe=default_recipe, forced=forced)
    run_dir = make_run_dir(cfg, recipe)
    log = run_dir / "logs" / "run.log"
    out(f"rlkd: {cfg.task.value} run in {run_dir}" + (f" (library output: {log})" if cfg.run.quiet else ""))
    restore = capture(log) if cfg.run.quiet else None
    kept = restore is not None and not restore_output
    try:
        (task or TASKS[cfg.task])(cfg, run_dir)
    except Interrupted as e:
        exit_interrupted(f"rlkd: {e}")
    except KeyboardInterrupt:  # a training loop that began ends with Interrupted instead
        exit_interrupted(f"rlkd: interrupted while starting; nothing was trained ({run_dir})"
                         if cfg.task in (Task.grpo, Task.sft, Task.distill) else
                         f"rlkd: interrupted; the {cfg.task.value} run in {run_dir} did not finish")
    except (InputError, RunStopped) as e:
        fail(f"rlkd: error: {e}", kept)
    except Exception as e:
        if not cfg.run.quiet:
            raise
        traceback.print_exc()  # into the log, beside what the libraries printed before it
        fail(f"rlkd: error: {one_line(e)} (traceback in {log})", kept)
    finally:
        if restore and restore_output:
            restore()


def listen_for_ctrl_c() -> None:
    """SIGINT stops a run after saving its last finished step, however the shell started it.

    A command a script starts in the background (`... &`, `nohup ... &`) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt: `kill -INT` did nothing to such a
    run (seen on the main job), so it could only be killed, losing the steps since its last
    checkpoint. Only the main thread may set a handler; an in-process caller elsewhere keeps
    its own.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def fail(message: str, kept: bool) -> None:
    """Exit 1 with `message` on the terminal. While the output stays captured (`kept`) the
    interpreter would print a SystemExit's text into the log, so rlkd says it; otherwise the
    interpreter prints it once `main`'s finally has given the terminal back its fds."""
    if kept:
        say(message)
        raise SystemExit(1)
    if captured():
        print(message, file=sys.stderr, flush=True)  # the log's copy
    raise SystemExit(message)


def exit_interrupted(message: str) -> None:
    """Say `message` and exit 130 (SIGINT's status), quietly even when Ctrl-C also ended the
    `| tee` this process wrote into (see `rlkd.console.silence`)."""
    say(message)
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        silence(sys.stdout)
    raise SystemExit(130)


if __name__ == "__main__":
    main(sys.argv[1:], restore_output=False)
