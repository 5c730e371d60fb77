"""Throughput of the pretraining input pipeline (two augmented views per image), in images/s.

    python benchmarks/bench_input.py --data folder:/path/to/images --img-size 224 --batches 20

Prints one JSON line: images_per_sec (wall clock, after a warm-up batch),
images_per_sec_per_core (that over the cores TensorFlow may use), images_per_cpu_sec (images
per second of CPU time the process used: what one fully busy core delivers, and less disturbed
than the wall clock by other processes on the machine), the load average and the arguments. A
GPU step that consumes N images/s needs about N / images_per_cpu_sec host cores for the input.

``--cache device`` measures a cached run instead (``config.data.cache='device'``): it builds the
device cache (cache_build_sec, cache_gib, peak_rss_gb) and then times the host's whole share of
a step, the index stream and its transfer to the device (``pretrain_indices`` + ``to_global``).
Both modes print host_ms_per_image, the host CPU time per image. With ``--time-device`` the
cached mode also times ``device_cache.make_views`` (crop, resize, flip, colour, normalise; both
views) on one batch, as the step runs it on this backend (device_map: one example at a time on
a single CPU device, vectorised elsewhere; ``--vectorised`` forces the vectorised form), the
median of 10 calls (device_ms_per_batch), and prints the XLA cost analysis FLOPs of the
vectorised form (device_flops_per_batch: it counts every op for every example, an upper bound
of what the one-at-a-time form runs, whose loop the cost analysis counts once).

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
    parser.add_argument(
        "--time-device", action="store_true", help="with --color-on-device or --cache device"
    )
    parser.add_argument(
        "--vectorised", action="store_true", help="--cache device --time-device: time vmap"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="none", choices=["none", "device"])
    parser.add_argument("--cache-size", type=int, default=None, help="config.data.cache_size")
    args = parser.parse_args()
    if args.cache == "device":
        print(json.dumps({**cached(args), **vars(args)}))
        return

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
        "host_ms_per_image": round(1000 * cpu_seconds / (args.batches * args.batch), 4),
        "cores": cores,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "sec_per_batch": round(seconds / args.batches, 4),
        "num_examples": source.num_examples,
    }
    if args.color_on_device and args.time_device:
        result.update(device_cost(images, args.aug, args.seed))
    print(json.dumps({**result, **vars(args)}))


def cached(args) -> dict:
    """Build time and size of the device cache, then the host CPU per image of the cached
    stream (index batches and their transfer), and with --time-device the views' cost."""
    import resource

    import jax

    from scott_jax.data import cache_build, load_source, pretrain_indices
    from scott_jax.sharding import make_mesh, to_global

    source = load_source(args.data, "pretrain", data_dir=args.data_dir)
    mesh = make_mesh()
    start, start_cpu = time.perf_counter(), time.process_time()
    cache = cache_build.load_device_cache(
        source,
        mode="device",
        img_size=args.img_size,
        cache_size=args.cache_size,
        budget_gb=1e9,
        mesh=mesh,
    )
    build_sec, build_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    stream = pretrain_indices(source, batch_size=args.batch, seed=args.seed)
    jax.block_until_ready(to_global(next(stream), sharding))
    batches = max(args.batches, 200)  # a batch takes microseconds
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = to_global(next(stream), sharding)
    jax.block_until_ready(batch)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    result = {
        "host_ms_per_image": round(1000 * cpu_seconds / (batches * args.batch), 5),
        "images_per_cpu_sec": round(batches * args.batch / cpu_seconds, 1),
        "images_per_sec": round(batches * args.batch / seconds, 1),
        "cache_build_sec": round(build_sec, 1),
        "cache_build_cpu_sec": round(build_cpu, 1),
        "cache_shape": list(cache.images.shape),
        "cache_gib": round(cache.images.nbytes / 2**30, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "num_examples": source.num_examples,
    }
    if args.time_device:
        result.update(views_cost(cache, batch["context"], args))
    return result


def views_cost(cache, refs, args) -> dict:
    """Median milliseconds per batch of the jitted ``device_cache.make_views`` (both views of
    the index batch ``refs``) and the FLOPs of its vectorised form."""
    import statistics

    import jax

    from scott_jax.data import device_augment, device_cache

    def compiled(sequential):
        make = jax.jit(
            lambda c, refs: device_cache.make_views(
                c,
                refs[:, 0],
                refs[:, 1],
                seed=args.seed,
                img_size=args.img_size,
                aug=args.aug,
                sequential=sequential,
            )
        )
        return make.lower(cache, refs).compile()

    sequential = not args.vectorised and device_augment.sequential_by_default()
    run = compiled(sequential)
    jax.block_until_ready(run(cache, refs))
    seconds = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(run(cache, refs))
        seconds.append(time.perf_counter() - start)
    cost = (compiled(False) if sequential else run).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "device": str(jax.devices()[0].platform),
        "device_map": "one at a time" if sequential else "vectorised",
        "device_ms_per_batch": round(1000 * statistics.median(seconds), 2),
        "device_ms_per_batch_min": round(1000 * min(seconds), 2),
        "device_flops_per_batch": float(cost.get("flops", float("nan"))),
    }


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
