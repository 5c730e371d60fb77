"""Time the full MIM-JEPA pretraining step on synthetic input (no data loading).

    python benchmarks/bench_train.py --variant scott-7/16 --img-size 224 --batch 8 \
        --steps 5 --warmup 2

The step is the one the training loop runs (`scott_jax.train.build_trainer`): target forward,
masked context forward, predictor, loss, backward, AdamW and EMA, jitted and donated. Prints
one JSON line: sec_per_step (median over --steps, compilation and --warmup steps excluded),
images_per_sec, compile_sec, flops_per_step (XLA's cost analysis), achieved_tflops, and on a
GPU/TPU with a known peak the MFU.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `configs`

#: Dense peak TFLOP/s by device kind and compute dtype, for MFU.
PEAK_TFLOPS = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989.0,
    ("NVIDIA H100 80GB HBM3", "float32"): 67.0,
    ("NVIDIA H200", "bfloat16"): 989.0,
    ("NVIDIA H200", "float32"): 67.0,
    ("NVIDIA A100-SXM4-80GB", "bfloat16"): 312.0,
    ("NVIDIA A100-SXM4-40GB", "bfloat16"): 312.0,
    ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="scott-7/16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    args = parser.parse_args()

    import jax
    import numpy as np

    from configs import common
    from scott_jax import masking, train
    from scott_jax.sharding import make_mesh

    config = common.get_config()
    config.variant, config.img_size, config.batch_size = args.variant, args.img_size, args.batch
    config.compute_dtype = args.dtype
    lengths = dict(steps_per_epoch=100, total_steps=10_000, warmup_steps=1_000)
    trainer = train.build_trainer(config, lengths, make_mesh())
    rng = np.random.default_rng(0)
    shape = (args.batch, args.img_size, args.img_size, 3)
    grid = trainer.grid_size
    batch = {
        "context": rng.standard_normal(shape, np.float32),
        "target": rng.standard_normal(shape, np.float32),
        "keep_mask": masking.keep_masks(0, 0, args.batch, grid, args.mask_ratio).astype(np.int32),
    }
    batch = jax.device_put(batch, trainer.data_sharding)
    state = trainer.init(jax.random.key(0))

    start = time.perf_counter()
    compiled = trainer.step.lower(state, batch).compile()
    compile_sec = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan")))
    memory = compiled.memory_analysis()

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    device = jax.devices()[0]
    peak = PEAK_TFLOPS.get((device.device_kind, args.dtype))
    result = {
        "sec_per_step": round(sec, 4),
        "images_per_sec": round(args.batch / sec, 2),
        "compile_sec": round(compile_sec, 2),
        "flops_per_step": flops,
        "achieved_tflops": round(flops / sec / 1e12, 4),
        "step_times": [round(t, 4) for t in times],
        "mfu": None if peak is None else round(flops / sec / 1e12 / peak, 4),
        "peak_memory_gb": None
        if memory is None
        else round((memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 2**30, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "device": device.device_kind,
        "num_devices": jax.device_count(),
        "loss": float(metrics["loss"]),
        **vars(args),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
