"""Is one request's result independent of how it is computed? Its last-token logits through each
path the scheduler may take, against the plain path, with `--deterministic` off and on, in fp32
and bf16; and whether oneDNN's packed matmul gives a row the same result in batches of any size.

    python bench/batch_invariance.py [--dtypes float32,bfloat16]

Paths (a 120-token prompt, then 8 decode steps, `PoolDriver` on the real model): prefill in two
chunks; after 4 generated tokens, recomputed in one prefill (a retraction) or as an extend on the
cached prompt (a prefix hit); prefilled and decoded in a batch with three other requests. Printed:
the largest absolute logit difference from the plain path (0 = identical to the bit).
"""

from __future__ import annotations

import argparse
import platform

import torch

from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.token_to_kv_pool import TokenToKVPool
from radixkv.model.loader import load_model
from radixkv.model.model_runner import ModelRunner, kv_layout
from radixkv.protocol import SamplingParams
from radixkv.testing import PoolDriver

SP = SamplingParams(max_new_tokens=64, ignore_eos=True)


def paths(dtype: str, deterministic: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = load_model("smollm2-135m", dtype=dtype)
    layout = kv_layout(model.config, None, model.dtype)
    runner = ModelRunner(model, TokenToKVPool(layout, 8192), ReqToTokenPool(16, 2048), "torch",
                         deterministic=deterministic)  # fmt: skip
    d = PoolDriver(runner)
    prompt = [int(x) for x in torch.randint(100, 20000, (120,))]

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    plain = d.add(prompt, SP)
    ref = [d.step([plain], decode=False)[-1:].clone()]
    ref += [d.step([plain]).clone() for _ in range(8)]
    tokens = plain.tokens[:]
    out = {}
    chunked = d.add(prompt, SP)
    chunked.tokens = prompt[:60]
    d.step([chunked], decode=False)
    chunked.tokens = chunked.tokens[:60] + prompt[60:]
    out["chunked prefill"] = diff(d.step([chunked], decode=False)[-1:], ref[0])
    again = d.add(tokens[: len(prompt) + 4], SP)
    out["recomputed after a retraction"] = diff(d.step([again], decode=False)[-1:], ref[4])
    hit = d.add(tokens[: len(prompt) + 4], SP, prefix_from=plain, prefix_len=len(prompt))
    out["extend on a cached prefix"] = diff(d.step([hit], decode=False)[-1:], ref[4])
    others = [d.add([int(x) for x in torch.randint(100, 20000, (n,))], SP) for n in (30, 200, 77)]
    batched = d.add(prompt, SP)
    out["prefilled in a batch"] = diff(d.step([batched, *others], decode=False)[0:1], ref[0])
    out["decoded in a batch"] = max(
        diff(d.step([batched, *others])[0:1], ref[i]) for i in range(1, 9)
    )
    return out


def row_invariance(dtype: torch.dtype) -> str:
    bad = []
    for k, n in ((576, 1728), (576, 576), (1536, 576), (576, 3072), (576, 49152)):
        w = (torch.randn(n, k) * 0.05).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)

        def f(x: torch.Tensor, packed: torch.Tensor = packed) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

        x = (torch.randn(2048, k) * torch.rand(2048, 1) * 5).to(dtype)
        one, two = f(x[:1]), f(x[:2])[:1]
        for m in (3, 8, 17, 64, 200, 512, 2048):
            if not torch.equal(f(x[:m])[:1], two):
                bad.append(f"{k}->{n} at M={m}")
        if not torch.equal(one, two):
            bad.append(f"{k}->{n} M=1 vs M=2")
    return ", ".join(bad) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          "threads\n")  # fmt: skip
    dtypes = args.dtypes.split(",")
    results = {(d, det): paths(d, det) for d in dtypes for det in (False, True)}
    header = " | ".join(f"{d}, deterministic {'on' if det else 'off'}" for d, det in results)
    print(f"| path | {header} |\n|---|{'---|' * len(results)}")
    for path in next(iter(results.values())):
        print(f"| {path} | " + " | ".join(f"{r[path]:.3g}" for r in results.values()) + " |")
    for d in dtypes:
        dtype = torch.bfloat16 if d in ("bfloat16", "bf16") else torch.float32
        print(f"\npacked matmul, {d}: a row's result differs by batch size at: "
              f"{row_invariance(dtype)}")  # fmt: skip


if __name__ == "__main__":
    main()
