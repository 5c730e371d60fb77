#!/bin/bash
# The GPU speed and memory numbers (docs/performance.md, GPU) in one call of the `device` tool (a lent H100 / H200).
#
# The device image has jax, flax, optax, orbax-checkpoint and chex but no ml_collections,
# which the configs need; it cannot download. Prepare here once (.whl/ is git-ignored):
#   python3 -m pip download --no-deps -d .whl ml_collections==1.1.0
# then run it there with  command="bash benchmarks/device_check.sh", carry=[".whl"],
# timeout_s=540. Each result is one JSON line of bench_train.py, in $OUT/bench.jsonl
# (images/s, MFU against the chip's dense peak, XLA's peak memory); stderr in $OUT.
# SIZE and BATCH override 224 and 128 (e.g. SIZE=32 BATCH=2 IMAGES=64 for a CPU smoke run).
# On a GPU run it in two calls that each fit the per-call limit: PART=main (the step lines
# and the loop) and PART=tricks (the CPU-only speed tricks forced on; compare with main's
# first line); the default runs both.
# After the first step-only line, bench_loop.py runs the whole training loop (input, masks,
# step) of the same step on IMAGES (default 2048) synthetic 500x375 JPEGs, with
# config.data.cache 'none' (host decoding) and 'device' (docs/data.md#the-device-cache): its
# loop_images_per_sec_* compare with that line's images_per_sec.
set -uo pipefail
out=${OUT:-/tmp/device_check}
size=${SIZE:-224}
batch=${BATCH:-128}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1  # bench_train.py puts the repository root on sys.path itself
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} | tee "$out/env.txt"

bench() {
  echo "== $*"
  timeout 240 python3 benchmarks/bench_train.py --img-size "$size" --batch "$batch" "$@" \
    2>>"$out/stderr.txt" | tail -1 | tee -a "$out/bench.jsonl"
}
part=${PART:-all}
if [ "$part" != tricks ]; then
bench --variant scott-12/16 --dtype bfloat16 --steps 10 --warmup 3
echo "== loop, cache none and device"
timeout 360 python3 benchmarks/bench_loop.py --synthetic "${IMAGES:-2048}" --variant scott-12/16 \
  --dtype bfloat16 --img-size "$size" --batch "$batch" --steps 10 --warmup 3 --no-step \
  2>>"$out/stderr.txt" | tail -1 | tee -a "$out/bench.jsonl"
bench --variant scott-7/16 --dtype bfloat16 --steps 10 --warmup 3
bench --variant scott-12/16 --dtype float32 --steps 5 --warmup 2
bench --variant scott-12/16 --dtype bfloat16 --remat --steps 5 --warmup 2
fi
[ "$part" = main ] && exit 0
# The CPU-measured tricks, each against the accelerator default (plain XLA paths) of the
# first line: docs/performance.md#gpu. A tricks-only call times that baseline again first.
[ "$part" = tricks ] && bench --variant scott-12/16 --dtype bfloat16 --steps 5 --warmup 2
bench --variant scott-12/16 --dtype bfloat16 --fast-dropout true --steps 5 --warmup 2
bench --variant scott-12/16 --dtype bfloat16 --conv-impl im2col --steps 5 --warmup 2
bench --variant scott-12/16 --dtype bfloat16 --flat-matmuls true --steps 5 --warmup 2
echo "== loop, streaming with the colours in tf.data (color_on_device off)"
timeout 240 python3 benchmarks/bench_loop.py --synthetic "${IMAGES:-2048}" --variant scott-12/16 \
  --dtype bfloat16 --img-size "$size" --batch "$batch" --steps 10 --warmup 3 --no-step \
  --cache none --color-on-device false 2>>"$out/stderr.txt" | tail -1 | tee -a "$out/bench.jsonl"
