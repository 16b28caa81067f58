"""The router: its prefix trees, its policies, cache events from the radix cache, and data-parallel
workers behind it (fake schedulers: fast; the real model: tests/test_router_model.py)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import httpx2 as httpx
import psutil
import pytest
import torch

import radixkv
from radixkv.config import ServerArgs
from radixkv.mem import KVLayout, RadixCache, TokenToKVPool
from radixkv.protocol import tree_key
from radixkv.router.policy import CacheAware, Candidate, LeastLoad, PrefixHash, RoundRobin
from radixkv.router.tree import PrefixTree

FAKE = "fake_scheduler:run_fake_scheduler"


# ---- the prefix tree, against a set of every prefix held -----------------------------------------


class HeldPrefixes:
    """The reference: the set of every prefix the tree holds."""

    def __init__(self) -> None:
        self.held: set[tuple[int, ...]] = set()

    def insert(self, tokens: list[int]) -> None:
        self.held.update(tuple(tokens[:n]) for n in range(1, len(tokens) + 1))

    def remove(self, tokens: list[int], keep: int) -> None:
        if keep < len(tokens):
            head = tuple(tokens[: keep + 1])
            self.held = {p for p in self.held if p[: keep + 1] != head}

    def match(self, tokens: list[int]) -> int:
        return max((n for n in range(1, len(tokens) + 1) if tuple(tokens[:n]) in self.held),
                   default=0)  # fmt: skip


def test_prefix_tree_matches_a_set_of_held_prefixes():
    rng = random.Random(0)
    tree, ref = PrefixTree(), HeldPrefixes()
    paths: list[list[int]] = []
    for _ in range(600):
        if paths and rng.random() < 0.5:  # extend or branch off an old path: shared prefixes
            base = rng.choice(paths)
            tokens = base[: rng.randrange(len(base) + 1)] + [rng.randrange(4) for _ in range(3)]
        else:
            tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 8))]
        op = rng.random()
        if op < 0.6:
            tree.insert(tokens)
            ref.insert(tokens)
            paths.append(tokens)
        elif op < 0.85 and paths:
            victim = rng.choice(paths)
            keep = rng.randrange(len(victim))
            tree.remove(victim, keep)
            ref.remove(victim, keep)
        assert tree.match(tokens) == ref.match(tokens)
        assert tree.size == len(ref.held)
    tree.clear()
    assert tree.size == 0 and tree.match(paths[0]) == 0


def test_prefix_tree_without_events_forgets_the_least_recently_routed():
    tree = PrefixTree(max_tokens=100)
    for g in range(5):
        tree.insert([g] * 40)  # 5 x 40 tokens into a tree of 100
        tree.insert([0] * 40)  # group 0 kept in use
    assert tree.size <= 100
    assert tree.match([0] * 40) == 40  # the hot one stays
    assert tree.match([1] * 40) == 0  # the oldest went first
    assert tree.match([4] * 40) == 40


# ---- policies ------------------------------------------------------------------------------------


def workers(
    loads: list[int],
    prefixes: list[list[list[int]]] | None = None,
    in_flight: list[list[list[int]]] | None = None,
) -> list[Candidate]:
    out = []
    for i, load in enumerate(loads):
        tree = PrefixTree()
        for p in (prefixes or [[]] * len(loads))[i]:
            tree.insert(p)
        keys = (in_flight or [[]] * len(loads))[i]
        out.append(Candidate(i, f"w{i}", load, tree, lambda keys=keys: keys))
    return out


def test_round_robin_cycles_and_skips_workers_out_of_the_rotation():
    rr = RoundRobin()
    ws = workers([0, 0, 0])
    assert [rr.choose([1], ws)[0].index for _ in range(4)] == [0, 1, 2, 0]
    up = [ws[0], ws[2]]  # worker 1 left
    assert [rr.choose([1], up)[0].index for _ in range(3)] == [2, 0, 2]


def test_least_load():
    assert LeastLoad().choose([1], workers([3, 1, 2]))[0].index == 1


def test_prefix_hash_is_sticky_and_moves_only_the_leaving_workers_share():
    ph = PrefixHash(tokens=4)
    ws = workers([0, 0, 0])
    keys = [[g, g + 1, g + 2, g + 3, 99] for g in range(300)]
    before = {tuple(k): ph.choose(k, ws)[0].index for k in keys}
    assert len(set(before.values())) == 3  # all three used
    assert all(ph.choose([*k[:4], 7], ws)[0].index == before[tuple(k)] for k in keys)  # sticky
    after = {tuple(k): ph.choose(k, [ws[0], ws[2]])[0].index for k in keys}
    moved = [k for k in before if before[k] != after[k]]
    assert moved and all(before[k] == 1 for k in moved)


def test_cache_aware_follows_the_prefix_and_spreads_only_hot_prefixes():
    def policy():
        return CacheAware(cache_threshold=0.3, abs_threshold=4, rel_threshold=1.5)

    prompt = [1] * 80 + [2] * 20
    owner = [[[1] * 80], []]  # worker 0 holds 80 % of the prompt
    assert policy().choose(prompt, workers([3, 0], owner))[0].index == 0  # balanced enough
    # imbalanced, but the prefix is cold there (one other request shares it): it stays
    cold = [[[1] * 80 + [3]] + [[9]] * 7, []]
    assert policy().choose(prompt, workers([8, 1], owner, cold))[0].index == 0
    # hot there (3 in flight share it): spread to the other worker
    hot = [[[1] * 80 + [i] for i in range(3)] + [[9]] * 5, []]
    pick, reason = policy().choose(prompt, workers([8, 1], owner, hot))
    assert pick.index == 1 and "share this prefix" in reason
    # a passing burst does not move the moving average far; a lasting one does
    steady = policy()
    for _ in range(20):
        assert steady.choose(prompt, workers([4, 4], owner, hot))[0].index == 0
    assert steady.choose(prompt, workers([9, 1], owner, hot))[0].index == 0
    for _ in range(20):
        pick, _ = steady.choose(prompt, workers([9, 1], owner, hot))
    assert pick.index == 1
    # no cached prefix: the smallest tree, or the least loaded when imbalanced
    small = [[[1] * 10], [[5] * 300]]
    assert policy().choose(prompt, workers([0, 0], small))[0].index == 0
    assert policy().choose(prompt, workers([9, 1], small))[0].index == 1
    # equal matches: the less loaded
    assert policy().choose(prompt, workers([2, 1], [[[1] * 80], [[1] * 80]]))[0].index == 1


# ---- cache events: a router tree fed by a radix cache's events mirrors it ------------------------


def test_radix_cache_events_rebuild_its_tree():
    pool = TokenToKVPool(KVLayout(num_layers=1, kv_heads=1, head_dim=2), 200)
    cache = RadixCache(pool)
    cache.record_events()
    mirror = PrefixTree()
    rng = random.Random(1)
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(2, 30))] for _ in range(300)]
    salted = tree_key([5, 6, 7], "tenant")
    for tokens in [*prompts, salted]:
        need = len(tokens)
        if pool.available_size() < need:
            cache.evict(need - pool.available_size())
        slots = pool.alloc(need)
        if slots is None:
            continue
        present = cache.insert(tokens, slots)
        pool.free(slots[:present])
        for event in cache.take_events():
            if event.kind == "stored":
                mirror.insert(event.tokens)
            elif event.kind == "removed":
                mirror.remove(event.tokens, event.keep)
        for probe in [*prompts[:50], salted]:
            assert mirror.match(probe) == len(cache.match_full(probe).indices)
    assert cache.evicted_tokens > 0  # evictions were exercised
    assert salted[0] < 0  # a salted key is negative: never equal to a token id
    cache.reset()
    assert [e.kind for e in cache.take_events()] == ["cleared"]
    assert torch.equal(cache.cached_slots(), torch.empty(0, dtype=torch.int64))


# ---- data-parallel workers behind the router (fake schedulers) -----------------------------------


@pytest.fixture(scope="module")
def dp():
    with radixkv.Runtime(dp=2, scheduler=FAKE, http_port=0, router_policy="cache_aware",
                         start_timeout=60, client_timeout=30) as rt:  # fmt: skip
        yield rt


@pytest.fixture(scope="module")
def single():
    with radixkv.Runtime(scheduler=FAKE, start_timeout=60, client_timeout=30) as rt:
        yield rt


def test_router_serves_like_one_runtime(dp, single):
    def session(client):
        return (
            client.generate("abc", max_new_tokens=4).text,
            [c if isinstance(c, str) else c.text for c in client.stream("xyz", max_new_tokens=3)],
            client.chat([{"role": "user", "content": "hi"}], max_new_tokens=5).token_ids,
            client.generate_ids([5, 6, 7], max_new_tokens=2).token_ids,
            client.tokenize("hello world"),
            client.detokenize([28120, 905]),
        )

    assert session(dp.client) == session(single.client)
    assert session(dp.client)[3] == [5, 6]
    assert dp.ready_info.kv_capacity == 2 * single.ready_info.kv_capacity


def test_bad_input_is_refused_by_the_router_exactly_as_by_one_runtime(dp, single):
    bad = [
        ("generate", "", dict(max_new_tokens=4)),
        ("generate", "hi", dict(temperature=-1.0)),
        ("generate", "hi", dict(top_p=0.0)),
        ("generate_ids", [10**9], dict(max_new_tokens=2)),
        ("generate", "hi", dict(max_new_tokens=10**6)),
        ("chat", [{"role": "nobody", "content": "x"}], {}),
    ]
    for method, prompt, kwargs in bad:
        errors = []
        for client in (dp.client, single.client):
            with pytest.raises(radixkv.RequestError) as err:
                getattr(client, method)(prompt, **kwargs)
            errors.append((err.value.code, err.value.param, str(err.value).split(" (")[0]))
        assert errors[0] == errors[1], kwargs


def test_sessions_through_the_router(dp):
    """The router keeps the sessions (it sees every result); a closed session's paths are
    demoted on every worker."""
    before = dp.client.stats().demoted_tokens
    sid = dp.client.open_session()
    first = dp.client.generate_ids([40, 41, 42], max_new_tokens=2, session={"id": sid})
    second = dp.client.generate_ids([43], max_new_tokens=2, session={"id": sid, "rid": first.rid})
    assert second.prompt_tokens == 6 and second.token_ids == [40, 41]
    dp.client.close_session(sid)
    deadline = time.monotonic() + 5
    while dp.client.stats().demoted_tokens == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dp.client.stats().demoted_tokens > before


def test_stats_add_up_across_workers_with_each_workers_own(dp):
    before = dp.client.stats()
    for i in range(6):
        dp.client.generate_ids([20 + i, 21, 22, 23], max_new_tokens=2)
    stats = dp.client.stats()
    assert stats.requests - before.requests == 6
    assert len(stats.workers) == 2 and all(w.alive for w in stats.workers)
    assert sum(w.stats.requests for w in stats.workers) == stats.requests
    assert sum(w.routed for w in stats.workers) >= 6
    dp.client.flush_cache()


def test_http_and_metrics_through_the_router(dp):
    with httpx.Client(base_url=dp.http_url, timeout=30) as http:
        r = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "hey",
                                               "max_tokens": 3})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "heyheyhey"
        metrics = http.get("/metrics").text
        assert 'radixkv_worker_up{worker="tcp://127.0.0.1:' in metrics
        assert "radixkv_worker_routed_requests" in metrics


def worker_runtimes(router_pid: int) -> list[psutil.Process]:
    """The router's worker runtime processes (its children running a runtime)."""
    return [p for p in psutil.Process(router_pid).children()
            if "_child_main" in " ".join(p.cmdline())]  # fmt: skip


def test_a_dead_worker_fails_its_requests_and_is_restarted():
    with radixkv.Runtime(dp=2, scheduler=FAKE, router_policy="round_robin",
                         scheduler_kwargs={"step_delay": 0.02}, start_timeout=60,
                         client_timeout=30) as rt:  # fmt: skip
        client = rt.client
        streams = [client.stream([30 + i] * 4, max_new_tokens=400) for i in range(4)]
        for s in streams:  # each has started (tokens flowing) on its worker
            next(iter(s))
        victim = worker_runtimes(rt.process.pid)[0]
        victim.kill()
        failed, finished = 0, 0
        for s in streams:
            try:
                list(s)
                finished += 1
            except radixkv.RequestError as exc:
                assert exc.code == "unavailable" and "left the rotation" in str(exc)
                failed += 1
        assert failed == 2 and finished == 2  # round robin: two on each worker
        for i in range(4):  # the survivor serves everything meanwhile
            assert client.generate_ids([40 + i, 1], max_new_tokens=2).token_ids == [40 + i, 1]
        deadline = time.monotonic() + 60
        while not all(w.alive for w in client.stats().workers):
            assert time.monotonic() < deadline, "the dead worker was not restarted"
            time.sleep(0.2)
        assert len(worker_runtimes(rt.process.pid)) == 2


def test_router_in_front_of_runtimes_started_elsewhere_rejoins_a_worker_that_comes_back():
    from radixkv.router.server import RouterServer
    from radixkv.router.workers import StaticWorkers

    a = radixkv.Runtime(scheduler=FAKE, api_key="wk", start_timeout=60)
    b = radixkv.Runtime(scheduler=FAKE, api_key="wk", start_timeout=60)
    port = int(a.endpoint.rpartition(":")[2])
    server = RouterServer(ServerArgs(router_policy="least_load", worker_timeout=5),
                          StaticWorkers([a.endpoint, b.endpoint], "wk"))  # fmt: skip
    server.start(30)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with radixkv.Client(server.endpoint, timeout=30) as client:
            assert client.generate_ids([8, 9], max_new_tokens=2).token_ids == [8, 9]
            a.shutdown()
            deadline = time.monotonic() + 30
            while client.stats().workers[0].alive:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert client.generate_ids([9, 8], max_new_tokens=2).token_ids == [9, 8]
            a = radixkv.Runtime(scheduler=FAKE, api_key="wk", port=port, start_timeout=60)
            while not client.stats().workers[0].alive:
                assert time.monotonic() < deadline, "the worker did not rejoin"
                time.sleep(0.1)
            routed = [w.routed for w in client.stats().workers]
            for _ in range(4):
                client.generate("zz", max_new_tokens=1)
            assert client.stats().workers[0].routed > routed[0]  # in the rotation again
    finally:
        server.stop()
        thread.join(10)
        server.close()
        a.shutdown()
        b.shutdown()


def test_local_workers_get_a_gpu_each():
    from radixkv.router.workers import worker_device

    assert [worker_device("cuda", i) for i in range(2)] == ["cuda:0", "cuda:1"]
    assert worker_device("cpu", 1) == "cpu" and worker_device("cuda:3", 1) == "cuda:3"


def test_launch_flags_of_the_router():
    from radixkv.tools.cli import build_parser
    from radixkv.tools.flags import server_args

    ns = build_parser().parse_args(["launch", "--dp", "2", "--no-router-cache-events", "--ray"])
    args = server_args(ns)
    assert (args.dp, args.router_cache_events, args.ray_address) == (2, False, "auto")
    ns = build_parser().parse_args(["router", "--worker", "tcp://h:1", "--worker", "tcp://h:2",
                                    "--router-policy", "prefix_hash"])  # fmt: skip
    assert (
        ns.worker == ["tcp://h:1", "tcp://h:2"] and server_args(ns).router_policy == "prefix_hash"
    )
    with pytest.raises(ValueError, match="dp must be"):
        ServerArgs(dp=0)


# ---- Ray -----------------------------------------------------------------------------------------


def test_workers_as_ray_actors_on_a_local_ray_instance(monkeypatch):
    pytest.importorskip("ray")
    tests = str(Path(__file__).parent)  # Ray's worker processes import the fake scheduler too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    with radixkv.Runtime(dp=2, ray_address="local", scheduler=FAKE, router_policy="round_robin",
                         start_timeout=180, client_timeout=30) as rt:  # fmt: skip
        client = rt.client
        for i in range(4):
            assert client.generate_ids([50 + i, 2], max_new_tokens=2).token_ids == [50 + i, 2]
        stats = client.stats()
        assert [w.routed for w in stats.workers] == [2, 2]
        # the runtime inside one actor dies: the router drops it, the actor starts a new one
        actors = [p for p in psutil.process_iter(["cmdline"])
                  if "_child_main" in " ".join(p.info["cmdline"] or [])
                  and "WorkerActor" in " ".join(p.parent().cmdline())]  # fmt: skip
        assert len(actors) == 2
        actors[0].kill()
        deadline = time.monotonic() + 120
        while all(w.alive for w in client.stats().workers):  # noticed
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while not all(w.alive for w in client.stats().workers):  # and back
            assert time.monotonic() < deadline, "the Ray worker was not restarted"
            time.sleep(0.2)
        assert client.generate_ids([60, 2], max_new_tokens=2).token_ids == [60, 2]


def test_options_a_role_would_ignore_are_refused_by_name():
    from radixkv.config import refuse_unused

    with pytest.raises(ValueError, match="--router-policy applies to a router only"):
        refuse_unused(ServerArgs(router_policy="random"), "runtime")
    with pytest.raises(ValueError, match="--ray-address applies to a router only"):
        refuse_unused(ServerArgs(ray_address="auto"), "runtime")
    with pytest.raises(ValueError, match="--max-total-tokens applies to the runtimes behind"):
        refuse_unused(ServerArgs(max_total_tokens=1000), "remote")
    with pytest.raises(ValueError, match="--cache-events-port is set by the router"):
        refuse_unused(ServerArgs(dp=2, cache_events_port=0), "local")
    with pytest.raises(ValueError, match="--ray-worker-cpus"):
        refuse_unused(ServerArgs(dp=2, ray_worker_cpus=4), "local")
    refuse_unused(ServerArgs(dp=2, ray_address="auto", ray_worker_cpus=4), "ray")  # honoured
    refuse_unused(ServerArgs(router_policy="random", http_port=0), "remote")
    with pytest.raises(ValueError, match="--disable-radix-cache"):
        ServerArgs(disable_radix_cache=True, kv_host_tier=2**20)
    with pytest.raises(ValueError, match="--kv-host-tier-dtype"):
        ServerArgs(kv_host_tier_dtype="int8")  # a tier's dtype without a tier
    ServerArgs(kv_host_tier=2**20, kv_host_tier_dtype="int8")
    # Runtime: the child's refusal reaches the caller, naming the option
    with pytest.raises(radixkv.RuntimeStartError, match="--router-policy"):
        radixkv.Runtime(scheduler=FAKE, router_policy="random", start_timeout=30)
