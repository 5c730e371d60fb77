"""Pretrain with the official PyTorch MIM-JEPA step on this project's data, masks and schedule.

    python benchmarks/reference_pretrain.py --reference_dir /tmp/scott_ref \
        --config configs/digits.py --config.num_epochs=8 --out runs/reference_digits.jsonl

A control experiment, not a speed benchmark: it runs a config with the *official* models,
loss, AdamW groups, LR / WD / EMA schedulers and EMA update, imported from --reference_dir at
run time (`bench_reference.py` builds them), on the same two-view batches and keep-masks that
`launch.py` draws. If the official code shows the same curves, a surprising behaviour (e.g.
the collapse on digits) belongs to the method on this data, not to the reimplementation.

Writes one JSON line per `config.log_every_steps` to --out (and stdout) with `launch.py`'s
keys and, like it, their means over the steps since the last line: step, loss, lr, wd, ema,
target_std, context_std, and, every `config.knn_every_epochs` and at the end,
knn/target_top1 and knn/context_top1 (cosine k-NN, k=20, on the pooled, LN'd eval-transform
features of probe_train and test).
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ import `configs.common`

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from scott_jax import loop, methods, optim
from scott_jax.data import eval_batches, load_source
from scott_jax.evaluators.knn import knn_accuracy, knn_sources
from scott_jax.methods import mim_jepa

config_flags.DEFINE_config_file("config", None, "MIM-JEPA config file.", lock_config=True)
flags.DEFINE_string("reference_dir", None, "Official SCOTT checkout (has src/models/scott.py).")
flags.DEFINE_string("out", None, "JSONL file for the metrics.")
flags.DEFINE_integer("steps", None, "Stop after this many steps (default: the whole schedule).")
flags.DEFINE_integer("threads", os.cpu_count(), "torch.set_num_threads.")
flags.mark_flags_as_required(["config", "reference_dir", "out"])


def official_models(torch, config, lengths: optim.RunLengths):
    """(context_encoder, predictor, target_encoder, optimizer, ema scheduler) of the official
    code with the architecture and schedule of `config` (the fields of our encoder)."""
    from bench_reference import official_trainer
    from src.models import get_model

    ours = mim_jepa.build_encoder(config)
    torch.manual_seed(config.seed)
    context_encoder = get_model(
        name=ours.tokenizer,
        img_size=config.img_size,
        patch_size=ours.patch_size,
        in_channels=3,
        embed_dim=ours.embed_dim,
        depth=ours.depth,
        num_heads=ours.num_heads,
        mlp_ratio=0 if ours.ffn_layer == "swiglu" else ours.mlp_ratio,
        dropout_rate=ours.dropout_rate,
        attention_dropout=ours.attention_dropout,
        stochastic_depth_rate=ours.stochastic_depth_rate,
        num_register_tokens=ours.num_register_tokens,
        ffn_layer=ours.ffn_layer,
        verbose=False,
    )
    schedule = {
        **{k: v for k, v in config.optim.items() if k.startswith(("lr_", "wd_", "ema_"))},
        "total_steps": lengths.total_steps,
        "warmup_steps": lengths.warmup_steps,
    }
    schedule.pop("lr_warmup_epochs")
    return (
        context_encoder,
        *official_trainer(torch, context_encoder, config.predictor.depth, schedule),
    )


def knn_row(torch, config, encoders: dict, sources) -> dict:
    """k-NN top-1 of each encoder (eval mode, no mask) as `evaluators.knn.online_knn` does."""
    row = {}
    for name, encoder in encoders.items():
        encoder.eval()
        split_features = []
        for source in sources:
            feats, labels = [], []
            batches = eval_batches(source, batch_size=config.batch_size, img_size=config.img_size)
            for batch in batches:
                with torch.no_grad():
                    out = encoder(to_torch(torch, batch["image"]), masks=None)
                    out = torch.nn.functional.layer_norm(out, (out.size(-1),)).mean(dim=1)
                feats.append(out.numpy()[batch["mask"]])
                labels.append(batch["label"][batch["mask"]])
            split_features.append((np.concatenate(feats), np.concatenate(labels)))
        (train_x, train_y), (test_x, test_y) = split_features
        row[f"knn/{name}_top1"] = float(
            knn_accuracy(train_x, train_y, test_x, test_y, num_classes=sources[0].num_classes)
        )
    return row


def to_torch(torch, images: np.ndarray):
    """[B, S, S, 3] numpy -> [B, 3, S, S] torch float32."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    reference = Path(flags.FLAGS.reference_dir).resolve()
    if not (reference / "src" / "models" / "scott.py").is_file():
        raise SystemExit(f"{reference} is not an official SCOTT checkout (no src/models/scott.py)")
    if methods.of(config) is not mim_jepa or config.data.color_on_device:
        raise SystemExit("reference_pretrain.py runs MIM-JEPA with host views only")
    sys.path.insert(0, str(reference))
    import torch
    from bench_reference import make_step

    torch.set_num_threads(flags.FLAGS.threads)
    source = load_source(config.data.name, "pretrain", data_dir=config.data.data_dir)
    lengths = optim.run_lengths(
        source.num_examples, config.batch_size, config.num_epochs, config.optim.lr_warmup_epochs
    )
    steps = flags.FLAGS.steps or lengths.total_steps
    models = official_models(torch, config, lengths)
    context_encoder, predictor, target_encoder, optimizer, _ = models
    encoders = {"target": target_encoder, "context": context_encoder}
    step_fn = make_step(torch, *models)
    knn_every = int(config.knn_every_epochs * lengths.steps_per_epoch)
    knn_data = knn_sources(config.data)
    grid = mim_jepa.build_encoder(config).grid_size
    batches = mim_jepa.masked_batches(  # launch.py's stream and the keep-masks it draws
        loop.input_stream(config, source, start_step=0), config, grid, start_step=0
    )
    Path(flags.FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    with open(flags.FLAGS.out, "w") as out:

        def write(row: dict) -> None:
            line = json.dumps(row)
            print(line, flush=True)
            out.write(line + "\n")
            out.flush()

        start = time.perf_counter()
        window = []  # this log interval's per-step values
        for step, batch in zip(range(steps), batches, strict=False):
            context_encoder.train()
            predictor.train()
            target_encoder.eval()
            inputs = {
                "context": to_torch(torch, batch["context"]),
                "target": to_torch(torch, batch["target"]),
                "keep_mask": torch.from_numpy(batch["keep_mask"].astype(np.int64)),
            }
            lr, wd = (optimizer.info()[k] for k in ("lr", "wd"))
            loss, stats = step_fn(inputs, with_stats=True)
            window.append(dict(loss=loss, lr=lr, wd=wd, **stats))
            done = step + 1
            row = {"step": done}
            if done % config.log_every_steps == 0 or done == steps:
                # The mean over the interval, as launch.py logs it (loop.py): a logged step's
                # own loss would sit 10-20 % below launch.py's on a falling curve.
                row.update({k: float(np.mean([w[k] for w in window])) for k in window[-1]})
                window = []
                row["images_per_sec"] = done * config.batch_size / (time.perf_counter() - start)
            if (knn_every and done % knn_every == 0) or done == steps:
                row.update(knn_row(torch, config, encoders, knn_data))
            if len(row) > 1:
                write(row)


if __name__ == "__main__":
    app.run(main)
