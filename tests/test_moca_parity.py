"""MOCA parity with the official code (valeoai/MOCA, `models_moca.py`, `main_pretrain.py`):
`tests/fixtures/moca_parity.npz` (made by tests/fixtures/make_moca_fixture.py) holds three
training steps of the official model on the CPU; the converted state_dict must reproduce its
teacher assignments, the student's predictions, both losses, the codebook updates and the
parameters after the three steps (clip, the generators' LR group, EMA)."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_moca import tiny_moca_config

from scott_jax import masking_moca, optim
from scott_jax.convert import moca_state_from_torch
from scott_jax.methods import moca
from scott_jax.models import moca as models

FIXTURE = Path(__file__).parent / "fixtures" / "moca_parity.npz"
BATCH, GRID = 4, 6


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def config_of(arch):
    return tiny_moca_config(
        batch_size=BATCH,
        num_epochs=3,
        **{
            "model.embed_dim": arch["embed_dim"],
            "model.depth": arch["depth"],
            "model.num_heads": arch["num_heads"],
            "moca.decoder_dim": arch["decoder_embed_dim"],
            "moca.decoder_depth": arch["decoder_depth"],
            "moca.decoder_heads": arch["decoder_num_heads"],
            "moca.num_words": arch["num_words"],
            "moca.num_new_words": arch["num_new_words"],
            "moca.intermediate_layer": arch["depth"] - arch["early_layer"],
            "moca.lr_wgen": 1e-3,
            "optim.lr_peak": 1e-3,
            "optim.ema_start": 0.99,
        },
    )


def torch_rows(x):
    """[B, 2, ...] (row 2b + v here) -> the official [x1; x2] row order [2B, ...]."""
    return np.swapaxes(np.asarray(x), 0, 1).reshape(-1, *np.shape(x)[2:])


def masks(noise):
    """The official noise [2B, N] of one step -> 'ids' [B, 2 views, 2 rounds, N]."""
    perm = np.argsort(noise, axis=1, kind="stable").reshape(2, BATCH, -1).swapaxes(0, 1)
    sizes = masking_moca.rounds(GRID * GRID, (0.55, 0.75), (0.35, 0.55), True)
    return masking_moca.complementary_ids(perm, sizes).astype(np.int32)


def run(fixture):
    arch = ast.literal_eval(bytes(fixture["arch"]).decode())
    config = config_of(arch)
    nets = moca.build_models(config)
    settings = moca.Settings.from_config(config, nets.encoder)
    lengths = optim.RunLengths(steps_per_epoch=2, total_steps=6, warmup_steps=2)
    optimizer = moca.make_optimizer(config, lengths)
    sd = {k[3:]: v for k, v in fixture.items() if k.startswith("sd/")}
    trees = moca_state_from_torch(sd, GRID)
    # The official EMA at the start of step 0 (m(0) = 0.99; the teacher was perturbed apart).
    target = optim.ema_update(trees["target_params"], trees["params"]["context_encoder"], 0.99)
    state = moca.MocaState(
        step=jnp.zeros((), jnp.int32),
        params=trees["params"],
        target_params=target,
        opt_state=optimizer.tx.init(trees["params"]),
        codebook=trees["codebook"],
    )
    step = jax.jit(
        lambda state, batch, words: moca.train_step(
            state,
            batch,
            nets=nets,
            settings=settings,
            tx=optimizer.tx,
            schedules=optimizer.schedules,
            seed=0,
            new_words=words,
        )
    )
    inner = models.interior(GRID, 2)
    views = (fixture["pixels"].astype(np.float32) - 128.0) / 64.0
    records = []
    for t in range(3):
        batch = {"view1": views[t, 0], "view2": views[t, 1], "ids": masks(fixture["noise"][t])}
        if t == 0:
            first = (state, batch)
        words = (
            jnp.int32(fixture["picks/view"][t]),
            jnp.asarray(fixture["picks/images"][t]),
            jnp.asarray(inner[fixture["picks/tokens"][t]]),
        )
        state, metrics = step(state, batch, words)
        records.append((jax.device_get(metrics), jax.device_get(state.codebook)))
    return nets, settings, first, records, jax.device_get(state)


@pytest.fixture(scope="module")
def ran(fixture):
    return run(fixture)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def test_teacher_targets_and_student_predictions(fixture, ran):
    nets, settings, (state, batch), _, _ = ran
    views = jnp.stack([batch["view1"], batch["view2"]], 1)
    _, q, bow, _ = moca.teacher_targets(
        state.target_params, state.codebook, views, encoder=nets.encoder, settings=settings
    )
    assert rel(q, fixture["q0"]) < 1e-5 and rel(bow, fixture["bow0"]) < 1e-5
    words = state.codebook["words"]
    w_img = nets.wgen_img.apply({"params": state.params["wgen_img"]}, words)
    w_loc = nets.wgen_loc.apply({"params": state.params["wgen_loc"]}, words)
    assert rel(w_img, fixture["w_img0"]) < 1e-5 and rel(w_loc, fixture["w_loc0"]) < 1e-5
    x = views.reshape(-1, *views.shape[2:])
    ids = batch["ids"].reshape(-1, 2, GRID * GRID)
    for r, (keep, dec) in enumerate(settings.sizes):
        last, inner = nets.encoder.apply(
            {"params": state.params["context_encoder"]},
            x,
            ids[:, r, :keep],
            intermediate=settings.layer,
        )
        avg = last.mean(1)
        assert rel(torch_rows(avg.reshape(BATCH, 2, -1)), fixture["avg0"][r]) < 1e-5
        got = torch_rows(inner.reshape(BATCH, 2, *inner.shape[1:]))
        assert rel(got, fixture[f"inner0/{r}"]) < 1e-5
        out = nets.decoder.apply(
            {"params": state.params["decoder"]}, avg, inner, ids[:, r, :keep], ids[:, r, keep:dec]
        )
        got = torch_rows(out.reshape(BATCH, 2, *out.shape[1:])).reshape(-1, out.shape[-1])
        assert rel(got, fixture[f"decoder0/{r}"]) < 1e-5


def test_losses_codebook_and_parameters_after_three_steps(fixture, ran):
    *_, records, final = ran
    for t, (metrics, codebook) in enumerate(records):
        loss, img, loc = fixture[f"loss/{t}"]
        np.testing.assert_allclose(
            [metrics["loss"], metrics["loss/img"], metrics["loss/loc"]], [loss, img, loc], rtol=1e-5
        )
        np.testing.assert_allclose(codebook["words"], fixture[f"codebook/{t}"], atol=1e-6)
        assert int(codebook["ptr"]) == int(fixture[f"ptr/{t}"][0])
        np.testing.assert_allclose(codebook["mu"], fixture[f"mu/{t}"][0], rtol=1e-5)
    expected = moca_state_from_torch(
        {k[6:]: v for k, v in fixture.items() if k.startswith("final/")}, GRID
    )
    errors = {}
    for tree in ("params", "target_params"):
        leaves = jax.tree_util.tree_flatten_with_path(getattr(final, tree))[0]
        for (path, a), b in zip(leaves, jax.tree.leaves(expected[tree]), strict=True):
            errors[tree + jax.tree_util.keystr(path)] = rel(a, b)
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
