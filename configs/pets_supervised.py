"""Supervised baseline on Oxford-IIIT Pets-37: the pets.py model trained from scratch with labels.

    python launch.py --config configs/pets_supervised.py --workdir runs/pets_sup
    python launch.py --config configs/pets_supervised.py --config.variant=vit-12/16 \
        --workdir runs/pets_sup_vit

SCOTT-12/16 at 224 px, batch 128, 300 epochs on probe_train (3,312 images), the pretraining
augmentations, a linear head on the LayerNorm'd patch features; scored on test, epochs chosen
on probe_select (scott_jax.supervised). Expected time on one GPU: not measured yet.
The paper gives no from-scratch number for Pets.
"""

from configs import common, pets, supervised


def get_config():
    return supervised.apply(pets.dataset(common.get_config()))
