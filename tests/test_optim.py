"""Schedules, weight-decay mask, AdamW parity and EMA update.

The reference formulas are the official `src/schedulers.py` and `src/optimizer.py`
(docs/design.md#step-counting-and-schedules, #weight-decay).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scott_jax import optim
from scott_jax.models import build_encoder, build_predictor

# Worked example (docs/design.md#step-counting-and-schedules): Flowers "full" (8189 images)
# at batch 64, 300 epochs, 40 warmup.
T, W = 38_100, 5_080
LR = dict(lr_start=1e-6, lr_peak=5e-4, lr_final=1e-5, flat_pctg=0.72)
WD = dict(wd_start=0.04, wd_final=0.4)
EMA = dict(ema_start=0.996, ema_final=1.0)


def reference_lr(k, total, warmup, lr_start, lr_peak, lr_final, flat_pctg):
    """The reference's LR f(k) (warmup, flat, cosine), transcribed literally in Python floats."""
    if k < warmup:
        return lr_start + (k / warmup) * (lr_peak - lr_start)
    j, rest = k - warmup, total - warmup
    flat = int(rest * flat_pctg)
    cosine = rest - flat
    if j < flat:
        return lr_peak
    value = lr_final + (lr_peak - lr_final) * 0.5 * (
        1 + math.cos(math.pi * (j - flat) / max(1, cosine))
    )
    return max(value, lr_final)


def reference_linear(k, total, start, final):
    """The reference's linear WD g(k) and EMA m(k) (`LinearScheduler`)."""
    return start + (k / total) * (final - start)


# ---------------------------------------------------------------------------------------------
# Schedules


def test_lr_worked_example():
    lr = jax.jit(optim.lr_schedule(T, W, **LR))
    fl, c = int((T - W) * 0.72), (T - W) - int((T - W) * 0.72)
    assert (fl, c) == (23_774, 9_246)
    steps = [1, W - 1, W, W + fl - 1, W + fl, W + fl + 1, T - 1, T]
    values = np.asarray(lr(np.asarray(steps) - 1))  # optax count = k - 1
    expected = [reference_lr(k, T, W, **LR) for k in steps]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    # The worked numbers themselves.
    np.testing.assert_allclose(values[0], 1.098e-6, rtol=1e-3)
    np.testing.assert_allclose(values[0], 1e-6 + (5e-4 - 1e-6) / W, rtol=1e-6)
    assert values[1] < 5e-4
    np.testing.assert_array_equal(values[2:5], np.float32(5e-4))  # f(5080..28854) = peak
    np.testing.assert_allclose(values[-1], 1e-5, rtol=1e-6)
    assert values.dtype == np.float32


def test_lr_full_curve_and_monotonic_pieces():
    counts = np.arange(T)
    values = np.asarray(jax.jit(optim.lr_schedule(T, W, **LR))(counts))
    expected = np.array([reference_lr(k, T, W, **LR) for k in counts + 1])
    np.testing.assert_allclose(values, expected, rtol=2e-6, atol=1e-12)
    fl = int((T - W) * 0.72)
    warmup, flat, cosine = values[: W - 1], values[W - 1 : W + fl], values[W + fl :]
    assert np.all(np.diff(warmup) > 0)
    np.testing.assert_array_equal(flat, np.float32(5e-4))
    assert np.all(np.diff(cosine) <= 0) and cosine[-1] < cosine[len(cosine) // 2] < 5e-4
    assert np.all(values >= np.float32(1e-6))


def test_lr_edge_cases():
    # No warmup: the first step is already at the peak.
    np.testing.assert_allclose(jax.jit(optim.lr_schedule(10, 0, 0.0, 1.0, 0.1, 0.5))(0), 1.0)
    # No flat part: the cosine starts at the end of warmup.
    lr = jax.jit(optim.lr_schedule(10, 2, 0.0, 1.0, 0.1, 0.0))
    np.testing.assert_allclose(
        lr(np.arange(10)),
        [reference_lr(k, 10, 2, 0.0, 1.0, 0.1, 0.0) for k in range(1, 11)],
        rtol=1e-6,
    )
    # Fl = int(S·flat_pctg) truncates (S = 10, Fl = int(7.5) = 7, C = 3).
    lr = jax.jit(optim.lr_schedule(12, 2, 0.0, 1.0, 0.1, 0.75))
    np.testing.assert_allclose(
        lr(np.arange(12)),
        [reference_lr(k, 12, 2, 0.0, 1.0, 0.1, 0.75) for k in range(1, 13)],
        rtol=1e-6,
    )
    assert float(lr(8)) == 1.0 > float(lr(9))  # k = W + Fl is the cosine's start, at peak
    # Python ints and numpy scalars are accepted.
    assert float(lr(3)) == float(lr(np.int64(3)))


@pytest.mark.parametrize(
    "args",
    [
        dict(total_steps=0, warmup_steps=0),
        dict(total_steps=10, warmup_steps=11),
        dict(total_steps=10, warmup_steps=-1),
        dict(total_steps=10, warmup_steps=2, flat_pctg=1.5),
        dict(total_steps=10, warmup_steps=2, flat_pctg=-0.1),
    ],
)
def test_lr_rejects_bad_arguments(args):
    kwargs = {**LR, **args}
    with pytest.raises(ValueError):
        optim.lr_schedule(**kwargs)


def test_wd_and_ema_schedules():
    wd = optim.wd_schedule(T, **WD)
    np.testing.assert_allclose(wd(0), 0.04 + 0.36 / T, rtol=1e-6)
    np.testing.assert_allclose(wd(T - 1), 0.4, rtol=1e-7)
    counts = np.arange(0, T, 997)
    expected = [reference_linear(k, T, 0.04, 0.4) for k in counts + 1]
    np.testing.assert_allclose(wd(counts), expected, rtol=1e-6)
    assert np.all(np.diff(np.asarray(wd(counts))) > 0)

    ema = optim.ema_schedule(T, **EMA)
    np.testing.assert_allclose(ema(0), 0.996 + 0.004 / T, rtol=1e-7)
    assert float(ema(T - 1)) == 1.0  # the last update uses m = 1 exactly (k = T)
    cosine = optim.ema_schedule(T, **EMA, kind="cosine")
    assert float(cosine(T - 1)) == 1.0
    assert np.float32(0.996) <= cosine(0) < cosine(T // 2) < 1.0
    with pytest.raises(ValueError):
        optim.ema_schedule(T, **EMA, kind="step")
    with pytest.raises(ValueError):
        optim.wd_schedule(0, **WD)


def test_make_builds_the_optimizer_and_its_schedules():
    """`optim.make`: the logged schedule values are the ones the optax chain applies."""
    config = {
        "lr_start": LR["lr_start"],
        "lr_peak": LR["lr_peak"],
        "lr_final": LR["lr_final"],
        "lr_flat_pctg": LR["flat_pctg"],
        **WD,
        **EMA,
        **dict(b1=0.9, b2=0.999, eps=1e-8),
    }
    made = optim.make(config, optim.RunLengths(100, T, W), ema_kind="linear")
    count = jnp.asarray(W + 7)
    values = jax.jit(made.schedules)(count)
    assert set(values) == {"lr", "wd", "ema"}
    assert set(optim.make(config, optim.RunLengths(100, T, W)).schedules(0)) == {"lr", "wd"}
    params = {"w": jnp.ones((2, 2))}
    state = made.tx.init(params)
    update = jax.jit(made.tx.update)
    for _ in range(W + 8):  # the update with count W + 7 applies values["lr"], values["wd"]
        updates, state = update({"w": jnp.zeros((2, 2))}, state, params)
    np.testing.assert_allclose(updates["w"], -values["lr"] * values["wd"] * params["w"], rtol=1e-5)
    np.testing.assert_allclose(values["lr"], 5e-4)
    np.testing.assert_allclose(values["wd"], reference_linear(W + 8, T, 0.04, 0.4), rtol=1e-6)
    np.testing.assert_allclose(values["ema"], reference_linear(W + 8, T, 0.996, 1.0), rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# Weight-decay mask and AdamW


def model_params():
    """Random parameters with the exact tree of a tiny SCOTT context encoder + predictor."""
    encoder = build_encoder("scott-7/16", 64, embed_dim=64, depth=2, num_heads=4)
    predictor = build_predictor(encoder, depth=2)
    key = jax.random.key(0)
    shapes = {
        "encoder": jax.eval_shape(encoder.init, key, jnp.zeros((1, 64, 64, 3)))["params"],
        "predictor": jax.eval_shape(predictor.init, key, jnp.zeros((1, 16, 64)))["params"],
    }
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_decay_mask_on_model_params():
    mask = optim.decay_mask(model_params())
    enc, pred = mask["encoder"], mask["predictor"]
    assert enc["transformer"]["mask_token"] is True
    assert enc["tokenizer"]["conv_0"]["kernel"] is True
    assert enc["transformer"]["block_0"]["attn"]["qkv"]["kernel"] is True
    assert pred["head"]["kernel"] is True
    assert pred["head"]["bias"] is False
    assert pred["head_norm"] == {"scale": False, "bias": False}
    # `get_optimizer`'s rule: in SCOTT only the predictor head's LN params and bias are excluded.
    excluded = [
        jax.tree_util.keystr(path)
        for path, decayed in jax.tree_util.tree_leaves_with_path(mask)
        if not decayed
    ]
    assert sorted(excluded) == [
        "['predictor']['head']['bias']",
        "['predictor']['head_norm']['bias']",
        "['predictor']['head_norm']['scale']",
    ]

    vit = build_encoder("vit-7/16", 64, embed_dim=64, depth=2, num_heads=4, num_register_tokens=2)
    shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    vit_mask = optim.decay_mask(shapes)
    assert vit_mask["tokenizer"]["proj"] == {"kernel": True, "bias": False}
    assert vit_mask["transformer"]["registers"] is True


def make_toy_params(rng):
    """One leaf of each kind that the reference's weight-decay rule separates.

    A 2-D kernel and a 3-D mask token (decayed), a 1-D bias, a 1-D non-bias scale and a 2-D
    leaf whose name contains "bias" (not decayed: the rule is on names *or* shapes).
    """
    return {
        "dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
        "norm": {"scale": 1.0 + 0.1 * rng.normal(size=(4,))},
        "mask_token": rng.normal(size=(1, 1, 4)),
        "rel_bias_table": rng.normal(size=(2, 4)),
    }


# Large LR and WD over a short run, so that decay, masking and off-by-one errors all show.
TOY = dict(
    total_steps=6,
    warmup_steps=2,
    lr_start=0.01,
    lr_peak=0.1,
    lr_final=0.001,
    flat_pctg=0.7,  # S·flat = 2.8: int() and round() differ
    wd_start=0.1,
    wd_final=0.5,
)
TOY_DECAYED = {
    "dense": {"kernel": True, "bias": False},
    "norm": {"scale": False},
    "mask_token": True,
    "rel_bias_table": False,
}


def toy_lr_wd(k):
    """The per-step (lr, wd) for step k, from the reference formulas (independent of `optim`)."""
    lr = reference_lr(
        k,
        TOY["total_steps"],
        TOY["warmup_steps"],
        TOY["lr_start"],
        TOY["lr_peak"],
        TOY["lr_final"],
        TOY["flat_pctg"],
    )
    return lr, reference_linear(k, TOY["total_steps"], TOY["wd_start"], TOY["wd_final"])


TOY_TX = optim.make_optimizer(**TOY)


@jax.jit
def toy_step(params, state, grad):
    updates, state = TOY_TX.update(grad, state, params)
    return optax.apply_updates(params, updates), state


def run_optax(params, grads):
    """`make_optimizer(**TOY)` for len(grads) jitted steps on float32 params."""
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    state = TOY_TX.init(params)
    for grad in grads:
        params, state = toy_step(params, state, jax.tree.map(jnp.float32, grad))
    # A plain pytree of arrays: checkpointable with orbax like the parameters.
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
    return jax.tree.map(np.asarray, params)


def numpy_adamw(params, grads, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW's update (torch 2.x `_single_tensor_adam`, decoupled decay) in float64."""
    flat, treedef = jax.tree.flatten(params)
    decayed = jax.tree.leaves(TOY_DECAYED)
    m = [np.zeros_like(p) for p in flat]
    v = [np.zeros_like(p) for p in flat]
    p = [np.array(x, np.float64) for x in flat]
    for k, grad in enumerate(grads, start=1):
        lr, wd = toy_lr_wd(k)
        for i, g in enumerate(jax.tree.leaves(grad)):
            p[i] = p[i] * (1 - lr * (wd if decayed[i] else 0.0))
            m[i] = m[i] + (1 - b1) * (g - m[i])
            v[i] = v[i] + (1 - b2) * (g * g - v[i])
            denom = np.sqrt(v[i]) / math.sqrt(1 - b2**k) + eps
            p[i] = p[i] - lr / (1 - b1**k) * m[i] / denom
    return jax.tree.unflatten(treedef, p)


def toy_problem(num_steps=5):
    """Toy params and per-step gradients; the mask token's are ~1e-8, where eps matters."""
    rng = np.random.default_rng(0)
    params = make_toy_params(rng)
    grads = []
    for _ in range(num_steps):
        grad = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
        grad["mask_token"] *= 1e-8
        grads.append(grad)
    return params, grads


def assert_same_updates(actual, expected, start):
    """Compare the parameter *changes*, which are much smaller than the parameters.

    optax evaluates the bias corrections 1 − β^k in float32 (torch in float64), which moves
    each update by ~1e-5 relative; in float64 the two agree to 1e-8.
    """
    jax.tree.map(
        lambda a, e, s: np.testing.assert_allclose(a - s, e - s, rtol=1e-4, atol=1e-6),
        actual,
        expected,
        start,
    )


def test_adamw_matches_numpy_transcription_of_torch():
    params, grads = toy_problem()
    assert optim.decay_mask(params) == TOY_DECAYED
    assert_same_updates(run_optax(params, grads), numpy_adamw(params, grads), params)


def test_adamw_matches_torch_optimizer():
    torch = pytest.importorskip("torch")
    params, grads = toy_problem()
    flat, treedef = jax.tree.flatten(params)
    tensors = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in flat]
    decayed = jax.tree.leaves(TOY_DECAYED)
    groups = [
        {"params": [t for t, d in zip(tensors, decayed, strict=True) if d]},
        {
            "params": [t for t, d in zip(tensors, decayed, strict=True) if not d],
            "weight_decay": 0.0,
        },
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    for k, grad in enumerate(grads, start=1):
        lr, wd = toy_lr_wd(k)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.param_groups[0]["weight_decay"] = wd
        for t, g in zip(tensors, jax.tree.leaves(grad), strict=True):
            t.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    expected = jax.tree.unflatten(treedef, [t.detach().numpy() for t in tensors])
    assert_same_updates(run_optax(params, grads), expected, params)


def test_zero_grad_step_only_decays_the_decayed_group():
    params = model_params()
    new = run_optax(params, [jax.tree.map(np.zeros_like, params)])
    lr, wd = toy_lr_wd(1)

    def check(before, after, decayed):
        if decayed:
            np.testing.assert_allclose(after, before * np.float32(1 - lr * wd), rtol=1e-6)
            assert np.all(np.abs(after) < np.abs(before))
        else:
            np.testing.assert_array_equal(after, before)

    jax.tree.map(check, params, new, optim.decay_mask(params))


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_update():
    target = {"a": jnp.ones((2, 3)), "b": {"c": jnp.full((4,), 4.0), "d": jnp.zeros(())}}
    online = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.full((4,), 2.0), "d": jnp.ones(())}}
    same = optim.ema_update(target, online, 1.0)
    jax.tree.map(np.testing.assert_array_equal, same, target)
    copied = optim.ema_update(target, online, 0.0)
    jax.tree.map(np.testing.assert_array_equal, copied, online)
    mean = jax.jit(optim.ema_update)(target, online, jnp.float32(0.5))
    jax.tree.map(lambda x, t, o: np.testing.assert_allclose(x, (t + o) / 2), mean, target, online)
    assert jax.tree.structure(mean) == jax.tree.structure(target)
