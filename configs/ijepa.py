"""I-JEPA's config block (`scott_jax.methods.ijepa`, Assran et al. 2023): multi-block masks,
predictor, loss, WD / EMA schedules and the online monitors. `apply(config)` adds it to a
shared recipe (configs/common.py); the encoder is still `variant` + `model.*` (embed_dim,
depth, num_heads, patch_size, mlp_ratio, conv_impl) with I-JEPA's pre-norm GELU blocks."""

import ml_collections


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.method = "ijepa"
    config.ijepa = ml_collections.ConfigDict()
    config.ijepa.num_targets = 4
    config.ijepa.target_scale = (0.15, 0.2)
    config.ijepa.target_aspect = (0.75, 1.5)
    config.ijepa.context_scale = (0.85, 1.0)
    config.ijepa.context_aspect = (1.0, 1.0)
    config.ijepa.min_keep = 10
    # Quirks of the official collator (`src/masks/multiblock.py`), fixed when False: one
    # uniform for scale and aspect; exclusive corner bound (last row/column never used);
    # raster-order truncation of every context to the batch's shortest.
    config.ijepa.correlated_size = False
    config.ijepa.exclusive_corner = False
    config.ijepa.truncate_context = False
    # Static length of the context token list (padded with attention masks); None = the
    # largest context block, so nothing is dropped. See scott_jax/masking_multiblock.py.
    config.ijepa.max_context_tokens = ml_collections.FieldReference(None, field_type=int)
    config.ijepa.predictor_dim = 384
    config.ijepa.predictor_depth = 6
    config.ijepa.predictor_heads = ml_collections.FieldReference(None, field_type=int)  # encoder's
    config.ijepa.drop_path_rate = 0.0
    config.ijepa.depth_rescale_init = False  # upstream's re-init undoes the rescale (faithful)
    config.ijepa.loss = "smooth_l1"  # official code; "l2" = the paper's
    config.ijepa.wd_schedule = "cosine"  # official code; "linear" = the paper's
    config.ijepa.ema_schedule = "linear_from_zero"  # official code: first update uses ema_start
    config.optim.ema_start = 0.996
    config.optim.ema_final = 1.0

    config.online_probe = False  # monitoring probe on the target features, as MIM-JEPA's
    # Online k-NN of the target and context encoders every this many epochs (0: off).
    config.knn_every_epochs = 0.0
    return config
