"""Supervised baseline on ImageNet-100: the imagenet100.py model trained from scratch with labels.

    python launch.py --config configs/imagenet100_supervised.py --workdir runs/imagenet100_sup
    python launch.py --config configs/imagenet100_supervised.py --config.variant=vit-12/16 \
        --workdir runs/imagenet100_sup_vit

SCOTT-12/16 at 224 px, batch 128, 300 epochs on probe_train (117,000 images), the pretraining
augmentations, a linear head on the LayerNorm'd patch features; scored on test, epochs chosen
on probe_select (scott_jax.supervised). Expected time on one GPU: not measured yet.
The paper gives no from-scratch number for ImageNet-100.
"""

from configs import common, imagenet100, supervised


def get_config():
    return supervised.apply(imagenet100.dataset(common.get_config()))
