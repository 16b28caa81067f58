"""Sessions (SGLang's open_session / close_session / session_params): the store's rules, the
cache's demotion of a closed session's paths, and both through a runtime (fake scheduler: the
output echoes the prompt, tests/fake_scheduler.py) over the Python client and HTTP."""

from __future__ import annotations

import time

import httpx2 as httpx
import pytest

import radixkv
from radixkv.frontend.sessions import (
    MAX_SESSION_REQUESTS,
    SessionError,
    SessionStore,
    common_prefix_len,
)
from radixkv.mem import KVLayout, RadixCache, TokenToKVPool
from radixkv.protocol import SessionParams

A = (b"client", "")  # identity of the requests below


def key(rid: str) -> tuple[bytes, str]:
    return (A[0], rid)


def run(store: SessionStore, rid: str, params: SessionParams, ids: list[int], out: list[int],
        salt: str | None = None) -> list[int]:  # fmt: skip
    """A request through the store: its whole prompt; it finishes with `out`."""
    sp = store.prompt(params, ids, salt, rid)
    store.start(key(rid), sp)
    store.finish(key(rid), out)
    return sp.ids


def test_a_request_continues_the_prompt_and_output_of_the_one_it_names():
    store = SessionStore()
    sid = store.open(None, 0, None)
    assert run(store, "a", SessionParams(id=sid), [1, 2, 3], [4, 5]) == [1, 2, 3]
    assert run(store, "b", SessionParams(id=sid, rid="a"), [6], [7]) == [1, 2, 3, 4, 5, 6]
    assert run(store, "c", SessionParams(id=sid, rid="b"), [8], [9]) == [1, 2, 3, 4, 5, 6, 7, 8]
    # offset keeps the first tokens of the history; drop_previous_output only its prompt
    assert store.prompt(SessionParams(id=sid, rid="b", offset=2), [0], None, "x").ids == [1, 2, 0]
    # offset 0, as null: the whole history (SGLang's meaning)
    assert store.prompt(SessionParams(id=sid, rid="a", offset=0), [0], None, "x").ids == [
        1, 2, 3, 4, 5, 0
    ]  # fmt: skip
    dropped = store.prompt(SessionParams(id=sid, rid="c", drop_previous_output=True), [0], None,
                           "x")  # fmt: skip
    assert dropped.ids == [1, 2, 3, 4, 5, 6, 7, 8, 0]
    # a branch from an earlier request; a new branch without rid
    assert run(store, "b2", SessionParams(id=sid, rid="a"), [60], [70]) == [1, 2, 3, 4, 5, 60]
    assert run(store, "z", SessionParams(id=sid), [40], [41]) == [40]
    assert len(store.sessions[sid].requests) == 5


def test_replace_forgets_what_continued_the_request_and_aborts_what_still_runs():
    store = SessionStore()
    sid = store.open("s", 0, None)
    run(store, "a", SessionParams(id=sid), [1, 2], [3])
    run(store, "b", SessionParams(id=sid, rid="a"), [4], [5])
    store.start(key("c"), store.prompt(SessionParams(id=sid, rid="b"), [6], None, "c"))  # running
    sp = store.prompt(SessionParams(id=sid, rid="a", replace=True), [9], None, "d")
    assert sp.ids == [1, 2, 3, 9] and sp.abort == [key("c")]
    store.start(key("d"), sp)
    assert sorted(store.sessions[sid].requests) == ["a", "d"]
    store.finish(key("c"), [1])  # the aborted one's late result changes nothing
    with pytest.raises(SessionError, match="no request 'b'"):
        store.prompt(SessionParams(id=sid, rid="b"), [1], None, "x")
    # replace without rid: the session starts over (a replaced rid may be used again)
    store.finish(key("d"), [1])
    store.start(key("d"), store.prompt(SessionParams(id=sid, replace=True), [5], None, "d"))
    assert sorted(store.sessions[sid].requests) == ["d"]
    assert store.tokens == 1 and not store.running.keys() - {key("d")}


def test_every_misuse_is_a_clear_error_and_changes_nothing():
    store = SessionStore(max_sessions=2)
    sid = store.open("s", 5, "salt")
    run(store, "a", SessionParams(id=sid), [1, 2], [3], salt="salt")
    store.start(key("run"), store.prompt(SessionParams(id=sid, rid="a"), [4], "salt", "run"))
    cases = [
        (SessionParams(id="nope"), [1], "salt", "no open session 'nope'"),
        (SessionParams(id=sid), [1], None, "no open session 's' for this cache_salt"),
        (SessionParams(id=sid, rid="x"), [1], "salt", "has no request 'x'"),
        (SessionParams(id=sid, rid="run"), [1], "salt", "has not finished"),
        (SessionParams(id=sid, rid="a", offset=9), [1], "salt", "offset 9 is outside"),
        (SessionParams(id=sid, offset=1), [1], "salt", "need the rid"),
        (SessionParams(id=sid, offset=0), [1], "salt", "need the rid"),
        (SessionParams(id=sid, rid="a", offset=-1), [1], "salt", "offset -1 is outside"),
        (SessionParams(id=sid, rid="a"), [1, 2, 3], "salt", "capacity_of_str_len 5"),
    ]
    for params, ids, salt, message in cases:
        with pytest.raises(SessionError, match=message) as info:
            store.prompt(params, ids, salt, "new")
        assert info.value.param == "session_params"
    with pytest.raises(SessionError, match="already has a request 'a'"):
        store.prompt(SessionParams(id=sid), [1], "salt", "a")
    # a replace refused (a rid used twice) forgot nothing and aborts nothing
    with pytest.raises(SessionError, match="already has a request 'a'"):
        store.prompt(SessionParams(id=sid, rid="a", replace=True), [1], "salt", "a")
    assert key("run") in store.running
    with pytest.raises(SessionError, match="already open") as info:
        store.open("s", 0, None)
    assert info.value.param == "session_id"
    store.open(None, 0, None)
    with pytest.raises(SessionError, match="--max-sessions"):
        store.open(None, 0, None)
    with pytest.raises(SessionError, match="no open session 's' for this"):
        store.close(sid, None)
    assert sorted(store.sessions[sid].requests) == ["a", "run"]
    store.drop(key("run"))  # a request that failed is forgotten
    assert sorted(store.sessions[sid].requests) == ["a"]


def test_a_session_remembers_a_bounded_number_of_requests():
    store = SessionStore()
    sid = store.open(None, 0, None)
    for i in range(MAX_SESSION_REQUESTS):
        run(store, f"r{i}", SessionParams(id=sid), [i + 1], [1])
    with pytest.raises(SessionError, match="replace=true"):
        store.prompt(SessionParams(id=sid), [1], None, "x")
    sp = store.prompt(SessionParams(id=sid, replace=True), [1], None, "new")
    store.start(key("new"), sp)
    assert list(store.sessions[sid].requests) == ["new"]


def test_close_returns_each_path_and_what_other_open_sessions_share():
    store = SessionStore()
    system = list(range(100, 140))
    one, two, other = (store.open(n, 0, None) for n in ("one", "two", "other"))
    run(store, "a", SessionParams(id=one), [*system, 1, 2], [3, 4])
    run(store, "b", SessionParams(id=one, rid="a"), [5], [6])
    run(store, "c", SessionParams(id=two), [*system, 7], [8])
    run(store, "d", SessionParams(id=other), [9, 9, 9], [9])
    closed = store.close(one, None)
    assert closed == [([*system, 1, 2, 3, 4, 5, 6], 40)]  # "a"'s path is inside "b"'s
    assert store.close(two, None) == [([*system, 7, 8], 0)]  # no one else shares it now
    with pytest.raises(SessionError, match="no open session"):
        store.prompt(SessionParams(id=one, rid="a"), [1], None, "x")


def test_closing_costs_a_bounded_amount_of_work(monkeypatch):
    """Past its budget of comparisons, close demotes nothing (each path shared whole)."""
    import radixkv.frontend.sessions as sessions

    store = SessionStore()
    for n in range(4):
        run(store, f"r{n}", SessionParams(id=store.open(f"s{n}", 0, None)), [1, 2, n], [3])
    assert store.close("s0", None) == [([1, 2, 0, 3], 2)]
    monkeypatch.setattr(sessions, "MAX_SHARED_WORK", 1)
    assert store.close("s1", None) == [([1, 2, 1, 3], 4)]


def test_sessions_idle_past_the_timeout_are_closed_unless_something_runs():
    now = [0.0]
    store = SessionStore(clock=lambda: now[0])
    idle, busy, fresh = (store.open(n, 0, None) for n in ("idle", "busy", "fresh"))
    run(store, "a", SessionParams(id=idle), [1, 2], [3])
    store.start(key("b"), store.prompt(SessionParams(id=busy), [4], None, "b"))  # runs on
    now[0] = 9.0
    run(store, "c", SessionParams(id=fresh), [5], [6])  # used at 9
    now[0] = 10.0
    assert store.expire(10.0) == [(None, [([1, 2, 3], 0)])]  # idle; busy runs; fresh is young
    assert sorted(store.sessions) == ["busy", "fresh"] and store.tokens == 1 + 2
    store.finish(key("b"), [7])
    now[0] = 30.0
    assert [salt for salt, _ in store.expire(10.0)] == [None, None]
    assert not store.sessions and store.tokens == 0


def test_common_prefix_len():
    for a, b in [([], [1]), ([1, 2, 3], [1, 2, 3]), ([1, 2, 3], [1, 2, 4]), ([5], [6])]:
        want = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        assert common_prefix_len(a, b) == want
    long = list(range(5000))
    assert common_prefix_len(long, [*long[:3333], -1]) == 3333


# ---- the cache: demote ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["lru", "lfu", "gdsf", "priority", "slru"])
def test_a_demoted_path_is_evicted_first_until_it_is_used_again(policy):
    pool = TokenToKVPool(KVLayout(1, 1, 1), 64)
    tree = RadixCache(pool, eviction_policy=policy)
    system = [1, 2, 3, 4]
    paths = [[*system, 10 + i, 20 + i] for i in range(3)]
    for ids in paths:
        tree.insert(ids, pool.alloc(len(ids)))
        pool.free(pool.alloc(0))
    tree.match_prefix([*paths[2], 0])  # the newest use: the one LRU keeps longest
    assert tree.demote(paths[2], len(system)) == 2  # past the shared system prompt
    tree.check_integrity()
    assert tree.evict(1) == 2 and tree.match_prefix([*paths[2], 0]).indices.numel() == 4
    # a match undoes a demotion: of two demoted leaves, the one matched since stays
    assert tree.demote(paths[1], len(system)) == tree.demote(paths[0], len(system)) == 2
    tree.match_prefix([*paths[1], 0])
    assert tree.peek_full(paths[1])[1].keep == 1
    assert tree.evict(1) == 2
    assert tree.match_prefix([*paths[0], 0]).indices.numel() == 4  # paths[0]'s tail went
    assert tree.match_prefix([*paths[1], 0]).indices.numel() == 6
    tree.check_integrity()


def test_a_node_another_path_goes_on_from_is_demoted_only_with_that_path():
    pool = TokenToKVPool(KVLayout(1, 1, 1), 64)
    tree = RadixCache(pool)
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8]
    for ids in (a, b):
        tree.insert(ids, pool.alloc(len(ids)))
    assert tree.demote(a) == 2  # [5, 6]; [1..4] is b's too
    assert tree.peek_full([1, 2, 3, 4])[1].keep == 1
    assert tree.demote(b) == 2 + 4  # now nothing keeps [1..4]
    tree.check_integrity()


def test_demote_marks_only_nodes_wholly_inside_the_path():
    pool = TokenToKVPool(KVLayout(1, 1, 1), 64)
    tree = RadixCache(pool)
    tree.insert([1, 2, 3, 4, 5, 6], pool.alloc(6))
    assert tree.demote([1, 2, 3]) == 0  # the node goes on past it: someone else's
    assert tree.demote([9, 9]) == 0
    assert tree.demote([1, 2, 3, 4, 5, 6, 7], shared_len=1) == 0  # starts inside the shared part
    assert tree.demote([1, 2, 3, 4, 5, 6, 7]) == 6
    tree.check_integrity()


# ---- through a runtime ------------------------------------------------------------------------

KEY = "s3cret-key"
FAKE = "fake_scheduler:run_fake_scheduler"


@pytest.fixture(scope="module")
def rt():
    with radixkv.Runtime(scheduler=FAKE, api_key=KEY, http_port=0, start_timeout=60) as rt:
        yield rt


def demoted(client: radixkv.Client, before: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := client.stats().demoted_tokens) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    return n - before


def test_sessions_over_the_client(rt):
    with radixkv.Client(rt.endpoint, api_key=KEY, timeout=20) as client:
        before = client.stats().demoted_tokens
        sid = client.open_session()
        first = client.generate_ids([10, 11, 12], max_new_tokens=2, session={"id": sid})
        assert first.token_ids == [10, 11] and first.rid
        second = client.generate_ids([13], max_new_tokens=3, session={"id": sid, "rid": first.rid})
        # the fake echoes its prompt: the prompt was the history, then the new token
        assert second.prompt_tokens == 6 and second.token_ids == [10, 11, 12]
        chained = client.stream([14], max_new_tokens=1, session={"id": sid, "rid": second.rid})
        assert list(chained)[-1].prompt_tokens == 10
        with pytest.raises(radixkv.RequestError, match="has no request 'nope'") as info:
            client.generate_ids([1], session={"id": sid, "rid": "nope"})
        assert info.value.param == "session_params"
        with pytest.raises(radixkv.RequestError, match="already open"):
            client.open_session(sid)
        assert client.close_session(sid) == sid
        assert demoted(client, before) > 0  # the scheduler was told
        with pytest.raises(radixkv.RequestError, match="no open session"):
            client.generate_ids([1], session={"id": sid, "rid": first.rid})
        with pytest.raises(radixkv.RequestError, match="as text or input_ids") as info:
            client.chat([{"role": "user", "content": "more"}],
                        session={"id": sid, "rid": first.rid})  # fmt: skip
        assert info.value.param == "messages"
        with pytest.raises(TypeError, match="bad session argument"):
            client.generate_ids([1], session={"idd": sid})
        # a session's requests keep the salt it was opened with
        salted = client.open_session("salted", cache_salt="mine")
        client.generate_ids([20, 21], max_new_tokens=1, session={"id": salted}, cache_salt="mine")
        with pytest.raises(radixkv.RequestError, match="for this cache_salt and API key"):
            client.generate_ids([20], session={"id": salted})
        client.close_session(salted, cache_salt="mine")


def test_sessions_over_http_as_sglang_clients_use_them(rt):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=rt.http_url, headers=headers, timeout=20) as http:
        sid = http.post("/open_session", json={"capacity_of_str_len": 1000}).json()
        assert isinstance(sid, str) and sid
        params = {"max_new_tokens": 2}
        r = http.post("/generate", json={"input_ids": [30, 31, 32], "sampling_params": params,
                                         "session_params": {"id": sid}})  # fmt: skip
        first = r.json()
        assert r.status_code == 200 and first["output_ids"] == [30, 31]
        body = {"input_ids": [33], "sampling_params": params,
                "session_params": {"id": sid, "rid": first["meta_info"]["id"]}}  # fmt: skip
        second = http.post("/generate", json=body).json()
        assert second["meta_info"]["prompt_tokens"] == 6 and second["output_ids"] == [30, 31]
        stream = http.post("/generate", json={**body, "stream": True, "rid": "mine"})
        assert stream.status_code == 200 and '"id":"mine"' in stream.text
        # a request named by the client is continued by that name
        mine = {**body, "session_params": {"id": sid, "rid": "mine"}}
        assert http.post("/generate", json=mine).json()["meta_info"]["prompt_tokens"] == 9
        bad = http.post("/generate", json={**body, "session_params": {"id": "nope"}})
        assert bad.status_code == 400 and "no open session" in bad.text

        def gauge(name: str) -> float:
            text = http.get("/metrics").text
            return float(
                next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[1]
            )

        opened, tokens = gauge("radixkv_open_sessions"), gauge("radixkv_session_tokens")
        assert opened >= 1 and tokens >= 3 + 2 + 1 + 2  # this session's inputs and outputs
        assert http.post("/close_session", json={"session_id": sid}).status_code == 200
        assert gauge("radixkv_open_sessions") == opened - 1
        metrics = http.get("/metrics").text
        demoted = [line for line in metrics.splitlines()
                   if line.startswith("radixkv_demoted_tokens_total ")]  # fmt: skip
        assert len(demoted) == 1 and float(demoted[0].split()[1]) > 0
        assert "radixkv_open_sessions " in metrics and "radixkv_session_tokens " in metrics
        again = http.post("/close_session", json={"session_id": sid})
        assert again.status_code == 400 and "no open session" in again.text
        bad_body = http.post("/open_session", json={"capacity_of_str_len": -1})
        assert bad_body.status_code == 400


def test_a_request_id_in_flight_cannot_be_taken_by_another_caller(rt):
    """The HTTP gateway serves every caller through one client: a caller's `rid` that is in
    flight already is refused, never handed the other request's replies."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=rt.http_url, headers=headers, timeout=20) as http:
        body = {"input_ids": [50, 51], "sampling_params": {"max_new_tokens": 300}, "rid": "dup",
                "stream": True}  # fmt: skip
        with http.stream("POST", "/generate", json=body) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # it is running
            second = http.post("/generate", json={**body, "stream": False})
            assert second.status_code == 400 and "already in flight" in second.text
            assert second.json()["error"]["param"] == "rid"
            last = [line for line in lines if line.startswith("data: {")][-1]
        assert '"completion_tokens":300' in last


def test_a_session_request_the_scheduler_lost_is_forgotten():
    """A request that failed with its scheduler (restarted) is gone from its session: asking to
    continue it says so, rather than that it is still running."""
    crash = (7, 7, 7, 7)
    with radixkv.Runtime(scheduler=FAKE, scheduler_kwargs={"crash_on": crash}, api_key=KEY,
                         start_timeout=60) as rt:  # fmt: skip
        client = rt.new_client(timeout=30)
        sid = client.open_session()
        with pytest.raises(radixkv.RequestError, match="scheduler process died"):
            client.complete(list(crash), session={"id": sid}, rid="lost")
        deadline = time.monotonic() + 30
        while True:  # until the new scheduler serves
            try:
                client.generate_ids([1, 3], max_new_tokens=1)
                break
            except radixkv.RequestError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        with pytest.raises(radixkv.RequestError, match="has no request 'lost'"):
            client.generate_ids([1], session={"id": sid, "rid": "lost"})
        client.close()


def test_a_session_left_open_is_closed_after_the_timeout_and_its_paths_demoted():
    with radixkv.Runtime(scheduler=FAKE, session_timeout=0.5, start_timeout=60) as rt:
        client = rt.client
        sid = client.open_session()
        first = client.generate_ids([60, 61, 62], max_new_tokens=2, session={"id": sid})
        deadline = time.monotonic() + 10
        while client.stats().demoted_tokens == 0:  # closed by the runtime, not by us
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(radixkv.RequestError, match="no open session"):
            client.generate_ids([1], session={"id": sid, "rid": first.rid})
