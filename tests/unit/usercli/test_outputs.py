"""usercli.outputs (issue 26, outputs are files): a path given as an output file is refused before any work when it
is a device, a pipe, a folder (or ends in '/'), or has no folder to go into; the file is written through a
temporary renamed into place. Only the check runs against /dev/null and /dev/full: nothing is written there."""
from __future__ import annotations

import os

import pytest

from usercli import UserError
from usercli.outputs import atomic_output, check_output_file


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_a_device_is_refused(device):
    with pytest.raises(UserError, match=f"^--out {device} is a device, not a regular file; name a file"):
        check_output_file(device, "--out", "model.pt")


def test_a_pipe_a_folder_a_trailing_slash_and_a_missing_or_blocked_folder_are_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "blocker").write_text("a file")
    cases = {
        str(tmp_path / "pipe"): "is a named pipe, not a regular file",
        str(tmp_path): f"is a folder; name a file, e.g. {tmp_path / 'model.pt'}",
        f"{tmp_path}/newdir/": "is a folder; name a file",
        str(tmp_path / "nowhere" / "model.pt"): f"the folder {tmp_path / 'nowhere'} does not exist; make it first",
        str(tmp_path / "blocker" / "deeper" / "model.pt"): f"{tmp_path / 'blocker'} is a file, not a folder",
        str(tmp_path / "blocker" / "model.pt"): f"{tmp_path / 'blocker'} is a file, not a folder",
        "": "--out is empty",
    }
    for path, why in cases.items():
        with pytest.raises(UserError) as refused:
            check_output_file(path, "--out", "model.pt")
        assert why in str(refused.value), (path, str(refused.value))
        assert str(refused.value).startswith("--out"), path
    assert not (tmp_path / "newdir").exists()


def test_a_new_or_existing_regular_file_is_fine_and_written_whole_or_not_at_all(tmp_path):
    out = check_output_file(str(tmp_path / "model.pt"), "--out")
    with atomic_output(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"
    assert check_output_file(out, "--out") == out  # an existing file is replaced, as before
    with pytest.raises(KeyboardInterrupt), atomic_output(out) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
