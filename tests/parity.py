"""Runs scott_jax on converted official weights and measures the gap to the reference outputs.

Shared by `test_convert.py` (tiny fixture, in CI) and `fixtures/check_full_parity.py`
(full-size models, run by hand against an official checkout with torch installed).
"""

import json
from collections.abc import Mapping

import numpy as np

from scott_jax.convert import from_torch
from scott_jax.objectives import masked_smooth_l1, target_features


def split_group(group: Mapping[str, np.ndarray]) -> tuple[dict, dict, dict, dict]:
    """Fixture entries (`arch`, `encoder/*`, `predictor/*`, `out/*`) -> four dicts."""
    arch = json.loads(str(group["arch"]))
    parts = {"encoder": {}, "predictor": {}, "out": {}}
    for key, value in group.items():
        head, _, rest = key.partition("/")
        if head in parts:
            parts[head][rest] = value
    return arch, parts["encoder"], parts["predictor"], parts["out"]


def parity_errors(group: Mapping[str, np.ndarray], images, keep_mask) -> dict[str, float]:
    """Max abs error of every reference output (loss: abs error) for one model pair."""
    arch, encoder_sd, predictor_sd, expected = split_group(group)
    predictor_depth = arch.pop("predictor_depth")
    encoder, encoder_params = from_torch(encoder_sd, "encoder", **arch)
    predictor, predictor_params = from_torch(
        predictor_sd,
        "predictor",
        **{**arch, "depth": predictor_depth, "backbone_depth": arch["depth"]},
    )
    ours = {}
    for name, mask in (("masked", keep_mask), ("dense", None)):
        out, state = encoder.apply(
            {"params": encoder_params}, images, mask, mutable=["intermediates"]
        )
        ours[f"encoder_{name}"] = out
        ours[f"tokens_{name}"] = state["intermediates"]["tokens"][0]
    # The predictor is fed the *reference* context features, so its error is its own.
    ours["predictor"] = predictor.apply({"params": predictor_params}, expected["encoder_masked"])
    ours["loss"] = masked_smooth_l1(
        ours["predictor"], target_features(ours["encoder_dense"]), keep_mask
    )
    return {k: float(np.max(np.abs(np.asarray(v) - expected[k]))) for k, v in ours.items()}
