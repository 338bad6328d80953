"""What every ds4 command shares: the error boundary of `ds4` (and its chat), `ds4-bench`,
`ds4-test`, `ds4-synth` and `ds4-train`, their option types, and the backend choice.

Whatever goes wrong reaches the user as one line on stderr starting with the command's name, and
an exit status a script can act on:

* usage errors (a bad option value, a missing argument): `<prog>: <what> (see <prog> --help)`, 2;
* a `Ds4Error` (a bad model file, input that does not parse, a failed check): `<prog>: <message>`, 1;
* an `OSError`: `<prog>: <path>: <what failed>`, 1; text that is not UTF-8: the same, naming the
  input, 1 (library code that knows the path says so itself: `ds4.textfile`);
* Ctrl+C: `<prog>: interrupted` (and what was done, when the command says), 130;
* stdout closed by its reader (`ds4 -p ... | head -1`): no message, 141, the status of a C
  program killed by SIGPIPE, so pipelines treat it as the reader's choice, not a failure.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Sequence

import click
import mlx.core as mx

from ds4.errors import Ds4Error, one_line
from ds4.textfile import undecodable, utf8_problem

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141


class FiniteFloat(click.FloatRange):
    """A float option in a range that also refuses nan and inf (which pass every comparison or
    satisfy an open bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class Utf8Text(click.ParamType):
    """A text argument that must be UTF-8 (Python keeps other bytes of argv as surrogates, which
    the tokenizer and the output streams cannot take)."""

    name = "text"

    def convert(self, value, param, ctx):
        problem = undecodable(value) if isinstance(value, str) else None
        if problem:
            self.fail(f"not UTF-8 text ({problem})", param, ctx)
        return value


UTF8_TEXT = Utf8Text()
SEED = click.IntRange(0, 2**64 - 1)  # what every RNG ds4 seeds (MLX keys, numpy) takes
# Help text of every output-file option (the rule is ds4.atomic's).
OUTPUT_HELP = ("a regular file is replaced only once complete; a symlink's target is replaced, "
               "a device or FIFO written in place")


def select_backend(backend: str | None) -> str:
    """Set MLX's default device ("metal", "cuda" or "cpu"); `None` picks the best available
    (a GPU, else the CPU). Returns the backend chosen."""
    gpu = {"metal": mx.metal.is_available(), "cuda": mx.cuda.is_available()}
    if backend is None:
        backend = next((b for b, ok in gpu.items() if ok), "cpu")
    elif backend != "cpu" and not gpu[backend]:
        raise Ds4Error(f"{backend} backend unavailable in this MLX build, expected one of: "
                       + ", ".join(["cpu"] + [b for b, ok in gpu.items() if ok]))
    mx.set_default_device(mx.cpu if backend == "cpu" else mx.gpu)
    return backend


BACKENDS = click.Choice(["metal", "cuda", "cpu"])


def run(prog: str, body: Callable[[], int | None]) -> None:
    """Run `body` (a command's work) inside the boundary; exit with its status unless 0."""
    try:
        code = body()
        # A full or closed stdout shows up at the last flush: report it here, not at exit.
        sys.stdout.flush()
    except click.exceptions.Exit as e:  # --help and friends
        code = e.exit_code
    except click.UsageError as e:
        code = _fail(prog, f"{e.format_message()} (see {prog} --help)", EXIT_USAGE)
    except click.ClickException as e:
        code = _fail(prog, e.format_message(), e.exit_code)
    except Ds4Error as e:
        code = _fail(prog, str(e), EXIT_ERROR)
    except (KeyboardInterrupt, click.exceptions.Abort) as e:  # a KeyboardInterrupt may say what was done
        code = _fail(prog, "; ".join(["interrupted", *map(str, e.args[:1])]), EXIT_INTERRUPTED)
    except BrokenPipeError:
        code = _broken_pipe()
    except OSError as e:
        code = _fail(prog, describe_os_error(e), EXIT_ERROR)
    except UnicodeDecodeError as e:
        code = _fail(prog, f"input is not UTF-8 text ({utf8_problem(e)})", EXIT_ERROR)
    except MemoryError:
        code = _fail(prog, "out of memory", EXIT_ERROR)
    if code:
        sys.exit(code)


def run_click(command: click.Command, argv: Sequence[str] | None, prog: str) -> None:
    """Parse `argv` (default: the process's arguments) and invoke a click command in the boundary.

    The command is invoked directly rather than through `Command.main`, whose own handling turns
    a broken stdout pipe into a silent exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        with command.make_context(prog, args) as ctx:
            command.invoke(ctx)

    run(prog, body)


def describe_os_error(e: OSError) -> str:
    """`<path>: <reason>` (both paths for a rename). Every file ds4 opens is named in its errors
    (`ds4.atomic`, `ds4.textfile`, the model loader), so an OSError without a path comes from
    writing the standard output (a full disk, a device error)."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return f"stdout: cannot write: {reason}"
    where = os.fsdecode(e.filename) + (f" -> {os.fsdecode(e.filename2)}" if e.filename2 is not None else "")
    return f"{where}: {reason}"


def _fail(prog: str, message: str, code: int) -> int:
    try:
        click.echo(f"{prog}: {one_line(message)}", err=True)
    except OSError:
        pass  # stderr itself is gone: the status still tells
    return code


def _broken_pipe() -> int:
    """A reader went away: stop quietly. Pointing stdout at /dev/null keeps Python's final flush
    at exit from printing a second error."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return EXIT_BROKEN_PIPE  # not a real stream (captured in tests)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return EXIT_BROKEN_PIPE
