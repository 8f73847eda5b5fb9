"""The sequence prompt format and sequence-level SFT (issue: SFT as strong as SASRec): the rows leak nothing,
their loss is exactly on item tokens, training text and decoding prompt agree, the stop-less trie decodes exactly,
dropout is on in train mode only, and the validation selection keeps the best weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback, TrainerControl

from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data
from rlrec.decoding import ItemTrie, recommend
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import ConfigError, RlrecError
from rlrec.models import build_for_training, build_tokenizer, load_model, tiny_phi
from rlrec.recipe import Recipe
from rlrec.schema import EvalConfig, GuardConfig, ModelConfig, PromptConfig
from rlrec.stages import data as data_stage
from rlrec.stages import sft
from rlrec.training.guard import Guard
from rlrec.training.sft_rows import sequence_rows, target_rows
from tests.conftest import tiny_pipeline, tiny_recipe

SCIENTIFIC_TRAIN_ROWS = 58_492 - 3 * 8_317  # every training transition under leave-one-out


@pytest.fixture(scope="session")
def sequence_data(shared_data, tmp_path_factory):
    """Scientific, leave-one-out, ready 4-token semantic IDs, in the sequence prompt format, and a tokenizer."""
    out = tmp_path_factory.mktemp("sequence")
    raw = tiny_recipe(shared_data, out)
    raw["data"]["prompt"].update(format="sequence", template="History: {history}", separator=" ")
    data_stage.run(from_dict(Recipe, raw))
    data = load_run_data(out / "tiny" / "data")
    _, tokenizer, _ = build_for_training(ModelConfig(hidden_size=16, layers=1, heads=1), data.identifiers,
                                         ["History:"], seed=0)  # fmt: skip
    return data, tokenizer, ModelInputs.build(tokenizer, data.identifiers, data.prompt)


def full_sequences(data) -> dict[str, list[str]]:
    return {row["user"]: row["items"] for row in map(json.loads, (data.path / "sequences.jsonl").open())}


def items_of(row_ids: list[int], inputs: ModelInputs) -> list[str]:
    """The items a sequence row holds after its prefix (4 code tokens each)."""
    by_tokens = {tuple(block): item for item, block in inputs.blocks.items()}
    body = row_ids[len(inputs.prefix) :]
    return [by_tokens[tuple(body[i : i + 4])] for i in range(0, len(body), 4)]


def test_sequence_rows_leak_no_valid_or_test_item_and_learn_every_transition_once(sequence_data):
    data, _, inputs = sequence_data
    rows = sequence_rows(data, inputs, min_history=1)
    full = full_sequences(data)
    assert sum(rows["targets"]) == SCIENTIFIC_TRAIN_ROWS == len(data.rows("train"))
    for row_ids, user in zip(rows["input_ids"], rows["user"], strict=True):
        assert row_ids[: len(inputs.prefix)] == inputs.prefix
        items, train_part = items_of(row_ids, inputs), full[user][:-2]
        assert len(items) <= data.stats["max_history"] + 1
        # a contiguous window of items[:-2]: never the valid (items[-2]) or test (items[-1]) position
        starts = [s for s in range(len(train_part) - len(items) + 1) if train_part[s : s + len(items)] == items]
        assert starts, f"user {user}: row items {items} are not a window of the training part {train_part}"


def test_sequence_loss_positions_are_exactly_the_item_tokens_and_match_the_decoding_prompt(sequence_data):
    data, tokenizer, inputs = sequence_data
    rows = sequence_rows(data, inputs, min_history=3).select(range(300))
    full = full_sequences(data)
    for row_ids, mask, user in zip(rows["input_ids"], rows["completion_mask"], rows["user"], strict=True):
        items, train_part = items_of(row_ids, inputs), full[user][:-2]
        start = next(s for s in range(len(train_part)) if train_part[s : s + len(items)] == items)
        expected = [0] * len(inputs.prefix)
        for position, item in enumerate(items):
            learned = position >= 1 and start + position >= 3  # history in the window, and >= min_history overall
            expected += [int(learned)] * 4
            if learned:
                at = len(inputs.prefix) + 4 * position
                # the text before a target is exactly the prompt evaluation decodes it from, and the target's
                # tokens are its path in the trie
                assert row_ids[:at] == inputs.history_ids(items[:position])
                assert row_ids[at : at + 4] == inputs.trie.sequences[inputs.trie.item_ids.index(item)]
        assert mask == expected
    assert all(len(ids) == len(mask) for ids, mask in zip(rows["input_ids"], rows["completion_mask"], strict=True))
    # per-target rows in the same format: the valid prompt plus the target, loss on the target only
    targets = target_rows(data, inputs).select(range(50))
    train = data.rows("train").select(range(50))
    for ids, mask, history, target in zip(targets["input_ids"], targets["completion_mask"], train["history"],
                                          train["target"], strict=True):  # fmt: skip
        assert ids == inputs.history_ids(history) + inputs.blocks[target] and mask == [0] * (len(ids) - 4) + [1] * 4


def test_rows_per_user_keeps_each_users_latest_rows(sequence_data):
    """`sft.rows_per_user`: sequence rows keep each user's latest window (ending at the last training item), target
    rows each user's latest targets; every user keeps a row."""
    data, _, inputs = sequence_data
    full = full_sequences(data)
    latest = sequence_rows(data, inputs, min_history=1, per_user=1)
    assert sorted(latest["user"]) == sorted(full)
    for row_ids, user in zip(latest["input_ids"], latest["user"], strict=True):
        train_part = full[user][:-2]
        assert items_of(row_ids, inputs) == train_part[-(data.stats["max_history"] + 1) :]
    rows = target_rows(data, inputs, per_user=2)
    train = data.rows("train")
    expected = {}
    for history, target, user in zip(train["history"], train["target"], train["user"], strict=True):
        expected.setdefault(user, []).append(inputs.history_ids(history) + inputs.blocks[target])
    kept: dict[str, list] = {}
    for ids, user in zip(rows["input_ids"], rows["user"], strict=True):
        kept.setdefault(user, []).append(ids)
    assert kept == {user: found[-2:] for user, found in expected.items()}


def test_stopless_trie_beam_equals_teacher_forcing_and_refuses_prefixes():
    identifiers = {str(i): f"<a_{i % 3}><b_{i}>" for i in range(12)}
    tokenizer = build_tokenizer(["History:", *identifiers.values()])
    model = tiny_phi(tokenizer, hidden_size=32, layers=1, heads=2, seed=0).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    prompt = PromptConfig(format="sequence", identifier="sid", template="History: {history}", separator=" ")
    inputs = ModelInputs.build(tokenizer, identifiers, prompt)
    assert inputs.trie.stop_token is None and inputs.trie.max_length == 2
    prompt = inputs.history_ids(["3", "7"])
    ranked = recommend(model, tokenizer, [prompt], k=12, trie=inputs.trie)[0]
    with torch.no_grad():
        truth = {}
        for item, block in inputs.blocks.items():
            ids = torch.tensor([prompt + block])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            truth[item] = float(sum(logprobs[len(prompt) - 1 + t, block[t]] for t in range(len(block))))
    assert [item for item, _ in ranked] == sorted(truth, key=truth.get, reverse=True)
    assert all(score == pytest.approx(truth[item], abs=1e-4) for item, score in ranked)
    with pytest.raises(RlrecError, match="prefix of another item's tokens"):
        ItemTrie.from_sequences(["a", "b"], [[5], [5, 6]], stop_token=None)


def test_dropout_is_active_in_train_mode_and_off_in_eval_mode():
    tokenizer = build_tokenizer(["History: a b c d"])
    ids = torch.tensor([tokenizer.encode("History: a b c d")])
    model = tiny_phi(tokenizer, hidden_size=32, layers=2, heads=2, dropout=0.3, seed=0)
    for name in ("embd_pdrop", "resid_pdrop", "attention_dropout"):
        assert getattr(model.config, name) == 0.3
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    still = tiny_phi(tokenizer, hidden_size=32, layers=2, heads=2, dropout=0.0, seed=0).train()
    assert torch.equal(still(ids).logits, still(ids).logits)
    with pytest.raises(ConfigError, match="architecture: phi"):
        ModelConfig(dropout=0.2)  # Llama: no embedding or residual dropout to set


def test_guard_users_are_a_seeded_sample_of_the_whole_split(sequence_data):
    data, _, _ = sequence_data
    order = {user: i for i, user in enumerate(data.rows("valid")["user"])}
    users = list(data.sample("valid", 1500, seed=0)["user"])
    positions = [order[u] for u in users]
    assert len(set(users)) == 1500 and positions != list(range(1500))  # not the first rows of the file
    assert min(positions) < 0.1 * len(order) and max(positions) > 0.9 * len(order)  # spread over the whole split
    assert positions == sorted(positions)  # kept in file order
    assert list(data.sample("valid", 1500, seed=0)["user"]) == users  # seeded
    assert list(data.sample("valid", 1500, seed=1)["user"]) != users
    assert len(data.sample("valid", None, seed=0)) == len(order)


class ScrambleEmbeddings(TrainerCallback):
    """From the end of epoch `start` on, replaces the input embeddings by noise before the guard evaluates them: a
    validation curve that certainly falls (a too-high learning rate made it fall on some CPUs and not on others)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if round(state.epoch) >= self.start:
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))


def test_selection_keeps_the_best_weights_when_validation_falls(tmp_path, monkeypatch):
    """SFT with `select`: the guard evaluates each epoch; after a run whose validation fell, the saved model is the
    best epoch's (its score on the guard's users equals the best of the curve), not the last one's."""
    raw = tiny_pipeline(tmp_path, max_steps=-1)
    raw["data"]["prompt"] = {"format": "sequence", "identifier": "id", "template": "History: {history}",
                             "separator": " "}  # fmt: skip
    raw["sft"].update(rows="sequence", select={"eval_steps": "epoch", "users": 60, "patience": 0, "at_start": False})
    raw["sft"]["model"] = {"architecture": "phi", "hidden_size": 32, "layers": 1, "heads": 2, "dropout": 0.1}
    raw["sft"]["train"].update(epochs=6, learning_rate=0.03, scheduler="constant", batch_size=16)
    recipe = from_dict(Recipe, raw)
    data_stage.run(recipe)

    def guard_after_scrambling(*args, **kwargs):  # the stage's own guard, with the scrambler called before it
        guard = Guard(*args, **kwargs)
        attach = guard.attach
        guard.attach = lambda trainer: (trainer.add_callback(ScrambleEmbeddings(start=4)), attach(trainer))[1]
        return guard

    monkeypatch.setattr(sft, "Guard", guard_after_scrambling)
    metrics = sft.run(recipe)
    training = metrics["training"]
    curve = training["guard"]
    best = max(curve, key=lambda g: g["ndcg@10"])
    assert len(curve) == 6 and best["step"] != curve[-1]["step"] and curve[-1]["ndcg@10"] < best["ndcg@10"]
    assert training["saved_step"] == best["step"]
    model, tokenizer = load_model(recipe.stage_dir("sft") / "model")
    data = load_run_data(recipe.stage_dir("data"))
    guard = Guard(model, tokenizer, data, EvalConfig(ks=[10]), GuardConfig(users=60), tmp_path, "check")
    guard.evaluate(0, TrainerControl())
    assert guard.history[0]["ndcg@10"] == pytest.approx(best["ndcg@10"], abs=1e-6)
    logged = [json.loads(line) for line in (recipe.stage_dir("sft") / "train_log.jsonl").open()]
    assert [row["guard/ndcg@10"] for row in logged if "guard/ndcg@10" in row] == [g["ndcg@10"] for g in curve]


def test_selection_from_a_fraction_of_training_skips_the_early_epochs(tmp_path):
    """`select.start: 0.5`: no evaluation before half of the planned steps, one after every later epoch, and the
    saved model is the best of those."""
    raw = tiny_pipeline(tmp_path, max_steps=-1)
    raw["data"]["prompt"] = {"format": "sequence", "identifier": "id", "template": "History: {history}",
                             "separator": " "}  # fmt: skip
    raw["sft"].update(rows="sequence", select={"eval_steps": "epoch", "users": 60, "patience": 0, "at_start": False,
                                               "start": 0.5})  # fmt: skip
    raw["sft"]["model"] = {"architecture": "phi", "hidden_size": 32, "layers": 1, "heads": 2, "dropout": 0.1}
    raw["sft"]["train"].update(epochs=4, scheduler="cosine", batch_size=16)
    recipe = from_dict(Recipe, raw)
    data_stage.run(recipe)
    training = sft.run(recipe)["training"]
    steps_per_epoch = training["global_step"] // 4
    assert [g["step"] for g in training["guard"]] == [steps_per_epoch * e for e in (2, 3, 4)]
    assert training["saved_step"] == max(training["guard"], key=lambda g: g["ndcg@10"])["step"]
    with pytest.raises(ConfigError, match="guard.start"):
        GuardConfig(start=1.0)


def test_sequence_format_model_publishes_reloads_and_reproduces_its_metrics(tmp_path):
    """`rlrec.load` on a sequence-format model encodes histories as the stage did: the same test metrics."""
    import rlrec
    from rlrec.evaluate import score_lists
    from rlrec.publish import publish

    raw = tiny_pipeline(tmp_path, max_steps=30)
    raw["data"]["prompt"] = {"format": "sequence", "identifier": "id", "template": "History: {history}",
                             "separator": " "}  # fmt: skip
    raw["sft"].update(rows="sequence", model={"architecture": "phi", "hidden_size": 32, "layers": 1, "heads": 2})
    recipe = from_dict(Recipe, raw)
    data_stage.run(recipe)
    metrics = sft.run(recipe)["test"]
    folder = publish(recipe.stage_dir("sft"), "someone/seq-rec", dry_run=True, out=tmp_path / "published")
    recommender = rlrec.load(folder)
    assert recommender.inputs.format == "sequence" and recommender.trie.stop_token is None
    data = load_run_data(recipe.stage_dir("data"))
    rows = data.rows("test")
    lists = recommender.recommend_batch(rows["history"], k=max(recommender.eval.ks))
    scored = score_lists([[i for i, _ in ranked] for ranked in lists], rows["target"], data, recommender.eval.ks)
    assert scored == metrics["metrics"]


@pytest.fixture(scope="session")
def sequence_sft_run(shared_data, tmp_path_factory):
    """A tiny sequence-format SFT model on Scientific with semantic IDs: <out>/tiny/{data,sft}."""
    out = tmp_path_factory.mktemp("sequence_sft")
    raw = tiny_recipe(shared_data, out)
    raw["data"]["prompt"].update(format="sequence", template="History: {history}", separator=" ")
    raw["sft"].update(rows="sequence", max_train_rows=256)
    recipe = from_dict(Recipe, raw)
    data_stage.run(recipe)
    sft.run(recipe)
    return out, raw


def test_grpo_and_sdpo_train_a_sequence_format_model(sequence_sft_run, tmp_path):
    """Post-training from a sequence-format model: rollouts and mined negatives are catalogue items decoded from
    the history prompt (no stop token), and both stages change the model."""
    import shutil

    from rlrec.stages import dpo, grpo

    out, raw = sequence_sft_run
    shutil.copytree(out / "tiny", tmp_path / "tiny")
    raw = {**raw, "output_dir": str(tmp_path)}
    raw["grpo"] = {"num_generations": 4, "prompts_per_device": 2, "max_train_prompts": 16,
                   "rewards": {"hit": 1.0, "sid_prefix": 1.0},
                   "train": {"max_steps": 2, "learning_rate": 0.01, "logging_steps": 1, "report_to": []},
                   "guard": {"eval_steps": 2, "users": 8, "keep_best": False}, "eval_max_users": 8}  # fmt: skip
    raw["dpo"] = {"negatives": {"hard": 2, "random": 1}, "max_train_prompts": 8, "beta": 0.5,
                  "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 0.01, "logging_steps": 1,
                            "report_to": []},
                  "guard": {"eval_steps": 2, "users": 8, "keep_best": False}, "eval_max_users": 8}  # fmt: skip
    recipe = from_dict(Recipe, raw)
    before, _ = load_model(recipe.stage_dir("sft") / "model")
    for stage in (grpo, dpo):
        metrics = stage.run(recipe)
        assert metrics["test"]["metrics"]["valid_rate"] == 1.0
        after, _ = load_model(recipe.stage_dir(stage.__name__.rsplit(".", 1)[-1]) / "model")
        changed = sum(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))
        assert changed >= 5
    log = [json.loads(line) for line in (recipe.stage_dir("grpo") / "train_log.jsonl").open()]
    assert all(row["rollout/valid_rate"] == 1.0 for row in log if "rollout/valid_rate" in row)
    assert any("rollout/valid_rate" in row for row in log)


def test_sequence_rows_on_chat_data_are_refused(shared_data, prepared, tmp_path):
    from tests.conftest import recipe_with_data

    recipe = recipe_with_data(shared_data, prepared, tmp_path, rows="sequence")
    with pytest.raises(ConfigError, match="sft.rows: sequence needs data.prompt.format: sequence"):
        sft.run(recipe)
