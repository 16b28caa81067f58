"""End-to-end checks on the real SmolLM2-135M-Instruct weights against transformers (fp32)."""

from __future__ import annotations

import pytest
import torch

from radixkv.model.llama import LlamaForCausalLM
from radixkv.model.loader import (
    load_config,
    load_model,
    load_weights,
    resolve_model,
)
from radixkv.model.model_runner import ModelRunner
from radixkv.protocol import SamplingParams
from radixkv.testing import DriverRequest, PoolDriver
from radixkv.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
NEW_TOKENS = 32
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each one is prime.",
    "Explain in two sentences what a hash table is and when you would use one.",
    "Translate 'good morning, how are you today?' into French, Spanish and German, please.",
    "You are given a list of numbers: 4, 8, 15, 16, 23, 42. Compute their sum, then their mean, "
    "and say which of them are even. Show each step of the computation.",
    "Summarise the plot of a story in which a young engineer builds a tiny language model "
    "runtime, discovers that most prompts share a long system prompt, and invents a cache that "
    "stores each prefix once in a tree so that no prefix is ever computed twice. Keep it short.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def chat_prompts(tokenizer) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True
        )
        out.append(list(enc["input_ids"]))
    assert len({len(p) for p in out}) == len(out), "prompts must have different lengths"
    return out


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    source = resolve_model(MODEL)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.path.parent), gguf_file=source.path.name
    )
    return model.eval()


@pytest.fixture(scope="module")
def fp32_model() -> LlamaForCausalLM:
    return load_model(MODEL, dtype="fp32")


@pytest.fixture
def driver(fp32_model) -> PoolDriver:
    return PoolDriver(ModelRunner.with_pools(fp32_model, num_slots=8192, max_running_requests=16))


def test_loader_weights_equal_transformers(hf_model) -> None:
    source = resolve_model(MODEL)
    ours = load_weights(source, load_config(source)).tensors
    ref = hf_model.state_dict()
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied head: one tensor
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name


def test_greedy_equals_transformers_generate(driver, hf_model, chat_prompts) -> None:
    outs = driver.generate([driver.add(p, GREEDY) for p in chat_prompts])  # one batch
    for prompt, out in zip(chat_prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            # An explicit mask: the pad id (2) is also <|im_end|>, which chat prompts contain, and
            # generate would otherwise mask those prompt tokens out.
            ref = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                do_sample=False, eos_token_id=None, pad_token_id=2,
            )  # fmt: skip
        assert out == ref[0, len(prompt) :].tolist()
        assert len(out) == NEW_TOKENS


def run_alone(driver: PoolDriver, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    req = driver.add(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
    first = driver.step([req], decode=False)[0]
    while not req.finished:
        driver.step([req])
    driver.release(req)
    return req.output, first


def test_prefix_hit_same_tokens_and_logits(driver, chat_prompts) -> None:
    a, b = chat_prompts[6], chat_prompts[7]
    shared = next(
        i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y
    )  # system prompt + template
    assert shared > 20
    expected_b, logits_b = run_alone(driver, b, 16)
    expected_a, logits_a = run_alone(driver, a, 16)
    owner = driver.add(a, GREEDY)
    driver.step([owner], decode=False)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for prompt, hit, expected, ref in [
        (b, shared, expected_b, logits_b),  # shares the system prompt
        (a, len(a) - 1, expected_a, logits_a),  # everything but the last prompt token cached
    ]:
        req = driver.add(prompt, params, prefix_from=owner, prefix_len=hit)
        first = driver.step([req], decode=False)[0]
        while not req.finished:
            driver.step([req])
        assert req.output == expected
        torch.testing.assert_close(first, ref, atol=1e-3, rtol=0)
        driver.release(req)


def test_mixed_batch_matches_each_request_alone(driver, chat_prompts) -> None:
    prompts = [chat_prompts[i] for i in (1, 4, 7, 0, 5)]
    n = 12
    expected = [run_alone(driver, p, n)[0] for p in prompts]
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    r0 = driver.add(prompts[0], params)
    driver.step([r0], decode=False)
    # Extend batch mixing a decode-like token (r0), a fresh prefill and a prefix hit.
    r1 = driver.add(prompts[1], params)
    shared = next(i for i, (x, y) in enumerate(zip(prompts[0], prompts[2], strict=False)) if x != y)
    r2 = driver.add(prompts[2], params, prefix_from=r0, prefix_len=shared)
    driver.step([r0, r1, r2], decode=False)
    driver.step([r0, r1, r2])  # decode batch
    # Extend batch: two new prefills (one a prefix hit on r1) next to three decoding requests.
    r3 = driver.add(prompts[3], params)
    r4 = driver.add(prompts[4], params, prefix_from=r1, prefix_len=shared)
    reqs: list[DriverRequest] = [r0, r1, r2, r3, r4]
    driver.step([r3, r0, r4, r1, r2], decode=False)
    while running := [r for r in reqs if not r.finished]:
        driver.step(running)
    assert [r.output for r in reqs] == expected


def test_bf16_logits_close_to_fp32(fp32_model, chat_prompts) -> None:
    bf16_model = load_model(MODEL, dtype="bf16")
    logits = {}
    for name, model in (("fp32", fp32_model), ("bf16", bf16_model)):
        drv = PoolDriver(ModelRunner.with_pools(model, num_slots=2048, max_running_requests=8))
        logits[name] = drv.step([drv.add(p) for p in chat_prompts], decode=False)
    ref, got = logits["fp32"], logits["bf16"]
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); through 30 layers the rounding of
    # activations and K/V adds up to a few tenths on logits that span ~30. We require the error
    # to stay under 5% of each row's logit range, and the top token to be among fp32's top 3.
    spread = ref.max(-1).values - ref.min(-1).values
    err = (got - ref).abs().max(-1).values
    assert (err < 0.05 * spread).all(), (err, spread)
    top3 = ref.topk(3, dim=-1).indices
    assert (top3 == got.argmax(-1, keepdim=True)).any(-1).all()


def test_prompt_logprobs_equal_transformers_through_cache_and_chunks(
    fp32_model, hf_model, chat_prompts
) -> None:
    """logprob_start_len: the prompt tokens' log probabilities from that position on (top-5
    too) equal transformers' within 1e-4, also when the prompt is cached (the positions asked for
    are computed again, the earlier ones still come from the cache) and when it is prefilled in
    chunks of 16 beside another request."""
    from radixkv.config import ServerArgs
    from radixkv.scheduler.process import build_scheduler

    prompt = chat_prompts[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0]
    ref = torch.log_softmax(logits.float(), dim=-1)  # row p predicts prompt[p + 1]
    args = ServerArgs(
        dtype="float32", max_total_tokens=8192, chunked_prefill_size=16, max_prefill_tokens=16
    )
    s = build_scheduler(args, fp32_model)

    def run(start: int, **extra: list[int]) -> tuple[list, int]:
        sp = SamplingParams(max_new_tokens=2, logprobs=True, top_logprobs=5,
                            logprob_start_len=start)  # fmt: skip
        s.add_request("p", prompt, sp)
        for rid, ids in extra.items():
            s.add_request(rid, ids, SamplingParams(max_new_tokens=3))
        got, cached = None, -1
        while s.has_work():
            for out in s.step():
                if out.rid == "p" and out.prompt_logprobs is not None:
                    assert got is None  # sent once
                    got, cached = out.prompt_logprobs, out.cached_tokens
        s.check_idle()
        return got or [], cached

    for start, extra in ((0, {}), (len(prompt) - 7, {}), (5, {"other": chat_prompts[1]})):
        lps, cached = run(start, **extra)
        first = max(start, 1)
        assert [lp.token_id for lp in lps] == prompt[first:]
        assert cached <= max(start - 1, 0)  # the positions asked for were computed
        for lp, pos in zip(lps, range(first - 1, len(prompt) - 1), strict=True):
            row = ref[pos]
            assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
            assert lp.top_ids == row.topk(5).indices.tolist()
    assert run(len(prompt) - 7)[1] == len(prompt) - 8  # cached up to the first position asked


def test_logprobs_equal_transformers_log_softmax(fp32_model, hf_model, chat_prompts) -> None:
    """The scheduler's logprobs (greedy and sampled requests, beside one that asks for none) are
    a float32 log-softmax of the model's logits: transformers' within 1e-4, top-5 included."""
    from radixkv.config import ServerArgs
    from radixkv.scheduler.process import build_scheduler

    s = build_scheduler(ServerArgs(dtype="float32", max_total_tokens=8192), fp32_model)
    asks = {
        "greedy": SamplingParams(max_new_tokens=8, logprobs=True, top_logprobs=5),
        "sampled": SamplingParams(
            max_new_tokens=8,
            temperature=0.9,
            seed=3,
            logprobs=True,
            top_logprobs=5,
            repetition_penalty=1.3,
        ),
        "plain": SamplingParams(max_new_tokens=8),
    }
    prompts = dict(zip(asks, chat_prompts, strict=False))
    for rid, params in asks.items():
        s.add_request(rid, prompts[rid], params)
    tokens: dict[str, list[int]] = {rid: [] for rid in asks}
    lps: dict[str, list] = {rid: [] for rid in asks}
    while s.has_work():
        for out in s.step():
            tokens[out.rid] += out.token_ids
            lps[out.rid] += out.logprobs or []
    assert lps["plain"] == []
    for rid in ("greedy", "sampled"):
        ids = prompts[rid] + tokens[rid]
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids[:-1]])).logits[0, len(prompts[rid]) - 1 :]
        ref = torch.log_softmax(logits.float(), dim=-1)
        assert [lp.token_id for lp in lps[rid]] == tokens[rid]
        for step, lp in enumerate(lps[rid]):
            row = ref[step]
            assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
            top = row.topk(5)
            assert lp.top_ids == top.indices.tolist()
            torch.testing.assert_close(torch.tensor(lp.top_logprobs), top.values, atol=1e-4, rtol=0)
