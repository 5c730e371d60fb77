"""Dropout, attention dropout and drop-path follow the reference's semantics (issue 22.3).

With regularisation on, our step cannot match the official one draw for draw, so these
tests check *what* is dropped, by how much the rest is rescaled, *where* in the block each
applies and that eval mode is deterministic, against the official `src/models/transformer.py`
(`Transformer.prepare_tokens`: position dropout after the position embedding;
`Attention`: dropout on the softmax probabilities and after the output projection;
`MlpFFN`: dropout after the GELU and after the last Linear; `SwiGLUFFN`: none; `DropPath`:
one Bernoulli per sample, kept samples divided by 1 − p, a fresh draw for each of the
block's two branches).

Each check reads the random pattern off the output exactly (weights are chosen so that a
dropped element, sample or attention probability is visible), then tests the drop rate
against a binomial bound of 6 sigma, the rescaled values to float32 round-off and the
independence structure. With `SCOTT_REFERENCE_DIR` set to an official checkout (and torch
installed), the same checks also run on the official modules, which shows that they encode
the reference's behaviour rather than ours.
"""

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from scott_jax.models import build_encoder, build_predictor
from scott_jax.models.transformer import Attention, Block, Mlp, SwiGLU, Transformer, layer_norm

RATE = 0.25
SIGMAS = 6.0


def assert_rate(dropped: np.ndarray, rate: float = RATE) -> None:
    """The fraction of True in `dropped` is `rate` within SIGMAS binomial sigmas."""
    n = dropped.size
    bound = SIGMAS * np.sqrt(rate * (1 - rate) / n)
    assert abs(dropped.mean() - rate) < bound, (dropped.mean(), rate, bound)


def assert_independent(a: np.ndarray, b: np.ndarray) -> None:
    """Two boolean arrays of draws are uncorrelated (|corr| < SIGMAS / sqrt(n))."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    corr = np.corrcoef(a, b)[0, 1]
    assert abs(corr) < SIGMAS / np.sqrt(a.size), corr


# --------------------------------------------------------------------------- readouts


def attention_readout(apply, batch: int, heads: int, tokens: int) -> np.ndarray:
    """[batch, heads, tokens, tokens] attention probabilities *after* dropout, read off an
    attention layer whose q = k = 0 (uniform probabilities 1/N), v = x and output
    projection = identity, on inputs whose token j is the one-hot e_j in every head:
    output[b, i, h·d + j] is then the probability of query i on key j in head h."""
    dim = heads * tokens
    x = np.zeros((batch, tokens, dim), np.float32)
    for h in range(heads):
        x[:, np.arange(tokens), h * tokens + np.arange(tokens)] = 1.0
    qkv = np.zeros((dim, 3 * dim), np.float32)  # [in, out]: q | k | v
    qkv[:, 2 * dim :] = np.eye(dim)
    out = apply(x, qkv, np.eye(dim, dtype=np.float32))  # [batch, tokens, dim]
    return out.reshape(batch, tokens, heads, tokens).transpose(0, 2, 1, 3)


def ours_attention(attention_dropout: float, dropout_rate: float, seed: int, fast=None):
    def apply(x, qkv, proj):
        module = Attention(
            num_heads=x.shape[-1] // x.shape[1],
            dropout_rate=dropout_rate,
            attention_dropout=attention_dropout,
            fast_dropout=fast,
        )
        params = {"qkv": {"kernel": qkv}, "proj": {"kernel": proj}}
        return np.asarray(
            module.apply(
                {"params": params},
                jnp.asarray(x),
                train=True,
                rngs={"dropout": jax.random.key(seed)},
            )
        )

    return apply


def drop_path_candidates(block_apply_eval, x, rate=RATE):
    """The reference block's four outputs for (attention branch kept?, FFN branch kept?),
    from the eval-mode sub-layers: h = LN(x + a·y/(1−p)), out = h + b·FFN(h)/(1−p)."""
    y, ffn = block_apply_eval
    attn = y(layer_norm(x))
    out = {}
    for a in (0, 1):
        h = layer_norm(x + a * attn / (1 - rate))
        f = ffn(h)
        for b in (0, 1):
            out[a, b] = h + b * f / (1 - rate)
    return out


# --------------------------------------------------------------------------- ours


@pytest.mark.parametrize("fast", [True, False])  # 16-bit bits (CPU default), nn.Dropout
def test_attention_dropout_drops_probabilities_elementwise_and_rescales(fast):
    batch, heads, tokens = 8, 4, 16
    draws = [
        attention_readout(ours_attention(RATE, 0.0, seed, fast), batch, heads, tokens)
        for seed in range(4)
    ]
    probs = np.stack(draws)
    kept_value = 1.0 / (tokens * (1 - RATE))  # uniform 1/N, divided by 1 - p, not renormalised
    dropped = probs == 0
    np.testing.assert_allclose(probs[~dropped], kept_value, rtol=1e-6)
    assert_rate(dropped)
    # Elementwise over [B, H, N, N]: neighbouring keys, queries, heads and samples and two
    # calls with other keys are independent draws, not shared rows, heads or samples.
    assert_independent(dropped[..., :-1], dropped[..., 1:])
    assert_independent(dropped[..., :-1, :], dropped[..., 1:, :])
    assert_independent(dropped[:, :, :-1], dropped[:, :, 1:])
    assert_independent(dropped[:, :-1], dropped[:, 1:])
    assert_independent(dropped[:-1], dropped[1:])


def test_projection_dropout_is_elementwise_after_the_projection():
    batch, heads, tokens = 8, 4, 16
    probs = attention_readout(ours_attention(0.0, RATE, 0), batch, heads, tokens)
    dropped = probs == 0
    np.testing.assert_allclose(probs[~dropped], 1.0 / (tokens * (1 - RATE)), rtol=1e-6)
    assert_rate(dropped)
    assert_independent(dropped[..., :-1], dropped[..., 1:])
    assert_independent(dropped[:-1], dropped[1:])


def test_mlp_ffn_drops_after_the_activation_and_after_the_last_linear():
    """Identity Linears: out = drop2(drop1(GELU(x))), two independent elementwise draws, so
    an element survives with (1 − p)² and is scaled by 1/(1 − p)²."""
    dim = 64
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, (32, 16, dim)), jnp.float32)
    params = {"linear1": {"kernel": jnp.eye(dim)}, "last_linear": {"kernel": jnp.eye(dim)}}
    module = Mlp(mlp_ratio=1.0, dropout_rate=RATE)
    out = np.asarray(
        module.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
    )
    gelu = np.asarray(jax.nn.gelu(x, approximate=False))
    dropped = out == 0
    np.testing.assert_allclose(out[~dropped], gelu[~dropped] / (1 - RATE) ** 2, rtol=1e-5)
    assert_rate(dropped, 1 - (1 - RATE) ** 2)
    eval_out = module.apply({"params": params}, x, train=False)
    np.testing.assert_allclose(eval_out, gelu, rtol=1e-6)


def test_swiglu_ffn_has_no_dropout():
    dim = 32
    x = jax.random.normal(jax.random.key(0), (4, 16, dim))
    module = SwiGLU()
    params = module.init(jax.random.key(1), x, train=False)
    train = module.apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(train, module.apply(params, x, train=False))


def test_position_dropout_is_elementwise_after_the_position_embedding():
    """A block-free transformer returns dropout(tokens with mask tokens + pos-embed)."""
    grid, dim, batch = 4, 64, 32
    module = Transformer(depth=0, num_heads=4, grid_size=grid, dropout_rate=RATE)
    tokens = jnp.ones((batch, grid * grid, dim)) * 3.0
    keep = jnp.asarray(np.random.default_rng(1).integers(0, 2, (batch, grid * grid)))
    params = module.init(jax.random.key(0), tokens, keep)
    clean = np.asarray(module.apply(params, tokens, keep, train=False))
    out = np.asarray(
        module.apply(params, tokens, keep, train=True, rngs={"dropout": jax.random.key(1)})
    )
    dropped = (out == 0) & (clean != 0)
    assert np.all((out == 0) == dropped | (clean == 0))
    np.testing.assert_allclose(out[~dropped], clean[~dropped] / (1 - RATE), rtol=1e-6)
    assert_rate(dropped)
    assert_independent(dropped[..., :-1], dropped[..., 1:])  # elements, not whole tokens
    assert_independent(dropped[:, :-1], dropped[:, 1:])


def test_drop_path_is_per_sample_on_both_branches_with_independent_draws():
    dim, tokens, batch = 32, 16, 256
    block = Block(num_heads=4, drop_path_rate=RATE)
    x = jax.random.normal(jax.random.key(0), (batch, tokens, dim))
    params = block.init(jax.random.key(1), x, False)
    p = params["params"]
    attn = Attention(num_heads=4)
    ffn = SwiGLU()
    sublayers = (
        lambda h: attn.apply({"params": p["attn"]}, h, train=False),
        lambda h: ffn.apply({"params": p["ffn"]}, h, train=False),
    )
    candidates = drop_path_candidates(sublayers, x)
    eval_out = drop_path_candidates(sublayers, x, rate=0.0)[1, 1]  # no drop, no rescale
    np.testing.assert_allclose(block.apply(params, x, False), eval_out, rtol=1e-5, atol=1e-5)
    kept = []
    for seed in range(8):
        out = block.apply(params, x, True, rngs={"drop_path": jax.random.key(seed)})
        errors = np.stack(
            [np.abs(out - candidates[ab]).max(axis=(1, 2)) for ab in sorted(candidates)]
        )  # [4, batch]
        match = errors.argmin(0)
        # Every sample is exactly one of the four (so whole samples are dropped, rescaled by
        # 1/(1 - p), in both residual branches).
        assert np.all(errors.min(0) < 1e-4), errors.min(0).max()
        kept.append(np.stack([match // 2, match % 2]))  # (a, b) per sample
    kept = np.concatenate(kept, axis=1).astype(bool)  # [2, draws·batch]
    assert_rate(~kept[0])
    assert_rate(~kept[1])
    assert_independent(kept[0], kept[1])  # one module, two independent calls
    assert_independent(kept[0][:-1], kept[0][1:])  # per sample, not per batch


def test_drop_path_rates_grow_linearly_with_depth_and_eval_is_deterministic():
    """Block i of a depth-L transformer gets rate·i/(L − 1) (`torch.linspace`), and eval mode
    (the target encoder, evaluation) ignores every rate."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Block) and context.method_name == "__call__":
            seen.append(context.module.drop_path_rate)
        return next_fun(*args, **kwargs)

    transformer = Transformer(depth=3, num_heads=4, grid_size=4, stochastic_depth_rate=0.3)
    x = jax.random.normal(jax.random.key(2), (2, 16, 32))
    with nn.intercept_methods(record):
        transformer.init(jax.random.key(3), x)
    np.testing.assert_allclose(seen, [0.0, 0.15, 0.3])

    kwargs = dict(embed_dim=32, depth=3, num_heads=4)
    plain = build_encoder("scott-7/16", 64, **kwargs)
    rates = dict(dropout_rate=0.5, attention_dropout=0.5, stochastic_depth_rate=0.5)
    regularised = build_encoder("scott-7/16", 64, **kwargs, **rates)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    keep = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 16)))
    params = plain.init(jax.random.key(1), images, keep)
    np.testing.assert_array_equal(
        regularised.apply(params, images, keep), plain.apply(params, images, keep)
    )
    train = regularised.apply(
        params,
        images,
        keep,
        train=True,
        rngs={"dropout": jax.random.key(4), "drop_path": jax.random.key(5)},
    )
    assert not np.allclose(train, plain.apply(params, images, keep))
    # The predictor takes the encoder's rates (official `Predictor` arguments).
    predictor = build_predictor(regularised, depth=2)
    assert (predictor.dropout_rate, predictor.attention_dropout) == (0.5, 0.5)
    assert predictor.stochastic_depth_rate == 0.5


# --------------------------------------------------------------------------- the reference


@pytest.fixture(scope="module")
def reference():
    """The official `src.models.transformer` module (SCOTT_REFERENCE_DIR), or skip."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")
    root = os.environ.get("SCOTT_REFERENCE_DIR")
    if not root or not (Path(root) / "src" / "models" / "transformer.py").is_file():
        pytest.skip("SCOTT_REFERENCE_DIR is not an official SCOTT checkout")
    sys.path.insert(0, str(Path(root).resolve()))
    try:
        from src.models import transformer
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    return torch, transformer


def test_reference_attention_dropout_passes_the_same_checks(reference):
    torch, ref = reference
    batch, heads, tokens = 8, 4, 16

    def apply(x, qkv, proj):
        layer = ref.Attention(x.shape[-1], heads, attention_dropout=RATE, projection_dropout=0.0)
        with torch.no_grad():
            layer.qkv.weight.copy_(torch.from_numpy(qkv.T))
            layer.proj.weight.copy_(torch.from_numpy(proj.T))
        layer.train()
        with torch.no_grad():
            return layer(torch.from_numpy(x))[0].numpy()

    probs = np.stack([attention_readout(apply, batch, heads, tokens) for _ in range(4)])
    dropped = probs == 0
    np.testing.assert_allclose(probs[~dropped], 1.0 / (tokens * (1 - RATE)), rtol=1e-6)
    assert_rate(dropped)
    assert_independent(dropped[..., :-1], dropped[..., 1:])
    assert_independent(dropped[:, :-1], dropped[:, 1:])


def test_reference_drop_path_passes_the_same_checks(reference):
    torch, ref = reference
    dim, tokens, batch = 32, 16, 256
    block = ref.Block(dim, 4, 0.0, 0.0, RATE, ref.SwiGLUFFN(dim))
    x = torch.randn(batch, tokens, dim)

    def attn(h):
        return block.self_attn(torch.tensor(np.asarray(h)))[0].numpy()

    def ffn(h):
        return block.ffn_layer(torch.tensor(np.asarray(h))).numpy()

    with torch.no_grad():
        block.eval()
        candidates = drop_path_candidates((attn, ffn), jnp.asarray(x.numpy()))
        block.train()
        kept = []
        for _ in range(8):
            out = block(x.clone()).numpy()
            errors = np.stack(
                [
                    np.abs(out - np.asarray(candidates[ab])).max(axis=(1, 2))
                    for ab in sorted(candidates)
                ]
            )
            assert np.all(errors.min(0) < 1e-4), errors.min(0).max()
            match = errors.argmin(0)
            kept.append(np.stack([match // 2, match % 2]))
    kept = np.concatenate(kept, axis=1).astype(bool)
    assert_rate(~kept[0])
    assert_rate(~kept[1])
    assert_independent(kept[0], kept[1])
    assert_independent(kept[0][:-1], kept[0][1:])


def test_reference_mlp_ffn_passes_the_same_checks(reference):
    torch, ref = reference
    dim = 64
    x = np.random.default_rng(0).uniform(0.5, 2.0, (32, 16, dim)).astype(np.float32)
    layer = ref.MlpFFN(dim, dim, RATE)
    with torch.no_grad():
        layer.linear1.weight.copy_(torch.eye(dim))
        layer.last_linear.weight.copy_(torch.eye(dim))
        layer.train()
        out = layer(torch.from_numpy(x)).numpy()
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False))
    dropped = out == 0
    np.testing.assert_allclose(out[~dropped], gelu[~dropped] / (1 - RATE) ** 2, rtol=1e-5)
    assert_rate(dropped, 1 - (1 - RATE) ** 2)
