"""The recipe every method shares (paper Appendix D): model, data, optimizer, run settings.

Not a runnable config by itself: it has no method and no dataset. A method block
(configs/mim_jepa.py, ijepa.py, supervised.py) adds the method's own fields and a dataset
file sets the data. Durations are in epochs, turned into steps in one place
(`scott_jax.optim.run_lengths`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = "scott-12/16"
    config.img_size = 224
    config.batch_size = 128  # the paper's; the official yaml uses 64
    config.num_epochs = 300
    config.seed = 47

    # Overrides of the variant's encoder fields (scott_jax.models.Encoder); None keeps the
    # variant's value. Regularisation defaults are the official config's.
    config.model = ml_collections.ConfigDict()
    config.model.embed_dim = ml_collections.FieldReference(None, field_type=int)
    config.model.depth = ml_collections.FieldReference(None, field_type=int)
    config.model.num_heads = ml_collections.FieldReference(None, field_type=int)
    config.model.ffn_layer = "swiglu"
    config.model.mlp_ratio = 4.0
    config.model.dropout_rate = 0.2
    config.model.attention_dropout = 0.1
    config.model.stochastic_depth_rate = 0.1
    config.model.num_register_tokens = 0
    config.model.conv_impl = "auto"  # im2col on CPU, XLA/cuDNN conv on accelerators
    config.model.remat = False  # gradient checkpointing of the SCOTT stem and encoder blocks
    # Dropout from 16-bit uniforms, four per Threefry call (drop probability within 7.6e-6
    # of the rate); False: flax's nn.Dropout semantics (float uniforms, ~2x the bits' cost on
    # CPU). None: True on CPU, where it was measured faster, False on accelerators.
    config.model.fast_dropout = ml_collections.FieldReference(None, field_type=bool)
    # The encoder's and predictor's matmuls as one 2-D [B·N, D] x [D, O] product (measured
    # ~12 % faster on CPU; same numbers); False: XLA's dot over [B, N, D]. None: True on CPU
    # only (scott_jax.models.linear).
    config.model.flat_matmuls = ml_collections.FieldReference(None, field_type=bool)

    config.data = ml_collections.ConfigDict()
    config.data.name = ""
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    # Pretraining split: 'full' (the paper's), or the data-scaling ablation's 'trainval' /
    # 'train'; for folder:<path> datasets also a '+'-joined list of split folders.
    config.data.pretrain_split = "full"
    config.data.aug = "none"
    # True: the pipeline yields the uint8 crop only and the step colours and normalises both
    # views on the accelerator (scott_jax.data.device_augment), halving the host CPU per image
    # (MIM-JEPA). None: on for MIM-JEPA on a GPU / TPU, off on CPU (where the device is the
    # host) and for the other methods, whose views are made on the host.
    config.data.color_on_device = ml_collections.FieldReference(None, field_type=bool)
    config.data.crop_scale = (0.2, 1.0)
    # Where the pretraining images are kept (scott_jax.data.device_cache, docs/data.md):
    # 'none' streams, decoding every image every epoch on the host; 'device' decodes once and
    # keeps them in device memory, the step cropping, resizing and colouring both views (the
    # host only sends indices); 'auto': 'device' on a GPU / TPU when the set fits the budget,
    # else 'none' (on a CPU streaming is as fast: the device is the host).
    config.data.cache = "auto"
    # The cached images' shorter side in px (larger images are shrunk); None: 1.5 x img_size.
    config.data.cache_size = ml_collections.FieldReference(None, field_type=int)
    # The most device memory (GiB, per device: the cache is replicated) the cache may take,
    # and never over half the device's memory.
    config.data.cache_max_gb = 16.0
    # Resuming on a dataset whose size changed since the checkpoint is an error unless True.
    config.data.accept_changed_dataset = False

    config.optim = ml_collections.ConfigDict()
    config.optim.lr_warmup_epochs = 40.0
    config.optim.lr_start = 1e-6
    config.optim.lr_peak = 5e-4
    config.optim.lr_final = 1e-5
    config.optim.lr_flat_pctg = 0.72
    config.optim.wd_start = 0.04
    config.optim.wd_final = 0.4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8

    config.compute_dtype = "float32"  # or "bfloat16"; params and optimizer state stay float32
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.log_every_steps = 50
    # An exclusive OS lock on the workdir while the run lives (False only on a filesystem
    # without file locks, where nothing else may use the workdir).
    config.lock_workdir = True
    # A damaged latest checkpoint: resume from the newest intact one (False: stop instead).
    config.checkpoint_fallback = True
    # Resuming with a config that differs from WORKDIR/config.json (in more than logging and
    # saving intervals) is an error listing the differences, unless True.
    config.accept_config_changes = False
    return config
