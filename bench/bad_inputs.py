"""Run the bad-input matrix (tests/helpers/bad_input_cases.py, issue 17) and print its counts as one JSON line:

    python bench/bad_inputs.py [--work DIR] [--jobs 2] [--verbose]
    python bench/bad_inputs.py --generated [--work DIR] [--verbose]

{"tried": N, "clear": N, "traceback": N, "half_written": N, "seconds": S}: clear = one line on stderr naming the
file, key or option, no traceback (exit codes are checked by tests/integration/test_bad_inputs.py and listed with
--verbose).
--generated: the generated matrix instead (tests/helpers/bad_input_generated.py, issue 26: every config key, every
numeric option, every field of a sample's json, every launch variable, crossed with value kinds; every output of
every command x bad places, bad_input_outputs.py; every member of a shard set x damage x reader,
bad_input_members.py), in this process (two full-disk cases in child processes), no trained run needed:
{"tried": N, "clear": N, "accepted": N, "traceback": 0, "hang": 0, "half_written": 0, ..., "seconds": S};
accepted = documented acceptances; --verbose lists every case that is neither.
The tiny shard set, run and index are made under --work (a temporary folder by default) and reused there.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="folder for the fixtures and scratch (reused)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once")
    parser.add_argument("--verbose", action="store_true", help="one line per case that is not clear; the slowest")
    parser.add_argument("--generated", action="store_true", help="the generated matrix (issue 26) instead")
    parser.add_argument("cases", nargs="*", help="only these case names")
    args = parser.parse_args()
    # the matrices live beside the tests that assert them
    sys.path[:0] = [str(TESTS / "helpers"), str(TESTS), str(TESTS.parent)]
    from bad_input_cases import all_cases
    from bad_input_matrix import make_fixtures, run_matrix, summary
    from conftest import build_builtin

    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        build_builtin(shards, 96, 32, 32, 16)  # the tests' tiny_shards
    if args.generated:
        return generated(shards, work, args.verbose, start)
    fx = make_fixtures(work / "fixtures", shards)
    cases = [c for c in all_cases() if not args.cases or c.name in args.cases]
    scratch = work / f"cases-{int(time.time())}"
    results = run_matrix(fx, scratch, cases, args.jobs)
    if args.verbose:
        for case, result in zip(cases, results):
            if result.problems(case):
                print(f"{case.name}: {'; '.join(result.problems(case))}: {result.stderr.strip()[-300:]!r}",
                      file=sys.stderr)
        slowest = sorted(results, key=lambda r: -r.seconds)[:8]
        print("slowest: " + ", ".join(f"{r.name} {r.seconds:.1f} s" for r in slowest), file=sys.stderr)
    print(json.dumps({**summary(results), "seconds": round(time.perf_counter() - start, 1)}))
    return 0


def generated(shards: Path, work: Path, verbose: bool, start: float) -> int:
    from bad_input_generated import run_generated, summary

    results = run_generated(shards, work / f"generated-{int(time.time())}")
    if verbose:
        for r in results:
            if r.outcome not in ("refused", "accepted"):
                print(f"{r.name}: {r.outcome}: {r.detail[-300:]!r}", file=sys.stderr)
    print(json.dumps({**summary(results), "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
