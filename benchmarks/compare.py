"""Our step vs the official PyTorch step, alternated in one invocation on the same machine.

    python benchmarks/compare.py --reference-dir /tmp/scott_ref --variant scott-12/16 \
        --img-size 224 --batch 8 --rounds 2 --steps 3 --warmup 2

Runs bench_train.py (ours) and bench_reference.py (official) as subprocesses, alternating
A B A B ... for --rounds rounds so that machine load hits both sides alike, and pools each
side's step times. Prints one JSON line: ours_sec_per_step and official_sec_per_step
(medians), ratio = ours / official (< 1: ours is faster; the target is <= 0.7), speedup,
each side's images_per_sec, flops_per_step and compile_sec, and the 1-minute load average
before and after. It also runs bench_gemm.py once: `gemm_gflops` is the faster framework's
rate on the step's main matmuls, `*_floor_sec` = flops_per_step / gemm_gflops, and
`floor_ratio` = ours_floor_sec / official_sec_per_step, the lowest ratio our FLOPs allow.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def significant(seconds: float) -> float:
    """Four significant digits: a fixed number of decimals would blur millisecond floors."""
    return float(f"{seconds:.4g}")


def run_json(command: list[str]) -> dict:
    """Runs a benchmark script; returns the JSON object on its last stdout line."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def commands(args) -> dict[str, list[str]]:
    """The two benchmark command lines, same variant / size / batch / steps."""
    shared = [
        f"--variant={args.variant}",
        f"--img-size={args.img_size}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--mask-ratio={args.mask_ratio}",
    ]
    return {
        "ours": [sys.executable, str(HERE / "bench_train.py"), *shared, *args.ours_args],
        "official": [
            sys.executable,
            str(HERE / "bench_reference.py"),
            f"--reference-dir={args.reference_dir}",
            f"--threads={args.threads}",
            *shared,
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", required=True, help="official SCOTT checkout")
    parser.add_argument("--variant", default="scott-7/16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="A B alternations")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument(
        "--ours-args", nargs=argparse.REMAINDER, default=[], help="extra bench_train.py flags"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    gemm = run_json(
        [
            sys.executable,
            str(HERE / "bench_gemm.py"),
            f"--variant={args.variant}",
            f"--img-size={args.img_size}",
            f"--batch={args.batch}",
            f"--threads={args.threads}",
        ]
    )["gemm_gflops"]
    runs = {"ours": [], "official": []}
    for _ in range(args.rounds):
        for side, command in commands(args).items():
            runs[side].append(run_json(command))
    result = {}
    for side, results in runs.items():
        times = [t for r in results for t in r["step_times"]]
        sec = statistics.median(times)
        result[f"{side}_sec_per_step"] = significant(sec)
        result[f"{side}_images_per_sec"] = round(args.batch / sec, 2)
        result[f"{side}_step_times"] = times
        result[f"{side}_flops_per_step"] = results[0]["flops_per_step"]
        result[f"{side}_compile_sec"] = results[0]["compile_sec"]
        result[f"{side}_floor_sec"] = significant(results[0]["flops_per_step"] / (gemm * 1e9))
    ratio = result["ours_sec_per_step"] / result["official_sec_per_step"]
    result.update(
        ratio=round(ratio, 4),
        speedup=round(1 / ratio, 3),
        gemm_gflops=gemm,
        floor_ratio=round(result["ours_floor_sec"] / result["official_sec_per_step"], 4),
        load_avg_before=round(load_before, 2),
        load_avg_after=round(os.getloadavg()[0], 2),
        wall_sec=round(time.perf_counter() - start, 1),
        cpu_count=os.cpu_count(),
        **{k: v for k, v in vars(args).items() if k != "ours_args"},
        ours_args=args.ours_args,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
