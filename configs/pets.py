"""MIM-JEPA pretraining on Oxford-IIIT Pets-37, "full" split (trainval+test, 7,349 images).

    python launch.py --config configs/pets.py --workdir runs/pets

SCOTT-12/16 at 224 px, batch 128, 300 epochs (57 steps/epoch, 17,100 steps). Expected time on
one GPU: not measured yet; estimated 1-3 h on an A100-class GPU. Paper (attentive probe,
top-1): 86.2 for SCOTT-12/16, 81.7 for SCOTT-7/16 (90.7 after 1,200 epochs).
"""

from configs import common, mim_jepa


def dataset(config):
    """The dataset's fields, shared by every method's config for it."""
    config.data.name = "oxford_iiit_pet"
    config.data.aug = "diff"
    return config


def get_config():
    return mim_jepa.apply(dataset(common.get_config()))
