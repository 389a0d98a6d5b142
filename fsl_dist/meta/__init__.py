"""Second-order meta-learning (MAML, BOIL, ANIL) as pure functions over parameter dicts.

The algorithms differ only in which parameters adapt in the inner loop (``algorithms``);
``inner.adapt`` runs the inner loop for one task; ``objective.meta_loss`` is the
meta-objective over a batch of tasks and ``objective.meta_backward`` its gradient, task by
task; ``implicit`` holds iMAML's implicit meta-gradient (``InnerLoopSpec.meta_gradient``).
Nothing here knows about ranks or processes.
"""

from .algorithms import (
    ADAPTED_GROUPS,
    ALGORITHMS,
    DEFAULT_INNER_LR,
    LearnedInnerLR,
    adapted_parameter_names,
    inner_parameter_names,
    learned_inner_lr,
    resolve_inner_lr,
)
from .inner import INNER_LOSSES, Adaptation, adapt
from .objective import (
    AdaptedTask,
    adapt_task,
    default_task_workers,
    default_vectorize,
    evaluate_tasks,
    meta_backward,
    meta_loss,
)
from .precision import PRECISIONS, InnerLossScaler
from .spec import InnerLoopSpec

__all__ = [
    "ADAPTED_GROUPS", "ALGORITHMS", "DEFAULT_INNER_LR", "INNER_LOSSES", "PRECISIONS",
    "AdaptedTask", "Adaptation", "InnerLoopSpec", "InnerLossScaler", "LearnedInnerLR", "adapt",
    "adapt_task",
    "adapted_parameter_names", "inner_parameter_names",
    "default_task_workers", "default_vectorize", "evaluate_tasks", "learned_inner_lr",
    "meta_backward", "meta_loss", "resolve_inner_lr",
]
