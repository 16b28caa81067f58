"""Accuracy of the quantized KV cache (`--kv-cache-dtype int8 | fp8_e4m3 | fp8_e5m2`), side by side
with the model's own KV dtype, in one run.

    python bench/kv_quant.py [--dtype auto] [--prompts 64] [--prompt-len 1024] [--new 32]
                             [--skip-greedy] [--speed]

1. Attention error on random inputs: the CPU decode kernel over quantized K/V against float32
   attention over the unquantized K/V (64 queries x 1024 keys, 3 KV heads x 3 query heads x 64,
   K/V ~ N(0, 1) with 1 % of values 10x larger, as real K/V have outliers); max and mean absolute
   error of the output, next to the same kernel over bf16 K/V; fp8 as the pool stores it (keys
   and queries rotated, `kv_quant.key_rotation`) and unrotated.
2. Perplexity of `bench/data/perplexity.txt` (the Apache License 2.0 and Python's LICENSE.txt,
   fixed English text shipped in the repo; ~5.9k tokens, read in one request with prompt
   logprobs: every position attends to the K/V as the pool stores them), each quantized dtype
   also with its keys the other way (rotated or plain, `kv_quant.py`), and the mean change of
   the per-token negative log-likelihood in each 1000-token stretch (positive: worse).
3. Whether a fixed per-channel offset removed from K before quantizing would help (the ratio of
   K's squared quantization error without and with it, on the same text).
4. Keys rotated or not, on the model's own queries and keys (the text's first 1024 tokens): the
   relative RMS error of the scores with quantized keys, plain and rotated, per KV dtype.
5. Greedy agreement: `--prompts` windows of `--prompt-len` tokens of the same text (different
   start offsets, so no prefix is shared), `--new` greedy tokens each, EOS ignored; against the
   model with its own-dtype KV cache: the mean fraction of generated tokens identical before the
   first divergence, and the share of prompts whose whole output is identical.
   With `--dtype float32` a bf16 KV cache is measured too, as a yardstick.

6. `--speed` (instead of 1-5): decode speed at batch 64 with 1024-token contexts (random tokens,
   no shared prefix): every KV dtype's batch is prefilled, then 4 rounds time 4 decode steps of
   each dtype in turn (interleaved: a noisy moment hits all alike); the median per dtype,
   tokens/s and the ratio to the model's own KV dtype.

The real scheduler runs in this process (chunked prefill as configured by default).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from radixkv.config import ServerArgs
from radixkv.mem import TokenToKVPool, token_to_kv_pool
from radixkv.mem.kv_quant import QUANTIZED, dequantize, key_rotation, quantize, rotates_keys
from radixkv.model import cpu_attention, llama
from radixkv.model.loader import load_model
from radixkv.protocol import SamplingParams
from radixkv.scheduler.process import build_scheduler
from radixkv.tokenizer import load_tokenizer

TEXT = Path(__file__).parent / "data" / "perplexity.txt"
KV_DTYPES = ["int8", "fp8_e4m3", "fp8_e5m2"]


def attention_error() -> None:
    g = torch.Generator().manual_seed(0)
    bs, kvh, group, d, keys = 64, 3, 3, 64, 1024
    slots = bs * keys + 1
    kv = torch.randn(2, slots, kvh, d, generator=g)
    outliers = torch.rand(kv.shape, generator=g) < 0.01
    kv[outliers] *= 10
    q = torch.randn(bs, kvh * group, d, generator=g).bfloat16()
    index = (torch.arange(bs * keys) + 1).view(bs, keys)
    lens = torch.full((bs,), keys)
    kf, vf = kv[0][index].repeat_interleave(group, 2), kv[1][index].repeat_interleave(group, 2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), kf) * d**-0.5
    exact = torch.einsum("bhl,blhd->bhd", scores.softmax(-1), vf)
    print("## attention output error (CPU kernel, bf16 queries, vs float32 over the exact K/V)")
    print("| K/V | max abs | mean abs |\n|---|---:|---:|")
    k16, v16 = kv[0].bfloat16(), kv[1].bfloat16()
    rows = [("bfloat16", q, k16, v16, None)]
    rotation = key_rotation(d)  # fp8 pools store keys rotated, queries meet them rotated
    for name in KV_DTYPES:
        code = QUANTIZED[name][0]
        (kc, ks), (vc, vs) = (quantize(x, code) for x in kv)
        if not rotates_keys(code):
            rows.append((name, q, kc, vc, (ks, vs)))
            continue
        rows.append((f"{name}, keys unrotated", q, kc, vc, (ks, vs)))
        kc, ks = quantize(kv[0] @ rotation, code)
        rows.append((name, (q.float() @ rotation).bfloat16(), kc, vc, (ks, vs)))
    for name, q, k, v, scales in rows:
        out = cpu_attention.decode_attention(q, k, v, index, lens, d**-0.5, scales=scales)
        err = (out.float() - exact).abs()
        print(f"| {name} | {float(err.max()):.2e} | {float(err.mean()):.2e} |")


@contextlib.contextmanager
def keys_rotated(rotated: bool | None):
    """This bench only: pools store keys rotated (`kv_quant.key_rotation`) or not, whatever their
    dtype, for as long as the block runs (None: as the runtime does)."""
    default = token_to_kv_pool.rotates_keys
    if rotated is not None:
        token_to_kv_pool.rotates_keys = lambda dtype: rotated  # type: ignore[assignment]
    try:
        yield
    finally:
        token_to_kv_pool.rotates_keys = default


def k_centering(model, own: str, text: list[int]) -> None:
    """Would a fixed per-channel offset help? Subtract from each layer's and KV head's keys the
    mean of the first 1024 tokens' keys (softmax ignores a constant shift of every key) and
    compare the quantization error of the remaining keys with and without it."""
    keys: dict[int, list[torch.Tensor]] = {}
    store = TokenToKVPool.set_kv

    def record(pool, layer, slots, k, v):  # this bench only: see the keys as the model stores them
        keys.setdefault(layer, []).append(k.float().clone())
        return store(pool, layer, slots, k, v)

    TokenToKVPool.set_kv = record  # type: ignore[method-assign]
    try:
        sched = build_scheduler(ServerArgs(dtype=own, max_total_tokens=len(text) + 1024,
                                           max_context_len=len(text) + 64), model)  # fmt: skip
        run(sched, [text], SamplingParams(max_new_tokens=1))
    finally:
        TokenToKVPool.set_kv = store  # type: ignore[method-assign]
    print("\n## K quantization error with a fixed per-channel offset removed (calibrated on the "
          "first 1024 tokens, measured on the rest)")  # fmt: skip
    print("| KV cache | K squared error, plain / centred |\n|---|---:|")
    for name in ("int8", "fp8_e4m3"):
        code = QUANTIZED[name][0]
        plain = centred = 0.0
        for chunks in keys.values():
            k = torch.cat(chunks)
            offset, rest = k[:1024].mean(0), k[1024:]
            plain += float((dequantize(*quantize(rest, code), torch.float32) - rest).pow(2).sum())
            shifted = rest - offset
            back = dequantize(*quantize(shifted, code), torch.float32)
            centred += float((back - shifted).pow(2).sum())
        print(f"| {name} | {plain / centred:.2f}x |")


def key_rotation_effect(model, own: str, text: list[int]) -> None:
    """Why fp8 pools rotate keys (`kv_quant.key_rotation`): on the model's own queries and keys
    (the first 1024 tokens of the text, after rope), the relative RMS error of the scores q.k
    when k is quantized, without and with the rotation, averaged over layers and KV heads; and
    how many of the 4 largest channels (by mean |value|) queries and keys share."""
    seen: list[torch.Tensor] = []
    rope = llama.apply_rotary

    def record(qk, cos, sin):  # this bench only: see queries and keys as attention gets them
        out = rope(qk, cos, sin)
        seen.append(out.float().clone())
        return out

    llama.apply_rotary = record
    try:
        sched = build_scheduler(ServerArgs(dtype=own, max_total_tokens=4096), model)
        run(sched, [text[:1024]], SamplingParams(max_new_tokens=1))
    finally:
        llama.apply_rotary = rope
    heads, kv_heads = model.config.num_heads, model.config.num_kv_heads
    rotation = key_rotation(model.config.head_dim)
    shared = 0
    errors: dict[str, list[float]] = {}
    for qk in seen[: model.config.num_layers]:
        q = qk[:, :heads].unflatten(1, (kv_heads, heads // kv_heads))  # tokens, kv head, group, d
        k = qk[:, heads:]
        top_q = set(q.abs().mean((0, 1, 2)).topk(4).indices.tolist())
        shared += len(top_q & set(k.abs().mean((0, 1)).topk(4).indices.tolist()))
        for name in KV_DTYPES:
            for rotated in (False, True):
                qq, kk = (q @ rotation, k @ rotation) if rotated else (q, k)
                noise = dequantize(*quantize(kk, QUANTIZED[name][0]), torch.float32) - kk
                scores = torch.einsum("tkgd,skd->kgts", qq, kk)
                err = torch.einsum("tkgd,skd->kgts", qq, noise)
                rel = float(err.pow(2).mean().sqrt() / scores.pow(2).mean().sqrt())
                errors.setdefault(f"{name} {'rotated' if rotated else 'plain'}", []).append(rel)
    layers = min(len(seen), model.config.num_layers)
    share = shared / layers
    print(f"\n## keys rotated or not: score error on the model's own q and k (1024 tokens, "
          f"{layers} layers; of the 4 largest channels, q and k share {share:.1f})")  # fmt: skip
    print("| KV codes | score RMS error, plain | rotated | layers where rotated is smaller |")
    print("|---|---:|---:|---:|")
    for name in KV_DTYPES:
        plain, rot = errors[f"{name} plain"], errors[f"{name} rotated"]
        better = sum(r < p for p, r in zip(plain, rot, strict=True))
        print(f"| {name} | {statistics.mean(plain):.4f} | {statistics.mean(rot):.4f} | "
              f"{better} of {layers} |")  # fmt: skip


def run(sched, prompts: list[list[int]], params: SamplingParams) -> dict[str, tuple[list, list]]:
    for i, ids in enumerate(prompts):
        sched.add_request(f"r{i}", ids, params)
    tokens: dict[str, list[int]] = {}
    prompt_lp: dict[str, list[float]] = {}
    while sched.has_work():
        for out in sched.step():
            tokens.setdefault(out.rid, []).extend(out.token_ids)
            if out.prompt_logprobs:
                prompt_lp[out.rid] = [t.logprob for t in out.prompt_logprobs]
    return {rid: (tokens[rid], prompt_lp.get(rid, [])) for rid in tokens}


def decode_speed(
    model, own: str, steps: int = 4, rounds: int = 4, bs: int = 64, context: int = 1024
) -> None:
    """Every KV dtype's batch is prefilled first; then `rounds` rounds time `steps` decode steps
    of each dtype in turn, so a noisy moment hits every dtype alike; median of the rounds."""
    print(f"## decode speed: batch {bs}, {context}-token contexts, model {own}, median of "
          f"{rounds} interleaved rounds of {steps} steps")  # fmt: skip
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(context)] for _ in range(bs)]
    total = steps * rounds + 2
    scheds = {}
    for kv in [own, *KV_DTYPES]:
        sched = build_scheduler(ServerArgs(
            dtype=own, kv_cache_dtype=kv, max_total_tokens=bs * (context + total + 8) + 1024,
            max_running_requests=bs, max_context_len=context + total + 64,
        ), model)  # fmt: skip
        for i, ids in enumerate(prompts):
            sched.add_request(f"r{i}", ids, SamplingParams(max_new_tokens=total, ignore_eos=True))
        while sched.waiting or sched.chunked:
            sched.step()
        sched.step()  # the first decode step, untimed
        scheds[kv] = sched
    times: dict[str, list[float]] = {kv: [] for kv in scheds}
    for _ in range(rounds):
        for kv, sched in scheds.items():
            start = time.perf_counter()
            for _ in range(steps):
                sched.step()
            times[kv].append((time.perf_counter() - start) / steps)
    print("| KV cache | ms per step (median) | rounds (ms) | tokens/s | x own dtype |")
    print("|---|---:|---|---:|---:|")
    base = statistics.median(times[own])
    for kv, ts in times.items():
        med = statistics.median(ts)
        each = " ".join(f"{t * 1e3:.0f}" for t in ts)
        print(f"| {kv} | {med * 1e3:.1f} | {each} | {bs / med:.0f} | {base / med:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--skip-greedy", action="store_true")
    ap.add_argument("--speed", action="store_true")
    args = ap.parse_args()
    print(f"# kv_quant  {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or ''} "
          f"threads {torch.get_num_threads()}  torch {torch.__version__}")  # fmt: skip
    model = load_model("smollm2-135m", dtype=args.dtype)
    own = str(model.dtype).removeprefix("torch.")
    if args.speed:
        decode_speed(model, own)
        return
    attention_error()
    text = load_tokenizer("smollm2-135m").encode(TEXT.read_text())
    stride = max(1, (len(text) - args.prompt_len) // max(1, args.prompts - 1))
    windows = [text[i * stride : i * stride + args.prompt_len] for i in range(args.prompts)]

    def scheduler(kv: str):
        return build_scheduler(ServerArgs(
            dtype=own, kv_cache_dtype=kv, max_total_tokens=max(len(text), args.prompt_len * 16)
            + 4096, max_running_requests=64, max_context_len=len(text) + 64,
        ), model)  # fmt: skip

    # on an fp32 model a bf16 KV cache is a yardstick: how far plain rounding of K/V moves things
    kv_dtypes = (["bfloat16"] if own == "float32" else []) + KV_DTYPES
    print(f"\n## model {own}; perplexity of {TEXT.name} ({len(text)} tokens)")
    print(
        "| KV cache | bytes/token | perplexity | vs own dtype | mean NLL change per 1000 tokens |"
    )
    print("|---|---:|---:|---:|---|")
    ppl_params = SamplingParams(max_new_tokens=1, logprobs=True, logprob_start_len=0)
    base: list[float] = []
    for kv in [own, *kv_dtypes]:
        code = QUANTIZED[kv][0] if kv in QUANTIZED else None
        # each quantized dtype also the other way: keys rotated where the pool does not, and not
        # where it does (kv_quant.py says why fp8 rotates and int8 does not)
        variants = [None] if code is None else [None, not rotates_keys(code)]
        for rotated in variants:
            with keys_rotated(rotated):
                sched = scheduler(kv)
                lps = run(sched, [text], ppl_params)["r0"][1][1:]  # the first token has none
            base = base or lps
            ppl, base_ppl = (math.exp(-sum(x) / len(x)) for x in (lps, base))
            delta = [b - x for b, x in zip(base, lps, strict=True)]
            stretches = " ".join(
                f"{statistics.mean(delta[i : i + 1000]):+.3f}" for i in range(0, len(delta), 1000)
            )
            name = kv if rotated is None else f"{kv}, keys {'rotated' if rotated else 'plain'}"
            bytes_ = sched.mgr.token_pool.layout.bytes_per_token
            print(f"| {name} | {bytes_} | {ppl:.4f} | {ppl / base_ppl - 1:+.2%} | {stretches} |")
    k_centering(model, own, text)
    key_rotation_effect(model, own, text)
    if args.skip_greedy:
        return
    print(f"\n## greedy agreement: {args.prompts} prompts of {args.prompt_len} tokens, "
          f"{args.new} new tokens, against the {own} KV cache")  # fmt: skip
    print("| KV cache | tokens identical before the first divergence | identical outputs |")
    print("|---|---:|---:|")
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    start = time.perf_counter()
    reference = run(scheduler(own), windows, params)
    print(f"| {own} (reference, {time.perf_counter() - start:.0f} s) | 100.0 % | 100.0 % |")
    for kv in kv_dtypes:
        got = run(scheduler(kv), windows, params)
        prefix, same = 0.0, 0
        for rid, (want, _) in reference.items():
            out = got[rid][0]
            n = next((i for i, (a, b) in enumerate(zip(out, want, strict=True)) if a != b), None)
            prefix += (len(want) if n is None else n) / len(want)
            same += n is None
        print(f"| {kv} | {prefix / len(reference):.1%} | {same / len(reference):.1%} |")


if __name__ == "__main__":
    main()
