"""Evaluators of frozen features, shared by the online monitors of the training loop and by
`probe.py`: `backbone` (a run's encoder and its features), `knn`, `metrics`, `selection` and
`probes` (the frozen-feature probes' training). This file only defines what the loop runs.
"""

from collections.abc import Callable
from typing import Any, NamedTuple


class Evaluator(NamedTuple):
    """A periodic evaluation: the loop calls `run(state, step) -> metrics row` every
    `every_steps` steps and at the last step, and writes the row to the run's metrics."""

    every_steps: int
    run: Callable[[Any, int], dict[str, float]]
