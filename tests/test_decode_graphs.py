"""Decode steps replayed from captured graphs (`radixkv/model/decode_graphs.py`).

Without a GPU the graphs run in their eager stand-in: the same static buffers, buckets and padding,
with the Triton kernels under the interpreter. With `TRITON_INTERPRET=0` and a CUDA device (as
bench/gpu_check.sh runs it) the same tests capture and replay real CUDA graphs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

from radixkv.config import ServerArgs
from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.token_to_kv_pool import TokenToKVPool
from radixkv.model.decode_graphs import DecodeGraphs, graph_batch_sizes
from radixkv.model.llama import LlamaForCausalLM
from radixkv.model.model_runner import ModelRunner, kv_layout
from radixkv.protocol import SamplingParams
from radixkv.testing import PoolDriver

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
MODE = "eager" if INTERPRET else "cuda"
CONTEXT = 128  # request rows' width: the graphs' decode splits are chosen for it


@pytest.fixture
def model(tiny_llama) -> LlamaForCausalLM:
    """A random Llama of 2 layers, 4 heads over 2 KV heads of 64."""
    return tiny_llama(DEVICE)


def make_runner(model: LlamaForCausalLM) -> ModelRunner:
    layout = kv_layout(model.config, None, model.dtype)
    token_pool = TokenToKVPool(layout, 512, device=DEVICE)
    req_pool = ReqToTokenPool(10, CONTEXT, device=DEVICE)
    return ModelRunner(model, token_pool, req_pool, "triton")


def test_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError, match="max_bs must be >= 1"):
        graph_batch_sizes(0)


def test_replayed_decode_equals_launched_decode(model: LlamaForCausalLM) -> None:
    """Batches across buckets and shrinking within one (7 then 5 of 8: the padding must replace
    the real slots the larger batch left in the buffers): the same tokens and
    logits as decoding without graphs, the same K/V in every real slot, and extend batches and
    batches over `max_bs` computed without graphs."""
    plain, graphed = make_runner(model), make_runner(model)
    graphs = graphed.capture_decode_graphs(8, MODE)
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 30, 4, 17, 1, 22, 11)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    # per step: which requests decode (indices into prompts)
    schedule = [range(7), range(3), [0, 4], range(7), range(5)]
    results = []
    for runner in (plain, graphed):
        driver = PoolDriver(runner)
        reqs = [driver.add(p, params) for p in prompts]
        driver.step(reqs, decode=False)
        logits = [driver.step([reqs[i] for i in step], decode=True).clone() for step in schedule]
        results.append(([r.output for r in reqs], logits, runner.token_pool))
    (tokens, logits, pool), (g_tokens, g_logits, g_pool) = results
    assert g_tokens == tokens
    for ours, ref in zip(g_logits, logits, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert graphs.replays == len(schedule)
    # the last step ran 5 in the graph of 8 after 7 had: entries 5..7 are padding again
    assert graphs.out_cache_loc[5:].tolist() == [0, 0, 0]  # the padding slot
    assert graphs.req_rows[5:].tolist() == [0, 0, 0]  # the padding row
    assert graphs.seq_lens[5:].tolist() == [1, 1, 1]
    real = slice(pool.page_size, None)  # past the padding page
    for layer in range(model.config.num_layers):
        for ours_buf, ref_buf in zip(g_pool.get_kv_buffer(layer), pool.get_kv_buffer(layer),
                                     strict=True):  # fmt: skip
            torch.testing.assert_close(ours_buf[real].float(), ref_buf[real].float())

    # more requests than the largest graph: launched as usual, and still right
    runner = make_runner(model)
    graphs = runner.capture_decode_graphs(2, MODE)
    driver = PoolDriver(runner)
    reqs = [driver.add(p, params) for p in prompts[:3]]
    driver.step(reqs, decode=False)
    driver.step(reqs, decode=True)
    assert graphs.replays == 0
    assert [r.output for r in reqs] == [out[:2] for out in tokens[:3]]


def test_graphs_need_a_graph_safe_backend_and_a_cuda_device(model: LlamaForCausalLM) -> None:
    layout = kv_layout(model.config, None, model.dtype)
    pools = TokenToKVPool(layout, 64, device=DEVICE), ReqToTokenPool(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="use the triton attention backend"):
        ModelRunner(model, *pools, "torch").capture_decode_graphs(2, MODE)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            make_runner(model).capture_decode_graphs(2, "cuda")
    with pytest.raises(ValueError, match="unknown graph mode"):
        runner = make_runner(model)
        DecodeGraphs(model, runner.backend, CONTEXT, 2, "lazy")


def test_server_args_choose_and_refuse_graphs() -> None:
    assert ServerArgs().graph_max_bs is None  # the CPU
    assert ServerArgs(device="cuda").graph_max_bs == 64  # --max-running-requests
    assert ServerArgs(device="cuda", max_running_requests=512).graph_max_bs == 256
    assert ServerArgs(device="cuda:1", cuda_graph_max_bs=16).graph_max_bs == 16
    assert ServerArgs(device="cuda", disable_cuda_graph=True).graph_max_bs is None
    assert ServerArgs(device="cuda", attention_backend="torch").graph_max_bs is None
    assert ServerArgs(disable_cuda_graph=True).graph_max_bs is None  # nothing to turn off
    with pytest.raises(ValueError, match="needs --device cuda"):
        ServerArgs(cuda_graph_max_bs=8)
    with pytest.raises(ValueError, match="needs the triton attention backend"):
        ServerArgs(device="cuda", attention_backend="torch", cuda_graph_max_bs=8)
    with pytest.raises(ValueError, match="give one of them"):
        ServerArgs(device="cuda", cuda_graph_max_bs=8, disable_cuda_graph=True)
    with pytest.raises(ValueError, match="--disable-cuda-graph"):
        ServerArgs(device="cuda", cuda_graph_max_bs=0)
