"""usercli.options (issue 26): numeric options refused where argparse reads them, naming the option: out of range,
not finite, not a number. `retrieve serve --port 70000` is the case that served on another port."""
from __future__ import annotations

import pytest

from trainer.retrieval.commands import build_parser as retrieve_parser
from usercli import OneLineParser
from usercli.options import PORT, int_in, number_in


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="prog")
    parser.add_argument("--port", type=int_in(*PORT))
    parser.add_argument("--size", type=int_in(1))
    parser.add_argument("--share", type=number_in(0, 1, low_open=True))
    parser.add_argument("--gib", type=number_in(0, low_open=True))
    return parser


@pytest.mark.parametrize("argv, expect", [
    (["--port", "70000"], "argument --port: must be in [0, 65535], got 70000"),
    (["--port", "-1"], "argument --port: must be in [0, 65535], got -1"),
    (["--port", "80.5"], "argument --port: expected a whole number in [0, 65535], got '80.5'"),
    (["--size", "0"], "argument --size: must be >= 1, got 0"),
    (["--size", "nan"], "argument --size: expected a whole number >= 1, got 'nan'"),
    (["--share", "nan"], "argument --share: must be a finite number in (0, 1], got nan"),
    (["--share", "0"], "argument --share: must be a finite number in (0, 1], got 0"),
    (["--share", "1.5"], "argument --share: must be a finite number in (0, 1], got 1.5"),
    (["--gib", "inf"], "argument --gib: must be a finite number > 0, got inf"),
    (["--gib=-inf"], "argument --gib: must be a finite number > 0, got -inf"),
    (["--gib", "lots"], "argument --gib: expected a number > 0, got 'lots'"),
])
def test_a_bad_number_is_one_line_naming_the_option(capsys, argv, expect):
    with pytest.raises(SystemExit) as refused:
        _parser().parse_args(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1 and expect in err, err


def test_good_numbers_pass():
    args = _parser().parse_args(["--port", "0", "--size", "7", "--share", "1", "--gib", "80"])
    assert (args.port, args.size, args.share, args.gib) == (0, 7, 1.0, 80.0)


def test_retrieve_serve_refuses_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit):
        retrieve_parser().parse_args(["serve", "--index", "idx", "--port", "70000"])
    assert "argument --port: must be in [0, 65535], got 70000" in capsys.readouterr().err
    assert int_in(1)("3") == 3
