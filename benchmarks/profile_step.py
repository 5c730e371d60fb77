"""Where the pretraining step's time goes: a jax.profiler trace of it, summed by model part.

    python benchmarks/profile_step.py --variant scott-12/16 --img-size 224 --batch 8

Compiles the step of bench_train.py (same flags), runs --warmup steps, then traces --steps
steps (`jax.profiler.trace`). Every XLA op of the trace is mapped through the compiled HLO's
`op_name` metadata (flax module path, jvp/transpose) to a phase (target, forward, backward,
update) and a part (tokenizer_conv, tokenizer_pool, attention, ffn, layernorm_other,
dropout_rng, predictor, loss, optimizer_ema).

Prints one JSON line: wall sec_per_step, busy_sec (union of op intervals per step),
host_sec (= wall - busy: dispatch and host work between ops), and the seconds and share of
each part, phase and (phase, part), summed over op durations (ops can overlap on the CPU's
threads, so shares are of the summed op time).
"""

import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train

METADATA = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its `op_name` metadata (the JAX name stack)."""
    names = {}
    for line in hlo_text.splitlines():
        match = METADATA.match(line)
        if match:
            names.setdefault(match.group(1), match.group(2))
    return names


def phase_of(name: str) -> str:
    """target / forward / backward / update from a JAX name stack."""
    if "transpose(" in name:
        return "backward"
    if "jvp(" in name:
        return "forward"
    if "Encoder" in name or "tokenizer" in name or "transformer" in name:
        return "target"
    return "update"


def part_of(name: str) -> str:
    """The model part an op belongs to, from its name stack."""
    if "_bernoulli" in name or "threefry" in name or "dropout_bits" in name:
        return "dropout_rng"
    if "Predictor" in name or "predictor" in name:
        return "predictor"
    if "tokenizer" in name:
        return (
            "tokenizer_conv" if re.search(r"conv_\d|conv_general|proj", name) else "tokenizer_pool"
        )
    if "/attn/" in name or name.endswith("/attn"):
        return "attention"
    if "/ffn/" in name:
        return "ffn"
    if "Encoder" in name or "transformer" in name or "block_" in name:
        return "layernorm_other"
    if "smooth_l1" in name or "masked_smooth_l1" in name or "target_features" in name:
        return "loss"
    return "optimizer_ema"


def trace_events(log_dir: Path) -> list[dict]:
    """Complete ('X') events with an `hlo_op` from the perfetto trace under log_dir."""
    (path,) = log_dir.rglob("perfetto_trace.json.gz")
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def busy_seconds(events: list[dict]) -> float:
    """Length of the union of the events' [ts, ts + dur] intervals (microseconds -> s)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e6


def shares(seconds: dict, total: float) -> dict:
    return {
        k: {"sec": round(v, 4), "share": round(v / total, 4)}
        for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])
    }


def main() -> None:
    args = bench_train.parser().parse_args()
    if args.compile_only:
        raise SystemExit("--compile-only makes no sense for a profile")

    import jax

    trainer, state, batch = bench_train.setup(args)
    compiled = trainer.step.lower(state, batch).compile()
    names = op_names(compiled.as_text())
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
            wall = (time.perf_counter() - start) / args.steps
        events = trace_events(Path(log_dir))
    module = compiled.as_text().split("\n", 1)[0].split()[1].rstrip(",")
    events = [e for e in events if e["args"].get("hlo_module", module) == module] or events
    by_part, by_phase, by_both = (collections.defaultdict(float) for _ in range(3))
    unmapped = 0.0
    for event in events:
        sec = event["dur"] / 1e6 / args.steps
        name = names.get(event["args"]["hlo_op"], "")
        if not name:
            unmapped += sec
        part, phase = part_of(name), phase_of(name)
        by_part[part] += sec
        by_phase[phase] += sec
        by_both[f"{phase}/{part}"] += sec
    op_total = sum(by_part.values())
    busy = busy_seconds(events) / args.steps
    result = {
        "sec_per_step": round(wall, 4),
        "busy_sec": round(busy, 4),
        "host_sec": round(max(wall - busy, 0.0), 4),
        "op_sec": round(op_total, 4),
        "unmapped_op_sec": round(unmapped, 4),
        "parts": shares(by_part, op_total),
        "phases": shares(by_phase, op_total),
        "phase_parts": shares(by_both, op_total),
        "num_ops": len(events) // args.steps,
        **vars(args),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
