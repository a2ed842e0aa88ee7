"""The evaluation harness of both papers (SPEC §6): a cached, resumable grid of generations scored
by identity (several recognizers), face-fail count, CLIP-T, face-style and aesthetic metrics, and a
report with Pareto fronts over the identity scale.

    python -m lcmla evaluate --preset hyper-sdxl-4step --faces me.jpg --methods baseline,am2+dcg \\
        --seeds 0,1 --scales 0.5,0.8 --output-dir eval

Several processes share one grid (``accelerate launch -m lcmla evaluate …``; see ``run``).

``run`` (the grid, its cache and processes), ``metrics`` (one function or class per metric),
``report`` (summary, plots), ``cli`` (the command).
"""
