"""Use a trained model: adapt it to a few labelled images, then classify new ones.

    from fsl_dist.predict import load_model

    model = load_model("runs/cnn_maml-0")  # a run folder, or model.safetensors + model.yaml
    classifier = model.adapt(["cats/1.png", "dogs/1.png", ...], ["cat", "dog", ...])
    result = classifier.predict(["new/a.png", "new/b.png"])
    result.labels           # ["dog", "cat"]
    result.probabilities    # float32 [2, N], columns in the order of result.classes

Adaptation is what evaluation does for the model's family (fsl_dist/learners): for the MAML
family its learned inner loop (which parameters adapt, its test-time inner steps, its step sizes,
learned ones included), for ProtoNet the class prototypes (any number of classes); batch
statistics in batch norm. A pre-trained backbone (fsl-pretrain) is described as a ProtoNet model
of scale 1 (fsl_dist.trained.as_pretrained): the nearest class mean of the support features, as
``fsl-evaluate --method centroid`` scores it; its probabilities are the softmax of minus the
squared distances. Images are file paths, PIL images or tensors; files and PIL images go
through the preprocessing its shards were packed with (``model.yaml``'s ``preprocessing``);
tensors are taken as the model sees images: float in [0, 1] (or uint8, divided by 255),
``[C, H, W]`` each or ``[B, C, H, W]``.

Batch norm normalises with the statistics of the images scored together. Evaluation scores a
task's whole query set as one batch, and so does ``predict`` by default; a different grouping
(``batch_size``) can change the predictions of a model with batch norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from fsl_dist.data.episodes import to_unit_float
from fsl_dist.data.preprocess import image_pixels, preprocessing_of
from fsl_dist.learners import Adapted, Learner
from fsl_dist.progress import progress
from fsl_dist.trained import TrainedModelError, read_trained


class PredictError(ValueError):
    """An input prediction cannot use as given; the message names the file or the numbers."""


@dataclass(frozen=True)
class Prediction:
    """What ``AdaptedClassifier.predict`` returns, one row per image."""

    classes: tuple          # the support set's class labels, in column order
    indices: torch.Tensor   # int64 [B]: column of the predicted class
    probabilities: torch.Tensor  # float32 [B, N], on the CPU

    @property
    def labels(self) -> list:
        return [self.classes[i] for i in self.indices.tolist()]


def load_model(path: str | Path, device: str | torch.device | None = None) -> "TrainedModel":
    """A trained model from a run folder, a folder holding model.safetensors and model.yaml,
    or the path of either file; on ``device`` (default: CUDA when there is one)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        trained = read_trained(path, device)
    except TrainedModelError as error:
        raise PredictError(str(error)) from error
    precision = trained.evaluation.get("precision") or "no"
    if precision == "fp16" and device.type != "cuda":
        precision = "no"  # fp16 autocast is CUDA's; evaluation on a CPU refuses it
    return TrainedModel(trained.learner, trained.description, trained.folder, precision)


class TrainedModel:
    """A meta-trained model and its family's learner (fsl_dist/learners), which adapts as
    evaluation does (at evaluation's ``precision``); ``adapt`` it to a support set."""

    def __init__(self, learner: Learner, description: dict, folder: Path, precision: str):
        self.learner, self.description, self.folder = learner, description, folder
        self.precision = precision
        self.preprocessing = (description.get("preprocessing")
                              or preprocessing_of(description["data"]))

    @property
    def model(self) -> torch.nn.Module:
        return self.learner.model

    @property
    def n_way(self) -> Optional[int]:
        """The N the model's head fixes; None for a family that takes any N (protonet)."""
        return self.description["model"]["n_way"] if self.learner.fixed_way else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def images(self, images, *, convert: bool = False, quiet: bool = True) -> torch.Tensor:
        """File paths, PIL images or tensors -> float32 ``[B, C, H, W]`` on the model's device,
        as the model saw its training images (see the module's docstring). ``quiet=False``
        shows a progress bar on a terminal."""
        if isinstance(images, torch.Tensor):
            batch = images if images.dim() == 4 else images.unsqueeze(0)
            return self._checked(batch, "the image tensor")
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        if not len(images):
            raise PredictError("no images given")
        return torch.cat([self._one_image(image, convert) for image in
                          progress(images, desc="reading images", unit="img", quiet=quiet)])

    def _one_image(self, image, convert: bool) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return self._checked(image.unsqueeze(0), "an image tensor")
        if isinstance(image, Image.Image):
            return self._from_pil(image, "a PIL image", convert)
        path = Path(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                return self._from_pil(opened, str(path), convert)
        except PredictError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise PredictError(f"cannot read image {path} ({error}); replace or remove the "
                               "file") from error

    def _from_pil(self, image: Image.Image, where: str, convert: bool) -> torch.Tensor:
        try:
            pixels = image_pixels(image, self.preprocessing, convert=convert)
        except ValueError as error:
            raise PredictError(f"{where} {error}: give {self.preprocessing['channels']}-channel "
                               "images, or convert them (convert=True, fsl-predict "
                               "--convert)") from error
        return self._checked(torch.from_numpy(pixels.copy()).unsqueeze(0), where)

    def _checked(self, batch: torch.Tensor, where: str) -> torch.Tensor:
        channels, size = self.preprocessing["channels"], self.preprocessing["size"]
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (channels, size, size):
            raise PredictError(f"{where} has shape {tuple(batch.shape)}; the model takes "
                               f"[B, {channels}, {size}, {size}] (channels, height, width)")
        if batch.dtype == torch.uint8:
            batch = to_unit_float(batch)  # as tasks are made from shard pixels
        return batch.to(self.device, torch.float32)

    def adapt(self, images, labels: Sequence, *, convert: bool = False) -> "AdaptedClassifier":
        """Run the learned inner loop on a support set: ``images`` with their class ``labels``
        (any hashable labels: exactly ``n_way`` distinct ones, or at least two where the
        family takes any N)."""
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        support = self.images(images, convert=convert)
        if len(labels) != len(support):
            raise PredictError(f"{len(support)} support images but {len(labels)} labels")
        classes = _sorted_classes(labels)
        if self.n_way is None and len(classes) < 2:
            raise PredictError(f"the support set has {len(classes)} class ({_shown(classes)}): "
                               "give at least 2 classes")
        if self.n_way is not None and len(classes) != self.n_way:
            raise PredictError(f"the support set has {len(classes)} classes "
                               f"({_shown(classes)}) but the model is {self.n_way}-way: give "
                               f"exactly {self.n_way} classes")
        index = {c: i for i, c in enumerate(classes)}
        targets = torch.tensor([index[c] for c in labels], device=self.device)
        try:
            task = self.learner.adapt(support, targets, precision=self.precision)
        except FloatingPointError as error:
            raise PredictError(f"{error}: the support images or the model are not usable "
                               "together") from error
        return AdaptedClassifier(self, task, tuple(classes))


def _sorted_classes(labels: list) -> list:
    try:
        return sorted(set(labels))
    except TypeError:  # labels of several types: sorted by their text
        return sorted(set(labels), key=str)


def _shown(classes: list, most: int = 8) -> str:
    shown = ", ".join(str(c) for c in classes[:most])
    return shown + (", ..." if len(classes) > most else "")


class AdaptedClassifier:
    """A model adapted to one support set; ``predict`` classifies images among its classes."""

    def __init__(self, trained: TrainedModel, task: Adapted, classes: tuple):
        self.trained, self.task, self.classes = trained, task, classes

    def predict(self, images, *, batch_size: int | None = None, convert: bool = False,
                quiet: bool = True) -> Prediction:
        """Classes and class probabilities of ``images``, scored ``batch_size`` at a time
        (default: all together, as evaluation scores a query set). ``quiet=False`` shows
        progress bars on a terminal."""
        if batch_size is not None and batch_size < 1:
            raise PredictError(f"batch size {batch_size} must be at least 1")
        batch = self.trained.images(images, convert=convert, quiet=quiet)
        step = batch_size or len(batch)
        starts = progress(range(0, len(batch), step), desc="predicting", unit="batch",
                          quiet=quiet or len(batch) <= step)
        logits = torch.cat([self.task.logits(batch[i:i + step]) for i in starts])
        # argmax of the logits, as evaluation scores: rounded probabilities can tie
        return Prediction(self.classes, logits.argmax(-1).cpu(),
                          torch.softmax(logits, dim=-1).cpu())
