"""Keep-mask generation throughput on one CPU core (scott_jax/masking.py).

Masks are drawn on the host for every training batch, so they must cost far less than
a training step. Prints one JSON line: wall-clock figures, and the same from process CPU
time (cpu_*), which is what one core costs even when the machine is shared.

    python benchmarks/bench_masks.py --grid 14 --batch 128 --ratio 0.6 --type blockwise
"""

import argparse
import json
import time

from scott_jax.masking import BLOCKS_ARE, MASK_TYPES, keep_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=14, help="patches per side")
    parser.add_argument("--batch", type=int, default=128, help="masks per call")
    parser.add_argument("--ratio", type=float, default=0.6, help="masked fraction")
    parser.add_argument("--type", choices=MASK_TYPES, default="blockwise")
    parser.add_argument("--blocks-are", choices=BLOCKS_ARE, default="kept")
    parser.add_argument("--batches", type=int, default=50, help="timed calls (steps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def draw(step: int):
        return keep_masks(
            args.seed, step, args.batch, args.grid, args.ratio, args.type, args.blocks_are
        )

    draw(0)  # warm-up: builds the cached block tables
    times = []
    cpu_start = time.process_time()
    for step in range(1, args.batches + 1):
        start = time.perf_counter()
        draw(step)
        times.append(time.perf_counter() - start)
    cpu_sec_per_batch = (time.process_time() - cpu_start) / args.batches
    sec_per_batch = sum(times) / len(times)
    result = {
        "masks_per_sec": round(args.batch / sec_per_batch, 1),
        "sec_per_batch": round(sec_per_batch, 6),
        "best_sec_per_batch": round(min(times), 6),
        "cpu_masks_per_sec": round(args.batch / cpu_sec_per_batch, 1),
        "cpu_sec_per_batch": round(cpu_sec_per_batch, 6),
        "grid": args.grid,
        "batch": args.batch,
        "ratio": args.ratio,
        "type": args.type,
        "blocks_are": args.blocks_are,
        "batches": args.batches,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
