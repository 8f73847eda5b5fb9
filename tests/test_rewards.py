"""Each built-in reward on hand-made cases, plus the checks that make a bad reward fail by name."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from rlrec.errors import ConfigError, RlrecError
from rlrec.rewards import REWARDS, ItemTables, RewardBatch, check_rewards, compute, prefix_schedule, resolve
from rlrec.schema import GRPOConfig

IDENTIFIERS = {
    "i1": "<a_1><b_1><c_1><d_1>",
    "i2": "<a_1><b_1><c_1><d_2>",  # shares 3 of 4 levels with i1
    "i3": "<a_1><b_2><c_1><d_1>",  # shares 1
    "i4": "<a_2><b_1><c_1><d_1>",  # shares 0
}


def tables(**extra) -> ItemTables:
    return ItemTables(item_ids=list(IDENTIFIERS), identifiers=IDENTIFIERS,
                      popularity=Counter({"i1": 99, "i2": 9, "i3": 0, "i4": 0}), **extra)  # fmt: skip


def batch(items, target="i1", history=("i4",), ranks=None) -> RewardBatch:
    n = len(items)
    return RewardBatch(list(items), [target] * n, [list(history)] * n, list(ranks or range(n)), group_size=n)


def test_valid_and_hit():
    b = batch(["i1", "i2", None, "zz"])
    assert REWARDS["valid"](b, tables()) == [1.0, 1.0, 0.0, 0.0]
    assert REWARDS["hit"](b, tables()) == [1.0, 0.0, 0.0, 0.0]


def test_rank_penalty_is_minionerec_normalised_discount():
    b = batch(["i2", "i1", "i3", "i4"])  # hit at rank 1
    norm = sum(1 / math.log2(j + 2) for j in range(4))
    expected = [-1 / norm, 0.0, -(1 / math.log2(4)) / norm, -(1 / math.log2(5)) / norm]
    assert REWARDS["rank_penalty"](b, tables()) == pytest.approx(expected)
    # all wrong: the penalties sum to -1 (one unit spread over the group by rank)
    assert sum(REWARDS["rank_penalty"](batch(["i2", "i3", "i4"], target="zz"), tables())) == pytest.approx(-1.0)


def test_ndcg_rewards_hit_by_its_rank():
    assert REWARDS["ndcg"](batch(["i2", "i3", "i1"]), tables()) == pytest.approx([0, 0, 1 / math.log2(4)])
    with pytest.raises(RlrecError, match="needs beam ranks"):
        REWARDS["ndcg"](RewardBatch(["i1"], ["i1"], [[]], [None], 1), tables())


def test_sid_prefix_gream_schedule_and_custom():
    b = batch(["i1", "i2", "i3", "i4"])
    assert REWARDS["sid_prefix"](b, tables()) == pytest.approx([1.0, 0.866025, 0.5, 0.0], abs=1e-6)
    assert REWARDS["sid_prefix"](b, tables(), schedule="linear") == pytest.approx([1.0, 0.75, 0.25, 0.0])
    assert REWARDS["sid_prefix"](b, tables(), schedule=[0.1, 0.2, 0.3]) == pytest.approx([1.0, 0.3, 0.1, 0.0])
    assert prefix_schedule(4) == pytest.approx([0, 0.5, 0.707107, 0.866025, 1], abs=1e-6)
    with pytest.raises(ConfigError, match="3 values"):
        prefix_schedule(4, [0.5])
    plain = ItemTables(item_ids=["a"], identifiers={"a": "Toy Story"}, popularity=Counter())
    with pytest.raises(ConfigError, match="semantic-ID"):
        REWARDS["sid_prefix"](batch(["a"], target="a"), plain)


def test_popularity_repeat_collaborative():
    b = batch(["i1", "i2", "i3", "i4"], history=["i3"])
    assert REWARDS["popularity"](b, tables()) == pytest.approx([-1.0, -math.log(10) / math.log(100), 0.0, 0.0])
    assert REWARDS["repeat"](b, tables()) == [0.0, 0.0, -1.0, 0.0]
    # users: 0 saw i1,i2; 1 saw i1,i2,i3; 2 saw i3  -> cos(i2, i3) = 1/sqrt(2*2), cos(i1, i3) same, i4 never seen
    t = tables(sequences=[["i1", "i2"], ["i1", "i2", "i3"], ["i3"]])
    assert REWARDS["collaborative"](b, t) == pytest.approx([0.5, 0.5, 1.0, 0.0])


def test_semantic_is_cosine_of_text_embeddings(tmp_path):
    import numpy as np

    t = tables(cache_dir=tmp_path)
    t.__dict__["embeddings"] = {"i1": np.array([1.0, 0.0]), "i2": np.array([0.6, 0.8]), "i3": np.array([0.0, 1.0]),
                                "i4": np.array([-1.0, 0.0])}  # fmt: skip
    assert REWARDS["semantic"](batch(["i1", "i2", "i3", "i4"]), t) == pytest.approx([1.0, 0.6, 0.0, -1.0])


def nan_reward(batch, tables):
    return [float("nan")] * len(batch.items)


def broken_reward(batch, tables):
    raise KeyError("no such item")


def test_example_user_reward_loads_by_dotted_path():
    novelty = resolve("rewards.examples.novelty")
    values = compute("rewards.examples.novelty", novelty, batch(["i1", "i3", None]), tables(), {})
    assert values[0] < values[1] <= 1.0 and values[2] == 0.0


def test_bad_rewards_fail_with_their_name():
    assert resolve("tests.test_rewards.nan_reward") is nan_reward
    with pytest.raises(RlrecError, match="reward 'nan' returned a non-finite"):
        compute("nan", nan_reward, batch(["i1"]), tables(), {})
    with pytest.raises(RlrecError, match="reward 'broken' raised KeyError"):
        compute("broken", broken_reward, batch(["i1"]), tables(), {})
    with pytest.raises(ConfigError, match="unknown reward 'hits'"):
        resolve("hits")
    with pytest.raises(ConfigError, match="cannot load"):
        resolve("rewards.nowhere.fn")


def test_grpo_config_rejects_inconsistent_rewards():
    with pytest.raises(ConfigError, match=r"\['ndcg'\] need beam ranks"):  # the recipe check, before a model loads
        check_rewards({"hit": 1.0, "ndcg": 1.0}, "sample")
    check_rewards({"hit": 1.0, "ndcg": 1.0}, "beam")
    with pytest.raises(ConfigError, match="not in grpo.rewards"):
        GRPOConfig(rewards={"hit": 1.0}, reward_params={"sid_prefix": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match="num_generations"):
        GRPOConfig(num_generations=1)
