"""The trained-model format: one writer, one reader.

A trained model is two files in its run folder (or any folder):

    model.safetensors   the model's weights; an algorithm's extra learned state under its own
                        prefix ("inner_lr.": the MAML family's learned step sizes)
    model.yaml          what rebuilds the model around them (``model``: backbone, head size,
                        input channels and side, batch-norm options), the ``algorithm`` and
                        ``task`` sections it was trained with, how evaluation adapts it
                        (``evaluation``: inner steps, precision), the data and its
                        ``preprocessing``, and how far training got (``step``, ``planned_steps``)

``write_trained`` writes both (the trainer at the end of a run); ``read_trained`` reads them
back (evaluation, prediction, ``model.init_from``), or a training checkpoint's weights with the
same description. model.yaml files of older runs stay readable: what they lack takes the value
it had when they were written (no per-step batch norm, no proximal inner loop), and a missing
``evaluation`` section comes from the run folder's config.yaml.

fsl-pretrain's model is described as what it is for few-shot use (``as_pretrained``): a body
that classifies by nearest centroid, which is ProtoNet's scoring at scale 1, so evaluation and
prediction take it as a ProtoNet model; its ``pretrained`` entry records the head over the train
classes (``model.n_way``), which holds weights but serves no episode. Pre-trained model.yaml
files written before that (a MAML description whose head is not the task's N) read as such.

    from fsl_dist.trained import read_trained

    trained = read_trained("runs/cnn_maml-0", "cpu")
    trained.model, trained.evaluation["inner_steps"]
    trained.learner.adapt(support_x, support_y, precision="no").logits(query_x)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from fsl_dist import checkpoint as ckpt
from fsl_dist.config import Config, ConfigError, ProtoNetConfig, load_config
from fsl_dist.data.preprocess import preprocessing_of
from fsl_dist.data.shards import load_manifest
from fsl_dist.io import atomic_write, atomic_write_text
from fsl_dist.learners import INNER_LR, LEARNERS, Learner, learner_from_description
from fsl_dist.models import build_model

WEIGHTS, DESCRIPTION, CONFIG = "model.safetensors", "model.yaml", "config.yaml"
__all__ = ["INNER_LR", "TrainedModel", "TrainedModelError", "as_pretrained", "build_described",
           "build_run_model", "check_shards", "describe", "find_checkpoint", "is_pretrained",
           "model_inputs", "read_trained", "write_trained"]


class TrainedModelError(ValueError):
    """A trained model that cannot be read: a file missing, or weights that do not fit the
    model its model.yaml describes. The message names the file."""


# ---------------------------------------------------------------- building the model


def model_inputs(manifest: dict) -> dict:
    """What the model takes from the data, always from the shard set's manifest: the image
    channels and side (a hand-kept config value could disagree with the shards)."""
    return {"in_channels": manifest["channels"], "image_size": manifest["image_size"]}


def bn_steps(cfg: Config) -> int:
    """Sets of batch-norm weights the model holds: one per training inner step with
    ``algorithm.per_step_bn_weights`` (MAML++'s BNWB), 0 (one plain set) without."""
    return cfg.algorithm.inner_steps if cfg.algorithm.per_step_bn_weights else 0


def model_facts(cfg: Config, inputs: dict, n_way: Optional[int] = None) -> dict:
    """model.yaml's ``model`` section: everything ``build_described`` needs. ``n_way``: the
    head's size where it is not the task's N (fsl-pretrain's head over the train classes)."""
    facts = {"name": cfg.model.name, "n_way": n_way or cfg.task.n_way, "width": cfg.model.width,
             **inputs, "bn_steps": bn_steps(cfg), "bn_stats": cfg.algorithm.per_step_bn_stats}
    if cfg.model.name == "resnet12":
        facts.update(drop_rate=cfg.model.drop_rate, dropblock_size=cfg.model.dropblock_size)
    return facts


def build_described(facts: dict) -> torch.nn.Module:
    """The model a ``model`` section describes, freshly initialised (the one place a model is
    built: training, evaluation and prediction alike)."""
    options = dict(width=facts["width"], in_channels=facts["in_channels"],
                   image_size=facts["image_size"],
                   bn_steps=facts.get("bn_steps", 0),  # absent: exported before BNWB
                   bn_stats=facts.get("bn_stats", False))
    for key in ("drop_rate", "dropblock_size"):  # ResNet-12's (absent: exported before them)
        if key in facts:
            options[key] = facts[key]
    return build_model(facts["name"], facts["n_way"], **options)


def build_run_model(cfg: Config, inputs: dict) -> torch.nn.Module:
    """The configured backbone for images of ``inputs`` (``model_inputs``)."""
    return build_described(model_facts(cfg, inputs))


# ---------------------------------------------------------------- the writer


def data_facts(manifest: dict) -> dict:
    """What run.json and model.yaml record about the data the model was trained on."""
    return {"dataset": manifest["dataset"], "split": manifest.get("split"),
            "channels": manifest["channels"], "image_size": manifest["image_size"],
            "format_version": manifest["format_version"]}


def describe(cfg: Config, manifest: dict, step: Optional[int] = None,
             pretrained: Optional[int] = None) -> dict:
    """model.yaml's contents for a model of ``cfg`` trained on the shards of ``manifest``;
    ``pretrained``: the classes of fsl-pretrain's head (``as_pretrained``)."""
    section = LEARNERS[cfg.algorithm.name].section  # the family's own keys, if any
    description = {
        "model": model_facts(cfg, model_inputs(manifest)),
        "algorithm": dataclasses.asdict(cfg.algorithm),
        **({section: dataclasses.asdict(getattr(cfg, section))} if section else {}),
        "task": dataclasses.asdict(cfg.task),
        "data": data_facts(manifest),
        # What prediction needs to adapt and score as evaluation does, without the config.
        "evaluation": evaluation_of(cfg),
        "preprocessing": preprocessing_of(manifest),
        # A stopped run exports too: these say how far it got, for whoever evaluates it.
        "step": step,
        "planned_steps": cfg.train.steps,
    }
    return description if pretrained is None else as_pretrained(description, pretrained)


# fsl-pretrain's few-shot use: nearest centroid, i.e. ProtoNet's -distance at a fixed scale 1
PRETRAINED_FAMILY = "protonet"
PRETRAINED_SCALE = ProtoNetConfig(scale=1.0, learn_scale=False)


def as_pretrained(description: dict, classes: int) -> dict:
    """The description of fsl-pretrain's model, from its config's (``describe``): its body is
    used by nearest centroid (squared Euclidean distance to the class means of the support
    features, in full precision), as fsl-pretrain validates it and ``fsl-evaluate --method
    centroid`` scores it; that is ProtoNet's scoring at scale 1 with no learned scale and no
    inner steps. ``model.n_way`` stays the head's ``classes`` (the weights hold it) and
    ``pretrained`` records them."""
    out = {"model": {**description["model"], "n_way": classes},
           "pretrained": {"classes": classes, "method": "centroid"},
           "algorithm": {**description["algorithm"], "name": PRETRAINED_FAMILY},
           PRETRAINED_FAMILY: dataclasses.asdict(PRETRAINED_SCALE)}
    out.update({k: v for k, v in description.items() if k not in out})
    # the centroid method runs in full precision whatever precision the body trained in
    out["evaluation"] = {"inner_steps": 0, "precision": "no"}
    return out


def is_pretrained(description: dict) -> bool:
    """Whether a model.yaml (as ``read_trained`` returns it) describes fsl-pretrain's model."""
    return "pretrained" in description


def write_trained(folder: Path, model: torch.nn.Module, cfg: Config, manifest: dict, *,
                  extras: Optional[dict] = None, step: int = 0,
                  pretrained: Optional[int] = None) -> None:
    """model.safetensors and model.yaml of ``model`` in ``folder`` (atomic writes).

    ``extras``: an algorithm's learned state besides the model, name -> ``nn.Module`` (or
    None: nothing), stored under "<name>." (``read_trained`` returns it as ``extras``).
    ``pretrained``: the size of fsl-pretrain's head over the train classes (``as_pretrained``)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, module in (extras or {}).items():
        if module is not None:
            tensors.update({f"{name}.{k}": v.detach().cpu().contiguous()
                            for k, v in module.state_dict().items()})
    folder = Path(folder)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(folder / DESCRIPTION, yaml.safe_dump(
        describe(cfg, manifest, step, pretrained), sort_keys=False))


# ---------------------------------------------------------------- the reader


@dataclass
class TrainedModel:
    """A trained model as ``read_trained`` returns it.

    Attributes:
        model: the network, its weights loaded, on the device asked for.
        description: model.yaml's contents (for a checkpoint of a run that has not exported
            yet: what it would write).
        evaluation: how evaluation adapts it: ``inner_steps`` and ``precision``.
        learner: its family's ``Learner`` around ``model`` (fsl_dist/learners), learned state
            (the MAML family's step sizes, ProtoNet's scale) loaded.
        weights: the file the weights came from (model.safetensors or a checkpoint).
        folder: the folder read (the run folder, or the model's own folder).
        cfg: the run folder's config (None where there is no config.yaml beside the files).
    """

    model: torch.nn.Module
    description: dict
    evaluation: dict
    learner: Learner
    weights: Path
    folder: Path
    cfg: Optional[Config] = None

    @property
    def step(self) -> Optional[int]:
        """The training step of the weights (None if unknown)."""
        from_name = ckpt.step_of(self.weights)
        return from_name if from_name is not None else self.description.get("step")


def read_trained(path: str | Path, device: str | torch.device, *,
                 checkpoint: Optional[str] = None, with_config: bool = False) -> TrainedModel:
    """The trained model of a run folder, of a folder holding model.safetensors and model.yaml,
    or of the path of either file, on ``device``.

    ``checkpoint`` ("latest", a step number or a path) takes the weights of a training
    checkpoint of the run folder instead, so that a run still training, or stopped, can be
    evaluated at any kept step. ``with_config`` (evaluation) needs the run's config.yaml and
    checks that its shards are those the model was trained on."""
    path = Path(path)
    folder = path.parent if path.is_file() or path.name in (WEIGHTS, DESCRIPTION) else path
    if not folder.is_dir():
        raise TrainedModelError(f"{folder} does not exist: give a run folder or a folder holding "
                                f"{WEIGHTS} and {DESCRIPTION}")
    cfg = _config(folder) if with_config or checkpoint is not None else None
    weights = folder / WEIGHTS if checkpoint is None else find_checkpoint(folder, checkpoint)
    if checkpoint is None:
        _check_files(folder)
    saved = None if checkpoint is None else ckpt.load_checkpoint(weights)
    description = _description(folder, cfg, weights, saved)
    if with_config:
        check_shards(description, cfg, folder)
    model = build_described(description["model"])
    state, extras = _tensors(weights, saved, set(model.state_dict()))
    described_by = folder / (DESCRIPTION if (folder / DESCRIPTION).is_file() else CONFIG)
    _load(model, state, described_by, weights)
    model = model.to(device).eval()
    evaluation = description.get("evaluation") or _evaluation_from_config(folder, cfg)
    learner = learner_from_description(description, evaluation, model)
    unknown = sorted(set(extras) - set(learner.extras())) if checkpoint is None else []
    if unknown:
        raise TrainedModelError(f"{weights} does not fit the model {folder / DESCRIPTION} "
                                f"describes: it holds {unknown[0]}.* which that has not")
    try:
        learner.load_extras({name: extras.get(name) for name in learner.extras()})
    except ConfigError as error:
        raise TrainedModelError(f"{weights}: {error}") from error
    return TrainedModel(model, description, evaluation, learner, weights, folder, cfg)


def _config(folder: Path) -> Config:
    config = folder / CONFIG
    if not config.is_file():
        raise TrainedModelError(f"{config} is missing: is {folder} a run folder? (a model's "
                                f"own folder of {WEIGHTS} and {DESCRIPTION} is for prediction)")
    return load_config(config)


def _description(folder: Path, cfg: Optional[Config], weights: Path,
                 saved: Optional[dict]) -> dict:
    """model.yaml, or for a checkpoint (``saved``) of a run that has not written one yet, what
    it would."""
    description = folder / DESCRIPTION
    if description.is_file():
        return _upgraded(yaml.safe_load(description.read_text()))
    described = describe(cfg, load_manifest(cfg.data.shards), ckpt.step_of(weights))
    head = saved["model"].get("classifier.weight")
    if head is not None and head.shape[0] != described["model"]["n_way"]:
        # fsl-pretrain's checkpoint: its head spans the train classes, not a task's N
        return as_pretrained(described, head.shape[0])
    return described


def _upgraded(description: dict) -> dict:
    """A pre-trained model.yaml written before ``as_pretrained``, as it is written now: it
    described the pre-training config's MAML family with a head over the train classes, which
    no meta-trained model has (its head is the task's N)."""
    family = LEARNERS.get(description.get("algorithm", {}).get("name"))
    head = description.get("model", {}).get("n_way")
    if (is_pretrained(description) or family is None or not family.fixed_way
            or head == description.get("task", {}).get("n_way", head)):
        return description
    return as_pretrained(description, head)


def _check_files(folder: Path) -> None:
    for needed in (folder / WEIGHTS, folder / DESCRIPTION):
        if not needed.is_file():
            raise TrainedModelError(f"{needed} is missing: give a finished run folder or a "
                                    f"folder holding {WEIGHTS} and {DESCRIPTION} (--checkpoint "
                                    "latest evaluates a run that is still training)")


def _tensors(weights: Path, saved: Optional[dict], model_keys: set) -> tuple[dict, dict]:
    """(the model's state dict, {extra name: state dict}) of a weights file, or of a loaded
    checkpoint (``saved``)."""
    if saved is not None:
        return saved["model"], saved  # a checkpoint holds each extra under its name
    state, extras = {}, {}
    for key, value in load_file(str(weights)).items():
        if key in model_keys:
            state[key] = value
        else:  # "<extra name>.<its key>"
            prefix, _, rest = key.partition(".")
            extras.setdefault(prefix, {})[rest] = value
    return state, extras


def _load(model: torch.nn.Module, state: dict, described_by: Path, weights: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise TrainedModelError(f"{weights} does not fit the model {described_by} describes: "
                                f"{' '.join(str(error).split())[:300]}") from error


def _evaluation_from_config(folder: Path, cfg: Optional[Config]) -> dict:
    """The ``evaluation`` section of a model.yaml written before it was recorded."""
    if cfg is None and (folder / CONFIG).is_file():
        cfg = load_config(folder / CONFIG)
    if cfg is None:
        raise TrainedModelError(f"{folder / DESCRIPTION} has no `evaluation` section and there "
                                f"is no {folder / CONFIG} to take it from; export the model again")
    return evaluation_of(cfg)


def evaluation_of(cfg: Config) -> dict:
    """model.yaml's ``evaluation`` section: how the model adapts and scores at evaluation."""
    return {"inner_steps": cfg.evaluation_inner_steps(), "precision": cfg.precision,
            "test_shift": cfg.eval.test_shift}


def check_shards(description: dict, cfg: Config, folder: Path) -> None:
    """The shards a run evaluates on (``data.shards``) must give the images the model was
    trained on (they could have been re-packed at another size)."""
    inputs = model_inputs(load_manifest(cfg.data.shards))
    recorded = description.get("model", {})
    differ = {k: (recorded[k], v) for k, v in inputs.items() if recorded.get(k, v) != v}
    if differ:
        what = ", ".join(f"{k} {was} (trained) vs {now} (shards)"
                         for k, (was, now) in differ.items())
        raise ConfigError(f"{cfg.data.shards} does not match the model of {folder}: {what}; "
                          "point data.shards at the shards it was trained on")


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """"latest", a step number, or a file path -> an existing checkpoint file of `run_dir`."""
    kept = ckpt.list_checkpoints(run_dir)
    if which == "latest":
        if not kept:
            raise FileNotFoundError(f"{run_dir} has no checkpoints to evaluate")
        return kept[-1]
    path = ckpt.checkpoint_path(run_dir, int(which)) if which.isdigit() else Path(which)
    if not path.is_file():
        names = ", ".join(p.name for p in kept) or "none"
        raise FileNotFoundError(f"checkpoint {path} does not exist; kept in {run_dir}: {names}")
    return path
