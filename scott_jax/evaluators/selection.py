"""Model selection of the probes and the supervised baseline: which evaluated epoch each
reports ('holdout' on probe_select, 'last', or the paper's 'reference' protocol)."""

import logging
from collections.abc import Mapping, Sequence

import ml_collections

from scott_jax.config_checks import Checks
from scott_jax.evaluators.metrics import METRICS
from scott_jax.models.probes import ATTENTIVE_PROBES

log = logging.getLogger(__name__)

SELECTION_RULES = ("holdout", "last", "reference")


def check_selection_and_schedule(
    config: ml_collections.ConfigDict, rules: Sequence[str] = SELECTION_RULES
) -> None:
    """The selection rule (one of `rules`), epoch counts and warmup of a labelled run (the
    probes; the supervised baselines, which have no 'reference' rule); ConfigError."""
    c = Checks(config)
    c.choice("selection", rules)
    c.number("num_epochs", low=1, integer=True)
    c.number("eval_every_epochs", low=1, integer=True)
    c.number("optim.lr_warmup_epochs", low=0)  # longer than the run: clamped, with a warning
    c.done()


def selection_plan(rule: str, has_select_split: bool) -> tuple[str, str | None]:
    """(rule applied, split whose top-1 ranks the epochs and picks the best probe).

    'holdout' ranks on 'probe_select', or becomes 'last' without one; 'last' still uses
    'probe_select' (if any) to pick the best probe, else the probes' last-epoch training
    top-1; 'reference' ranks on 'test' (the reference's protocol; docs/deviations.md).
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection {rule!r}; expected one of {SELECTION_RULES}")
    if rule == "reference":
        return rule, "test"
    if rule == "holdout" and not has_select_split:
        log.warning("selection='holdout' without a probe_select split: reporting the last epoch")
        return "last", None
    return rule, "probe_select" if has_select_split else None


def select_row(history: Sequence[Mapping], key: str) -> Mapping:
    """The row of `history` with the highest `row[key]`; ties go to the later row (>=)."""
    best = None
    for row in history:
        if best is None or row[key] >= best[key]:
            best = row
    if best is None:
        raise ValueError("no evaluated epoch to select from")
    return best


def summarize(
    history: Sequence[Mapping],
    probes: Sequence[str],
    *,
    rule: str,
    score_split: str | None,
    encoder: str,
) -> dict:
    """{'probes': {name: test top1/top5/mpc at the selected epoch, ...}, 'best': name or None}.

    history: one row per evaluated epoch with 'epoch' and f'{probe}/{split}/{metric}' keys
    (splits 'train', 'test', 'probe_select'). Under 'last' every probe reports the last row;
    otherwise its row is `select_row` on f'{probe}/{score_split}/top1'. Each entry keeps the
    score that chose it ('select_top1', on `score_split`, or the training top-1 when there is
    none). 'best' is the attentive probe with the highest score, ties to the later epoch, then
    the order multi, cross, simple: with rule 'reference' that is exactly the reference's
    best-of-three (official `src/eval.py`), the number the paper reports as "attentive".
    """
    score_key = "{}/" + (score_split or "train") + "/top1"
    entries = {}
    for name in probes:
        row = history[-1] if rule == "last" else select_row(history, score_key.format(name))
        entries[name] = {
            **{metric: row[f"{name}/test/{metric}"] for metric in METRICS},
            "epoch": int(row["epoch"]),
            "selection": rule,
            "select_split": score_split,
            "select_top1": row[score_key.format(name)],
            "encoder": encoder,
        }
    attentive = [name for name in ATTENTIVE_PROBES if name in entries]
    best = max(
        attentive,
        key=lambda n: (entries[n]["select_top1"], entries[n]["epoch"], -attentive.index(n)),
        default=None,
    )
    return {"probes": entries, "best": best}


def selection_note(rule: str, score_split: str | None, dataset: str) -> str:
    if rule == "reference":
        note = (
            "the paper's protocol: epochs and the best probe are chosen on the test split, so "
            "these test numbers are optimistically biased (docs/deviations.md); use them only to "
            "compare with the paper"
        )
        if dataset == "oxford_flowers102":
            note += (
                "; NOTE(deviation): the reference selects Flowers-102 on its validation split "
                "(inside the probes' training data), which no data purpose exposes yet"
            )
        return note
    if score_split is None:
        return "no selection split: every probe is reported at its last epoch"
    return f"epochs chosen on {score_split}, held out from the probes' training data"
