"""The real pretrained model through the whole kit: SmolLM2-135M-Instruct (../shared/models, GGUF, converted once
into the rlrec cache by the file's hash). What breaks recommenders silently on a real model is asserted here:
items end at the token the training text ends them with even though the tokenizer pads with its eos, that end
token carries loss, every decoded item is a catalogue item, beam scores are the teacher-forced log-probabilities,
and the published adapter (on the referenced, not copied, base) reloads through `rlrec.load` and reproduces the
stage's metrics. The shipped recipe runs with a handful of steps of SFT, GRPO and S-DPO and 20 evaluation users."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

import rlrec
from rlrec.config import from_dict, load_config
from rlrec.data.prepared import load_run_data
from rlrec.decoding import recommend
from rlrec.decoding.inputs import ModelInputs
from rlrec.evaluate import eval_rows, score_lists
from rlrec.models import build_for_training, load_model
from rlrec.recipe import Recipe
from rlrec.schema import LoraConfig, ModelConfig, PromptConfig
from tests.conftest import REPO, shared_data_root

RECIPE = REPO / "recipes/movielens-100k/smollm2_title.yaml"
GGUF = shared_data_root().parent / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = 2  # <|im_end|>: SmolLM2's eos, and its padding token


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not GGUF.is_file():
        pytest.fail(f"SmolLM2 is not at {GGUF} (../shared/models/smollm2-135m-instruct)")
    return GGUF


@pytest.fixture(scope="module")
def pipeline_run(smollm2, shared_data, tmp_path_factory) -> Path:
    """The shipped MovieLens recipe on the real model, every stage a few steps, 20 evaluation users."""
    out = tmp_path_factory.mktemp("smollm2")
    guard = ["guard.users=5", "guard.eval_steps=1", "max_train_prompts=4", "train.max_steps=1"]
    overrides = [
        f"output_dir={out}", f"sft.model.path={smollm2}", f"data.source.path={shared_data / 'movielens-100k'}",
        "pipeline.launcher=python", "eval.users=20",  # the accelerate path is tested with the small Qwen3
        "sasrec.max_epochs=1", "sft.max_train_rows=8", "sft.train.max_steps=2", "sft.train.grad_accum=2",
        "sft.select=null",
        "grpo.num_generations=4", "grpo.prompts_per_device=2", "grpo.train.grad_accum=4",
        *[f"{stage}.{o}" for stage in ("grpo", "dpo") for o in guard],
    ]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "rlrec.cli", "pipeline", "--config", str(RECIPE), *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return out / yaml.safe_load(RECIPE.read_text())["name"]


def test_chat_items_end_at_im_end_and_it_carries_loss_though_it_pads(smollm2, tmp_path):
    """Chat format on SmolLM2's template: an item ends at `<|im_end|>` (the tokenizer's pad too), its own system
    prompt stays in both the training text and the decoding prompt, and TRL's collated SFT batch keeps that end token
    in the loss while the padding after it is out."""
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, _ = build_for_training(ModelConfig(path=str(smollm2), dtype="float32"), {}, [], seed=0)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == IM_END
    identifiers = {"1": "Toy Story (1995)", "2": "Heat (1995)", "3": "Toy Story 2 (1999)"}
    prompt = from_dict(PromptConfig, {"identifier": "title", "template": "Watched: {history}. Next?"})
    inputs = ModelInputs.build(tokenizer, identifiers, prompt)
    assert inputs.trie.stop_token == IM_END and all(s.count(IM_END) == 1 for s in inputs.trie.sequences)
    messages = [[{"role": "user", "content": "Watched: Heat (1995). Next?"}]]
    decoding_prompt = tokenizer.decode(inputs.prompt_ids(tokenizer, {"prompt": messages, "history": [["2"]]})[0])
    assert decoding_prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    rows = Dataset.from_dict(
        {"prompt": messages * 3, "completion": [[{"role": "assistant", "content": t}] for t in identifiers.values()]}
    )
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    tokenised = trainer.train_dataset
    batch = trainer.data_collator([tokenised[i] for i in range(3)])  # TRL's own padding of a batch
    for row, item in enumerate(identifiers):
        length = len(tokenised[row]["input_ids"])
        sequence = inputs.trie.sequences[inputs.trie.item_ids.index(item)]
        end = length - 2  # the template writes "<|im_end|>\n" after the title
        assert batch["input_ids"][row, end - len(sequence) + 1 : end + 1].tolist() == sequence  # = the trie's tokens
        assert batch["labels"][row, end] == IM_END  # the item's end token is learned
        assert (batch["labels"][row, length:] == -100).all()  # the padding after it (the same id) is not


@pytest.mark.slow(reason="the whole recipe (SFT, GRPO, S-DPO, zero-shot, eval, publish) on a real 135M model")
def test_smollm2_recipe_end_to_end(pipeline_run, tmp_path):
    run = pipeline_run
    data = load_run_data(run / "data")
    recipe = load_config(Recipe, run / "recipe.yaml")
    test_rows = eval_rows(data, "test", recipe.eval)
    for stage in ("zero_shot", "sft", "grpo", "dpo"):
        metrics = json.loads((run / stage / "metrics.json").read_text())
        assert metrics["test"]["metrics"]["valid_rate"] == 1.0, stage  # every decoded item is a catalogue item
        assert metrics["test"]["num_users"] == 20 == len(test_rows), stage
        assert metrics["protocol"]["users_sample"] == 20
    rollouts = [json.loads(line) for line in (run / "grpo" / "train_log.jsonl").open()]
    assert [r["rollout/valid_rate"] for r in rollouts if "rollout/valid_rate" in r] == [1.0]
    assert json.loads((run / "sft" / "metrics.json").read_text())["training"]["tokens_per_cpu_second"] > 0

    # The SFT rows TRL trained on: each title ends with its newline token, and that token carries loss.
    model, tokenizer = load_model(run / "sft" / "model")
    inputs = ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert all(sequence[-len(newline) :] == newline for sequence in inputs.trie.sequences)
    (cached,) = (run / "data" / "tokenised").iterdir()
    from datasets import load_from_disk

    for row in load_from_disk(str(cached)).select(range(4)):
        ends = [i for i, token in enumerate(row["input_ids"]) if token == newline[-1] and i >= len(inputs.prefix)]
        assert len(ends) > 1 and all(row["labels"][i] == newline[-1] for i in ends[1:])  # each target's end learned

    # Beam scores are the teacher-forced log-probabilities of the same completions.
    prompts = inputs.prompt_ids(tokenizer, test_rows.select(range(2)))
    position = {item: i for i, item in enumerate(inputs.trie.item_ids)}
    for prompt, items in zip(prompts, recommend(model, tokenizer, prompts, k=5, trie=inputs.trie), strict=True):
        for item, score in items:
            tokens = inputs.trie.sequences[position[item]]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
            assert float(logprobs.gather(1, torch.tensor(tokens).unsqueeze(1)).sum()) == pytest.approx(score, abs=2e-3)

    # The published adapter references the GGUF base (not copied) and reproduces the stage's test metrics.
    folder = tmp_path / "published"
    result = subprocess.run([sys.executable, "-m", "rlrec.cli", "publish", str(run / "dpo"), "--repo-id", "me/rec",
                             "--dry-run", "--out", str(folder)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == recipe.sft.model.path
    assert not (folder / "base_model").exists() and not (folder / "model.safetensors").exists()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf` (GGUF, sha256" in (folder / "README.md").read_text()
    recommender = rlrec.load(folder)
    lists = recommender.recommend_batch(test_rows["history"], k=max(recommender.eval.ks))
    scored = score_lists([[item for item, _ in r] for r in lists], test_rows["target"], data, recommender.eval.ks)
    assert scored == json.loads((run / "dpo" / "metrics.json").read_text())["test"]["metrics"]


def test_semantic_id_rows_train_through_the_tied_output_layer(smollm2):
    """SmolLM2 ties its output layer to its input embedding. Code tokens added for semantic IDs and trained under
    LoRA (`trainable_token_indices`) must change both: the logit of a code token is the hidden state times the
    token's trained embedding row, and no other row moves."""
    import peft

    from rlrec.training.arguments import lora_config
    from rlrec.upstream import unwrap_peft

    identifiers = {"1": "<a_1><b_2>", "2": "<a_1><b_3>", "3": "<a_2><b_2>"}
    model, tokenizer, token_ids = build_for_training(ModelConfig(path=str(smollm2), dtype="float32"), identifiers,
                                                     [], seed=0)  # fmt: skip
    assert len(token_ids) == 4 and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    initial = model.get_input_embeddings().weight[token_ids].detach().clone()
    wrapped = peft.get_peft_model(model, lora_config(from_dict(LoraConfig, {"r": 4}), model, token_ids,
                                                     "trainable_token_indices"))  # fmt: skip
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    base = unwrap_peft(wrapped)
    rows = base.get_input_embeddings()(torch.tensor(token_ids))  # the trained rows, through the adapter
    hidden = torch.randn(2, base.config.hidden_size, generator=torch.Generator().manual_seed(1))
    logits = base.get_output_embeddings()(hidden)
    assert torch.allclose(logits[:, token_ids], hidden @ rows.T, atol=1e-4)  # the head reads the trained rows
    original = base.get_input_embeddings()(torch.tensor([5, 100]))
    assert torch.allclose(logits[:, [5, 100]], hidden @ original.T, atol=1e-4)  # other rows unchanged
    assert not torch.allclose(rows, initial)  # the rows did move
