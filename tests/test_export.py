"""Weights out: the official state_dict round trip, the files each format writes, the
features API and the command line."""

import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from parity import split_group
from test_convert import FIXTURE, MODELS, group

from scott_jax import convert, export
from scott_jax.errors import ConfigError
from scott_jax.evaluators.features import extract_features

ROOT = Path(__file__).parents[1]
V0_RUNS = Path(__file__).parent / "fixtures" / "v0_run"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("model", MODELS)
def test_to_torch_gives_back_the_official_state_dicts(fixture, model):
    """from_torch then to_torch reproduces every official key and value exactly, so the
    official modules load our export with strict=True and compute the fixture's outputs."""
    arch, encoder_sd, predictor_sd, _ = split_group(group(fixture, model))
    depth = arch.pop("predictor_depth")
    predictor_arch = {**arch, "depth": depth, "backbone_depth": arch["depth"]}
    for kind, official, kind_arch in (
        ("encoder", encoder_sd, arch),
        ("predictor", predictor_sd, predictor_arch),
    ):
        module, params = convert.from_torch(official, kind, **kind_arch)
        exported = convert.to_torch(params, module)
        assert sorted(exported) == sorted(official), kind
        for key, value in official.items():
            if key == "transformer.msk_embed" and kind == "predictor":
                assert exported[key].shape == value.shape  # never used: exported as zeros
                continue
            atol = 1e-6 if key.endswith("pos_embed") else 0  # a constant recomputed here
            np.testing.assert_allclose(exported[key], value, rtol=0, atol=atol, err_msg=key)


def test_torch_files_load_as_the_official_state_dict(fixture, tmp_path):
    torch = pytest.importorskip("torch")
    arch, encoder_sd, _, _ = split_group(group(fixture, "scott"))
    arch.pop("predictor_depth")
    module, params = convert.from_torch(encoder_sd, "encoder", **arch)
    export.write(convert.to_torch(params, module), str(tmp_path / "encoder.pth"), "torch")
    loaded = torch.load(tmp_path / "encoder.pth", weights_only=True)
    assert sorted(loaded) == sorted(encoder_sd)
    back_module, back = convert.from_torch(str(tmp_path / "encoder.pth"), "encoder", **arch)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert back_module == module


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_npz_and_safetensors_hold_every_parameter(fmt, tmp_path):
    backbone = export.load_encoder(V0_RUNS / "digits", "target")
    arrays = export.state_dicts(backbone, fmt, predictor_of=V0_RUNS / "digits")
    for name, state in arrays.items():
        path = tmp_path / f"{name}.{fmt}"
        export.write(state, str(path), fmt)
        if fmt == "npz":
            with np.load(path) as data:
                read = {k: data[k] for k in data.files}
        else:
            from safetensors.numpy import load_file

            read = load_file(str(path))
        assert sorted(read) == sorted(state) and len(read) > 5
        for key in state:
            np.testing.assert_array_equal(read[key], state[key])
    leaves = jax.tree.leaves(backbone.params)
    assert len(arrays["encoder"]) == len(leaves)


def test_embed_gives_the_frozen_features_the_probes_see():
    from scott_jax.data import eval_batches, load_source

    backbone = export.load_encoder(V0_RUNS / "digits")
    source = load_source("digits", "test")
    images = source.images[:8]
    out = export.embed(backbone, images, batch_size=3)
    assert out["patches"].shape == (8, 16, 32) and out["pooled"].shape == (8, 32)
    batches = eval_batches(source, batch_size=8, img_size=64)
    features, _ = extract_features(backbone.encoder, backbone.params, [next(batches)])
    np.testing.assert_allclose(out["pooled"], features[:8], atol=1e-4)
    assert np.abs(out["pooled"][0] - out["pooled"][1]).max() > 1e-3
    with pytest.raises(ValueError, match="uint8"):
        export.embed(backbone, images.astype(np.float32))


def test_an_ijepa_encoder_has_no_official_torch_layout():
    backbone = export.load_encoder(V0_RUNS / "digits_ijepa")
    with pytest.raises(ConfigError, match="no official PyTorch layout"):
        export.state_dicts(backbone, "torch")


def test_the_command_line_writes_the_files(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(V0_RUNS / "digits", workdir)
    command = [sys.executable, "-m", "scott_jax.export", "--workdir", str(workdir)]
    done = subprocess.run(
        [*command, "--format", "npz", "--predictor"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in workdir.glob("*.npz")) == [
        "context-encoder_step2-predictor.npz",
        "context-encoder_step2.npz",
    ]
    bad = subprocess.run(
        [*command, "--encoder", "predictor"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "error: a mim_jepa run has no 'predictor' encoder" in bad.stderr
