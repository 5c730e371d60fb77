"""MIM-JEPA's config block (`scott_jax.methods.mim_jepa`): predictor, keep-masks, EMA and the
online monitors. `apply(config)` adds it to a shared recipe (configs/common.py)."""

import ml_collections


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.method = "mim_jepa"

    config.predictor = ml_collections.ConfigDict()
    config.predictor.depth = 3
    # The official predictor rescales its blocks' init twice (official
    # `src/models/predictor.py`); False: only the depth-offset rescale.
    config.predictor.double_rescale = True

    config.mask = ml_collections.ConfigDict()
    config.mask.type = "blockwise"
    config.mask.ratio = 0.6
    # The official masks sample the BEiT blocks as the *kept* region ('kept', faithful);
    # 'masked' is the paper's reading. See docs/deviations.md.
    config.mask.blocks_are = "kept"

    # EMA momentum of the target encoder, linear from ema_start to ema_final (official).
    config.optim.ema_start = 0.996
    config.optim.ema_final = 1.0

    # The official online monitoring probe on the target features (its accuracy is a
    # monitor only: on the "full" splits it trains on test labels).
    config.online_probe = False
    # Online k-NN (cosine, k=20) of the target and context encoders' pooled features,
    # probe_train -> test, every this many epochs and at the end (0: off; needs labels).
    config.knn_every_epochs = 0.0
    return config
