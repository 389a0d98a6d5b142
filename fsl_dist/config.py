"""Typed run configuration: dataclasses filled from YAML, then from dotted command-line overrides.

A config file may name a parent with ``inherit: base.yaml`` (a path relative to the file, or a
shipped config's name such as ``folder_example``); the
child's keys replace the parent's, section by section. Unknown keys, values of the wrong type and
impossible values are errors that name the file, the key and what would be accepted.

    cfg = load_config("configs/resnet_boil.yaml",
                      ["train.steps=100", "algorithm.inner_lr.features=0.3"])

A config may also be given by the name of one shipped with fsl_dist (``resnet_boil``,
``miniimagenet/cnn_boil_5w1s``): a file that exists wins, else the name is looked up in the shipped
tree (fsl_dist/configs/ in an installed wheel, the checkout's configs/ otherwise; see setup.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used as given."""


def is_import_path(name: str) -> bool:
    """Whether `model.name` names a model of your own (`package.module:function`)."""
    return bool(IMPORT_PATH.match(name))


@dataclass
class DataConfig:
    """Which shard set the tasks come from and how it is held in memory."""

    shards: str = "shards/omniglot-futurama"
    """Folder of the packed shard set (made by launch/pack.py)."""
    dataset: str = "omniglot"
    """What the shards hold: omniglot (packed from `source` when `shards` is missing), folder
    (an image folder packed by `launch/pack.py folder`) or a benchmark packed by `launch/pack.py
    NAME` (miniimagenet, tieredimagenet, cifarfs, fc100, cub); only Omniglot is packed by
    training."""
    split: str = "futurama"
    """Omniglot only: the class split the shards were packed with: lake, vinyals or futurama."""
    source: Optional[str] = None
    """Omniglot zips or folders to pack from when `shards` is missing (None: the download cache)."""
    mode: str = "memory"
    """memory: each rank holds its class pool; stream: shards are streamed (data bigger than
    RAM)."""
    rotate: bool = True
    """Meta-train classes are rotated by a random multiple of 90 degrees (new classes): an
    Omniglot augmentation; set false for natural images (configs/folder_example.yaml does)."""
    augment: str = "none"
    """Augment every support and query image of the meta-training tasks (never validation,
    test or prediction): none; lee2019, MetaOptNet's (Lee et al. 2019) training transform,
    learn2learn's `lee2019`: a random crop of the image's size after `augment_padding` black
    pixels of padding, colour jitter (`augment_jitter`), a horizontal flip (`augment_flip`);
    resized_crop, a random resized crop (area share in `augment_scale`, aspect 3/4..4/3) in
    place of the padded crop, then the same jitter and flip. Seeded by (train.seed, step,
    task), so process counts and resuming see the same images. For natural images; Omniglot
    keeps none (its augmentation is `rotate`). Details: docs/guide/augmentation.md."""
    augment_padding: int = 8
    """lee2019: black border (pixels) around the image before the crop; the image moves by up
    to this many pixels each way (MetaOptNet: RandomCrop(84, padding=8))."""
    augment_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """resized_crop: the range of the crop's share of the image's area (torchvision's
    RandomResizedCrop default [0.08, 1.0])."""
    augment_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4])
    """Colour jitter's brightness, contrast and saturation strengths s, each in [0, 1]: the
    factor is uniform in [1 - s, 1 + s], the three applied in a random order (MetaOptNet:
    ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)); 0 turns one off."""
    augment_flip: bool = True
    """Mirror half of the images left to right (MetaOptNet: RandomHorizontalFlip())."""
    image_size: int = 28
    """Omniglot only: side of the images when packing missing shards. The model always takes
    its input size and channels from the shards' manifest."""
    shuffle_buffer: int = 200
    """Stream mode: classes held in the shuffle buffer."""
    memory_budget_gb: float = 8.0
    """Memory mode is refused before loading when the parts a process loads hold more image bytes
    than this (GB = 10^9); set data.mode=stream instead. Every process holds its own pool, and
    its peak is a few times the pool (loading concatenates; the sampler keeps a flat copy, four
    with rotation), so 8 keeps a node of several processes within common RAM while sets the size
    of mini-ImageNet at 84 px (under 1 GB of images) stay in memory."""


@dataclass
class TaskConfig:
    """The shape of one few-shot task (N-way K-shot, Q queries per class)."""

    n_way: int = 5
    """Classes per task (N); evaluation uses the trained head's N."""
    k_shot: int = 1
    """Support images per class (K), the images the inner loop adapts on."""
    q_query: int = 15
    """Query images per class (Q), the images the adapted model is scored on. A task draws only
    classes holding at least K+Q images."""


@dataclass
class ModelConfig:
    """The network (a `features` body and a `classifier` head)."""

    name: str = "cnn"
    """cnn (Conv-4), resnet (small ResNet-12 style, Omniglot) or resnet12 (the ResNet-12 of the
    mini-ImageNet benchmarks, widths 64:160:320:640); or a model of your own by the import path
    of its builder, `package.module:function`, called as `function(n_way=, in_channels=,
    image_size=)` (the module installed or in the current folder); say which of its parameters
    adapt with `algorithm.adapt` unless algorithm.name is maml (all adapt). model.yaml records
    the path: evaluation and prediction import it again."""
    width: int = 64
    """Channels of the cnn, base width of the resnet, first-block width of the resnet12."""
    drop_rate: float = 0.0
    """resnet12 only: DropBlock after each block, this fraction of positions dropped in
    meta-training (inner and outer forwards alike), never at evaluation; 0 is off."""
    dropblock_size: int = 5
    """resnet12 only: DropBlock's block side (MetaOptNet's 5), capped by the feature map."""
    init_from: Optional[str] = None
    """Start from the backbone of a trained model: a run folder (of fsl-pretrain, or of any
    family) or a folder holding model.safetensors and model.yaml. Exactly its `features.*`
    weights are loaded; the head (`classifier.*`) starts fresh. The architecture must match
    (model.name, width, the images' channels and side): a mismatch is refused naming the keys
    and shapes. null (default): random initial weights (train.seed)."""


@dataclass
class AlgorithmConfig:
    """The inner loop: which parameters adapt, how many steps, what step size."""

    name: str = "maml"
    """maml adapts everything, boil the body (features.*), anil the head (classifier.*)."""
    adapt: Optional[list[str]] = None
    """Which parameters adapt in the inner loop, replacing `name`'s rule: parameter-name
    prefixes (e.g. [encoder] adapts encoder.*), for a model of your own whose parameters are
    not named features.* and classifier.*. null (default): `name`'s rule."""
    inner_steps: int = 1
    """Inner-loop gradient steps on the support set during meta-training (evaluation:
    eval.inner_steps)."""
    inner_lr: Union[float, dict[str, float]] = 0.4
    """One step size, or one per group: {features: a, classifier: b} (a model of your own: per
    parameter-name prefix). 0.4 is MAML's Omniglot value; on natural images MAML took 0.01
    with 5 steps (configs/folder_example.yaml)."""
    first_order: bool = False
    """Second order by default; true drops the second-order term (explicitly)."""
    first_order_steps: int = 0
    """MAML++'s derivative-order annealing: first order while fewer than this many training
    steps have finished, second order from then on (logged as train/second_order). 0
    (default): off. The paper switches after 50 epochs (of 500 iterations: 25000 steps); the
    reference code's final configs keep it off (first_order_to_second_order_epoch -1)."""
    learn_inner_lr: Union[bool, str] = False
    """Learned inner step sizes, each starting at `inner_lr`: true, one per adapted parameter
    tensor (Meta-SGD style, per layer); per_step, one per inner step and adapted tensor, a
    [inner_steps, tensors] parameter (MAML++'s LSLR, on in all its reference configs).
    Evaluating with more steps than `inner_steps` reuses the last step's sizes. False: fixed."""
    inner_loss: str = "ce"
    """ce (cross-entropy) or mse (on one-hot labels, as the original project)."""
    vectorize: Optional[bool] = None
    """vmap over tasks (true), a loop (false), or the measured faster path for the device (null)."""
    msl_steps: int = 0
    """MAML++'s multi-step loss: for the first `msl_steps` training steps the meta-objective is a
    weighted sum of the query losses after every inner step, the weights annealed from uniform
    towards the last step (`fsl_dist.meta.spec.msl_weights`); from then on the last step's loss
    alone, as without it. 0 (default): off. The reference configs anneal over 10 (Omniglot) or
    15 (mini-ImageNet) epochs of 500 iterations: 5000 or 7500 steps. Evaluation is unchanged
    (the last step's accuracy)."""
    per_step_bn_weights: bool = False
    """MAML++'s per-step batch-norm weights and biases (BNWB): every batch norm holds
    `inner_steps` sets of affine parameters ([inner_steps, channels]); the support forward of
    inner step k and the query forward after it use set k (the reference code's `num_step`),
    evaluation with more steps keeps the last set. These sets never adapt in the inner loop
    (for maml and boil alike, as in the reference code) and are meta-learned in the outer step.
    Batch norm still normalises with each batch's statistics. False (default): one set, adapted
    as every parameter of the algorithm's groups."""
    per_step_bn_stats: bool = False
    """MAML++'s per-step batch-norm running statistics (BNRS; needs per_step_bn_weights): every
    batch norm keeps a running mean and variance per inner step ([inner_steps, channels]
    buffers), updated after every training step with momentum 0.1 from the mean over the
    meta-batch (all processes) of the batch statistics of that step's forwards; meta-training
    still normalises with each batch's statistics, evaluation and prediction normalise step k
    with pair k (non-transductive: a query image's output does not depend on the others). The
    reference code collects such statistics but never normalises with them. The loop path only
    (the updates cannot cross vmap): null vectorize takes the loop, true is refused."""
    checkpoint: str = "none"
    """Trade compute for memory in second-order meta-training, the meta-gradient unchanged:
    none (default); steps keeps only the parameters at each inner step's start and recomputes
    the step (its forward and inner gradient) during the outer backward, so memory no longer
    grows by a whole step's graph per inner step; blocks instead takes each inner gradient block
    by block of the backbone (each residual stage or conv block recomputed, to second order, in
    the outer backward: only the blocks' inputs and gradients are kept) and checkpoints the
    blocks of the query forwards (and of ANIL's body forwards): the least memory, the most
    compute. The loop path only (torch.func's vmap refuses the saved-tensor hooks and the
    autograd.grad inside an autograd.Function that checkpointing needs): null vectorize takes
    the loop, saying so in one line where the device's default is vmap (CUDA), true is refused.
    First order keeps no step graph: only blocks' query checkpointing
    changes it.
    Measured memory and time: docs/2026-12-05-checkpointed-inner-loop.md."""
    meta_gradient: str = "unrolled"
    """How the meta-gradient goes through the inner loop: unrolled (default) differentiates
    through the inner steps (second order unless first_order); implicit is iMAML (Rajeswaran
    et al. 2019): the inner loop minimises the support loss plus (proximal_lambda/2) times the
    squared distance to the meta-parameters, with first-order steps (no graph kept, so memory
    does not grow with inner_steps), and the meta-gradient comes from cg_steps
    conjugate-gradient steps on ((1 + cg_damping) I + H / proximal_lambda) v = g, H the support
    loss's Hessian at the adapted weights, g the query gradient there. Evaluation and
    prediction adapt with the same proximal inner loop. The loop path only (null vectorize
    takes it, saying so in one line where the device's default is vmap); not with
    checkpoint, msl_steps, learn_inner_lr or per_step_bn_weights."""
    proximal_lambda: float = 1.0
    """implicit only: the proximal term's weight lambda (positive); larger keeps the adapted
    weights nearer the meta-parameters (the authors' code's Omniglot 5-way 1-shot command:
    2.0)."""
    cg_steps: int = 5
    """implicit only: conjugate-gradient steps per task of the meta-gradient's solve (at least
    1; the authors' code's Omniglot command: 5). Each costs one Hessian-vector product (a
    double backward)."""
    cg_damping: float = 0.0
    """implicit only: added to the identity of the solved system (not negative), which keeps
    it positive definite where the support loss has negative curvature; 0 solves it as written."""
    proto_head: bool = False
    """Proto-MAML (Triantafillou et al. 2020): each task's head starts from its support set's
    prototypes (W_k = 2 c_k, b_k = -||c_k||^2, c_k the mean of class k's support features of the
    `features` body) instead of the trained head, then the inner loop adapts as configured
    (maml: all parameters, second order unless first_order); the meta-gradient flows through
    the prototypes into the body. Built-in models; not with meta_gradient implicit."""


@dataclass
class ProtoNetConfig:
    """ProtoNet's own keys (`algorithm.name: protonet`; fsl_dist/learners/protonet.py)."""

    scale: float = 1.0
    """The logits are -scale x the squared Euclidean distance of a query's features to each
    class prototype (the mean of its support features); 1: the paper (Snell et al. 2017)."""
    learn_scale: bool = False
    """Learn the scale with the model (a learned temperature), starting at `scale`; false: the
    paper's fixed scale."""


@dataclass
class RidgeConfig:
    """The closed-form ridge head's keys (`algorithm.name: ridge`, R2D2 / MetaOptNet-ridge;
    fsl_dist/learners/ridge.py)."""

    lam: float = 50.0
    """The ridge penalty lambda of W = X^T (X X^T + lambda I)^-1 Y (X the support features, Y
    their one-hot labels); 50: MetaOptNet's ridge head."""
    learn_lambda: bool = False
    """Learn lambda with the model, from `lam` (the R2D2 paper learns it; its released
    scripts, and the shipped configs, keep it fixed)."""
    scale: float = 1.0
    """The logits are scale x (query features . W)."""
    learn_scale: bool = True
    """Learn the scale with the model, from `scale` (R2D2's alpha; its beta, one shift of
    every class's logit, does not change the softmax and is left out)."""


@dataclass
class OptimConfig:
    """The outer (meta) optimiser, Adam, and its learning-rate schedule."""

    lr: float = 1e-3
    """Adam's learning rate for the meta-update (the start of a cosine or step schedule)."""
    weight_decay: float = 0.0
    """Adam's weight decay (L2 added to the meta-gradient); 0 is off."""
    grad_clip: Optional[float] = None
    """Clip the (all-reduced) meta-gradient to this norm; null disables clipping."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's two moment decay rates."""
    schedule: str = "constant"
    """constant; cosine: the outer learning rate falls from `lr` to `min_lr` over train.steps,
    min_lr + (lr - min_lr)(1 + cos(pi step / train.steps)) / 2 (MAML++'s annealing: the form of
    torch's CosineAnnealingLR, which its reference code steps once per epoch of 500 iterations,
    from 1e-3 to 1e-5; here it moves every step); step: it is multiplied by `decay_factor` at
    each step of `decay_at`.
    A function of the step alone, so a resumed run continues it exactly (and a constant-rate run
    resumed at step N with `schedule: step, decay_at: [N]` is that step schedule from the start)."""
    min_lr: float = 0.0
    """The end of the cosine schedule (MAML++'s reference configs: 1e-5)."""
    decay_at: list[int] = field(default_factory=list)
    """The step schedule's steps, ascending: updates after this many finished steps use the lower
    rate."""
    decay_factor: float = 0.1
    """The step schedule's factor: the rate is multiplied by it at each step of `decay_at`."""


@dataclass
class TrainConfig:
    """The length of the run, its seed, and how often it logs, validates and saves."""

    steps: int = 2000
    """Meta-training steps (outer updates) of the whole run; a resumed run may raise it."""
    meta_batch_size: int = 16
    """Tasks per meta-step, over all processes together."""
    seed: int = 0
    """Seed of the initial weights (the same on every process) and of the training tasks; names
    the run folder (runs/<config name>-<seed>). The class split is fixed when the shards are
    packed, not by this seed."""
    checkpoint_every: int = 500
    """Steps between checkpoints in <run-dir>/checkpoints/."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints are kept; older ones are removed."""
    eval_every: int = 500
    """Steps between validations (eval.val_episodes episodes of the val part)."""
    log_every: int = 10
    """Steps between logged rows (metrics.jsonl, W&B, TensorBoard); the last step is always
    logged."""
    cpu_threads: Optional[int] = None
    """Threads per process on CPU; null: the machine's cores divided among local processes."""
    tune_cpu_malloc: bool = True
    """On CPU, keep glibc's allocator from returning freed activations to the kernel: faster
    meta-steps for a higher peak RSS; and start fsl-train / fsl-pretrain again at once under
    glibc tunables that let freed activations' memory be reused (tcache and fastbins off: a
    lower peak at the same speed). fsl_dist/cpu_malloc.py; numbers in BENCHMARKS.md."""
    cpu_allocator: str = "auto"
    """With `train.tune_cpu_malloc`, the malloc a CPU training process runs with: glibc (tuned
    as above), tcmalloc (gperftools', which fsl-train / fsl-pretrain / launch/train.py preload
    when they start again; measured faster and lighter than the tuned glibc for one task at a
    time on two threads, BENCHMARKS.md "Memory"), or auto: tcmalloc where
    `train.memory_budget_gb` is set and the library is found, glibc otherwise. Install it with
    `apt install libtcmalloc-minimal4` (Debian, Ubuntu) or `conda install gperftools`; training
    stops with one line when tcmalloc is asked for by name and not found."""
    memory_budget_gb: Optional[float] = None
    """Peak memory per process (GB = 10^9; on CPU the resident set, on CUDA the tensors
    allocated on the device). Before the first step the trainer measures probe steps and takes
    the fastest plan that fits: tasks side by side or one at a time, the allocator settings, the
    checkpoint levels, the tasks in flight (none changes the meta-gradient beyond float
    rounding); it prints the plan and its peak and records them in run.json, and refuses with
    exit code 4 when none fits. null: today's fastest plan, nothing probed. Data held in memory
    is data.memory_budget_gb. docs/guide/training.md, "Fit in a memory budget?"."""
    max_skipped_steps: Optional[int] = 20
    """Stop the run (exit code 3) after this many consecutive steps skipped for non-finite
    gradients or losses; null never stops. fp16's loss scaling skips a few while it settles."""
    loss_warn_factor: Optional[float] = 10.0
    """Warn when the training loss (moving average) climbs past this factor of its lowest value
    so far; null never warns."""


@dataclass
class EvalConfig:
    """Validation during training and the held-out evaluation at its end."""

    episodes: int = 600
    """Held-out test episodes of the final evaluation."""
    val_episodes: int = 200
    """Validation episodes of each periodic evaluation (every `train.eval_every` steps)."""
    final_val: bool = False
    """Also validate after the last training step when `train.steps` is not a multiple of
    `train.eval_every`. False (default): validation runs at multiples of `train.eval_every` only,
    so a short smoke run (`train.steps=10`) does not wait for `val_episodes` episodes before
    the held-out evaluation, which follows the last step anyway (shorten that with
    `eval.episodes`)."""
    inner_steps: Optional[int] = None
    """Inner steps at evaluation (null: algorithm.inner_steps); more than in training is usual."""
    n_way: Optional[int] = None
    """N-way of validation and the held-out evaluation (null: task.n_way). Another N than
    training's only for a family whose model does not fix N (protonet: its paper trains
    Omniglot 60-way and tests 5- and 20-way)."""
    part: str = "test"
    """The part the final evaluation scores (launch/evaluate.py's default too): test or val."""
    batch_size: int = 25
    """Episodes adapted together in one call."""
    seed: int = 1234
    """Seed of the evaluation episodes (fixed, so all runs meet the same episodes)."""
    test_shift: int = 0
    """Test-time augmentation of the families that fit a head to features (protonet, ridge):
    each image's features are the mean over its copies shifted by up to this many pixels
    (|rows| + |columns| <= test_shift, the border black as in data.augment's shift; 1: 5
    copies, 2: 13), in validation, evaluation and prediction (model.yaml keeps it); each copy
    costs a forward pass. 0: off. Training is unchanged."""


@dataclass
class PretrainConfig:
    """Supervised pre-training (fsl-pretrain): the body `features` and a linear head over every
    class of the train part, trained by cross-entropy on batches of images; the length, the
    learning rate and its schedule, the seed and the cadences are train.* and optim.*, as in
    meta-training. Meta-training ignores this section."""

    batch_size: int = 64
    """Images per step, over all processes together (Chen et al. 2019: 16; FEAT's ResNet-12
    pre-training: 128). One epoch is (train images x rotations) // batch_size steps."""
    norm_group: Optional[int] = None
    """Images whose batch-norm statistics are taken together: the batch is cut into groups of
    this many (in order), each its own forward, so the result does not depend on the number
    of processes (each takes whole groups). null: the whole batch is one group, which only one
    process can hold; set a divisor of every process's share to run on several."""
    optimizer: str = "adam"
    """adam (optim.betas; Chen et al. 2019) or sgd (momentum, nesterov; the ResNet-12
    pre-training of FEAT, MetaOptNet, UNICORN-MAML); lr and weight decay: optim.lr and
    optim.weight_decay."""
    momentum: float = 0.9
    """sgd only: momentum (FEAT's 0.9)."""
    nesterov: bool = False
    """sgd only: Nesterov momentum (FEAT's ResNet-12 pre-training: true)."""


@dataclass
class LoggingConfig:
    """Where the metrics go besides <run-dir>/metrics.jsonl."""

    wandb: bool = True
    """Log to Weights & Biases from the main process; offline (files in <run-dir>/wandb/) when no
    API key is configured."""
    tensorboard: bool = False
    """Also log the same scalars as TensorBoard event files in <run-dir>/tensorboard/ (main
    process; needs the `tensorboard` package). W&B and TensorBoard are independent."""
    project: str = "fsl_dist"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (user or team); null: the account's default."""
    group: Optional[str] = None
    """W&B group; null: the config's name, so the seeds of one config sit together."""
    tags: list[str] = field(default_factory=list)
    """W&B tags added to the automatic ones (model, algorithm, split, N-way K-shot)."""


@dataclass
class Config:
    """A whole run configuration: the top-level keys, then one section per dataclass above."""

    name: str = "run"
    """The config's name (its file name unless set in that file, not inherited); names the run
    folder and the W&B group."""
    precision: Optional[str] = None
    """no, bf16 or fp16; null: accelerate's --mixed_precision (default no)."""
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    protonet: ProtoNetConfig = field(default_factory=ProtoNetConfig)
    ridge: RidgeConfig = field(default_factory=RidgeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def evaluation_way(self) -> int:
        """N-way of validation and the held-out evaluation: `eval.n_way`, else task.n_way."""
        return self.eval.n_way if self.eval.n_way is not None else self.task.n_way

    def evaluation_inner_steps(self) -> int:
        """Inner steps at evaluation: `eval.inner_steps`, or the training ones when null (the
        one place this is decided: validation, the held-out evaluation and model.yaml)."""
        if self.eval.inner_steps is not None:
            return self.eval.inner_steps
        return self.algorithm.inner_steps


CHOICES = {
    "precision": (None, "no", "bf16", "fp16"),
    "data.dataset": ("omniglot", "folder", "miniimagenet", "tieredimagenet", "cifarfs", "fc100",
                     "cub"),
    "data.split": ("lake", "vinyals", "futurama"),
    "data.mode": ("memory", "stream"),
    "data.augment": ("none", "lee2019", "resized_crop"),
    "model.name": ("cnn", "resnet", "resnet12"),
    # fsl_dist.learners.LEARNERS (a test checks that they agree)
    "algorithm.name": ("maml", "boil", "anil", "protonet", "ridge"),
    "algorithm.inner_loss": ("ce", "mse"),
    "algorithm.learn_inner_lr": (False, True, "per_step"),
    "algorithm.checkpoint": ("none", "steps", "blocks"),
    "algorithm.meta_gradient": ("unrolled", "implicit"),
    "train.cpu_allocator": ("auto", "glibc", "tcmalloc"),
    "eval.part": ("val", "test"),
    "optim.schedule": ("constant", "cosine", "step"),
    "pretrain.optimizer": ("adam", "sgd"),
}
POSITIVE = (
    "task.n_way", "task.k_shot", "task.q_query", "model.width", "train.steps",
    "train.meta_batch_size", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_every", "train.log_every", "eval.episodes", "eval.val_episodes",
    "eval.batch_size", "data.image_size", "data.shuffle_buffer", "optim.lr",
    "model.dropblock_size", "algorithm.proximal_lambda", "algorithm.cg_steps",
    "protonet.scale", "ridge.lam", "ridge.scale", "pretrain.batch_size",
)
NON_NEGATIVE = ("algorithm.inner_steps", "optim.weight_decay", "optim.min_lr",
                "algorithm.msl_steps", "algorithm.first_order_steps", "algorithm.cg_damping",
                "data.augment_padding", "eval.test_shift")
# model.name of a model of your own: the import path of the function that builds it.
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
INNER_LR_GROUPS = ("features", "classifier")


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config (a file, or a shipped config's name; following `inherit:`), apply
    `key.sub=value` overrides, validate."""
    path = find_config(path)
    raw = _read_with_parents(path, seen=())
    raw.setdefault("name", path.stem)
    for override in overrides:
        _apply_override(raw, override)
    if raw.get("precision") is False:
        raw["precision"] = "no"  # YAML 1.1 reads a bare `no` as false
    cfg = _build(Config, raw, where=str(path))
    validate(cfg, where=str(path))
    return cfg


# Sweep files ship with the configs (fsl_dist.sweep finds them by name) but are not training
# configs: config names never resolve into them.
NOT_CONFIGS = ("sweeps",)


def shipped_configs() -> Optional[Path]:
    """The config tree shipped with fsl_dist: fsl_dist/configs/ in an installed wheel (setup.py
    copies it there), the checkout's configs/ beside the package in a clone or editable install."""
    package = Path(__file__).resolve().parent
    if (package / "configs").is_dir():
        return package / "configs"
    checkout = package.parent  # only a checkout: site-packages/configs would be someone else's
    if (checkout / "setup.cfg").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return None


def shipped_config_names() -> list[str]:
    """Names --config accepts without a file: `cnn_maml`, `miniimagenet/cnn_boil_5w1s`, ..."""
    tree = shipped_configs()
    if tree is None:
        return []
    names = (p.relative_to(tree).with_suffix("") for p in tree.rglob("*.yaml"))
    return sorted(n.as_posix() for n in names if n.parts[0] not in NOT_CONFIGS)


def _listed(names: list[str]) -> str:
    """`base, cnn_maml, miniimagenet/{base, cnn_boil_5w1s}`: one line, each folder once."""
    folders: dict[str, list[str]] = {}
    for name in names:
        folder, _, stem = name.rpartition("/")
        folders.setdefault(folder, []).append(stem)
    return ", ".join(", ".join(stems) if not folder else f"{folder}/{{{', '.join(stems)}}}"
                     for folder, stems in folders.items())


def find_config(given: str | Path) -> Path:
    """The file of a config given as a path that exists, or else by a shipped config's name: with
    or without `.yaml`, with or without a leading `configs/` (the README's commands work from any
    folder). The name keeps the file's stem, so run folders are named as from the repo's file."""
    path = Path(given)
    if path.is_file():
        return path
    shipped = _shipped_file(path)
    if shipped is not None:
        return shipped
    names = _listed(shipped_config_names()) or "none (no configs/ folder found)"
    raise ConfigError(f"config {given} does not exist, and no config of that name ships with "
                      f"fsl_dist; give a YAML file or one of: {names}")


def _shipped_file(name: Path) -> Optional[Path]:
    """The shipped config file `name` stands for, or None."""
    tree = shipped_configs()
    parts = name.parts[1:] if name.parts[:1] == ("configs",) else name.parts
    if tree is None or not parts or name.is_absolute() or ".." in parts or parts[0] in NOT_CONFIGS:
        return None
    shipped = tree.joinpath(*parts)
    if shipped.suffix not in (".yaml", ".yml"):
        shipped = shipped.with_name(shipped.name + ".yaml")
    return shipped if shipped.is_file() else None


def _read_with_parents(path: Path, seen: tuple) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (the configs are in configs/*.yaml)")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `inherit` loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    parent_file = path.parent / parent
    if not parent_file.is_file():  # a shipped config by name (`inherit: folder_example`)
        parent_file = _shipped_file(Path(parent)) or parent_file
    base = _read_with_parents(parent_file, seen + (path.resolve(),))
    base.pop("name", None)  # the parent's name names the parent's runs, not this file's
    return _merge(base, raw)


def _merge(base: dict, child: dict) -> dict:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "inner_lr":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # a scalar here (say inner_lr: 0.4) becomes a per-group mapping
        node = node[part]
    node[leaf] = value


# ---------------------------------------------------------------- typed building


def _build(cls, raw: Any, where: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: `{prefix.rstrip('.') or 'config'}` must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key `{prefix}{unknown[0]}`; "
            f"known keys here: {', '.join(sorted(names))}"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, where, prefix + name)
    return cls(**values)


def _coerce(hint, value, where: str, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where, key)
            except ConfigError:
                continue
        raise _type_error(where, key, value, hint)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(where, key, value, hint)
        return [_coerce(args[0], item, where, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(where, key, value, hint)
        return {_coerce(args[0], k, where, key): _coerce(args[1], v, where, f"{key}.{k}")
                for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT_LITERAL.match(value):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if hint in (int, str, bool, float) and type(value) is hint:
        return value
    raise _type_error(where, key, value, hint)


def _type_error(where: str, key: str, value, hint) -> ConfigError:
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    wanted = " or ".join(getattr(a, "__name__", None) or str(a).replace("typing.", "")
                         for a in options)
    if type(None) in typing.get_args(hint):
        wanted += " or null"
    return ConfigError(f"{where}: `{key}` = {value!r} has the wrong type; expected {wanted}")


# ---------------------------------------------------------------- values


def get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config, where: str = "config") -> None:
    """Values that type-check but cannot work. Checks needing the data or the process count
    (N-way vs. the split's classes, meta-batch vs. processes) run in the trainer's setup."""
    _validate_finite(cfg, where)
    for key, allowed in CHOICES.items():
        if key == "model.name" and is_import_path(cfg.model.name):
            continue  # a model of your own, imported when the run builds it
        if get(cfg, key) not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise ConfigError(f"{where}: `{key}` = {get(cfg, key)!r}; choose one of {shown}")
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise ConfigError(f"{where}: `{key}` = {get(cfg, key)!r} must be positive")
    budget = cfg.train.memory_budget_gb
    if budget is not None and not budget > 0:
        raise ConfigError(f"{where}: `train.memory_budget_gb` = {budget!r} must be positive "
                          "(or null: no budget)")
    if budget is not None and cfg.algorithm.name not in ("maml", "boil", "anil"):
        raise ConfigError(f"{where}: `train.memory_budget_gb` plans the MAML family's inner "
                          f"loop; `algorithm.name` = {cfg.algorithm.name} has none to plan: "
                          "leave the budget null")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"{where}: `{key}` = {get(cfg, key)!r} must not be negative")
    if cfg.eval.test_shift and cfg.algorithm.name in ("maml", "boil", "anil"):
        raise ConfigError(f"{where}: `eval.test_shift` averages the features a head is fitted "
                          f"to (protonet, ridge); {cfg.algorithm.name} adapts by gradient steps: "
                          "set it to 0")
    if cfg.eval.n_way is not None and cfg.eval.n_way < 2:
        raise ConfigError(f"{where}: `eval.n_way` = {cfg.eval.n_way} must be at least 2 (or "
                          "null: task.n_way)")
    lr = cfg.algorithm.inner_lr
    if isinstance(lr, dict) and not is_import_path(cfg.model.name):
        bad = sorted(set(lr) - set(INNER_LR_GROUPS))
        if bad:
            raise ConfigError(f"{where}: `algorithm.inner_lr.{bad[0]}` is no group; use features "
                              "and/or classifier")
    for key, value in _inner_lrs(lr):
        if not value > 0:
            raise ConfigError(f"{where}: `{key}` = {value!r} must be positive (to keep a part "
                              "fixed in the inner loop choose algorithm.name boil or anil)")
    if cfg.algorithm.first_order and cfg.algorithm.first_order_steps:
        raise ConfigError(f"{where}: `algorithm.first_order_steps` switches to second order "
                          "after that many steps, but `algorithm.first_order` is true (first order "
                          "throughout): drop one of them")
    if cfg.algorithm.per_step_bn_weights and cfg.algorithm.inner_steps < 1:
        raise ConfigError(f"{where}: `algorithm.per_step_bn_weights` needs one set per inner "
                          "step: `algorithm.inner_steps` must be at least 1")
    if cfg.algorithm.per_step_bn_stats and not cfg.algorithm.per_step_bn_weights:
        raise ConfigError(f"{where}: `algorithm.per_step_bn_stats` keeps statistics per step of "
                          "the per-step batch norms: set `algorithm.per_step_bn_weights` too")
    if cfg.algorithm.per_step_bn_stats and cfg.algorithm.vectorize:
        raise ConfigError(f"{where}: `algorithm.per_step_bn_stats` runs on the loop path (its "
                          "statistics cannot be collected across vmap): set "
                          "`algorithm.vectorize` to false or null")
    if cfg.algorithm.adapt is not None and not cfg.algorithm.adapt:
        raise ConfigError(f"{where}: `algorithm.adapt` = [] adapts nothing; give parameter-name "
                          "prefixes or null (the algorithm's rule)")
    if cfg.algorithm.checkpoint != "none" and cfg.algorithm.vectorize:
        raise ConfigError(f"{where}: `algorithm.checkpoint` runs on the loop path (checkpointing "
                          "cannot cross vmap): set `algorithm.vectorize` to false or null")
    if cfg.algorithm.checkpoint == "blocks" and ":" in cfg.model.name:
        raise ConfigError(f"{where}: `algorithm.checkpoint` = 'blocks' splits the built-in models "
                          "into their blocks; a model of your own (`model.name` "
                          f"{cfg.model.name!r}) takes 'steps'")
    _validate_implicit(cfg.algorithm, where)
    _validate_augment(cfg.data, where)
    if not 0 <= cfg.model.drop_rate < 1:
        raise ConfigError(f"{where}: `model.drop_rate` = {cfg.model.drop_rate} must be in [0, 1)")
    if cfg.model.drop_rate and cfg.model.name != "resnet12":
        raise ConfigError(f"{where}: `model.drop_rate` is DropBlock of model.name=resnet12; "
                          f"{cfg.model.name!r} has none: set it to 0")
    if cfg.train.max_skipped_steps is not None and cfg.train.max_skipped_steps < 1:
        raise ConfigError(f"{where}: `train.max_skipped_steps` must be at least 1 or null")
    if cfg.train.loss_warn_factor is not None and not cfg.train.loss_warn_factor > 1:
        raise ConfigError(f"{where}: `train.loss_warn_factor` = {cfg.train.loss_warn_factor} "
                          "must be above 1 or null")
    if cfg.eval.inner_steps is not None and cfg.eval.inner_steps < 0:
        raise ConfigError(f"{where}: `eval.inner_steps` must not be negative")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"{where}: `optim.min_lr` = {cfg.optim.min_lr} is above `optim.lr` = "
                          f"{cfg.optim.lr}; the schedule only decays")
    _validate_step_schedule(cfg.optim, where)
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError(f"{where}: `optim.grad_clip` must be positive or null")
    _validate_pretrain(cfg.pretrain, where)
    if cfg.model.init_from is not None and not cfg.model.init_from.strip():
        raise ConfigError(f"{where}: `model.init_from` is empty; give a run folder or null")
    if cfg.train.cpu_threads is not None and cfg.train.cpu_threads < 1:
        raise ConfigError(f"{where}: `train.cpu_threads` must be at least 1 or null")


def _inner_lrs(lr) -> list[tuple[str, float]]:
    if isinstance(lr, dict):
        return [(f"algorithm.inner_lr.{k}", v) for k, v in lr.items()]
    return [("algorithm.inner_lr", lr)]


def _validate_finite(cfg: Config, where: str) -> None:
    """No inf or NaN anywhere: YAML reads .inf and .nan as numbers, and a non-finite rate
    trains to NaN weights without an error."""
    def walk(node, prefix):
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name), f"{prefix}{f.name}.")
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix[:-1]}[{i}].")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{where}: `{prefix[:-1]}` = {node!r} must be a finite number")
    walk(cfg, "")


def _validate_implicit(algo: AlgorithmConfig, where: str) -> None:
    """What `algorithm.meta_gradient` = implicit cannot run with, named in one line."""
    if algo.meta_gradient != "implicit":
        return
    clashes = [key for key, on in (
        ("vectorize", algo.vectorize), ("checkpoint", algo.checkpoint != "none"),
        ("msl_steps", algo.msl_steps), ("learn_inner_lr", algo.learn_inner_lr),
        ("per_step_bn_weights", algo.per_step_bn_weights),
        ("proto_head", algo.proto_head)) if on]
    if clashes:
        raise ConfigError(f"{where}: `algorithm.meta_gradient` = implicit (iMAML: first-order "
                          f"proximal steps on the loop path) does not take "
                          f"`algorithm.{clashes[0]}` = {getattr(algo, clashes[0])!r}: "
                          "unset it or use meta_gradient unrolled")
    if algo.inner_steps < 1:
        raise ConfigError(f"{where}: `algorithm.meta_gradient` = implicit needs "
                          "`algorithm.inner_steps` of at least 1")


def _validate_augment(data: DataConfig, where: str) -> None:
    scale, jitter = data.augment_scale, data.augment_jitter
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"{where}: `data.augment_scale` = {scale} must be [low, high] with "
                          "0 < low <= high <= 1 (shares of the image's area)")
    if len(jitter) != 3 or not all(0 <= s <= 1 for s in jitter):
        raise ConfigError(f"{where}: `data.augment_jitter` = {jitter} must be three strengths in "
                          "[0, 1]: brightness, contrast, saturation")


def _validate_pretrain(pretrain: PretrainConfig, where: str) -> None:
    group = pretrain.norm_group
    if group is not None and (group < 1 or pretrain.batch_size % group):
        raise ConfigError(f"{where}: `pretrain.norm_group` = {group} must be a positive divisor "
                          f"of `pretrain.batch_size` = {pretrain.batch_size}")
    if not 0 <= pretrain.momentum < 1:
        raise ConfigError(f"{where}: `pretrain.momentum` = {pretrain.momentum} must be in [0, 1)")
    if pretrain.nesterov and (pretrain.optimizer != "sgd" or not pretrain.momentum):
        raise ConfigError(f"{where}: `pretrain.nesterov` needs pretrain.optimizer=sgd with a "
                          "positive pretrain.momentum")


def _validate_step_schedule(optim: OptimConfig, where: str) -> None:
    if optim.schedule == "step" and not optim.decay_at:
        raise ConfigError(f"{where}: `optim.schedule` = 'step' needs `optim.decay_at`, the steps "
                          f"at which the rate falls (say optim.decay_at=[3000])")
    if optim.decay_at and optim.schedule != "step":
        raise ConfigError(f"{where}: `optim.decay_at` = {optim.decay_at} does nothing with "
                          f"`optim.schedule` = {optim.schedule!r}; set optim.schedule=step or "
                          f"drop it")
    if any(s < 1 for s in optim.decay_at) or optim.decay_at != sorted(set(optim.decay_at)):
        raise ConfigError(f"{where}: `optim.decay_at` = {optim.decay_at} must be positive steps in "
                          f"ascending order")
    if not 0 < optim.decay_factor <= 1:
        raise ConfigError(f"{where}: `optim.decay_factor` = {optim.decay_factor} must be in (0, 1]")


def default_run_dir(cfg: Config) -> Path:
    """runs/<config name>-<seed>, the run folder when --run-dir is not given."""
    return Path("runs") / f"{cfg.name}-{cfg.train.seed}"


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML that load_config reads back to an equal Config."""
    from fsl_dist.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
