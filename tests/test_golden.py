"""Behaviour is unchanged: the first 20 steps of the three digits configs reproduce the
losses and parameter checksums recorded in tests/fixtures/golden.json exactly."""

import json
from pathlib import Path

import pytest
from golden import CONFIGS, NUM_STEPS, checksum, golden_config

from scott_jax.checkpoint import load_state_tree
from scott_jax.loop import train_and_evaluate
from scott_jax.writers import read_metrics

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_golden_run_is_reproduced_exactly(name, tmp_path):
    train_and_evaluate(golden_config(name), tmp_path, stop_at_step=NUM_STEPS)
    expected = GOLDEN[name]
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert losses == expected["loss"]
    tree = load_state_tree(tmp_path / "checkpoints", NUM_STEPS)
    assert checksum(tree["params"]) == expected["params"]
    if "target_params" in expected:
        assert checksum(tree["target_params"]) == expected["target_params"]
