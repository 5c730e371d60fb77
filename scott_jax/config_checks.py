"""Range checks of config values, run before any data is read, any file written or anything
compiled: every mistake is one line of one `ConfigError`. `check_common` covers the fields of
configs/common.py; each method's `check_config` checks its own block with `Checks`."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

from scott_jax import storage
from scott_jax.errors import ConfigError


class Checks:
    """Collects the problems of a config; `done()` raises them all as one ConfigError."""

    def __init__(self, config: Mapping):
        self.config = config
        self.problems: list[str] = []

    def value(self, path: str) -> Any:
        node = self.config
        for key in path.split("."):
            node = node[key]
        return node

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def number(
        self,
        path: str,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        integer: bool = False,
        optional: bool = False,
    ) -> None:
        """`config.<path>` is a finite (integer) number in [low, high] (open ends as asked),
        or None when `optional`."""
        x = self.value(path)
        if x is None and optional:
            return
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(x, int) if integer else isinstance(x, int | float)
        if isinstance(x, bool) or not ok_type or not math.isfinite(x):
            self.fail(f"config.{path}={x!r} must be {kind}")
            return
        bounds = []
        if low is not None:
            bounds.append((x > low) if low_open else (x >= low))
        if high is not None:
            bounds.append((x < high) if high_open else (x <= high))
        if not all(bounds):
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            self.fail(f"config.{path}={x!r} must lie in {left}{lo}, {hi}{right}")

    def choice(self, path: str, options: Sequence) -> None:
        x = self.value(path)
        if x not in options:
            self.fail(f"config.{path}={x!r} must be one of {list(options)}")

    def fraction_range(self, path: str) -> None:
        """A (low, high) pair with 0 < low <= high <= 1, e.g. a crop scale."""
        x = self.value(path)
        if len(x) != 2 or not 0 < x[0] <= x[1] <= 1:
            self.fail(f"config.{path}={tuple(x)!r} must be (low, high) with 0 < low <= high <= 1")

    def done(self) -> None:
        if len(self.problems) == 1:
            raise ConfigError(self.problems[0])
        if self.problems:
            raise ConfigError("invalid config values:\n  " + "\n  ".join(self.problems))


def check_common(config: Mapping, device_count: int) -> None:
    """The shared recipe's fields (configs/common.py) and the batch's fit to the devices."""
    from scott_jax.data.augment_spec import AUGMENTATIONS  # imports no TensorFlow
    from scott_jax.models import COMPUTE_DTYPES

    c = Checks(config)
    c.number("img_size", low=1, integer=True)
    c.number("batch_size", low=1, integer=True)
    if isinstance(config["batch_size"], int) and config["batch_size"] % device_count:
        c.fail(
            f"config.batch_size={config['batch_size']} must be divisible by the "
            f"{device_count} devices"
        )
    c.number("num_epochs", low=0, low_open=True)
    c.number("seed", integer=True)
    for name in ("embed_dim", "depth", "num_heads"):
        c.number(f"model.{name}", low=1, integer=True, optional=True)
    c.number("model.mlp_ratio", low=0, low_open=True)
    for name in ("dropout_rate", "attention_dropout", "stochastic_depth_rate"):
        c.number(f"model.{name}", low=0, high=1, high_open=True)
    c.number("model.num_register_tokens", low=0, integer=True)
    c.choice("model.ffn_layer", ("swiglu", "mlp"))
    c.choice("data.aug", AUGMENTATIONS)
    c.fraction_range("data.crop_scale")
    if isinstance(name := c.value("data.name"), str) and name.startswith("folder:"):
        if message := storage.problem(name[len("folder:") :], "config.data.name folder"):
            c.fail(message)
    if isinstance(data_dir := c.value("data.data_dir"), str):
        if message := storage.problem(data_dir, "config.data.data_dir"):
            c.fail(message)
    c.choice("data.cache", ("none", "device", "auto"))
    c.number("data.cache_size", low=1, integer=True, optional=True)
    c.number("data.cache_max_gb", low=0, low_open=True)
    if c.value("data.cache") == "device" and c.value("data.aug") == "moca":
        c.fail("config.data.cache='device' makes one crop per image; aug='moca' needs one per view")
    c.number("optim.lr_warmup_epochs", low=0)  # longer than the run: clamped, with a warning
    for name in ("lr_start", "lr_peak", "lr_final", "wd_start", "wd_final"):
        c.number(f"optim.{name}", low=0)
    c.number("optim.lr_flat_pctg", low=0, high=1)
    for name in ("b1", "b2"):
        c.number(f"optim.{name}", low=0, high=1, high_open=True)
    c.number("optim.eps", low=0, low_open=True)
    c.choice("compute_dtype", tuple(COMPUTE_DTYPES))
    for name in ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
        c.number(name, low=1, integer=True)
    c.done()
