"""`resnet-train`: train the Flax ResNet with optax, export it to PyTorch, print a JSON summary.

Every exit prints that summary as the last line of stdout: after a failure it holds ``error``
(status 1: the run failed, e.g. a non-finite loss or an export that does not match; status 2:
bad flags, data or run directory, or a file that cannot be read or written).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from .config import UsageError, parse_args
from .signals import catch_stop_signals

EXIT_FAILED = 1  # the run failed: a non-finite loss, an export that does not reproduce the model, a lost process
EXIT_BAD_INPUT = 2  # bad flags, data or run directory; a file that cannot be read or written


def _print_summary(result: dict[str, Any], out: TextIO) -> None:
    print(json.dumps(result, sort_keys=True), file=out, flush=True)


def _failed(started: float, error: str) -> dict[str, Any]:
    """The summary of a run that ended in an error: the promised keys, empty, and the error."""
    return {"error": error, "test_accuracy": None, "epochs": None, "seconds": round(time.perf_counter() - started, 2)}


def _fail(started: float, code: int, e: BaseException, out: TextIO) -> int:
    """Say what went wrong in one sentence on stderr, print the summary with it; returns the exit code."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        error = f"{e.filename}: {e.strerror}"
    else:
        error = str(e) or type(e).__name__
    print(f"resnet-train: error: {error}", file=sys.stderr)
    _print_summary(_failed(started, error), out)
    return code


def _is_fd_1(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False


@contextlib.contextmanager
def stdout_for_json_only() -> Iterator[TextIO]:
    """While inside, file descriptor 1 points at stderr, so whatever libraries print there (gloo's
    connection lines come from C++) lands on stderr; yields the real stdout for the JSON line.

    A ``sys.stdout`` that is not file descriptor 1 (replaced by a caller, e.g. captured) is left alone.
    """
    if not _is_fd_1(sys.stdout):
        yield sys.stdout
        return
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(real), "w") as out:
            yield out
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)


@contextlib.contextmanager
def logging_to_stderr() -> Iterator[None]:
    """Our messages at INFO on stderr, other loggers at WARNING (orbax and absl log every save step at INFO);
    the logging set-up the caller had is back afterwards, so a run called in-process leaves no handler
    on a stream that may close."""
    root, ours = logging.getLogger(), logging.getLogger("resnet_train")
    saved = (root.handlers, root.level, ours.level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers, root.level = [handler], logging.WARNING
    ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, root.level = saved[:2]
        ours.setLevel(saved[2])
        handler.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, and print the summary as the last line of stdout; returns the exit code."""
    started = time.perf_counter()
    with catch_stop_signals():  # before the seconds of importing jax and torch: a signal there stops cleanly
        try:
            config = parse_args(argv)
        except UsageError as e:  # argparse has printed the usage and the message
            _print_summary(_failed(started, e.message), sys.stdout)
            return EXIT_BAD_INPUT
        from .export import ExportMismatchError
        from .loop import NonFiniteLossError, ProcessLostError, fit
        from .sharding import on_process_lost, process_lost

        with (
            logging_to_stderr(),
            stdout_for_json_only() as stdout,
            on_process_lost(lambda error: _fail(started, EXIT_FAILED, ProcessLostError(error), stdout)),
        ):
            try:
                result = fit(config)
            except ProcessLostError as e:  # ends the process: JAX's exit would wait for the lost one, then abort
                process_lost(str(e))
            except (NonFiniteLossError, ExportMismatchError) as e:
                return _fail(started, EXIT_FAILED, e, stdout)
            except (ValueError, OSError) as e:
                return _fail(started, EXIT_BAD_INPUT, e, stdout)
            except Exception as e:  # a bug: the summary line still comes, then the traceback
                _print_summary(_failed(started, f"{type(e).__name__}: {e}"), stdout)
                raise
            _print_summary(result, stdout)
        return 0


if __name__ == "__main__":
    sys.exit(main())
