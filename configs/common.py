"""Shared MIM-JEPA recipe (SPEC §3.6, paper Appendix D); dataset configs import and override it.

Not a runnable config by itself: it has no dataset. Durations are in epochs and turned into
steps in one place (`scott_jax.train.schedule_lengths`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.method = "mim_jepa"  # or "ijepa" (SPEC §9; settings in config.ijepa below)
    config.variant = "scott-12/16"
    config.img_size = 224
    config.batch_size = 128  # the paper's; the reference yaml uses 64
    config.num_epochs = 300
    config.seed = 47

    # Overrides of the variant's encoder fields (scott_jax.models.Encoder); None keeps the
    # variant's value. Regularisation defaults are the reference's.
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
    # of the rate); False: flax's nn.Dropout semantics (float uniforms, ~2x the bits' cost).
    config.model.fast_dropout = True

    config.predictor = ml_collections.ConfigDict()
    config.predictor.depth = 3
    config.predictor.double_rescale = True  # faithful (SPEC §10.4)

    config.data = ml_collections.ConfigDict()
    config.data.name = ""
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    # Pretraining split: 'full' (the paper's), or the data-scaling ablation's 'trainval' /
    # 'train'; for folder:<path> datasets also a '+'-joined list of split folders.
    config.data.pretrain_split = "full"
    config.data.aug = "none"
    # True: the pipeline yields the uint8 crop only and the step colours and normalises both
    # views on the accelerator (scott_jax.data.device_augment), halving the host CPU per image.
    config.data.color_on_device = False
    config.data.crop_scale = (0.2, 1.0)

    config.mask = ml_collections.ConfigDict()
    config.mask.type = "blockwise"
    config.mask.ratio = 0.6
    config.mask.blocks_are = "kept"  # faithful (SPEC §10.1); 'masked' = the paper's reading

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
    config.optim.ema_start = 0.996
    config.optim.ema_final = 1.0

    # I-JEPA (config.method = "ijepa", SPEC §9); used only by that method. The encoder is
    # still `variant` + `model.*` (embed_dim, depth, num_heads, mlp_ratio, conv_impl), with
    # I-JEPA's pre-norm GELU blocks; config.predictor and config.mask are MIM-JEPA's.
    config.ijepa = ml_collections.ConfigDict()
    config.ijepa.num_targets = 4
    config.ijepa.target_scale = (0.15, 0.2)
    config.ijepa.target_aspect = (0.75, 1.5)
    config.ijepa.context_scale = (0.85, 1.0)
    config.ijepa.context_aspect = (1.0, 1.0)
    config.ijepa.min_keep = 10
    # Upstream collator quirks (SPEC §10.25), fixed when False: one uniform for scale and
    # aspect; exclusive corner bound (last row/column never used); raster-order truncation
    # of every context to the batch's shortest.
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

    config.compute_dtype = "float32"  # or "bfloat16"; params and optimizer state stay float32
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.log_every_steps = 50
    config.online_probe = False  # SPEC §6.7 monitoring probe on target features
    # Online k-NN (cosine, k=20) of the target and context encoders' pooled features,
    # probe_train -> test, every this many epochs and at the end (0: off; needs labels).
    config.knn_every_epochs = 0.0
    return config
