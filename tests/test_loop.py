"""The loop and the MIM-JEPA step: sharding invariance, resume = uninterrupted, NaN guard,
configs, CLI."""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from scott_jax import loop, masking, methods, objectives, optim
from scott_jax.checkpoint import Checkpointer, load_state_tree
from scott_jax.data.augment_spec import IMAGENET_MEAN, IMAGENET_STD
from scott_jax.errors import ConfigError
from scott_jax.methods import mim_jepa
from scott_jax.sharding import make_mesh
from scott_jax.writers import read_metrics

ROOT = Path(__file__).parents[1]
CONFIG_FIELDS = (
    "variant img_size batch_size num_epochs seed method data.name mask.type mask.ratio "
    "optim.lr_peak checkpoint_every_steps log_every_steps"
).split()


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module.get_config()


def config_module(name):
    """The module configs/<name>.py (method blocks, dataset files) as configs.<name>."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"configs.{name}")
    finally:
        sys.path.remove(str(ROOT))


def override(config, overrides):
    """`config` with dotted-key overrides ('optim.lr_peak': 1e-3) set in place."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def tiny_config(base=None, **overrides):
    """A config (default: configs/digits.py) shrunk to compile in seconds: 64 px, width 32,
    1 block each.

    The stem uses XLA's dense conv, which compiles ~3x faster than the CPU default (the
    sparse im2col stem); that default is checked against it in
    test_sparse_stem_step_on_8_devices_equals_the_dense_step.
    """
    config = load_config("digits") if base is None else base
    config.model.conv_impl = "xla"
    config.model.embed_dim = 32
    config.model.depth = 1
    config.model.num_heads = 2
    if "predictor" in config:
        config.predictor.depth = 1
    config.batch_size = 16
    config.num_epochs = 1
    config.optim.lr_warmup_epochs = 0.1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.knn_every_epochs = 0.0
    return override(config, overrides)


@pytest.mark.parametrize("name", ["digits", "flowers", "pets", "imagenet100"])
def test_configs_have_the_documented_fields(name):
    config = load_config(name)
    for field in CONFIG_FIELDS:
        node = config
        for part in field.split("."):
            node = node[part]
    assert config.method == "mim_jepa"
    encoder, _predictor = mim_jepa.build_models(config)
    assert encoder.img_size == config.img_size


@pytest.mark.parametrize("name", ["flowers", "pets", "imagenet100"])
def test_paper_configs_follow_the_paper(name):
    config = load_config(name)
    assert (config.variant, config.batch_size, config.num_epochs) == ("scott-12/16", 128, 300)
    assert (config.img_size, config.mask.type, config.mask.ratio) == (224, "blockwise", 0.6)


def test_run_lengths_match_the_worked_example():
    """Flowers full (8,189 images) at batch 64, the official schedule arithmetic (drop_last):
    ipe 127, T 38,100, W 5,080; at batch 128, T 18,900."""
    config = load_config("flowers")
    lengths = optim.run_lengths(8189, 64, config.num_epochs, config.optim.lr_warmup_epochs)
    assert lengths == optim.RunLengths(steps_per_epoch=127, total_steps=38_100, warmup_steps=5_080)
    assert optim.run_lengths(8189, 128, 300, 40).total_steps == 18_900
    with pytest.raises(ValueError, match="larger than the dataset"):
        optim.run_lengths(8189, 10_000, 300, 40)
    assert optim.run_lengths(8189, 64, 10, 20) == optim.RunLengths(127, 1270, 1270)  # clamped


def test_unknown_method_and_dtype_are_errors():
    with pytest.raises(ValueError, match="unknown method 'simclr'"):
        methods.get(tiny_config(method="simclr").method)
    with pytest.raises(ValueError, match="unknown compute_dtype"):
        mim_jepa.build_models(tiny_config(compute_dtype="fp8"))


def synthetic_batch(config, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch_size, config.img_size, config.img_size, 3)
    grid = config.img_size // 16
    return {
        "context": rng.standard_normal(shape).astype(np.float32),
        "target": rng.standard_normal(shape).astype(np.float32),
        "keep_mask": masking.keep_masks(seed, 0, batch_size, grid, 0.6).astype(np.int32),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }


LENGTHS = optim.RunLengths(steps_per_epoch=10, total_steps=20, warmup_steps=2)


def build_trainer(config, devices, online_probe=False):
    """The method's trainer on a ('data',) mesh over `devices`, 10 classes for the probe."""
    config.online_probe = online_probe
    return methods.get(config.method).build_trainer(
        config, LENGTHS, make_mesh(devices), SimpleNamespace(num_classes=10)
    )


def run_steps(config, devices, num_steps=2, online_probe=False):
    """num_steps jitted train steps on a ('data',) mesh over `devices`; returns (state, metrics)."""
    trainer = build_trainer(config, devices, online_probe)
    state = trainer.init(jax.random.key(0))
    history = []
    for i in range(num_steps):
        batch = synthetic_batch(config, 8, seed=i)
        if not online_probe:
            batch.pop("label")
        state, metrics = trainer.step(state, jax.device_put(batch, trainer.data_sharding))
        history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def one_device_run():
    """Two steps with the online probe on one device, shared by the next two tests (one
    compilation of that step instead of two)."""
    return run_steps(tiny_config(), jax.devices()[:1], num_steps=2, online_probe=True)


def test_step_on_8_devices_equals_1_device(one_device_run):
    config = tiny_config()
    state8, metrics8 = run_steps(config, jax.devices(), online_probe=True)
    state1, metrics1 = one_device_run
    assert len(state8.step.sharding.device_set) == 8
    for m8, m1 in zip(metrics8, metrics1, strict=True):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["probe/loss"], m1["probe/loss"], rtol=1e-5)
    chex.assert_trees_all_close(
        jax.device_get(state8.params), jax.device_get(state1.params), atol=1e-5, rtol=1e-5
    )
    chex.assert_trees_all_close(
        jax.device_get(state8.target_params), jax.device_get(state1.target_params), atol=1e-5
    )


def test_sparse_stem_step_on_8_devices_equals_the_dense_step(one_device_run):
    """The CPU default stem (im2col convs evaluated only inside kept patches, `max_kept`
    from the mask config), sharded over 8 devices, takes the same steps as the dense
    XLA-conv stem on one device."""
    state8, metrics8 = run_steps(
        tiny_config(**{"model.conv_impl": "im2col"}), jax.devices(), online_probe=True
    )
    state1, metrics1 = one_device_run
    for m8, m1 in zip(metrics8, metrics1, strict=True):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["grad_norm/tokenizer"], m1["grad_norm/tokenizer"], rtol=1e-4)
    chex.assert_trees_all_close(
        jax.device_get(state8.params), jax.device_get(state1.params), atol=1e-5, rtol=1e-5
    )


def test_predicting_only_the_masked_tokens_gives_the_full_loss():
    """The train step runs the predictor's last block and head at the masked tokens only
    (`num_kept`): its loss equals the full predictor's masked loss (without dropout); a
    mask row keeping a different number of tokens makes the loss NaN instead of dropping
    masked tokens. (Equal gradients: test_models, test_objectives.)"""
    config = tiny_config(
        **{"model.dropout_rate": 0.0, "model.attention_dropout": 0.0},
        **{"model.stochastic_depth_rate": 0.0},
    )
    trainer = build_trainer(config, jax.devices()[:1])
    encoder, predictor = mim_jepa.build_models(config)
    state = trainer.init(jax.random.key(0))
    params = jax.device_get(state.params)
    batch = synthetic_batch(config, 8)
    batch.pop("label")

    @jax.jit
    def full_loss(batch):
        targets = objectives.target_features(
            encoder.apply({"params": params["context_encoder"]}, batch["target"])
        )
        context = encoder.apply(
            {"params": params["context_encoder"]}, batch["context"], batch["keep_mask"]
        )
        predicted = predictor.apply({"params": params["predictor"]}, context)
        return objectives.masked_smooth_l1(predicted, targets, batch["keep_mask"])

    expected = full_loss(batch)  # before the step: the state's buffers are donated
    keep_mask = batch["keep_mask"].copy()
    keep_mask[3, np.flatnonzero(keep_mask[3])[0]] = 0  # row 3 now masks one token more
    _, metrics = trainer.step(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    _, metrics = trainer.step(trainer.init(jax.random.key(0)), {**batch, "keep_mask": keep_mask})
    assert np.isnan(metrics["loss"])


def test_step_updates_params_ema_and_probe(one_device_run):
    config = tiny_config()
    state, history = one_device_run
    assert int(state.step) == 2
    first = history[0]
    assert np.isfinite(first["loss"]) and first["loss"] > 0
    # Step 1 uses the warmup LR f(1) = lr_start + (peak - start)/W, and m(1) for the EMA.
    np.testing.assert_allclose(
        first["lr"],
        config.optim.lr_start + (config.optim.lr_peak - config.optim.lr_start) / 2,
        rtol=1e-5,
    )
    np.testing.assert_allclose(first["ema"], 0.996 + 0.004 / 20, rtol=1e-6)
    assert {"probe/loss", "probe/train_top1", "grad_norm/tokenizer", "target_std"} <= set(first)
    assert first["grad_norm/tokenizer"] > 0 and first["grad_norm/predictor"] > 0
    # The target moved towards the context encoder, but only by (1 - m) of the way.
    target = state.target_params["transformer"]["block_0"]["attn"]["qkv"]["kernel"]
    context = state.params["context_encoder"]["transformer"]["block_0"]["attn"]["qkv"]["kernel"]
    assert not np.allclose(target, context)


def test_bfloat16_compute_keeps_float32_params():
    config = tiny_config(compute_dtype="bfloat16")
    state, history = run_steps(config, jax.devices()[:1], num_steps=1)
    assert np.isfinite(history[0]["loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)


def test_colour_on_device_step_equals_the_host_views_step():
    """`config.data.color_on_device`: a uint8 'view' batch, normalised in the step (aug='none'),
    trains exactly like the host pipeline's normalised 'context' / 'target' views."""
    config = tiny_config(**{"data.aug": "none"})
    trainer = build_trainer(config, jax.devices()[:1])
    batch = synthetic_batch(config, 8)
    view = np.random.default_rng(1).integers(0, 256, batch["context"].shape, dtype=np.uint8)
    normalised = (view / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    host = {**batch, "context": normalised.astype(np.float32)}
    host["target"] = host["context"]
    on_device = {k: v for k, v in batch.items() if k not in ("context", "target")}
    on_device["view"] = view
    losses = []
    for step_batch in (host, on_device):
        state = trainer.init(jax.random.key(0))
        _, metrics = trainer.step(state, jax.device_put(step_batch, trainer.data_sharding))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert losses[0] > 0


def test_colour_on_device_is_the_default_for_mim_jepa_on_accelerators_only(monkeypatch):
    """color_on_device=None: on for a method whose step colours the views (MIM-JEPA) on a
    GPU / TPU with one crop per image; off on CPU, for the other methods and for aug='moca';
    an explicit True / False wins."""
    from scott_jax.methods.base import Trainer

    mim_jepa_trainer = Trainer(None, None, None, None, colours_views=True)
    other = Trainer(None, None, None, None)
    auto = tiny_config()
    assert auto.data.color_on_device is None
    assert not loop.color_on_device(auto, mim_jepa_trainer)  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert loop.color_on_device(auto, mim_jepa_trainer)
    assert not loop.color_on_device(auto, other)
    assert not loop.color_on_device(tiny_config(**{"data.aug": "moca"}), mim_jepa_trainer)
    off = tiny_config(**{"data.color_on_device": False})
    assert not loop.color_on_device(off, mim_jepa_trainer)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    on = tiny_config(**{"data.color_on_device": True})
    assert loop.color_on_device(on, mim_jepa_trainer)


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_run(tmp_path):
    """Stop after step 3, resume, and the losses of steps 4-6 equal the uninterrupted run's."""
    config = tiny_config()
    full = loop.train_and_evaluate(config, tmp_path / "full", stop_at_step=6).state
    loop.train_and_evaluate(config, tmp_path / "resumed", stop_at_step=3)
    assert Checkpointer(tmp_path / "resumed" / "checkpoints").latest_step() == 3
    resumed = loop.train_and_evaluate(config, tmp_path / "resumed", stop_at_step=6).state
    assert int(resumed.step) == int(full.step) == 6
    full_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
    resumed_losses = {
        r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed") if "loss" in r
    }
    assert sorted(resumed_losses) == sorted(full_losses) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        np.testing.assert_allclose(resumed_losses[step], full_losses[step], rtol=1e-6)
    chex.assert_trees_all_close(
        jax.device_get(resumed.target_params), jax.device_get(full.target_params), atol=1e-6
    )
    assert Checkpointer(tmp_path / "full" / "checkpoints").all_steps() == [2, 4, 6][-3:]


def test_online_knn_and_collapse_monitors_are_logged(tmp_path):
    """knn_every_epochs: k-NN rows for both encoders at its interval, and both std monitors."""
    config = tiny_config(knn_every_epochs=2 / 112)  # digits: 112 steps per epoch -> every 2
    loop.train_and_evaluate(config, tmp_path, stop_at_step=3)
    rows = read_metrics(tmp_path)
    knn = [r for r in rows if "knn/target_top1" in r]
    assert [r["step"] for r in knn] == [2]
    for key in ("knn/target_top1", "knn/context_top1"):
        assert 10.0 < knn[0][key] <= 100.0  # 10 classes: random-init features beat chance
    losses = [r for r in rows if "loss" in r]
    assert all(r["context_std"] > 0 and r["target_std"] > 0 for r in losses)


def test_online_knn_needs_labels(tmp_path):
    config = tiny_config(knn_every_epochs=1.0, **{"data.name": f"folder:{tmp_path}"})
    (tmp_path / "train").mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "train" / f"{i}.png")
    with pytest.raises(ValueError, match="knn_every_epochs needs labeled data"):
        loop.train_and_evaluate(config, tmp_path / "run")


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """NaN pixels in the 5th batch make the loss of step 5 nan: the run stops there, without
    logging or checkpointing it, and step 4 stays the last (finite) checkpoint. (The model and
    schedule of test_resumed_run_matches_the_uninterrupted_run: its compiled step is reused.)"""
    from scott_jax import data

    clean_batches = data.pretrain_batches

    class Poisoned:
        """The clean stream, with NaN pixels in the batch of step 5."""

        def __init__(self, batches, start_step):
            self.batches, self.step, self.skipped = batches, start_step, 0

        def __iter__(self):
            return self

        def __next__(self):
            batch = next(self.batches)
            self.step += 1
            if self.step == 5:
                batch = {**batch, "context": np.full_like(batch["context"], np.nan)}
            return batch

    def poisoned_batches(*args, start_step, **kwargs):
        return Poisoned(clean_batches(*args, start_step=start_step, **kwargs), start_step)

    monkeypatch.setattr(data, "pretrain_batches", poisoned_batches)
    config = tiny_config()
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 5.*step 4 in"):
        loop.train_and_evaluate(config, tmp_path, stop_at_step=8)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [2, 4]
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert checkpointer.restore_config(4)["optim"]["lr_peak"] == config.optim.lr_peak
    params = load_state_tree(tmp_path / "checkpoints")["params"]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_launch_rejects_a_misspelt_override(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--config",
            "configs/digits.py",
            "--config.optim.lr_peek=1e-4",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "lr_peek" in result.stderr


TINY_OVERRIDES = [
    "--config.model.embed_dim=32",
    "--config.model.depth=1",
    "--config.model.num_heads=2",
    "--config.predictor.depth=1",
    "--config.batch_size=16",
    "--config.num_epochs=1",
    "--config.optim.lr_warmup_epochs=0.1",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1000",
]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    command = [sys.executable, "launch.py", "--config", "configs/digits.py", *TINY_OVERRIDES]
    process = subprocess.Popen(
        [*command, "--workdir", str(tmp_path)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no metrics after 180 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # interrupted, saved: 143
    assert "Stop requested" in stderr
    saved = Checkpointer(tmp_path / "checkpoints").latest_step()
    assert saved is not None and saved >= 1
    assert saved == read_metrics(tmp_path)[-1]["step"]
    assert read_metrics(tmp_path)[0] == {**read_metrics(tmp_path)[0], "data/skipped_files": 0}
    rerun = subprocess.Popen(
        [*command, "--workdir", str(tmp_path)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in rerun.stderr:  # stop the rerun as soon as it says where it resumed
            if "Resumed from step" in line or "examples: step" in line:
                break
    finally:
        rerun.kill()
        rerun.wait()
    assert f"Resumed from step {saved}." in line


V0_RUNS = Path(__file__).parent / "fixtures" / "v0_run"


def v0_config(name):
    """The configs of tests/fixtures/v0_run: checkpoints written by the code before the loop
    and methods were split (commit fdc1998), a tiny ViT at step 2 of each method."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from golden import golden_config

    config = golden_config(name)
    config.variant = "vit-7/16"
    config.model.patch_size = 16 if name == "digits" else 8
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 1
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "digits_ijepa"])
def test_checkpoints_of_the_previous_layout_still_load(name, tmp_path):
    """probe.py reads both encoders of an old run, and the loop resumes it."""
    from scott_jax.evaluators.backbone import load_backbone

    for encoder in ("context", "target"):
        backbone = load_backbone(V0_RUNS / name, encoder=encoder)
        assert backbone.step == 2 and backbone.encoder.img_size == 64
    workdir = tmp_path / name
    shutil.copytree(V0_RUNS / name, workdir)
    state = loop.train_and_evaluate(v0_config(name), workdir, stop_at_step=3).state
    assert int(state.step) == 3
    losses = {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
    assert sorted(losses) == [1, 2, 3] and np.isfinite(losses[3])


def test_the_config_is_recorded_and_a_changed_resume_is_refused(tmp_path):
    config = tiny_config()
    loop.record_config(config, str(tmp_path))
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["optim"]["lr_peak"] == config.optim.lr_peak
    loop.record_config(tiny_config(log_every_steps=7), str(tmp_path))  # may change
    changed = tiny_config(**{"optim.lr_peak": 1e-3, "mask.ratio": 0.5})
    with pytest.raises(ConfigError, match=r"(?s)mask.ratio: 0.6 -> 0.5.*optim.lr_peak"):
        loop.record_config(changed, str(tmp_path))
    changed.accept_config_changes = True
    loop.record_config(changed, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr_peak"] == 1e-3
