"""Fault injection: what a careful user and an unlucky cluster do to a run, and what must
hold (docs/reliability.md): one run per workdir, nothing non-finite saved, damaged
checkpoints found and skipped, data that changes under a run never used silently, bad
values refused before anything starts, exit codes a scheduler can read."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_loop import ROOT, tiny_config

from scott_jax import cli, loop
from scott_jax.checkpoint import Checkpointer, load_state_tree, preemption_guard
from scott_jax.data import load_source, pretrain_batches
from scott_jax.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergedError,
    LockError,
    UserError,
)
from scott_jax.evaluators.backbone import load_backbone
from scott_jax.methods import mim_jepa
from scott_jax.methods.base import with_state_check
from scott_jax.writers import MetricWriter, read_metrics


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


# --------------------------------------------------------------------------- the workdir lock


def test_a_second_run_on_a_held_workdir_fails_at_once_naming_the_holder(tmp_path):
    """The lock is the kernel's: it holds while the holder lives and goes with SIGKILL."""
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from scott_jax import workdir_lock
                with workdir_lock.hold({str(workdir)!r}):
                    print("held", flush=True)
                    time.sleep(300)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(LockError, match=rf"in use by another run \(pid {holder.pid} on host"):
            loop.train_and_evaluate(tiny_config(), workdir)
        assert time.monotonic() - started < 10  # refused before loading data or compiling
        assert sorted(p.name for p in workdir.iterdir()) == [".lock"]
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    from scott_jax import workdir_lock

    with workdir_lock.hold(str(workdir)):  # released by the kernel
        pass


def test_probe_reads_a_run_whose_workdir_is_held(tmp_path):
    from scott_jax import workdir_lock

    workdir = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "v0_run" / "digits", workdir)
    with workdir_lock.hold(str(workdir)):
        assert load_backbone(workdir).step == 2


# --------------------------------------------------------------------------- non-finite state


def test_state_check_flags_a_non_finite_update_with_a_finite_loss():
    def step(state, batch):
        return {"w": state["w"] * batch}, {"loss": jnp.float32(1.0)}

    checked = jax.jit(with_state_check(step))
    _, ok = checked({"w": jnp.ones(3)}, jnp.float32(2.0))
    _, bad = checked({"w": jnp.ones(3)}, jnp.float32(jnp.inf))
    assert float(ok["state_finite"]) == 1.0 and float(bad["state_finite"]) == 0.0
    assert float(bad["loss"]) == 1.0


@pytest.mark.slow
def test_a_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    """Step 3 leaves NaN parameters behind a finite loss (a too-high LR does this): the run
    stops before its step-4 save and names step 2, the last finite checkpoint."""
    clean = mim_jepa.train_step

    def poisoned(state, batch, **kwargs):
        new_state, metrics = clean(state, batch, **kwargs)
        params = jax.tree.map(lambda x: jnp.where(state.step == 2, jnp.nan, x), new_state.params)
        return new_state.replace(params=params), metrics

    monkeypatch.setattr(mim_jepa, "train_step", poisoned)
    with pytest.raises(DivergedError, match=r"loss is .* but the parameters .* step 3.* step 2 in"):
        loop.train_and_evaluate(tiny_config(), tmp_path, stop_at_step=6)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]
    assert np.isfinite(losses(tmp_path)[2])
    tree = load_state_tree(tmp_path / "checkpoints")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree["params"]))


# --------------------------------------------------------------------------- damaged checkpoints


def chunk_files(step_dir: Path) -> list[Path]:
    """The state's array chunks (orbax OCDBT data files), largest first."""
    chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(chunks, key=lambda p: p.stat().st_size, reverse=True)


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "bit flip in a chunk": lambda step: flip_a_bit(chunk_files(step)[0]),
    "truncated chunk": lambda step: os.truncate(chunk_files(step)[0], 100),
    "deleted _METADATA": lambda step: (step / "state" / "_METADATA").unlink(),
    "deleted state": lambda step: shutil.rmtree(step / "state"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run and one stopped at step 4 (checkpoints 2 and 4)."""
    root = tmp_path_factory.mktemp("runs")
    loop.train_and_evaluate(tiny_config(), root / "full", stop_at_step=6)
    loop.train_and_evaluate(tiny_config(), root / "stopped", stop_at_step=4)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_reported_and_skipped(runs, damage, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(runs / "stopped", workdir)
    DAMAGE[damage](workdir / "checkpoints" / "4")
    # probe.py: one paragraph naming the damaged step and the intact one.
    with pytest.raises(CheckpointError, match=r"step 4 .* is damaged: .*intact steps: 2"):
        load_state_tree(workdir / "checkpoints")
    # The run resumes from step 2 after saying so, and trains as the uninterrupted run.
    config = tiny_config()
    state = loop.train_and_evaluate(config, workdir, stop_at_step=6).state
    assert "checkpoint step 4" in caplog.text and "Resuming from step 2" in caplog.text
    assert int(state.step) == 6
    assert [p.name.split("-")[0] for p in (workdir / "damaged").iterdir()] == ["4"]
    resumed, full = losses(workdir), losses(runs / "full")
    np.testing.assert_allclose([resumed[s] for s in (3, 4, 5, 6)], [full[s] for s in (3, 4, 5, 6)])


@pytest.mark.slow
def test_without_fallback_a_damaged_checkpoint_stops_the_run(runs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(runs / "stopped", workdir)
    flip_a_bit(chunk_files(workdir / "checkpoints" / "4")[0])
    with pytest.raises(CheckpointError, match=r"step 4 .* is damaged"):
        loop.train_and_evaluate(tiny_config(checkpoint_fallback=False), workdir)


def test_retention_keeps_the_last_verified_checkpoint(tmp_path):
    """Only checkpoints older than one that was read back intact are deleted."""
    state = {"w": np.random.default_rng(0).standard_normal(20_000).astype(np.float32)}
    with Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(step, {"w": state["w"] + step}, {})
        checkpointer.wait()
        assert checkpointer.all_steps() == [3]
        checkpointer.save(4, {"w": state["w"] + 4}, {})
        checkpointer._manager.wait_until_finished()
        flip_a_bit(chunk_files(tmp_path / "4")[0])
        with pytest.raises(CheckpointError, match=r"step 4 .* damaged: 1 array.*, right after"):
            checkpointer.wait()
        assert checkpointer.all_steps() == [3, 4]  # 3 stays: 4 did not verify


# --------------------------------------------------------------------------- data changes


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)


def image_tree(root: Path, per_class: int = 10) -> Path:
    for cls in range(2):
        for i in range(per_class):
            write_png(root / "train" / f"c{cls}" / f"{i}.png", 20 * cls + i)
    return root


def test_unreadable_files_at_start_up_are_skipped_and_named(tmp_path):
    root = image_tree(tmp_path / "data")
    (root / "train/c0/loop_a.png").symlink_to(root / "train/c0/loop_b.png")
    (root / "train/c0/loop_b.png").symlink_to(root / "train/c0/loop_a.png")
    (root / "train/c1/gone.png").symlink_to(root / "nowhere.png")
    source = load_source(f"folder:{root}", "pretrain")
    assert source.num_examples == 20
    assert sorted(Path(p).name for p in source.skipped_files) == [
        "gone.png",
        "loop_a.png",
        "loop_b.png",
    ]


@pytest.mark.parametrize("change", ["deleted", "rewritten"])
def test_a_file_that_changes_during_the_run_is_skipped_and_counted(tmp_path, change):
    root = image_tree(tmp_path / "data")
    source = load_source(f"folder:{root}", "pretrain")
    batches = pretrain_batches(source, batch_size=4, img_size=16, seed=0)
    victim = Path(source.images[3])
    if change == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes() + b"\0" * 10)  # same image, other size
    for _ in range(10):  # two epochs of 5 steps: every file is read twice
        batch = next(batches)
        assert batch["context"].shape == (4, 16, 16, 3)
    assert batches.skipped == 2


@pytest.mark.slow
def test_resuming_on_a_dataset_of_another_size_is_an_error(tmp_path):
    root = image_tree(tmp_path / "data", per_class=16)
    config = tiny_config(num_epochs=3, **{"data.name": f"folder:{root}", "data.aug": "none"})
    loop.train_and_evaluate(config, tmp_path / "run", stop_at_step=2)
    write_png(root / "train" / "c0" / "new.png", 200)
    with pytest.raises(DataError, match=r"has 33 examples, but the run was checkpointed with 32"):
        loop.train_and_evaluate(config, tmp_path / "run", stop_at_step=3)
    config.data.accept_changed_dataset = True
    assert int(loop.train_and_evaluate(config, tmp_path / "run", stop_at_step=3).state.step) == 3


# --------------------------------------------------------------------------- bad values


BAD_VALUES = [
    ({"optim.lr_peak": -1e-4}, r"config.optim.lr_peak=-0.0001 must lie in \[0, inf\]"),
    ({"batch_size": 0}, r"config.batch_size=0 must lie in \[1, inf\]"),
    ({"batch_size": 12}, "config.batch_size=12 must be divisible by the 8 devices"),
    ({"mask.ratio": 0.0}, r"config.mask.ratio=0.0 must lie in \(0, 1\)"),
    ({"log_every_steps": 0}, r"config.log_every_steps=0 must lie in \[1, inf\]"),
    ({"num_epochs": 0}, r"config.num_epochs=0 must lie in \(0, inf\]"),
    ({"model.dropout_rate": 1.0}, r"config.model.dropout_rate=1.0 must lie in \[0, 1\)"),
    ({"data.aug": "strong"}, "config.data.aug='strong' must be one of"),
    ({"data.crop_scale": (0.5, 0.2)}, "config.data.crop_scale=.* must be .low, high."),
    ({"compute_dtype": "fp8"}, "config.compute_dtype='fp8' must be one of"),
    ({"optim.ema_final": 1.5}, r"config.optim.ema_final=1.5 must lie in \[0, 1\]"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES)
def test_bad_values_are_refused_before_anything_starts(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        loop.train_and_evaluate(tiny_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_several_bad_values_are_one_error_with_one_line_each(tmp_path):
    config = tiny_config(**{"optim.lr_peak": -1.0, "log_every_steps": 0})
    with pytest.raises(ConfigError) as error:
        loop.train_and_evaluate(config, tmp_path / "run")
    lines = str(error.value).splitlines()
    assert len(lines) == 3 and "lr_peak" in lines[1] and "log_every_steps" in lines[2]


def test_launch_prints_a_known_error_without_a_traceback(tmp_path):
    command = [sys.executable, "launch.py", "--config", "configs/digits.py"]
    command += ["--config.optim.lr_peak=-1e-4", "--workdir", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == cli.EXIT_USER_ERROR
    assert "error: config.optim.lr_peak=-0.0001 must lie in [0, inf]" in result.stderr
    assert "Traceback" not in result.stderr
    verbose = subprocess.run(
        [*command, "--verbose"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_probe_prints_a_known_error_without_a_traceback(tmp_path):
    command = [sys.executable, "probe.py", "--workdir", str(tmp_path / "nothing")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == cli.EXIT_USER_ERROR
    assert "error: " in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- exit codes


def test_interrupted_runs_exit_with_the_shells_signal_codes():
    assert cli.interrupted_exit_code(signal.SIGTERM) == 143
    assert cli.interrupted_exit_code(signal.SIGINT) == 130
    assert cli.interrupted_exit_code(signal.SIGHUP) == 129
    assert issubclass(DivergedError, UserError) and issubclass(LockError, UserError)


def test_sighup_is_a_stop_request_unless_the_run_ignores_it():
    with preemption_guard() as guard:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.1)
        assert guard.received == signal.SIGHUP
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with preemption_guard() as guard:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
            assert not guard.requested
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_torn_last_metrics_line_is_skipped_and_cut(tmp_path, caplog):
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "torn last line" in caplog.text
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(3, {"loss": 0.3})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2, is not JSON"):
        read_metrics(tmp_path)
