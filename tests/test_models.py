"""Model library: parameter counts, shapes, masking invariants, init, sharding."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax.models import VARIANTS, build_encoder, build_predictor, ijepa
from scott_jax.models.encoder import Encoder
from scott_jax.models.linear import Dense, flat_dot_general, resolve_flat
from scott_jax.models.tokenizers import ScottTokenizer, StemConv, max_blur_pool
from scott_jax.models.transformer import sincos_pos_embed, swiglu_hidden_dim

# The official models' trainable parameters (`compute_num_trainable_params`), mask token
# included, position embedding excluded (docs/design.md#transformer, #predictor).
PARAM_COUNTS = {
    "scott-3/16": 6_522_432,
    "scott-7/16": 13_600_320,
    "scott-9/16": 17_139_264,
    "scott-12/16": 22_447_680,
    "vit-7/16": 12_681_984,
    "vit-12/16": 21_529_344,
}
PREDICTOR_DEPTH3_PARAMS = 5_457_024


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(module, *inputs):
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


def random_keep_mask(key, batch, num_patches, num_kept):
    scores = jax.random.uniform(key, (batch, num_patches))
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    return (ranks < num_kept).astype(jnp.int32)


@pytest.fixture(scope="module")
def batch():
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    keep_mask = random_keep_mask(jax.random.key(2), 2, 16, 7)
    return images, keep_mask


@pytest.fixture(scope="module")
def tiny_variables(tiny_scott, tiny_vit):
    """{fixture name: variables} of the tiny encoders, one jitted init each (eagerly, op by op,
    an init takes ~10 s)."""
    images = jnp.zeros((1, 64, 64, 3))
    models = {"tiny_scott": tiny_scott, "tiny_vit": tiny_vit}
    return {name: jax.jit(model.init)(jax.random.key(0), images) for name, model in models.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_counts_match_the_paper(variant):
    encoder = build_encoder(variant, 224)
    params = abstract_params(encoder, jnp.zeros((1, 224, 224, 3)))
    assert count(params) == PARAM_COUNTS[variant]
    assert "pos_embed" not in str(jax.tree_util.tree_structure(params))


def test_predictor_parameter_count():
    predictor = build_predictor(build_encoder("scott-12/16", 224))
    params = abstract_params(predictor, jnp.zeros((1, 196, 384)))
    assert count(params) == PREDICTOR_DEPTH3_PARAMS
    assert "mask_token" not in params["transformer"]  # never used, so not created


@pytest.mark.parametrize("registers", [0, 2])
def test_predictor_at_queried_tokens_equals_the_full_output_there(registers):
    """`queries` computes only those tokens in the last block and head: the same rows, and
    the same gradients, as the full [B, N, D] output (train mode without dropout)."""
    predictor = build_predictor(
        build_encoder("scott-7/16", 64, embed_dim=32, depth=2, num_heads=2),
        depth=2,
        num_register_tokens=registers,
        dropout_rate=0.0,
        attention_dropout=0.0,
        stochastic_depth_rate=0.0,
    )
    x = jax.random.normal(jax.random.key(0), (3, 16, 32))
    queries = jnp.asarray([[0, 5, 6, 15], [1, 2, 3, 4], [15, 9, 8, 0]])
    params = jax.jit(predictor.init)(jax.random.key(1), x)

    def outputs(params, queries):
        full = predictor.apply(params, x, train=True)
        return jnp.take_along_axis(full, queries[..., None], 1), predictor.apply(
            params, x, train=True, queries=queries
        )

    gathered, queried = jax.jit(outputs)(params, queries)
    assert queried.shape == (3, 4, 32)
    np.testing.assert_allclose(queried, gathered, rtol=1e-5, atol=1e-6)
    grads = jax.jit(
        jax.grad(lambda p, i: jnp.sum(jnp.sin(outputs(p, queries)[i])), argnums=0),
        static_argnums=1,
    )
    chex.assert_trees_all_close(grads(params, 1), grads(params, 0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("img_size", [64, 224])
def test_output_shapes_for_every_variant(variant, img_size):
    encoder = build_encoder(variant, img_size)
    grid = img_size // 16
    images = jnp.zeros((2, img_size, img_size, 3))
    keep_mask = jnp.ones((2, grid * grid), jnp.int32)
    variables = jax.eval_shape(encoder.init, jax.random.key(0), images)
    out = jax.eval_shape(encoder.apply, variables, images, keep_mask)
    assert out.shape == (2, grid * grid, 384)
    predictor = build_predictor(encoder)
    pvars = jax.eval_shape(predictor.init, jax.random.key(0), out)
    assert jax.eval_shape(predictor.apply, pvars, out).shape == out.shape


def test_max_blur_pool_is_the_pascal_blur_of_the_max_pool():
    """`MaxBlurPool2D`: max pool 2x2/1, then depthwise [1,2,1]x[1,2,1]/16 blur, stride 2, pad 1."""
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
    pooled = nn.max_pool(x, (2, 2), strides=(1, 1), padding="VALID")
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    expected = jax.lax.conv_general_dilated(
        pooled,
        jnp.tile(jnp.asarray(kernel, jnp.float32)[:, :, None, None], (1, 1, 1, 3)),
        window_strides=(2, 2),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=3,
    )
    np.testing.assert_allclose(max_blur_pool(x), expected, atol=1e-6)


def test_conv_implementations_agree():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 8))
    xla, im2col = StemConv(12, "xla"), StemConv(12, "im2col")
    params = jax.jit(xla.init)(jax.random.key(1), x)
    out = jax.jit(xla.apply)(params, x)
    assert out.shape == (2, 8, 8, 12)
    np.testing.assert_allclose(jax.jit(im2col.apply)(params, x), out, atol=1e-5)
    with pytest.raises(ValueError, match="unknown conv_impl"):
        StemConv(12, "winograd").init(jax.random.key(1), x)


def test_flat_dense_equals_nn_dense_and_its_weight_gradient_is_one_2d_matmul():
    """linear.Dense has nn.Dense's parameters and numbers; its kernel gradient for a rank-3
    input contracts one flattened axis (the point of it: XLA:CPU transposes and slows the
    gradient's producers for a dot contracting batch and token axes together)."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    ours, flax_dense = Dense(4, name="d"), nn.Dense(4, name="d")
    params = ours.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(params, flax_dense.init(jax.random.key(1), x))

    def grads(module):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), (0, 1))(params, x)

    np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-6)
    chex.assert_trees_all_close(grads(ours), grads(flax_dense), rtol=1e-5, atol=1e-6)
    jaxpr = jax.make_jaxpr(functools.partial(grads, ours))()
    contractions = [
        e.params["dimension_numbers"][0] for e in jaxpr.eqns if e.primitive.name == "dot_general"
    ]
    assert ((0,), (0,)) in contractions
    assert all(len(lhs) == 1 for lhs, _ in contractions), contractions
    with pytest.raises(ValueError, match=r"\[\.\.\., I\] x \[I, O\]"):
        flat_dot_general(x, jnp.ones((5, 4)), (((1,), (0,)), ((), ())))


def test_flat_matmuls_change_no_numbers_and_are_the_cpu_default_only(
    tiny_vit, tiny_variables, batch, monkeypatch
):
    """config.model.flat_matmuls: the encoder's matmuls as 2-D products (True) or XLA's dot
    over [B, N, D] (False) give the same outputs and gradients; None is True on CPU and
    False on accelerators (the trick was measured on XLA:CPU only)."""
    images, keep = batch

    def run(flat, compute=True):
        encoder = tiny_vit.clone(flat_matmuls=flat)

        def loss(params):
            return jnp.sum(jnp.sin(encoder.apply({"params": params}, images, keep)))

        params = tiny_variables["tiny_vit"]["params"]
        ranks = [
            e.invars[0].aval.ndim
            for e in jax.make_jaxpr(jax.grad(loss))(params).eqns
            if e.primitive.name == "dot_general" and not e.params["dimension_numbers"][1][0]
        ]
        return jax.jit(jax.value_and_grad(loss))(params) if compute else None, ranks

    (flat_out, flat_ranks), (plain_out, plain_ranks) = run(True), run(False)
    chex.assert_trees_all_close(flat_out, plain_out, rtol=1e-5, atol=1e-5)
    assert max(flat_ranks) == 2 and max(plain_ranks) == 3
    assert run(None, compute=False)[1] == flat_ranks  # on this CPU
    assert resolve_flat(None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not resolve_flat(None) and resolve_flat(True)


def test_sparse_stem_equals_masked_dense():
    """With max_kept the stem convs run only inside kept patches: the same tokens and
    gradients as the masked-dense stem, also for a row keeping fewer than max_kept; a row
    keeping more than max_kept comes out as NaN, never silently wrong."""
    tokenizer = ScottTokenizer(16, 64, stem_dim=8, conv_impl="im2col")
    images = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))
    keep_mask = random_keep_mask(jax.random.key(1), 3, 16, 7)
    keep_mask = keep_mask.at[2].set(random_keep_mask(jax.random.key(2), 1, 16, 5)[0])
    params = jax.jit(tokenizer.init)(jax.random.key(3), images)

    @functools.partial(jax.jit, static_argnums=1)
    def value_and_grad(params, max_kept):
        def loss(params):
            tokens = tokenizer.apply(params, images, keep_mask, max_kept)
            return jnp.sum(jnp.sin(3.0 * tokens)), tokens

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, dense), dense_grads = value_and_grad(params, None)
    (_, sparse), sparse_grads = value_and_grad(params, 7)
    assert np.abs(dense).max() > 0.1
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(sparse_grads, dense_grads, rtol=1e-4, atol=1e-5)
    overflow = jax.jit(tokenizer.apply, static_argnums=3)(params, images, keep_mask, 6)
    assert np.isnan(overflow[:2]).all() and np.isfinite(overflow[2]).all()


def test_tokenizer_stage_sizes():
    """224 -> 112 -> 111 -> 56 -> 28 -> 27 -> 14 (the official stem); max-blur-pool halves."""
    assert max_blur_pool(jnp.zeros((1, 112, 112, 2))).shape == (1, 56, 56, 2)
    assert max_blur_pool(jnp.zeros((1, 28, 28, 2))).shape == (1, 14, 14, 2)
    tokenizer = ScottTokenizer(embed_dim=8, img_size=224)
    variables = jax.eval_shape(tokenizer.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert variables["params"]["conv_0"]["kernel"].shape == (7, 7, 3, 64)
    assert variables["params"]["conv_1"]["kernel"].shape == (7, 7, 64, 8)


@pytest.mark.parametrize("img_size", [72, 100, 0])
def test_bad_image_size_is_a_clear_error(img_size):
    with pytest.raises(ValueError, match=rf"image size {img_size} .*patch size 16.*grid"):
        build_encoder("scott-7/16", img_size)


def test_wrong_input_shapes_are_clear_errors(tiny_scott, tiny_variables):
    images = jnp.zeros((2, 64, 64, 3))
    variables = tiny_variables["tiny_scott"]
    with pytest.raises(ValueError, match="img_size=64"):
        tiny_scott.apply(variables, jnp.zeros((2, 96, 96, 3)))
    with pytest.raises(ValueError, match=r"keep_mask must have shape \[B, N\] = \[2, 16\]"):
        tiny_scott.apply(variables, images, jnp.ones((2, 15)))


@pytest.mark.parametrize("encoder_cls", [Encoder, ijepa.Encoder])
def test_unknown_tokenizer_and_scott_patch_size_are_clear_errors(encoder_cls):
    images = jnp.zeros((1, 32, 32, 3))
    bad_kind = encoder_cls("conv", 32, depth=1, num_heads=2, embed_dim=8)
    with pytest.raises(ValueError, match=r"unknown tokenizer 'conv'; expected one of"):
        jax.eval_shape(bad_kind.init, jax.random.key(0), images)
    bad_patch = encoder_cls("scott", 32, depth=1, num_heads=2, embed_dim=8, patch_size=8)
    with pytest.raises(ValueError, match="downsamples by 16; patch_size 8 is not supported"):
        jax.eval_shape(bad_patch.init, jax.random.key(0), images)


def test_unknown_variant_and_field():
    with pytest.raises(ValueError, match="unknown variant"):
        build_encoder("scott-5/16", 224)
    with pytest.raises(TypeError, match="unknown encoder fields"):
        build_encoder("scott-7/16", 224, dept=3)


@pytest.mark.parametrize("train,max_kept", [(False, None), (True, None), (True, 7)])
def test_masked_pixels_never_reach_any_output(tiny_scott, tiny_variables, batch, train, max_kept):
    """Any change of the pixels of masked patches leaves every output token unchanged
    (max_kept=7: the sparse stem, which computes the convs only inside kept patches)."""
    images, keep_mask = batch
    variables = tiny_variables["tiny_scott"]
    pixel_keep = jnp.repeat(jnp.repeat(keep_mask.reshape(2, 4, 4), 16, 1), 16, 2)[..., None]
    noise = 100.0 * jax.random.normal(jax.random.key(3), images.shape)
    perturbed = jnp.where(pixel_keep == 1, images, noise)
    assert not np.allclose(perturbed, images)
    rngs = {"dropout": jax.random.key(4), "drop_path": jax.random.key(5)}
    apply = jax.jit(functools.partial(tiny_scott.apply, train=train, max_kept=max_kept, rngs=rngs))
    out = apply(variables, images, keep_mask)
    out_perturbed = apply(variables, perturbed, keep_mask)
    np.testing.assert_array_equal(out, out_perturbed)
    # The same perturbation without a mask does change the output: the test can fail.
    dense = jax.jit(tiny_scott.apply)
    assert not np.allclose(dense(variables, perturbed), dense(variables, images))


def test_masked_tokens_leave_the_tokenizer_as_exact_zeros(tiny_scott, tiny_variables, batch):
    images, keep_mask = batch
    variables = tiny_variables["tiny_scott"]
    apply = jax.jit(functools.partial(tiny_scott.apply, mutable=["intermediates"]))
    _, state = apply(variables, images, keep_mask)
    tokens = np.asarray(state["intermediates"]["tokens"][0])
    masked = np.asarray(keep_mask) == 0
    assert np.all(tokens[masked] == 0.0)
    assert np.all(np.abs(tokens[~masked]).sum(-1) > 0)


@pytest.mark.parametrize("name", ["tiny_scott", "tiny_vit"])
def test_full_keep_mask_equals_no_mask(name, tiny_variables, batch, request):
    encoder = request.getfixturevalue(name)
    images, _ = batch
    variables = tiny_variables[name]
    full = encoder.apply(variables, images, jnp.ones((2, 16), jnp.int32))
    np.testing.assert_array_equal(full, encoder.apply(variables, images))


def test_vit_mask_replaces_tokens_with_the_mask_token(tiny_vit, tiny_variables, batch):
    """ViT: the masked patch content is invisible at token level (no pixel masking needed)."""
    images, keep_mask = batch
    variables = tiny_variables["tiny_vit"]
    pixel_keep = jnp.repeat(jnp.repeat(keep_mask.reshape(2, 4, 4), 16, 1), 16, 2)[..., None]
    perturbed = jnp.where(pixel_keep == 1, images, -images)
    np.testing.assert_array_equal(
        tiny_vit.apply(variables, images, keep_mask),
        tiny_vit.apply(variables, perturbed, keep_mask),
    )


def test_train_mode_is_stochastic_and_eval_is_not(tiny_scott, tiny_variables, batch):
    images, keep_mask = batch
    variables = tiny_variables["tiny_scott"]

    def run(seed):
        rngs = {"dropout": jax.random.key(seed), "drop_path": jax.random.key(seed + 1)}
        return tiny_scott.apply(variables, images, keep_mask, train=True, rngs=rngs)

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(10))
    np.testing.assert_array_equal(
        tiny_scott.apply(variables, images), tiny_scott.apply(variables, images)
    )


def test_position_embedding_puts_the_row_first():
    emb = sincos_pos_embed(16, 3)  # F = 4 frequencies per quarter
    omega = 1.0 / 10000 ** (np.arange(4) / 4)
    r, c = 2, 1
    expected = np.concatenate(
        [np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)]
    )
    np.testing.assert_allclose(emb[r * 3 + c], expected, rtol=1e-6)
    assert emb.dtype == np.float32


def test_swiglu_hidden_dim():
    assert swiglu_hidden_dim(384) == 1024
    assert swiglu_hidden_dim(64) == 128
    assert swiglu_hidden_dim(768) == 2048


def test_init_matches_the_reference_distributions():
    """docs/design.md#initialisation: Kaiming convs, N(0, 0.02) linears, per-block rescale."""
    encoder = build_encoder("scott-3/16", 64)
    params = jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    conv0 = params["tokenizer"]["conv_0"]["kernel"]
    conv1 = params["tokenizer"]["conv_1"]["kernel"]
    np.testing.assert_allclose(conv0.std(), np.sqrt(2 / 147), rtol=0.05)
    np.testing.assert_allclose(conv1.std(), np.sqrt(2 / 3136), rtol=0.02)
    blocks = params["transformer"]
    np.testing.assert_allclose(blocks["block_0"]["attn"]["qkv"]["kernel"].std(), 0.02, rtol=0.02)
    for i in range(3):
        scale = np.sqrt(2 * (i + 1))
        proj = blocks[f"block_{i}"]["attn"]["proj"]["kernel"]
        last = blocks[f"block_{i}"]["ffn"]["last_linear"]["kernel"]
        np.testing.assert_allclose(proj.std(), 0.02 / scale, rtol=0.03)
        np.testing.assert_allclose(last.std(), 0.02 / scale, rtol=0.03)
    assert np.abs(blocks["mask_token"]).max() < 1e-5

    predictor = build_predictor(encoder)
    pparams = jax.jit(predictor.init)(jax.random.key(1), jnp.zeros((1, 16, 384)))["params"]
    for i in range(3):
        double = np.sqrt(2 * (i + 1)) * np.sqrt(2 * (i + 1 + 3))
        proj = pparams["transformer"][f"block_{i}"]["attn"]["proj"]["kernel"]
        np.testing.assert_allclose(proj.std(), 0.02 / double, rtol=0.03)
    single = build_predictor(encoder, double_rescale=False)
    sparams = jax.jit(single.init)(jax.random.key(1), jnp.zeros((1, 16, 384)))["params"]
    proj = sparams["transformer"]["block_0"]["attn"]["proj"]["kernel"]
    np.testing.assert_allclose(proj.std(), 0.02 / np.sqrt(2 * 4), rtol=0.03)
    head = pparams["head"]
    bound = 1 / np.sqrt(384)
    assert np.abs(head["kernel"]).max() <= bound and head["kernel"].max() > 0.9 * bound
    assert np.abs(head["bias"]).max() <= bound and np.abs(head["bias"]).max() > 0.5 * bound


def test_sharded_forward_on_8_devices_equals_single_device(tiny_scott, tiny_variables):
    assert jax.device_count() == 8
    images = jax.random.normal(jax.random.key(1), (8, 64, 64, 3))
    keep_mask = random_keep_mask(jax.random.key(2), 8, 16, 7)
    variables = tiny_variables["tiny_scott"]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    forward = jax.jit(
        lambda v, x, m: tiny_scott.apply(v, x, m),
        in_shardings=(replicated, data, data),
        out_shardings=data,
    )
    sharded = forward(
        jax.device_put(variables, replicated),
        jax.device_put(images, data),
        jax.device_put(keep_mask, data),
    )
    assert len(sharded.sharding.device_set) == 8
    chex.assert_trees_all_close(
        np.asarray(sharded),
        np.asarray(jax.jit(tiny_scott.apply)(variables, images, keep_mask)),
        atol=1e-5,
    )
