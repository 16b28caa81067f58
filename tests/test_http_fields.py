"""No field is silently ignored: every field of OpenAI's completions and chat completions request
bodies (the API reference's list, and the vLLM/SGLang extensions clients send), and of the native
`/generate`, is honoured (200) or refused (400 naming it). Fake scheduler (tests/fake_scheduler.py):
the output echoes the prompt."""

from __future__ import annotations

import httpx2 as httpx
import pytest

import radixkv

KEY = "k"
FAKE = "fake_scheduler:run_fake_scheduler"
OK, REFUSED = "honoured", "refused"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

SHARED = {  # both endpoints: a value other than the default, and what happens to it
    "model": ("smollm2-135m", OK),
    "max_tokens": (3, OK),
    "temperature": (0.5, OK),
    "top_p": (0.5, OK),
    "seed": (7, OK),
    "stop": (["zz"], OK),
    "stream": (True, OK),
    "stream_options": ({"include_usage": True}, OK),
    "user": ("someone", OK),
    "n": (2, OK),
    "presence_penalty": (0.5, OK),
    "frequency_penalty": (0.5, OK),
    "logit_bias": ({"50": -100}, OK),
    # extensions of vLLM and SGLang
    "top_k": (5, OK),
    "stop_token_ids": ([9], OK),
    "ignore_eos": (True, OK),
    "min_tokens": (1, OK),
    "min_p": (0.1, OK),
    "repetition_penalty": (1.2, OK),
    "skip_special_tokens": (False, REFUSED),
    "include_stop_str_in_output": (True, REFUSED),
    "regex": ("[a-z]+", OK),
    "ebnf": ('root ::= "a"', OK),
    "guided_json": ({"type": "object"}, REFUSED),  # not declared at all
    "cache_salt": ("tenant-a", OK),  # vLLM's; its effect: tests/test_scheduler_model.py
    # SGLang's and vLLM's; the fake takes it, a real scheduler refuses it unless
    # --radix-eviction-policy priority (tests/test_scheduler_model.py)
    "priority": (1, OK),
}
COMPLETIONS = {
    **SHARED,
    "best_of": (2, OK),
    "echo": (True, OK),
    "logprobs": (0, OK),
    "suffix": ("end", REFUSED),
}
CHAT = {
    **SHARED,
    "max_completion_tokens": (3, OK),
    "metadata": ({"team": "a"}, OK),
    "parallel_tool_calls": (False, OK),
    "prompt_cache_key": ("key", OK),
    "safety_identifier": ("someone", OK),
    "modalities": (["text", "audio"], REFUSED),
    "audio": ({"voice": "alloy", "format": "wav"}, REFUSED),
    "logprobs": (True, OK),
    "top_logprobs": (2, REFUSED),
    "response_format": ({"type": "json_object"}, OK),
    "tools": ([TOOL], REFUSED, "tool_choice"),  # with tools, the default "auto" is refused
    "tool_choice": ("required", REFUSED),
    "functions": ([TOOL["function"]], REFUSED),
    "function_call": ("auto", REFUSED),
    "prediction": ({"type": "content", "content": "x"}, REFUSED),
    "reasoning_effort": ("low", REFUSED),
    "verbosity": ("low", REFUSED),
    "web_search_options": ({}, REFUSED),
    "store": (True, REFUSED),
    "service_tier": ("flex", REFUSED),
}
AT_THEIR_DEFAULTS = {  # fields honoured at these values only (refused at others, above)
    "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"}, "tools": [],
    "tool_choice": "none", "modalities": ["text"], "store": False, "service_tier": "auto",
    "n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "min_tokens": 0,
    "min_p": 0, "repetition_penalty": 1, "skip_special_tokens": True,
    "include_stop_str_in_output": False,
}  # fmt: skip
MESSAGE = {
    "role": ("developer", OK),
    "name": ("bob", REFUSED),
    "tool_calls": ([{"id": "1", "type": "function", "function": {"name": "f"}}], OK),
    "tool_call_id": ("1", OK),
    "refusal": ("no", REFUSED),
}
GENERATE = {
    "stream": (True, OK),
    "return_logprob": (True, OK),
    "logprob_start_len": (0, REFUSED),  # without return_logprob (with it: test_http_openai)
    "top_logprobs_num": (2, REFUSED),
    "rid": ("abc", OK),  # the request's id (a session continues it by this)
    "session_params": ({"id": "no-such-session"}, REFUSED),  # open: tests/test_sessions.py
    "lora_path": ("x", REFUSED),
    "cache_salt": ("tenant-a", OK),
    "priority": (1, OK),  # SGLang's top-level field (see SHARED)
}
SAMPLING_PARAMS = {
    "temperature": (0.5, OK),
    "top_k": (5, OK),
    "top_p": (0.5, OK),
    "seed": (7, OK),
    "max_new_tokens": (3, OK),
    "stop": (["zz"], OK),
    "stop_token_ids": ([9], OK),
    "ignore_eos": (True, OK),
    "min_new_tokens": (1, OK),
    "min_p": (0.1, OK),
    "repetition_penalty": (1.2, OK),
    "frequency_penalty": (0.5, OK),
    "presence_penalty": (0.5, OK),
    "logit_bias": ({"50": -100}, OK),
    "regex": ("[a-z]+", OK),
    "ebnf": ('root ::= "a"', OK),
    "json_schema": ('{"type": "object"}', OK),
    "priority": (1, OK),
    "n": (2, REFUSED),
    "skip_special_tokens": (False, REFUSED),
}


@pytest.fixture(scope="module")
def http():
    with radixkv.Runtime(scheduler=FAKE, api_key=KEY, http_port=0, start_timeout=60) as rt:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=rt.http_url, headers=headers, timeout=20) as client:
            yield client


def check(r: httpx.Response, outcome: str, param: str) -> None:
    if outcome == OK:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize(("field", "case"), sorted(COMPLETIONS.items()))
def test_every_completions_field_is_honoured_or_refused(http, field, case):
    value, outcome, *param = case
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, field: value})
    check(r, outcome, param[0] if param else field)


@pytest.mark.parametrize(("field", "case"), sorted(CHAT.items()))
def test_every_chat_field_is_honoured_or_refused(http, field, case):
    value, outcome, *param = case
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    check(http.post("/v1/chat/completions", json=body), outcome, param[0] if param else field)


@pytest.mark.parametrize(("field", "value"), sorted(AT_THEIR_DEFAULTS.items()))
def test_refusable_fields_are_honoured_at_their_defaults(http, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    check(http.post("/v1/chat/completions", json=body), OK, field)


@pytest.mark.parametrize(("field", "case"), sorted(MESSAGE.items()))
def test_every_message_field_is_honoured_or_refused(http, field, case):
    value, outcome = case
    message = {"role": "user", "content": "hi", field: value}
    body = {"messages": [message], "max_tokens": 2}
    check(http.post("/v1/chat/completions", json=body), outcome, "messages")


@pytest.mark.parametrize(("field", "case"), sorted(GENERATE.items()))
def test_every_generate_field_is_honoured_or_refused(http, field, case):
    value, outcome = case
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 2}, field: value}
    check(http.post("/generate", json=body), outcome, field)


@pytest.mark.parametrize(("field", "case"), sorted(SAMPLING_PARAMS.items()))
def test_every_sampling_param_is_honoured_or_refused(http, field, case):
    value, outcome = case
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 2, field: value}}
    check(http.post("/generate", json=body), outcome, f"sampling_params.{field}")


def test_cache_salt_reaches_the_scheduler_from_every_endpoint(http):
    """(The fake reports nothing cached for a salted request.)"""
    prompt, chat = "salted prompt here", [{"role": "user", "content": "salted prompt here"}]
    for salt, cached in ((None, True), ("tenant-a", False)):
        extra = {} if salt is None else {"cache_salt": salt}
        r = http.post("/v1/completions", json={"prompt": prompt, **extra}).json()
        assert bool(r["usage"]["prompt_tokens_details"]["cached_tokens"]) is cached
        r = http.post("/v1/chat/completions", json={"messages": chat, "n": 2, **extra}).json()
        assert bool(r["usage"]["prompt_tokens_details"]["cached_tokens"]) is cached
        r = http.post("/generate", json={"text": prompt, **extra}).json()
        assert bool(r["meta_info"]["cached_tokens"]) is cached
    r = http.post("/v1/completions", json={"prompt": "hi", "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_priority_reaches_the_sampling_params_from_every_body():
    import msgspec

    from radixkv.http.openai_protocol import ChatCompletionRequest, CompletionRequest, GenerateBody

    def decode(body: dict, cls: type):
        return msgspec.json.decode(msgspec.json.encode(body), type=cls)

    assert decode({"prompt": "x", "priority": 2}, CompletionRequest).sampling(8).priority == 2
    chat = {"messages": [{"role": "user", "content": "x"}], "priority": 3}
    assert decode(chat, ChatCompletionRequest).sampling(8).priority == 3
    assert decode({"text": "x", "priority": 4}, GenerateBody).sampling.priority == 4
    nested = {"text": "x", "sampling_params": {"priority": 5}}
    assert decode(nested, GenerateBody).sampling.priority == 5
    assert decode({"prompt": "x"}, CompletionRequest).sampling(8).priority == 0


def test_stop_token_ids_end_a_v1_completion(http):
    """The fake echoes the prompt: the second prompt token is the second output token."""
    ids = [72, 105, 33, 44]
    body = {"prompt": ids, "max_tokens": 8, "temperature": 0, "stop_token_ids": [ids[1]]}
    r = http.post("/v1/completions", json=body).json()
    assert r["usage"]["completion_tokens"] == 2 and r["choices"][0]["finish_reason"] == "stop"


def test_developer_is_the_system_role(http):
    def prompt_tokens(role: str) -> int:
        messages = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}]
        body = {"messages": messages, "max_tokens": 1}
        return http.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]

    assert prompt_tokens("developer") == prompt_tokens("system")
