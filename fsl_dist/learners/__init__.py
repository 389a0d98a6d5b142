"""Families of few-shot learners behind one interface (``Learner``): the trainer's step,
evaluation and prediction call it, never a family's functions directly.

    learner = learner_from_config(cfg, model)       # training
    learner.meta_backward(tasks, step=0, precision="no")
    learner.evaluate_tasks(tasks, precision="no")["acc_after_per_task"]
    learner.adapt(support_x, support_y, precision="no").logits(query_x)

Adding a family: one module here with a ``Learner`` subclass, its names in ``LEARNERS``, its
names in ``config.CHOICES["algorithm.name"]`` (a test checks they agree) and, if it has keys
of its own, one config section (``Learner.section``). See docs/guide/algorithms.md.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from fsl_dist.config import AlgorithmConfig, Config, ConfigError, ProtoNetConfig, RidgeConfig

from .base import STAT_KEYS, Adapted, Learner
from .maml import INNER_LR, MamlFamily
from .protonet import ProtoNet
from .ridge import RidgeHead

# algorithm.name -> the family that answers it
LEARNERS = {"maml": MamlFamily, "boil": MamlFamily, "anil": MamlFamily, "protonet": ProtoNet,
            "ridge": RidgeHead}
SECTIONS = {"protonet": ProtoNetConfig, "ridge": RidgeConfig}

__all__ = ["INNER_LR", "LEARNERS", "STAT_KEYS", "Adapted", "Learner", "MamlFamily", "ProtoNet",
           "RidgeHead",
           "build_learner", "learner_from_config", "learner_from_description"]


def build_learner(model: nn.Module, algorithm: AlgorithmConfig, sections: dict,
                  evaluation_steps: int, test_shift: int = 0, **extra) -> Learner:
    """The learner of ``algorithm.name`` around ``model``; ``sections``: the families' own
    config sections by name (``Config`` attributes); ``test_shift``: ``eval.test_shift``."""
    family = LEARNERS[algorithm.name]
    if family is MamlFamily:
        if test_shift:
            raise ConfigError(f"test_shift {test_shift}: {algorithm.name} adapts by gradient "
                              "steps; test-time shifts are for protonet and ridge")
        return MamlFamily(model, algorithm, evaluation_steps, **extra)
    learner = family(model, sections[family.section], **extra)
    learner.test_shift = test_shift
    return learner


def learner_from_config(cfg: Config, model: nn.Module, **extra) -> Learner:
    sections = {name: getattr(cfg, name) for name in SECTIONS}
    return build_learner(model, cfg.algorithm, sections, cfg.evaluation_inner_steps(),
                         cfg.eval.test_shift, **extra)


def learner_from_description(description: dict, evaluation: dict, model: nn.Module) -> Learner:
    """The learner a model.yaml describes (its ``algorithm`` section and the family's own, if
    any; keys an older model.yaml lacks take their defaults, the behaviour before they
    existed)."""
    algorithm = _section(AlgorithmConfig, description["algorithm"])
    sections = {name: _section(cls, description.get(name) or {}) for name, cls in
                SECTIONS.items()}
    return build_learner(model, algorithm, sections, evaluation["inner_steps"],
                         evaluation.get("test_shift", 0))  # absent: written before it existed


def _section(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def check_way(cfg: Config) -> None:
    """``eval.n_way`` other than ``task.n_way`` needs a family whose model does not fix N."""
    if cfg.eval.n_way not in (None, cfg.task.n_way) and LEARNERS[cfg.algorithm.name].fixed_way:
        raise ConfigError(f"`eval.n_way` = {cfg.eval.n_way} differs from `task.n_way` = "
                          f"{cfg.task.n_way}, but {cfg.algorithm.name}'s head fixes N: leave "
                          "eval.n_way null (the families without a head, protonet and ridge, take "
                          "any N)")
