"""Offline default: MIM-JEPA on scikit-learn's 1,797 hand-written digits (no download).

    python launch.py --config configs/digits.py --workdir runs/digits

A small SCOTT (depth 3, width 128) at 64 px (a 4x4 patch grid, 7 of 16 patches kept), so it
trains on a laptop CPU in minutes. Used by the tests and by docs/results.md (Evidence on digits).
"""

from configs import common, mim_jepa


def dataset(config):
    """The digits fields shared by every method's digits config: a small SCOTT at 64 px."""
    config.variant = "scott-3/16"
    config.img_size = 64
    config.model.embed_dim = 128
    config.model.num_heads = 4
    config.batch_size = 64
    config.num_epochs = 30
    config.optim.lr_warmup_epochs = 3.0
    config.data.name = "digits"
    config.data.crop_scale = (0.6, 1.0)
    config.checkpoint_every_steps = 200
    config.log_every_steps = 20
    return config


def get_config():
    config = mim_jepa.apply(dataset(common.get_config()))
    config.predictor.depth = 2
    config.knn_every_epochs = 5.0
    return config
