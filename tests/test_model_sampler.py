"""Batched sampler and stop rule."""

from __future__ import annotations

import pytest
import torch

from radixkv.model.sampler import Sampler, make_generator
from radixkv.model.stop_checker import FinishReason, StopChecker
from radixkv.protocol import SamplingParams

VOCAB = 50


def logits_for(probs: list[float]) -> torch.Tensor:
    p = torch.full((VOCAB,), 1e-12)
    p[: len(probs)] = torch.tensor(probs)
    return p.log()


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 2000) -> torch.Tensor:
    gen = make_generator(params)
    batch = logits.expand(n, -1)
    return Sampler()(batch, [params] * n, [gen] * n)


def test_greedy_fast_path_is_argmax() -> None:
    logits = torch.randn(5, VOCAB)
    out = Sampler()(logits, [SamplingParams()] * 5)
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_one_is_greedy_and_top_k_limits_support() -> None:
    logits = torch.randn(4, VOCAB)
    assert torch.equal(
        Sampler()(logits, [SamplingParams(temperature=1.0, top_k=1)] * 4), logits.argmax(-1)
    )
    row = logits_for([0.3, 0.25, 0.2, 0.15, 0.1])
    seen = set(draws(SamplingParams(temperature=1.0, top_k=2, seed=0), row).tolist())
    assert seen == {0, 1}


def test_top_p_keeps_the_smallest_head_reaching_p() -> None:
    row = logits_for([0.5, 0.3, 0.2])
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.6, seed=1), row).tolist()) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.45, seed=1), row).tolist()) == {0}


def test_temperature_sampling_follows_the_distribution() -> None:
    probs = [0.6, 0.3, 0.1]
    out = draws(SamplingParams(temperature=1.0, seed=3), logits_for(probs), n=6000)
    freq = torch.bincount(out, minlength=3)[:3].float() / len(out)
    torch.testing.assert_close(freq, torch.tensor(probs), atol=0.03, rtol=0)
    # A high temperature flattens the distribution.
    hot = draws(SamplingParams(temperature=5.0, seed=3), logits_for(probs), n=6000)
    assert (hot == 2).float().mean() > 0.2


def test_seed_reproducible_whatever_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    seeded = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=0.7, top_k=10)
    sampler = Sampler()
    alone = [sampler(logits[:1], [seeded], [make_generator(seeded)]) for _ in range(2)]
    gen = make_generator(seeded)
    steps_alone = [sampler(logits[:1], [seeded], [gen]).item() for _ in range(20)]
    gen, gen_other = make_generator(seeded), make_generator(other)
    steps_mixed = [
        sampler(logits, [seeded, other, SamplingParams()], [gen, gen_other, None])[0].item()
        for _ in range(20)
    ]
    assert torch.equal(alone[0], alone[1])
    assert steps_alone == steps_mixed


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = torch.randn(6, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1)] * 3
    gens = [make_generator(p) for p in params]
    out = Sampler()(logits, params, gens)
    assert torch.equal(out[0::2], logits[0::2].argmax(-1))


def test_stop_checker() -> None:
    stop = StopChecker.for_model([2])
    p = SamplingParams(max_new_tokens=3, stop_token_ids=[7])
    assert stop.check(p, 5, 1) is None
    assert stop.check(p, 2, 1) is FinishReason.STOP
    assert stop.check(p, 7, 1) is FinishReason.STOP
    assert stop.check(p, 5, 3) is FinishReason.LENGTH
    ignore = SamplingParams(max_new_tokens=3, ignore_eos=True, stop_token_ids=[7])
    assert stop.check(ignore, 2, 1) is None
    assert stop.check(ignore, 7, 1) is FinishReason.STOP  # stop ids still apply


def test_sampling_params_are_validated_once_at_the_front_end() -> None:
    """The model trusts its SamplingParams: their rules live in `radixkv.frontend.validation`."""
    from radixkv.frontend.validation import BadRequest, check_sampling

    for bad, param in ((SamplingParams(temperature=-1), "temperature"),
                       (SamplingParams(top_p=0), "top_p"),
                       (SamplingParams(max_new_tokens=0), "max_new_tokens")):  # fmt: skip
        with pytest.raises(BadRequest, match=param) as err:
            check_sampling(bad, vocab_size=100)
        assert err.value.param == param
    check_sampling(SamplingParams(stop_token_ids=[1, 2]), vocab_size=100)


def reference_adjust(logits, p: SamplingParams, output, prompt, eos):
    """vLLM's definitions, one request at a time, in plain Python."""
    out = logits.clone()
    for t in range(out.shape[0]):
        count = output.count(t)
        if t in output or t in prompt:
            r = p.repetition_penalty
            out[t] = out[t] / r if out[t] > 0 else out[t] * r
        out[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        out[t] += p.logit_bias.get(t, 0.0)
    if len(output) < p.min_new_tokens:
        for t in {*p.stop_token_ids, *(() if p.ignore_eos else eos)}:
            out[t] = float("-inf")
    return out


def test_penalties_bias_and_min_tokens_follow_their_definitions() -> None:
    from radixkv.model.penalties import adjust_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=g) * 3
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7),
        SamplingParams(),  # untouched beside the others
        SamplingParams(logit_bias={3: -100.0, 7: 5.5}, repetition_penalty=0.8),
        SamplingParams(min_new_tokens=4, stop_token_ids=[9], max_new_tokens=8),
        SamplingParams(min_new_tokens=2, ignore_eos=True, stop_token_ids=[11], max_new_tokens=8),
    ]
    outputs = [[1, 1, 2, 40], [5], [3, 3, 3], [0, 4], [6]]
    prompts = [[2, 9, 30], [1], [7, 8], [1], [2]]
    eos = frozenset({2})
    got = adjust_logits(logits, params, outputs, prompts, eos)
    for i, p in enumerate(params):
        want = reference_adjust(logits[i], p, outputs[i], prompts[i], eos)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], logits[1])
    assert got[3, 9] == got[3, 2] == float("-inf") and got[4, 11] == float("-inf")
    assert got[4, 2] != float("-inf")  # ignore_eos: EOS is no stop, so it is not barred


def test_min_p_drops_unlikely_tokens() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    seen = set(
        draws(SamplingParams(temperature=1.0, min_p=0.25, seed=2), logits_for(probs)).tolist()
    )
    assert seen == {0, 1, 2}  # 0.05 < 0.25 * 0.5: dropped; 0.15 >= 0.125: kept


def test_greedy_requests_see_their_penalties_and_others_do_not() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    params = [SamplingParams(logit_bias={1: -10.0}), SamplingParams()]
    out = Sampler()(logits, params, outputs=[[], []], prompts=[[0], [0]])
    assert out.tolist() == [2, 1]
    with pytest.raises(ValueError, match="history"):
        Sampler()(logits, params)
