"""Issue 26 part 1: the generated bad-input matrix. Its cases come from the code's own tables (every config key of
trainer/config/schema.py, every numeric option of every command's parser, every field of a sample's json, every
variable the launch scripts check, every output of every command, every member of a shard set) crossed
with value kinds; each must be refused with one clear line (exit 2, the key or option named, a way out, no
traceback, nothing written) or be a documented acceptance (bad_input_generated.ACCEPTED: key, kind, reason) whose
value really loads. The generator, the runners and the acceptance table are in tests/helpers/bad_input_generated.py;
`python bench/bad_inputs.py --generated` prints the counts.

All cases run in this process (no training, no process group) but a full disk, which two child processes of
the outputs family meet (tests/helpers/bad_input_outputs.py; the shard members: bad_input_members.py): one family
per test, each asserting an empty list
of failures that names the failing cases."""
from __future__ import annotations

import pytest
from bad_input_generated import ACCEPTED, config_cases, run_config_cases

FAILURES = ("traceback", "unclear", "silently_accepted", "hang", "half_written")


def _failures(results) -> str:
    bad = [r for r in results if r.outcome in FAILURES]
    return "\n".join(f"{r.name}: {r.outcome}: {r.detail[-400:]}" for r in bad)


@pytest.fixture(scope="module")
def config_results(tiny_shards, tmp_path_factory):
    return run_config_cases(config_cases(), tiny_shards, tmp_path_factory.mktemp("generated_config"))


def test_every_config_key_and_value_kind_is_refused_clearly_or_documented(config_results):
    failures = _failures(config_results)
    assert not failures, f"{failures.count(chr(10)) + 1} config cases are defects:\n{failures}"
    outcomes = {r.outcome for r in config_results}
    assert outcomes == {"refused", "accepted"}


def test_the_config_family_covers_every_key_with_every_kind(config_results):
    from bad_input_generated import config_keys

    keys = {key for key, _ in config_keys()}
    assert {r.target for r in config_results} == keys
    assert len(keys) >= 80  # the schema's leaves: a walk that found few would be a broken walk
    for key in keys:
        kinds = {r.kind for r in config_results if r.target == key}
        assert {"zero", "negative", "empty"} <= kinds or any(k.startswith("element:") for k in kinds), key
        assert any(k.startswith("wrong_type") for k in kinds), key
    assert len(config_results) >= 1000


def test_config_acceptances_are_all_met_and_really_load(config_results):
    accepted = {(r.target, r.kind) for r in config_results if r.outcome == "accepted"}
    stale = [row for row in ACCEPTED if row[0] in {r.target for r in config_results} and row not in accepted]
    assert not stale, f"ACCEPTED rows whose case is no longer accepted (remove them): {stale}"
    assert all(r.detail == ACCEPTED[(r.target, r.kind)] for r in config_results if r.outcome == "accepted")


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    from bad_input_generated import cli_cases, run_cli_cases

    return run_cli_cases(cli_cases(), tmp_path_factory.mktemp("generated_cli"))


def test_every_numeric_option_of_every_command_is_refused_clearly_or_documented(cli_results):
    failures = _failures(cli_results)
    assert not failures, f"{failures.count(chr(10)) + 1} option cases are defects:\n{failures}"


def test_the_cli_family_covers_every_command_with_numeric_options(cli_results):
    commands = {r.target.split()[0] for r in cli_results}
    assert commands >= {"shards", "trainer.retrieve", "trainer.plan", "trainer.extract_features", "trainer.train"}
    options = {r.target for r in cli_results}
    for option in ("shards build --train-images", "shards stats --top", "trainer.retrieve serve --port",
                   "trainer.retrieve query --k", "trainer.plan --gpu-mem-gib", "trainer.plan --headroom",
                   "trainer.extract_features --image-size", "shards build --emoji-val-fraction"):
        assert option in options, option
    assert len(cli_results) >= 400
    accepted = {(r.target, r.kind) for r in cli_results if r.outcome == "accepted"}
    stale = [row for row in ACCEPTED if row[0] in options and row not in accepted]
    assert not stale, f"ACCEPTED rows whose case is no longer accepted (remove them): {stale}"


@pytest.fixture(scope="module")
def sample_results(tiny_shards):
    from bad_input_generated import run_sample_cases, sample_cases

    return run_sample_cases(sample_cases(), tiny_shards)


def test_every_field_of_a_sample_json_is_skipped_under_its_kind_or_documented(sample_results):
    failures = _failures(sample_results)
    assert not failures, f"{failures.count(chr(10)) + 1} sample cases are defects:\n{failures}"


def test_the_sample_family_covers_every_json_field_and_member(sample_results):
    from shards.format import SAMPLE_FIELDS

    targets = {r.target for r in sample_results}
    assert targets >= set(SAMPLE_FIELDS) | {".json", ".png", ".jpg", ".webp"}
    for name in SAMPLE_FIELDS:
        kinds = {r.kind for r in sample_results if r.target == name}
        assert {"missing", "empty", "huge"} <= kinds and any(k.startswith("wrong_type") for k in kinds), name
    refused = [r for r in sample_results if r.outcome == "refused"]
    assert {r.detail.split(":")[0] for r in refused} >= {"malformed_json", "empty_captions", "concept_out_of_range",
                                                         "missing_json", "missing_image", "undecodable_image"}


@pytest.fixture(scope="module")
def launch_results(tmp_path_factory):
    from bad_input_generated import launch_cases, run_launch_cases

    return run_launch_cases(launch_cases(), tmp_path_factory.mktemp("generated_launch"))


def test_every_checked_variable_of_every_launch_script_is_refused_clearly_or_documented(launch_results):
    failures = _failures(launch_results)
    assert not failures, f"{failures.count(chr(10)) + 1} launch cases are defects:\n{failures}"
    variables = {r.target for r in launch_results}
    assert variables >= {"torchrun_multinode.sh NNODES", "torchrun_multinode.sh NODE_RANK", "cpu_2proc.sh NPROC",
                         "accelerate.sh NUM_PROCESSES", "deepspeed_hostfile.sh MASTER_PORT"}
    assert {r.kind for r in launch_results if r.target == "torchrun_multinode.sh NODE_RANK"} >= {
        "missing", "zero", "negative", "not_a_number", "out_of_range"}



@pytest.fixture(scope="module")
def output_results(tiny_shards, tmp_path_factory):
    from bad_input_outputs import output_cases, run_output_cases

    return run_output_cases(output_cases(), tiny_shards, tmp_path_factory.mktemp("generated_outputs"))


def test_every_output_of_every_command_refuses_bad_places_before_any_work(output_results):
    failures = _failures(output_results)
    assert not failures, f"{failures.count(chr(10)) + 1} output cases are defects:\n{failures}"
    assert {r.outcome for r in output_results} == {"refused"}


def test_the_output_table_holds_every_output_option_of_the_parsers(output_results):
    """A new output option (dest out, output, out_dir, ...) that OUTPUTS lacks fails here, as does a stale row."""
    from bad_input_outputs import OUTPUTS, output_options

    assert output_options() == set(OUTPUTS)
    assert {r.target for r in output_results} == set(OUTPUTS)
    for target, out in OUTPUTS.items():
        kinds = {r.kind for r in output_results if r.target == target}
        assert {"device", "read_only", "earlier_output"} <= kinds, target
        assert ({"folder", "ends_in_slash", "missing_parent"} if out.kind == "file" else {"existing_file"}) <= kinds
    assert {r.target for r in output_results if r.kind == "full_disk"} >= {"shards build --out",
                                                                          "trainer.train run.out_dir"}


@pytest.fixture(scope="module")
def member_results(tiny_shards, tmp_path_factory):
    from bad_input_members import member_cases, run_member_cases

    return run_member_cases(member_cases(), tiny_shards, tmp_path_factory.mktemp("generated_members"))


def test_every_member_of_a_shard_set_damaged_is_refused_naming_it_or_skipped_and_counted(member_results):
    failures = _failures(member_results)
    assert not failures, f"{failures.count(chr(10)) + 1} shard-member cases are defects:\n{failures}"
    accepted = {(r.target, r.kind, r.name.split(":")[1]) for r in member_results if r.outcome == "accepted"}
    assert {(member, reader) for member, _, reader in accepted} <= {("png", "stats")}


def test_the_member_family_covers_every_member_damage_and_reader(member_results):
    from bad_input_members import DAMAGE, READERS, SAMPLE_MEMBERS, SET_FILES

    assert {(r.target, r.kind, r.name.split(":")[1]) for r in member_results} == {
        (m, d, reader) for m in (*SET_FILES, *SAMPLE_MEMBERS) for d in DAMAGE for reader in READERS}
    # a symlink out of the set is refused naming the link, by every reader, for every file of the set
    for r in member_results:
        if r.kind == "symlink_out" and r.target in SET_FILES:
            assert r.outcome == "refused" and "outside the shard set" in r.detail, r.name
    # a bad sample inside a good tar: training skips it and counts it under a kind
    skipped = [r for r in member_results if r.name.startswith("members:train:") and r.target in SAMPLE_MEMBERS]
    assert skipped and all(r.detail.startswith("skipped and counted") for r in skipped)


def test_the_generated_matrix_holds_thousands_of_cases(config_results, cli_results, sample_results,
                                                       launch_results, output_results, member_results):
    from bad_input_generated import summary

    counts = summary(config_results + cli_results + sample_results + launch_results + output_results
                     + member_results)
    assert counts["tried"] >= 1000
    assert counts["clear"] + counts["accepted"] == counts["tried"], counts
