"""Checkpoints of the training state and its config; the only module that imports orbax.

Keeping orbax behind this small API means its version-specific quirks (async saves, handler
registries, sharding metadata) are handled and tested in one place, and the trainer and the
probe never see them.

- `Checkpointer`: save every `save_interval_steps` (asynchronously) and at the end, keep the
  newest `max_to_keep`, restore into a target's tree structure and shardings.
- `load_state_tree` / `load_config`: read a checkpoint as numpy dicts without a target.
- `preemption_guard`: turns SIGTERM / Ctrl-C into a flag the loop polls after each step.

Saves are atomic (a save cut short is never listed nor restored) and every failure is loud
(missing steps, mismatched targets). Usage and guarantees: docs/design.md#checkpoints.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_CONFIG = "config"


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Handlers named up front so that metadata and raw restores work in a fresh process.

    Without them a new `CheckpointManager` only learns an item's handler from the args of a
    save or restore, and `item_metadata` of an unseen item is None.
    """
    return {_STATE: ocp.StandardCheckpointHandler(), _CONFIG: ocp.JsonCheckpointHandler()}


def _describe_steps(directory: pathlib.Path, steps: list[int]) -> str:
    listed = ", ".join(map(str, steps)) if steps else "none"
    return f"{directory} (finished checkpoints: {listed})"


def _resolve_step(manager: ocp.CheckpointManager, directory: pathlib.Path, step: int | None):
    """`step`, or the latest step when None; FileNotFoundError when it is not on disk."""
    steps = sorted(manager.all_steps())
    step = None if step is None else int(step)
    if step is None:
        if not steps:
            raise FileNotFoundError(f"no checkpoint to restore in {_describe_steps(directory, [])}")
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {_describe_steps(directory, steps)}"
        )
    return step


def _path_str(path) -> str:
    """Key path as orbax names it on disk, e.g. `opt_state.0.mu.blocks_0.kernel`.

    Dataclass fields, dict keys and namedtuple fields become names and tuple positions
    become numbers, both in a live pytree and in orbax's metadata tree, so the two compare.
    """
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _check_target(target, metadata_tree, where: str) -> None:
    """Raise ValueError listing every leaf where `target` and the checkpoint disagree.

    Checked here rather than left to orbax because orbax casts dtypes silently, restores
    unsharded ShapeDtypeStructs with the *saved* device layout (wrong on another topology),
    and reports a shape mismatch only after a burst of background-thread tracebacks.
    """
    saved = {_path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(metadata_tree)[0]}
    wanted = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = []
    if missing := sorted(wanted.keys() - saved.keys()):
        problems.append(f"in the target but not in the checkpoint: {missing}")
    if extra := sorted(saved.keys() - wanted.keys()):
        problems.append(f"in the checkpoint but not in the target: {extra}")
    for name in sorted(wanted.keys() & saved.keys()):
        leaf, meta = wanted[name], saved[name]
        stored = leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            stored = jax.eval_shape(jax.random.key_data, leaf)  # saved as its raw key data
        shape, dtype = tuple(stored.shape), np.dtype(stored.dtype)
        if shape != tuple(meta.shape) or dtype != np.dtype(meta.dtype):
            problems.append(
                f"{name}: checkpoint has {np.dtype(meta.dtype).name}{list(meta.shape)}, "
                f"target has {dtype.name}{list(shape)}"
            )
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            problems.append(
                f"{name}: the target ShapeDtypeStruct has no sharding; give one "
                "(e.g. NamedSharding(mesh, P())) so the array is placed on this run's devices"
            )
    if problems:
        raise ValueError(f"restore target does not match {where}:\n  " + "\n  ".join(problems))


def _remove_interrupted_saves(directory: pathlib.Path) -> None:
    """Delete what saves cut short left behind (`<step>.orbax-checkpoint-tmp*`).

    Done here, synchronously, rather than with orbax's `cleanup_tmp_directories`: that runs
    in a background thread which fails ("cannot schedule new futures after shutdown") and
    leaves the directory behind when the manager is closed before its next save.
    """
    if jax.process_index() != 0:
        return
    for temporary in ocp.path.step.all_temporary_paths(directory):
        temporary.get().rmtree()


class Checkpointer:
    """Saves and restores the training state (a pytree) and its config in one directory.

    Wraps one `orbax.checkpoint.CheckpointManager`; the semantics of each method are in
    docs/design.md#checkpoints.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1000,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = pathlib.Path(directory).absolute()
        self.save_interval_steps = save_interval_steps
        _remove_interrupted_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # Unused: every save passes `force=True` because the decision is ours
            # (`should_save`); orbax's default policy would also save the first step it sees.
            save_interval_steps=1,
            create=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_item_handlers()
        )

    def all_steps(self) -> list[int]:
        """Steps of finished checkpoints and of a save in flight, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    def save(self, step: int, state: Any, config: dict, *, force: bool = False) -> bool:
        """Start saving `state` and `config` at `step`; True if a save was started.

        Only when `force` or `should_save(step)`; a step already saved is skipped (False).
        Asynchronous: device arrays are copied to the host before this returns, the files are
        written in the background (`wait` blocks until they are durable).
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        steps = self.all_steps()
        if step in steps:
            return False
        if steps and step < steps[-1]:
            # Saving below the latest step would interleave two runs in one directory and let
            # `max_to_keep` delete the newer run's checkpoints.
            raise ValueError(
                f"cannot save step {step}: {_describe_steps(self.directory, steps)} already "
                "holds a later step; resume from it or use a fresh directory"
            )
        try:
            json.dumps(config)
        except (TypeError, ValueError) as e:
            # Checked now: the async JSON write would otherwise fail later, in a background
            # thread, after training moved on.
            raise TypeError(f"config for step {step} is not JSON-serializable: {e}") from e
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _CONFIG: ocp.args.JsonSave(config)}
            ),
            force=True,
        )

    def wait(self) -> None:
        """Block until every started save is written and renamed into place."""
        self._manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> Any:
        """The state at `step` (default: latest), shaped and placed like `target`.

        `target` leaves: `jax.Array`s or `jax.ShapeDtypeStruct`s with a sharding (restored as
        `jax.Array`s) or `np.ndarray`s (restored as numpy); shapes and dtypes must match.
        """
        self.wait()
        step = _resolve_step(self._manager, self.directory, step)
        metadata = self._manager.item_metadata(step)[_STATE]
        _check_target(target, metadata.tree, f"step {step} in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
        )
        return restored[_STATE]

    def restore_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: latest); tuples come back as lists."""
        self.wait()
        step = _resolve_step(self._manager, self.directory, step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
        )
        return restored[_CONFIG]

    def close(self) -> None:
        """Wait for pending saves and release orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextmanager
def _read_only_manager(directory: str | os.PathLike) -> Iterator[ocp.CheckpointManager]:
    """A manager that neither creates `directory` nor deletes anything in it."""
    path = pathlib.Path(directory).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    # Not orbax's `read_only=True`: that logs a warning on every open. These options never
    # create, clean up or delete anything, and nothing here calls `save`.
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(path, options=options, item_handlers=_item_handlers())
    try:
        yield manager
    finally:
        manager.close()


def load_state_tree(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The saved state at `step` (default: latest) as nested dicts of numpy arrays.

    Needs no target, so any structure the trainer saved can be read (e.g. only
    `["target_params"]` for the probe) on any number of devices.
    """
    path = pathlib.Path(directory).absolute()
    with _read_only_manager(path) as manager:
        step = _resolve_step(manager, path, step)
        tree = manager.item_metadata(step)[_STATE].tree
        # np.empty reserves address space only; orbax fills it and returns numpy arrays,
        # whereas a target-less restore would rebuild the saved device layout.
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
        restored = manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
        )
        return restored[_STATE]


def load_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The config saved at `step` (default: latest), without creating anything."""
    path = pathlib.Path(directory).absolute()
    with _read_only_manager(path) as manager:
        step = _resolve_step(manager, path, step)
        restored = manager.restore(
            step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
        )
        return restored[_CONFIG]


class PreemptionGuard:
    """Turns the first SIGTERM / SIGINT into a flag (`requested`) that the loop polls.

    A flag instead of an exception: the signal can land anywhere (between dispatching a
    step that donates the state and receiving the new one, in the middle of an async save),
    and the loop is the one place that knows when the state is whole enough to save. A
    second signal gets the handler that was there before (SIGINT: KeyboardInterrupt,
    SIGTERM: termination), so a stuck loop can still be stopped.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            return
        previous = self._previous[signum]
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def __enter__(self) -> PreemptionGuard:
        # signal.signal only works in the main thread; elsewhere it raises ValueError.
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def preemption_guard(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> PreemptionGuard:
    """Context manager: `with preemption_guard() as guard: ... if guard.requested: ...`.

    The previous handlers are restored on exit.
    """
    return PreemptionGuard(signals)
