"""MIM-JEPA pretraining on Oxford Flowers-102, "full" split (train+validation+test, 8,189 images).

    python launch.py --config configs/flowers.py --workdir runs/flowers
    python launch.py --config configs/flowers.py --config.variant=scott-7/16 --workdir runs/f7

SCOTT-12/16 at 224 px, batch 128, 300 epochs (63 steps/epoch, 18,900 steps), the paper's
recipe. Expected time on one GPU: not measured yet; estimated 1-3 h on an A100-class GPU
(about 50 GFLOP per image per step). Paper (frozen probes, 100 epochs, top-1): attentive
97.15 / linear 94.81 for SCOTT-12/16; 95.64 / 92.70 for SCOTT-7/16.
"""

from configs import common, mim_jepa


def dataset(config):
    """The dataset's fields, shared by every method's config for it."""
    config.data.name = "oxford_flowers102"
    config.data.aug = "diff"
    return config


def get_config():
    return mim_jepa.apply(dataset(common.get_config()))
