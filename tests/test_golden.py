"""Behaviour is unchanged: the first 20 steps of the three digits configs reproduce the
losses and parameter checksums recorded in tests/fixtures/golden.json: exactly on the
machine that recorded them, to float32 round-off on another CPU or JAX."""

import json
from pathlib import Path

import pytest
from golden import CONFIGS, NUM_STEPS, checksum, golden_config, machine

from scott_jax.checkpoint import load_state_tree
from scott_jax.loop import train_and_evaluate
from scott_jax.writers import read_metrics

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_golden_run_is_reproduced_exactly(name, tmp_path):
    train_and_evaluate(golden_config(name), tmp_path, stop_at_step=NUM_STEPS)
    expected = GOLDEN[name]
    tree = load_state_tree(tmp_path / "checkpoints", NUM_STEPS)
    got = {
        "loss": [r["loss"] for r in read_metrics(tmp_path) if "loss" in r],
        **{key: checksum(tree[key]) for key in ("params", "target_params") if key in expected},
    }
    if machine() == GOLDEN["machine"]:
        assert got == expected
    else:
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)
        for key in got.keys() - {"loss"}:
            assert got[key] == pytest.approx(expected[key], rel=1e-4), key
