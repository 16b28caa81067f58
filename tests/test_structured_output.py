"""Structured output with the real SmolLM2 weights: every output follows its grammar (greedy and
sampled), constrained and free requests share batches without changing the free ones, and a
grammar that does not compile is refused naming its field."""

from __future__ import annotations

import json
import re

import pytest

from radixkv.config import ServerArgs
from radixkv.model.loader import load_model
from radixkv.protocol import SamplingParams
from radixkv.scheduler.process import build_scheduler
from radixkv.scheduler.scheduler import Scheduler
from radixkv.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer"},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model():
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def prompt(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


def run(s: Scheduler, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    for rid, (ids, params) in requests.items():
        s.add_request(rid, ids, params)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    while s.has_work():
        for o in s.step():
            out[o.rid] += o.token_ids
    s.check_idle()
    return out


def valid(doc: dict) -> bool:
    return (set(doc) == {"city", "population", "capital"} and isinstance(doc["city"], str)
            and type(doc["population"]) is int and isinstance(doc["capital"], bool))  # fmt: skip


def test_outputs_follow_their_grammars_beside_free_requests(model, tokenizer):
    s = build_scheduler(ServerArgs(dtype="float32", max_total_tokens=8192), model)
    question = prompt(tokenizer, "Describe Paris as JSON.")
    schema = json.dumps(SCHEMA)
    free = SamplingParams(max_new_tokens=12, ignore_eos=True)
    requests = {
        "json-greedy": (question, SamplingParams(max_new_tokens=80, json_schema=schema)),
        "json-sampled": (question, SamplingParams(max_new_tokens=80, json_schema=schema,
                                                  temperature=1.0, seed=7)),
        "regex": (prompt(tokenizer, "Give an email address."),
                  SamplingParams(max_new_tokens=40, regex=r"[a-z]{2,8}@[a-z]{2,8}\.(com|org)")),
        "ebnf": (prompt(tokenizer, "Yes or no?"),
                 SamplingParams(max_new_tokens=10, ebnf='root ::= "yes" | "no"')),
        "free": (question, free),
    }  # fmt: skip
    out = run(s, requests)
    eos = set(model.config.eos_token_ids)
    text = {rid: tokenizer.decode([t for t in ids if t not in eos]) for rid, ids in out.items()}
    for rid in ("json-greedy", "json-sampled"):
        assert valid(json.loads(text[rid])), text[rid]
    assert re.fullmatch(r"[a-z]{2,8}@[a-z]{2,8}\.(com|org)", text["regex"]), text["regex"]
    assert text["ebnf"] in ("yes", "no")
    alone = run(build_scheduler(ServerArgs(dtype="float32", max_total_tokens=8192), model),
                {"free": (question, free)})  # fmt: skip
    assert out["free"] == alone["free"]  # the masks of the others did not touch it


def test_a_grammar_that_does_not_compile_is_refused(model):
    """Grammars compile on a worker thread: the request is refused once it has failed (naming
    its field), the scheduler serving the others meanwhile; one still compiling can be aborted."""
    s = build_scheduler(ServerArgs(dtype="float32", max_total_tokens=4096), model)
    s.add_request("bad", [1, 2, 3], SamplingParams(ebnf="root ::= ("))
    s.add_request("free", [1, 2, 3], SamplingParams(max_new_tokens=2))
    rejected, finished = [], []
    while s.has_work():
        finished += [o.rid for o in s.step() if o.finish_reason]
        rejected += s.take_rejected()
    (bad,) = rejected
    assert bad.rid == "bad" and "does not compile" in bad.message and bad.param == "ebnf"
    assert finished == ["free"] and s.get_stats().requests == 1
    s.add_request("slow", [1, 2, 3], SamplingParams(regex="[a-z]{1,5}[0-9]{2}x"))
    assert [o.finish_reason for o in s.abort("slow")] == ["abort"] and not s.has_work()
