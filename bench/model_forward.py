"""Model forward throughput: radixkv's ModelRunner vs transformers on the same shapes, same run.

Prefill: one 512-token prompt, with nothing cached and with a 448-token cached prefix (64 computed).
Decode: static batches of 1/8/32/64 requests with a `--decode-context` token prompt, timing
`--decode-steps` steps. transformers runs its LlamaForCausalLM with a DynamicCache in a plain
forward loop (logits of the last position only), a stronger baseline than `generate`.
Achieved FLOP/s are given as a fraction of this machine's matmul peak, measured here per dtype.

    python bench/model_forward.py            # full run
    python bench/model_forward.py --quick    # fewer shapes and repeats
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable

import torch

from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.token_to_kv_pool import TokenToKVPool
from radixkv.model.config import ModelConfig
from radixkv.model.dtype import resolve_dtype
from radixkv.model.llama import LlamaForCausalLM
from radixkv.model.loader import load_config, load_weights, resolve_model
from radixkv.model.model_runner import ModelRunner, kv_layout
from radixkv.protocol import SamplingParams
from radixkv.testing import PoolDriver

GO_ON = SamplingParams(max_new_tokens=1 << 30, ignore_eos=True)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, repeats)


def prefill_flops(config: ModelConfig, prefix: int, total: int) -> float:
    """Matmul FLOPs of computing positions [prefix, total) plus the LM head of the last one."""
    return sum(config.flops_per_token(p + 1) for p in range(prefix, total)) + (
        2 * config.hidden_size * config.vocab_size
    )


def hf_model(config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> object:
    """transformers' LlamaForCausalLM on the same (already converted) weights."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
    )
    model = HFLlama(hf_config)
    model.load_state_dict(tensors, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


def ours_prefill(driver: PoolDriver, prompt: list[int], cached: int, repeats: int) -> float:
    base = driver.add(prompt, GO_ON)
    driver.step([base], decode=False)

    def run() -> None:
        req = driver.add(prompt, GO_ON, prefix_from=base if cached else None, prefix_len=cached)
        driver.step([req], decode=False)
        driver.release(req)

    t = best_time(run, repeats)
    driver.release(base)
    return t


def ours_decode(driver: PoolDriver, prompts: list[list[int]], steps: int) -> float:
    reqs = [driver.add(p, GO_ON) for p in prompts]
    driver.step(reqs, decode=False)
    driver.step(reqs)
    t = time.perf_counter()
    for _ in range(steps):
        driver.step(reqs)
    elapsed = time.perf_counter() - t
    for r in reqs:
        driver.release(r)
    return elapsed


def hf_prefill(model: object, prompt: list[int], repeats: int) -> float:
    ids = torch.tensor([prompt])
    return best_time(lambda: model(ids, use_cache=True, logits_to_keep=1), repeats)  # type: ignore[operator]


def hf_decode(model: object, prompts: list[list[int]], steps: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(torch.tensor(prompts), past_key_values=cache, logits_to_keep=1)  # type: ignore[operator]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    out = model(nxt, past_key_values=cache, logits_to_keep=1)  # type: ignore[operator]
    t = time.perf_counter()
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(nxt, past_key_values=cache, logits_to_keep=1)  # type: ignore[operator]
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--cached-len", type=int, default=448)
    ap.add_argument("--decode-context", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 32, 8 steps, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.decode_steps, args.repeats = "1,32", 8, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    source = resolve_model(args.model)
    config = load_config(source)
    tensors = load_weights(source, config).tensors
    print(
        f"# model_forward  {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.processor() or ''}"
    )
    print(f"# model {args.model}  threads {args.threads}  torch {torch.__version__}  "
          f"load avg {os.getloadavg()[0]:.2f}")  # fmt: skip
    prompt = torch.randint(100, config.vocab_size - 100, (args.prompt_len,)).tolist()
    header = (
        f"{'dtype':5} {'shape':26} {'radixkv tok/s':>13} {'hf tok/s':>9} {'ratio':>6} {'%peak':>6}"
    )
    for name in args.dtypes.split(","):
        dtype = resolve_dtype(name)
        peak_n = 1024 if args.quick else 2048
        with torch.inference_mode():
            peak = matmul_peak(dtype, peak_n, args.repeats + 5)
        with torch.device("meta"):
            net = LlamaForCausalLM(config)
        net.load_hf_state_dict(tensors, dtype=dtype)
        slots = (
            max(int(b) for b in args.batch_sizes.split(","))
            * (args.decode_context + args.decode_steps + 4)
            + 3 * args.prompt_len
        )
        pool = TokenToKVPool(kv_layout(config, None, dtype), slots)
        driver = PoolDriver(ModelRunner(net, pool, ReqToTokenPool(80, 4096)))
        ref = None if args.no_hf else hf_model(config, tensors, dtype)

        # (text, achieved FLOP/s or None): printed once the peak is known
        lines: list[tuple[str, float | None]] = []

        def row(
            shape: str,
            tokens: int,
            ours: float,
            hf: float | None,
            flops: float,
            name: str = name,
            lines: list[tuple[str, float | None]] = lines,
        ) -> None:
            hf_txt = f"{tokens / hf:9.0f} {hf / ours:6.2f}" if hf else f"{'-':>9} {'-':>6}"
            lines.append((f"{name:5} {shape:26} {tokens / ours:13.0f} {hf_txt}", flops / ours))

        with torch.inference_mode():
            t_full = ours_prefill(driver, prompt, 0, args.repeats)
            hf_full = hf_prefill(ref, prompt, args.repeats) if ref else None
            row(f"prefill {args.prompt_len}", args.prompt_len, t_full, hf_full,
                prefill_flops(config, 0, args.prompt_len))  # fmt: skip
            t_hit = ours_prefill(driver, prompt, args.cached_len, args.repeats)
            new = args.prompt_len - args.cached_len
            row(f"prefill {args.prompt_len} ({args.cached_len} cached)", new, t_hit, None,
                prefill_flops(config, args.cached_len, args.prompt_len))  # fmt: skip
            lines.append((f"{name:5} {'cached prefix speed-up':26} {t_full / t_hit:13.2f}x", None))
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                prompts = torch.randint(100, 40000, (bs, args.decode_context)).tolist()
                t = ours_decode(driver, prompts, args.decode_steps)
                t_hf = hf_decode(ref, prompts, args.decode_steps) if ref else None
                ctx = args.decode_context + args.decode_steps // 2
                flops = (
                    bs
                    * args.decode_steps
                    * (config.flops_per_token(ctx) + 2 * config.hidden_size * config.vocab_size)
                )
                row(f"decode bs{bs} ctx{args.decode_context}", bs * args.decode_steps, t, t_hf,
                    flops)  # fmt: skip
            # The peak is measured before and after the rows and the higher one used: on a shared
            # VM one measurement can come out at half the machine's rate.
            again = matmul_peak(dtype, peak_n, args.repeats + 5)
        print(f"\n## {name}: matmul peak {max(peak, again) / 1e9:.0f} GFLOP/s (measured "
              f"{peak / 1e9:.0f} before the rows, {again / 1e9:.0f} after)\n{header}")  # fmt: skip
        for text, achieved in lines:
            frac = f" {achieved / max(peak, again):6.1%}" if achieved is not None else ""
            print(text + frac, flush=True)


if __name__ == "__main__":
    main()
