"""The training methods, each a module the one loop (`scott_jax.loop`) drives; `of(config)`
maps `config.method` to its module and is the only place that reads that field.

A method module provides:
- `NAME`: its `config.method` value;
- `ENCODERS`: {name: path in the train state} of its evaluation encoders, the first being
  probe.py's default (MIM-JEPA: 'context', 'target');
- `check_config(config)`: errors for its own fields, before any data is read or compiled;
- `build_encoder(config, compute_dtype=None)`: the encoder of a run config (a ConfigDict or
  the dict saved with a checkpoint), with which probe.py rebuilds a run's backbone;
- `train_source(config)`: the `Source` the loop streams (e.g. the pretraining split);
- `build_trainer(config, lengths, mesh, source) -> methods.base.Trainer`: its jitted init
  and step, the host-side stream that adds masks, its evaluators and results.
Adding a method: its module, its config block (configs/<method>.py) and one line below.
"""

from collections.abc import Mapping
from types import ModuleType

from scott_jax.methods import ijepa, mim_jepa, moca, splitmask, supervised

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (mim_jepa, ijepa, supervised, splitmask, moca)}


def get(name: str | None) -> ModuleType:
    """The module of method `name` (a config's `method`); ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def of(config: Mapping) -> ModuleType:
    """The module of a run config's method (a ConfigDict or the dict saved with a run)."""
    return get(config.get("method"))
