"""Offline MOCA on scikit-learn's 1,797 hand-written digits (no download), on 2 CPU cores in
minutes.

    python launch.py --config configs/digits_moca.py --workdir runs/digits_moca

96 px with 16 px patches, a 6x6 grid (the bag of words keeps the 2x2 interior; at 64 px a
4x4 grid would have none): a ViT shrunk to depth 3, width 128, 4 heads (as digits_ijepa.py),
ℓ = 2, decoder width 128 / depth 1, a 256-word codebook (the queue spans 64 steps). Masks:
16 / 9 visible and 23 / 16 decoded of 36 tokens. Digits' batch (64) for 10 epochs (280
steps, warmup 1 epoch) with MOCA's recipe otherwise; the LR peak is the other digits
configs' 5e-4.
"""

from configs import common, digits, moca


def get_config():
    config = moca.apply(digits.dataset(common.get_config()))
    config.variant = "vit-7/16"
    config.img_size = 96
    config.model.depth = 3
    config.moca.decoder_dim = 128
    config.moca.decoder_depth = 1
    config.moca.decoder_heads = 4
    config.moca.num_words = 256
    config.optim.lr_peak = 5e-4
    config.num_epochs = 10
    config.optim.lr_warmup_epochs = 1.0
    config.knn_every_epochs = 5.0
    return config
