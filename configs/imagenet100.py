"""MIM-JEPA pretraining on ImageNet-100 (the reference's 100 animal wnids, train+val, 135,000).

    python launch.py --config configs/imagenet100.py --workdir runs/in100 \
        --config.data.data_dir=/path/to/imagenet-100

SCOTT-12/16 at 224 px, batch 128, 300 epochs (1,054 steps/epoch, 316,200 steps). Expected
time on one GPU: not measured yet; estimated 1-2 days on an A100-class GPU. Paper (attentive
probe, top-1): 84.9 for SCOTT-12/16, 81.1 for SCOTT-7/16.
"""

from configs import common, mim_jepa


def dataset(config):
    """The dataset's fields, shared by every method's config for it."""
    config.data.name = "imagenet100"
    config.data.aug = "diff"
    return config


def get_config():
    return mim_jepa.apply(dataset(common.get_config()))
