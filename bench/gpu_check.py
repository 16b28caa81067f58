"""One-shot GPU check: radixkv's own code on a CUDA device, next to transformers.

bench/gpu_check.sh runs it on a lent GPU machine. Make the two carried, git-ignored paths here
(a call carries at most 64 MiB), then call the device tool from the repository root:

    .venv/bin/python bench/gpu_check.py prepare        # .gpu/small.gguf, 53.6 MiB
    .venv/bin/python -m pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 msgspec==0.23.0 pyzmq==27.3.0 gguf==0.19.0
    run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu/small.gguf"], timeout_s=540)

.whl/ holds what radixkv needs and the machine's image (Python 3.12) lacks. `prepare` cuts the
bundled SmolLM2-135M GGUF (94 MiB) to 11 of its 30 blocks, `--blocks 0-5,25-29`: metadata,
tokenizer, embedding, norms and those blocks byte for byte, renumbered 0-10 (first and last blocks
keep its greedy output varied, without near-ties in the top-2 logits).

Steps of gpu_check.sh; each check is PASS or FAIL (INFO: measured, with no bound):
  1. the machine and versions; 2. install the wheels and radixkv (editable), unless they import;
  3. tests/test_triton_kernels.py and tests/test_decode_graphs.py with TRITON_INTERPRET=0: the
     compiled kernels and captured CUDA graphs on the GPU;
  4. `greedy`: radixkv fp32 (Triton attention) against transformers' greedy `generate` on the same
     GGUF and device: weights, prefill logits, greedy tokens of one batch; the prefix-hit and
     mixed-batch checks of tests/test_model_smollm2.py; the in-process scheduler: chat prompts
     and its idle integrity check, the 64 shared-prefix prompts of tests/test_runtime_e2e.py and
     their prefix hits, memory pressure equal to roomy; int8 and fp8_e4m3 KV caches through the
     scheduler (the Triton kernels' quantized paths; agreement INFO); the scheduler's decode with
     and without CUDA graphs (the same tokens); bf16 logits (the bound of
     test_bf16_logits_close_to_fp32; INFO on a model of fewer than 30 blocks) and tokens (INFO);
  5. `throughput` (INFO): a prompt's prefill and a batch's decode through PoolDriver, a bare
     forward, and transformers on the same shapes, random weights in SmolLM2-135M's 30 layers;
  6. `runtime`: radixkv.Runtime (its processes) on the device against transformers;
  7. `serving`: issue 13's shared-prefix workload (4 x 16 requests, 1024-token system prompts,
     64-token questions, 32 output tokens, all at once, bf16) through `radixkv bench` on the
     device, with the CUDA graphs and with --disable-cuda-graph: requests per second, their
     ratio, and the hit rate against the best possible (PASS at >= 99 %).

Each check appends one JSON line {"check", "status", "detail"} to `--summary` when it ends; later
checks skip past `--budget` seconds (gpu_check.sh bounds it by its deadline).
`GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh` tries the same steps on the CPU with small sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import struct
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import radixkv
from radixkv.config import ServerArgs
from radixkv.model.dtype import resolve_dtype
from radixkv.model.llama import LlamaForCausalLM
from radixkv.model.loader import load_config, load_model, load_weights, resolve_model
from radixkv.model.model_runner import ModelRunner
from radixkv.model_source import ModelSource
from radixkv.protocol import SamplingParams
from radixkv.scheduler.process import build_scheduler
from radixkv.testing import DriverRequest, PoolDriver
from radixkv.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
import test_model_smollm2 as smollm2_tests  # noqa: E402  (prompts and checks reused)
import test_runtime_e2e as e2e_tests  # noqa: E402
from model_forward import GO_ON, hf_model, ours_prefill  # noqa: E402

T0 = time.monotonic()
SUMMARY: Path | None = None
Tokens = list[list[int]]
Result = tuple[str, str]  # (status, detail) of a check


# ---- reporting and timing ----------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def record(check: str, status: str, detail: str = "") -> None:
    """status: PASS | FAIL | INFO | SKIP | ERROR."""
    log(f"{status:5} {check}: {detail}")
    if SUMMARY is not None:
        with SUMMARY.open("a") as f:
            f.write(json.dumps({"check": check, "status": status, "detail": detail}) + "\n")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_check(name: str, check: Callable[[], Result]) -> None:
    """Run and record one check: a failed assert is a FAIL, another exception an ERROR; either
    way the next check runs."""
    log(f"---- {name}")
    try:
        result = check()
    except Exception as exc:
        traceback.print_exc()
        status = "FAIL" if isinstance(exc, AssertionError) else "ERROR"
        result = status, f"{type(exc).__name__}: {str(exc)[:300]}"
    record(name, *result)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Seconds of the fastest of `repeats` runs of `fn` (after a warm-up run if repeats > 1)."""
    times = []
    for _ in range(repeats + (repeats > 1)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times[-repeats:])


# ---- prepare: cut the GGUF (runs here, not on the device) --------------------------------------


def gguf_head(src: Path, blocks: list[int] | None) -> tuple[bytes, list[tuple[Any, int]], int]:
    """Header, KV and tensor infos of `src` keeping `blocks` (in that order, renumbered 0..; all
    if None), the kept tensors with their new data offsets, and the alignment."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(src))
    align = 32
    if "general.alignment" in reader.fields:
        align = int(reader.fields["general.alignment"].contents())
    pattern = re.compile(r"^blk\.(\d+)\.(.*)$")
    kept = [(t, t.name) for t in reader.tensors if blocks is None or not pattern.match(t.name)]
    for new_index, old in enumerate(blocks or []):
        kept += [
            (t, f"blk.{new_index}.{m.group(2)}")
            for t in reader.tensors
            if (m := pattern.match(t.name)) and int(m.group(1)) == old
        ]
    kv = []
    for name, field in reader.fields.items():
        parts = [np.asarray(p) for p in field.parts]
        if blocks is not None and name.endswith(".block_count"):
            parts[-1] = np.array([len(blocks)], dtype=parts[-1].dtype)
        if not name.startswith("GGUF."):
            kv.append(b"".join(p.tobytes() for p in parts))
    version = int(reader.fields["GGUF.version"].parts[0][0])
    out = [struct.pack("<4sIQQ", b"GGUF", version, len(kept), len(kv)), *kv]
    placed, offset = [], 0
    for t, name in kept:
        parts = [np.asarray(p) for p in t.field.parts]  # name length, name, dims..., type, offset
        info = struct.pack("<Q", len(name.encode())) + name.encode()
        out.append(info + b"".join(p.tobytes() for p in parts[2:-1]) + struct.pack("<Q", offset))
        placed.append((t, offset))
        offset += -(-int(t.n_bytes) // align) * align
    head = b"".join(out)
    return head + b"\0" * (-len(head) % align), placed, align


def cmd_prepare(args: argparse.Namespace) -> int:
    import numpy as np

    src = Path(args.source) if args.source else resolve_model("smollm2-135m").path
    full_head, _, _ = gguf_head(src, None)
    with src.open("rb") as f:  # the header rebuilt whole must equal the original's
        assert f.read(len(full_head)) == full_head, "GGUF header round trip differs"
    ends = [[int(x) for x in part.split("-")] for part in args.blocks.split(",")]  # "0-5,25-29"
    head, placed, align = gguf_head(src, [b for e in ends for b in range(e[0], e[-1] + 1)])
    dst = Path(args.out) / "small.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.with_suffix(".tmp").open("wb") as f:
        f.write(head)
        for t, offset in placed:
            assert f.tell() == len(head) + offset
            data = np.asarray(t.data).tobytes()
            assert len(data) == int(t.n_bytes)
            f.write(data + b"\0" * (-len(data) % align))
    dst.with_suffix(".tmp").replace(dst)
    print(f"{dst}: {dst.stat().st_size / 2**20:.1f} MiB, blocks {args.blocks} of {src.name}")
    return 0


# ---- comparing tokens with transformers' --------------------------------------------------------


def hf_from_gguf(path: Path, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf.eval().to(device=device, dtype=torch.float32)


def hf_greedy(hf: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=hf.device)
    # an explicit mask: the pad id (2) is also <|im_end|>, which chat prompts contain
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 2}
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **kw)
    return out[0, len(prompt) :].tolist()


def hf_last_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids], device=hf.device)).logits[0, -1].float()


def first_diff(a: list[int], b: list[int]) -> int | None:
    d = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return d if d is not None or len(a) == len(b) else min(len(a), len(b))


def compare_tokens(
    ours: Tokens, refs: Tokens, prompts: Tokens, hf: Any = None, strict: bool = True
) -> Result:
    """PASS when every output equals its reference (else FAIL, or INFO if not `strict`). It logs
    transformers' top-2 margin at a divergence: a near-tie explains a flip, a wide one is a bug."""
    diffs = [first_diff(o, r) for o, r in zip(ours, refs, strict=True)]
    bad = [(i, d) for i, d in enumerate(diffs) if d is not None]
    for i, d in bad[:4]:
        log(f"  seq {i}: diverges at token {d}: ours {ours[i][d:][:3]}, ref {refs[i][d:][:3]}")
        if hf is not None and d < min(len(refs[i]), len(ours[i])):
            logits = hf_last_logits(hf, prompts[i] + refs[i][:d])
            top = logits.topk(2).values.tolist()
            gap = (logits[refs[i][d]] - logits[ours[i][d]]).item()
            log(f"    transformers' top-2 margin {top[0] - top[1]:.4g}, ref - ours {gap:.4g}")
    agreed = sum(len(r) if d is None else d for r, d in zip(refs, diffs, strict=True))
    detail = f"{len(refs) - len(bad)}/{len(refs)} sequences identical; "
    detail += f"{agreed}/{sum(map(len, refs))} tokens before the first divergence"
    return ("INFO" if bad and not strict else verdict(not bad)), detail


# ---- greedy: radixkv vs transformers on the device ---------------------------------------------


@dataclasses.dataclass
class Greedy:
    """The checks of `greedy`, and what they share: the fp32 model, chat prompts, references."""

    args: argparse.Namespace
    source: ModelSource
    device: torch.device
    fp32: LlamaForCausalLM
    prompts: Tokens
    hf: Any = None  # transformers' fp32 model, once check_weights has loaded it
    refs: Tokens | None = None  # its greedy tokens for `prompts`, once check_greedy_batch ran

    def driver(self, model: LlamaForCausalLM | None = None) -> PoolDriver:
        runner = ModelRunner.with_pools(
            model or self.fp32, num_slots=8192, max_running_requests=16, backend=self.args.backend
        )
        return PoolDriver(runner)

    def prefill(self, model: LlamaForCausalLM | None = None) -> torch.Tensor:
        drv = self.driver(model)
        return drv.step([drv.add(p) for p in self.prompts], decode=False)

    def generate(self, model: LlamaForCausalLM | None = None) -> Tokens:
        drv = self.driver(model)
        params = SamplingParams(max_new_tokens=self.args.new_tokens, ignore_eos=True)
        return drv.generate([drv.add(p, params) for p in self.prompts])

    def schedule(self, prompts: Tokens, n: int, **kw: Any) -> tuple[Tokens, list[int], Any]:
        """Outputs and cached tokens of `prompts` through the in-process scheduler, and it."""
        kw.update(dtype="float32", device=str(self.device), attention_backend=self.args.backend)
        s = build_scheduler(ServerArgs(model=self.args.model, **kw), self.fp32)
        for i, ids in enumerate(prompts):
            s.add_request(str(i), ids, SamplingParams(max_new_tokens=n, ignore_eos=True))
        tokens: Tokens = [[] for _ in prompts]
        cached = [0] * len(prompts)
        while s.has_work():
            for out in s.step():
                tokens[int(out.rid)].extend(out.token_ids)
                cached[int(out.rid)] = out.cached_tokens
        return tokens, cached, s

    def check_weights(self) -> Result:
        t = time.monotonic()
        self.hf = hf_from_gguf(self.source.path, self.device)
        ours = load_weights(self.source, self.fp32.config).tensors
        ref = self.hf.state_dict()
        differ = [k for k, v in ours.items() if not torch.equal(v.to(self.device), ref[k])]
        detail = f"{len(ours)} tensors, {len(differ)} differ {differ[:3]}"
        return verdict(not differ), f"{detail}; transformers loaded in {time.monotonic() - t:.1f}s"

    def check_prefill_logits(self) -> Result:
        logits = self.prefill()
        ref = torch.stack([hf_last_logits(self.hf, p) for p in self.prompts])
        err = (logits - ref).abs().max().item()
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        detail = f"logits on {logits.device}, max |diff| {err:.3g} (pass < 1e-2) over "
        detail += f"{len(self.prompts)} prompts, argmax agree {agree:.0%}"
        return verdict(err < 1e-2 and agree == 1), detail

    def check_greedy_batch(self) -> Result:
        n, t = self.args.new_tokens, time.monotonic()
        self.refs = [hf_greedy(self.hf, p, n) for p in self.prompts]
        log(f"  transformers: {len(self.refs)} x {n} tokens in {time.monotonic() - t:.1f}s")
        return compare_tokens(self.generate(), self.refs, self.prompts, self.hf)

    def check_prefix_hit(self) -> Result:
        smollm2_tests.test_prefix_hit_same_tokens_and_logits(self.driver(), self.prompts)
        return "PASS", "tests/test_model_smollm2.py's check on this device"

    def check_mixed_batch(self) -> Result:
        smollm2_tests.test_mixed_batch_matches_each_request_alone(self.driver(), self.prompts)
        return "PASS", "tests/test_model_smollm2.py's check on this device"

    def check_scheduler_chat(self) -> Result:
        assert self.refs is not None
        outs, cached, s = self.schedule(self.prompts, self.args.new_tokens, max_total_tokens=16384)
        log(f"  cached tokens per request: {cached}")
        s.check_idle()  # free + tree + held == capacity, as the scheduler checks once idle
        status, detail = compare_tokens(outs, self.refs, self.prompts, self.hf)
        return status, f"{detail}; idle integrity check passed"

    def check_decode_graphs(self) -> Result:
        """The chat prompts through the scheduler with its CUDA graphs (on by default on CUDA)
        and with --disable-cuda-graph: FAIL if no graph was replayed; PASS if the tokens are
        the same, else INFO with transformers' margin where they part."""
        if self.device.type != "cuda":
            return "SKIP", "no CUDA graphs on this device"
        graphed, _, s = self.schedule(self.prompts, self.args.new_tokens, max_total_tokens=16384)
        graphs = s.runner.decode_graphs
        if graphs is None:
            return "FAIL", "the scheduler captured no decode graphs"
        launched, _, _ = self.schedule(self.prompts, self.args.new_tokens,
                                       max_total_tokens=16384, disable_cuda_graph=True)  # fmt: skip
        # equal but for near-ties: decode splits differ (fixed per graph), so sums are ordered
        # differently (fp32 ulps); transformers' margin at a divergence says which
        status, detail = compare_tokens(graphed, launched, self.prompts, self.hf, strict=False)
        captured = f"{len(graphs.sizes)} graphs captured in {graphs.capture_seconds:.1f}s"
        detail += f" (graphs against launches); {graphs.replays} steps replayed, {captured}"
        return (status if graphs.replays else "FAIL"), detail

    def check_shared_prefix(self) -> Result:
        prompts, new = e2e_tests.shared_prefix_prompts(), e2e_tests.NEW
        outs, cached, s = self.schedule(prompts, new, max_total_tokens=16384)
        log(f"  scheduler stats {s.get_stats()}")
        refs = [hf_greedy(self.hf, p, new) for p in prompts]
        status, detail = compare_tokens(outs, refs, prompts, self.hf)
        hits = sum(c >= e2e_tests.SYSTEM_LEN for c in cached)
        ok = status == "PASS" and hits >= len(prompts) - 8
        hit_detail = f"{hits} hit >= {e2e_tests.SYSTEM_LEN} cached tokens (pass: all but 8)"
        return verdict(ok), f"{len(prompts)} requests in 4 groups: {detail}; {hit_detail}"

    def check_pressure(self) -> Result:
        prompts = e2e_tests.shared_prefix_prompts()[::4]
        roomy, _, _ = self.schedule(prompts, 24, max_total_tokens=16384)
        small = {"max_total_tokens": 640, "chunked_prefill_size": 64, "max_prefill_tokens": 128}
        ratios = {"new_token_ratio": 0.02, "min_new_token_ratio": 0.0}  # retractions happen
        tight, _, s = self.schedule(prompts, 24, **small, **ratios)
        st = s.get_stats()
        ok = tight == roomy and st.retractions > 0 and st.evicted_tokens > 0
        ok = ok and st.running == st.waiting == st.protected == st.kv_used == 0
        detail = f"outputs equal {tight == roomy}; retractions {st.retractions}, "
        return verdict(ok), f"{detail}evicted {st.evicted_tokens}, kv_used after {st.kv_used}"

    def check_quantized_kv(self) -> Result:
        """int8 and fp8_e4m3 KV caches through the scheduler (the Triton kernels on CUDA): every
        request finishes, the pool is whole when idle, and the greedy agreement with the fp32 KV
        cache's outputs is reported (quantized K/V may change tokens: INFO, not a failure)."""
        assert self.refs is not None
        parts, ok = [], True
        for kv in ("int8", "fp8_e4m3"):
            outs, _, s = self.schedule(self.prompts, self.args.new_tokens, max_total_tokens=16384,
                                       kv_cache_dtype=kv)  # fmt: skip
            s.check_idle()
            ok = ok and all(len(o) == self.args.new_tokens for o in outs)
            same = sum(o == r for o, r in zip(outs, self.refs, strict=True))
            parts.append(f"{kv}: {same}/{len(outs)} outputs equal fp32 transformers'")
        return ("INFO" if ok else "FAIL"), "; ".join(parts) + "; idle integrity checks passed"

    def check_bf16(self) -> Result:
        """test_bf16_logits_close_to_fp32's criterion. Its bound was set on the whole 30-layer
        model, so on a model cut to fewer blocks (off-distribution) it is only reported. Greedy
        tokens in bf16 may drift from fp32's: reported too (INFO)."""
        assert self.refs is not None
        bf16 = load_model(self.source, dtype="bf16", device=self.device)
        ref, got = self.prefill(), self.prefill(bf16)
        spread = ref.max(-1).values - ref.min(-1).values
        err = ((got - ref).abs().max(-1).values / spread).max().item()
        top3 = ref.topk(3, dim=-1).indices
        in_top3 = bool((top3 == got.argmax(-1, keepdim=True)).any(-1).all())
        outs = self.generate(bf16)
        result = compare_tokens(outs, self.refs, self.prompts, strict=False)
        record("bf16 radixkv greedy vs fp32 transformers", *result)
        hf16 = self.hf.to(torch.bfloat16)  # the last check: fp32 transformers is not needed after
        refs16 = [hf_greedy(hf16, p, self.args.new_tokens) for p in self.prompts]
        result = compare_tokens(outs, refs16, self.prompts, strict=False)
        record("bf16 radixkv greedy vs bf16 transformers", *result)
        status = verdict(err < 0.05 and in_top3) if bf16.config.num_layers >= 30 else "INFO"
        return status, f"max err/spread {err:.3f} (bound 0.05), bf16 top-1 in fp32 top-3 {in_top3}"


GREEDY_CHECKS = [  # (name, method, seconds it needs before the deadline, what it needs of Greedy)
    ("weights equal transformers'", Greedy.check_weights, 0, None),
    ("fp32 prefill logits vs transformers", Greedy.check_prefill_logits, 0, "hf"),
    ("fp32 greedy (one batch) vs transformers", Greedy.check_greedy_batch, 0, "hf"),
    ("prefix hit: same tokens and logits", Greedy.check_prefix_hit, 0, None),
    ("mixed batch equals each request alone", Greedy.check_mixed_batch, 0, None),
    ("scheduler chat prompts vs transformers", Greedy.check_scheduler_chat, 0, "refs"),
    ("scheduler decode: CUDA graphs equal launches", Greedy.check_decode_graphs, 20, None),
    ("scheduler shared-prefix requests vs transformers", Greedy.check_shared_prefix, 60, "hf"),
    ("scheduler under memory pressure equals roomy", Greedy.check_pressure, 45, None),
    ("int8 / fp8_e4m3 KV cache through the scheduler", Greedy.check_quantized_kv, 30, "refs"),
    ("bf16 prefill logits close to fp32", Greedy.check_bf16, 30, "refs"),
]


def cmd_greedy(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    chats = [[{"role": "user", "content": q}] for q in smollm2_tests.QUESTIONS]
    encoded = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)
        for c in chats
    ]
    fp32 = load_model(source, dtype="fp32", device=device)
    log(f"{source.path.name}: {fp32.config.num_layers} layers on {device}")
    g = Greedy(args, source, device, fp32, [list(e["input_ids"]) for e in encoded])
    for name, check, needs_s, needs in GREEDY_CHECKS:
        if needs is not None and getattr(g, needs) is None:
            record(name, "SKIP", f"no transformers {'model' if needs == 'hf' else 'reference'}")
        elif time.monotonic() > T0 + args.budget - needs_s:
            record(name, "SKIP", f"past the {args.budget:.0f}s budget")
        else:
            run_check(name, lambda check=check: check(g))
    return 0


# ---- runtime: the whole process stack on the device --------------------------------------------


def check_runtime(args: argparse.Namespace, device: torch.device) -> Result:
    """Every 8th shared-prefix prompt of tests/test_runtime_e2e.py, through the processes."""
    prompts, new = e2e_tests.shared_prefix_prompts()[::8], e2e_tests.NEW
    timeouts = {"start_timeout": args.budget, "client_timeout": args.budget}
    kw = {"device": str(device), "attention_backend": args.backend, "dtype": "float32", **timeouts}
    with radixkv.Runtime(args.model, max_total_tokens=16384, **kw) as rt:
        results = rt.client.generate_ids(prompts, max_new_tokens=new, ignore_eos=True)
    log(f"  cached tokens {[r.cached_tokens for r in results]}")
    hf = hf_from_gguf(Path(args.model), device)
    refs = [hf_greedy(hf, p, new) for p in prompts]
    return compare_tokens([r.token_ids for r in results], refs, prompts, hf)


def cmd_runtime(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    name = f"Runtime(device={device.type}) generate_ids vs transformers"
    run_check(name, lambda: check_runtime(args, device))
    return 0


# ---- serving: the shared-prefix workload through `radixkv bench`, with and without graphs -------


def cmd_serving(args: argparse.Namespace) -> int:
    """Issue 13's workload (all at once, bf16) through a Runtime on the device, launched twice:
    with its CUDA graphs and with --disable-cuda-graph (on the CPU: once, without)."""
    from radixkv.tools.bench import build_parser, run_bench

    work = ["--workload", "shared-prefix", "--groups", str(args.groups), "--prompts-per-group",
            str(args.prompts_per_group), "--system-len", str(args.system_len), "--question-len",
            "64", "--output-len", str(args.output_len)]  # fmt: skip
    runtime = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
               "--attention-backend", args.backend]  # fmt: skip
    variants = {"CUDA graphs": [], "no graphs": ["--disable-cuda-graph"]}
    if not args.device.startswith("cuda"):
        variants = {"no graphs": []}
    rates = {}
    for name, flags in variants.items():

        def serve(name: str = name, flags: list[str] = flags) -> Result:
            s = run_bench(build_parser().parse_args(work + runtime + flags))
            rates[name] = s["requests_per_s"]
            detail = (f"{s['requests']} requests in {s['duration_s']:.2f}s = "
                      f"{s['requests_per_s']:.1f} req/s, hit rate {s['hit_rate']:.3f} = "
                      f"{s['hit_rate_of_best']:.1%} of the best possible, TTFT p50 "
                      f"{s['ttft_s']['p50'] * 1e3:.0f} ms, ITL p50 {s['itl_s']['p50'] * 1e3:.1f} "
                      "ms")  # fmt: skip
            return verdict(s["hit_rate_of_best"] >= 0.99), detail

        run_check(f"serving, {args.dtype}, {name}", serve)
    if len(rates) == 2:
        ratio = rates["CUDA graphs"] / rates["no graphs"]
        record("serving: CUDA graphs / no graphs", "INFO", f"{ratio:.2f}x the requests per second")
    return 0


# ---- throughput: radixkv and transformers, random weights of the full shape --------------------


@dataclasses.dataclass
class Speed:
    """The checks of `throughput`: radixkv's PoolDriver and transformers' Llama on the same random
    weights (speed does not depend on the values), the same prompt and decode batch."""

    driver: PoolDriver
    hf: Any
    prompt: list[int]
    prompts: Tokens
    steps: int

    def check_prefill(self) -> Result:
        t = ours_prefill(self.driver, self.prompt, 0, 5)  # steps sync: they read sampled ids
        return "INFO", f"{len(self.prompt) / t:,.0f} tok/s ({t * 1e3:.2f} ms per prompt)"

    def check_decode(self) -> Result:
        """Prefill in batches of 8, then `steps` decode steps through PoolDriver.step (after 3 to
        warm up), then one more as a bare ModelRunner.forward; on CUDA both again, replayed from
        CUDA graphs captured in this run."""
        drv, device, steps = self.driver, self.driver.runner.device, self.steps
        reqs: list[DriverRequest] = [drv.add(p, GO_ON) for p in self.prompts]
        for i in range(0, len(reqs), 8):
            drv.step(reqs[i : i + 8], decode=False)
        for _ in range(3):
            drv.step(reqs)
        step = timed(lambda: [drv.step(reqs) for _ in range(steps)], device) / steps
        graphs, step_g = None, 0.0
        if device.type == "cuda":
            graphs = drv.runner.capture_decode_graphs(len(reqs))
            step_g = timed(lambda: [drv.step(reqs) for _ in range(steps)], device) / steps
        batch = drv.build_decode(reqs)
        fwd_g = timed(lambda: drv.runner.forward(batch), device, 10) if graphs else 0.0
        drv.runner.decode_graphs = None
        fwd = timed(lambda: drv.runner.forward(batch), device, 10)
        for r in reqs:
            drv.release(r)
        detail = f"{len(reqs) / step:,.0f} tok/s via PoolDriver.step ({step * 1e3:.2f} ms/step), "
        detail += f"bare forward {fwd * 1e3:.2f} ms = {len(reqs) / fwd:,.0f} tok/s"
        if graphs is not None:
            detail += (f"; CUDA graphs ({len(graphs.sizes)} captured in "
                       f"{graphs.capture_seconds:.1f}s): {step_g * 1e3:.2f} ms/step "
                       f"({step / step_g:.2f}x), bare forward {fwd_g * 1e3:.2f} ms "
                       f"({fwd / fwd_g:.2f}x)")  # fmt: skip
        return "INFO", detail

    def check_hf(self) -> Result:
        """transformers: the prompt's prefill, and decode steps with a DynamicCache, both computing
        the logits of the last position only (a stronger baseline than `generate`)."""
        from transformers import DynamicCache

        hf, device, steps = self.hf, self.hf.device, self.steps
        ids = torch.tensor([self.prompt], device=device)
        prefill = timed(lambda: hf(ids, use_cache=True, logits_to_keep=1), device, 5)
        cache = DynamicCache()
        out = hf(torch.tensor(self.prompts, device=device), past_key_values=cache, logits_to_keep=1)

        def decode(n: int) -> None:
            nonlocal out
            for _ in range(n):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = hf(nxt, past_key_values=cache, logits_to_keep=1)

        decode(3)
        step = timed(lambda: decode(steps), device) / steps
        detail = f"{len(self.prompts) / step:,.0f} tok/s ({step * 1e3:.2f} ms/step); prefill "
        return "INFO", f"{detail}{len(self.prompt)}: {len(self.prompt) / prefill:,.0f} tok/s"


def random_models(args: argparse.Namespace, device: torch.device) -> tuple[PoolDriver, Any]:
    """radixkv's runner and transformers' Llama on the same random weights, `args.layers` layers
    of the model's shape, in `args.dtype`."""
    dtype = resolve_dtype(args.dtype)
    config = dataclasses.replace(load_config(resolve_model(args.model)), num_layers=args.layers)
    torch.manual_seed(0)
    hf = hf_model(config, {}, torch.float32)  # no tensors: transformers' random initialization
    tensors = hf.state_dict()
    if config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    with torch.device("meta"):
        net = LlamaForCausalLM(config)
    net.load_hf_state_dict(tensors, dtype=dtype, device=device)
    context = args.context + args.steps + args.prompt_len + 8
    runner = ModelRunner.with_pools(
        net.eval(), num_slots=args.batch * context, max_running_requests=args.batch + 8,
        max_context_len=context, backend=args.backend,
    )  # fmt: skip
    return PoolDriver(runner), hf.to(device=device, dtype=dtype)


def cmd_throughput(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    driver, hf = random_models(args, device)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 40000, (args.prompt_len,), generator=gen).tolist()
    prompts = torch.randint(100, 40000, (args.batch, args.context), generator=gen).tolist()
    speed = Speed(driver, hf, prompt, prompts, args.steps)
    log(f"{args.layers} layers of {Path(args.model).name}'s shape, random weights, {args.dtype}")
    shape = f"bs{args.batch} ctx{args.context} ({args.dtype})"
    with torch.inference_mode():
        run_check(f"prefill {args.prompt_len} ({args.dtype})", speed.check_prefill)
        run_check(f"decode {shape}", speed.check_decode)
        run_check(f"transformers decode {shape}", speed.check_hf)
    if device.type == "cuda":
        log(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write .gpu/small.gguf")
    p.add_argument("--source", help="GGUF file (default: the bundled smollm2-135m)")
    p.add_argument("--blocks", default="0-5,25-29", help="blocks to keep, in order (renumbered)")
    p.add_argument("--out", default=str(ROOT / ".gpu"))
    for name in ("greedy", "throughput", "runtime", "serving"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="a .gguf file")
        p.add_argument("--device", default="cuda")
        p.add_argument("--backend", help="attention backend (default: triton on cuda, else torch)")
        p.add_argument("--summary", help="append one JSON line per check here")
        p.add_argument("--budget", type=float, default=180, help="seconds; later checks skip")
    p = sub.choices["greedy"]
    p.add_argument("--new-tokens", type=int, default=32)
    p = sub.choices["throughput"]
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    sizes = {"--layers": 30, "--batch": 64, "--context": 1024, "--prompt-len": 512, "--steps": 32}
    for flag, default in sizes.items():
        p.add_argument(flag, type=int, default=default)
    p = sub.choices["serving"]
    p.add_argument("--dtype", default="bfloat16")
    sizes = {"--groups": 4, "--prompts-per-group": 16, "--system-len": 1024, "--output-len": 32}
    for flag, default in sizes.items():
        p.add_argument(flag, type=int, default=default)
    return ap.parse_args()


def main() -> int:
    global SUMMARY
    args = parse_args()
    if args.cmd == "prepare":
        return cmd_prepare(args)
    SUMMARY = Path(args.summary) if args.summary else None
    limit = os.environ.get("GPU_CHECK_STEP_LIMIT")  # set by gpu_check.sh: this step's timeout
    if limit:
        args.budget = min(args.budget, float(limit) - 20)
    args.backend = args.backend or ("triton" if args.device.startswith("cuda") else "torch")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        record(args.cmd, "ERROR", "CUDA is not available")
        return 1
    commands = {"greedy": cmd_greedy, "throughput": cmd_throughput, "runtime": cmd_runtime,
                "serving": cmd_serving}  # fmt: skip
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
