"""Offline SplitMask on scikit-learn's 1,797 hand-written digits (no download).

    python launch.py --config configs/digits_splitmask.py --workdir runs/digits_splitmask

A ViT at 64 px with 8 px patches (an 8x8 grid, so each 25 % subset holds 16 tokens), depth 3,
width 128, 4 heads, decoder 2 blocks; 512 random-projection words of 4x4x3 half-resolution
pixels. Digits is a small dataset, so the paper's small-data split: 75 % uniform masking, two
disjoint 25 % subsets. Batch 64 for 10 epochs (280 steps), LR 5e-4 (the other digits
configs'), BEiT's schedule with a 1-epoch warmup: 4.6 minutes of CPU time on a 2-core Intel
Xeon (13 minutes wall while shared with other jobs). Probe numbers: docs/results.md.
"""

from configs import common, digits, splitmask


def get_config():
    config = splitmask.apply(digits.dataset(common.get_config()))
    config.variant = "vit-7/16"
    config.model.depth = 3
    config.model.patch_size = 8
    config.splitmask.split = "uniform"
    config.splitmask.vocab_size = 512
    config.num_epochs = 10
    config.optim.lr_warmup_epochs = 1.0
    config.optim.lr_peak = 5e-4
    config.data.crop_scale = (0.6, 1.0)  # digits.py's: a 0.08 crop of an 8x8 digit is blank
    config.knn_every_epochs = 5.0
    return config
