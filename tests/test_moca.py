"""MOCA: masking rounds, teacher assignments, bag of words, codebook queue, generators,
losses (the paper's worked numbers), schedules, sizes, SCOTT information flow, the step
(8 devices = 1), resume = uninterrupted (codebook included), the loss falling on digits and
probe.py loading the teacher."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import LENGTHS, build_trainer, load_config, override

from scott_jax import loop, optim
from scott_jax import masking_moca as mm
from scott_jax.checkpoint import Checkpointer
from scott_jax.evaluators.backbone import load_backbone
from scott_jax.methods import moca
from scott_jax.models import moca as models
from scott_jax.writers import read_metrics


def tiny_moca_config(**overrides):
    """configs/digits_moca.py shrunk: 96 px (a 6x6 grid, 2x2 interior), width 32, depth 1
    (ℓ = 1 = depth: the decoder reads the LN'd last layer, the code's `early_layer=0`; the
    raw intermediate output is covered by the parity test), decoder 32 / 1 block, 16 words,
    batch 16."""
    config = load_config("digits_moca")
    config.img_size = 96
    config.model.conv_impl = "xla"
    config.model.embed_dim = 32
    config.model.depth = 1
    config.model.num_heads = 2
    config.moca.decoder_dim = 32
    config.moca.decoder_heads = 2
    config.moca.num_words = 16
    config.batch_size = 16
    config.num_epochs = 1
    config.optim.lr_warmup_epochs = 0.1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.knn_every_epochs = 0.0
    return override(config, overrides)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "grid, counts",
    [(14, ((88, 127), (49, 88))), (8, ((28, 41), (16, 28))), (6, ((16, 23), (9, 16)))],
)
def test_rounds_have_the_codes_counts_and_complementary_structure(grid, counts):
    sizes = mm.rounds(grid * grid, (0.55, 0.75), (0.35, 0.55), True)
    assert tuple(tuple(s) for s in sizes) == counts
    ids = mm.moca_masks(0, 3, 8, grid * grid, sizes)
    assert ids.shape == (8, 2, 2, grid * grid) and ids.dtype == np.int32
    assert (np.sort(ids, -1) == np.arange(grid * grid)).all()  # every row a permutation
    (k1, d1), (k2, d2) = sizes
    for row in ids.reshape(-1, 2, grid * grid):
        first, second = row
        assert not set(second[:k2]) & set(first[:d1])  # U2 avoids U1 and M'1
        np.testing.assert_array_equal(second[k2:d2], first[k1 : k1 + d2 - k2])  # M'2 ⊂ M'1
    assert not np.array_equal(ids[:, 0], ids[:, 1])  # views and images independent
    assert not np.array_equal(ids[0], ids[1])
    np.testing.assert_array_equal(ids, mm.moca_masks(0, 3, 8, grid * grid, sizes))
    assert not np.array_equal(ids, mm.moca_masks(0, 4, 8, grid * grid, sizes))


def test_independent_rounds_and_bad_ratios():
    sizes = mm.rounds(196, (0.55, 0.75), (0.35, 0.55), False)
    ids = mm.moca_masks(0, 0, 64, 196, sizes, complementary=False)
    overlap = [len(set(r[0, :88]) & set(r[1, :49])) for r in ids.reshape(-1, 2, 196)]
    assert np.mean(overlap) > 10  # about 88·49/196 = 22 shared visible tokens
    with pytest.raises(ValueError, match="visible < decoded"):
        mm.rounds(196, (0.3,), (0.5,), True)
    with pytest.raises(ValueError, match="complementary"):
        mm.rounds(196, (0.3, 0.5), (0.2, 0.1), True)


# --------------------------------------------------------------------------- teacher targets


def test_assignment_worked_example_and_temperature_statistic():
    """§3.1 by hand: t = (1, 0), codebook (1,0), (0,1), (−1,0), μ̄ = 0.5 -> scale 20."""
    codebook = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q, stat = models.assign(jnp.array([[[3.0, 0.0]]]), codebook, jnp.float32(0.5), 10.0)
    np.testing.assert_allclose(q[0, 0], [1 - 2.0611537e-9, 2.0611537e-9, 4.248e-18], rtol=1e-3)
    assert float(stat) == pytest.approx(1.0)  # max 1 − mean 0
    mu = 0.5
    for _ in range(2):  # one update per view
        mu = models.MU_DECAY * mu + (1 - models.MU_DECAY) * float(stat)
    assert mu == pytest.approx(0.50995)
    tokens = jax.random.normal(jax.random.key(0), (2, 9, 4))
    words = models.l2_normalize(jax.random.normal(jax.random.key(1), (5, 4)))
    q1, _ = models.assign(tokens, words, jnp.float32(0.3), 10.0)
    q2, _ = models.assign(7.0 * tokens, words, jnp.float32(0.3), 10.0)  # norm-invariant
    np.testing.assert_allclose(q1, q2, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(q1.sum(-1), 1.0, rtol=1e-6)


def test_bag_of_words_uses_the_interior():
    q = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 25, 6)))
    np.testing.assert_allclose(models.bag_of_words(q, 5, 2), q[:, 12], rtol=1e-6)  # centre
    q14 = jax.nn.softmax(jax.random.normal(jax.random.key(1), (1, 196, 6)))
    inner = models.interior(14, 2)
    assert len(inner) == 100 and inner[0] == 2 * 14 + 2
    np.testing.assert_allclose(models.bag_of_words(q14, 14, 2), q14[:, inner].mean(1), rtol=1e-6)
    with pytest.raises(ValueError, match="no interior"):
        models.interior(4, 2)


def test_codebook_queue_replaces_the_oldest_rows_and_wraps():
    words = jnp.zeros((8, 3))
    ptr = jnp.zeros((), jnp.int32)
    for step in range(5):
        new = jnp.full((2, 3), step + 1.0)
        words, ptr = models.insert_words(words, ptr, new)
        assert int(ptr) == (2 * (step + 1)) % 8
    np.testing.assert_array_equal(words[:, 0], [5, 5, 2, 2, 3, 3, 4, 4])


def test_new_words_come_from_distinct_images_and_interior_tokens():
    settings = moca.Settings.from_config(tiny_moca_config(), moca.build_encoder(tiny_moca_config()))
    inner = set(models.interior(6, 2).tolist())
    for i in range(20):
        view, images, tokens = moca.draw_new_words(jax.random.key(i), 16, 6, settings)
        assert int(view) in (0, 1) and len(set(images.tolist())) == settings.num_new_words
        assert set(tokens.tolist()) <= inner


# --------------------------------------------------------------------------- heads and losses


def test_generators_give_unit_prototypes_with_statistics_over_the_codebook():
    codebook = jax.random.normal(jax.random.key(0), (16, 8))
    for out in (8, 4):  # identity skip, then a Linear skip
        gen = models.WeightGenerator(out, 16)
        params = gen.init(jax.random.key(1), codebook)["params"]
        assert ("skip" in params) == (out != 8)
        w = gen.apply({"params": params}, codebook)
        np.testing.assert_allclose(jnp.linalg.norm(w, axis=-1), 1.0, rtol=1e-5)
        perm = jax.random.permutation(jax.random.key(2), 16)
        np.testing.assert_allclose(
            gen.apply({"params": params}, codebook[perm]), w[perm], atol=1e-5
        )
        # BN over the rows: one row's prototype depends on the others.
        moved = gen.apply({"params": params}, codebook.at[1:].multiply(3.0) + 1.0)
        assert not np.allclose(moved[0], w[0], atol=1e-3)


def test_kl_worked_example():
    """§3.2: q_T from the assignment example, f = (2, 0), κ = 3 -> KL 0.00248178."""
    codebook = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q, _ = models.assign(jnp.array([[[1.0, 0.0]]]), codebook, jnp.float32(0.5), 10.0)
    logits = models.prototype_logits(jnp.array([[[2.0, 0.0]]]), codebook, 3.0)
    np.testing.assert_allclose(
        jax.nn.softmax(logits)[0, 0], [0.9975213, 0.0024726, 6.129e-6], rtol=1e-4
    )
    np.testing.assert_allclose(models.kl_div(q, logits), 0.00248178, rtol=1e-4)


def test_losses_pair_views_and_scale_as_the_code():
    """L_img^r compares view v's [AVG] prediction with the *other* view's bag of words, L_loc
    the same view's assignments; each loss is 2 × the mean over rounds."""
    config = tiny_moca_config()
    nets = moca.build_models(config)
    settings = moca.Settings.from_config(config, nets.encoder)
    # Jitted: op by op, the init and the teacher take several times longer than compiling.
    state = jax.jit(
        functools.partial(
            moca.create_train_state,
            config=config,
            nets=nets,
            settings=settings,
            tx=moca.make_optimizer(config, LENGTHS).tx,
            probe=None,
        )
    )(jax.random.key(0))
    views = jax.random.normal(jax.random.key(1), (2, 2, 96, 96, 3))
    ids = mm.moca_masks(0, 0, 2, 36, settings.sizes)
    _, q, bow, _ = jax.jit(moca.teacher_targets, static_argnames=("encoder", "settings"))(
        state.target_params, state.codebook, views, encoder=nets.encoder, settings=settings
    )
    protos = jax.jit(moca.prototypes, static_argnames=("nets",))(
        state.params, state.codebook["words"], nets=nets
    )
    args = (state.params, protos, views, ids, q, bow)
    losses = jax.jit(moca.student_losses, static_argnames=("nets", "settings"))
    img, loc = losses(*args, nets=nets, settings=settings)
    # by hand for round 1 and 2
    w_img = protos[0]
    x = views.reshape(4, 96, 96, 3)
    flat_ids = ids.reshape(4, 2, 36)
    per_round = []
    encode = jax.jit(nets.encoder.apply)
    for r, (keep, _) in enumerate(settings.sizes):
        last = encode({"params": state.params["context_encoder"]}, x, flat_ids[:, r, :keep])
        logits = 3.0 * last.mean(1) @ w_img.T
        log_q = jax.nn.log_softmax(logits)
        target = bow[:, ::-1].reshape(4, -1)
        per_round.append(np.mean(np.sum(target * (np.log(target) - log_q), -1)))
    np.testing.assert_allclose(img, 2 * np.mean(per_round), rtol=1e-5)
    swapped, _ = losses(*args[:-1], bow[:, :1].repeat(2, 1), nets=nets, settings=settings)
    assert not np.isclose(swapped, img, rtol=1e-4)
    assert float(loc) > 0
    masked = settings._replace(loc_loss_on="masked")
    _, loc_masked = losses(*args, nets=nets, settings=masked)
    assert not np.isclose(loc_masked, loc, rtol=1e-4)


# --------------------------------------------------------------------------- schedules and sizes


def test_released_schedules():
    """E 200, W 30, stretch 1.25 (ipe 10): lr(0) = 0, lr(W) = peak, the last LR ≈ 12.2 % of
    peak, generators at a constant 1e-4, WD cosine 0.05 -> 0.2 from e = 0, momentum
    1 − ½(1 + cos(π(t + 1)/T))(1 − 0.994)."""
    config = tiny_moca_config(num_epochs=200, **{"optim.lr_peak": 1e-3})
    lengths = optim.run_lengths(100, 10, 200, 30)
    values = jax.vmap(moca.make_optimizer(config, lengths).schedules)(jnp.arange(2000))
    lr = np.asarray(values["lr"])
    assert lr[0] == 0 and lr[300] == pytest.approx(1e-3) and lr[150] == pytest.approx(5e-4)
    assert lr[-1] / 1e-3 == pytest.approx(0.5 * (1 + np.cos(np.pi * (199.9 - 30) / 220)), rel=1e-4)
    assert lr[-1] / 1e-3 == pytest.approx(0.1221, abs=1e-3)
    np.testing.assert_allclose(values["lr_wgen"], 1e-4)
    e = np.arange(2000) / 10
    np.testing.assert_allclose(
        values["wd"], 0.2 - 0.5 * (1 + np.cos(np.pi * e / 200)) * 0.15, rtol=1e-5
    )
    m = 1 - 0.5 * (1 + np.cos(np.pi * (np.arange(2000) + 1) / 2000)) * (1 - 0.994)
    np.testing.assert_allclose(values["ema"], m, rtol=1e-6)


def test_optimizer_clips_and_gives_the_generators_their_own_group():
    """One update from zero moments: the scheduled group moves by lr(0) = 0 (plus nothing for
    WD), the generators by 1e-4 per coordinate (Adam's first step is ±lr), after clipping the
    global norm to 0.1."""
    config = tiny_moca_config()
    opt = moca.make_optimizer(config, optim.RunLengths(10, 20, 2))
    params = {"context_encoder": {"w": jnp.ones((2, 2))}, "wgen_img": {"w": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda p: 10.0 * p, params)
    state = opt.tx.init(params)
    updates, _ = opt.tx.update(grads, state, params)
    np.testing.assert_allclose(updates["context_encoder"]["w"], 0.0)
    np.testing.assert_allclose(updates["wgen_img"]["w"], -1e-4 * (1 + 0.05), rtol=1e-4)
    clip = optim.clip_by_global_norm(0.1)
    clipped, _ = clip.update(grads, clip.init(params))
    assert float(optax_norm(clipped)) == pytest.approx(0.1 * 40 / (40 + 1e-6), rel=1e-6)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_counts_of_the_vit_s_and_vit_b_models():
    """The counts of `models_moca.py` (timm layout, fixed pos-embeds excluded)."""
    config = load_config("flowers_moca")
    nets = moca.build_models(config)
    settings = moca.Settings.from_config(config, nets.encoder)
    state = jax.eval_shape(
        lambda: moca.create_train_state(
            jax.random.key(0),
            config=config,
            nets=nets,
            settings=settings,
            tx=moca.make_optimizer(config, LENGTHS).tx,
            probe=None,
        )
    )
    params = state.params
    assert count(params["context_encoder"]) == 21_590_016
    assert count(params["wgen_img"]) == count(params["wgen_loc"]) == 591_744
    assert count(params["decoder"]) == 3_698_688
    assert settings.layer == 8 and settings.sizes == ((88, 127), (49, 88))
    config.model.embed_dim, config.model.num_heads = 768, 12
    config.moca.decoder_dim, config.moca.decoder_heads = 512, 16
    big = moca.build_models(config)
    words = jnp.zeros((8, 768))
    shapes = {
        "encoder": jax.eval_shape(big.encoder.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3))),
        "img": jax.eval_shape(big.wgen_img.init, jax.random.key(0), words),
        "loc": jax.eval_shape(big.wgen_loc.init, jax.random.key(0), words),
    }
    assert count(shapes["encoder"]) == 85_647_360
    assert count(shapes["img"]) == 2_363_136 and count(shapes["loc"]) == 2_363_392


def test_scott_student_never_sees_hidden_pixels():
    """With the SCOTT stem the student's outputs at the visible tokens do not change when the
    pixels of the other patches do."""
    encoder = models.Encoder("scott", 64, depth=2, num_heads=2, embed_dim=32, conv_impl="xla")
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    params = encoder.init(jax.random.key(1), images)
    ids = jnp.array([[0, 5, 10, 15, 3], [1, 2, 3, 4, 12]], jnp.int32)
    keep = np.zeros((2, 16), bool)
    keep[np.arange(2)[:, None], np.asarray(ids)] = True
    hidden = ~np.repeat(np.repeat(keep.reshape(2, 4, 4), 16, 1), 16, 2)
    noisy = jnp.where(hidden[..., None], 100.0, images)
    apply = jax.jit(lambda x: encoder.apply(params, x, ids, intermediate=1))
    for a, b in zip(apply(images), apply(noisy), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(encoder.apply(params, images), encoder.apply(params, noisy))


# --------------------------------------------------------------------------- step and loop


def step_batch(config, settings, step, batch_size=16):
    rng = np.random.default_rng(step)
    shape = (batch_size, config.img_size, config.img_size, 3)
    stream = [
        {
            "context": rng.standard_normal(shape).astype(np.float32),
            "target": rng.standard_normal(shape).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        }
    ]
    return next(moca.masked_batches(iter(stream), config, settings.sizes, 36, step))


def run_steps(config, devices, num_steps=2):
    trainer = build_trainer(config, devices)
    settings = moca.Settings.from_config(config, moca.build_encoder(config))
    state = trainer.init(jax.random.key(0))
    history = []
    for i in range(num_steps):
        batch = step_batch(config, settings, i)
        batch.pop("label")
        batch = jax.device_put(batch, trainer.data_sharding)
        state, metrics = trainer.step(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def test_step_on_8_devices_in_2_chunks_equals_1_device_in_one_pass():
    """The batch sharded over 8 devices, and the student's pass split into 2 parts of the
    batch (`moca.grad_chunks`, the gradients summed over them): the same losses, gradient
    norm, parameters, teacher and codebook as one device in one pass, to float round-off.
    The student draws no random numbers (no dropout or drop-path), so no example's
    computation depends on the part it falls in."""
    state1, metrics1 = run_steps(tiny_moca_config(), jax.devices()[:1])
    state8, metrics8 = run_steps(tiny_moca_config(**{"moca.grad_chunks": 2}), jax.devices())
    for m8, m1 in zip(metrics8, metrics1, strict=True):
        for key in ("loss", "loss/img", "loss/loc", "mu", "grad_norm"):
            np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
    chex.assert_trees_all_close(state8.params, state1.params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(state8.target_params, state1.target_params, atol=1e-5)
    chex.assert_trees_all_close(state8.codebook, state1.codebook, atol=1e-6)
    assert int(state1.codebook["ptr"]) == 8 % 16  # two steps of 4 new words
    assert not np.allclose(state1.codebook["words"][:8], state1.codebook["words"][8:16][:8])


@pytest.fixture(scope="module")
def moca_runs(tmp_path_factory):
    """Digits runs of 4 steps: one uninterrupted, one stopped after 2 and resumed."""
    root = tmp_path_factory.mktemp("moca")
    config = tiny_moca_config()
    full = loop.train_and_evaluate(config, root / "full", stop_at_step=4).state
    loop.train_and_evaluate(config, root / "resumed", stop_at_step=2)
    resumed = loop.train_and_evaluate(config, root / "resumed", stop_at_step=4).state
    return root, full, resumed


@pytest.mark.slow
def test_resumed_moca_run_matches_the_uninterrupted_run(moca_runs):
    root, full, resumed = moca_runs
    losses = {
        name: {r["step"]: r["loss"] for r in read_metrics(root / name) if "loss" in r}
        for name in ("full", "resumed")
    }
    assert sorted(losses["full"]) == sorted(losses["resumed"]) == [1, 2, 3, 4]
    for step in range(1, 5):
        np.testing.assert_allclose(losses["resumed"][step], losses["full"][step], rtol=1e-6)
    for tree in ("codebook", "target_params", "params"):
        chex.assert_trees_all_close(
            jax.device_get(getattr(resumed, tree)), jax.device_get(getattr(full, tree)), atol=1e-6
        )
    assert Checkpointer(root / "resumed" / "checkpoints").all_steps() == [2, 4]


@pytest.mark.slow
def test_probe_loads_the_teacher_of_a_moca_run(moca_runs):
    root, full, _ = moca_runs
    backbone = load_backbone(root / "full")
    assert backbone.which == "target" and isinstance(backbone.encoder, models.Encoder)
    chex.assert_trees_all_close(backbone.params, jax.device_get(full.target_params))
    images = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype(np.float32)
    assert backbone.encoder.apply({"params": backbone.params}, images).shape == (2, 36, 32)
    student = load_backbone(root / "full", encoder="context")
    chex.assert_trees_all_close(student.params, jax.device_get(full.params["context_encoder"]))


@pytest.mark.slow
def test_loss_falls_on_digits(tmp_path):
    """30 steps of the tiny model on digits: the mean loss of the last 10 steps is well below
    that of the first 10 (same program as `moca_runs`, so nothing new compiles)."""
    config = tiny_moca_config(checkpoint_every_steps=1000)  # one save, at the end
    loop.train_and_evaluate(config, tmp_path, stop_at_step=30)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses


def test_configs_select_moca():
    flowers = load_config("flowers_moca")
    assert (flowers.method, flowers.variant, flowers.batch_size, flowers.num_epochs) == (
        "moca",
        "vit-12/16",
        128,
        300,
    )
    assert flowers.optim.lr_peak == pytest.approx(7.5e-5)
    assert flowers.optim.lr_warmup_epochs == 45 and flowers.data.aug == "moca"
    assert flowers.moca.grad_chunks == 4
    moca.check_config(flowers)
    digits = load_config("digits_moca")
    moca.check_config(digits)
    assert moca.build_encoder(digits).grid_size == 6
    digits.variant = "scott-3/16"
    assert moca.build_encoder(digits).tokenizer == "scott"
    assert moca.intermediate_layer(digits, 3) == 2
    with pytest.raises(ValueError, match="num_words"):
        moca.check_config(tiny_moca_config(**{"moca.num_words": 15}))
    with pytest.raises(ValueError, match="no interior"):
        moca.check_config(tiny_moca_config(**{"moca.bow_border": 3}))
    with pytest.raises(ValueError, match="grad_chunks=3 must divide batch_size=16"):
        moca.check_config(tiny_moca_config(**{"moca.grad_chunks": 3}))


def test_remat_keeps_the_parameters_and_the_gradients():
    kwargs = dict(tokenizer="vit", img_size=64, depth=2, num_heads=2, embed_dim=32)
    plain, remat = models.Encoder(**kwargs), models.Encoder(**kwargs, remat=True)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    params = plain.init(jax.random.key(1), images)
    chex.assert_trees_all_equal_shapes(params, remat.init(jax.random.key(1), images))
    ids = jnp.array([[0, 3, 5], [1, 2, 9]], jnp.int32)

    def loss(p, module):
        last, inner = module.apply(p, images, ids, intermediate=1)
        return jnp.sum(last**2) + jnp.sum(inner**3)

    chex.assert_trees_all_close(
        jax.grad(loss)(params, plain), jax.grad(loss)(params, remat), rtol=1e-4, atol=1e-4
    )
