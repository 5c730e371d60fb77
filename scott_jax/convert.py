"""Import official PyTorch SCOTT checkpoints (state_dicts) as scott_jax params.

    module, params = from_torch("context-encoder_checkpoint.pth", "encoder",
                                model="scott", img_size=224, patch_size=16, embed_dim=384,
                                depth=12, num_heads=4, ffn_layer="swiglu")
    features = module.apply({"params": params}, images)          # [B, 196, 384]

`arch` uses the reference config's names (`configs/ssl/scott.yaml`). The official files'
key layout is listed in docs/design.md#weight-conversion-and-parity: torch Linear weights are
(out, in) and become Flax kernels (in, out); torch conv weights (O, I, kh, kw) become
(kh, kw, I, O).
"""

import io
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scott_jax import storage
from scott_jax.models import Encoder, Predictor
from scott_jax.models.transformer import sincos_pos_embed

#: The reference config's architecture names accepted by `from_torch`.
ARCH_KEYS = (
    "model",
    "img_size",
    "patch_size",
    "embed_dim",
    "in_channels",
    "depth",
    "num_heads",
    "ffn_layer",
    "mlp_ratio",
    "num_register_tokens",
    "dropout_rate",
    "attention_dropout",
    "stochastic_depth_rate",
    "backbone_depth",
)
KINDS = ("encoder", "predictor")
REQUIRED = ("model", "img_size", "embed_dim", "depth", "num_heads")


def _linear(w):
    return np.asarray(w).T


def _conv(w):
    return np.asarray(w).transpose(2, 3, 1, 0)


def _same(w):
    return np.asarray(w)


#: torch key pattern (after the `transformer.` / `tokenizer.` prefix) -> (flax path, transform).
_TRANSFORMER_RULES = (
    (r"msk_embed", "mask_token", _same),
    (r"reg_embed", "registers", _same),
    (r"blocks\.(\d+)\.self_attn\.(qkv|proj)\.weight", r"block_\1/attn/\2/kernel", _linear),
    (
        r"blocks\.(\d+)\.ffn_layer\.(w12|last_linear|linear1)\.weight",
        r"block_\1/ffn/\2/kernel",
        _linear,
    ),
)
_TOKENIZER_RULES = (
    (r"tokenizer\.0\.weight", "conv_0/kernel", _conv),
    (r"tokenizer\.3\.weight", "conv_1/kernel", _conv),
    (r"proj\.weight", "proj/kernel", _conv),
    (r"proj\.bias", "proj/bias", _same),
)
_HEAD_RULES = (
    (r"1\.weight", "head_norm/scale", _same),
    (r"1\.bias", "head_norm/bias", _same),
    (r"2\.weight", "head/kernel", _linear),
    (r"2\.bias", "head/bias", _same),
)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is never imported here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an official `.pth` state_dict (needs the `torch` extra) as numpy arrays."""
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading .pth checkpoints needs PyTorch: pip install 'scott_jax[torch]' "
            "(or pass a mapping of names to numpy arrays)"
        ) from e
    data = io.BytesIO(storage.read_bytes(path))  # a local file or a cloud URI
    state = torch.load(data, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    return {k: _to_numpy(v) for k, v in state.items()}


def build_module(kind: str, **arch) -> Encoder | Predictor:
    """The scott_jax module for an official architecture described by reference config names."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise TypeError(f"unknown architecture arguments {unknown}; expected some of {ARCH_KEYS}")
    missing = [k for k in REQUIRED if k not in arch]
    if kind == "predictor" and "backbone_depth" not in arch:
        missing.append("backbone_depth")
    if missing:
        raise TypeError(f"missing architecture arguments {missing}")
    if arch.get("in_channels", 3) != 3:
        raise ValueError(f"only RGB inputs are supported, got in_channels={arch['in_channels']}")
    common = dict(
        num_heads=arch["num_heads"],
        ffn_layer=arch.get("ffn_layer", "swiglu"),
        mlp_ratio=float(arch.get("mlp_ratio", 4.0)),
        dropout_rate=arch.get("dropout_rate", 0.0),
        attention_dropout=arch.get("attention_dropout", 0.0),
        stochastic_depth_rate=arch.get("stochastic_depth_rate", 0.0),
        num_register_tokens=arch.get("num_register_tokens", 0),
    )
    patch_size = arch.get("patch_size", 16)
    encoder = Encoder(
        tokenizer=arch["model"],
        img_size=arch["img_size"],
        patch_size=patch_size,
        embed_dim=arch["embed_dim"],
        depth=arch["depth"] if kind == "encoder" else arch["backbone_depth"],
        **common,
    )
    if kind == "encoder":
        return encoder
    return Predictor(
        grid_size=encoder.grid_size,
        backbone_depth=arch["backbone_depth"],
        depth=arch["depth"],
        **common,
    )


def _target_path(kind: str, key: str) -> tuple[str | None, Any]:
    """torch key -> (flax path, transform); (None, None) to ignore it; KeyError if unknown."""
    prefix, _, rest = key.partition(".")
    if prefix == "transformer":
        if rest == "pos_embed" or (kind == "predictor" and rest == "msk_embed"):
            return None, None  # a constant we recompute; the predictor's never-used mask token
        rules, base = _TRANSFORMER_RULES, "transformer/"
    elif prefix == "tokenizer" and kind == "encoder":
        rules, base = _TOKENIZER_RULES, "tokenizer/"
    elif prefix == "head" and kind == "predictor":
        rules, base = _HEAD_RULES, ""
    else:
        raise KeyError(key)
    for pattern, target, transform in rules:
        if re.fullmatch(pattern, rest):
            return base + re.sub(pattern, target, rest), transform
    raise KeyError(key)


def convert_state_dict(
    state_dict: Mapping[str, Any], module: Encoder | Predictor, kind: str, embed_dim: int
) -> dict:
    """Turns a torch state_dict into params for `module`; one error lists every bad key."""
    grid = module.grid_size
    example = (
        jnp.zeros((1, module.img_size, module.img_size, 3))
        if kind == "encoder"
        else jnp.zeros((1, grid**2, embed_dim))
    )
    expected = traverse_util.flatten_dict(
        jax.eval_shape(module.init, jax.random.key(0), example)["params"], sep="/"
    )
    converted, unknown, problems = {}, [], []
    for key, value in state_dict.items():
        try:
            path, transform = _target_path(kind, key)
        except KeyError:
            unknown.append(key)
            continue
        array = _to_numpy(value)
        if path is None:
            if key.endswith("pos_embed"):
                problems += _check_pos_embed(array, embed_dim, grid, module.num_register_tokens)
            continue
        array = transform(array)
        if path not in expected:
            unknown.append(key)
        elif array.shape != expected[path].shape:
            problems.append(f"{key} has shape {array.shape}, expected {expected[path].shape}")
            converted[path] = None
        else:
            converted[path] = jnp.asarray(array)
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)}")
    missing = sorted(set(expected) - set(converted))
    if missing:
        problems.append(f"missing params (no matching key) {missing}")
    if problems:
        raise ValueError(f"cannot convert the {kind} state_dict: " + "; ".join(problems))
    return traverse_util.unflatten_dict(converted, sep="/")


def _check_pos_embed(array, dim, grid, registers) -> list[str]:
    """The position embedding is a constant here; a different one means a different model."""
    expected = np.concatenate([np.zeros((registers, dim), np.float32), sincos_pos_embed(dim, grid)])
    if array.shape != expected.shape:
        return [f"transformer.pos_embed has shape {array.shape}, expected {expected.shape}"]
    if not np.allclose(array, expected, atol=1e-5):
        return ["transformer.pos_embed differs from the 2-D sin-cos embedding (row half first)"]
    return []


def from_torch(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike, kind: str, **arch
) -> tuple[Encoder | Predictor, dict]:
    """Official state_dict (or `.pth` path) -> (module, params).

    kind: "encoder" (a context/target encoder file) or "predictor". arch: the reference's
    config names (`model`, `img_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`,
    `ffn_layer`, `mlp_ratio`, `num_register_tokens`, ...; `backbone_depth` for a predictor,
    whose `depth` is its own). The encoder applies as `module.apply({"params": params},
    images [B, H, W, 3], keep_mask=None)` -> [B, N, D]; the predictor takes [B, N, D].
    """
    if isinstance(state_dict_or_path, str | os.PathLike):
        state_dict = load_state_dict(state_dict_or_path)
    elif isinstance(state_dict_or_path, Mapping):
        state_dict = state_dict_or_path
    else:
        raise TypeError(
            f"expected a state_dict mapping or a path, got {type(state_dict_or_path).__name__}"
        )
    module = build_module(kind, **arch)
    return module, convert_state_dict(state_dict, module, kind, arch["embed_dim"])


# --------------------------------------------------------------------------- MOCA


#: timm block keys (`models_moca.py`, `Block`) -> this package's pre-norm block (models.ijepa).
def _conv_to_torch(w):
    return np.asarray(w).transpose(3, 2, 0, 1)


_INVERSE = {_linear: _linear, _conv: _conv_to_torch, _same: _same}
_GROUP = re.compile(r"\([^)]*\)")


def _inverse_rules(rules, torch_base: str, flax_base: str):
    """(flax path regex, torch key template, transform) from the forward (torch -> flax) rules:
    the same table read backwards, so the two directions cannot drift apart."""
    inverse = []
    for pattern, target, transform in rules:
        groups = _GROUP.findall(pattern)
        flax_regex = re.escape(flax_base + target)
        for i, group in enumerate(groups, start=1):
            flax_regex = flax_regex.replace(re.escape(f"\\{i}"), group)
        counter = iter(range(1, len(groups) + 1))
        torch_template = torch_base + _GROUP.sub(lambda _, c=counter: f"\\{next(c)}", pattern)
        inverse.append((flax_regex, torch_template.replace("\\.", "."), _INVERSE[transform]))
    return tuple(inverse)


_TO_TORCH = (
    *_inverse_rules(_TRANSFORMER_RULES, "transformer.", "transformer/"),
    *_inverse_rules(_TOKENIZER_RULES, "tokenizer.", "tokenizer/"),
    *_inverse_rules(_HEAD_RULES, "head.", ""),
)


def to_torch(params: Mapping, module: Encoder | Predictor) -> dict[str, np.ndarray]:
    """scott_jax params of an `Encoder` or `Predictor` -> the official state_dict (numpy
    arrays under the official names), which the official modules load with `strict=True`.

    The inverse of `convert_state_dict`, read off the same rules. It adds what the official
    modules hold and scott_jax computes: `transformer.pos_embed` (zeros for the registers,
    then the 2-D sin-cos embedding) and, for a predictor, its never-used mask token (zeros).
    """
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    state = {}
    for path, value in flat.items():
        for flax_regex, torch_template, transform in _TO_TORCH:
            if re.fullmatch(flax_regex, path):
                state[re.sub(flax_regex, torch_template, path)] = transform(value)
                break
        else:
            raise ValueError(f"no official name for the parameter {path!r}")
    dim = flat["transformer/block_0/attn/qkv/kernel"].shape[0]
    registers = np.zeros((module.num_register_tokens, dim), np.float32)
    pos_embed = np.concatenate([registers, sincos_pos_embed(dim, module.grid_size)])
    state["transformer.pos_embed"] = np.asarray(pos_embed, np.float32)
    if isinstance(module, Predictor):
        state["transformer.msk_embed"] = np.zeros((1, 1, dim), np.float32)
    return state


_TIMM_BLOCK_RULES = (
    (r"(\d+)\.norm(1|2)\.weight", r"block_\1/norm\2/scale", _same),
    (r"(\d+)\.norm(1|2)\.bias", r"block_\1/norm\2/bias", _same),
    (r"(\d+)\.attn\.(qkv|proj)\.weight", r"block_\1/attn/\2/kernel", _linear),
    (r"(\d+)\.attn\.(qkv|proj)\.bias", r"block_\1/attn/\2/bias", _same),
    (r"(\d+)\.mlp\.(fc1|fc2)\.weight", r"block_\1/\2/kernel", _linear),
    (r"(\d+)\.mlp\.(fc1|fc2)\.bias", r"block_\1/\2/bias", _same),
)
_MOCA_RULES = (
    (r"(encoder|encoder_teacher)\.patch_embed\.proj\.weight", "tokenizer/proj/kernel", _conv),
    (r"(encoder|encoder_teacher)\.patch_embed\.proj\.bias", "tokenizer/proj/bias", _same),
    (r"(encoder|encoder_teacher)\.cls_token", "cls_token", _same),
    (r"(encoder|encoder_teacher)\.norm\.weight", "norm/scale", _same),
    (r"(encoder|encoder_teacher)\.norm\.bias", "norm/bias", _same),
    (r"norm_cls_pt\.weight", "norm_in/scale", _same),
    (r"norm_cls_pt\.bias", "norm_in/bias", _same),
    (r"decoder_embed_cls_pt\.weight", "embed/kernel", _linear),
    (r"decoder_embed_cls_pt\.bias", "embed/bias", _same),
    (r"mask_token_cls_pt", "mask_token", _same),
    (r"decoder_norm_cls_pt\.weight", "norm/scale", _same),
    (r"decoder_norm_cls_pt\.bias", "norm/bias", _same),
    (r"(encoder|decoder)_pred\.layers_w\.0\.generator\.b0_fc\.weight", "b0_fc/kernel", _linear),
    (r"(encoder|decoder)_pred\.layers_w\.0\.generator\.b0_bn\.weight", "b0_bn/scale", _same),
    (r"(encoder|decoder)_pred\.layers_w\.0\.generator\.b0_bn\.bias", "b0_bn/bias", _same),
    (
        r"(encoder|decoder)_pred\.layers_w\.0\.generator\.b0_last_layer\.weight",
        "b0_last_layer/kernel",
        _linear,
    ),
    (
        r"(encoder|decoder)_pred\.layers_w\.0\.generator\.b0_last_layer\.bias",
        "b0_last_layer/bias",
        _same,
    ),
    (r"decoder_pred\.layers_w\.0\.skip\.weight", "skip/kernel", _linear),
    (r"decoder_pred\.layers_w\.0\.skip\.bias", "skip/bias", _same),
)
#: Where each torch prefix goes in MOCA's train state (scott_jax.methods.moca.MocaState).
_MOCA_TREES = {
    "encoder": ("params", "context_encoder"),
    "encoder_teacher": ("target_params",),
    "norm_cls_pt": ("params", "decoder"),
    "decoder_embed_cls_pt": ("params", "decoder"),
    "mask_token_cls_pt": ("params", "decoder"),
    "decoder_blocks_cls_pt": ("params", "decoder"),
    "decoder_norm_cls_pt": ("params", "decoder"),
    "encoder_pred": ("params", "wgen_img"),
    "decoder_pred": ("params", "wgen_loc"),
}
#: Buffers that are not state here: BN running statistics (never read in pretraining), the
#: generators' fixed κ, the queue's step counter.
_MOCA_IGNORED = (r".*\.b0_bn\.(running_mean|running_var|num_batches_tracked)", r".*_pred\.scale")


def moca_state_from_torch(state_dict: Mapping[str, Any], grid: int) -> dict:
    """An official MOCA state_dict (`models_moca.MOCA`) -> {'params': {'context_encoder',
    'decoder', 'wgen_img', 'wgen_loc'}, 'target_params', 'codebook': {'words', 'ptr', 'mu'}},
    the trees of `methods.moca.MocaState` (ViT tokenizer). The fixed position embeddings are
    checked against this package's row-first tables (`grid`: the patch grid), not loaded; an
    unknown key is an error. μ̄ is `_dist_norm_prev`, the value the next step's targets use."""
    trees: dict = {"params": {}, "target_params": {}, "codebook": {}}
    unknown, problems = [], []
    for key, value in state_dict.items():
        array = _to_numpy(value)
        prefix = key.partition(".")[0]
        if key.startswith("bow_extractor.bow_extractor.0."):
            name = key.rpartition(".")[2]
            if name == "_embedding":
                trees["codebook"]["words"] = jnp.asarray(array)
            elif name == "_embedding_ptr":
                trees["codebook"]["ptr"] = jnp.asarray(int(array[0]), jnp.int32)
            elif name == "_dist_norm_prev":
                trees["codebook"]["mu"] = jnp.asarray(array[0], jnp.float32)
            elif name not in ("_dist_norm", "_track_num_batches"):
                unknown.append(key)
            continue
        if key.endswith("pos_embed"):
            expected = np.concatenate(
                [
                    np.zeros((1, array.shape[-1]), np.float32),
                    sincos_pos_embed(array.shape[-1], grid),
                ]
            )
            if not np.allclose(array.reshape(expected.shape), expected, atol=1e-5):
                problems.append(f"{key} is not the row-first sin-cos table (docs/deviations.md)")
            continue
        if any(re.fullmatch(p, key) for p in _MOCA_IGNORED):
            continue
        if prefix not in _MOCA_TREES:
            unknown.append(key)
            continue
        block = re.fullmatch(r"(?:encoder|encoder_teacher)\.blocks\.(.*)", key) or re.fullmatch(
            r"decoder_blocks_cls_pt\.(.*)", key
        )
        rules = _TIMM_BLOCK_RULES if block else _MOCA_RULES
        subject = block.group(1) if block else key
        for pattern, target, transform in rules:
            if re.fullmatch(pattern, subject):
                path = re.sub(pattern, target, subject)
                node = trees
                for part in (*_MOCA_TREES[prefix], *path.split("/")[:-1]):
                    node = node.setdefault(part, {})
                node[path.split("/")[-1]] = jnp.asarray(transform(array))
                break
        else:
            unknown.append(key)
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)}")
    if problems:
        raise ValueError("cannot convert the MOCA state_dict: " + "; ".join(problems))
    return trees
