"""The generated bad-input matrix (issue 26 part 1): cases made from the code's own tables, not picked by hand.

Families (each a function returning its cases, and one that runs them in THIS process and returns the results):

- config: every key of the typed config tree (the dataclasses of trainer/config/schema.py, walked) x the value
  kinds of VALUE_KINDS, given as a `section.key=value` override to `python -m trainer.train`'s main(argv). The
  command runs for real up to the point where work would start: trainer.training.loop.train is replaced by the
  checks that prepare() makes before any work (the DeepSpeed JSON against the batch sizes, the shard set's inputs:
  deepspeed_config, check_inputs); a config that passes them counts as accepted and nothing trains.
- cli: every numeric option of every command (the argparse parsers, found by running each entry point's main
  until it parses and walking parser._actions, subcommands included) x the same kinds, through main(argv) as
  `--option=VALUE`; a value the parser takes counts as accepted (the command is stopped there, before any work).
- launch: every variable a launch script checks (its `check_count NAME MIN [MAX]` lines) x {missing, empty,
  zero, negative, not a number, a fraction, huge, spaces, past the upper bound}, through `bash launch/SCRIPT` with
  the launchers stubbed (a case that would start them counts as accepted).
- sample: every field of a sample's json (shards.format.SAMPLE_FIELDS) x {missing, wrong type, empty, huge},
  through the training stream's decoder and the evaluation reader: each bad sample must be a BadSample of its
  kind (which the stream counts and skips) naming the field, never another exception.

A case is clear when it is refused with exit 2, exactly one line on stderr that names the key or option and the
way out, no traceback and nothing written; or when it is ACCEPTED and listed in ACCEPTED with its reason (and
then it really loads: the value reaches the config or the parsed options unchanged). Anything else is a defect.

Run by tests/integration/test_bad_inputs_generated.py and `python bench/bad_inputs.py --generated`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
HUGE_INT = "1" + "0" * 30  # beyond any machine integer
HUGE_FLOAT = "1e300"  # beyond float32 (the tensors' type) and any timeout a clock takes
CASE_BOUND_S = 10.0  # a case must be answered within this (each takes milliseconds)

# What a refusal says to show the way out: the rule the value breaks or what to do instead.
WAY_OUT = re.compile(r"must|expected|not one of|needs|cannot be used|name a|give|choose|build one|rebuild|"
                     r"make one|fix|is not a|does not exist|\bset\b|\b(pass|add|with) --", re.I)


@dataclass
class GenCase:
    family: str  # config, cli, sample
    name: str  # family:where:kind, unique
    target: str  # the config key, the option (`--k` of `trainer.retrieve query`) or the json field
    kind: str  # a VALUE_KINDS entry (sample: missing, wrong_type:..., empty, huge)
    value: str  # as typed (config, cli) or a description (sample)
    argv: list[str] = field(default_factory=list)  # config, cli
    entry: str = ""  # cli: the module whose main runs


@dataclass
class GenResult:
    name: str
    family: str
    target: str
    kind: str
    outcome: str  # refused, accepted, traceback, unclear, silently_accepted, hang, half_written
    detail: str = ""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.seconds > CASE_BOUND_S:  # in-process cases cannot be cut off; one past the bound is a hang
            self.outcome, self.detail = "hang", f"took {self.seconds:.1f} s (bound {CASE_BOUND_S} s): {self.detail}"


# ---------------------------------------------------------------------------------------------- value kinds

# kind -> the text a user would type, per the key's type (None: the kind does not apply to that type)
NUMBER_KINDS = {"nan": "nan", "nan:yaml": ".nan", "inf": "inf", "inf:yaml": ".inf", "-inf": "-inf",
                "-inf:yaml": "-.inf", "negative": "-1", "zero": "0", "empty": ""}
WRONG_TYPES = {
    int: {"wrong_type:word": "many", "wrong_type:fraction": "0.5", "wrong_type:bool": "true",
          "wrong_type:list": "[1, 2]", "wrong_type:mapping": "{a: 1}"},
    float: {"wrong_type:word": "many", "wrong_type:bool": "true", "wrong_type:list": "[1, 2]",
            "wrong_type:mapping": "{a: 1}"},
    str: {"wrong_type:number": "42", "wrong_type:bool": "true", "wrong_type:list": "[a, b]",
          "wrong_type:mapping": "{a: 1}"},
    bool: {"wrong_type:word": "maybe", "wrong_type:number": "1", "wrong_type:list": "[true]",
           "wrong_type:mapping": "{a: 1}"},
}


def value_kinds(annotation) -> dict[str, str]:
    """kind -> override text for a config key of this annotation: the wrong types of its base type, then nan,
    inf, -inf (as typed and in YAML's spelling), negative, zero, huge and empty."""
    base = _base_type(annotation)
    wrong = WRONG_TYPES.get(base, WRONG_TYPES[str] if base == "literal" else {
        "wrong_type:word": "many", "wrong_type:bool": "true", "wrong_type:mapping": "{a: 1}"})
    huge = HUGE_FLOAT if base is float else HUGE_INT
    return {**wrong, **NUMBER_KINDS, "huge": huge, "huge:negative": "-" + huge}


def _base_type(annotation):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "literal"
    if origin is list:
        return list
    if origin is not None and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _base_type(inner[0])
    if origin is typing.Union:  # a number or a word (model.local_score_weight)
        return float
    return annotation


def config_keys() -> list[tuple[str, Any]]:
    """(section.key, annotation) of every leaf of the config tree, in the schema's order."""
    from trainer.config import Config

    out = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            out.append((f"{section.name}.{f.name}", typing.get_type_hints(cls)[f.name]))
    return out


# ---------------------------------------------------------------------------------------------- family: config

# Overrides that make a key live, so that its own rule is what judges the value (not a rule about another key):
# the rules of trainer/config/schema.py that tie a key to another one.
CONFIG_CONTEXT: dict[str, tuple[str, ...]] = {
    "model.text_model_path": ("model.text_encoder=hf",),
    "model.text_grad_checkpointing": ("model.text_encoder=minilm",),
    "loss.global_hardest_temperature": ("loss.global_loss=hinge",),
    "loss.global_label_margin": ("loss.global_loss=hinge",),
    "data.mix_weights": ("data.mix_shards=[{shards}]",),
    "data.random_crop_min_area": ("data.random_crop=true",),
    "engine.compile_backend": ("engine.compile=true",),
    "model.backbone_weights": ("model.image_encoder=efficientnet_lite0",),
}
# A list key's element kinds are given inside a list of this form (the other entries valid).
LIST_TEMPLATE = {"optim.betas": "[{v}, 0.999]", "data.mix_weights": "[1.0, {v}]", "data.mix_shards": "[{v}]"}


def config_cases() -> list[GenCase]:
    cases = []
    for key, annotation in config_keys():
        kinds = value_kinds(annotation)
        if _base_type(annotation) is list:
            element = typing.get_args(annotation)[0]
            kinds = {**{k: v for k, v in value_kinds(list).items() if not k.startswith(("nan", "inf", "-inf"))},
                     "empty_list": "[]",
                     **{f"element:{k}": LIST_TEMPLATE[key].format(v=v or "null")
                        for k, v in value_kinds(element).items()}}
        for kind, value in kinds.items():
            cases.append(GenCase("config", f"config:{key}:{kind}", key, kind, value))
    return cases


class _Accepted(BaseException):
    """Raised where trainer.train would start its work: the config passed every check before it."""

    def __init__(self, cfg):
        super().__init__("accepted")
        self.cfg = cfg


def _pre_work_checks(cfg, overwrite: bool = False):
    """Stands in for trainer.training.loop.train: the refusals prepare() makes on every rank before any work
    (refuse_before_work: the DeepSpeed JSON, the shard sets' inputs, the compile backend), then stop."""
    import torch

    from trainer.distributed import DistInfo
    from trainer.training.loop import refuse_before_work

    refuse_before_work(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")))
    raise _Accepted(cfg)


@contextlib.contextmanager
def train_replaced(stand_in: Callable):
    """trainer.train's main with train() replaced by `stand_in`, and without its closing shutdown(): main() ends
    by destroying the process group, and a group that earlier in-process runs of the suite made (DeepSpeed keeps
    handles to it) must outlive these cases, as in the other in-process tests."""
    import trainer.training.loop as loop

    saved = loop.train, loop.shutdown
    loop.train, loop.shutdown = stand_in, lambda *_: None
    try:
        yield loop
    finally:
        loop.train, loop.shutdown = saved


def _config_argv(case: GenCase, shards: Path, out_dir: Path) -> list[str]:
    tiny = ("data.batch_size=16", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
            "model.word_dim=16", "data.num_workers=0", "data.shuffle_buffer=64",
            f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}")
    context = [c.format(shards=shards) for c in CONFIG_CONTEXT.get(case.target, ())]
    return ["--config", str(REPO / "configs" / "builtin.yaml"), f"data.shards={shards}", f"run.out_dir={out_dir}",
            *tiny, *context, f"{case.target}={case.value}"]


def _call(main: Callable, argv: list[str]) -> tuple[int | None, str, str, BaseException | None, str]:
    """main(argv) with stdout and stderr captured: (exit code or None when stopped by a sentinel, stdout, stderr,
    the sentinel, the traceback of anything else that escaped)."""
    out, err = io.StringIO(), io.StringIO()
    code, stopped, tb = None, None, ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except (_Accepted, _Parsed) as e:
            stopped = e
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except BaseException:  # noqa: BLE001 - what a user would see as a traceback
            tb = traceback.format_exc()
    return code, out.getvalue(), err.getvalue(), stopped, tb


def judge_refusal(code, err: str, names: tuple[str, ...]) -> tuple[str, str]:
    """(outcome, detail) of a run that did not stop at a sentinel."""
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in err:
        return "traceback", err[-2000:]
    if code != 2:
        return "unclear", f"exit {code}: {err[-500:]!r}"
    if len(lines) != 1:
        return "unclear", f"{len(lines)} lines on stderr: {err[-800:]!r}"
    if not all(n in lines[0] for n in names) or not WAY_OUT.search(lines[0]):
        return "unclear", f"the line lacks {names} or a way out: {lines[0]!r}"
    return "refused", lines[0]


def run_config_cases(cases: list[GenCase], shards: Path, scratch: Path) -> list[GenResult]:
    """Each case through trainer.train's main(argv) in this process, train() replaced by _pre_work_checks."""
    import yaml

    import trainer.training.loop as loop

    out_dir = scratch / "config_out"
    results = []
    with train_replaced(_pre_work_checks):
        for case in cases:
            start = time.perf_counter()
            code, _out, err, stopped, tb = _call(loop.main, _config_argv(case, shards, out_dir))
            if tb:
                outcome, detail = "traceback", tb[-2000:]
            elif stopped is not None:
                outcome, detail = _judge_accepted_config(case, stopped.cfg, yaml)
            else:
                outcome, detail = judge_refusal(code, err, (case.target,))
            if out_dir.exists():
                outcome, detail = "half_written", f"{out_dir} was made"
            results.append(GenResult(case.name, case.family, case.target, case.kind, outcome, detail,
                                     round(time.perf_counter() - start, 4)))
    return results


def _judge_accepted_config(case: GenCase, cfg, yaml) -> tuple[str, str]:
    section, key = case.target.split(".")
    got = getattr(getattr(cfg, section), key)
    if (case.target, case.kind) not in ACCEPTED:
        return "silently_accepted", f"{case.target}={case.value!r} accepted as {got!r} with no documented reason"
    want = yaml.safe_load(case.value) if case.value.strip() else None
    if got != want and not (isinstance(got, float) and isinstance(want, (int, str)) and got == float(want)):
        return "unclear", f"accepted, but the config holds {got!r}, not {want!r}"
    return "accepted", ACCEPTED[(case.target, case.kind)]


# ---------------------------------------------------------------------------------------------- documented acceptances

# (key or option, kind) -> why the value is legitimately valid there. A case accepted without a row here is a
# defect (silently accepted); a row whose case is refused is reported by the test as stale.
_NULL = "empty is null, the key's documented default meaning"
_NAME = "a word is a valid name here"
ACCEPTED: dict[tuple[str, str], str] = {
    **{("run.out_dir", k): f"{_NAME}: a run folder so named (relative to the working folder)"
       for k in ("nan", "inf", "-inf")},
    ("run.seed", "zero"): "seed 0 is a seed like any other in [0, 2**32)",
    **{("run.resume", k): f"{_NAME}: a checkpoint tag, looked up in RUN/checkpoints when the run starts (and "
       "refused there naming it: train_resume_without_checkpoints of the hand-picked matrix)"
       for k in ("nan", "inf", "-inf")},
    ("run.resume", "empty"): f"{_NAME}: {_NULL} (a fresh run)",
    ("data.num_workers", "zero"): "0 = samples are read in the main process (documented for torch's DataLoader)",
    ("data.samples_per_epoch", "zero"): "0 = an epoch is the train split's pictures (schema comment)",
    ("data.max_bad_fraction", "zero"): "0 = the strictest bound: any bad sample past bad_fraction_min_read stops",
    ("data.mix_shards", "empty_list"): "no extra shard sets: the default, no mixing",
    ("data.mix_weights", "empty_list"): "no weights: the sets in proportion to their sizes (schema comment)",
    ("data.shard_retries", "zero"): "0 = a failed read is not retried; the shard is skipped and counted",
    ("model.local_score_weight", "zero"): "0 = retrieval scores on the global space only",
    ("model.word_vectors", "empty"): f"{_NULL} (random word embeddings)",
    ("model.init_from", "empty"): f"{_NULL} (random initial weights)",
    ("model.backbone_weights", "empty"): f"{_NULL} (the installed package's ImageNet weights)",
    ("model.region_dropout", "zero"): "0 = no region dropout; the range is [0, 1)",
    ("loss.margin", "zero"): "a hinge without margin is a valid (if weak) hinge; the range is >= 0",
    ("loss.hinge_warmup_steps", "zero"): "0 = the hardest negative from the first step",
    ("loss.local_weight", "zero"): "0 = the local term is computed but not trained on (an ablation)",
    ("loss.local_margin", "zero"): "an adaptive hinge without margin; the range is >= 0",
    ("loss.concept_bce_weight", "zero"): "0 = no concept BCE term: the default",
    ("loss.label_mass", "zero"): "0 = the labelled columns get no share: plain one-hot targets; the range is [0, 1)",
    ("loss.label_mass", "empty"): f"{_NULL} (docs/design.md's target rule)",
    ("loss.global_exclude_above", "empty"): f"{_NULL} (no column excluded)",
    ("loss.global_hardest_temperature", "empty"): f"{_NULL} (the hard max)",
    ("optim.weight_decay", "zero"): "0 = no weight decay",
    ("optim.betas", "element:zero"): "beta1 = 0: Adam without momentum; each beta in [0, 1)",
    ("optim.warmup_steps", "zero"): "0 = no LR warmup",
    ("optim.min_lr_ratio", "zero"): "0 = the cosine decays to zero; the range is [0, 1]",
    ("optim.grad_clip", "zero"): "0 = no clipping (schema comment)",
    ("optim.text_lr_mult", "zero"): "0 = the pretrained text transformer is frozen (schema rule's message)",
    ("optim.backbone_lr_mult", "zero"): "0 = the pretrained backbone is frozen",
    ("optim.backbone_freeze_steps", "zero"): "0 = the backbone trains from the first step: the default",
    ("engine.threads", "zero"): "0 = cores / local processes (schema comment): the default",
    ("train.eval_every", "zero"): "0 = evaluated only at the end (schema comment)",
    ("train.ckpt_every", "zero"): "0 = a checkpoint only at the end (schema comment)",
}


# ---------------------------------------------------------------------------------------------- family: cli

# The commands whose options are walked: module -> the module whose main(argv) runs it.
COMMANDS = {
    "shards": "shards.__main__", "trainer.train": "trainer.training.loop",
    "trainer.train_args": "trainer.config.cli_args",
    "trainer.evaluate": "trainer.eval.evaluation", "trainer.export": "trainer.tools.export",
    "trainer.retrieve": "trainer.retrieval.commands", "trainer.plan": "trainer.tools.plan",
    "trainer.extract_features": "trainer.tools.extract_features", "trainer.universal": "trainer.engine.universal",
}
NUMERIC_TYPE_FACTORIES = ("int_in", "number_in", "bounded")  # usercli.options, shards.emoji_corpus


class _Parsed(BaseException):
    """Raised once a command's parser took its arguments (parsed) or, in discovery, before it parses (parser)."""

    def __init__(self, parser, parsed=None):
        super().__init__("parsed")
        self.parser, self.parsed = parser, parsed


@contextlib.contextmanager
def _parsers_stop(discover: bool):
    """argparse's top-level parse entries stop the command: before parsing (discover: the parser is wanted) or
    right after a successful parse (the command's work never starts)."""
    import argparse

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_intermixed_args

    def wrap(original):
        def parse(self, args=None, namespace=None):
            if discover:
                raise _Parsed(self)
            raise _Parsed(self, original(self, args, namespace))
        return parse

    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_intermixed_args = map(wrap, saved)
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_intermixed_args = saved


def command_parsers() -> dict[str, Any]:
    """command -> its top-level parser, as its main(argv) builds it."""
    import importlib

    parsers = {}
    with _parsers_stop(discover=True):
        for command, module in COMMANDS.items():
            _code, _out, _err, stopped, tb = _call(importlib.import_module(module).main, [])
            if stopped is None:
                raise RuntimeError(f"{command}: its main did not reach a parser ({tb[-500:]})")
            parsers[command] = stopped.parser
    return parsers


def _is_numeric(action) -> bool:
    t = action.type
    return t in (int, float) or getattr(t, "__qualname__", "").split(".")[0] in NUMERIC_TYPE_FACTORIES


def _subparsers(parser, path=()):
    """(subcommand path, parser) of a parser and every subparser under it."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def _filler(action) -> list[str]:
    """A valid value for a required argument, so that a parse can succeed."""
    if action.choices:
        return [str(next(iter(action.choices)))]
    if _is_numeric(action):
        for text in ("1", "8", "64", "0.5"):
            try:
                action.type(text)
                return [text]
            except Exception:  # noqa: BLE001 - the next candidate
                continue
    return ["x"]


def _required_args(parser, skip) -> tuple[list[str], list[str]]:
    """(positionals, options) that a parse of this parser needs (skip: the option under test)."""
    import argparse

    positionals, options = [], []
    for action in parser._actions:
        if action is skip or isinstance(action, argparse._SubParsersAction):
            continue
        if not action.option_strings and action.nargs not in ("*", "?", argparse.REMAINDER):
            positionals += _filler(action)
        elif action.option_strings and action.required:
            options += [action.option_strings[0], *_filler(action)]
    return positionals, options


def cli_cases(parsers: dict | None = None) -> list[GenCase]:
    cases = []
    for command, top in (parsers or command_parsers()).items():
        for path, parser in _subparsers(top):
            for action in parser._actions:
                if not action.option_strings or not _is_numeric(action):
                    continue
                option = max(action.option_strings, key=len)
                positionals, required = _required_args(parser, action)
                number = float if action.type is float or "number_in" in action.type.__qualname__ or \
                    _parses_fraction(action) else int
                for kind, value in value_kinds(number).items():
                    where = " ".join((command, *path, option))
                    argv = [*path, *positionals, *required, f"{option}={value}"]
                    cases.append(GenCase("cli", f"cli:{where}:{kind}", where, kind, value, argv, command))
    return cases


def _parses_fraction(action) -> bool:
    try:
        return isinstance(action.type("0.5"), float)
    except Exception:  # noqa: BLE001
        return False


def run_cli_cases(cases: list[GenCase], scratch: Path) -> list[GenResult]:
    import importlib
    import os

    results = []
    before = set(os.listdir(scratch))
    with _parsers_stop(discover=False), contextlib.chdir(scratch):
        for case in cases:
            start = time.perf_counter()
            option = case.target.split()[-1]
            code, _out, err, stopped, tb = _call(importlib.import_module(COMMANDS[case.entry]).main, case.argv)
            if tb:
                outcome, detail = "traceback", tb[-2000:]
            elif stopped is not None:
                outcome, detail = _judge_accepted_option(case, stopped.parsed, option)
            else:
                outcome, detail = judge_refusal(code, err, (option,))
            results.append(GenResult(case.name, case.family, case.target, case.kind, outcome, detail,
                                     round(time.perf_counter() - start, 4)))
    made = set(os.listdir(scratch)) - before
    if made:
        results.append(GenResult("cli:scratch", "cli", "scratch", "-", "half_written", f"written: {sorted(made)}"))
    return results


def _judge_accepted_option(case: GenCase, parsed, option: str) -> tuple[str, str]:
    if (case.target, case.kind) not in ACCEPTED:
        return "silently_accepted", f"{case.target}={case.value!r} parsed with no documented reason"
    got = getattr(parsed, option.lstrip("-").replace("-", "_"), None)
    if got is None or not math.isclose(float(got), float(case.value)):
        return "unclear", f"accepted, but the option holds {got!r}, not {case.value!r}"
    return "accepted", ACCEPTED[(case.target, case.kind)]
ACCEPTED.update({
    ("shards build --seed", "zero"): "seed 0 is a seed like any other",
    ("shards build --val-images", "zero"): "0 = a set without val pictures (int_in(0) by design)",
    ("shards build --test-images", "zero"): "0 = a set without test pictures (int_in(0) by design)",
    **{(f"shards build --{src}-{split}-fraction", "zero"): f"0 = no {src} groups in the {split} split; the range "
       "is [0, 1)" for src in ("emoji", "openmoji") for split in ("val", "test")},
    **{(f"shards build --{src}-limit", "zero"): "0 = every emoji (the option's help)" for src in ("emoji", "openmoji")},
    **{(f"{cmd} --local_rank", "zero"): "the deepspeed launcher's rank on the node, 0 for the first (the run reads "
       "LOCAL_RANK)" for cmd in ("trainer.train", "trainer.train_args")},
    ("trainer.retrieve serve --port", "zero"): "0 = any free port, printed (the option's help)",
    ("trainer.plan --num-concepts", "zero"): "0 = a set without concepts (loss.labels=none), int_in(0) by design",
})


# ---------------------------------------------------------------------------------------------- family: sample

BIG = 10**5  # entries of a huge list, characters of a huge string


def _field_kinds(name: str) -> dict[str, Any]:
    """kind -> the field's new value (_MISSING: removed) for one field of a sample's json."""
    kinds: dict[str, Any] = {"missing": _MISSING, "wrong_type:null": None, "wrong_type:bool": True,
                             "wrong_type:number": 42, "wrong_type:fraction": 0.5, "wrong_type:object": {"a": 1}}
    if name in ("image_id", "split", "source"):  # strings
        return {**kinds, "wrong_type:list": ["a"], "empty": "", "blank": "   ", "huge": "x" * BIG}
    kinds.update({"wrong_type:string": "a red star", "empty": [], "huge": "@huge"})
    if name == "captions":
        kinds.update({"element:wrong_type:number": [42], "element:wrong_type:null": [None],
                      "element:wrong_type:list": [["a"]], "element:empty": [""], "element:blank": ["  "],
                      "element:huge": ["word " * BIG]})
    else:  # concept id lists: image_concepts [ids], caption_concepts [[ids] per caption]
        ids = {"element:wrong_type:string": ["0"], "element:wrong_type:fraction": [0.5],
               "element:wrong_type:bool": [True], "element:wrong_type:null": [None], "element:negative": [-1],
               "element:huge": [10**30], "element:out_of_range": [10**6], "element:nested": [[0]]}
        kinds.update(ids if name == "image_concepts" else {k: "@per_caption" + json.dumps(v) for k, v in ids.items()})
        if name == "caption_concepts":
            kinds.update({"element:wrong_type:number": "@per_caption42", "too_few": "@too_few"})
    return kinds


_MISSING = object()
MEMBER_KINDS = {"missing": None, "zero_bytes": b"", "truncated": "@half", "garbage": b"\x00\xffnot this at all",
                "compressed": "@gzip"}


def sample_cases() -> list[GenCase]:
    from shards.format import SAMPLE_FIELDS

    cases = [GenCase("sample", f"sample:json.{name}:{kind}", name, kind, repr(value)[:60])
             for name in SAMPLE_FIELDS for kind, value in _field_kinds(name).items()]
    cases += [GenCase("sample", f"sample:member.{ext}:{kind}", f".{ext}", kind, kind)
              for ext in ("json", *PICTURE_MEMBERS) for kind in MEMBER_KINDS]
    return cases


PICTURE_MEMBERS = ("png", "jpg", "webp")  # the good sample's png, re-encoded for the others before the damage


def _as_member(sample: dict, ext: str) -> dict:
    """The good sample with its picture as `ext` (the shards keep a source's original bytes in any of them)."""
    import io

    from PIL import Image

    if ext in sample or ext not in PICTURE_MEMBERS:
        return sample
    out = io.BytesIO()
    Image.open(io.BytesIO(sample.pop("png"))).convert("RGB").save(out, format="JPEG" if ext == "jpg" else ext.upper())
    return {**sample, ext: out.getvalue()}


def _bad_sample(case: GenCase, good: dict) -> dict:
    """A copy of a good raw sample with the case's damage."""
    import gzip

    sample = dict(good)
    if case.target.startswith("."):
        ext, damage = case.target[1:], MEMBER_KINDS[case.kind]
        sample = _as_member(sample, ext)
        data = sample.pop(ext)
        if damage is not None:
            sample[ext] = {"@half": data[: len(data) // 2], "@gzip": gzip.compress(data)}.get(damage, damage)
        return sample
    meta = json.loads(good["json"])
    value = _field_kinds(case.target)[case.kind]
    if value is _MISSING:
        meta.pop(case.target, None)
    elif value == "@huge":
        meta[case.target] = _huge_list(case.target, meta)
    elif value == "@too_few":
        meta[case.target] = meta[case.target][:-1]
    elif isinstance(value, str) and value.startswith("@per_caption"):
        meta[case.target] = [json.loads(value[len("@per_caption"):])] * len(meta["captions"])
    else:
        meta[case.target] = value
    sample["json"] = json.dumps(meta).encode()
    return sample


def _huge_list(name: str, meta: dict) -> list:
    if name == "captions":  # many captions; caption_concepts kept in step so that only the size differs
        meta["caption_concepts"] = meta["caption_concepts"][:1] * BIG
        return meta["captions"][:1] * BIG
    if name == "caption_concepts":  # one per caption, each listing every concept many times
        return [list(range(min(3, len(meta["image_concepts"]) or 1))) * (BIG // 10)] * len(meta["captions"])
    return [0] * BIG


def run_sample_cases(cases: list[GenCase], shards: Path) -> list[GenResult]:
    """Each damaged sample through the training stream's decoder (json checks, picture decoding, tokens, the id's
    hash): refused = a BadSample of a named kind, which the stream counts under that kind and skips."""
    import random

    import webdataset as wds

    from trainer.data.samples import BAD_KINDS, BadSample, BadSampleCounter
    from trainer.data.shardset import ShardSet
    from trainer.data.stream import StreamSettings, TrainStream

    shardset = ShardSet.open(shards)
    stream = TrainStream(shardset, "train", StreamSettings(batch_size=2, image_size=32, max_words=32,
                                                           shuffle_buffer=1, resampled=False, seed=0),
                         rank=0, world_size=1)
    good = next(iter(wds.tarfile_to_samples()([{"url": stream.urls[0]}])))
    results = []
    for case in cases:
        start = time.perf_counter()
        counter = BadSampleCounter()
        try:
            stream._decode(_bad_sample(case, good), random.Random(0), counter)
            outcome, detail = _judge_accepted_sample(case)
        except BadSample as e:
            named = case.target.lstrip(".") in str(e) or case.target.lstrip(".") in PICTURE_MEMBERS
            ok = e.kind in BAD_KINDS and e.kind not in ("truncated_tar", "other") and named
            outcome = "refused" if ok else "unclear"
            detail = f"{e.kind}: {str(e)[:300]}"
        except Exception:  # noqa: BLE001 - counted as a cut-off tar by the stream's handler: a wrong kind
            outcome, detail = "traceback", traceback.format_exc()[-1500:]
        results.append(GenResult(case.name, case.family, case.target, case.kind, outcome, detail,
                                 round(time.perf_counter() - start, 4)))
    return results


def _judge_accepted_sample(case: GenCase) -> tuple[str, str]:
    if (f"json.{case.target}", case.kind) not in ACCEPTED:
        return "silently_accepted", f"{case.target} {case.kind} ({case.value}) decoded with no documented reason"
    return "accepted", ACCEPTED[(f"json.{case.target}", case.kind)]
_INFORMATIONAL = "informational: the trainer reads neither field (the manifest lists the splits, the set's source)"
ACCEPTED.update({
    ("json.image_id", "missing"): "a sample without an id is known by its key (parse_meta)",
    ("json.image_id", "huge"): "an id of any length is hashed to 63 bits for the loss; evaluation keys on it as is",
    ("json.captions", "huge"): "many captions: training draws one per sample, evaluation ranks them all",
    ("json.caption_concepts", "huge"): "repeated valid ids set the same label once (multi-hot)",
    ("json.image_concepts", "empty"): "a picture with no concept of the vocabulary: an all-zero label row",
    ("json.image_concepts", "huge"): "repeated valid ids set the same label once (multi-hot)",
    **{(f"json.{name}", kind): _INFORMATIONAL for name in ("split", "source")
       for kind in _field_kinds("split")},
})


# ---------------------------------------------------------------------------------------------- all families


def summary(results: list[GenResult]) -> dict:
    """The counts bench/bad_inputs.py --generated prints: clear = refused with one clear line (or, for samples,
    skipped under its kind); accepted = a documented acceptance that really loads."""
    count = lambda outcome: sum(r.outcome == outcome for r in results)  # noqa: E731
    return {"tried": len(results), "clear": count("refused"), "accepted": count("accepted"),
            "traceback": count("traceback"), "hang": count("hang"), "half_written": count("half_written"),
            "unclear": count("unclear"), "silently_accepted": count("silently_accepted")}


def run_generated(shards: Path, scratch: Path) -> list[GenResult]:
    """Every family, in this process (the full-disk cases of `outputs` in child processes)."""
    from bad_input_members import member_cases, run_member_cases
    from bad_input_outputs import output_cases, run_output_cases

    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "cli").mkdir(exist_ok=True)
    return (run_config_cases(config_cases(), shards, scratch) + run_cli_cases(cli_cases(), scratch / "cli")
            + run_sample_cases(sample_cases(), shards) + run_launch_cases(launch_cases(), scratch / "launch")
            + run_output_cases(output_cases(), shards, scratch / "outputs")
            + run_member_cases(member_cases(), shards, scratch / "members"))


# ---------------------------------------------------------------------------------------------- family: launch

# The launch scripts' own table: every `check_count NAME MIN [MAX]` in them. Each script runs with a valid
# environment (LAUNCH_BASE) but for the variable under test; the launchers it would start (torchrun, deepspeed,
# accelerate) and the preflight's python are stubs that print LAUNCHED: accepted = the launch would start.
LAUNCH_SCRIPTS = ("cpu_2proc.sh", "torchrun_multinode.sh", "accelerate.sh", "deepspeed_hostfile.sh")
LAUNCH_BASE = {
    "cpu_2proc.sh": {},
    "torchrun_multinode.sh": {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
    "accelerate.sh": {"NUM_PROCESSES": "2", "NUM_MACHINES": "2", "MACHINE_RANK": "0", "MAIN_PROCESS_IP": "127.0.0.1"},
    "deepspeed_hostfile.sh": {"HOSTFILE": "{scratch}/hostfile"},
}
_CHECK_COUNT = re.compile(r"check_count (\w+) (\d+)(?: (\d+|\$\(\(10#\$\w+ - 1\)\)))?")


def launch_cases() -> list[GenCase]:
    cases = []
    for script in LAUNCH_SCRIPTS:
        checks = {m.group(1): m.group(3) for m in _CHECK_COUNT.finditer((REPO / "launch" / script).read_text())}
        for name, high in checks.items():
            kinds = {"missing": None, "empty": "", "zero": "0", "negative": "-1", "not_a_number": "two",
                     "fraction": "1.5", "huge": HUGE_INT, "spaces": " 1 "}
            if high:  # past the upper bound: a number, or NNODES-1 with the base's 2 nodes
                kinds["out_of_range"] = str(int(high) + 1) if high.isdigit() else "2"
            for kind, value in kinds.items():
                cases.append(GenCase("launch", f"launch:{script} {name}:{kind}", f"{script} {name}", kind,
                                     "" if value is None else value, [script], "bash"))
    return cases


_DEFAULTED = "unset, the script's default is used (its usage line)"
ACCEPTED.update({
    ("cpu_2proc.sh NPROC", "missing"): f"{_DEFAULTED}: 2 processes",
    ("torchrun_multinode.sh NODE_RANK", "zero"): "0 is the first node's rank, in 0 .. NNODES-1",
    ("torchrun_multinode.sh NPROC_PER_NODE", "missing"): f"{_DEFAULTED}: gpu where nvidia-smi is, else 1",
    ("torchrun_multinode.sh NPROC_PER_NODE", "empty"): "empty is unset here (${NPROC_PER_NODE:-}): gpu or 1",
    ("torchrun_multinode.sh MASTER_PORT", "missing"): f"{_DEFAULTED}: 29500",
    ("torchrun_multinode.sh MASTER_PORT", "empty"): "empty is unset here (${MASTER_PORT:-}): 29500",
    ("accelerate.sh NUM_MACHINES", "missing"): f"{_DEFAULTED}: 1 machine",
    ("accelerate.sh MACHINE_RANK", "missing"): f"{_DEFAULTED}: machine 0",
    ("accelerate.sh MACHINE_RANK", "zero"): "0 is the first machine's rank, in 0 .. NUM_MACHINES-1",
    ("accelerate.sh MAIN_PROCESS_PORT", "missing"): f"{_DEFAULTED}: 29500",
    ("deepspeed_hostfile.sh NODE_RANK", "missing"): f"{_DEFAULTED}: every node started over pdsh from this one",
    ("deepspeed_hostfile.sh NODE_RANK", "zero"): "0 is the hostfile's first line",
    ("deepspeed_hostfile.sh MASTER_PORT", "missing"): f"{_DEFAULTED}: 29500",
})


def _launch_stubs(scratch: Path) -> Path:
    stubs = scratch / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    for tool in ("torchrun", "deepspeed", "accelerate", "python"):
        path = stubs / tool
        path.write_text("#!/bin/sh\n" + ("exit 0\n" if tool == "python" else "echo LAUNCHED\n"))
        path.chmod(0o755)
    (scratch / "hostfile").write_text("127.0.0.1 slots=1\n")
    return stubs


def run_launch_cases(cases: list[GenCase], scratch: Path) -> list[GenResult]:
    """Each case a `bash launch/SCRIPT CONFIG` with the variable under test set, emptied or removed."""
    import os
    import subprocess

    stubs = _launch_stubs(scratch)
    results = []
    for case in cases:
        script, name = case.target.split()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT", "NODE_RANK", "NNODES")}
        env.update({k: v.format(scratch=scratch) for k, v in LAUNCH_BASE[script].items()})
        env.update(PATH=f"{stubs}{os.pathsep}{env.get('PATH', '')}", PYTHON=str(stubs / "python"))
        env.pop(name, None)
        if case.kind != "missing":
            env[name] = case.value
        start = time.perf_counter()
        try:
            done = subprocess.run(["bash", str(REPO / "launch" / script), str(REPO / "configs" / "builtin.yaml")],
                                  capture_output=True, text=True, env=env, cwd=scratch, timeout=CASE_BOUND_S)
        except subprocess.TimeoutExpired:
            results.append(GenResult(case.name, case.family, case.target, case.kind, "hang", "timed out"))
            continue
        if "LAUNCHED" in done.stdout and done.returncode == 0:
            documented = ACCEPTED.get((case.target, case.kind))
            outcome, detail = ("accepted", documented) if documented else (
                "silently_accepted", f"{name}={case.value!r} ({case.kind}) launched with no documented reason")
        else:
            outcome, detail = judge_refusal(done.returncode, done.stderr, (name,))
        results.append(GenResult(case.name, case.family, case.target, case.kind, outcome, detail,
                                 round(time.perf_counter() - start, 4)))
    return results
