"""TokenizerManager without processes: incremental UTF-8-safe detokenization, stop strings
spanning chunks, request validation (real SmolLM2 tokenizer, no model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixkv.frontend.detokenizer import IncrementalDetokenizer, StopStrings
from radixkv.frontend.tokenizer_manager import TokenizerManager
from radixkv.frontend.validation import BadRequest
from radixkv.protocol import (
    ChatMessage,
    GenerateRequest,
    GenerateResult,
    Ready,
    ReqOutput,
    SamplingParams,
    TokenChunk,
)
from radixkv.tokenizer import load_tokenizer

CONTEXT = 256
TEXTS = [
    "Hello 😀 world",
    "你好世界，今天天气很好",
    "emoji 👩‍👩‍👧‍👦 family 🇫🇷 flag",
    "mixé ü 日本語 🎉 end",
]
ALPHABET = st.sampled_from(
    [*"ab Z.\n", "é", "ü", "日", "本", "語", "😀", "🎉", "👩", "\u200d", "世"]
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tm(tokenizer):
    ready = Ready(
        model="smollm2-135m", kv_capacity=4096, page_size=1, max_context_len=CONTEXT,
        max_running_requests=8, dtype="float32", eos_token_ids=[2],
    )  # fmt: skip
    return TokenizerManager(tokenizer, ready)


def run_stream(tm, ids, chunks, stop=(), stream=True):
    """Feed `ids` to a request in pieces of the given sizes; return its replies."""
    req = GenerateRequest(rid="x", text="p", stream=stream, sampling=SamplingParams(stop=stop))
    state = tm.new_state(req, b"id", ids=[5], arrival=0.0)
    replies, pos = [], 0
    for n in chunks:
        piece, pos = ids[pos : pos + n], pos + n
        last = pos >= len(ids)
        step = tm.on_output(state, ReqOutput("0", piece, "length" if last else None, 1, 0))
        replies += step.replies
        if step.finished:
            return replies, step
    raise AssertionError("never finished")


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_never_emits_broken_utf8(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([t]) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert sum(1 for p in pieces if p) > 1  # it really streamed


@settings(max_examples=60, deadline=None)
@given(text=st.text(ALPHABET, min_size=1, max_size=40), data=st.data())
def test_any_chunking_reassembles_the_text(tokenizer, tm, text, data):
    ids = tokenizer.encode(text)
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=len(ids), max_size=len(ids)))
    replies, _ = run_stream(tm, ids, sizes)
    chunks = [r for r in replies if isinstance(r, TokenChunk)]
    result = replies[-1]
    assert isinstance(result, GenerateResult)
    assert all("\ufffd" not in c.text for c in chunks)
    assert "".join(c.text for c in chunks) == result.text == tokenizer.decode(ids)
    assert [t for c in chunks for t in c.token_ids] == result.token_ids == ids


@pytest.mark.parametrize("stop", ["STOP", "世界", "😀 w", "\n\n"])
def test_stop_string_spanning_tokens_cuts_the_text_and_aborts(tokenizer, tm, stop):
    text = f"before 你好 {stop} after"
    ids = tokenizer.encode(text)
    replies, step = run_stream(tm, ids, [1] * len(ids), stop=[stop, "never-seen"])
    result = replies[-1]
    assert result.finish_reason == "stop"
    assert result.text == text[: text.index(stop)]
    assert step.abort_scheduler  # the scheduler is still generating: it must be told
    streamed = "".join(r.text for r in replies if isinstance(r, TokenChunk))
    assert streamed == result.text  # no prefix of the stop string leaked out early


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(ALPHABET, min_size=1, max_size=30),
    stop=st.text(ALPHABET, min_size=1, max_size=4),
    data=st.data(),
)
def test_stop_strings_match_the_first_occurrence(tokenizer, tm, text, stop, data):
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids)))
    replies, _ = run_stream(tm, ids, sizes, stop=[stop])
    result = replies[-1]
    streamed = "".join(r.text for r in replies if isinstance(r, TokenChunk))
    assert streamed == result.text
    if stop in full:
        assert result.text == full[: full.index(stop)] and result.finish_reason == "stop"
    else:
        assert result.text == full and result.finish_reason == "length"


def test_non_streaming_request_gets_only_the_result(tokenizer, tm):
    ids = tokenizer.encode("plain 😀 text")
    replies, step = run_stream(tm, ids, [1] * len(ids), stream=False)
    assert len(replies) == 1 and replies[0].text == "plain 😀 text"
    assert replies[0].meta.completion_tokens == len(ids) and not step.abort_scheduler


def test_stop_strings_holdback():
    s = StopStrings(["</end>", "xyz"])
    assert s.holdback("abc</e") == 3 and s.holdback("abcx") == 1 and s.holdback("abc") == 0
    assert s.find("a</end>b") == 1 and s.find("abc") is None


def gen(**kw):
    sampling = kw.pop("sampling", {})
    return GenerateRequest(rid="r", sampling=SamplingParams(**sampling), **kw)


@pytest.mark.parametrize(
    ("request_kw", "expect"),
    [
        ({"text": ""}, "the prompt is empty"),
        ({"input_ids": []}, "the prompt is empty"),
        ({"messages": []}, "messages is empty"),
        ({}, "exactly one of text, messages or input_ids"),
        ({"text": "a", "input_ids": [1]}, "exactly one"),
        ({"input_ids": [5] * CONTEXT}, f"the context length is {CONTEXT}"),
        ({"input_ids": [5, 10**6]}, "outside the vocabulary [0, 49152)"),
        ({"input_ids": [5, -1]}, "outside the vocabulary"),
        ({"messages": [ChatMessage("wizard", "hi")]}, "unknown chat role 'wizard'"),
        ({"text": "x" * (CONTEXT * 100)}, "more than can fit the context length 256"),
        ({"text": "hi", "sampling": {"max_new_tokens": 0}}, "max_new_tokens must be >= 1, got 0"),
        ({"input_ids": [5] * 200, "sampling": {"max_new_tokens": 100}}, "at most 56 here"),
        ({"text": "hi", "sampling": {"temperature": -0.5}}, "temperature must be"),
        ({"text": "hi", "sampling": {"temperature": float("nan")}}, "temperature must be"),
        ({"text": "hi", "sampling": {"top_p": 0.0}}, "top_p must be in (0, 1], got 0.0"),
        ({"text": "hi", "sampling": {"top_p": 1.5}}, "top_p must be in (0, 1]"),
        ({"text": "hi", "sampling": {"top_k": -2}}, "top_k must be -1 or 0 (off)"),
        ({"text": "hi", "sampling": {"seed": -1}}, "seed must be in"),
        ({"text": "hi", "sampling": {"stop": [""]}}, "stop strings must not be empty"),
        ({"text": "hi", "sampling": {"stop_token_ids": [10**7]}}, "stop token id 10000000"),
        # bounds checked before any templating or tokenizing
        ({"messages": [ChatMessage("user", "")] * 100_000}, "100000 messages cannot fit"),
        ({"text": "hi", "sampling": {"stop": ["x"] * 65}}, "at most 64 stop strings, got 65"),
        ({"text": "hi", "sampling": {"stop": ["x" * 1025]}}, "has 1025 characters; at most 1024"),
        ({"text": "hi", "sampling": {"stop_token_ids": [1] * 1025}}, "at most 1024 stop token"),
    ],
)
def test_bad_requests_say_what_is_wrong(tm, request_kw, expect):
    with pytest.raises(BadRequest) as err:
        tm.tokenize(gen(**request_kw))
    assert expect in str(err.value)


def test_valid_requests_tokenize(tokenizer, tm):
    assert tm.tokenize(gen(text="Hello")) == tokenizer.encode("Hello")
    assert tm.tokenize(gen(input_ids=[5, 6], sampling={"top_k": -1, "max_new_tokens": 254}))
    chat = tm.tokenize(gen(messages=[ChatMessage("user", "hi")]))
    assert chat[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
