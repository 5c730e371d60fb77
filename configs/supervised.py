"""The supervised baseline's config block (`scott_jax.methods.supervised`, the paper's "from
scratch" rows). `apply(config)` adds it to a dataset's shared recipe, so the architecture,
image size, batch size and augmentations are those of the dataset's pretraining runs."""

import ml_collections


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
    return config
