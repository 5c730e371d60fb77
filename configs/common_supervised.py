"""Shared supervised-baseline fields; the `*_supervised.py` configs apply them to a dataset's
pretraining config, so the architecture, image size, batch size and augmentations stay the
pretraining run's (SPEC §8.5 "from scratch" rows; `scott_jax.supervised`).

Not a runnable config by itself: `supervised(config)` turns a pretraining config into one.
"""

import ml_collections


def supervised(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The pretraining `config` with method 'supervised' and the baseline's own fields."""
    config.method = "supervised"
    config.num_epochs = 300
    # The classification head on the encoder's LayerNorm'd patch features, trained jointly:
    # one of scott_jax.models.probes.PROBES ('linear', 'cross', 'simple', 'multi').
    config.head = "linear"
    # Few-label runs: keep this many probe_train examples of each class (None: all of them).
    config.labels_per_class = ml_collections.FieldReference(None, field_type=int)
    config.label_smoothing = 0.0
    # 'holdout': the epoch with the best probe_select top-1; 'last': the last epoch.
    config.selection = "holdout"
    config.eval_every_epochs = 5
    config.output_dir = "supervised"  # results.json, relative to the workdir
    # Pretraining-only fields: no masks, predictor, EMA target or online probe here.
    for name in ("mask", "predictor", "online_probe", "knn_every_epochs", "ijepa"):
        if name in config:
            del config[name]
    del config.optim["ema_start"], config.optim["ema_final"]
    return config
