"""Checkpoints of the training state and its config; the only module that imports orbax.

Keeping orbax behind this small API means its version-specific quirks (async saves, handler
registries, sharding metadata) are handled and tested in one place, and the trainer and the
probe never see them.

- `Checkpointer`: save every `save_interval_steps` (asynchronously) and at the end, keep the
  newest `max_to_keep` verified ones, restore into a target's tree structure and shardings,
  falling back to the newest intact checkpoint when the latest is damaged.
- `load_state_tree` / `load_config`: read a checkpoint as numpy dicts without a target.
- `preemption_guard`: turns SIGTERM / SIGINT / SIGHUP into a flag the loop polls.

Saves are atomic (a save cut short is never listed nor restored), carry a CRC32 of every
array that is checked on every read, and every failure is loud. docs/design.md#checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from scott_jax import storage
from scott_jax.errors import CheckpointError, MissingCheckpointError

log = logging.getLogger(__name__)

_STATE = "state"
_CONFIG = "config"
_CHECKSUMS = "checksums"
_RUN = "run"
#: Where damaged checkpoints are moved (beside the checkpoint directory), never deleted.
DAMAGED_DIR = "damaged"


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Handlers named up front so that metadata and raw restores work in a fresh process.

    Without them a new `CheckpointManager` only learns an item's handler from the args of a
    save or restore, and `item_metadata` of an unseen item is None.
    """
    return {
        _STATE: ocp.StandardCheckpointHandler(),
        _CONFIG: ocp.JsonCheckpointHandler(),
        _CHECKSUMS: ocp.JsonCheckpointHandler(),
        _RUN: ocp.JsonCheckpointHandler(),
    }


def _describe_steps(directory: epath.Path, steps: list[int]) -> str:
    listed = ", ".join(map(str, steps)) if steps else "none"
    return f"{directory} (finished checkpoints: {listed})"


def _resolve_step(manager: ocp.CheckpointManager, directory: epath.Path, step: int | None):
    """`step`, or the latest step when None; MissingCheckpointError (a FileNotFoundError)
    when it is not on disk."""
    steps = sorted(manager.all_steps())
    step = None if step is None else int(step)
    if step is None:
        if not steps:
            raise MissingCheckpointError(
                f"no checkpoint to restore in {_describe_steps(directory, [])}"
            )
        return steps[-1]
    if step not in steps:
        raise MissingCheckpointError(
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


def _host_array(leaf) -> np.ndarray:
    """A leaf's value on this host: numpy as is, a replicated or local jax.Array's data."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)  # the state is replicated: any shard is all of it
    return np.asarray(leaf)


def checksums(tree: Any) -> dict[str, str]:
    """{leaf path: 'crc32 dtype shape'} of every array leaf of a state tree (numpy or jax)."""
    sums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None:
            continue
        x = np.ascontiguousarray(_host_array(leaf))
        sums[_path_str(path)] = f"{zlib.crc32(x.view(np.uint8)):08x} {x.dtype} {list(x.shape)}"
    return sums


def _compare_checksums(saved: dict | None, restored: Any) -> list[str]:
    """The leaves whose restored bytes differ from what was saved (empty: intact)."""
    if saved is None:
        return []
    got = checksums(restored)
    problems = [f"{k}: missing" for k in sorted(saved.keys() - got.keys())]
    problems += [
        f"{k}: checksum {got[k]}, saved {saved[k]}"
        for k in sorted(saved.keys() & got.keys())
        if got[k] != saved[k]
    ]
    return problems


def _damage_report(step: int, directory: epath.Path, problem: str) -> str:
    return f"checkpoint step {step} in {directory} is damaged: {problem}"


def _describe_error(e: BaseException) -> str:
    """One line of an exception raised while reading a checkpoint."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _remove_interrupted_saves(directory: epath.Path) -> None:
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
        self.directory = storage.path(directory)
        self.save_interval_steps = save_interval_steps
        self.max_to_keep = max_to_keep
        self._verified: set[int] = set()  # steps read back (or restored) intact
        self._failed: set[int] = set()  # steps written here that did not read back intact
        _remove_interrupted_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            # Retention is ours (`_prune`): a checkpoint is deleted only once a newer one has
            # been read back intact.
            max_to_keep=None,
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

    def save(
        self, step: int, state: Any, config: dict, *, force: bool = False, run: dict | None = None
    ) -> bool:
        """Start saving `state`, `config`, the state's checksums and the JSON facts `run` (e.g.
        the dataset's size) at `step`; True if a save was started.

        Only when `force` or `should_save(step)`; a step already saved is skipped (False).
        Asynchronous: device arrays are copied to the host before this returns, the files are
        written in the background (`wait` blocks until they are durable and read back).
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        self.wait()  # the previous save: durable, read back, older ones pruned
        steps = self.all_steps()
        if step in steps:
            return False
        if steps and step < steps[-1]:
            # Saving below the latest step would interleave two runs in one directory and let
            # retention delete the newer run's checkpoints.
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
        items = {
            _STATE: ocp.args.StandardSave(state),
            _CONFIG: ocp.args.JsonSave(config),
            _CHECKSUMS: ocp.args.JsonSave(checksums(state)),
            _RUN: ocp.args.JsonSave(run or {}),
        }
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Block until every started save is written and renamed into place, read it back
        (a checkpoint that does not verify is an error), then apply retention."""
        self._manager.wait_until_finished()
        steps = self.all_steps()
        newest_intact = max(self._verified, default=None)
        for step in steps:
            if step in self._verified | self._failed:
                continue
            if newest_intact is not None and step < newest_intact:
                continue
            problems = verify(self.directory, step)
            if problems:
                self._failed.add(step)  # reported once; retention keeps the older ones
                raise CheckpointError(
                    f"{problems[0]}, right after it was written (is the disk failing or full?)"
                )
            self._verified.add(step)
        self._prune()

    def _prune(self) -> None:
        """Deletes all but the newest `max_to_keep` checkpoints, never one at or above the
        newest that was read back intact (every process calls it: orbax deletes on one)."""
        steps = self.all_steps()
        newest_intact = max(self._verified, default=None)
        if newest_intact is None:
            return
        kept = {s for s in steps if s >= newest_intact} | set(steps[-self.max_to_keep :])
        for step in steps:
            if step not in kept:
                self._manager.delete(step)

    def restore(self, target: Any, step: int | None = None, *, fallback: bool = True) -> Any:
        """The state at `step` (default: the latest intact one), shaped and placed like
        `target`, its arrays checked against the checksums saved with it.

        `target` leaves: `jax.Array`s or `jax.ShapeDtypeStruct`s with a sharding (restored as
        `jax.Array`s) or `np.ndarray`s (restored as numpy); shapes and dtypes must match
        (ValueError otherwise). A latest checkpoint that cannot be read or does not verify is
        reported in one paragraph, moved to `<directory>/../damaged/`, and the next older
        one is tried (`fallback=False`: CheckpointError instead); an explicit `step` never
        falls back.
        """
        self._manager.wait_until_finished()
        if step is not None:
            return self._restore_verified(
                target, _resolve_step(self._manager, self.directory, step)
            )
        steps = self.all_steps()
        if not steps:
            raise MissingCheckpointError(
                f"no checkpoint to restore in {_describe_steps(self.directory, [])}"
            )
        damaged = []
        for candidate in reversed(steps):
            try:
                state = self._restore_verified(target, candidate)
            except CheckpointError as e:
                if not fallback:
                    raise
                log.error("%s", e)
                damaged.append(candidate)
                continue
            if damaged:
                self._set_aside(damaged)
                log.warning(
                    "Resuming from step %d, the newest intact checkpoint; the damaged step(s) "
                    "%s were moved to %s.",
                    candidate,
                    ", ".join(map(str, damaged)),
                    self.directory.parent / DAMAGED_DIR,
                )
            return state
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: every step ({', '.join(map(str, steps))}) "
            "is damaged (see the messages above); start a fresh run in another workdir"
        )

    def _restore_verified(self, target: Any, step: int) -> Any:
        """`step` restored into `target` and verified; CheckpointError if it is damaged."""
        where = f"step {step} in {self.directory}"
        try:
            metadata = self._manager.item_metadata(step)[_STATE]
            tree = metadata.tree
        except Exception as e:
            raise CheckpointError(_damage_report(step, self.directory, _describe_error(e))) from e
        _check_target(target, tree, where)  # a different model, not damage: ValueError
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(target), _CHECKSUMS: ocp.args.JsonRestore()}
                ),
            )
            state, saved = restored[_STATE], restored[_CHECKSUMS]
        except Exception as e:
            if _legacy(self.directory, step):
                state, saved = self._restore_legacy(target, step), None
            else:
                raise CheckpointError(
                    _damage_report(step, self.directory, _describe_error(e))
                ) from e
        problems = _compare_checksums(saved, state)
        if problems:
            raise CheckpointError(
                _damage_report(
                    step,
                    self.directory,
                    f"{len(problems)} array(s) differ from what was saved ({problems[0]})",
                )
            )
        self._verified.add(step)
        return state

    def _restore_legacy(self, target: Any, step: int) -> Any:
        """A checkpoint written before checksums existed: restored unverified, with a warning."""
        log.warning(
            "Step %d in %s has no checksums (an older scott_jax wrote it): "
            "restored without verification.",
            step,
            self.directory,
        )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )
        except Exception as e:
            raise CheckpointError(_damage_report(step, self.directory, _describe_error(e))) from e
        return restored[_STATE]

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps out of the checkpoint directory (kept for inspection), so the
        resumed run can save its next steps below them."""
        if jax.process_index() == 0:
            target = self.directory.parent / DAMAGED_DIR
            target.mkdir(parents=True, exist_ok=True)
            for step in steps:
                moved = target / f"{step}-{int(time.time())}"
                (self.directory / str(step)).rename(moved)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("scott_jax: damaged checkpoints set aside")
        self._manager.reload()

    def restore_run(self, step: int) -> dict:
        """The `run` facts saved with `step` ({} for a checkpoint written without them)."""
        if not (self.directory / str(step) / _RUN).exists():
            return {}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_RUN: ocp.args.JsonRestore()})
        )
        return restored[_RUN]

    def restore_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: latest); tuples come back as lists."""
        self._manager.wait_until_finished()
        step = _resolve_step(self._manager, self.directory, step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
        )
        return restored[_CONFIG]

    def close(self) -> None:
        """Wait for pending saves (read back and pruned) and release orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _legacy(directory: epath.Path, step: int) -> bool:
    """True for a checkpoint written before checksums existed (it has no checksums item)."""
    return not (directory / str(step) / _CHECKSUMS).exists()


@contextmanager
def _read_only_manager(directory: str | os.PathLike) -> Iterator[ocp.CheckpointManager]:
    """A manager that neither creates `directory` nor deletes anything in it."""
    path = storage.path(directory)
    if not path.is_dir():
        raise MissingCheckpointError(f"checkpoint directory {path} does not exist")
    # Not orbax's `read_only=True`: that logs a warning on every open. These options never
    # create, clean up or delete anything, and nothing here calls `save`.
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(path, options=options, item_handlers=_item_handlers())
    try:
        yield manager
    finally:
        manager.close()


def _read_tree(manager: ocp.CheckpointManager, path: epath.Path, step: int) -> dict:
    """The state of `step` as numpy dicts, verified; CheckpointError if it is damaged."""
    try:
        tree = manager.item_metadata(step)[_STATE].tree
        # np.empty reserves address space only; orbax fills it and returns numpy arrays,
        # whereas a target-less restore would rebuild the saved device layout.
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
        items = {_STATE: ocp.args.StandardRestore(target)}
        if not _legacy(path, step):
            items[_CHECKSUMS] = ocp.args.JsonRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        raise CheckpointError(_damage_report(step, path, _describe_error(e))) from e
    problems = _compare_checksums(restored.get(_CHECKSUMS), restored[_STATE])
    if problems:
        raise CheckpointError(
            _damage_report(
                step, path, f"{len(problems)} array(s) differ from what was saved ({problems[0]})"
            )
        )
    return restored[_STATE]


def verify(directory: str | os.PathLike, step: int) -> list[str]:
    """Problems of checkpoint `step` (unreadable, or arrays that differ from their checksums);
    empty when it is intact."""
    path = storage.path(directory)
    with _read_only_manager(path) as manager:
        try:
            _read_tree(manager, path, step)
        except CheckpointError as e:
            return [str(e)]
    return []


def load_state_tree(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The saved state at `step` (default: latest) as nested dicts of numpy arrays, verified.

    Needs no target, so any structure the trainer saved can be read (e.g. only
    `["target_params"]` for the probe) on any number of devices. A damaged checkpoint is a
    CheckpointError in one paragraph that names the intact steps.
    """
    path = storage.path(directory)
    with _read_only_manager(path) as manager:
        step = _resolve_step(manager, path, step)
        try:
            return _read_tree(manager, path, step)
        except CheckpointError as e:
            others = [s for s in sorted(manager.all_steps()) if s != step]
            intact = [s for s in others if not verify(path, s)]
            hint = (
                f"intact steps: {', '.join(map(str, intact))} (pass one as the step)"
                if intact
                else "no other intact step"
            )
            raise CheckpointError(f"{e}. {hint}") from e


def load_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The config saved at `step` (default: latest), without creating anything."""
    path = storage.path(directory)
    with _read_only_manager(path) as manager:
        step = _resolve_step(manager, path, step)
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
            )
        except Exception as e:
            raise CheckpointError(_damage_report(step, path, _describe_error(e))) from e
        return restored[_CONFIG]


class PreemptionGuard:
    """Turns the first SIGTERM / SIGINT / SIGHUP into a flag (`requested`) that the loop polls.

    A flag instead of an exception: the signal can land anywhere (between dispatching a
    step that donates the state and receiving the new one, in the middle of an async save),
    and the loop is the one place that knows when the state is whole enough to save. A
    second signal gets the handler that was there before (SIGINT: KeyboardInterrupt,
    SIGTERM: termination), so a stuck loop can still be stopped. SIGHUP (an ssh drop) saves
    like SIGTERM, unless the run was started under `nohup`, which ignores it.
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
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # started under nohup: an ssh drop must not stop the run
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def preemption_guard(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
) -> PreemptionGuard:
    """Context manager: `with preemption_guard() as guard: ... if guard.requested: ...`.

    The previous handlers are restored on exit.
    """
    return PreemptionGuard(signals)
