"""MOCA's config block (`scott_jax.methods.moca`; Gidaris et al., TMLR 2024): encoder extras,
condenser decoder, codebook, masking rounds, losses and the released optimisation recipe
(valeoai/MOCA README v1.0 command, `main_pretrain.py`). `apply(config)` adds it to a shared
recipe (configs/common.py). The encoder is `variant` + `model.*` (embed_dim, depth, num_heads,
patch_size, mlp_ratio, conv_impl) with timm's pre-norm GELU blocks; the paper's is the ViT
tokenizer, a `scott-*` variant swaps in the SCOTT stem. Flags that restore the paper where the
code differs are listed in docs/deviations.md#moca.
"""

import ml_collections


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.method = "moca"
    config.variant = "vit-12/16"
    config.moca = m = ml_collections.ConfigDict()
    m.cls_token = True  # in attention, read by no loss (kept as the code)
    # ℓ, the 1-based block whose raw tokens feed the decoder; None: round(2·depth/3), the
    # paper's 8 of 12 (code `--early_layer 4`).
    m.intermediate_layer = ml_collections.FieldReference(None, field_type=int)
    m.decoder_dim = 384  # ViT-B: 512 (paper Tab. 11); 384 / 6 heads is the MOCA class default
    m.decoder_depth = 2
    m.decoder_heads = 6
    m.pred_mlp_ratio = 2.0  # generator hidden width = 2·D
    m.kappa = 3.0  # student logit scale κ = 1/τ (`--kappa`)
    m.inv_delta = 10.0  # teacher scale: softmax((10 / μ̄)·cosine) (`--inv_delta`)
    m.num_words = 4096  # codebook size K
    m.num_new_words = 4  # per step, from the global batch (paper; code: 32 / world size)
    m.bow_border = 2  # rows / columns left out of the bag of words and of the new words
    m.mask_ratio = (0.55, 0.75)  # two rounds
    m.dec_mask_ratio = (0.35, 0.55)  # decoded = visible + 20 % of N masked tokens
    m.complementary = True  # code: round 2 avoids round 1's decoded tokens; False: independent
    m.loc_loss_on = "all"  # code: every decoded token; 'masked': only the masked ones
    m.img_weight = 0.5
    m.loc_weight = 0.5
    m.lr_epochs_mul = 1.25  # the LR cosine reaches 0 at int(1.25·E) epochs, stopped at E
    m.lr_wgen = 1e-4  # the generators' constant LR (absolute) ...
    m.wd_wgen = 0.05  # ... and WD
    m.clip_grad = 0.1  # global gradient norm
    # The student's forward and backward pass in this many equal parts of the batch, one at a
    # time, gradients summed: same numbers, 1/k of its activation memory (docs/performance.md).
    m.grad_chunks = 1

    # Released v1.0 command; the paper (v0.9): wd_final 0.05, ema_start 0.99.
    o = config.optim
    o.lr_start, o.lr_final, o.lr_flat_pctg = 0.0, 0.0, 0.0
    o.lr_peak = 1.5e-4 * config.batch_size / 256  # base LR 1.5e-4 per 256 images
    o.lr_warmup_epochs = 30.0 * config.num_epochs / 200  # 30 of 200 epochs
    o.wd_start, o.wd_final = 0.05, 0.2
    o.ema_start, o.ema_final = 0.994, 1.0
    config.data.aug = "moca"  # two crops, BYOL's colour / blur / solarize recipe

    config.online_probe = False  # monitoring probe on the teacher's features
    config.knn_every_epochs = 0.0  # online k-NN of the teacher and the student (0: off)
    return config
