"""Loss curves of the official MIM-JEPA step and ours, side by side, on the same data.

    python benchmarks/curve_parity.py --reference_dir /tmp/scott_ref \
        --config configs/digits.py --steps 140 --regularisation off --out runs/curves.jsonl

A control for docs/results.md (Parity): both steps start from the *same* weights (the
official init of `reference_pretrain.official_models`, converted with `scott_jax.convert`)
and read the same batches and keep-masks, the stream that `launch.py` feeds the step
(`loop.input_stream` + `mim_jepa.masked_batches`). The official step is
`bench_reference.make_step` (official models, AdamW groups, schedulers, EMA); ours is the
jitted step of `mim_jepa.build_trainer`. With `--regularisation=off` (dropout, attention
dropout and drop-path 0) the two compute the same function and must coincide to float32
round-off; with it on they draw different dropout masks. `--our_seeds` adds runs of our
step from our own init (`config.seed` = each seed), the spread that a different draw of the
initial weights alone gives; `--dropout_seeds` runs of our step from the official init with
other dropout draws (the step's seed).

Writes one JSON line per step: step, official, ours[, ours_init_<seed>...,
ours_dropout_<seed>...] (losses).
"""

import argparse
import ast
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def load_config(path: str, overrides: list[str]):
    """`get_config()` of a config file, then `key.sub=value` overrides (Python literals)."""
    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = ast.literal_eval(value)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="MIM-JEPA config file")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key.sub=value")
    parser.add_argument("--reference_dir", required=True, help="official SCOTT checkout")
    parser.add_argument("--out", required=True, help="JSONL file for the curves")
    parser.add_argument("--steps", type=int, default=140)
    parser.add_argument("--regularisation", choices=("off", "on"), default="off")
    parser.add_argument("--our_seeds", default="", help="comma-separated seeds of our own init")
    parser.add_argument(
        "--dropout_seeds", default="", help="comma-separated step seeds, official init"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    our_seeds = [int(s) for s in args.our_seeds.split(",") if s]
    dropout_seeds = [int(s) for s in args.dropout_seeds.split(",") if s]
    config = load_config(args.config, args.set)
    if args.regularisation == "off":
        config.model.dropout_rate = 0.0
        config.model.attention_dropout = 0.0
        config.model.stochastic_depth_rate = 0.0
    reference = Path(args.reference_dir).resolve()
    sys.path.insert(0, str(reference))
    import jax
    import torch
    from bench_reference import make_step
    from reference_pretrain import official_models, to_torch

    from scott_jax import loop, optim
    from scott_jax.convert import from_torch
    from scott_jax.data import load_source
    from scott_jax.methods import mim_jepa
    from scott_jax.methods.base import TrainState
    from scott_jax.sharding import make_mesh, to_global

    torch.set_num_threads(args.threads)
    source = load_source(config.data.name, "pretrain", data_dir=config.data.data_dir)
    lengths = optim.run_lengths(
        source.num_examples, config.batch_size, config.num_epochs, config.optim.lr_warmup_epochs
    )
    models = official_models(torch, config, lengths)
    context_encoder, predictor, target_encoder = models[:3]
    official_step = make_step(torch, *models)

    # Ours from the official initial weights.
    encoder = mim_jepa.build_encoder(config)
    arch = dict(
        model=encoder.tokenizer,
        img_size=config.img_size,
        patch_size=encoder.patch_size,
        embed_dim=encoder.embed_dim,
        depth=encoder.depth,
        num_heads=encoder.num_heads,
        ffn_layer=encoder.ffn_layer,
        mlp_ratio=encoder.mlp_ratio,
        num_register_tokens=encoder.num_register_tokens,
    )
    numpy_sd = {k: v.detach().numpy().copy() for k, v in context_encoder.state_dict().items()}
    _, encoder_params = from_torch(numpy_sd, "encoder", **arch)
    numpy_sd = {k: v.detach().numpy().copy() for k, v in predictor.state_dict().items()}
    _, predictor_params = from_torch(
        numpy_sd,
        "predictor",
        **{**arch, "depth": config.predictor.depth, "backbone_depth": encoder.depth},
    )
    mesh = make_mesh()

    def trainer_and_state(seed: int | None, own_init: bool = True):
        run_config = config.copy_and_resolve_references()
        if seed is not None:  # the step's randomness (dropout) is fold_in(seed, step)
            run_config.seed = seed
        trainer = mim_jepa.build_trainer(run_config, lengths, mesh, source)
        if seed is not None and own_init:
            return trainer, trainer.init(jax.random.key(seed))
        tx = optim.make(config.optim, lengths, ema_kind="linear").tx
        # A copy per run: the jitted step donates its state.
        params = jax.tree.map(
            jax.numpy.array, {"context_encoder": encoder_params, "predictor": predictor_params}
        )
        state = TrainState(
            step=jax.numpy.zeros((), jax.numpy.int32),
            params=params,
            target_params=jax.tree.map(jax.numpy.array, encoder_params),
            opt_state=tx.init(params),
        )
        return trainer, state

    runs = {"ours": trainer_and_state(None)}
    for seed in our_seeds:
        runs[f"ours_init_{seed}"] = trainer_and_state(seed)
    for seed in dropout_seeds:
        runs[f"ours_dropout_{seed}"] = trainer_and_state(seed, own_init=False)

    batches = mim_jepa.masked_batches(  # launch.py's stream and masks
        loop.input_stream(config, source, start_step=0), config, encoder.grid_size, start_step=0
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(args.out, "w") as out:
        for step, batch in zip(range(1, args.steps + 1), batches, strict=False):
            context_encoder.train()
            predictor.train()
            target_encoder.eval()
            inputs = {
                "context": to_torch(torch, batch["context"]),
                "target": to_torch(torch, batch["target"]),
                "keep_mask": torch.from_numpy(batch["keep_mask"].astype(np.int64)),
            }
            row = {"step": step, "official": official_step(inputs)}
            for name, (trainer, state) in runs.items():
                state, metrics = trainer.step(state, to_global(batch, trainer.data_sharding))
                runs[name] = (trainer, state)
                row[name] = float(metrics["loss"])
            row["seconds"] = round(time.perf_counter() - start, 1)
            out.write(json.dumps(row) + "\n")
            out.flush()
            if step % 10 == 0 or step == 1:
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
