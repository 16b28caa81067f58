"""The OpenAI-compatible API with the official `openai` client against the real model (fp32,
greedy, one module-scoped runtime): completions, chat, streaming, cached tokens growing across a
multi-turn conversation, and a /metrics scrape that agrees with the per-request usage."""

from __future__ import annotations

import json
import math

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import radixkv

pytestmark = pytest.mark.slow

NEW = 6
SYSTEM = (
    "You are a concise assistant for a geography quiz. Answer in one short sentence, name the "
    "place first, and never add follow-up questions or extra commentary."
)


@pytest.fixture(scope="module")
def rt():
    with radixkv.Runtime(
        "smollm2-135m", dtype="float32", max_total_tokens=8192, http_port=0, api_key="k"
    ) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def oai(rt):
    with openai.OpenAI(base_url=f"{rt.http_url}/v1", api_key="k", max_retries=0) as client:
        yield client


def chat(oai, messages, **kwargs):
    kwargs = {"max_tokens": NEW, "temperature": 0, **kwargs}
    return oai.chat.completions.create(model="smollm2-135m", messages=messages, **kwargs)


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list()] == ["smollm2-135m"]


def test_completion_equals_the_python_client(rt, oai):
    prompt = "The capital of France is"
    r = oai.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=NEW, temperature=0)
    direct = rt.client.generate(prompt, max_new_tokens=NEW)
    assert r.choices[0].text == direct.text and r.choices[0].finish_reason == direct.finish_reason
    u = r.usage
    assert u.prompt_tokens == direct.prompt_tokens and u.completion_tokens == NEW
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # the Python client's request ran second and hit the prompt the HTTP request cached
    assert direct.cached_tokens == direct.prompt_tokens - 1
    assert u.prompt_tokens_details.cached_tokens <= u.prompt_tokens


def test_chat_and_stream_agree(oai):
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What is the capital of Italy?"}]  # fmt: skip
    whole = chat(oai, messages)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(chat(oai, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    # the second run of the same conversation is served from the radix cache
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_cached_tokens_grow_across_a_multi_turn_conversation(oai):
    messages = [{"role": "system", "content": SYSTEM}]
    cached, prompts = [], []
    for question in ("Where is Lyon?", "And Porto?", "And Krakow?"):
        messages.append({"role": "user", "content": question})
        r = chat(oai, messages)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        prompts.append(r.usage.prompt_tokens)
    # each turn's prompt starts with the previous turn's prompt (and answer): a growing hit
    assert cached[1] > cached[0] and cached[2] > cached[1]
    assert cached[1] >= prompts[0] - 1 and cached[2] >= prompts[1] - 1


def test_metrics_agree_with_usage(rt, oai):
    http = httpx.Client(base_url=rt.http_url, headers={"Authorization": "Bearer k"})

    def scrape() -> dict[str, float]:
        text = http.get("/metrics").text
        return {s.name + json.dumps(s.labels, sort_keys=True): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip

    before = scrape()
    usages = [chat(oai, [{"role": "user", "content": f"Name a river in country {i}."}]).usage
              for i in range(2)]  # fmt: skip
    direct = rt.client.generate("Rivers of Europe:", max_new_tokens=NEW)
    after = scrape()
    http.close()

    def delta(name: str) -> float:
        return after[name + "{}"] - before[name + "{}"]

    prompt = sum(u.prompt_tokens for u in usages) + direct.prompt_tokens
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages) + direct.cached_tokens
    generated = sum(u.completion_tokens for u in usages) + direct.completion_tokens
    assert delta("radixkv_prompt_tokens_total") == prompt
    assert delta("radixkv_cached_prompt_tokens_total") == cached > 0  # the chat template's head
    assert delta("radixkv_generated_tokens_total") == generated
    assert delta("radixkv_scheduler_requests_total") == 3
    assert delta("radixkv_prefill_steps_total") >= 3  # each request's prompt, one step at least
    assert delta("radixkv_raised_prefill_steps_total") == 0  # no --ttft-target
    for histogram in ("radixkv_time_to_first_token_seconds", "radixkv_e2e_request_latency_seconds"):
        assert delta(f"{histogram}_count") == 3  # HTTP and ZMQ requests alike
    finished = sum(after[k] - before.get(k, 0) for k in after
                   if k.startswith("radixkv_requests_finished_total"))  # fmt: skip
    assert finished == 3
    assert after["radixkv_running_requests{}"] == 0 and after["radixkv_protected_tokens{}"] == 0
    assert after["radixkv_kv_capacity_tokens{}"] == rt.ready_info.kv_capacity


def test_a_client_that_leaves_mid_stream_frees_its_kv_slots(rt, oai):
    import time

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell a story."}]
    stream = oai.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=2000, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for pieces, _chunk in enumerate(stream, 1):
        if pieces == 3:
            assert rt.client.stats().protected > 0  # the running request holds its prefix
            break
    stream.close()  # the HTTP connection goes: the runtime aborts the request
    deadline = time.monotonic() + 10
    while (s := rt.client.stats()).running or s.waiting:
        assert time.monotonic() < deadline, f"the request kept running: {s}"
        time.sleep(0.05)
    # no slot is held any more: everything in use is either free or evictable cache
    assert s.protected == 0 and s.kv_used == 0
    assert s.finished.get("abort", 0) >= 1


def test_n_copies_share_one_prefill(rt, oai):
    """n=4: the first copy computes the prompt, the other three find it in the radix cache."""
    messages = [{"role": "system", "content": SYSTEM + " Be playful."},
                {"role": "user", "content": "Name a river in Egypt."}]  # fmt: skip
    r = chat(oai, messages, n=4)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in r.choices}) == 1  # greedy: identical copies
    per_choice = r.model_extra["sglext"]["cached_tokens_per_choice"]
    prompt = r.usage.prompt_tokens  # counted once, as OpenAI does
    assert per_choice[0] < prompt - 1 and all(c >= prompt - 1 for c in per_choice[1:])
    assert r.usage.completion_tokens % 4 == 0 and 0 < r.usage.completion_tokens <= 4 * NEW
    seeded = oai.completions.create(model="smollm2-135m", prompt="Once upon a time", n=3,
                                    max_tokens=8, temperature=1.0, seed=5)  # fmt: skip
    again = oai.completions.create(model="smollm2-135m", prompt="Once upon a time", n=3,
                                   max_tokens=8, temperature=1.0, seed=5)  # fmt: skip
    assert [c.text for c in seeded.choices] == [c.text for c in again.choices]
    assert len({c.text for c in seeded.choices}) > 1  # copy i samples with seed + i


def test_logprobs_in_openai_and_sglang_shapes(rt, oai):
    messages = [{"role": "user", "content": "Name a color."}]
    r = chat(oai, messages, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.logprob <= 0
        assert c.top_logprobs[0].logprob >= c.logprob - 1e-6  # greedy: the top token
        assert bytes(c.bytes).decode() == c.token
    streamed = chat(oai, messages, logprobs=True, stream=True)
    entries = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for e in chunk.choices[0].logprobs.content]  # fmt: skip
    assert [e.logprob for e in entries] == pytest.approx([c.logprob for c in content], abs=1e-4)
    done = oai.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=4,
                                  temperature=0, logprobs=2)  # fmt: skip
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 3}, "return_logprob": True,
            "top_logprobs_num": 2, "return_text_in_logprobs": True}  # fmt: skip
    meta = httpx.post(f"{rt.http_url}/generate", json=body,
                      headers={"Authorization": "Bearer k"}).json()["meta_info"]  # fmt: skip
    out = meta["output_token_logprobs"]
    assert len(out) == 3 and all(isinstance(t[2], str) for t in out)
    assert [len(top) for top in meta["output_top_logprobs"]] == [2, 2, 2]
    assert rt.client.generate("Hello", max_new_tokens=3, logprobs=True).logprobs[0].logprob == (
        pytest.approx(out[0][0], abs=1e-6)
    )


def test_echo_and_prompt_logprobs(rt, oai):
    """echo repeats the prompt (text or ids) before the completion; with logprobs the prompt's
    tokens come first, the first one null (nothing precedes it), the rest equal to the native
    API's input_token_logprobs; scored again, the prompt is recomputed, not cached."""
    ids = rt.client.tokenize("The capital of France is")
    r = oai.completions.create(model="smollm2-135m", prompt="The capital of France is",
                               max_tokens=3, temperature=0, echo=True)  # fmt: skip
    assert r.choices[0].text.startswith("The capital of France is")
    r = oai.completions.create(model="smollm2-135m", prompt=ids, max_tokens=3, temperature=0,
                               echo=True, logprobs=2)  # fmt: skip
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "".join(lp.tokens)
    assert len(lp.tokens) == len(ids) + 3 and r.usage.prompt_tokens_details.cached_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and len(lp.top_logprobs[1]) <= 2
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
            "logprob_start_len": 2, "top_logprobs_num": 2}  # fmt: skip
    meta = httpx.post(f"{rt.http_url}/generate", json=body,
                      headers={"Authorization": "Bearer k"}).json()["meta_info"]  # fmt: skip
    native = meta["input_token_logprobs"]
    assert [t[1] for t in native] == ids[2:] and meta["cached_tokens"] <= 1
    assert [t[0] for t in native] == pytest.approx(lp.token_logprobs[2 : len(ids)], abs=1e-5)
    assert [len(top) for top in meta["input_top_logprobs"]] == [2] * (len(ids) - 2)
    kw = {"max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2, "stream": True}
    pieces = list(oai.completions.create(model="smollm2-135m", prompt=ids, **kw))
    assert "".join(c.choices[0].text for c in pieces) == r.choices[0].text
    tokens = [t for c in pieces if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens
    res = rt.client.generate_ids(ids, max_new_tokens=1, logprobs=True, logprob_start_len=0)
    assert [p.token_id for p in res.prompt_logprobs] == ids
    assert math.isnan(res.prompt_logprobs[0].logprob)
    assert [p.logprob for p in res.prompt_logprobs[1:]] == pytest.approx(
        lp.token_logprobs[1 : len(ids)], abs=1e-5
    )
    stream = rt.client.stream(ids, max_new_tokens=2, logprobs=True, logprob_start_len=1)
    next(stream)
    assert [p.token_id for p in stream.prompt_logprobs] == ids[1:]
    stream.close()
    body["logprob_start_len"] = len(ids)
    r2 = httpx.post(f"{rt.http_url}/generate", json=body, headers={"Authorization": "Bearer k"})
    assert r2.status_code == 400 and r2.json()["error"]["param"] == "logprob_start_len"


def test_structured_output_parses_with_the_openai_client(oai):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=20)
        population: int

    parse = getattr(oai.chat.completions, "parse", None) or oai.beta.chat.completions.parse
    r = parse(
        model="smollm2-135m", messages=[{"role": "user", "content": "Describe Rome."}],
        response_format=City, max_tokens=60, temperature=0,
    )  # fmt: skip
    assert isinstance(r.choices[0].message.parsed, City)
    # json_object (any object) is the same machinery with the schema {"type": "object"}; this
    # 135M model, greedy, keeps adding keys until max_tokens, so it is checked for shape only
    free = oai.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Describe Rome in JSON."}],
        response_format={"type": "json_object"}, max_tokens=12, temperature=0,
    )  # fmt: skip
    assert free.choices[0].message.content.lstrip().startswith("{")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
    "required": ["zone"], "additionalProperties": False}}}  # fmt: skip


def test_forced_tool_calls(oai):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = chat(oai, ask, tools=[WEATHER, TIME], max_tokens=40,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    required = chat(oai, ask, tools=[WEATHER, TIME], tool_choice="required", max_tokens=50)
    (call2,) = required.choices[0].message.tool_calls
    assert call2.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call2.function.arguments), dict)
    follow = [*ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]  # fmt: skip
    answer = chat(oai, follow, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError, match="auto"):
        chat(oai, ask, tools=[WEATHER])
    # streamed: OpenAI's tool_calls deltas, put back together, are the same calls
    for choice_kw, want in (
        ({"type": "function", "function": {"name": "get_weather"}}, call),
        ("required", call2),
    ):
        name, arguments, ids, finish = "", "", set(), None
        for c in chat(oai, ask, tools=[WEATHER, TIME], tool_choice=choice_kw, stream=True,
                      max_tokens=50 if choice_kw == "required" else 40):  # fmt: skip
            delta = c.choices[0].delta
            for tc in delta.tool_calls or []:
                assert tc.index == 0
                if tc.id:
                    ids.add(tc.id)
                name += tc.function.name or ""
                arguments += tc.function.arguments or ""
            finish = c.choices[0].finish_reason or finish
        assert finish == "tool_calls" and len(ids) == 1
        assert (name, json.loads(arguments)) == (want.function.name,
                                                 json.loads(want.function.arguments))  # fmt: skip


def test_best_of_returns_the_most_likely_candidates(oai):
    r = oai.completions.create(model="smollm2-135m", prompt="Once upon a time", n=2, best_of=4,
                               max_tokens=6, temperature=1.0, seed=1, logprobs=0,
                               extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    totals = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert totals[0] >= totals[1]  # best first
    assert r.usage.completion_tokens == 4 * 6  # every candidate was generated (and is billed)
