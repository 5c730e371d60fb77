"""Golden runs: the first 20 steps of the three digits configs at tiny sizes, through the
whole loop (data, masks, jitted step, checkpoints), reduced to per-step losses and a
parameter checksum. `tests/fixtures/golden.json` holds what the code produced when it was
recorded (`python tests/fixtures/make_golden.py`) and on which machine; `test_golden.py`
asserts that today's code reproduces it exactly there (elsewhere XLA's kernels may round
differently, and it asserts float32 round-off), so a change of any number shows up.
"""

import importlib.util
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
NUM_STEPS = 20
CONFIGS = ("digits", "digits_ijepa", "digits_supervised")
#: Tiny sizes shared by the three runs; 2 epochs with a 1-epoch warmup so the LR moves.
TINY = {
    "model.conv_impl": "xla",
    "model.embed_dim": 32,
    "model.depth": 1,
    "model.num_heads": 2,
    "batch_size": 16,
    "num_epochs": 2,
    "optim.lr_warmup_epochs": 1.0,
    "log_every_steps": 1,
    "checkpoint_every_steps": NUM_STEPS,
}
PER_CONFIG = {
    "digits": {"predictor.depth": 1, "knn_every_epochs": 0.0},
    "digits_ijepa": {
        "img_size": 64,
        "model.patch_size": 8,
        "ijepa.min_keep": 3,
        "ijepa.predictor_dim": 16,
        "ijepa.predictor_depth": 1,
        "knn_every_epochs": 0.0,
    },
    "digits_supervised": {"eval_every_epochs": 100},
}


def golden_config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    config = module.get_config()
    for key, value in {**TINY, **PER_CONFIG[name]}.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def checksum(tree) -> dict[str, float]:
    """Float64 sum and sum of squares over every leaf of a params tree."""
    import jax

    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return {
        "sum": float(sum(x.sum() for x in leaves)),
        "sum_sq": float(sum((x * x).sum() for x in leaves)),
        "size": int(sum(x.size for x in leaves)),
    }


def machine() -> str:
    """The CPU and JAX version that the numbers depend on, bit for bit."""
    import jax

    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        model = info["model name\t"].strip()
        flags = " ".join(
            f for f in ("avx2", "avx512f", "amx_tile") if f in info["flags\t\t"].split()
        )
    except (OSError, KeyError):
        pass
    return f"{model} [{flags}], jax {jax.__version__}"
