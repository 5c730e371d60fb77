"""Each benchmark script runs for one step at a tiny size and prints one JSON line with its keys.

The official-code benchmarks (bench_reference.py, compare.py) need torch and an official
SCOTT checkout: $SCOTT_REFERENCE_DIR, else /tmp/scott_ref; they are skipped without them.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
REFERENCE = Path(os.environ.get("SCOTT_REFERENCE_DIR", "/tmp/scott_ref"))
TINY = ["--variant=scott-3/16", "--img-size=32", "--batch=2", "--steps=1", "--warmup=1"]
TRAIN_KEYS = {
    "sec_per_step",
    "step_times",
    "images_per_sec",
    "compile_sec",
    "flops_per_step",
    "achieved_tflops",
    "mfu",
    "peak_memory_gb",
    "peak_rss_gb",
}

needs_reference = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None
    or not (REFERENCE / "src" / "models" / "scott.py").is_file(),
    reason="needs torch and an official SCOTT checkout ($SCOTT_REFERENCE_DIR or /tmp/scott_ref)",
)


def one_device_env() -> dict:
    """The test environment without conftest's 8 host devices (its other XLA flags stay)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "XLA_FLAGS": " ".join(flags)}


def run(script: str, *args: str, timeout: int = 300) -> dict:
    """Runs benchmarks/<script> on one CPU device; returns its JSON line (the only one)."""
    env = one_device_env()
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def positive(result: dict, *keys: str) -> None:
    for key in keys:
        assert result[key] > 0, (key, result[key])


def test_bench_train():
    result = run("bench_train.py", *TINY)
    assert TRAIN_KEYS <= result.keys()
    positive(result, "sec_per_step", "images_per_sec", "flops_per_step", "peak_memory_gb")
    assert len(result["step_times"]) == 1
    assert result["images_per_sec"] == pytest.approx(2 / result["sec_per_step"], rel=0.02)


def test_bench_train_compile_only_reports_memory_without_running():
    result = run("bench_train.py", *TINY, "--compile-only", "--remat", "--conv-impl=xla")
    positive(result, "flops_per_step", "peak_memory_gb", "compile_sec")
    assert "sec_per_step" not in result and result["remat"] is True


def test_profile_step_shares_add_up():
    result = run("profile_step.py", *TINY)
    positive(result, "sec_per_step", "op_sec")
    for group in ("parts", "phases"):
        assert sum(v["share"] for v in result[group].values()) == pytest.approx(1.0, abs=0.01)
    assert {"tokenizer_conv", "attention", "ffn", "predictor"} <= result["parts"].keys()
    assert {"target", "forward", "backward", "update"} <= result["phases"].keys()


def test_bench_masks():
    result = run("bench_masks.py", "--grid=4", "--batch=4", "--batches=1")
    positive(result, "masks_per_sec", "sec_per_batch", "cpu_masks_per_sec")
    assert result["grid"] == 4 and result["batch"] == 4


def test_bench_input():
    result = run("bench_input.py", "--data=digits", "--img-size=32", "--batch=4", "--batches=1")
    positive(result, "images_per_sec", "images_per_cpu_sec", "sec_per_batch")


def test_bench_gemm():
    result = run("bench_gemm.py", "--variant=scott-3/16", "--img-size=32", "--repeats=1")
    assert set(result["jax_per_shape_gflops"]) == {
        "qkv",
        "proj",
        "ffn_w12",
        "ffn_last",
        "stem_im2col",
    }
    positive(result, "jax_gemm_gflops", "gemm_gflops")
    assert all(rate > 0 for rate in result["jax_per_shape_gflops"].values())
    assert result["gemm_gflops"] >= result["jax_gemm_gflops"]


@needs_reference
def test_bench_reference():
    result = run("bench_reference.py", f"--reference-dir={REFERENCE}", *TINY[:-1], "--warmup=1")
    positive(result, "sec_per_step", "images_per_sec", "flops_per_step", "peak_rss_gb")
    assert len(result["step_times"]) == 1


@needs_reference
def test_compare_alternates_and_reports_the_ratio():
    result = run("compare.py", f"--reference-dir={REFERENCE}", *TINY, "--rounds=1")
    positive(result, "ours_sec_per_step", "official_sec_per_step", "ratio")
    assert result["ratio"] == pytest.approx(
        result["ours_sec_per_step"] / result["official_sec_per_step"], rel=0.01
    )
    floor = result["ours_flops_per_step"] / (result["gemm_gflops"] * 1e9)
    assert result["ours_floor_sec"] == pytest.approx(floor, rel=0.01)
    assert result["floor_ratio"] == pytest.approx(floor / result["official_sec_per_step"], rel=0.01)
    # The same model on both sides. XLA also counts element-wise FLOPs, which torch's
    # counter leaves out: a quarter more at this size, within 3% at 224 px.
    assert result["ours_flops_per_step"] == pytest.approx(
        result["official_flops_per_step"], rel=0.5
    )


@needs_reference
def test_reference_pretrain_logs_our_keys_on_our_schedule(tmp_path):
    """Two official steps on the digits batches: our metric keys, and the official LR / WD /
    EMA schedulers give the values of our schedule for the same config."""
    out = tmp_path / "reference.jsonl"
    overrides = ["--config.batch_size=8", "--config.log_every_steps=1", "--config.num_epochs=4"]
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "reference_pretrain.py"),
            f"--reference_dir={REFERENCE}",
            "--config=configs/digits.py",
            *overrides,
            "--steps=2",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS.parent,
        env=one_device_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert 0 < rows[0]["loss"] < 10 and rows[0]["context_std"] > 0 and rows[0]["target_std"] > 0
    assert 0 <= rows[-1]["knn/target_top1"] <= 100 and "knn/context_top1" in rows[-1]

    from configs import digits
    from scott_jax import optim
    from scott_jax.data import load_source

    config = digits.get_config()
    config.batch_size, config.num_epochs = 8, 4
    lengths = optim.run_lengths(
        load_source("digits", "pretrain").num_examples,
        config.batch_size,
        config.num_epochs,
        config.optim.lr_warmup_epochs,
    )
    schedules = optim.make(config.optim, lengths, ema_kind="linear").schedules
    for count, row in enumerate(rows):
        ours = schedules(count)
        for key in ("lr", "wd", "ema"):
            assert row[key] == pytest.approx(float(ours[key]), rel=1e-5), (key, count)
