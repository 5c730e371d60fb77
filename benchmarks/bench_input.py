"""Throughput of the pretraining input pipeline (two augmented views per image), in images/s.

    python benchmarks/bench_input.py --data folder:/path/to/images --img-size 224 --batches 20

Prints one JSON line: images_per_sec (after a warm-up batch), images_per_sec_per_core (over the
cores TensorFlow may use) and the arguments. A GPU step that consumes N images/s needs about
N / images_per_sec_per_core host cores for the input.
"""

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="a config.data.name, e.g. folder:PATH")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--aug", default="diff")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from scott_jax.data import load_source, pretrain_batches

    source = load_source(args.data, "pretrain", data_dir=args.data_dir)
    batches = pretrain_batches(
        source, batch_size=args.batch, img_size=args.img_size, seed=args.seed, aug=args.aug
    )
    next(batches)  # builds and warms up the tf.data pipeline
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)
    seconds = time.perf_counter() - start
    assert batch["context"].shape == (args.batch, args.img_size, args.img_size, 3)
    cores = len(os.sched_getaffinity(0))
    images_per_sec = args.batches * args.batch / seconds
    print(
        json.dumps(
            {
                "images_per_sec": round(images_per_sec, 1),
                "images_per_sec_per_core": round(images_per_sec / cores, 1),
                "cores": cores,
                "sec_per_batch": round(seconds / args.batches, 4),
                "num_examples": source.num_examples,
                **vars(args),
            }
        )
    )


if __name__ == "__main__":
    main()
