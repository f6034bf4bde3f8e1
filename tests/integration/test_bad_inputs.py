"""Issue 17: every entry point answers bad input with its documented exit code and ONE line that names the file,
key or option and the way out; no traceback; nothing half-written. The matrix and its contract are in
tests/helpers/bad_input_matrix.py, the cases in tests/helpers/bad_input_cases.py; `python bench/bad_inputs.py` counts
them."""
from __future__ import annotations

import pytest
from bad_input_cases import all_cases
from bad_input_matrix import make_fixtures, run_matrix

CASES = all_cases()


@pytest.fixture(scope="module")
def matrix(tiny_shards, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    fixtures = make_fixtures(root / "fixtures", tiny_shards)
    return {r.name: r for r in run_matrix(fixtures, root / "cases", CASES)}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_bad_input_gets_one_clear_line(matrix, case):
    result = matrix[case.name]
    problems = result.problems(case)
    assert not problems, f"{case.name}: {'; '.join(problems)}\nstderr:\n{result.stderr[-3000:]}\n" \
                         f"stdout:\n{result.stdout[-1000:]}"


def test_the_matrix_covers_every_entry_point_with_60_cases():
    assert len(CASES) >= 60
    entries = {c.entry for c in CASES}
    assert entries >= {"shards", "trainer.train", "trainer.evaluate", "trainer.export", "trainer.retrieve",
                       "trainer.extract_features", "trainer.plan", "bash"}
    scripts = {c.name.split("_")[1] for c in CASES if c.entry == "bash"}
    assert scripts >= {"cpu", "torchrun", "deepspeed", "accelerate", "slurm"}
    for command in ("build", "check", "stats"):
        assert any(c.entry == "shards" and command in c.name for c in CASES), command
    kinds = " ".join(c.name for c in CASES)
    for kind in ("missing", "empty", "truncated", "garbled", "is_a_folder", "is_a_file", "unwritable",
                 "full_disk", "interrupted", "unknown", "not_a_number"):
        assert kind in kinds, kind


def test_cli_main_contract(capsys):
    """usercli.cli_main: user errors are one line and exit 2, Ctrl-C 130, a bug keeps its traceback."""
    import errno

    from usercli import UserError, cli_main

    def raising(exc):
        def main(_argv):
            raise exc
        return main

    assert cli_main(raising(UserError("data.shards: x is missing;\n  build one")), [], "prog") == 2
    assert capsys.readouterr().err == "prog: error: data.shards: x is missing; build one\n"
    assert cli_main(raising(OSError(errno.ENOSPC, "No space left on device", "/out/model.pt")), [], "prog") == 2
    assert capsys.readouterr().err == "prog: error: /out/model.pt: no space left on the device; free some space " \
                                      "or write elsewhere\n"
    assert cli_main(raising(KeyboardInterrupt()), [], "prog", interrupted_hint="go on with --resume") == 130
    assert capsys.readouterr().err == "prog: interrupted; go on with --resume\n"
    with pytest.raises(ZeroDivisionError):  # a bug: not dressed up as a user error
        cli_main(raising(ZeroDivisionError()), [], "prog")
    with pytest.raises(FileNotFoundError):  # an OSError that names no file is the program's own doing
        cli_main(raising(FileNotFoundError("somewhere")), [], "prog")
    assert cli_main(lambda _argv: None, [], "prog") == 0
