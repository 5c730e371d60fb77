"""Probes, metrics, k-NN, model selection and the probe run on a tiny pretrained workdir."""

import functools
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import override

from scott_jax import optim
from scott_jax.checkpoint import Checkpointer
from scott_jax.evaluators import backbone as backbone_lib
from scott_jax.evaluators import features as features_lib
from scott_jax.evaluators import knn as knn_lib
from scott_jax.evaluators import metrics as metrics_lib
from scott_jax.evaluators import probe_steps as probe_steps_lib
from scott_jax.evaluators import probes as probes_lib
from scott_jax.evaluators import selection as selection_lib
from scott_jax.models import build_encoder
from scott_jax.models.probes import ATTENTIVE_PROBES, PROBES, build_probes
from scott_jax.models.transformer import layer_norm

ROOT = Path(__file__).parents[1]


def probe_config(**overrides):
    spec = importlib.util.spec_from_file_location("probe_config", ROOT / "configs" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    return override(config, overrides)


def optimizer(total_steps, lr_peak=5e-4):
    return optim.make_optimizer(
        total_steps=total_steps,
        warmup_steps=total_steps // 10,
        lr_start=1e-6,
        lr_peak=lr_peak,
        lr_final=1e-5,
        flat_pctg=0.72,
        wd_start=0.04,
        wd_final=0.4,
    )


# --------------------------------------------------------------------------- probes


def test_probe_parameter_counts_match_the_reference():
    """Trainable parameters at D = 384, C = 102 (official classifiers; linear: paper App. E)."""
    expected = {"simple": 39_655, "multi": 338_026, "cross": 1_811_430, "linear": 40_038}
    features = jax.ShapeDtypeStruct((2, 196, 384), jnp.float32)
    for name, probe in build_probes(102).items():
        params = jax.eval_shape(probe.init, jax.random.key(0), features)["params"]
        assert sum(x.size for x in jax.tree.leaves(params)) == expected[name], name


def test_cross_attentive_init_follows_the_reference():
    """Normal(0.02) query and kernels, zero classifier bias, LayerNorms 1/0 (as the official
    classifiers)."""
    probe = build_probes(102, ("cross",))["cross"]
    params = jax.jit(probe.init)(jax.random.key(0), jnp.zeros((1, 16, 384)))["params"]
    np.testing.assert_allclose(np.std(params["kv"]["kernel"]), 0.02, rtol=0.02)
    np.testing.assert_allclose(np.std(params["ffn"]["w12"]["kernel"]), 0.02, rtol=0.02)
    assert not np.any(params["classifier"]["bias"])
    np.testing.assert_array_equal(params["head_norm"]["scale"], 1.0)
    simple = build_probes(102, ("simple",))["simple"]
    kernel = jax.jit(simple.init)(jax.random.key(0), jnp.zeros((1, 16, 384)))["params"][
        "classifier"
    ]
    bound = 1 / np.sqrt(384)  # torch default U(±1/√fan_in), weight and bias
    assert np.abs(kernel["kernel"]).max() <= bound and np.abs(kernel["bias"]).max() <= bound


def test_unknown_probe_is_an_error():
    with pytest.raises(ValueError, match="unknown or no probes"):
        build_probes(10, ("linear", "mlp"))


def separable_features(rng, num_examples, means, noise=0.6):
    """LayerNorm'd tokens [M, 8, D] = class mean + noise: linearly separable when pooled."""
    labels = rng.integers(0, means.shape[0], num_examples)
    noise = noise * rng.standard_normal((num_examples, 8, means.shape[1]))
    tokens = means[labels][:, None, :] + noise
    return np.asarray(layer_norm(jnp.asarray(tokens, jnp.float32))), labels.astype(np.int32)


def test_every_probe_learns_linearly_separable_features():
    """All four probes, trained together by `probe_train_step`, exceed 95% on held-out data."""
    rng = np.random.default_rng(0)
    means = 2.0 * rng.standard_normal((4, 32))
    train_x, train_y = separable_features(rng, 512, means)
    test_x, test_y = separable_features(rng, 256, means)
    probes = build_probes(4)
    steps, batch = 240, 32
    tx = optimizer(steps, lr_peak=3e-3)
    state = jax.jit(
        functools.partial(probe_steps_lib.init_probe_state, probes, tx, train_x.shape, 0)
    )()
    step = jax.jit(
        functools.partial(
            probe_steps_lib.probe_train_step,
            probes=probes,
            tx=tx,
            featurize=probes_lib._cached_features,
            seed=0,
        )
    )
    for i in range(steps):
        index = np.random.default_rng(i).choice(len(train_y), batch, replace=False)
        state, _ = step(state, None, {"x": train_x[index], "label": train_y[index]})
    counts = jax.jit(
        functools.partial(probe_steps_lib.probe_eval_counts, probes=probes, num_classes=4)
    )(state, {"x": test_x, "label": test_y, "mask": np.ones(len(test_y), bool)})
    for name in PROBES:
        assert metrics_lib.accuracies(counts[name])["top1"] > 95.0, name


def test_in_step_features_equal_cached_features_and_never_train_the_backbone():
    """The in-step path (backbone in the jitted step) gives the cached path's update exactly,
    and no gradient reaches the backbone (stop_gradient)."""
    encoder = build_encoder("vit-7/16", 32, embed_dim=32, depth=1, num_heads=2)
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    params = jax.jit(encoder.init)(jax.random.key(0), images)["params"]
    features = jax.jit(functools.partial(features_lib.backbone_features, encoder))(params, images)
    labels = np.arange(8, dtype=np.int32) % 3
    probes = build_probes(3, ("linear",))
    tx = optimizer(10)
    state = probe_steps_lib.init_probe_state(probes, tx, features.shape, seed=0)

    def one_step(featurize, backbone_params, x):
        step = functools.partial(
            probe_steps_lib.probe_train_step, probes=probes, tx=tx, featurize=featurize, seed=0
        )
        return jax.jit(step)(state, backbone_params, {"x": x, "label": labels})

    in_step = one_step(functools.partial(features_lib.backbone_features, encoder), params, images)
    cached = one_step(probes_lib._cached_features, None, features)
    chex.assert_trees_all_close(in_step, cached, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: features_lib.backbone_features(encoder, p, images).sum()))(
        params
    )
    assert all(not np.any(g) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
    """7 classes, 5 real rows (classes 3-6 absent) and one padding row that would change all."""
    logits = np.array(
        [
            [9, 1, 2, 3, 4, 5, 6],  # label 0, ranked 1st: top-1 and top-5 hit
            [0, 1, 2, 3, 4, 5, 6],  # label 0, ranked 7th: miss both
            [0, 5, 1, 2, 3, 6, 7],  # label 1, ranked 3rd: top-5 hit only
            [0, 1, 9, 3, 4, 5, 6],  # label 2, ranked 1st: hit both
            [0, 1, 3, 2, 4, 5, 6],  # label 2, ranked 5th: top-5 hit only
            [0, 9, 0, 0, 0, 0, 0],  # padding (label 1, would be a hit)
        ],
        np.float32,
    )
    labels = np.array([0, 0, 1, 2, 2, 1], np.int32)
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    metrics = metrics_lib.classification_metrics(logits, labels, mask, num_classes=7)
    assert metrics["top1"] == pytest.approx(100 * 2 / 5)
    assert metrics["top5"] == pytest.approx(100 * 4 / 5)
    # Per class: 1/2, 0/1, 1/2, and 0 for each of the four absent classes, over all 7.
    assert metrics["mpc"] == pytest.approx(100 * (0.5 + 0.0 + 0.5) / 7)

    halves = [
        metrics_lib.classification_counts(logits[s], labels[s], mask[s], num_classes=7)
        for s in (slice(0, 3), slice(3, 6))
    ]
    summed = jax.tree.map(lambda a, b: a + b, *halves)
    assert metrics_lib.accuracies(summed) == pytest.approx(metrics)


def test_top5_is_capped_at_the_number_of_classes():
    logits = np.array([[3, 2, 1], [1, 2, 3]], np.float32)
    metrics = metrics_lib.classification_metrics(logits, np.array([2, 0]), num_classes=3)
    assert metrics == pytest.approx({"top1": 0.0, "top5": 100.0, "mpc": 0.0})


def test_all_padding_is_an_error():
    with pytest.raises(ValueError, match="no examples"):
        metrics_lib.classification_metrics(
            np.zeros((2, 3)), np.zeros(2, np.int32), np.zeros(2, bool), num_classes=3
        )


# --------------------------------------------------------------------------- k-NN


def test_knn_is_perfect_on_separated_clusters():
    rng = np.random.default_rng(0)
    centres = 10.0 * rng.standard_normal((5, 32))
    train_y, test_y = rng.integers(0, 5, 300), rng.integers(0, 5, 101)
    train_x = centres[train_y] + rng.standard_normal((300, 32))
    test_x = centres[test_y] + rng.standard_normal((101, 32))
    accuracy = knn_lib.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=5, chunk_size=16)
    assert float(accuracy) == 100.0


def test_knn_weights_neighbours_by_exp_similarity_over_temperature():
    """One class-1 neighbour at cosine 1 against two class-0 neighbours at cosine 0.8 (k = 3):
    T = 0.07 gives class 1 (e^(1/T) > 2 e^(0.8/T)), T = 1 class 0 (a majority vote's answer)."""
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    train_labels = np.array([1, 0, 0, 0])
    test = np.array([[2.0, 0.0]])  # cosine similarity ignores the norm
    scores = knn_lib.knn_scores(train, train_labels, test, num_classes=2, k=3, temperature=0.07)
    np.testing.assert_allclose(scores, [[2 * np.exp(0.8 / 0.07), np.exp(1 / 0.07)]], rtol=1e-5)
    knn = functools.partial(knn_lib.knn_accuracy, train, train_labels, test, num_classes=2, k=3)
    assert float(knn(np.array([1]), temperature=0.07)) == 100.0
    assert float(knn(np.array([0]), temperature=1.0)) == 100.0


def test_knn_chunking_and_jit_do_not_change_the_votes():
    rng = np.random.default_rng(1)
    train, test = rng.standard_normal((50, 8)), rng.standard_normal((37, 8))
    labels = rng.integers(0, 4, 50)
    one_chunk = knn_lib.knn_scores(train, labels, test, num_classes=4, chunk_size=64)
    chunked = knn_lib.knn_scores(train, labels, test, num_classes=4, chunk_size=8)
    np.testing.assert_allclose(chunked, one_chunk, rtol=1e-6)
    jitted = jax.jit(functools.partial(knn_lib.knn_accuracy, num_classes=4, k=5))
    assert 0.0 <= float(jitted(train, labels, test, rng.integers(0, 4, 37))) <= 100.0


# --------------------------------------------------------------------------- selection


def history_row(epoch, values):
    """A history row: values[probe] = (probe_select top-1, test top-1, train top-1)."""
    row = {"epoch": epoch}
    for name, (select, test, train) in values.items():
        row.update({f"{name}/probe_select/top1": select, f"{name}/train/top1": train})
        row.update(
            {
                f"{name}/test/{m}": test + offset
                for m, offset in zip(("top1", "top5", "mpc"), (0.0, 10.0, -1.0), strict=True)
            }
        )
    return row


HISTORY = [
    history_row(1, {"linear": (50, 40, 30), "cross": (60, 55, 50), "simple": (70, 60, 40)}),
    history_row(2, {"linear": (80, 70, 60), "cross": (60, 65, 70), "simple": (65, 90, 50)}),
    history_row(3, {"linear": (80, 75, 60), "cross": (55, 95, 90), "simple": (70, 50, 60)}),
]


def test_holdout_selects_on_probe_select_with_ties_to_the_later_epoch():
    result = selection_lib.summarize(
        HISTORY,
        ("linear", "cross", "simple"),
        rule="holdout",
        score_split="probe_select",
        encoder="target",
    )
    probes = result["probes"]
    assert probes["linear"]["epoch"] == 3  # tie 80 / 80 -> later
    assert probes["cross"]["epoch"] == 2  # tie 60 / 60 -> later; never looks at test
    assert probes["simple"]["epoch"] == 3
    assert probes["cross"] == {
        "top1": 65,
        "top5": 75,
        "mpc": 64,
        "epoch": 2,
        "selection": "holdout",
        "select_split": "probe_select",
        "select_top1": 60,
        "encoder": "target",
    }
    assert result["best"] == "simple"  # 70 > 60; linear is not an attentive probe


def test_last_and_reference_selection():
    last = selection_lib.summarize(
        HISTORY, ("cross", "simple"), rule="last", score_split=None, encoder="context"
    )
    assert {p["epoch"] for p in last["probes"].values()} == {3}
    assert last["best"] == "cross"  # no selection split: last-epoch training top-1, 90 > 60
    reference = selection_lib.summarize(
        HISTORY, ("cross", "simple"), rule="reference", score_split="test", encoder="context"
    )
    assert reference["probes"]["cross"]["epoch"] == 3 and reference["best"] == "cross"
    assert reference["probes"]["simple"]["top1"] == 90


def test_selection_plan_falls_back_to_last_without_a_selection_split():
    assert selection_lib.selection_plan("holdout", True) == ("holdout", "probe_select")
    assert selection_lib.selection_plan("holdout", False) == ("last", None)
    assert selection_lib.selection_plan("last", True) == ("last", "probe_select")
    assert selection_lib.selection_plan("reference", True) == ("reference", "test")
    with pytest.raises(ValueError, match="unknown selection"):
        selection_lib.selection_plan("best", True)


def reference_best_of_three(history):
    """The reference's loop (src/eval.py): per epoch argmax over [multi, cross, simple] on the
    valid split, kept if >= the best so far. Returns (probe, epoch)."""
    best, best_score = None, 0.0
    for row in history:
        scores = [row[f"{name}/test/top1"] for name in ATTENTIVE_PROBES]
        index = int(np.argmax(scores))
        if scores[index] >= best_score:
            best, best_score = (ATTENTIVE_PROBES[index], row["epoch"]), scores[index]
    return best


@pytest.mark.parametrize("seed", range(20))
def test_reference_selection_is_the_reference_best_of_three(seed):
    """With many ties (scores in {0, 1, 2}), `best` and its epoch match the reference's loop."""
    rng = np.random.default_rng(seed)
    history = [
        history_row(epoch, {name: (0, rng.integers(0, 3), 0) for name in ATTENTIVE_PROBES})
        for epoch in range(1, 7)
    ]
    result = selection_lib.summarize(
        history, ATTENTIVE_PROBES, rule="reference", score_split="test", encoder="context"
    )
    best = result["best"]
    assert (best, result["probes"][best]["epoch"]) == reference_best_of_three(history)


# --------------------------------------------------------------------------- the run


def tiny_pretraining_config(**overrides):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_loop import tiny_config

    return tiny_config(**overrides)


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
    """Two MIM-JEPA steps of the tiny digits model (width 32, depth 1, 64 px, batch 16)."""
    from scott_jax import loop

    workdir = tmp_path_factory.mktemp("pretrained")
    loop.train_and_evaluate(tiny_pretraining_config(), str(workdir), stop_at_step=2)
    return workdir


def test_probe_run_end_to_end(pretrained_workdir, caplog):
    config = probe_config(
        num_epochs=1,
        labels_per_class=10,
        augment=False,
        probes=("linear", "simple"),
        **{"optim.lr_warmup_epochs": 0.5},
    )
    with caplog.at_level(logging.WARNING, logger="scott_jax.evaluators.probes"):
        results = probes_lib.run_probes(config, pretrained_workdir)
    with open(pretrained_workdir / "probe" / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    assert saved["train_steps"] == 6  # 1 epoch x (100 examples // 16)
    assert "Only 6 probe steps" in caplog.text  # a few-label probe this short is under-trained
    assert set(saved["probes"]) == {"linear", "simple"}
    for entry in saved["probes"].values():
        assert 0.0 <= entry["mpc"] <= entry["top5"] <= 100.0 and 0.0 <= entry["top1"] <= 100.0
        assert (entry["epoch"], entry["selection"], entry["encoder"]) == (1, "holdout", "context")
        assert entry["select_split"] == "probe_select"
    assert saved["best"] == "simple"
    assert saved["checkpoint_step"] == 2 and saved["features"] == "cached"
    assert saved["train_examples"] == 100 and saved["num_classes"] == 10
    assert saved["knn"]["k"] == 20 and 0.0 <= saved["knn"]["top1"] <= 100.0
    assert saved["config"]["labels_per_class"] == 10
    assert saved["resolved"]["batch_size"] == 16 and saved["resolved"]["aug"] == "none"
    rows = [json.loads(line) for line in open(pretrained_workdir / "probe" / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["step"] == 6  # 100 examples // 16 = 6 steps
    assert {"linear/test/mpc", "simple/probe_select/top1", "simple/train/loss"} <= set(rows[0])
    table = probes_lib.format_table(results)
    assert "linear" in table and "k-NN" in table and "probe_select" in table


def test_feature_stats_of_a_run(pretrained_workdir):
    """The diagnostics read the run's checkpoint and the probes' label subset."""
    from scott_jax.feature_stats import feature_stats

    stats = feature_stats(str(pretrained_workdir), "target", labels_per_class=3)
    assert (stats["encoder"], stats["step"], stats["labels_per_class"]) == ("target", 2, 3)
    assert 1.0 <= stats["effective_rank"] <= 32  # width 32
    assert -1.0 <= stats["mean_cosine"] <= 1.0 and stats["pooled_std"] > 0
    for key in ("logreg_top1", "logreg_standardised_top1"):
        assert 10.0 < stats[key] <= 100.0  # above chance (10 classes): random features work


def test_target_encoder_is_the_ema_copy(pretrained_workdir):
    context = backbone_lib.load_backbone(pretrained_workdir, encoder="context")
    target = backbone_lib.load_backbone(pretrained_workdir, encoder="target")
    assert (context.step, target.step) == (2, 2)
    assert context.encoder == target.encoder and context.encoder.depth == 1
    kernel = ("transformer", "block_0", "attn", "qkv", "kernel")
    a, b = context.params, target.params
    for key in kernel:
        a, b = a[key], b[key]
    assert a.shape == b.shape and not np.array_equal(a, b)  # 2 EMA steps with m < 1


def test_random_encoder_is_the_runs_initial_context_encoder(pretrained_workdir):
    """The random-init baseline: the run's architecture with the weights of its step 0."""
    from scott_jax import optim
    from scott_jax.methods import mim_jepa
    from scott_jax.sharding import make_mesh

    backbone = backbone_lib.load_backbone(pretrained_workdir, encoder="random")
    assert (backbone.which, backbone.step) == ("random", 0) and backbone.encoder.depth == 1
    config = tiny_pretraining_config()
    lengths = optim.run_lengths(1797, config.batch_size, 1, 0)
    trainer = mim_jepa.build_trainer(config, lengths, make_mesh(), source=None)
    initial = jax.device_get(trainer.init(jax.random.key(config.seed)).params["context_encoder"])
    chex.assert_trees_all_equal(backbone.params, initial)
    trained = backbone_lib.load_backbone(pretrained_workdir).params
    assert not np.array_equal(
        trained["transformer"]["block_0"]["attn"]["qkv"]["kernel"],
        backbone.params["transformer"]["block_0"]["attn"]["qkv"]["kernel"],
    )


def test_random_encoder_probe_run_is_recorded_as_such(pretrained_workdir):
    config = probe_config(
        encoder="random",
        num_epochs=1,
        labels_per_class=10,
        augment=False,
        probes=("linear",),
        **{"optim.lr_warmup_epochs": 0.5},
    )
    results = probes_lib.run_probes(config, pretrained_workdir)
    with open(pretrained_workdir / "probe_random" / "results.json") as f:
        saved = json.load(f)
    assert saved["encoder"] == "random" and saved["checkpoint_step"] == 0
    assert saved["probes"]["linear"]["encoder"] == "random"
    assert "random encoder of step 0" in probes_lib.format_table(results)


def test_missing_workdir_or_checkpoint_is_a_loud_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pretraining run"):
        backbone_lib.load_backbone(tmp_path / "nowhere")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        backbone_lib.load_backbone(tmp_path)


def fake_run(workdir, saved_depth, config_depth, with_target=True):
    """A checkpoint whose params have `saved_depth` blocks, saved with a config of config_depth."""
    encoder = build_encoder("scott-3/16", 64, embed_dim=32, depth=saved_depth, num_heads=2)
    shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
    state = {"step": np.int32(3), "params": {"context_encoder": params}}
    if with_target:
        state["target_params"] = params
    config = tiny_pretraining_config(**{"model.depth": config_depth}).to_dict()
    with Checkpointer(workdir / "checkpoints") as checkpointer:
        checkpointer.save(3, state, config, force=True)


def test_mismatched_checkpoint_is_a_loud_error(tmp_path):
    fake_run(tmp_path, saved_depth=1, config_depth=2)
    with pytest.raises(ValueError, match=r"(?s)step 3 in .*checkpoints.*missing.*block_1"):
        backbone_lib.load_backbone(tmp_path)
    matching = tmp_path / "matching"
    fake_run(matching, saved_depth=1, config_depth=1, with_target=False)
    assert backbone_lib.load_backbone(matching).encoder.depth == 1
    with pytest.raises(ValueError, match="has no target_params"):
        backbone_lib.load_backbone(matching, encoder="target")
    with pytest.raises(ValueError, match=r"a mim_jepa run has no 'predictor' encoder"):
        backbone_lib.load_backbone(matching, encoder="predictor")


def test_config_errors():
    for overrides, message in [
        ({"selection": "best"}, "config.selection"),
        ({"optim.lr_warmup_epochs": -1.0}, "lr_warmup_epochs"),
        ({"selection": "reference", "labels_per_class": 5}, "labels_per_class"),
    ]:
        with pytest.raises(ValueError, match=message):
            probes_lib._check_config(probe_config(**{"optim.lr_warmup_epochs": 20.0, **overrides}))


def test_cli_reports_a_missing_workdir(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "probe.py",
            "--workdir",
            str(tmp_path / "nowhere"),
            "--config.num_epochs=5",
            "--config.optim.lr_warmup_epochs=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "not a pretraining run" in result.stderr


def test_sources_per_selection_rule():
    """Honest rules train on probe_train and score probe_select; 'reference' trains on both."""
    from scott_jax.data import load_source

    settings = {"dataset": "digits", "data_dir": None}
    sizes = {p: load_source("digits", p).num_examples for p in ("probe_train", "probe_select")}
    train, evals = probes_lib._load_sources(probe_config(), settings, "holdout", "probe_select")
    assert train.num_examples == sizes["probe_train"] and set(evals) == {"test", "probe_select"}
    train, evals = probes_lib._load_sources(probe_config(), settings, "reference", "test")
    assert train.num_examples == sum(sizes.values()) and set(evals) == {"test"}


def test_training_streams():
    """Augmented: one view of the pretraining transform; cached: a drop_last permutation."""
    from scott_jax.data import load_source

    source = load_source("digits", "probe_train", labels_per_class=10)  # 100 examples
    settings = {"batch_size": 16, "crop_scale": (0.2, 1.0), "aug": "none"}
    encoder = build_encoder("scott-3/16", 64, embed_dim=32, depth=1, num_heads=2)
    augmented = probes_lib._train_data(probe_config(), settings, encoder, source, None)
    batch = next(augmented.epoch_batches(1))
    assert augmented.lengths.steps_per_epoch == 6 and batch["x"].shape == (16, 64, 64, 3)
    cache = (np.arange(100, dtype=np.float32)[:, None, None], source.labels)
    cached = probes_lib._train_data(probe_config(augment=False), settings, encoder, source, cache)
    seen = np.concatenate([b["x"][:, 0, 0] for b in cached.epoch_batches(1)])
    assert seen.shape == (96,) and len(set(seen)) == 96  # 6 full batches, no repeats
    again = np.concatenate([b["x"][:, 0, 0] for b in cached.epoch_batches(1)])
    other = np.concatenate([b["x"][:, 0, 0] for b in cached.epoch_batches(2)])
    np.testing.assert_array_equal(seen, again)
    assert not np.array_equal(seen, other)
