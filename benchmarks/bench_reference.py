"""Time the official PyTorch MIM-JEPA step (SCOTT reference code) on synthetic input, CPU.

    python benchmarks/bench_reference.py --reference-dir /tmp/scott_ref --variant scott-7/16 \
        --img-size 224 --batch 8 --steps 5 --warmup 2

The official modules (`src.models.get_model`, `src.models.predictor.Predictor`,
`src.optimizer.get_optimizer`, `src.masks.mask_generator.MaskGenerator`,
`src.schedulers.LinearScheduler`) are imported from --reference-dir at run time. The timed
step is the reference loop's MIM-JEPA part (target forward + LayerNorm, masked context
forward, predictor, loss, backward, scheduled AdamW, EMA); masks are drawn outside the loop
and the online probe is left out, as in bench_train.py.

Prints one JSON line with bench_train.py's keys that apply to eager PyTorch: sec_per_step
(median), step_times, images_per_sec, compile_sec (0), flops_per_step (FlopCounterMode over a
warm-up step), achieved_tflops, peak_rss_gb, threads.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from scott_jax.models import DEFAULTS, VARIANTS


def reference_config(variant: str) -> dict:
    """get_model kwargs of a named variant, with the reference yaml's regularisation.

    Heads follow our variant table (6 for scott-12/16, the paper's) so that both sides
    do the same work; the reference yaml's 4 heads cost the same FLOPs.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known variants: {sorted(VARIANTS)}")
    spec = {**DEFAULTS, **VARIANTS[variant]}
    return dict(
        name=spec["tokenizer"],
        patch_size=spec["patch_size"],
        in_channels=3,
        embed_dim=spec["embed_dim"],
        depth=spec["depth"],
        num_heads=spec["num_heads"],
        mlp_ratio=0 if spec["ffn_layer"] == "swiglu" else spec["mlp_ratio"],
        dropout_rate=spec["dropout_rate"],
        attention_dropout=spec["attention_dropout"],
        stochastic_depth_rate=spec["stochastic_depth_rate"],
        num_register_tokens=spec["num_register_tokens"],
        ffn_layer=spec["ffn_layer"],
    )


def masked_smooth_l1(torch, predicted, targets, keep_mask):
    """The MIM-JEPA loss (`ReconstructionLoss`): smooth-L1 (beta 1) on masked patches only.

    predicted, targets [B, N, D]; keep_mask [B, N] (1 = visible). Per image: channel-mean
    of the loss summed over masked patches, divided by the number of masked patches.
    """
    dim = predicted.shape[-1]
    dropped = (1 - keep_mask).float().unsqueeze(-1)
    loss = torch.nn.functional.smooth_l1_loss(
        predicted * dropped, targets * dropped, reduction="none"
    )
    per_image = ((loss.sum(-1) + 1e-8) / dim).sum(-1) / (dropped.squeeze(-1).sum(-1) + 1e-8)
    return per_image.mean()


#: The schedule of bench_train.py: 10k steps, 1k warm-up, the reference yaml's values.
BENCH_SCHEDULE = dict(
    total_steps=10_000,
    warmup_steps=1_000,
    lr_start=1e-6,
    lr_peak=5e-4,
    lr_final=1e-5,
    lr_flat_pctg=0.72,
    wd_start=0.04,
    wd_final=0.4,
    ema_start=0.996,
    ema_final=1.0,
)


def official_trainer(torch, context_encoder, predictor_depth: int, schedule: dict):
    """(predictor, target_encoder, optimizer, ema scheduler) of the official code around an
    official `context_encoder`: the matching predictor, the deep-copied target, AdamW over
    both with the official parameter groups and LR / WD schedulers, the linear EMA
    schedule. `schedule` has the keys of `BENCH_SCHEDULE`."""
    import copy

    from src.models.predictor import Predictor
    from src.optimizer import get_optimizer
    from src.schedulers import LinearScheduler

    predictor = Predictor(
        embed_dim=context_encoder.embed_dim,
        num_patches=context_encoder.num_patches,
        num_register_tokens=context_encoder.num_register_tokens,
        backbone_depth=context_encoder.depth,
        depth=predictor_depth,
        num_heads=context_encoder.num_heads,
        mlp_ratio=context_encoder.mlp_ratio,
        dropout_rate=context_encoder.dropout_rate,
        attention_dropout=context_encoder.attention_dropout,
        stochastic_depth_rate=context_encoder.stochastic_depth_rate,
        ffn_layer=context_encoder.ffn_layer,
    )
    target_encoder = copy.deepcopy(context_encoder)
    optimizer = get_optimizer(
        model=torch.nn.ModuleList([context_encoder, predictor]),
        lr_warmup_steps=schedule["warmup_steps"],
        **{k: v for k, v in schedule.items() if k.startswith(("lr_", "wd_", "total_"))},
    )
    ema = LinearScheduler(
        start_value=schedule["ema_start"],
        final_value=schedule["ema_final"],
        total_steps=schedule["total_steps"],
    )
    return predictor, target_encoder, optimizer, ema


def build(args):
    """Official context/target encoders, predictor, optimizer, EMA schedule and a batch."""
    import torch
    from src.masks.mask_generator import MaskGenerator
    from src.models import get_model

    torch.manual_seed(0)
    context_encoder = get_model(
        img_size=args.img_size, verbose=False, **reference_config(args.variant)
    )
    predictor, target_encoder, optimizer, ema = official_trainer(
        torch, context_encoder, args.predictor_depth, BENCH_SCHEDULE
    )
    masks = MaskGenerator(img_size=args.img_size, patch_size=16, masking_type="blockwise")
    shape = (args.batch, 3, args.img_size, args.img_size)
    batch = dict(
        context=torch.randn(shape),
        target=torch.randn(shape),
        keep_mask=masks(batch_size=args.batch, mask_ratio=args.mask_ratio),
    )
    context_encoder.train()
    predictor.train()
    target_encoder.eval()
    return context_encoder, predictor, target_encoder, optimizer, ema, batch


def make_step(torch, context_encoder, predictor, target_encoder, optimizer, ema):
    """The reference loop's MIM-JEPA update as a closure over the models: batch -> loss.

    With `with_stats=True` the step returns (loss, stats): the collapse monitors of our train
    step ('target_std', 'context_std': `scott_jax.evaluators.metrics.pooled_std` of the LN'd
    target and context features) and the EMA momentum 'ema' of this update.
    """
    functional = torch.nn.functional

    def pooled_std(features) -> float:
        features = functional.layer_norm(features.detach(), (features.size(-1),))
        return float(features.mean(dim=1).std(dim=0, unbiased=False).mean())

    def step(batch, with_stats=False):
        with torch.no_grad():
            targets = target_encoder(batch["target"], masks=None)
            targets = functional.layer_norm(targets, (targets.size(-1),))
        optimizer.zero_grad()
        context = context_encoder(batch["context"], batch["keep_mask"])
        predicted = predictor(context)
        loss = masked_smooth_l1(torch, predicted, targets, batch["keep_mask"])
        loss.backward()
        optimizer.step()
        momentum = ema.step()
        with torch.no_grad():
            for online, target in zip(
                context_encoder.parameters(), target_encoder.parameters(), strict=True
            ):
                target.mul_(momentum).add_((1.0 - momentum) * online.detach())
        if not with_stats:
            return loss.item()
        stats = dict(target_std=pooled_std(targets), context_std=pooled_std(context), ema=momentum)
        return loss.item(), stats

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", required=True, help="official SCOTT checkout")
    parser.add_argument("--variant", default="scott-7/16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--predictor-depth", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (all cores)"
    )
    args = parser.parse_args()
    reference = Path(args.reference_dir).resolve()
    if not (reference / "src" / "models" / "scott.py").is_file():
        raise SystemExit(f"{reference} is not an official SCOTT checkout (no src/models/scott.py)")
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1: the first warm-up step also counts FLOPs")
    sys.path.insert(0, str(reference))

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    models = build(args)
    batch = models[-1]
    step = make_step(torch, *models[:-1])

    counter = FlopCounterMode(display=False)
    with counter:
        loss = step(batch)
    flops = float(counter.get_total_flops())
    times = []
    for i in range(args.warmup - 1 + args.steps):
        start = time.perf_counter()
        loss = step(batch)
        if i >= args.warmup - 1:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    result = {
        "sec_per_step": round(sec, 4),
        "images_per_sec": round(args.batch / sec, 2),
        "compile_sec": 0.0,
        "flops_per_step": flops,
        "achieved_tflops": round(flops / sec / 1e12, 4),
        "step_times": [round(t, 4) for t in times],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "device": "cpu",
        "torch": torch.__version__,
        "loss": loss,
        **{k: v for k, v in vars(args).items() if k != "reference_dir"},
        "reference_dir": str(reference),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
