"""SplitMask pretraining on Oxford Flowers-102, "full" split (8,189 images).

    python launch.py --config configs/flowers_splitmask.py --workdir runs/flowers_splitmask
    python launch.py --config configs/flowers_splitmask.py --config.variant=scott-12/16 ...

Encoder: ViT-12/16 at 224 px, width 384, 6 heads (ViT-S/16, the paper's smaller model), no
[CLS]; decoder 2 blocks of width 384; 8192 random-projection words of 8x8x3 half-resolution
patches. `--config.variant=scott-12/16` swaps in the SCOTT tokenizer (keep-mask path).

Flowers is the size of Stanford Cars (8,144), so the paper's small-data setting (§5.5): 75 %
uniform masking (two disjoint 25 % subsets) and extra colour augmentation, here SCOTT's
colour recipe on the one view (`data.aug='same'`: jitter, greyscale, blur; the paper gives no
strengths). Batch 128 for 300 epochs (63 steps/epoch, 18,900 steps, close to the paper's
15,000 updates on Cars); BEiT's recipe with the LR scaled linearly from 1.5e-3 at batch 2048:
9.375e-5, 10 warmup epochs from 0, cosine to 1e-5, WD 0.05, clip 3.0, drop path 0.1; crops of
scale (0.08, 1). Expected time on one GPU: not measured.
"""

from configs import common, flowers, splitmask


def get_config():
    config = splitmask.apply(flowers.dataset(common.get_config()))
    config.variant = "vit-12/16"
    config.batch_size = 128
    config.num_epochs = 300
    config.splitmask.split = "uniform"
    config.data.aug = "same"
    config.optim.lr_peak = 1.5e-3 * 128 / 2048
    config.optim.lr_warmup_epochs = 10.0
    return config
