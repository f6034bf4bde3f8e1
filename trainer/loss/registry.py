"""The one place where a loss config string picks its class: loss.global_loss, loss.local and loss.labels.

A new kind is one class in global_terms.py, local_terms.py or labels.py and one line here (and its name in
LossConfig's Literal, which checks the value when the config is read).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from trainer.config import LossConfig
from trainer.loss.global_terms import HingeGlobal, InfoNCEGlobal
from trainer.loss.labels import ConceptLabels, NoLabels, ShuffledLabels
from trainer.loss.local_terms import AdaptiveHingeLocal, NoLocal, SoftContrastiveLocal

GLOBAL_TERMS = {"hinge": HingeGlobal, "infonce": InfoNCEGlobal}
LOCAL_TERMS = {"contrastive": SoftContrastiveLocal, "adaptive_hinge": AdaptiveHingeLocal, "none": NoLocal}
# A label source is built from run.seed (only the shuffled control draws from it), not from the loss section.
LABEL_SOURCES: dict[str, Callable[[int], ConceptLabels | NoLabels]] = {
    "concepts": lambda seed: ConceptLabels(),
    "shuffled": ShuffledLabels,
    "none": lambda seed: NoLabels(),
}

Choice = TypeVar("Choice")


def pick(table: dict[str, Choice], key: str, name: str) -> Choice:
    """table[name]; a name the table lacks (a LossConfig built in code, past the YAML reader's check) is
    refused naming the config key and the known names."""
    if name not in table:
        raise ValueError(f"{key}: no such kind {name!r} (known: {', '.join(table)})")
    return table[name]


def build_global_term(cfg: LossConfig) -> HingeGlobal | InfoNCEGlobal:
    return pick(GLOBAL_TERMS, "loss.global_loss", cfg.global_loss)(cfg)


def build_local_term(cfg: LossConfig) -> SoftContrastiveLocal | AdaptiveHingeLocal | NoLocal:
    return pick(LOCAL_TERMS, "loss.local", cfg.local)(cfg)


def build_label_source(cfg: LossConfig, seed: int) -> ConceptLabels | NoLabels:
    return pick(LABEL_SOURCES, "loss.labels", cfg.labels)(seed)
