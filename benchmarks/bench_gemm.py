"""The machine's matmul rate at the pretraining step's shapes: a floor for any step time.

    python benchmarks/bench_gemm.py --variant scott-7/16 --img-size 224 --batch 8

Times, each alone and forward only, the dense matmuls that carry most of the step's FLOPs:
the transformer's qkv, output projection, SwiGLU w12 and last linear at M = batch x N
tokens, and the SCOTT stem's im2col matmul (49 x 64 -> D over the S/8 x S/8 map). JAX
always; PyTorch too when it is installed (same threads as `compare.py`). Prints one JSON
line: per-shape GFLOP/s for each framework (best of --repeats), and per framework
`gemm_gflops` = the shapes' total FLOPs / their total time.

Dividing a step's `flops_per_step` by the larger `gemm_gflops` gives the time the step
would take if every FLOP ran as fast as these matmuls: a floor for both implementations,
since the element-wise work, softmax, pooling and the optimizer only add to it.
`compare.py` reports that floor next to the measured times.
"""

import argparse
import json
import os
import time


def shapes(variant: str, img_size: int, batch: int) -> dict[str, tuple[int, int, int]]:
    """{name: (M, K, N)} of the step's main matmuls for a named SCOTT / ViT variant."""
    from scott_jax.models import encoder_kwargs
    from scott_jax.models.transformer import swiglu_hidden_dim

    kwargs = encoder_kwargs(variant, img_size)
    dim, tokens = kwargs["embed_dim"], batch * (img_size // kwargs["patch_size"]) ** 2
    hidden = swiglu_hidden_dim(dim)
    result = {
        "qkv": (tokens, dim, 3 * dim),
        "proj": (tokens, dim, dim),
        "ffn_w12": (tokens, dim, 2 * hidden),
        "ffn_last": (tokens, hidden, dim),
    }
    if kwargs["tokenizer"] == "scott":
        result["stem_im2col"] = (batch * (img_size // 8) ** 2, 49 * 64, dim)
    return result


def best_seconds(run, repeats: int) -> float:
    """Best wall time of `run()` over `repeats` calls after one warm-up call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def jax_seconds(m: int, k: int, n: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (m, k))
    b = jax.random.normal(jax.random.key(1), (k, n))
    matmul = jax.jit(jnp.matmul)
    return best_seconds(lambda: matmul(a, b).block_until_ready(), repeats)


def torch_seconds(m: int, k: int, n: int, repeats: int) -> float:
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    with torch.no_grad():
        return best_seconds(lambda: torch.matmul(a, b), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="scott-7/16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args()

    frameworks = {"jax": jax_seconds}
    try:
        import torch
    except ImportError:
        torch = None
    else:
        torch.set_num_threads(args.threads)
        frameworks["torch"] = torch_seconds
    result = {}
    for name, seconds in frameworks.items():
        per_shape, total_flops, total_sec = {}, 0.0, 0.0
        for shape_name, (m, k, n) in shapes(args.variant, args.img_size, args.batch).items():
            sec = seconds(m, k, n, args.repeats)
            per_shape[shape_name] = round(2 * m * k * n / sec / 1e9, 1)
            total_flops += 2 * m * k * n
            total_sec += sec
        result[f"{name}_gemm_gflops"] = round(total_flops / total_sec / 1e9, 1)
        result[f"{name}_per_shape_gflops"] = per_shape
    result["gemm_gflops"] = max(result[f"{name}_gemm_gflops"] for name in frameworks)
    print(json.dumps({**result, **vars(args)}))


if __name__ == "__main__":
    main()
