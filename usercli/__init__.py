"""How every command of the project ends on bad input: one line on stderr, exit code 2, never a traceback.

Used by `python -m shards ...` and by each `python -m trainer.*` entry point: a leaf package of its own that
both import, so that neither depends on the other for it. The contract, tested by tests/integration/test_bad_inputs.py:

- exit 0: done; 2: refused (a file, key or option that cannot be used; the message names it and the way out);
  130: interrupted (Ctrl-C; the message says what is left and how to go on). `shards check` alone also exits 1,
  meaning "the shard set has problems" (they are its output, listed one per line).
- A user error is an exception of a class that derives from `UserError`, or an OSError about a named file
  (missing, a folder where a file belongs, no permission, a full disk): both become one line.
- Anything else is a bug and keeps its traceback (exit 1), so that it can be reported and fixed.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Input the user can fix; the message names the file, key or option and says what to do."""


class OutputExists(UserError, FileExistsError):  # noqa: N818 - named like FileExistsError, which it also is
    """An output path that is taken (a file where a folder belongs, a finished result); callers that catch
    FileExistsError still do."""


EXIT_USER = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

# OSErrors that describe the user's files or machine, not the program: each with the way out.
_OS_HINTS = {
    errno.ENOENT: "it does not exist; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file",
    errno.EEXIST: "it already exists; remove it or choose another path",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
    errno.EROFS: "read-only file system; choose a writable folder",
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EFBIG: "file too large for this file system or process limit (ulimit -f); free space or write elsewhere",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
}


def one_line(text: str) -> str:
    """Messages of nested errors (YAML, JSON, zip readers) may span lines: keep them on one."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def os_error_message(e: OSError) -> str | None:
    """The one-line message of a user-side OSError, or None when it is not one (then it is a bug)."""
    hint = _OS_HINTS.get(e.errno)
    if hint is None:
        return None
    where = e.filename if e.filename is not None else None
    if where is None:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return None  # no file named: the program's own doing, not the user's
        return f"writing failed: {hint}"
    target = f" -> {e.filename2}" if e.filename2 is not None else ""
    return f"{where}{target}: {hint}"


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows an option's default once: "(default: X)" is appended where the help text does not already
    speak of the default and there is one to show (not for None, False, a flag or a suppressed option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # a flag (store_true, ...): its default is its absence
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # argparse expands % in help texts


HELP_FLAGS = ("-h", "--help")


def exit_if_help(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> None:
    """`--help` answered from a command's parser alone: prints the help and exits 0 when argv asks for it (options
    before a bare `--`), else returns. Each `python -m trainer.X` calls it before importing the module that does
    the work, whose torch and DeepSpeed imports take seconds that help does not need."""
    options = list(argv)[: list(argv).index("--")] if "--" in argv else list(argv)
    if any(arg in HELP_FLAGS for arg in options):
        build_parser().parse_args(options)  # argparse prints the help (of a subcommand too) and exits


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are one line that names the option and points at --help (instead of the usage
    block, which buries the message)."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def cli_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
             prog: str = "error", interrupted_hint: str = "") -> int:
    """Run an entry point's `main(argv)` under the contract above; returns the exit code."""
    try:
        code = main(argv)
    except UserError as e:
        return _refuse(prog, one_line(e))
    except BrokenPipeError:  # the reader of our output went away (`... --help | head`): nothing left to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes stdout at exit; this keeps it quiet)
        return 0
    except KeyboardInterrupt:
        hint = f"; {interrupted_hint}" if interrupted_hint else ""
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        message = os_error_message(e)
        if message is None:
            raise
        return _refuse(prog, message)
    return 0 if code is None else int(code)


def _refuse(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USER
