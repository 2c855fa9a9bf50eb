"""The `bd3` command: a Typer app whose commands are thin wrappers over library calls.

Mistakes a user can make raise :class:`bd3.errors.Bd3Error`; ``run`` prints them as one
paragraph and exits with code 1 (``--debug`` shows the traceback). Usage errors exit 2.
Usage errors (a wrong option value) print one line and exit 2.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from bd3 import __version__
from bd3.cli.checkpoint_cmd import export_command, import_command
from bd3.cli.eval_cmd import evaluate, variance
from bd3.cli.options import upgrade_argv
from bd3.cli.report_cmd import report
from bd3.cli.sample_cmd import sample
from bd3.cli.tokenize_cmd import tokenize_command
from bd3.cli.train_cmd import finetune, pretrain
from bd3.errors import Bd3Error, Stopped, cannot_write

HELP = """Block diffusion language models (BD3-LMs): tokenize, pretrain, fine-tune, evaluate, sample.

A typical session, in an empty folder:

\b
  bd3 pretrain                                   # small model on the built-in corpus -> runs/<name>
  bd3 finetune --block-size 4 --clip 0.45,0.95  # continue the newest run at block size 4
  bd3 sample --max-tokens 16000 | less
  bd3 eval
"""

app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
app.command("tokenize")(tokenize_command)
app.command()(pretrain)
app.command()(finetune)
app.command("eval")(evaluate)
app.command()(sample)
app.command()(variance)
app.command("import")(import_command)
app.command("export")(export_command)
app.command()(report)


def _version(value: bool) -> None:
    if value:
        print(f"bd3 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    if debug:
        os.environ["BD3_DEBUG"] = "1"


def main(argv: list[str] | None = None) -> int:
    """Run the app on ``argv``; return the exit code."""
    try:
        rv = app(args=upgrade_argv(sys.argv[1:] if argv is None else argv), prog_name="bd3", standalone_mode=False)
    except Bd3Error as e:
        if os.environ.get("BD3_DEBUG"):
            raise
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("Interrupted.", file=sys.stderr)
        return 130
    except OSError as e:  # a write the command did not expect to fail (a full disk mid-run, a closed stdout)
        if os.environ.get("BD3_DEBUG"):
            raise
        return _write_failed(e)
    except MemoryError:
        print("Error: out of memory. Use a smaller --batch-size, --length or --model.", file=sys.stderr)
        return 1
    except Exception as e:
        if _is_out_of_memory(e) and not os.environ.get("BD3_DEBUG"):
            print(f"Error: out of memory ({str(e).splitlines()[0]}). Use a smaller --batch-size, --length or --model.", file=sys.stderr)
            return 1
        if not _is_usage_error(e):
            raise
        ctx = getattr(e, "ctx", None)
        where = f" Run '{ctx.command_path} --help' for usage." if ctx is not None else ""
        message = e.format_message().rstrip()
        print(f"Error: {message}{'' if message.endswith(('.', ')', '?')) else '.'}{where}", file=sys.stderr)
        return e.exit_code
    return rv if isinstance(rv, int) else 0


def _write_failed(e: OSError) -> int:
    """One line for an OSError no command turned into a Bd3Error. A reader that left
    (`bd3 eval --json | head`) is not an error; stdout is then pointed at /dev/null so the
    interpreter's final flush adds no message."""
    if isinstance(e, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    where = e.filename if e.filename is not None else "a file"
    print(f"Error: {cannot_write(where, e, 'check the path, its permissions and the free space')}", file=sys.stderr)
    return 1


def _is_out_of_memory(e: Exception) -> bool:
    """torch's OutOfMemoryError (CUDA) and the CPU allocator's 'can't allocate memory'."""
    text = str(e)
    return type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "allocate memory" in text)


def _is_usage_error(e: Exception) -> bool:
    """Click's usage errors (bad option values, unknown options), recognised by their API."""
    return hasattr(e, "format_message") and getattr(e, "exit_code", None) == 2


def run() -> None:
    """The console-script entry point."""
    sys.exit(main())
