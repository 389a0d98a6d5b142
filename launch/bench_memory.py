"""Memory per task: peak RSS and time of one second-order ResNet-12 84x84 meta-gradient per
inner-loop checkpoint level (algorithm.checkpoint) or the implicit meta-gradient (level
implicit, algorithm.meta_gradient), each row in a fresh process.

    OMP_NUM_THREADS=1 python launch/bench_memory.py --steps 1 5 --levels none steps blocks
    OMP_NUM_THREADS=1 python launch/bench_memory.py --shot 1 --steps 1 5 --levels torchopt higher

The code and what each column means: fsl_dist/bench/memory.py.
"""

from fsl_dist.bench.memory import main

if __name__ == "__main__":
    main()
