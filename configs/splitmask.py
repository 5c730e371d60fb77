"""SplitMask's config block (`scott_jax.methods.splitmask`; El-Nouby et al., "Are Large-scale
Datasets Necessary for Self-Supervised Pre-training?"): split, visual-word targets, decoder,
InfoNCE and BEiT's optimisation. `apply(config)` adds it to a shared recipe
(configs/common.py); the encoder is `variant` + `model.*` (embed_dim, depth, num_heads,
patch_size, mlp_ratio, conv_impl) with pre-norm GELU blocks. Every reading chosen where the
paper is silent is a flag here and a row of docs/deviations.md.
"""

import ml_collections


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.method = "splitmask"
    config.variant = "vit-12/16"  # ViT-S/16 width and depth, the paper's smaller model
    c = config.splitmask = ml_collections.ConfigDict()
    # Split (§4.1, §5.5): 'block' = BEiT block masking at 50 %, A = blocks, B = the rest;
    # 'uniform' = the small-data 75 % uniform masking read as two disjoint 25 % subsets;
    # 'complement' = a 25 % subset and its 75 % complement.
    c.split = "block"
    # Targets (§3.3, Table 2): 'random_projection' (the paper's default, regenerated from
    # the seed), 'random_patches' or 'kmeans' (built from the data, kept in the state).
    c.target = "random_projection"
    c.vocab_size = 8192
    c.vocab_dist = "uniform"  # u ~ U[0, 1)^d, normalised; 'symmetric': U[-1, 1)^d
    c.token_pixels = "unit"  # the tokenizer reads [0, 1] pixels; 'normalized': the input
    c.kmeans_patches = 3_000_000  # the paper's sample (all patches if the data has fewer)
    c.kmeans_iters = 20
    # Decoder (§5.5): 2 blocks of the encoder's width; heads None = the encoder's.
    c.decoder_depth = 2
    c.decoder_heads = ml_collections.FieldReference(None, field_type=int)
    c.decoder_pos = "encoder"  # mask embedding + the encoder's pos-embed; 'mae': its own table
    c.pos_embed = "learned"  # original ViT; 'sincos' = SCOTT's fixed table
    c.depth_rescale_init = True  # BEiT's init
    c.drop_path_rate = 0.1  # BEiT
    # Losses (§4.2-4.3): CE over the predicted words + symmetric InfoNCE of the branches'
    # mean decoder outputs ('all' N positions; 'visible': the branch's own), cosine, tau 0.2,
    # the other branch's other images as negatives ('simclr': also the same branch's).
    c.descriptor = "all"
    c.tau = 0.2
    c.negatives = "other_branch"
    c.mim_weight = 1.0
    c.nce_weight = 1.0
    # Optimisation (BEiT's recipe, which the paper follows): LR linear from 0 at the first
    # update to the peak over the warmup, cosine to 1e-5; WD 0.05 constant; clip 3.0.
    c.lr_schedule = "beit"
    c.clip_grad = 3.0
    config.optim.lr_warmup_epochs = 10.0
    config.optim.lr_start = 0.0
    config.optim.lr_peak = 1.5e-3
    config.optim.lr_final = 1e-5
    config.optim.lr_flat_pctg = 0.0
    config.optim.wd_start = 0.05
    config.optim.wd_final = 0.05
    config.data.aug = "none"  # random resized crop + flip only (§5.5)
    config.data.crop_scale = (0.08, 1.0)

    config.online_probe = False  # no target encoder to monitor
    # Online k-NN of the encoder every this many epochs (0: off; needs labels).
    config.knn_every_epochs = 0.0
    return config
