"""Supervised baseline on the offline digits: the digits.py model trained from scratch.

    python launch.py --config configs/digits_supervised.py --workdir runs/digits_sup
    python launch.py --config configs/digits_supervised.py --config.labels_per_class=10 \
        --config.eval_every_epochs=20 --workdir runs/digits_sup10

SCOTT-3/16 (width 128) at 64 px, batch 64, 300 epochs on probe_train (1,008 images, or 10 per
class: 100, one step per epoch), digits.py's augmentations, a linear head on the LayerNorm'd
patch features; scored on test (539), epochs chosen on probe_select (250). With 10 labels per
class an evaluation (789 images) costs more than an epoch, hence eval_every_epochs=20 there.
Measured (10 per class, on a 2-core CPU shared with other jobs: about 45 minutes): see the
digits table in docs/results.md.
"""

from configs import common, digits, supervised


def get_config():
    config = supervised.apply(digits.dataset(common.get_config()))
    config.optim.lr_warmup_epochs = 30.0
    return config
