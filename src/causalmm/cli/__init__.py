"""The ``causalmm`` command line: a thin layer over the public API.

User errors (bad flags, missing image, unknown model) print one line ``error: ...`` and exit with code 2;
nothing below the API is shown to the user as a traceback. One module per group of commands: :mod:`.single`
(generate, visualize, explain, methods), :mod:`.bench` (eval, score, compare), :mod:`.tune` (tune, suite), :mod:`.fit`
(fit), :mod:`.toy` (demo, plumbing, toyworld); :mod:`.common` holds what they share.
"""

from __future__ import annotations

import errno
import os
import sys

import typer

from .common import console, user_errors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="CausalMM: counterfactual-attention decoding that makes vision-language models hallucinate less.",
)

__all__ = ["app", "main", "user_os_error"]


def _register() -> None:
    """Add every command to :data:`app`, in the order ``--help`` lists them."""
    from . import bench, fit, single, toy
    from . import tune as tuning
    from .common import DecodingCommand

    app.command(cls=DecodingCommand)(single.generate)
    app.command("eval", cls=DecodingCommand)(bench.eval_)
    app.command()(bench.score)
    app.command()(bench.compare)
    app.command()(tuning.tune)
    app.command()(tuning.suite)
    app.command()(single.visualize)
    app.command(cls=DecodingCommand)(single.explain)
    app.command()(single.methods)
    app.command("app")(single.app)
    app.command()(toy.demo)
    app.command()(toy.plumbing)
    app.add_typer(fit.fit_app, name="fit")
    app.add_typer(toy.toyworld_app, name="toyworld")


_register()


#: OS errors a user causes (a path that is a directory, a file in the way, no permission, a full or read-only
#: disk): the CLI reports them in one line. Every other exception stays a traceback: it is a bug to report.
_USER_OS_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


_USER_ERRNOS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
}


_OS_HINTS = {
    PermissionError: "check the permissions, or choose another path",
    IsADirectoryError: "give a file path, not a directory",
    NotADirectoryError: "a part of the path is a file, not a directory",
    FileExistsError: "a file is in the way; move it or choose another path",
}


def user_os_error(err: BaseException) -> str | None:
    """The one-line message for an OS error the user caused (naming the path), ``None`` for anything else."""
    if not isinstance(err, OSError) or not (isinstance(err, _USER_OS_ERRORS) or err.errno in _USER_ERRNOS):
        return None
    hint = next((h for cls, h in _OS_HINTS.items() if isinstance(err, cls)), None) or _USER_ERRNOS[err.errno]
    paths = [os.fsdecode(p) for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(paths) if paths else "(the path was not reported)"
    what = (err.strerror or type(err).__name__).lower()
    return f"{what}: {where}; {hint}"


def main() -> None:
    """Console entry point.

    A safety net below every command: the project's user errors and the OS errors a user causes end as one
    ``error:`` line (exit code 2) even where a command does not catch them; any other exception is a bug and
    keeps its traceback.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own one-line errors
    try:
        app()
    except Exception as err:  # not SystemExit, which ends every run: the user errors' modules load only on an error
        user = isinstance(err, user_errors())
        line = str(err) if user else user_os_error(err)
        if line is None:
            raise
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
