"""MOCA pretraining on Oxford Flowers-102, "full" split (8,189 images). MOCA itself pretrains
only on ImageNet-1k; this small-data recipe is ours (docs/deviations.md#moca).

    python launch.py --config configs/flowers_moca.py --workdir runs/flowers_moca
    python launch.py --config configs/flowers_moca.py --config.variant=scott-12/16 ...

ViT-12/16 (ViT-S/16 size: width 384, 6 heads) at 224 px, ℓ = 8, decoder 384 / 2 blocks /
6 heads, K = 4096 words, 4 new words per step (the queue covers ~16 epochs). Batch 128,
300 epochs (63 steps / epoch, 18,900 steps), warmup 45 epochs (the paper's 30 of 200), LR
1.5e-4 · 128/256 = 7.5e-5 (the code's linear rule) with the cosine stretched to 375 epochs,
generators at 1e-4; WD 0.05 -> 0.2 and EMA 0.994 -> 1 (released v1.0); clip 0.1. Two crops
with BYOL's colour recipe (`data.aug='moca'`). The student's pass runs in 4 parts of 32
images (`moca.grad_chunks`, same gradients), so the step fits a 24 GB GPU in float32: XLA
puts it at 8.4 GiB, 31.2 GiB in one pass (docs/performance.md).
"""

from configs import common, flowers, moca


def get_config():
    config = moca.apply(flowers.dataset(common.get_config()))
    config.data.aug = "moca"  # flowers.dataset sets MIM-JEPA's 'diff'
    config.data.crop_scale = (0.2, 1.0)
    config.moca.grad_chunks = 4
    return config
