"""Weights out of a run: a documented Python API to embed images with a run's encoder, and
a command line that writes the encoder (and optionally the predictor) as npz, safetensors or
an official PyTorch state_dict.

    python -m scott_jax.export --workdir runs/flowers --encoder target --format torch \\
        --out flowers_target.pth

    from scott_jax import export
    encoder = export.load_encoder("runs/flowers")          # the method's default encoder
    out = export.embed(encoder, images)                    # uint8 [B, H, W, 3], any H, W
    out["pooled"], out["patches"]                          # [B, D], [B, N, D]
"""

import argparse
import functools
import io
import os
import sys

import jax
import numpy as np
from flax import traverse_util

from scott_jax import convert, storage
from scott_jax.checkpoint import load_state_tree
from scott_jax.errors import ConfigError, UserError
from scott_jax.evaluators.backbone import Backbone, load_backbone
from scott_jax.evaluators.features import backbone_features
from scott_jax.models import Encoder, build_predictor

FORMATS = ("npz", "safetensors", "torch")


def load_encoder(
    workdir: str | os.PathLike, encoder: str | None = None, step: int | None = None
) -> Backbone:
    """A run's frozen encoder (`Backbone`: module, params, which, step, the run's config):
    `encoder` is one of the run's method's encoders (None: its default; MIM-JEPA 'context' or
    'target') or 'random'; `step` None is the latest checkpoint."""
    return load_backbone(workdir, encoder=encoder, step=step)


def embed(backbone: Backbone, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Features of uint8 images [B, H, W, 3] (any size): each gets the evaluation transform
    (resize the shorter side, centre crop to the run's size, ImageNet normalisation), then the
    frozen encoder and the non-affine LayerNorm every probe sees. Returns 'patches' [B, N, D]
    and their token mean 'pooled' [B, D] (the k-NN's features), float32 numpy."""
    import tensorflow as tf

    from scott_jax.data import augment

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype}{images.shape}")
    size = backbone.encoder.img_size
    apply = jax.jit(functools.partial(backbone_features, backbone.encoder))
    patches = []
    for start in range(0, len(images), batch_size):
        chunk = [
            augment.normalize(augment.eval_transform(tf.constant(image), size)).numpy()
            for image in images[start : start + batch_size]
        ]
        patches.append(np.asarray(apply(backbone.params, np.stack(chunk)), np.float32))
    patches = np.concatenate(patches)
    return {"patches": patches, "pooled": patches.mean(axis=1)}


def state_dicts(
    backbone: Backbone, fmt: str, predictor_of: str | os.PathLike | None = None
) -> dict[str, dict]:
    """{'encoder': {name: array}[, 'predictor': ...]} in the format's naming: our parameter
    paths ('a/b/kernel') for npz and safetensors, the official names for torch.
    `predictor_of`: the run's workdir, to add the predictor of the backbone's step."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    official = isinstance(backbone.encoder, Encoder)
    if fmt == "torch" and not official:
        raise ConfigError(
            f"{type(backbone.encoder).__name__} has no official PyTorch layout (only the SCOTT "
            "/ ViT encoders of MIM-JEPA and the supervised baseline do): use npz or safetensors"
        )
    parts = {"encoder": (backbone.encoder, backbone.params)}
    if predictor_of is not None:
        parts["predictor"] = _predictor(backbone, predictor_of)
    if fmt == "torch":
        return {name: convert.to_torch(params, module) for name, (module, params) in parts.items()}
    return {
        name: {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
        for name, (_, params) in parts.items()
    }


def _predictor(backbone: Backbone, workdir: str | os.PathLike):
    """(predictor module, params) of a MIM-JEPA run's checkpoint at the backbone's step."""
    config = backbone.train_config
    if backbone.which == "random" or "predictor" not in config:
        raise ConfigError("only a trained MIM-JEPA run has a predictor to export")
    directory = storage.join(workdir, "checkpoints")
    params = load_state_tree(directory, backbone.step)["params"]["predictor"]
    module = build_predictor(
        backbone.encoder,
        depth=config["predictor"]["depth"],
        double_rescale=config["predictor"]["double_rescale"],
    )
    return module, params


def write(arrays: dict[str, np.ndarray], path: str, fmt: str) -> None:
    """One state_dict to `path` (a local path or a cloud URI), written whole: a reader never
    sees part of it."""
    buffer = io.BytesIO()
    if fmt == "npz":
        np.savez(buffer, **arrays)
    elif fmt == "safetensors":
        from safetensors.numpy import save  # the `export` extra

        buffer.write(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    else:
        import torch  # the `torch` extra

        torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, buffer)
    storage.write_bytes(path, buffer.getvalue())


def main() -> None:
    """The command line; a UserError is one line on stderr and exit code 2."""
    try:
        run(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Write a run's encoder weights.")
    parser.add_argument("--workdir", required=True, help="a launch.py run")
    parser.add_argument("--encoder", default=None, help="context, target, ... (the method's)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--format", choices=FORMATS, default="npz")
    parser.add_argument("--predictor", action="store_true", help="also write the predictor")
    parser.add_argument("--out", default=None, help="output file (default: in the workdir)")
    args = parser.parse_args(argv)
    backbone = load_encoder(args.workdir, args.encoder, args.step)
    suffix = {"npz": "npz", "safetensors": "safetensors", "torch": "pth"}[args.format]
    out = args.out or storage.join(
        args.workdir, f"{backbone.which}-encoder_step{backbone.step}.{suffix}"
    )
    predictor_of = args.workdir if args.predictor else None
    for name, arrays in state_dicts(backbone, args.format, predictor_of).items():
        path = out if name == "encoder" else f"{os.path.splitext(out)[0]}-predictor.{suffix}"
        write(arrays, path, args.format)
        print(f"wrote the {name} ({len(arrays)} arrays) to {path}")


if __name__ == "__main__":
    main()
