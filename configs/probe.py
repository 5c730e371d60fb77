"""Frozen-feature probes on a pretraining run (paper Appendix E; `scott_jax.evaluators.probes`).

    python probe.py --workdir runs/digits
    python probe.py --workdir runs/flowers --config.encoder=target
    python probe.py --workdir runs/digits --config.encoder=random   # random-init baseline
    python probe.py --workdir runs/flowers --config.selection=reference --config.output_dir=ref

The reference's recipe (`configs/eval/classifier.yaml`): 100 epochs, warmup 20, lr 1e-6 ->
5e-4 -> 1e-5 with 72 % flat, wd 0.04 -> 0.4, seed 47, the run's batch size, and the run's
training transform for the probes' data. Fields set to None take the run's value (from the
config saved with its checkpoint). Results go to WORKDIR/<output_dir>/results.json.

Expected: on the digits run (configs/digits.py), minutes on a CPU. On Flowers-102 with
SCOTT-12/16 the paper reports 97.15 (attentive, reference selection) / 94.81 (linear) top-1.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Which weights of the checkpoint `step` (None: the latest): one of the run's method's
    # encoders (None: its default; MIM-JEPA, I-JEPA: 'context', as the official evaluation,
    # or the EMA 'target'), or 'random': the run's architecture with its initial weights
    # (step 0), the random-init baseline.
    config.encoder = ml_collections.FieldReference(None, field_type=str)
    config.step = ml_collections.FieldReference(None, field_type=int)
    config.compute_dtype = ml_collections.FieldReference(None, field_type=str)  # None: the run's

    # Data. dataset / data_dir None: the run's. labels_per_class keeps that many probe_train
    # examples per class (few-label probes; honest selection rules only).
    config.dataset = ml_collections.FieldReference(None, field_type=str)
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.labels_per_class = ml_collections.FieldReference(None, field_type=int)
    # augment: the probes train on one view of the pretraining transform, RandomResizedCrop
    # (crop_scale) + flip + colour augmentation `aug`, with features computed in the step
    # (the official evaluation, `src/eval.py`); False: on eval-transform images, whose
    # features are cached.
    config.augment = True
    config.aug = ml_collections.FieldReference(None, field_type=str)  # None: the run's
    config.crop_scale = ml_collections.FieldReference(None, field_type=tuple)  # None: the run's

    config.probes = ("linear", "cross", "simple", "multi")
    config.num_epochs = 100
    config.batch_size = ml_collections.FieldReference(None, field_type=int)  # None: the run's
    config.eval_batch_size = ml_collections.FieldReference(None, field_type=int)
    config.seed = 47

    # Model selection: 'holdout' (on probe_select, held out from the probes' training data),
    # 'last', or 'reference' (the official protocol: selects on test, which leaks; see
    # docs/deviations.md).
    config.selection = "holdout"
    config.use_probe_select = True  # False: no held-out split; 'holdout' reports the last epoch
    config.eval_every_epochs = 1

    config.optim = ml_collections.ConfigDict()
    config.optim.lr_warmup_epochs = 20.0
    config.optim.lr_start = 1e-6
    config.optim.lr_peak = 5e-4
    config.optim.lr_final = 1e-5
    config.optim.lr_flat_pctg = 0.72
    config.optim.wd_start = 0.04
    config.optim.wd_final = 0.4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8

    # k-NN on mean-pooled features (cosine, exp(sim / T) weighted votes, as DINO).
    config.knn = ml_collections.ConfigDict()
    config.knn.k = 20
    config.knn.temperature = 0.07

    # Relative to the workdir; None: 'probe', or 'probe_random' for encoder='random'.
    config.output_dir = ml_collections.FieldReference(None, field_type=str)
    return config
