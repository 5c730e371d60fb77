"""Time the full MIM-JEPA pretraining step on synthetic input (no data loading).

    python benchmarks/bench_train.py --variant scott-7/16 --img-size 224 --batch 8 \
        --steps 5 --warmup 2

The step is the one the training loop runs (`scott_jax.methods.mim_jepa.build_trainer`):
target forward, masked context forward, predictor, loss, backward, AdamW and EMA, jitted and
donated. Prints one JSON line: sec_per_step (median over --steps, compilation and --warmup
steps excluded), step_times, images_per_sec, compile_sec, flops_per_step (XLA's cost analysis),
achieved_tflops, peak_memory_gb (XLA's memory analysis of the compiled step: arguments +
outputs - aliased + temporaries), peak_rss_gb (the process), and on a GPU/TPU with a known
peak the MFU.

`--method moca` times MOCA's step instead (`scott_jax.methods.moca`, configs/moca.py), with
its two views and masking rounds (`--grad-chunks k`: `moca.grad_chunks`; XLA's cost analysis
counts the loop over the k parts once, so flops_per_step then undercounts the student);
`--method splitmask` SplitMask's (configs/flowers_splitmask.py: the 75 % uniform split, 8192
random-projection words), e.g. `--variant vit-12/16`.

`--compile-only` lowers and compiles without running (no step_times, no timings): the way
to read the compiled memory of a configuration too large for this machine, e.g.
`--variant scott-12/16 --batch 128 --dtype bfloat16 --conv-impl xla --compile-only`.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `configs`

#: Dense peak TFLOP/s by device kind and compute dtype, for MFU. The GPUs' float32 entries
#: are their TF32 tensor-core peaks: JAX's default matmul precision runs float32 dots as
#: TF32 on Ampere and later, so the CUDA-core float32 peak would overstate the MFU ~7x.
PEAK_TFLOPS = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989.0,
    ("NVIDIA H100 80GB HBM3", "float32"): 494.7,
    ("NVIDIA H200", "bfloat16"): 989.0,
    ("NVIDIA H200", "float32"): 494.7,
    ("NVIDIA A100-SXM4-80GB", "bfloat16"): 312.0,
    ("NVIDIA A100-SXM4-80GB", "float32"): 156.0,
    ("NVIDIA A100-SXM4-40GB", "bfloat16"): 312.0,
    ("NVIDIA A100-SXM4-40GB", "float32"): 156.0,
    ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0,
}


def parser() -> argparse.ArgumentParser:
    """Command-line flags, shared with profile_step.py."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mim_jepa", choices=["mim_jepa", "moca", "splitmask"])
    parser.add_argument("--variant", default="scott-7/16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--conv-impl", default="auto", help="config.model.conv_impl")
    parser.add_argument("--remat", action="store_true", help="config.model.remat")
    parser.add_argument(
        "--fast-dropout",
        choices=["auto", "true", "false"],
        default="auto",
        help="config.model.fast_dropout (auto: 16-bit bits on CPU only)",
    )
    parser.add_argument(
        "--flat-matmuls",
        choices=["auto", "true", "false"],
        default="auto",
        help="config.model.flat_matmuls (auto: 2-D matmuls on CPU only)",
    )
    parser.add_argument(
        "--grad-chunks", type=int, default=None, help="config.moca.grad_chunks (MOCA only)"
    )
    parser.add_argument("--compile-only", action="store_true", help="memory, no timing")
    return parser


def setup(args):
    """(trainer, initial state, synthetic batch on the mesh) for the parsed flags."""
    import jax
    import numpy as np

    from configs import common, flowers_splitmask, mim_jepa, moca
    from scott_jax import masking, methods, optim
    from scott_jax.sharding import make_mesh

    if args.method == "splitmask":
        config = flowers_splitmask.get_config()
    else:
        config = {"mim_jepa": mim_jepa, "moca": moca}[args.method].apply(common.get_config())
    config.variant, config.img_size, config.batch_size = args.variant, args.img_size, args.batch
    config.compute_dtype = args.dtype
    config.model.conv_impl = args.conv_impl
    if args.remat:
        config.model.remat = True
    if args.fast_dropout != "auto":
        config.model.fast_dropout = args.fast_dropout == "true"
    if args.flat_matmuls != "auto":
        config.model.flat_matmuls = args.flat_matmuls == "true"
    if args.grad_chunks is not None:
        config.moca.grad_chunks = args.grad_chunks
    lengths = optim.RunLengths(steps_per_epoch=100, total_steps=10_000, warmup_steps=1_000)
    method = methods.of(config)
    trainer = method.build_trainer(config, lengths, make_mesh(), source=None)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.img_size, args.img_size, 3)
    grid = method.build_encoder(config).grid_size
    batch = {
        "context": rng.standard_normal(shape, np.float32),
        "target": rng.standard_normal(shape, np.float32),
        "keep_mask": masking.keep_masks(0, 0, args.batch, grid, args.mask_ratio).astype(np.int32),
    }
    if args.method == "moca":  # the two views and the step's masking rounds
        sizes = method.mask_sizes(config, grid * grid)
        stream = iter([{**batch, "label": np.zeros(args.batch, np.int32)}])
        batch = next(method.masked_batches(stream, config, sizes, grid * grid, 0))
        del batch["label"]
    if args.method == "splitmask":  # the one view and the step's split
        stream = iter([{"context": batch["context"]}])
        batch = next(method.masked_batches(stream, grid, config.splitmask.split, 0, 0))
    batch = jax.device_put(batch, trainer.data_sharding)
    state = jax.eval_shape(trainer.init, jax.random.key(0))
    if not args.compile_only:
        state = trainer.init(jax.random.key(0))
    return trainer, state, batch


def peak_memory_gb(compiled) -> float | None:
    """XLA's compiled peak: arguments + outputs - donated aliases + temporaries, in GiB."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return round(total / 2**30, 3)


def main() -> None:
    args = parser().parse_args()

    import jax

    trainer, state, batch = setup(args)
    start = time.perf_counter()
    compiled = trainer.step.lower(state, batch).compile()
    compile_sec = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan")))
    device = jax.devices()[0]
    result = {
        "compile_sec": round(compile_sec, 2),
        "flops_per_step": flops,
        "peak_memory_gb": peak_memory_gb(compiled),
        "device": device.device_kind,
        "num_devices": jax.device_count(),
    }
    if not args.compile_only:
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        sec = statistics.median(times)
        peak = PEAK_TFLOPS.get((device.device_kind, args.dtype))
        result.update(
            sec_per_step=round(sec, 4),
            step_times=[round(t, 4) for t in times],
            images_per_sec=round(args.batch / sec, 2),
            achieved_tflops=round(flops / sec / 1e12, 4),
            mfu=None if peak is None else round(flops / sec / 1e12 / peak, 4),
            loss=float(metrics["loss"]),
        )
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    print(json.dumps({**result, **vars(args)}))


if __name__ == "__main__":
    main()
