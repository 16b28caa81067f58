"""Start-up failures, scheduler death, Ctrl-C and shutdown of the runtime (fake scheduler):
errors must be prompt and clear, and nothing may be left behind (processes, ipc socket files)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import radixkv
from radixkv.config import ServerArgs, parse_size
from radixkv.tools.cli import build_parser
from radixkv.tools.flags import server_args

FAKE = "fake_scheduler:run_fake_scheduler"
CRASH = [0, 0, 0]


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """Child processes put their ipc directory here, so the test can check it is removed."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def leftovers(tmp: Path) -> list[Path]:
    return [p for p in tmp.iterdir() if p.name.startswith("radixkv-")]


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def assert_all_gone(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        assert time.monotonic() < deadline, f"still running: {alive}"
        time.sleep(0.05)


def test_bad_options_fail_before_any_process():
    with pytest.raises(TypeError, match=r"unknown Runtime option\(s\) max_total_tokenz"):
        radixkv.Runtime(scheduler=FAKE, max_total_tokenz=5)
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        radixkv.Runtime(scheduler=FAKE, page_size=0)
    with pytest.raises(ValueError, match="listens beyond this machine without an API key"):
        radixkv.Runtime(scheduler=FAKE, host="0.0.0.0")
    for ok in ({"api_key": "k"}, {"allow_no_api_key": True}):
        assert ServerArgs(host="0.0.0.0", **ok).host == "0.0.0.0"
    assert ServerArgs(host="127.0.0.2").host == "127.0.0.2" and ServerArgs(host="::1")
    assert ServerArgs(api_key=" a, b ,,c").api_keys == ("a", "b", "c")
    with pytest.raises(ValueError, match="isolate_cache_per_key needs API keys"):
        ServerArgs(isolate_cache_per_key=True)
    for bad, message in (
        ({"json_max_whitespace": -2}, "json_max_whitespace must be -1"),
        ({"max_scheduler_restarts": -1}, "max_scheduler_restarts must be >= 0"),
        ({"drain_timeout": -1.0}, "drain_timeout must be >= 0"),
        ({"stream_stall_timeout": 0.0}, "stream_stall_timeout must be > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            ServerArgs(**bad)


def test_fatal_scheduler_start_is_reported(tmpdir_env):
    t = time.monotonic()
    with pytest.raises(radixkv.RuntimeStartError, match="the model file is corrupt"):
        radixkv.Runtime(scheduler=FAKE, scheduler_kwargs={"mode": "fatal"}, start_timeout=60)
    assert time.monotonic() - t < 30
    assert leftovers(tmpdir_env) == []


def test_start_timeout_is_reported(tmpdir_env):
    with pytest.raises(radixkv.RuntimeStartError, match="did not become ready within 2 s"):
        radixkv.Runtime(scheduler=FAKE, scheduler_kwargs={"mode": "silent"}, start_timeout=2)
    assert leftovers(tmpdir_env) == []


def test_port_in_use_is_reported(tmpdir_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            radixkv.RuntimeStartError, match=f"cannot listen on tcp://127.0.0.1:{port}"
        ):
            radixkv.Runtime(scheduler=FAKE, port=port, start_timeout=30)
    assert leftovers(tmpdir_env) == []


def test_scheduler_death_fails_what_it_ran_then_it_is_restarted(tmpdir_env):
    rt = radixkv.Runtime(scheduler=FAKE, scheduler_kwargs={"crash_on": CRASH}, start_timeout=60,
                         max_scheduler_restarts=1)  # fmt: skip
    procs = [psutil.Process(rt.process.pid), *descendants(rt.process.pid)]
    try:
        assert len(leftovers(tmpdir_env)) == 1  # the private ipc directory exists while running
        assert oct(leftovers(tmpdir_env)[0].stat().st_mode & 0o777) == "0o700"
        stream = rt.client.stream("pending stream", max_new_tokens=3000)
        assert isinstance(next(stream), str)
        other = rt.new_client(timeout=30)
        errors: list[BaseException] = []

        def wait_in_thread() -> None:
            try:
                other.generate("pending call", max_new_tokens=3000)
            except BaseException as exc:
                errors.append(exc)

        waiter = threading.Thread(target=wait_in_thread)
        waiter.start()
        time.sleep(0.2)
        t = time.monotonic()
        with pytest.raises(radixkv.RequestError, match="scheduler process died") as err:
            rt.client.generate_ids(CRASH, max_new_tokens=5)
        assert err.value.code == "internal" and "exit code 3" in str(err.value)
        assert time.monotonic() - t < 5
        with pytest.raises(radixkv.RequestError, match="scheduler process died"):
            list(stream)
        waiter.join(10)
        assert len(errors) == 1 and "the request was lost" in str(errors[0])
        # a new scheduler serves what arrives meanwhile and after; the old one left nothing
        assert rt.client.generate("later", max_new_tokens=1).text == "later"
        assert rt.client.stats().running == 0 and len(leftovers(tmpdir_env)) == 1
        assert len(descendants(rt.process.pid)) == len(procs) - 1
        # the second death exceeds max_scheduler_restarts=1: the runtime exits with status 3
        with pytest.raises(radixkv.RequestError, match="restarted 1 times already"):
            rt.client.generate_ids(CRASH, max_new_tokens=5)
        assert rt.process.wait(10) == 3
        with pytest.raises(radixkv.ConnectionLost):
            rt.new_client(timeout=5, connect_timeout=1).generate("gone", max_new_tokens=1)
        other.close()
    finally:
        rt.shutdown()
    assert_all_gone(procs)
    assert leftovers(tmpdir_env) == []


def test_on_scheduler_death_exit(tmpdir_env):
    rt = radixkv.Runtime(scheduler=FAKE, scheduler_kwargs={"crash_on": CRASH}, start_timeout=60,
                         on_scheduler_death="exit")  # fmt: skip
    try:
        with pytest.raises(radixkv.RequestError, match="the runtime exits"):
            rt.client.generate_ids(CRASH, max_new_tokens=5)
        assert rt.process.wait(10) == 3
    finally:
        rt.shutdown()
    assert leftovers(tmpdir_env) == []


def test_cli_parses_launch_options():
    ns = build_parser().parse_args(
        ["launch", "--model", "m.gguf", "--port", "7000", "--kv-memory", "1.5GiB", "--page-size",
         "16", "--schedule-policy", "dfs-weight", "--disable-radix-cache", "--api-key", "k"]
    )  # fmt: skip
    args = server_args(ns)
    assert (args.model, args.port, args.page_size, args.api_key) == ("m.gguf", 7000, 16, "k")
    assert args.kv_memory == int(1.5 * 2**30) and args.disable_radix_cache
    assert args.effective_policy == "fcfs"
    assert parse_size("256MiB") == 256 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch", "--kv-memory", "1G", "--max-total-tokens", "5"])


def serve_in_foreground(args: str = "") -> tuple[subprocess.Popen[str], str]:
    """`radixkv launch` with the fake scheduler, in its own process group; and its endpoint."""
    code = (
        "import sys; from radixkv.launcher import serve; "
        "from radixkv.config import ServerArgs; "
        f"sys.exit(serve(ServerArgs(api_key='k', {args}), 60, scheduler={FAKE!r}))"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("radixkv ready: endpoint tcp://127.0.0.1:"), proc.stderr.read()
    return proc, line.split()[3]


def test_cli_serves_in_the_foreground_and_stops_on_ctrl_c(tmpdir_env):
    proc, endpoint = serve_in_foreground()
    try:
        children = descendants(proc.pid)
        with radixkv.Client(endpoint, api_key="k", timeout=10) as client:
            assert client.generate("cli", max_new_tokens=2).text == "clicli"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal hits the whole group
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "KV cache 8192 tokens" in stderr and "Traceback" not in stderr
    assert_all_gone(children)
    assert leftovers(tmpdir_env) == []


def test_sigterm_drains(tmpdir_env):
    """SIGTERM: requests in flight finish (within drain_timeout), new ones are refused, the rest
    is aborted with a clear error when the time is up, and the process exits 0."""
    proc, endpoint = serve_in_foreground("drain_timeout=2.0")
    try:
        with (
            radixkv.Client(endpoint, api_key="k", timeout=20) as short,
            radixkv.Client(endpoint, api_key="k", timeout=20) as long,
        ):
            finishing = short.stream("finishing ", max_new_tokens=150)  # ~0.6 s at 4 ms a token
            cut = long.stream("cut ", max_new_tokens=3000)  # ~12 s: longer than the drain
            assert isinstance(next(finishing), str) and isinstance(next(cut), str)
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with radixkv.Client(endpoint, api_key="k", timeout=20) as late:
                with pytest.raises(radixkv.RequestError, match="shutting down") as err:
                    late.generate("late", max_new_tokens=1)
                assert err.value.code == "unavailable"
            list(finishing)
            assert finishing.result is not None and finishing.result.completion_tokens == 150
            with pytest.raises(radixkv.RequestError, match="shutting down"):
                list(cut)
            assert 1.5 < time.monotonic() - t < 6
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftovers(tmpdir_env) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_clients_fail_fast_when_nothing_listens():
    """The connect timeout, not the request timeout (600 s), bounds a call to a dead endpoint."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with radixkv.Client(endpoint, connect_timeout=0.5) as client:
        t = time.monotonic()
        with pytest.raises(radixkv.ConnectionLost, match="could not be made"):
            client.generate("hello", max_new_tokens=1)
        with pytest.raises(radixkv.ConnectionLost, match="could not be made"):
            client.stats()
        assert time.monotonic() - t < 5

    async def async_calls() -> None:
        async with radixkv.AsyncClient(endpoint, connect_timeout=0.5) as client:
            with pytest.raises(radixkv.ConnectionLost, match="could not be made"):
                await client.generate("hello", max_new_tokens=1)

    t = time.monotonic()
    asyncio.run(async_calls())
    assert time.monotonic() - t < 5


def test_a_slow_connection_is_not_a_dead_one(tmpdir_env):
    """A call made before the runtime listens waits for it, within the connect timeout."""
    port = free_port()
    with radixkv.Client(f"tcp://127.0.0.1:{port}", connect_timeout=30) as client:
        result: list[str] = []
        caller = threading.Thread(
            target=lambda: result.append(client.generate("early", max_new_tokens=1).text)
        )
        caller.start()
        time.sleep(0.5)
        with radixkv.Runtime(scheduler=FAKE, port=port, start_timeout=60):
            caller.join(30)
    assert result == ["early"]


def test_what_kill_9_leaves_behind_is_cleaned_at_the_next_start(tmpdir_env):
    killed = radixkv.Runtime(scheduler=FAKE, start_timeout=60)
    procs = [psutil.Process(killed.process.pid), *descendants(killed.process.pid)]
    os.kill(killed.process.pid, signal.SIGKILL)
    killed.process.wait()
    assert_all_gone(procs)  # its scheduler notices the parent is gone and exits
    (stale,) = leftovers(tmpdir_env)
    unowned = tmpdir_env / "radixkv-not-an-ipc-dir"
    unowned.mkdir()  # no owner file: not ours to judge, left alone
    with radixkv.Runtime(scheduler=FAKE, start_timeout=60) as rt:
        assert rt.client.generate("hi", max_new_tokens=1).text
        assert not stale.exists() and unowned.exists() and len(leftovers(tmpdir_env)) == 2
    killed.shutdown()
    assert leftovers(tmpdir_env) == [unowned]
