"""I-JEPA: multi-block masks (static shapes, bounds, quirk flags), models (context-only
encoder, per-block predictor), loss and schedules, the step (no recompilation, 8 devices =
1 device), resume = uninterrupted, and probe.py loading an I-JEPA run."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import build_trainer, config_module, load_config, tiny_config

from scott_jax import loop, objectives, optim
from scott_jax import masking_multiblock as mb
from scott_jax.checkpoint import Checkpointer
from scott_jax.evaluators.backbone import load_backbone
from scott_jax.methods import ijepa
from scott_jax.models import ijepa as models
from scott_jax.writers import read_metrics

UPSTREAM = dict(correlated_size=True, exclusive_corner=True, truncate_context=True)


def draws(spec, steps=40, batch_size=32, seed=0):
    return [mb.multiblock_masks(spec, seed, step, batch_size) for step in range(steps)]


def as_sets(idx, valid):
    """Index lists [..., K] + validity -> one set of valid patch indices per list."""
    rows = zip(idx.reshape(-1, idx.shape[-1]), valid.reshape(-1, valid.shape[-1]), strict=True)
    return [set(i[v].tolist()) for i, v in rows]


def bounding_box(indices, grid):
    rows, cols = np.divmod(np.asarray(sorted(indices)), grid)
    return rows.min(), rows.max(), cols.min(), cols.max()


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("flags", [{}, UPSTREAM, {"max_context_tokens": 100}])
def test_mask_shapes_are_static_and_indices_in_range(flags):
    spec = mb.MultiBlockSpec(grid=14, **flags)
    context_length, target_length = mb.check_spec(spec)
    for masks in draws(spec, steps=20):
        assert masks["context_idx"].shape == masks["context_valid"].shape == (32, context_length)
        assert masks["target_idx"].shape == masks["target_valid"].shape == (32, 4, target_length)
        assert masks["context_idx"].dtype == masks["target_idx"].dtype == np.int32
        for key in ("context_idx", "target_idx"):
            assert masks[key].min() >= 0 and masks[key].max() < 196
    assert target_length == max(h * w for h, w in mb.reachable_sizes(14, (0.15, 0.2), (0.75, 1.5)))


def test_context_and_targets_are_disjoint_and_blocks_within_bounds():
    spec = mb.MultiBlockSpec(grid=14)
    sizes = mb.reachable_sizes(14, spec.target_scale, spec.target_aspect)
    context_sizes = mb.reachable_sizes(14, spec.context_scale, spec.context_aspect)
    seen = set()
    for masks in draws(spec):
        targets = as_sets(masks["target_idx"], masks["target_valid"])
        contexts = as_sets(masks["context_idx"], masks["context_valid"])
        for b, context in enumerate(contexts):
            assert len(context) > spec.min_keep
            blocks = targets[4 * b : 4 * b + 4]
            assert not context & set().union(*blocks)
            top, bottom, left, right = bounding_box(context, 14)
            assert any(bottom - top < h and right - left < w for h, w in context_sizes)
            for block in blocks:  # a full h x w rectangle of a reachable size
                top, bottom, left, right = bounding_box(block, 14)
                size = (bottom - top + 1, right - left + 1)
                assert size in sizes and len(block) == size[0] * size[1]
                seen.add(size)
    assert len(seen) > 3  # sizes vary between batches...
    for masks in draws(spec, steps=3):  # ...but not within one
        assert len(set(masks["target_valid"].sum(-1).ravel())) == 1


def test_reachable_sizes_cover_every_sampled_size():
    rng = np.random.default_rng(0)
    expected = mb.reachable_sizes(14, (0.15, 0.2), (0.75, 1.5))
    sampled = {
        mb.block_size(14, s, a)
        for s, a in zip(rng.uniform(0.15, 0.2, 20000), rng.uniform(0.75, 1.5, 20000), strict=True)
    }
    assert sampled <= expected
    assert max(h * w for h, w in sampled) == max(h * w for h, w in expected)


def test_upstream_flags_reproduce_the_collator_quirks():
    """The official collator (ijepa `src/masks/multiblock.py`) at 14x14: targets only 5x6, 6x5,
    6x6, 7x5, 8x5; context always rows and columns 0-12 (the last row and column never used);
    contexts cut to the batch minimum."""
    upstream = mb.MultiBlockSpec(grid=14, **UPSTREAM)
    last_line = {n for n in range(196) if n // 14 == 13 or n % 14 == 13}
    for masks in draws(upstream):
        targets = as_sets(masks["target_idx"], masks["target_valid"])
        contexts = as_sets(masks["context_idx"], masks["context_valid"])
        for block in targets:
            top, bottom, left, right = bounding_box(block, 14)
            assert (bottom - top + 1, right - left + 1) in {(5, 6), (6, 5), (6, 6), (7, 5), (8, 5)}
        assert not last_line & set().union(*targets, *contexts)
        assert len({len(c) for c in contexts}) == 1
    fixed = draws(mb.MultiBlockSpec(grid=14))
    used = set().union(*(set(m["context_idx"][m["context_valid"]].tolist()) for m in fixed))
    assert last_line <= used
    sizes = {
        len(s) for m in fixed for s in as_sets(m["target_idx"][:, :1], m["target_valid"][:, :1])
    }
    assert sizes - {30, 36, 35, 40}  # independent scale and aspect reach other areas


def test_truncation_keeps_the_first_context_indices_in_raster_order():
    flags = dict(correlated_size=True, exclusive_corner=True)
    full = mb.multiblock_masks(mb.MultiBlockSpec(grid=14, **flags), 3, 7, 16)
    cut = mb.multiblock_masks(mb.MultiBlockSpec(grid=14, truncate_context=True, **flags), 3, 7, 16)
    shortest = full["context_valid"].sum(-1).min()
    assert (cut["context_valid"].sum(-1) == shortest).all()
    np.testing.assert_array_equal(
        cut["context_idx"][:, :shortest], full["context_idx"][:, :shortest]
    )
    assert (np.diff(full["context_idx"][0][full["context_valid"][0]]) > 0).all()


def test_context_cap_keeps_a_subset_of_each_context():
    full = mb.multiblock_masks(mb.MultiBlockSpec(grid=14), 0, 1, 64)
    capped = mb.multiblock_masks(mb.MultiBlockSpec(grid=14, max_context_tokens=60), 0, 1, 64)
    counts = full["context_valid"].sum(-1)
    assert counts.max() > 60 and (capped["context_valid"].sum(-1) == np.minimum(counts, 60)).all()
    for small, large in zip(
        as_sets(capped["context_idx"], capped["context_valid"]),
        as_sets(full["context_idx"], full["context_valid"]),
        strict=True,
    ):
        assert small <= large


def test_masks_are_a_pure_function_of_seed_step_and_process():
    spec = mb.MultiBlockSpec(grid=8, min_keep=3)
    a, b = mb.multiblock_masks(spec, 1, 5, 8), mb.multiblock_masks(spec, 1, 5, 8)
    chex.assert_trees_all_equal(a, b)
    other = mb.multiblock_masks(spec, 1, 5, 8, process_index=1)
    assert not np.array_equal(a["target_idx"], other["target_idx"])


def test_unsatisfiable_min_keep_is_a_clear_error():
    with pytest.raises(ValueError, match="min_keep=10"):
        mb.check_spec(mb.MultiBlockSpec(grid=8))  # 8x8 targets have 9-12 patches
    with pytest.raises(ValueError, match="target_scale"):
        mb.check_spec(mb.MultiBlockSpec(grid=14, target_scale=(0.3, 0.2)))


# --------------------------------------------------------------------------- models


def tiny_predictor():
    return models.Predictor(grid_size=8, embed_dim=16, depth=2, num_heads=2)


def predictor_inputs(seed=0):
    masks = mb.multiblock_masks(mb.MultiBlockSpec(grid=8, min_keep=3), seed, 0, 2)
    context = np.random.default_rng(seed).standard_normal((2, masks["context_idx"].shape[1], 24))
    return [jnp.asarray(context, jnp.float32), *(masks[k] for k in models_keys())]


def models_keys():
    return ("context_idx", "context_valid", "target_idx", "target_valid")


def test_predictor_predicts_each_block_from_the_context_and_its_own_positions():
    predictor = tiny_predictor()
    inputs = predictor_inputs()
    params = jax.jit(predictor.init)(jax.random.key(0), *inputs)
    apply = jax.jit(predictor.apply)
    out = apply(params, *inputs)
    context, _, context_valid, target_idx, target_valid = inputs
    assert out.shape == (*target_idx.shape, 24)

    def changed(**replace):
        new = dict(zip(("context", *models_keys()), inputs, strict=True)) | replace
        return apply(params, *new.values())

    # Moving block 1 of image 0 changes block 1's predictions, never block 0's.
    moved = target_idx.copy()
    moved[0, 1] = (moved[0, 1] + 1) % 64
    other = changed(target_idx=moved)
    np.testing.assert_array_equal(other[:, 0], out[:, 0])
    assert not np.allclose(other[0, 1], out[0, 1])
    # Padded context slots and padded context features are never read.
    padded = ~context_valid
    assert padded.any()
    noisy = jnp.where(padded[..., None], 1e3, context)
    np.testing.assert_allclose(
        changed(context=noisy)[target_valid], out[target_valid], rtol=1e-5, atol=1e-5
    )
    # A valid context token does matter.
    assert not np.allclose(changed(context=context.at[:, 0].add(1.0)), out)


@pytest.mark.parametrize("tokenizer", ["vit", "scott"])
def test_context_encoder_sees_only_context_patches(tokenizer):
    patch = 8 if tokenizer == "vit" else 16
    encoder = models.Encoder(
        tokenizer, 8 * patch, depth=1, num_heads=2, embed_dim=16, patch_size=patch
    )
    masks = mb.multiblock_masks(mb.MultiBlockSpec(grid=8, min_keep=3), 0, 0, 2)
    idx, valid = masks["context_idx"], masks["context_valid"]
    images = np.random.default_rng(0).standard_normal((2, 8 * patch, 8 * patch, 3), np.float32)
    params = jax.jit(encoder.init)(jax.random.key(0), images)
    apply = jax.jit(encoder.apply)  # eagerly, op by op, the SCOTT stem takes ~10 s a call
    assert apply(params, images).shape == (2, 64, 16)
    out = apply(params, images, idx, valid)
    assert out.shape == (2, idx.shape[1], 16)
    # Change every pixel outside image 0's context: its valid outputs stay the same.
    keep = np.zeros(64, bool)
    keep[idx[0][valid[0]]] = True
    pixels = np.repeat(np.repeat(keep.reshape(8, 8), patch, 0), patch, 1)
    edited = images.copy()
    edited[0][~pixels] += 5.0
    new = apply(params, edited, idx, valid)
    np.testing.assert_allclose(new[0][valid[0]], out[0][valid[0]], rtol=1e-5, atol=1e-5)
    assert not np.allclose(apply(params, edited), apply(params, images))


def test_loss_ignores_padding_and_matches_the_plain_mean():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 2, 2, 3, 4)) * 2
    valid = np.ones((2, 2, 3), bool)
    smooth = np.where(
        np.abs(pred - target) < 1, 0.5 * (pred - target) ** 2, np.abs(pred - target) - 0.5
    )
    loss = objectives.block_regression_loss
    np.testing.assert_allclose(loss(pred, target, valid), smooth.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        loss(pred, target, valid, "l2"), ((pred - target) ** 2).mean(), rtol=1e-6
    )
    valid[:, :, 2] = False
    garbage = pred.copy()
    garbage[:, :, 2] = 1e6
    np.testing.assert_allclose(loss(garbage, target, valid), smooth[:, :, :2].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown I-JEPA loss"):
        loss(pred, target, valid, "l1")


def test_ijepa_schedules_follow_the_official_code():
    """EMA: 0.996 at the first update (i = 0); WD: cosine 0.04 -> 0.4, stepped first."""
    ema = optim.ema_schedule(100, 0.996, 1.0, "linear_from_zero")
    np.testing.assert_allclose([ema(0), ema(50), ema(99)], [0.996, 0.998, 0.996 + 0.004 * 0.99])
    wd = optim.wd_schedule(100, 0.04, 0.4, "cosine")
    expected = [0.4 + (0.04 - 0.4) * 0.5 * (1 + np.cos(np.pi * k / 100)) for k in (1, 50, 100)]
    np.testing.assert_allclose([wd(0), wd(49), wd(99)], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="weight-decay schedule"):
        optim.wd_schedule(100, 0.04, 0.4, "step")


# --------------------------------------------------------------------------- step


def tiny_ijepa_config(**overrides):
    """A ViT at 64 px with 8 px patches (8x8 grid), width 32, 1 block each, min_keep 3."""
    digits = config_module("digits").dataset(config_module("common").get_config())
    config = tiny_config(
        config_module("ijepa").apply(digits), **{"variant": "vit-7/16", **overrides}
    )
    config.model.patch_size = 8
    config.ijepa.min_keep = 3
    config.ijepa.target_scale = (0.1, 0.3)  # 9-20 patches: sizes vary over the first steps
    config.ijepa.predictor_dim = 16
    config.ijepa.predictor_depth = 1
    return config


def fake_batches(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        yield {
            "context": rng.standard_normal((batch_size, 64, 64, 3)).astype(np.float32),
            "target": rng.standard_normal((batch_size, 64, 64, 3)).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        }


def run_steps(config, devices, num_steps=3, num_classes=None):
    trainer = build_trainer(config, devices, online_probe=num_classes is not None)
    state = trainer.init(jax.random.key(0))
    history = []
    for batch in zip(range(num_steps), trainer.add_masks(fake_batches(8), 0), strict=False):
        state, metrics = trainer.step(state, jax.device_put(batch[1], trainer.data_sharding))
        history.append(jax.device_get(metrics))
    return trainer, state, history


def test_step_on_8_devices_equals_1_device_and_never_recompiles():
    config = tiny_ijepa_config()
    trainer, state8, metrics8 = run_steps(config, jax.devices(), num_steps=4)
    _, state1, metrics1 = run_steps(config, jax.devices()[:1], num_steps=4)
    assert trainer.step._cache_size() == 1  # 4 batches with different block sizes
    assert len({float(m["target_tokens"]) for m in metrics8}) > 1
    assert len(state8.step.sharding.device_set) == 8
    for m8, m1 in zip(metrics8, metrics1, strict=True):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    chex.assert_trees_all_close(
        jax.device_get(state8.params), jax.device_get(state1.params), atol=1e-5, rtol=1e-5
    )
    chex.assert_trees_all_close(
        jax.device_get(state8.target_params), jax.device_get(state1.target_params), atol=1e-5
    )


def test_step_trains_both_parts_and_the_probe():
    config = tiny_ijepa_config(variant="scott-3/16", img_size=128)
    config.model.patch_size = 16
    trainer = build_trainer(config, jax.devices()[:1], online_probe=True)
    state = trainer.init(jax.random.key(0))
    assert set(state.params) == {"context_encoder", "predictor"}
    rng = np.random.default_rng(0)
    batch = {
        "context": rng.standard_normal((4, 128, 128, 3)).astype(np.float32),
        "label": np.arange(4, dtype=np.int32),
    }
    batch = next(trainer.add_masks(iter([batch]), 0))
    before = jax.device_get(state.params)
    state, metrics = trainer.step(state, jax.device_put(batch, trainer.data_sharding))
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    np.testing.assert_allclose(metrics["ema"], 0.996, rtol=1e-7)  # I-JEPA's i = 0
    assert {"probe/loss", "grad_norm/tokenizer", "context_tokens"} <= set(metrics)
    for part in ("context_encoder", "predictor"):
        moved = jax.tree.map(lambda a, b: not np.allclose(a, b), before[part], state.params[part])
        assert all(jax.tree.leaves(moved)), part


def test_configs_select_ijepa():
    flowers = config_module("flowers").dataset(config_module("common").get_config())
    encoder, predictor = ijepa.build_models(config_module("ijepa").apply(flowers))
    assert isinstance(encoder, models.Encoder) and encoder.tokenizer == "scott"
    assert (predictor.embed_dim, predictor.depth) == (384, 6)
    config = load_config("flowers_ijepa")
    assert (config.method, config.variant, config.optim.lr_flat_pctg) == ("ijepa", "vit-12/16", 0)
    assert mb.check_spec(mb.MultiBlockSpec.from_config(config, 14)) == (128, 42)
    digits = load_config("digits_ijepa")
    encoder, _ = ijepa.build_models(digits)
    assert encoder.grid_size == 8
    mb.check_spec(mb.MultiBlockSpec.from_config(digits, encoder.grid_size))
    digits.variant = "scott-3/16"
    assert ijepa.build_models(digits)[0].tokenizer == "scott"


# --------------------------------------------------------------------------- loop


@pytest.fixture(scope="module")
def ijepa_runs(tmp_path_factory):
    """Digits runs of 4 steps: one uninterrupted, one stopped after 2 and resumed."""
    root = tmp_path_factory.mktemp("ijepa")
    config = tiny_ijepa_config(checkpoint_every_steps=2)
    full = loop.train_and_evaluate(config, root / "full", stop_at_step=4).state
    loop.train_and_evaluate(config, root / "resumed", stop_at_step=2)
    resumed = loop.train_and_evaluate(config, root / "resumed", stop_at_step=4).state
    return root, full, resumed


@pytest.mark.slow
def test_resumed_ijepa_run_matches_the_uninterrupted_run(ijepa_runs):
    root, full, resumed = ijepa_runs
    losses = {
        name: {r["step"]: r["loss"] for r in read_metrics(root / name) if "loss" in r}
        for name in ("full", "resumed")
    }
    assert sorted(losses["full"]) == sorted(losses["resumed"]) == [1, 2, 3, 4]
    for step in range(1, 5):
        np.testing.assert_allclose(losses["resumed"][step], losses["full"][step], rtol=1e-6)
    chex.assert_trees_all_close(
        jax.device_get(resumed.target_params), jax.device_get(full.target_params), atol=1e-6
    )
    assert Checkpointer(root / "resumed" / "checkpoints").all_steps() == [2, 4]


@pytest.mark.slow
def test_probe_loads_the_encoder_of_an_ijepa_run(ijepa_runs):
    root, full, _ = ijepa_runs
    backbone = load_backbone(root / "full", encoder="target")
    assert isinstance(backbone.encoder, models.Encoder)
    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    features = backbone.encoder.apply({"params": backbone.params}, images)
    assert features.shape == (2, 64, 32)
    module = ijepa.build_encoder(backbone.train_config)
    expected = module.apply({"params": jax.device_get(full.target_params)}, images)
    np.testing.assert_allclose(features, expected, rtol=1e-6)
    context = load_backbone(root / "full")
    chex.assert_trees_all_close(context.params, jax.device_get(full.params["context_encoder"]))
