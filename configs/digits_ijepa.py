"""Offline I-JEPA on scikit-learn's 1,797 hand-written digits (no download).

    python launch.py --config configs/digits_ijepa.py --workdir runs/digits_ijepa_vit
    python launch.py --config configs/digits_ijepa.py --config.variant=scott-3/16 \
        --workdir runs/digits_ijepa_scott

128 px with 16 px patches, an 8x8 grid. configs/digits.py's 64 px gives a 4x4 grid, where
a target block of scale 0.15-0.2 would be 2 or 3 patches: multi-block masks need a finer
grid. 128 px keeps the 16 px patch that the SCOTT tokenizer requires, so the ViT (default)
and the SCOTT variant differ only in the tokenizer. min_keep is scaled with the grid,
10 · 64/196 -> 3: at 8x8 the targets have 9-12 patches and the context block 49-64, so
upstream's 10 would reject nearly every target size. Same small width/depth, batch and
epochs as configs/digits.py; the I-JEPA optimisation of configs/flowers_ijepa.py with the
MIM-JEPA digits LR (5e-4 at batch 64), and digits.py's width, batch, epochs and warmup.
"""

from configs import common, digits, ijepa


def get_config():
    config = ijepa.apply(digits.dataset(common.get_config()))
    config.variant = "vit-7/16"
    config.img_size = 128
    config.model.depth = 3
    config.ijepa.predictor_dim = 128
    config.ijepa.predictor_depth = 2
    config.ijepa.min_keep = 3
    config.optim.lr_start = 1e-6
    config.optim.lr_peak = 5e-4
    config.optim.lr_final = 1e-6
    config.optim.lr_flat_pctg = 0.0
    config.data.aug = "none"
    return config
