"""Supervised baseline on Oxford Flowers-102: the flowers.py model trained from scratch.

    python launch.py --config configs/flowers_supervised.py --workdir runs/flowers_sup
    python launch.py --config configs/flowers_supervised.py --config.variant=vit-12/16 \
        --workdir runs/flowers_sup_vit

SCOTT-12/16 at 224 px, batch 128, 300 epochs on probe_train (1,836 images), the pretraining
augmentations, a linear head on the LayerNorm'd patch features; scored on test, epochs chosen
on probe_select (scott_jax.supervised). Expected time on one GPU: not measured yet.
Paper (top-1, from scratch): SCOTT-12/16 79.13, ViT-12/16 71.08.
"""

from configs import common, flowers, supervised


def get_config():
    return supervised.apply(flowers.dataset(common.get_config()))
