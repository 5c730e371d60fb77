"""Checkpoints: exact round trip of a realistic train state, placement, retention, atomicity,
clear errors, and the preemption guard."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scott_jax.checkpoint import Checkpointer, load_config, load_state_tree, preemption_guard
from scott_jax.models import build_predictor

CONFIG = {
    "model": {"variant": "scott-7/16", "img_size": 64, "patch_size": 16},
    "mask": {"scale": (0.15, 0.2), "aspect": (0.75, 1.5), "min_keep": None},
    "lr_peak": 1.5e-4,
    "ema": (0.996, 1.0),
    "dataset": "digits",
    "bf16": False,
}


@struct.dataclass
class TrainState:
    step: jax.Array
    rng: jax.Array  # a typed key, as `fold_in(rng, step)` wants
    params: dict
    target_params: dict
    opt_state: optax.OptState


@pytest.fixture(scope="module")
def state(tiny_scott):
    """A train state shaped like the trainer's: encoder + predictor, EMA copy, AdamW state."""
    predictor = build_predictor(tiny_scott, depth=1)
    shapes = {  # eval_shape + random values: the real tree without the minute of eager init
        "context_encoder": jax.eval_shape(
            tiny_scott.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))
        ),
        "predictor": jax.eval_shape(predictor.init, jax.random.key(0), jnp.zeros((1, 16, 64))),
    }
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
        {name: variables["params"] for name, variables in shapes.items()},
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.04),
    )
    # One jitted init + update (eagerly it takes ~20 s): non-zero moments, count = 1.
    opt_state = jax.jit(lambda p: tx.update(p, tx.init(p), p)[1])(params)
    return TrainState(
        step=jnp.asarray(3, jnp.int32),
        rng=jax.random.key(7),
        params=params,
        target_params=jax.tree.map(lambda x: x * 0.5, params["context_encoder"]),
        opt_state=opt_state,
    )


@pytest.fixture
def mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def saved(tmp_path, state, steps=(3,), **kwargs):
    """A closed Checkpointer directory holding `state` at each of `steps`."""
    with Checkpointer(tmp_path / "ckpt", save_interval_steps=1, **kwargs) as ckpt:
        for step in steps:
            assert ckpt.save(step, state, CONFIG)
    return tmp_path / "ckpt"


def test_round_trip_keeps_structure_dtypes_and_values(tmp_path, state, mesh):
    directory = saved(tmp_path, state)
    replicated = NamedSharding(mesh, P())
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 3
        restored = ckpt.restore(abstract(state, replicated))
    assert isinstance(restored, TrainState)
    assert_trees_equal(restored, state)
    assert restored.step.dtype == jnp.int32
    assert restored.opt_state[1].hyperparams["learning_rate"] == pytest.approx(1e-3)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated


def test_restore_places_arrays_with_the_target_sharding(tmp_path, mesh):
    tree = {"w": jnp.arange(32.0).reshape(16, 2), "count": jnp.asarray(7, jnp.int32)}
    directory = saved(tmp_path, tree)
    target = {
        "w": jax.ShapeDtypeStruct((16, 2), jnp.float32, sharding=NamedSharding(mesh, P("data"))),
        "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
    }
    with Checkpointer(directory) as ckpt:
        restored = ckpt.restore(target)
    assert_trees_equal(restored, tree)
    assert restored["w"].sharding == target["w"].sharding
    assert len(restored["w"].addressable_shards) == 8
    assert restored["w"].addressable_shards[0].data.shape == (2, 2)


def test_save_copies_before_returning_so_the_state_can_be_donated(tmp_path, state):
    copy = jax.tree.map(jnp.copy, state)
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        assert ckpt.save(3, copy, CONFIG)
        for leaf in jax.tree.leaves(copy):
            leaf.delete()  # what donating the state to the next step does
        ckpt.wait()
        restored = ckpt.restore(state)
    assert_trees_equal(restored, state)


def test_config_round_trip(tmp_path, state):
    directory = saved(tmp_path, state)
    expected = json.loads(json.dumps(CONFIG))  # tuples come back as lists
    with Checkpointer(directory) as ckpt:
        assert ckpt.restore_config() == expected
        assert ckpt.restore_config(3) == expected
    assert load_config(directory) == expected


def test_config_that_is_not_json_fails_at_save(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="step 1 is not JSON-serializable"):
            ckpt.save(1, {"x": jnp.ones(2)}, {"dtype": jnp.float32}, force=True)
        assert ckpt.all_steps() == []


def test_should_save_and_save_follow_the_interval(tmp_path):
    tree = {"x": jnp.ones(2)}
    with Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
        assert [s for s in range(12) if ckpt.should_save(s)] == [0, 5, 10]
        assert not ckpt.save(3, tree, CONFIG)
        assert ckpt.save(5, tree, CONFIG)
        assert not ckpt.save(5, tree, CONFIG, force=True)  # final save right after interval
        assert ckpt.save(7, tree, CONFIG, force=True)
        with pytest.raises(ValueError, match="later step"):
            ckpt.save(6, tree, CONFIG, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 7]


def test_keeps_only_the_last_k(tmp_path):
    tree = {"x": jnp.ones(2)}
    directory = saved(tmp_path, tree, steps=(1, 2, 3, 4), max_to_keep=2)
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["3", "4"]


def test_missing_checkpoints_raise_file_not_found(tmp_path):
    target = {"x": jnp.ones(2)}
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match=r"empty \(finished checkpoints: none\)"):
            ckpt.restore(target)
        with pytest.raises(FileNotFoundError, match="empty"):
            ckpt.restore_config()
    directory = saved(tmp_path, target, steps=(2, 4))
    with Checkpointer(directory) as ckpt:
        with pytest.raises(FileNotFoundError, match=r"step 3 in .*ckpt .*checkpoints: 2, 4\)"):
            ckpt.restore(target, step=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_tree(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_interrupted_save_is_ignored_and_cleaned_up(tmp_path):
    tree = {"x": jnp.arange(3)}
    directory = saved(tmp_path, tree, steps=(1,))
    # What a save killed before its final rename leaves behind (both orbax spellings).
    for name in ("5.orbax-checkpoint-tmp-1712345678", "6.orbax-checkpoint-tmp"):
        (directory / name / "state").mkdir(parents=True)
        (directory / name / "state" / "junk").write_text("partial")
    assert load_state_tree(directory)["x"].tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="step 5"):
        load_state_tree(directory, step=5)
    with Checkpointer(directory) as ckpt:
        assert sorted(p.name for p in directory.iterdir()) == ["1"]  # leftovers removed
        assert ckpt.all_steps() == [1]
        assert_trees_equal(ckpt.restore(tree), tree)


def test_mismatched_target_names_every_problem(tmp_path, mesh):
    tree = {"a": jnp.ones((4, 8)), "b": {"c": jnp.zeros(3, jnp.int32)}, "d": jnp.ones(2)}
    directory = saved(tmp_path, tree)
    target = {
        "a": jnp.ones((4, 9)),
        "b": {"c": jnp.zeros(3, jnp.float32)},
        "d": jax.ShapeDtypeStruct((2,), jnp.float32),
        "e": jnp.ones(1),
    }
    with Checkpointer(directory) as ckpt, pytest.raises(ValueError) as info:
        ckpt.restore(target)
    message = str(info.value)
    assert "not in the checkpoint: ['e']" in message
    assert "a: checkpoint has float32[4, 8], target has float32[4, 9]" in message
    assert "b.c: checkpoint has int32[3], target has float32[3]" in message
    assert "d: the target ShapeDtypeStruct has no sharding" in message


def test_load_state_tree_needs_no_target(tmp_path, state):
    directory = saved(tmp_path, state)
    tree = load_state_tree(directory)
    assert set(tree) == {"step", "rng", "params", "target_params", "opt_state"}
    assert isinstance(tree["step"], np.ndarray) and tree["step"].dtype == np.int32
    np.testing.assert_array_equal(tree["rng"], jax.random.key_data(state.rng))
    assert_trees_equal(tree["target_params"], state.target_params)
    adam = tree["opt_state"][1]["inner_state"][0]  # chain -> inject_hyperparams -> adam
    assert adam["count"].dtype == np.int32 and int(adam["count"]) == 1
    assert_trees_equal(adam["mu"], state.opt_state[1].inner_state[0].mu)


def test_preemption_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with preemption_guard() as guard:
        assert not guard.requested
        signal.raise_signal(signal.SIGTERM)
        assert guard.requested
        assert guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_preemption_guard_second_signal_acts_as_unguarded():
    # Python leaves SIGINT ignored when launched with it ignored (nohup, `cmd &`): install
    # the interactive handler so the test means the same under any launch.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with preemption_guard() as guard:
            signal.raise_signal(signal.SIGINT)
            assert guard.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous_int)

    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with preemption_guard((signal.SIGTERM,)) as guard:
            signal.raise_signal(signal.SIGTERM)
            assert calls == []
            signal.raise_signal(signal.SIGTERM)
            assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
