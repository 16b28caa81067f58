from __future__ import annotations

import pytest

from radixkv.tools.workloads import (
    FewShotTree,
    GeneratedSharedPrefix,
    MultiTurnChat,
    SharedPrefixWorkload,
    best_hit_rate,
)


def test_shared_prefix_workload_is_deterministic_and_shares_system_prompts():
    wl = SharedPrefixWorkload(groups=3, prompts_per_group=4, system_words=20, seed=5)
    a, b = wl.requests(), wl.requests()
    assert a == b and len(a) == 12
    assert a != SharedPrefixWorkload(groups=3, prompts_per_group=4, system_words=20).requests()
    systems = {r.group: r.messages[0]["content"] for r in a}
    assert len(set(systems.values())) == 3
    assert all(r.messages[0]["content"] == systems[r.group] for r in a)
    assert [r.group for r in a] != sorted(r.group for r in a)  # arrivals are shuffled


def test_best_hit_rate_counts_each_distinct_prefix_once():
    seqs = [([1, 2, 3, 4], [9, 9]), ([1, 2, 3, 5], [8]), ([1, 2, 3, 4, 9, 7], [])]
    # request 2 reuses [1, 2, 3]; request 3 reuses [1, 2, 3, 4, 9] (prompt + output[:-1] of 1)
    assert best_hit_rate(seqs) == (0 + 3 + 5) / (4 + 4 + 6)
    assert best_hit_rate(seqs, page_size=2) == (0 + 2 + 4) / 14
    assert best_hit_rate([]) == 0.0
    # the last prompt token is never reusable, even when the whole prompt was seen
    assert best_hit_rate([([1, 2], []), ([1, 2], [])]) == 1 / 4


def test_generated_shared_prefix_has_groups_of_shared_system_prompts():
    convs = GeneratedSharedPrefix(groups=3, prompts_per_group=4, system_len=50, question_len=5,
                                  output_len=7, seed=1).conversations()  # fmt: skip
    assert convs == GeneratedSharedPrefix(3, 4, 50, 5, 7, seed=1).conversations()
    assert len(convs) == 12 and all(len(c.turns) == 1 for c in convs)
    assert len({tuple(c.prefix_ids) for c in convs}) == 3
    assert all(len(c.prefix_ids) == 50 and c.turns[0].max_new_tokens == 7 for c in convs)
    prompts = [(c.prefix_ids + c.turns[0].user_ids, [1] * 7) for c in convs]
    # every group computes its system prompt once: 9 of 12 requests reuse 50 tokens
    assert best_hit_rate(prompts) == pytest.approx(9 * 50 / (12 * 55), abs=0.01)


def test_multi_turn_chat_has_turns_over_one_system_prompt():
    convs = MultiTurnChat(chats=3, turns=4, system_len=20, user_len=5, output_len=6).conversations()
    assert len(convs) == 3 and all(len(c.turns) == 4 for c in convs)
    assert len({tuple(c.prefix_ids) for c in convs}) == 1


def test_multi_turn_chat_with_min_turns_varies_lengths_and_keeps_the_turns_it_has():
    fixed = MultiTurnChat(chats=40, turns=6, seed=3).conversations()
    varied = MultiTurnChat(chats=40, turns=6, seed=3, min_turns=2).conversations()
    lengths = [len(c.turns) for c in varied]
    assert min(lengths) >= 2 and max(lengths) <= 6 and len(set(lengths)) > 2
    for f, v in zip(fixed, varied, strict=True):  # the same chats, cut short
        assert v.prefix_ids == f.prefix_ids and v.turns == f.turns[: len(v.turns)]
    with pytest.raises(ValueError, match="min_turns 7"):
        MultiTurnChat(turns=6, min_turns=7)


def test_bench_refuses_an_option_of_another_workload(capsys):
    from radixkv.tools.bench import main

    with pytest.raises(SystemExit) as exc:
        main(["--workload", "shared-prefix", "--turns", "3"])
    assert exc.value.code == 2
    assert "--turns does not apply to --workload shared-prefix" in capsys.readouterr().err


def test_few_shot_tree_shares_instruction_and_examples():
    wl = FewShotTree(instruction_len=10, branches=2, examples_len=6, sub_branches=2,
                     sub_examples_len=4, questions=3, question_len=2, output_len=1)  # fmt: skip
    convs = wl.conversations()
    assert len(convs) == 2 * 2 * 3
    assert len({tuple(c.prefix_ids[:10]) for c in convs}) == 1
    assert len({tuple(c.prefix_ids[:16]) for c in convs}) == 2
    assert len({tuple(c.prefix_ids) for c in convs}) == 4


def test_bench_summary_reads_hit_rate_against_the_best():
    from radixkv.tools.bench import RequestRecord, summarize

    recs = [
        RequestRecord(0, 0, 0.0, 1.0, [1, 2, 3, 4], [7, 8], 0, 0.5, 1.0, [0.5]),
        RequestRecord(1, 0, 0.1, 2.0, [1, 2, 3, 5], [9, 9], 3, 0.6, 1.9, [1.3]),
    ]
    s = summarize(recs)
    assert s["hit_rate"] == 3 / 8 and s["best_hit_rate"] == 3 / 8
    assert s["hit_rate_of_best"] == 1.0 and s["duration_s"] == 2.0
    assert s["output_tokens_per_s"] == 2.0 and s["ttft_s"]["p50"] in (0.5, 0.6)
    assert s["tpot_s"]["mean"] == pytest.approx(((1.0 - 0.5) + (1.9 - 0.6)) / 2)
    assert s["itl_s"]["mean"] == pytest.approx(0.9) and s["itl_s"]["p99"] in (0.5, 1.3)
