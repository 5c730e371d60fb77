"""Throughput of the pretraining input pipeline (two augmented views per image), in images/s.

    python benchmarks/bench_input.py --data folder:/path/to/images --img-size 224 --batches 20

Prints one JSON line: images_per_sec (wall clock, after a warm-up batch),
images_per_sec_per_core (that over the cores TensorFlow may use), images_per_cpu_sec (images
per second of CPU time the process used: what one fully busy core delivers, and less disturbed
than the wall clock by other processes on the machine), the load average and the arguments. A
GPU step that consumes N images/s needs about N / images_per_cpu_sec host cores for the input.

``--color-on-device`` measures the pipeline mode that leaves the colour augmentation and the
normalisation to the jitted step (``config.data.color_on_device``); ``--time-device`` then
also times ``device_augment.two_views`` on one batch on JAX's default backend
(device_ms_per_batch), so that on a GPU machine one run tells both halves of the cost.
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
    parser.add_argument("--color-on-device", action="store_true")
    parser.add_argument("--time-device", action="store_true", help="with --color-on-device")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from scott_jax.data import load_source, pretrain_batches

    source = load_source(args.data, "pretrain", data_dir=args.data_dir)
    batches = pretrain_batches(
        source,
        batch_size=args.batch,
        img_size=args.img_size,
        seed=args.seed,
        aug=args.aug,
        color_on_device=args.color_on_device,
    )
    next(batches)  # builds and warms up the tf.data pipeline
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        batch = next(batches)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    images = batch["view" if args.color_on_device else "context"]
    assert images.shape == (args.batch, args.img_size, args.img_size, 3)
    cores = len(os.sched_getaffinity(0))
    images_per_sec = args.batches * args.batch / seconds
    result = {
        "images_per_sec": round(images_per_sec, 1),
        "images_per_sec_per_core": round(images_per_sec / cores, 1),
        "images_per_cpu_sec": round(args.batches * args.batch / cpu_seconds, 1),
        "cores": cores,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "sec_per_batch": round(seconds / args.batches, 4),
        "num_examples": source.num_examples,
    }
    if args.color_on_device and args.time_device:
        result.update(device_cost(images, args.aug, args.seed))
    print(json.dumps({**result, **vars(args)}))


def device_cost(views, aug: str, seed: int) -> dict:
    """Milliseconds per batch of the jitted ``device_augment.two_views`` on JAX's default device."""
    import jax

    from scott_jax.data import device_augment

    step = jax.jit(lambda v, key: device_augment.two_views(v, key, aug))
    views = jax.device_put(views)
    key = jax.random.key(seed)
    jax.block_until_ready(step(views, key))  # compile
    repeats = 5
    start = time.perf_counter()
    for i in range(repeats):
        out = step(views, jax.random.fold_in(key, i))
    jax.block_until_ready(out)
    return {
        "device": str(jax.devices()[0].platform),
        "device_ms_per_batch": round(1000 * (time.perf_counter() - start) / repeats, 2),
    }


if __name__ == "__main__":
    main()
