"""SplitMask: the split, the visual-word tokenizer, the losses on hand-computed cases, the
information flow, BEiT's schedule, and the loop (sharding, exact resume with a data
vocabulary, probe.py's encoders, the loss falling on digits). There is no official code, so
no parity fixture: the expected numbers are worked out by hand in the tests."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import build_trainer, config_module, load_config, tiny_config

from scott_jax import loop, masking, masking_split, objectives, optim, visual_words
from scott_jax.checkpoint import Checkpointer, load_state_tree
from scott_jax.data.augment_spec import IMAGENET_MEAN, IMAGENET_STD
from scott_jax.evaluators.backbone import load_backbone
from scott_jax.methods import splitmask
from scott_jax.models import splitmask as models
from scott_jax.writers import read_metrics

# --------------------------------------------------------------------------- the split


def as_sets(rows):
    return [set(r.tolist()) for r in rows]


def test_block_split_is_two_exact_complementary_halves():
    masks = masking_split.split_masks(0, 3, 64, 14, "block")
    assert masks["a_visible"].shape == masks["b_visible"].shape == (64, 98)
    for a, pa, b, pb in zip(*(as_sets(masks[k]) for k in splitmask.MASK_KEYS), strict=True):
        assert not a & b and a | b == set(range(196))
        assert pa == b and pb == a  # every token is predicted exactly once
    # A is blocky (BEiT blocks), not scattered: most of its tokens have a neighbour in A.
    grid = np.zeros((64, 196), bool)
    np.put_along_axis(grid, masks["a_visible"], True, axis=1)
    grid = grid.reshape(64, 14, 14)
    same = (grid[:, :, 1:] == grid[:, :, :-1]).mean()
    assert same > 0.75


def test_block_sampler_caps_each_block_at_75_patches():
    """BEiT's `max_num_patches`: every accepted block adds at most min(75, remaining)
    patches, and its aspect ratio lies in (0.3, 1/0.3) up to rounding."""
    cfg = masking._blockwise_config(14, 0.5, "masked", 16, masking_split.BEIT_ASPECT, 10, 75)
    blocks = []
    masking._blockwise_bits(np.random.default_rng(0), 300, 14, cfg, 256, blocks)
    sizes = []
    for rects in blocks:
        covered = np.zeros((14, 14), bool)
        for top, left, h, w in rects:
            before = covered.sum()
            covered[top : top + h, left : left + w] = True
            added = covered.sum() - before
            assert 0 < added <= min(75, 98 - before)
            assert 0.3 * (h - 0.5) / (w + 0.5) <= 1 and (h + 0.5) / (w - 0.5) >= 0.3
            sizes.append(h * w)
        assert covered.sum() == 98
    assert max(sizes) <= 81 and max(sizes) > 60  # uncapped, 98-patch blocks would appear


@pytest.mark.parametrize(
    "split, grid, n_a, n_b", [("uniform", 8, 16, 16), ("complement", 8, 16, 48), ("block", 4, 8, 8)]
)
def test_uniform_splits_are_disjoint_quarters(split, grid, n_a, n_b):
    masks = masking_split.split_masks(1, 0, 32, grid, split)
    assert (masks["a_visible"].shape[1], masks["b_visible"].shape[1]) == (n_a, n_b)
    every = set(range(grid * grid))
    for a, pa, b, pb in zip(*(as_sets(masks[k]) for k in splitmask.MASK_KEYS), strict=True):
        assert not a & b and pa == every - a and pb == every - b


def test_split_is_a_pure_function_of_seed_and_step():
    draw = masking_split.split_masks
    for split in masking_split.SPLITS:
        chex.assert_trees_all_equal(draw(5, 7, 8, 14, split), draw(5, 7, 8, 14, split))
        assert not np.array_equal(
            draw(5, 7, 8, 14, split)["a_visible"], draw(5, 8, 8, 14, split)["a_visible"]
        )
    with pytest.raises(ValueError, match="unknown split"):
        draw(0, 0, 1, 14, "halves")


# --------------------------------------------------------------------------- visual words


def test_tokenizer_on_a_hand_made_image():
    """An 8 px image, 4 px patches: a 2x2 grid of 2x2 pooled pixels, d = 12, ordered
    (row, col, channel). Vocabulary: e0 = bright top-left pixel, e1 = red everywhere,
    e2 = blue bottom-right pixel. Patches: (0, 0) red everywhere -> scores (0.58, 2, 0) ->
    1; (0, 1) white top-left pixel -> (1.73, 0.5, 0) -> 0; (1, 0) top-left red 0.5 and
    bottom-right blue 1 -> (0.29, 0.25, 1) -> 2; (1, 1) twice (0, 1) -> 0."""
    pooled = np.zeros((4, 4, 3), np.float32)
    pooled[0:2, 0:2, 0] = 1.0
    pooled[0, 2] = 1.0
    pooled[2, 0, 0], pooled[3, 1, 2] = 0.5, 1.0
    pooled[2, 2] = 2.0 / 3.0  # scaled below by 3: twice patch (0, 1)'s top-left pixel
    image = np.repeat(np.repeat(pooled, 2, 0), 2, 1)
    image[0:2, 0:2, 0] = [[0.5, 1.5], [2.0, 0.0]]  # mean 1: only the 2x2 average is read
    image[4:6, 4:6] *= 3.0
    vocab = np.zeros((3, 12), np.float32)
    vocab[0, 0:3] = 1 / math.sqrt(3)
    vocab[1, 0::3] = 0.5
    vocab[2, 11] = 1.0
    normalized = (image - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    patches = visual_words.tokenizer_patches(normalized[None], 4, "unit")
    assert patches.shape == (1, 4, 12)
    np.testing.assert_allclose(patches[0, 0], [1, 0, 0] * 4, atol=1e-6)
    assert visual_words.tokenize(patches, vocab).tolist() == [[1, 0, 2, 0]]
    # The paper's scoring is xᵀe: a brighter or darker patch keeps its word.
    np.testing.assert_array_equal(
        visual_words.tokenize(patches * 7.0, vocab), visual_words.tokenize(patches, vocab)
    )
    # 2-D case: e = (1, 0), (0, 1), (-0.6, 0.8); x = (1, 2) scores (1, 2, 1) -> word 1.
    e = np.array([[1, 0], [0, 1], [-0.6, 0.8]], np.float32)
    assert visual_words.tokenize(np.array([[[1.0, 2.0]]]), e).tolist() == [[1]]


def test_random_projection_vocabulary_is_a_function_of_the_seed():
    vocab = visual_words.random_projection_vocab(3, 64, 192)
    assert vocab.shape == (64, 192) and bool(jnp.all(vocab >= 0))
    np.testing.assert_allclose(jnp.linalg.norm(vocab, axis=1), 1.0, rtol=1e-6)
    chex.assert_trees_all_equal(vocab, visual_words.random_projection_vocab(3, 64, 192))
    assert not np.allclose(vocab, visual_words.random_projection_vocab(4, 64, 192))
    assert bool(jnp.any(visual_words.random_projection_vocab(3, 64, 192, "symmetric") < 0))


def test_token_perplexity_shows_a_degenerate_tokenizer():
    assert float(visual_words.token_perplexity(jnp.zeros((4, 16), jnp.int32), 8)) == 1.0
    spread = jnp.arange(64, dtype=jnp.int32).reshape(4, 16) % 8
    np.testing.assert_allclose(visual_words.token_perplexity(spread, 8), 8.0, rtol=1e-6)


def test_kmeans_converges_to_the_means_of_its_clusters():
    """Lloyd's fixed point: each centroid is the mean of the points nearest to it (150
    points in chunks of 32, so the padding of the last chunk must not count)."""
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0], [5.0, 5.0]], np.float32)
    points = np.concatenate([c + 0.5 * rng.standard_normal((50, 2)) for c in centres[:3]])
    found = np.asarray(visual_words.kmeans(jnp.asarray(points, jnp.float32), 4, 20, 0, chunk=32))
    nearest = np.argmin(((points[:, None] - found[None]) ** 2).sum(-1), axis=1)
    assert len(set(nearest.tolist())) == 4
    for k in range(4):
        np.testing.assert_allclose(found[k], points[nearest == k].mean(0), atol=1e-4)


# --------------------------------------------------------------------------- losses


def test_mim_cross_entropy_on_a_hand_computed_two_image_case():
    """Image 1: logits (0, 1, 0), word 1 -> log(1 + 2/e) = 0.5514447; image 2: logits
    (0, 0, 0), word 2 -> log 3. The loss is their mean."""
    logits = jnp.array([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])
    tokens = jnp.array([[1], [2]])
    np.testing.assert_allclose(objectives.mim_cross_entropy(logits[:1], tokens[:1]), 0.5514447)
    np.testing.assert_allclose(
        objectives.mim_cross_entropy(logits, tokens), (0.5514447 + math.log(3)) / 2, rtol=1e-6
    )


def test_info_nce_on_a_hand_computed_two_image_case():
    """tau 0.2, ẑ_a = ẑ_b = (1, 0), (0, 1): logits diag 5, off-diagonal 0, so each row's
    loss is log(1 + e^-5) = 0.0067153; with b's rows swapped, log(1 + e^5) = 5.0067153.
    The descriptors are normalised first (the scale of za does not matter)."""
    za = jnp.array([[3.0, 0.0], [0.0, 0.5]])
    zb = jnp.eye(2)
    np.testing.assert_allclose(objectives.info_nce(za, zb, 0.2), 0.0067153, rtol=1e-5)
    np.testing.assert_allclose(objectives.info_nce(za, zb[::-1], 0.2), 5.0067153, rtol=1e-6)
    same = jnp.ones((4, 3))
    np.testing.assert_allclose(objectives.info_nce(same, same, 0.2), math.log(4), rtol=1e-6)
    np.testing.assert_allclose(
        objectives.info_nce(same, same, 0.2, "simclr"), math.log(7), rtol=1e-6
    )


def test_info_nce_is_symmetric_and_simclr_matches_nt_xent():
    rng = np.random.default_rng(0)
    za, zb = (jnp.asarray(rng.standard_normal((6, 5)), jnp.float32) for _ in range(2))
    for negatives in objectives.NCE_NEGATIVES:
        np.testing.assert_allclose(
            objectives.info_nce(za, zb, 0.3, negatives),
            objectives.info_nce(zb, za, 0.3, negatives),
            rtol=1e-6,
        )
    # NT-Xent written out: 2B rows over the other 2B - 1 descriptors, positive = its pair.
    z = np.concatenate([za, zb])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T / 0.3
    np.fill_diagonal(sim, -np.inf)
    pair = np.concatenate([np.arange(6, 12), np.arange(6)])
    logsumexp = np.log(np.exp(sim).sum(1))
    expected = np.mean(logsumexp - sim[np.arange(12), pair])
    np.testing.assert_allclose(objectives.info_nce(za, zb, 0.3, "simclr"), expected, rtol=1e-5)


def test_beit_schedule_and_no_decay_on_the_position_embedding():
    """BEiT's `cosine_scheduler`: LR 0 at the first update, the peak at update W - 1, then
    cosine to lr_final at T; WD skips biases, 1-D params and the learned pos-embed."""
    lr = optim.beit_lr_schedule(100, 10, 0.0, 1.0, 0.01)
    np.testing.assert_allclose([lr(0), lr(5), lr(9), lr(10)], [0.0, 5 / 9, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(lr(55), 0.01 + 0.99 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(lr(100), 0.01, rtol=1e-6)
    params = {"pos_embed": jnp.ones((1, 4, 2)), "proj": {"kernel": jnp.ones((2, 2))}}
    assert optim.decay_mask(params) == {"pos_embed": False, "proj": {"kernel": True}}
    with pytest.raises(ValueError, match="unknown LR schedule"):
        optim.lr_schedule_of("step", 10, 1, 0, 1, 0, 0)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("tokenizer", ["vit", "scott"])
def test_a_branch_never_sees_the_other_subsets_pixels(tokenizer):
    """Encoder + decoder of branch a: changing every pixel outside A changes nothing in its
    features, its decoded tokens or its descriptor."""
    patch = 8 if tokenizer == "vit" else 16
    grid = 4
    encoder = models.Encoder(tokenizer, grid * patch, 1, 2, embed_dim=16, patch_size=patch)
    decoder = models.Decoder(depth=1, num_heads=2)
    masks = masking_split.split_masks(0, 0, 2, grid, "block")
    visible = jnp.asarray(masks["a_visible"])
    images = np.random.default_rng(0).standard_normal((2, grid * patch, grid * patch, 3))
    images = images.astype(np.float32)
    params = jax.jit(encoder.init)(jax.random.key(0), images)
    pos = models.position_table(encoder, params["params"])
    features = encoder.apply(params, images, visible)
    dec_params = decoder.init(jax.random.key(1), features, visible, pos, train=False)

    @jax.jit
    def branch(images):
        features = encoder.apply(params, images, visible)
        return features, decoder.apply(dec_params, features, visible, pos, train=False)

    features, decoded = branch(images)
    assert features.shape == (2, 8, 16) and decoded.shape == (2, 16, 16)
    keep = np.zeros((2, grid * grid), bool)
    np.put_along_axis(keep, masks["a_visible"], True, axis=1)
    pixels = np.repeat(np.repeat(keep.reshape(2, grid, grid), patch, 1), patch, 2)
    edited = np.where(pixels[..., None], images, images + 5.0)
    new_features, new_decoded = branch(edited)
    np.testing.assert_allclose(new_features, features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_decoded, decoded, rtol=1e-5, atol=1e-5)
    moved = np.where(~pixels[..., None], images, images + 5.0)  # A's own pixels do matter
    assert not np.allclose(branch(moved)[0], features)


# --------------------------------------------------------------------------- step and loop


def tiny_splitmask_config(**overrides):
    """A ViT at 64 px with 8 px patches (8x8 grid), width 32, 1 block each, 64 words, a
    LR high enough for the loss to fall within 40 steps."""
    digits = config_module("digits").dataset(config_module("common").get_config())
    defaults = {
        "model.patch_size": 8,
        "splitmask.split": "uniform",
        "splitmask.vocab_size": 64,
        "splitmask.decoder_depth": 1,
        "optim.lr_peak": 5e-3,
        "optim.lr_warmup_epochs": 0.05,
    }
    return tiny_config(config_module("splitmask").apply(digits), **{**defaults, **overrides})


def fake_batches(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        yield {"context": rng.standard_normal((batch_size, 64, 64, 3)).astype(np.float32)}


def run_steps(config, devices, num_steps=3):
    trainer = build_trainer(config, devices)
    state = trainer.init(jax.random.key(0))
    history = []
    for _, batch in zip(range(num_steps), trainer.add_masks(fake_batches(8), 0), strict=False):
        state, metrics = trainer.step(state, jax.device_put(batch, trainer.data_sharding))
        history.append(jax.device_get(metrics))
    return trainer, state, history


def test_step_on_8_devices_equals_1_device_and_never_recompiles():
    config = tiny_splitmask_config()
    trainer, state8, metrics8 = run_steps(config, jax.devices())
    _, state1, metrics1 = run_steps(config, jax.devices()[:1])
    assert trainer.step._cache_size() == 1
    assert len(state8.step.sharding.device_set) == 8
    assert set(state8.params) == {"encoder", "decoder", "head"} and state8.vocab is None
    for m8, m1 in zip(metrics8, metrics1, strict=True):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["loss"], m8["mim"] + m8["nce"], rtol=1e-6)
        assert 1.0 < m8["token_perplexity"] <= 64
    assert metrics8[0]["lr"] == 0.0  # BEiT: the first update has LR 0
    chex.assert_trees_all_close(
        jax.device_get(state8.params), jax.device_get(state1.params), atol=1e-5, rtol=1e-5
    )


def test_the_other_readings_train_too():
    """One step with every non-default reading: unequal subsets (two encoder passes), MAE's
    decoder positions, sin-cos encoder positions, the visible-token descriptor, SimCLR's
    negatives and the symmetric vocabulary."""
    config = tiny_splitmask_config(
        **{
            "splitmask.split": "complement",
            "splitmask.decoder_pos": "mae",
            "splitmask.pos_embed": "sincos",
            "splitmask.descriptor": "visible",
            "splitmask.negatives": "simclr",
            "splitmask.vocab_dist": "symmetric",
            "splitmask.token_pixels": "normalized",
        }
    )
    _, state, (metrics,) = run_steps(config, jax.devices()[:1], num_steps=1)
    assert "pos_embed" not in state.params["encoder"] and "pos_embed" in state.params["decoder"]
    assert np.isfinite(metrics["loss"]) and metrics["nce"] > 0 and metrics["mim"] > 0


def test_random_patch_vocabulary_holds_one_patch_per_image():
    """10 images, 16 words, batches of 4: each word is the normalised half-resolution patch
    of its image at its position; the 10 images are all used before any is reused."""
    from scott_jax.data import Source, eval_batches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    source = Source("digits", "pretrain", images, np.zeros(10, np.int32), 10)
    config = tiny_splitmask_config(
        batch_size=4, **{"splitmask.target": "random_patches", "splitmask.vocab_size": 16}
    )
    encoder = splitmask.build_encoder(config)
    vocab = splitmask.data_vocabulary(config, source, encoder)
    picks, positions = visual_words.patch_picks("random_patches", config.seed, 10, 64, 16, 0)
    assert sorted(picks[:10].tolist()) == list(range(10))
    pixels = np.concatenate([b["image"] for b in eval_batches(source, batch_size=5, img_size=64)])
    patches = np.asarray(visual_words.tokenizer_patches(pixels, 8))
    expected = patches[picks, positions]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(vocab, expected, rtol=1e-5, atol=1e-6)


def test_configs_select_splitmask_and_bad_flags_fail_early():
    flowers = load_config("flowers_splitmask")
    assert (flowers.method, flowers.variant, flowers.img_size) == ("splitmask", "vit-12/16", 224)
    assert (flowers.batch_size, flowers.num_epochs) == (128, 300)
    assert (flowers.splitmask.split, flowers.data.aug) == ("uniform", "same")
    np.testing.assert_allclose(flowers.optim.lr_peak, 1.5e-3 * 128 / 2048)
    encoder, decoder, _ = splitmask.build_models(flowers)
    assert (encoder.embed_dim, decoder.depth, decoder.num_heads) == (384, 2, 6)
    digits = load_config("digits_splitmask")
    splitmask.check_config(digits)
    assert splitmask.build_encoder(digits).grid_size == 8
    digits.variant = "scott-3/16"
    digits.model.patch_size = 16
    assert splitmask.build_encoder(digits).tokenizer == "scott"
    for field, value in [("target", "dalle"), ("split", "halves"), ("negatives", "all")]:
        config = tiny_splitmask_config(**{f"splitmask.{field}": value})
        with pytest.raises(ValueError, match=f"config.splitmask.{field}"):
            splitmask.check_config(config)
    with pytest.raises(ValueError, match="no online probe"):
        splitmask.check_config(tiny_splitmask_config(online_probe=True))


@pytest.fixture(scope="module")
def splitmask_runs(tmp_path_factory):
    """Digits runs of 40 steps with a k-means vocabulary (kept in the state): one
    uninterrupted, one stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("splitmask")
    config = tiny_splitmask_config(checkpoint_every_steps=20)
    config.splitmask.target = "kmeans"
    config.splitmask.kmeans_patches = 4096
    config.splitmask.kmeans_iters = 3
    full = loop.train_and_evaluate(config, root / "full", stop_at_step=40).state
    loop.train_and_evaluate(config, root / "resumed", stop_at_step=2)
    resumed = loop.train_and_evaluate(config, root / "resumed", stop_at_step=40).state
    return root, full, resumed


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_run(splitmask_runs):
    root, full, resumed = splitmask_runs
    losses = {
        name: {r["step"]: r["loss"] for r in read_metrics(root / name) if "loss" in r}
        for name in ("full", "resumed")
    }
    assert sorted(losses["resumed"]) == sorted(losses["full"]) == list(range(1, 41))
    for step in range(1, 41):
        np.testing.assert_allclose(losses["resumed"][step], losses["full"][step], rtol=1e-6)
    chex.assert_trees_all_close(
        jax.device_get(resumed.params), jax.device_get(full.params), atol=1e-6
    )
    assert full.vocab.shape == (64, 48)
    np.testing.assert_allclose(np.linalg.norm(full.vocab, axis=1), 1.0, rtol=1e-5)
    chex.assert_trees_all_equal(jax.device_get(resumed.vocab), jax.device_get(full.vocab))
    saved = load_state_tree(root / "resumed" / "checkpoints")
    np.testing.assert_array_equal(saved["vocab"], jax.device_get(full.vocab))
    assert Checkpointer(root / "resumed" / "checkpoints").all_steps() == [2, 20, 40]


@pytest.mark.slow
def test_the_loss_falls_on_digits(splitmask_runs):
    """40 steps at batch 16: both the word predictions and the matching improve."""
    root, _, _ = splitmask_runs
    rows = [r for r in read_metrics(root / "full") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = rows[:5], rows[-5:]
    for key, drop in (("loss", 0.4), ("mim", 0.2), ("nce", 0.1)):
        before, after = np.mean([r[key] for r in first]), np.mean([r[key] for r in last])
        assert after < before - drop, (key, before, after)
    assert all(r["token_perplexity"] > 20 for r in rows)  # 64 k-means words, well used


@pytest.mark.slow
def test_probe_loads_the_encoder_and_rejects_a_target_encoder(splitmask_runs):
    root, _, resumed = splitmask_runs
    backbone = load_backbone(root / "resumed")
    assert backbone.which == "encoder" and isinstance(backbone.encoder, models.Encoder)
    chex.assert_trees_all_close(backbone.params, jax.device_get(resumed.params["encoder"]))
    images = np.zeros((2, 64, 64, 3), np.float32)
    assert backbone.encoder.apply({"params": backbone.params}, images).shape == (2, 64, 32)
    with pytest.raises(ValueError, match=r"a splitmask run has no 'target' encoder.*'encoder'"):
        load_backbone(root / "resumed", encoder="target")
