"""SFT stage with real TRL SFTTrainer runs on tiny models built in the test, on real Scientific data."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data
from rlrec.decoding import ItemTrie, recommend
from rlrec.errors import ConfigError, RlrecError
from rlrec.models import build_for_training, load_model
from rlrec.recipe import Recipe
from rlrec.schema import LoraConfig, ModelConfig, TrainConfig
from rlrec.stages.sft import run, train_sft
from rlrec.training.arguments import lora_config, resolve_precision
from tests.conftest import launch, recipe_with_data, tiny_recipe


def test_full_sft_changes_parameters_and_reports_metrics(shared_data, prepared, tmp_path):
    recipe = recipe_with_data(shared_data, prepared, tmp_path)
    metrics = run(recipe)
    trained, tokenizer = load_model(recipe.stage_dir("sft") / "model")
    initial, _, _ = build_for_training(recipe.sft.model, {}, [], recipe.seed)  # same seed, same init
    changed = [
        name for (name, a), (_, b) in zip(trained.named_parameters(), initial.named_parameters(), strict=False)
        if a.shape == b.shape and not torch.equal(a, b)
    ]  # fmt: skip
    assert len(changed) >= 5
    assert metrics["training"]["finetune"] == "full" and metrics["training"]["global_step"] == 4
    test = metrics["test"]
    assert test["num_users"] == 8 and test["metrics"]["valid_rate"] == 1.0
    # the reported numbers are the saved model's: its own top-10 on the same 8 test users, counted here by hand
    data = load_run_data(recipe.stage_dir("data"))
    rows = data.rows("test", 8)
    trie = ItemTrie.build(tokenizer, data.identifiers)
    lists = recommend(trained, tokenizer, rows["prompt"], k=10, trie=trie, batch_size=8)
    hits = [target in [item for item, _ in ranked] for ranked, target in zip(lists, rows["target"], strict=True)]
    assert test["metrics"]["hr@10"] == pytest.approx(sum(hits) / 8)
    saved = json.loads((recipe.stage_dir("sft") / "metrics.json").read_text())
    assert saved["protocol"]["split_method"] == "leave_one_out" and saved["protocol"]["num_items"] == 4344


@pytest.mark.parametrize("mode", ["trainable_token_indices", "modules_to_save"])
def test_lora_trains_identifier_tokens_and_adapter_reloads(shared_data, prepared, tmp_path, mode):
    recipe = recipe_with_data(shared_data, prepared, tmp_path, finetune="lora", identifier_tokens=mode,
                              lora={"r": 4, "alpha": 8})  # fmt: skip
    trainer, _, summary, _, _ = train_sft(recipe)
    out = recipe.stage_dir("sft")
    assert summary["finetune"] == "lora" and summary["trainable_parameters"] < summary["parameters"]
    reloaded, tokenizer = load_model(out / "model")
    base = reloaded.get_base_model() if hasattr(reloaded, "get_base_model") else reloaded
    code_ids = tokenizer.convert_tokens_to_ids(["<a_105>", "<b_30>", "<c_3>", "<d_75>"])
    word_ids = tokenizer.convert_tokens_to_ids(["user", "item"])
    ids = torch.tensor([code_ids + word_ids])
    with torch.no_grad():
        adapted = reloaded.get_input_embeddings()(ids)[0]
        with reloaded.disable_adapter():
            original = reloaded.get_input_embeddings()(ids)[0]
    assert not torch.allclose(adapted[:4], original[:4])  # identifier rows were trained
    if mode == "trainable_token_indices":
        assert torch.equal(adapted[4:], original[4:])  # and only those rows
    # LoRA matrices moved away from their zero init.
    assert any(p.abs().sum() > 0 for n, p in reloaded.named_parameters() if "lora_B" in n)
    # The reloaded adapter reproduces the trained model's outputs.
    batch = torch.tensor(
        [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "<a_105><b_30><c_3><d_75>"}], add_generation_prompt=True, return_dict=False
            )
        ]
    )
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(batch).logits, reloaded(batch).logits, rtol=1e-5, atol=1e-5)
    assert type(base).__name__ == "LlamaForCausalLM" and base.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_resume_from_last_checkpoint_does_not_redo_steps(shared_data, prepared, tmp_path):
    recipe = recipe_with_data(shared_data, prepared, tmp_path)
    _, _, first, _, _ = train_sft(recipe)
    out = recipe.stage_dir("sft")
    assert first["global_step"] == 4 and first["resumed_from"] is None
    longer = from_dict(Recipe, {**tiny_recipe(shared_data, tmp_path),
                                "sft": {**tiny_recipe(shared_data, tmp_path)["sft"],
                                        "train": {**tiny_recipe(shared_data, tmp_path)["sft"]["train"],
                                                  "max_steps": 6}}})  # fmt: skip
    _, _, second, _, _ = train_sft(longer)
    assert second["resumed_from"].endswith("checkpoint-4") and second["global_step"] == 6
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in log if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-4 come from the checkpoint's history, not from training again


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(RlrecError, match="model path not found"):
        build_for_training(ModelConfig(path=str(tmp_path / "missing")), {}, [], 0)
    from rlrec.models import build_tokenizer, tiny_llama

    tokenizer = build_tokenizer(["a b c"])
    model = tiny_llama(tokenizer, hidden_size=16, layers=1, heads=1)
    model.save_pretrained(tmp_path / "no-eos")
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>")
    bare.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(RlrecError, match="no eos token"):
        build_for_training(ModelConfig(path=str(tmp_path / "no-eos")), {}, [], 0)
    with pytest.raises(ConfigError, match=r"lora.target_modules \['w_nope'\] are not modules of this model"):
        lora_config(LoraConfig(target_modules=["q_proj", "w_nope"]), model, [], "trainable_token_indices")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        resolve_precision(TrainConfig(precision="bf16").precision)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "config, extra, kind",
    [("accelerate_configs/cpu_2proc.yaml", [], "MULTI_CPU"),
     pytest.param("accelerate_configs/zero2.yaml", ["--num_processes", "2", "--mixed_precision", "no"],
                  "DEEPSPEED", marks=pytest.mark.slow(reason="two DeepSpeed processes, its CPU op built once: ~40 s"))],
    ids=["ddp-2-cpu-processes", "deepspeed-zero2"],
)  # fmt: skip
def test_accelerate_launch_two_processes(shared_data, prepared, tmp_path, config, extra, kind):
    import yaml

    recipe = recipe_with_data(shared_data, prepared, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(shared_data, tmp_path)))
    result = launch(config, path, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout
    training = json.loads((recipe.stage_dir("sft") / "metrics.json").read_text())["training"]
    assert training["world_size"] == 2 and training["distributed_type"] == kind and training["global_step"] == 4


def test_tokenised_rows_are_cached_by_content_and_give_the_same_training(shared_data, prepared, tmp_path, capsys):
    recipe = recipe_with_data(shared_data, prepared, tmp_path)
    out = recipe.stage_dir("sft")
    train_sft(recipe)
    assert "tokenised rows cached in" in capsys.readouterr().err
    cache = recipe.stage_dir("data") / "tokenised"
    (key,) = [p.name for p in cache.iterdir()]
    losses = [row["loss"] for row in map(json.loads, (out / "train_log.jsonl").open()) if "loss" in row]

    again = tiny_recipe(shared_data, tmp_path)
    again["sft"]["train"]["resume"] = False  # train again from scratch, on the cached rows
    train_sft(from_dict(Recipe, again))
    assert f"tokenised rows from {cache / key}" in capsys.readouterr().err
    assert [row["loss"] for row in map(json.loads, (out / "train_log.jsonl").open()) if "loss" in row] == losses

    other = tiny_recipe(shared_data, tmp_path)
    other["sft"].update(max_length=96, train={**other["sft"]["train"], "resume": False})
    train_sft(from_dict(Recipe, other))  # other rows for TRL: a new key, and only it is kept
    assert "tokenised rows cached in" in capsys.readouterr().err
    keys = [p.name for p in cache.iterdir()]
    assert len(keys) == 1 and keys[0] != key  # the new rows' key replaced the old one
