"""Output files of the commands: what a path given as a file must be before any work (check_output_file), and
how it is written (atomic_output: a temporary file beside it, renamed into place), so that a command neither
replaces a device node nor leaves a half-written file under the name the user gave."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

from usercli import UserError


class OutputPathError(UserError, ValueError):
    """An output path that cannot be a file this command writes; the message names the option and the way out."""


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_output_file(path: str | Path, option: str, example: str = "out.file") -> Path:
    """The output file `path` (given with `option`) as a Path, refused before any work when it cannot be one: a
    path ending in '/', a folder, anything that exists and is not a regular file (/dev/null, /dev/full, a pipe),
    a parent folder that does not exist, or a parent that is a file. `example`: a file name for the message."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputPathError(f"{option} is empty; name a file, e.g. {example}")
    out = Path(text)
    if text.endswith(("/", os.sep)) or out.is_dir():
        raise OutputPathError(f"{option} {text} is a folder; name a file, e.g. {out / example}")
    if os.path.lexists(out):
        mode = os.stat(out).st_mode if out.exists() else os.lstat(out).st_mode
        if not stat.S_ISREG(mode):
            raise OutputPathError(f"{option} {text} is {_kind(mode)}, not a regular file; name a file to write, "
                                  f"e.g. {out.with_name(example)}")
    parent = out.parent
    if not parent.exists():
        blocker = next((p for p in parent.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise OutputPathError(f"{option} {text} cannot be written: {blocker} is a file, not a folder; choose "
                                  "another path")
        raise OutputPathError(f"{option} {text} cannot be written: the folder {parent} does not exist; make it "
                              "first or choose another path")
    if not parent.is_dir():
        raise OutputPathError(f"{option} {text} cannot be written: {parent} is a file, not a folder; choose "
                              "another path")
    return out


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` when the block ends without an error, removed
    otherwise (a full disk, Ctrl-C): readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before the rename makes it the file the user named
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
