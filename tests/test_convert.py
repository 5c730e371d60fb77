"""Official checkpoint import: parity with the reference's numbers, and loud errors."""

from pathlib import Path

import numpy as np
import pytest
from parity import parity_errors, split_group

from scott_jax.convert import from_torch

FIXTURE = Path(__file__).parent / "fixtures" / "parity.npz"
MODELS = ("scott", "vit", "scott_mlp_reg")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def group(fixture, model):
    prefix = f"{model}/"
    return {k[len(prefix) :]: v for k, v in fixture.items() if k.startswith(prefix)}


@pytest.mark.parametrize("model", MODELS)
def test_converted_weights_reproduce_the_reference(fixture, model):
    errors = parity_errors(group(fixture, model), fixture["images"], fixture["keep_mask"])
    assert set(errors) == {
        "tokens_masked",
        "tokens_dense",
        "encoder_masked",
        "encoder_dense",
        "predictor",
        "loss",
    }
    assert max(errors.values()) <= TOLERANCE, errors


def encoder_inputs(fixture, model="scott"):
    arch, encoder_sd, _, _ = split_group(group(fixture, model))
    arch.pop("predictor_depth")
    return arch, encoder_sd


def test_unknown_missing_and_misshaped_keys_are_listed(fixture):
    arch, sd = encoder_inputs(fixture)
    broken = dict(sd)
    broken["transformer.blocks.0.extra.weight"] = np.zeros(3)
    del broken["transformer.blocks.1.self_attn.qkv.weight"]
    broken["tokenizer.tokenizer.0.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as err:
        from_torch(broken, "encoder", **arch)
    message = str(err.value)
    assert "unknown keys ['transformer.blocks.0.extra.weight']" in message
    assert "transformer/block_1/attn/qkv/kernel" in message
    assert "tokenizer.tokenizer.0.weight has shape (5, 5, 3, 64), expected (7, 7, 3, 64)" in message


def test_architecture_mismatch_is_an_error(fixture):
    arch, sd = encoder_inputs(fixture)
    with pytest.raises(ValueError, match=r"unknown keys .*transformer\.blocks\.1\."):
        from_torch(sd, "encoder", **{**arch, "depth": 1})  # an extra block in the file
    with pytest.raises(ValueError, match="pos_embed"):
        from_torch(sd, "encoder", **{**arch, "img_size": 96})
    with pytest.raises(TypeError, match="unknown architecture arguments"):
        from_torch(sd, "encoder", **arch, embed=64)
    with pytest.raises(ValueError, match="unknown kind"):
        from_torch(sd, "decoder", **arch)


def test_a_different_position_embedding_is_rejected(fixture):
    arch, sd = encoder_inputs(fixture)
    swapped = dict(sd)
    pos = sd["transformer.pos_embed"]
    half = pos.shape[1] // 2
    swapped["transformer.pos_embed"] = np.concatenate([pos[:, half:], pos[:, :half]], 1)
    with pytest.raises(ValueError, match="row half first"):
        from_torch(swapped, "encoder", **arch)


def test_pth_file_round_trip(fixture, tmp_path):
    torch = pytest.importorskip("torch")
    arch, sd = encoder_inputs(fixture)
    path = tmp_path / "context-encoder_checkpoint.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    _, from_file = from_torch(path, "encoder", **arch)
    _, from_dict = from_torch(sd, "encoder", **arch)
    np.testing.assert_array_equal(
        from_file["transformer"]["mask_token"], from_dict["transformer"]["mask_token"]
    )


def test_missing_checkpoint_file(fixture):
    arch, _ = encoder_inputs(fixture)
    with pytest.raises(FileNotFoundError, match=r"no_such\.pth"):
        from_torch("no_such.pth", "encoder", **arch)
