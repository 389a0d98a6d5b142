"""Meta-step speed, memory, FLOP rate and meta-gradient agreement: fsl_dist vs its peers.

One table for fsl_dist's execution paths and for learn2learn, higher and TorchOpt.

A case is (model, algorithm, task shape, inner steps, meta-batch); a method is a way to compute
the meta-gradient: fsl_dist's ``loop`` and ``vmap`` paths (and ANIL without feature reuse), and
the peers ``learn2learn`` (``l2l.algorithms.MAML``, clone/adapt), ``higher``
(``innerloop_ctx`` + differentiable SGD) and ``torchopt`` (``MetaSGD`` with
``extract_state_dict``/``recover_state_dict``). Every method computes the same math: the same
initial weights (seed 0), the same synthetic tasks, inner update ``p - 0.4 * grad(CE support
loss)`` on the parameters the algorithm adapts (MAML: all, BOIL: ``features.*``, ANIL:
``classifier.*``), second order, meta-loss = mean query CE over the tasks.

How the peers run (each library's own idiom, tasks in a per-task loop): the module that adapts
is the whole model (MAML), ``model.features`` (BOIL) or ``model.classifier`` (ANIL) and the rest
of the model is used as a plain module around it, so its parameters are meta-learned but not
adapted; for ANIL the body's features are computed once per task (support and query
separately, as fsl_dist's ANIL path and learn2learn's ANIL example do); each task's query loss
is divided by the meta-batch and back-propagated right away (as in the libraries' MAML
examples), which sums to the gradient of the mean.

A step is the meta-gradient + an Adam step on synthetic binary 28x28 images (``--image-size``,
``--channels`` and ``--width`` set another case: 84, 3 and 32 for Conv-4-32 at mini-ImageNet
scale; every method gets that model and those tasks). Each row runs in
its own process, so its peak memory (CPU: the RSS high-water mark, reset just before the first
step, above the RSS then; GPU: ``torch.cuda.max_memory_allocated``) is its own. Before timing,
each row computes its meta-gradient once at the initial weights (float32, on one intra-op
thread for every method, so that thread-count rounding does not mask whether the math agrees);
the table reports, per row, the largest relative difference to fsl_dist's loop path on the same
case: ``max|g - g_loop| / max|g_loop|`` over all parameters (the norm-relative difference
``|g - g_loop| / |g_loop|`` is in the JSON),
and the same measure against the case's meta-gradient in float64 (computed once per case with
the plain-autograd reference below), which shows how far each method's float32 rounding is
from the exact value.

Floating-point work is counted once per case with ``torch.utils.flop_counter.FlopCounterMode``
around one task's meta-gradient on a plain-autograd reference (``reference_task``: the math and
nothing else; ANIL's body features once per task; no statistics such as fsl_dist's accuracy
before adaptation, which costs one more query forward), times the meta-batch; it counts matrix
products and convolutions (forward, backward and the double-backward of the second-order
term), not element-wise ops. The CPU/GPU ceiling is the
median rate of a large float32 and bfloat16 matrix product measured in the same run with the
same thread count. Effective GFLOP/s = counted FLOP per step / median step time.

Lever rows, run only when named with ``--methods``: ``loop, serial`` (one task at a time on all
intra-op threads), ``loop, meta_loss + backward`` (the earlier trainer path), ``compiled``
(``torch.compile`` over each task's whole meta-gradient written with ``torch.func.grad``; MAML
and BOIL), ``loop, glibc malloc defaults`` and ``<peer>, tuned malloc``.

Allocator: on CPU, fsl_dist's rows run with the allocator settings launch/train.py applies
(``fsl_dist/cpu_malloc.py``: glibc keeps freed activations instead of returning them to the
kernel) and start as a CPU training process does, under ``cpu_malloc.START_TUNABLES``; the
peers' rows as the libraries ship, in glibc's defaults. The lever rows
``loop, glibc malloc defaults`` (fsl_dist without the settings) and ``<peer>, tuned malloc``
(the peer with them) show what the settings buy each side. A ``MALLOC_*_`` variable, malloc
settings in ``GLIBC_TUNABLES`` or ``LD_PRELOAD`` in the environment reach every row and turn
fsl_dist's settings off (the machine line says which). ``--cpu-allocator`` picks fsl_dist's
malloc as ``train.cpu_allocator`` does: by default (auto) the ``loop, memory plan`` rows start
under tcmalloc where it is found, as a training run with a memory budget does.

Run it with launch/bench.py (or ``python -m fsl_dist.bench``)::

    python launch/bench.py                    # full grid (48 cases): hours on 2 CPU cores
    python launch/bench.py --quick            # smoke run: 5-way 1-shot, 1 step, meta-batch 8
    python launch/bench.py --device cuda --json runs/bench.json

Modules: ``peers`` (the methods table: fsl_dist's paths, the peers, the levers, the reference),
``cases`` (the grid and its synthetic tasks), ``measure`` (one row in its own process, FLOP
count, ceiling, peak memory), ``report`` (the tables, and which saved rows a resumed run keeps),
``machine`` (the CPU model and flags of the machine line), ``cli`` (the command line). Beside
them, the other benchmark command lines: ``precision_check`` (launch/precision_check.py),
``scaling`` (launch/bench_scaling.py) and ``data`` (launch/bench_data.py).
"""
