"""The supervised baseline: it learns, resumes exactly, writes results; launch.py dispatches."""

import importlib.util
import json
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
from test_loop import override

from scott_jax import loop
from scott_jax.checkpoint import Checkpointer, load_state_tree
from scott_jax.methods import supervised
from scott_jax.writers import read_metrics

ROOT = Path(__file__).parents[1]
TINY = {
    "model.embed_dim": 32,
    "model.depth": 1,
    "model.num_heads": 2,
    "batch_size": 16,
    "log_every_steps": 1,
    "checkpoint_every_steps": 3,
}


def supervised_config(name="digits_supervised", **overrides):
    """A configs/*_supervised.py config with dotted-key overrides (TINY first)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    config = module.get_config()
    return override(config, {**TINY, **overrides})


@pytest.mark.parametrize("name", ["digits", "flowers", "pets", "imagenet100"])
def test_supervised_configs_keep_the_pretraining_model_and_augmentations(name):
    pretraining = supervised_config(name)
    config = supervised_config(f"{name}_supervised")
    assert config.method == "supervised" and config.num_epochs == 300
    assert (config.variant, config.img_size, config.data.aug) == (
        pretraining.variant,
        pretraining.img_size,
        pretraining.data.aug,
    )
    assert tuple(config.data.crop_scale) == tuple(pretraining.data.crop_scale)
    assert "mask" not in config and "predictor" not in config
    model = supervised.build_classifier(config, num_classes=10)
    assert model.encoder.img_size == config.img_size and model.head.num_classes == 10


def test_config_errors():
    for overrides, message in [
        ({"head": "mlp"}, "config.head"),
        ({"selection": "reference"}, "config.selection"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"optim.lr_warmup_epochs": -1.0}, "lr_warmup_epochs"),
    ]:
        config = supervised_config(**overrides)
        with pytest.raises(ValueError, match=message):
            supervised.check_config(config)
            supervised.build_classifier(config, 10)


@pytest.mark.slow
def test_supervised_run_learns_digits(tmp_path):
    """Four epochs on all 1,008 probe_train digits: test top-1 far above chance (10 %)."""
    config = supervised_config(
        num_epochs=4,
        eval_every_epochs=2,
        log_every_steps=50,
        checkpoint_every_steps=1000,
        img_size=32,  # the digits' own size (8 px upsampled 4x; 64 in the config): 2x2 patches
        **{"optim.lr_warmup_epochs": 0.5, "optim.lr_peak": 2e-3},
    )
    results = loop.train_and_evaluate(config, tmp_path).results
    entry = results["probes"]["linear"]
    assert entry["top1"] > 60.0, entry
    assert entry["mpc"] <= entry["top5"] and entry["top1"] <= entry["top5"]
    assert entry["epoch"] in (2, 4) and entry["select_split"] == "probe_select"
    saved = json.loads((tmp_path / "supervised" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["train_examples"] == 1008 and saved["checkpoint_step"] == 4 * 63
    evaluations = [r for r in read_metrics(tmp_path) if "epoch" in r]
    assert [r["epoch"] for r in evaluations] == [2, 4]
    assert "linear" in supervised.format_table(results)


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_run(tmp_path):
    """10 labels per class, batch 16: 6 steps; stop after 3, resume: same losses and params."""
    config = supervised_config(labels_per_class=10, num_epochs=2, eval_every_epochs=1, img_size=32)
    config.optim.lr_warmup_epochs = 1.0
    full = loop.train_and_evaluate(config, tmp_path / "full").results
    stopped = loop.train_and_evaluate(config, tmp_path / "resumed", stop_at_step=4)
    assert stopped.results is None
    assert Checkpointer(tmp_path / "resumed" / "checkpoints").latest_step() == 4
    resumed = loop.train_and_evaluate(config, tmp_path / "resumed").results

    def losses(workdir):
        return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}

    assert sorted(losses(tmp_path / "full")) == list(range(1, 13))
    np.testing.assert_allclose(
        [losses(tmp_path / "resumed")[s] for s in range(1, 13)],
        [losses(tmp_path / "full")[s] for s in range(1, 13)],
        rtol=1e-6,
    )
    assert resumed["probes"] == full["probes"] and resumed["checkpoint_step"] == 12
    chex.assert_trees_all_close(
        load_state_tree(tmp_path / "resumed" / "checkpoints")["params"],
        load_state_tree(tmp_path / "full" / "checkpoints")["params"],
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("config_file", "method"), [("digits_supervised", "supervised"), ("digits", "mim_jepa")]
)
def test_launch_runs_the_loop_with_the_configs_method(config_file, method, tmp_path, monkeypatch):
    """launch.py hands every config to the one loop, which picks the method."""
    from absl import flags

    calls = []
    monkeypatch.setattr(
        loop,
        "train_and_evaluate",
        lambda config, workdir: calls.append((config.method, workdir)) or loop.Outcome(None, None),
    )
    monkeypatch.syspath_prepend(str(ROOT))
    import launch

    argv = ["launch.py", "--config", str(ROOT / "configs" / f"{config_file}.py")]
    flags.FLAGS([*argv, "--workdir", str(tmp_path)])
    try:
        launch.main(["launch.py"])
    finally:
        flags.FLAGS.unparse_flags()
    assert calls == [(method, str(tmp_path))]
