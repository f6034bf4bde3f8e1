"""Issue 26: config values the run cannot use are refused with one line naming the key: non-finite numbers (inf,
nan, 1e999) in any float key, a seed outside [0, 2**32), an empty config file and a key given twice in one section
of a YAML file (PyYAML would keep the last one silently)."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, LossConfig, OptimConfig, RunConfig, load_config

BUILTIN = "configs/builtin.yaml"


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=.nan", "optim.lr=1e999", "loss.temperature=inf",
                                      "loss.global_temperature=-.inf", "loss.margin=nan", "optim.grad_clip=inf",
                                      "data.batch_timeout_s=inf", "model.region_dropout=nan"])
def test_a_number_that_is_not_finite_is_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{key}: expected a finite number, got"):
        load_config(BUILTIN, [override], check_paths=False)


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20])
def test_a_seed_out_of_range_is_refused(seed):
    with pytest.raises(ConfigError, match=r"^run.seed: must be in \[0, 2\*\*32\)"):
        load_config(BUILTIN, [f"run.seed={seed}"], check_paths=False)
    assert load_config(BUILTIN, [f"run.seed={2**32 - 1}"], check_paths=False).run.seed == 2**32 - 1


def test_sections_built_in_code_check_finiteness_too():
    for build, key in ((lambda: OptimConfig(lr=float("inf")), "optim.lr"),
                       (lambda: LossConfig(temperature=float("nan")), "loss.temperature"),
                       (lambda: LossConfig(global_temperature=float("inf")), "loss.global_temperature"),
                       (lambda: RunConfig(seed=-5), "run.seed")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            build()
    assert Config().optim.lr > 0


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^config file {path} is empty; give a YAML file"):
        load_config(path, [], check_paths=False)


@pytest.mark.parametrize("text, key, line", [("train:\n  steps: 3\n  steps: 4\n", "steps", 3),
                                             ("data:\n  batch_size: 4\ntrain:\n  steps: 3\ndata:\n  max_words: 8\n",
                                              "data", 5)])
def test_a_key_given_twice_is_refused_with_its_line(tmp_path, text, key, line):
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {Path(BUILTIN).resolve()}\n" + text)
    with pytest.raises(ConfigError, match=f"key '{key}' is given twice in one section at line {line + 1}"):
        load_config(path, [], check_paths=False)
