"""Images/s of the whole training loop (input, masks, step, metrics) against the step alone.

    python benchmarks/bench_loop.py --data folder:/path/to/images --variant scott-7/16 \
        --img-size 224 --batch 16 --steps 8 --warmup 2 --cache none device

For each ``--cache`` mode (``config.data.cache``) it runs ``loop.train_and_evaluate`` with
configs/flowers.py's recipe (MIM-JEPA, aug 'diff') on the dataset for warmup + steps steps in a
fresh workdir and reads the images/s of the steps after the warmup from metrics.jsonl (the
loop logs every step); then it times ``bench_train.py`` at the same settings (the step alone, on
synthetic input) in a subprocess. Prints one JSON line: loop_images_per_sec per mode,
step_images_per_sec, the ratios loop / step, the load average. ``--synthetic N`` first writes N
500x375 JPEGs to a temporary folder (for a machine without data) and uses it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `configs`


def synthetic_folder(root: str, count: int) -> str:
    """count 500x375 JPEGs (gradients, blobs and noise) under root/train/c0..c9."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:375, :500]
    for i in range(count):
        folder = os.path.join(root, "train", f"c{i % 10}")
        os.makedirs(folder, exist_ok=True)
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([yy * a * 0.6, xx * b * 0.5, (yy + xx) * c * 0.3], -1)
        blobs = np.kron(rng.normal(0, 30, (47, 63, 3)), np.ones((8, 8, 1)))[:375, :500]
        image = np.clip(base + blobs + rng.normal(0, 6, (375, 500, 3)), 0, 255)
        Image.fromarray(image.astype(np.uint8)).save(f"{folder}/{i}.jpg", quality=90)
    return f"folder:{root}"


def loop_images_per_sec(args, cache: str, workdir: str) -> float:
    """Images/s of the loop's steps after the warmup (total images / total time)."""
    from configs import flowers
    from scott_jax import loop
    from scott_jax.writers import read_metrics

    config = flowers.get_config()
    config.data.name = args.data
    config.data.cache = cache
    config.variant, config.img_size, config.batch_size = args.variant, args.img_size, args.batch
    config.compute_dtype = args.dtype
    if args.color_on_device != "auto":
        config.data.color_on_device = args.color_on_device == "true"
    config.log_every_steps = 1
    config.checkpoint_every_steps = 10**9
    loop.train_and_evaluate(config, workdir, stop_at_step=args.warmup + args.steps)
    rows = [r for r in read_metrics(workdir) if "images_per_sec" in r]
    timed = [r["images_per_sec"] for r in rows if r["step"] > args.warmup]
    return len(timed) * args.batch / sum(args.batch / x for x in timed)


def step_images_per_sec(args) -> float:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train.py"),
        f"--variant={args.variant}",
        f"--img-size={args.img_size}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--dtype={args.dtype}",
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a config.data.name, e.g. folder:PATH")
    parser.add_argument("--synthetic", type=int, default=0, help="write N JPEGs and use them")
    parser.add_argument("--variant", default="scott-7/16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cache", nargs="+", default=["none", "device"])
    parser.add_argument(
        "--color-on-device",
        choices=["auto", "true", "false"],
        default="auto",
        help="config.data.color_on_device for the streaming loop (auto: on GPU / TPU only)",
    )
    parser.add_argument("--no-step", action="store_true", help="skip the step-only timing")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            args.data = synthetic_folder(os.path.join(tmp, "data"), args.synthetic)
        result = {
            f"loop_images_per_sec_{cache}": round(
                loop_images_per_sec(args, cache, os.path.join(tmp, f"run_{cache}")), 2
            )
            for cache in args.cache
        }
    if not args.no_step:
        step = step_images_per_sec(args)
        result["step_images_per_sec"] = step
        for cache in args.cache:
            result[f"loop_over_step_{cache}"] = round(
                result[f"loop_images_per_sec_{cache}"] / step, 3
            )
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({**result, **vars(args)}))


if __name__ == "__main__":
    main()
