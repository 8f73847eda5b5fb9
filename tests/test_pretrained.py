"""The path real users take: a pretrained Qwen3-architecture model with the real Qwen3 tokenizer (`sft.model.path`,
`finetune: auto` -> LoRA), through every stage; the tokenisation check also runs on our word-level tokenizer.

No weights can be downloaded, so a small randomly initialised `Qwen3ForCausalLM` sized to the real tokenizer
(../shared/tokenizers/qwen3: byte-level BPE, ChatML template with the `<think>` block, eos `<|im_end|>`, pad
`<|endoftext|>`, no bos) is saved to a folder that stands in for `Qwen/Qwen3-0.6B`. What the test asserts is what
breaks recommenders silently on that path: the training text and the decoding prompt share the tokens before the
identifier (Qwen3 writes an empty think block into the training text that its generation prompt lacks); every
decoded item is a catalogue item; a beam score is the teacher-forced log-probability of the item's tokens under
the chat template; the published folder reloads and reproduces the stage's test metrics.
"""

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
from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data
from rlrec.decoding.inputs import ModelInputs
from rlrec.decoding.trie import answer_prefix_ids
from rlrec.evaluate import score_lists
from rlrec.models import load_model
from rlrec.schema import LoraConfig, PromptConfig
from tests.conftest import REPO, shared_data_root

QWEN3_TOKENIZER = shared_data_root().parent / "tokenizers" / "qwen3"
THINK_BLOCK = "<think>\n\n</think>\n\n"


def small_qwen3(out: Path) -> Path:
    """A random Qwen3ForCausalLM (hidden 64, 2 layers) with the real Qwen3 tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if not (QWEN3_TOKENIZER / "tokenizer.json").is_file():
        pytest.fail(f"the Qwen3 tokenizer is not at {QWEN3_TOKENIZER} (../shared/tokenizers/qwen3)")
    tokenizer = AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )  # fmt: skip
    Qwen3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen3_folder(tmp_path_factory) -> Path:
    return small_qwen3(tmp_path_factory.mktemp("qwen3-small"))


def test_qwen3_tries_for_ids_titles_and_semantic_ids(qwen3_folder):
    """Each identifier kind with the real tokenizer: items end at `<|im_end|>`, start after the think block, keep
    the in-context tokens, and a constrained beam over a random model only returns catalogue items."""
    from rlrec.items.tokens import add_code_tokens, resize_model

    model, tokenizer = load_model(qwen3_folder)
    kinds = {
        "id": {"1": "1", "12": "12", "123": "123"},  # prefixes of each other: the stop token separates them
        "title": {"a": "Toy Story (1995)", "b": "Toy Story 2 (1999)", "c": " leading space"},
        "sid": {"a": "<a_1><b_2><c_3>", "b": "<a_1><b_2><c_4>", "c": "<a_2><b_2><c_3>"},
    }
    add_code_tokens(tokenizer, ["<a_1>", "<a_2>", "<b_2>", "<c_3>", "<c_4>"])
    resize_model(model, tokenizer)
    prompt = answer_prefix_ids(tokenizer)
    assert tokenizer.decode(prompt) == THINK_BLOCK
    for kind, identifiers in kinds.items():
        trie = ModelInputs.build(tokenizer, identifiers, from_dict(PromptConfig, {"identifier": kind})).trie
        for item, sequence in zip(trie.item_ids, trie.sequences, strict=True):
            assert tokenizer.convert_ids_to_tokens(sequence[-1]) == "<|im_end|>"
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": identifiers[item]}], tokenize=False
            )
            decoded = tokenizer.decode(sequence)
            assert rendered.endswith(THINK_BLOCK + decoded + "\n"), (kind, decoded)
        if kind == "sid":  # one token per code, not BPE pieces
            assert [len(seq) for seq in trie.sequences] == [4, 4, 4]
        ranked = rlrec.decoding.recommend(model, tokenizer, ["History: 1"], k=3, trie=trie)[0]
        assert sorted(item for item, _ in ranked) == sorted(identifiers)


def test_templates_that_cannot_agree_fail_clearly(qwen3_folder):
    from transformers import AutoTokenizer

    from rlrec.errors import ConfigError, RlrecError
    from rlrec.training.arguments import lora_config

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_folder))
    tokenizer.chat_template = (  # a generation prompt that is not the start of the template's assistant turn
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}"
    )
    with pytest.raises(RlrecError, match="generation prompt .* is not the start of its assistant turn"):
        answer_prefix_ids(tokenizer)
    model, _ = load_model(qwen3_folder)
    with pytest.raises(ConfigError, match=r"\['qkv'\] are not modules of this model; linear layers here: .*'q_proj'"):
        lora_config(from_dict(LoraConfig, {"target_modules": ["q_proj", "qkv"]}), model, [], "trainable_token_indices")
    import peft  # the default targets every projection of Qwen's attention and MLP, not the output layer

    adapted = peft.get_peft_model(model, lora_config(LoraConfig(), model, [], "trainable_token_indices"))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_on_the_top_layers_only(qwen3_folder):
    """`lora.top_layers`: every projection of the top N decoder layers adapted, nothing below them, and backward
    leaves the layers below without gradients; more layers than the model has is a clear error."""
    import peft

    from rlrec.errors import ConfigError
    from rlrec.training.arguments import lora_config

    model, _ = load_model(qwen3_folder)
    depth = model.config.num_hidden_layers
    assert depth >= 2
    with pytest.raises(ConfigError, match=f"lora.top_layers {depth + 1}: this model has {depth} decoder layers"):
        lora_config(LoraConfig(top_layers=depth + 1), model, [], "trainable_token_indices")
    adapted = peft.get_peft_model(model, lora_config(LoraConfig(top_layers=1), model, [], "trainable_token_indices"))
    wrapped = [name for name, module in adapted.named_modules() if hasattr(module, "lora_A")]
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in wrapped} == {depth - 1}
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == projections
    needs_grad = {}  # which layers' outputs autograd keeps a graph for: only the adapted ones
    layers = adapted.get_base_model().model.layers
    for index in (0, depth - 1):
        layers[index].register_forward_hook(
            lambda module, args, output, index=index: needs_grad.update({index: output[0].requires_grad})
        )
    ids = torch.tensor([[1, 2, 3, 4]])
    adapted(input_ids=ids, labels=ids).loss.backward()
    assert needs_grad == {0: False, depth - 1: True}
    assert all(parameter.grad is not None for name, parameter in adapted.named_parameters() if "lora_A" in name)


def pipeline_recipe(out: Path, identifier: str, model_path: Path | None, rollout: str) -> dict:
    """Every stage on a small synthetic run: items (sid), data, SFT (LoRA on a pretrained path, full from scratch),
    GRPO with `rollout`, S-DPO, eval."""
    train = {"logging_steps": 2, "save_steps": 100, "report_to": [], "threads": 1}
    guard = {"eval_steps": 2, "users": 8, "patience": 2}
    recipe = {
        "name": f"pre-{identifier}", "output_dir": str(out), "seed": 0,
        "data": {"source": {"format": "synthetic",
                            "synthetic": {"num_users": 60, "num_items": 30, "num_categories": 4, "seed": 0}},
                 "split": {"method": "leave_one_out", "max_history": 4}, "prompt": {"identifier": identifier}},
        "sft": {"model": {"path": str(model_path)} if model_path else {"hidden_size": 32, "layers": 1, "heads": 2},
                "lora": {"r": 4, "alpha": 8},
                "train": {**train, "max_steps": 4, "batch_size": 8, "learning_rate": 0.01},
                "max_length": 256, "eval_splits": ["test"], "eval_max_users": 8},
        "grpo": {"rollout": rollout, "num_generations": 4, "prompts_per_device": 2, "rewards": {"hit": 1.0},
                 "train": {**train, "max_steps": 2, "learning_rate": 0.001}, "guard": guard,
                 "eval_splits": ["test"], "eval_max_users": 8},
        "dpo": {"loss": "sdpo", "negatives": {"hard": 2, "popular": 1}, "train_rows": "last",
                "train": {**train, "max_steps": 2, "batch_size": 2, "learning_rate": 0.001}, "guard": guard,
                "eval_splits": ["test"], "eval_max_users": 8},
        "eval": {"ks": [1, 5, 10], "batch_size": 8, "max_users": 8},
        "pipeline": {"launcher": "python"},  # the recipe test below goes through `accelerate launch`
    }  # fmt: skip
    if identifier == "sid":
        recipe["items"] = {"attributes": ["category"], "codebook_sizes": [4, 8], "balanced": True}
    return recipe


def run_pipeline(recipe: dict, out: Path) -> Path:
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, "-m", "rlrec.cli", "pipeline", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out / recipe["name"]


def assert_training_text_is_the_decoding_prompt(model, tokenizer, data, out: Path) -> tuple[ModelInputs, list]:
    """TRL's own SFT tokenisation of test rows (a real `SFTTrainer`) starts with the decoding prompt followed by the
    target's trie tokens; the prompt carries no loss and the identifier does. Returns the inputs and prompts."""
    from trl import SFTConfig, SFTTrainer

    inputs = ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    rows = data.rows("test", 6)
    prompts = inputs.prompt_ids(tokenizer, rows)
    pairs = Dataset.from_dict({"prompt": rows["prompt"], "completion": rows["completion"]})
    args = SFTConfig(output_dir=str(out / "trl"), report_to=[], use_cpu=True, max_length=None)
    tokenised = SFTTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer).train_dataset
    position = {item: i for i, item in enumerate(inputs.trie.item_ids)}
    for prompt, target, row in zip(prompts, rows["target"], tokenised, strict=True):
        item_tokens = inputs.trie.sequences[position[target]]
        assert row["input_ids"][: len(prompt) + len(item_tokens)] == prompt + item_tokens
        start = len(prompt)  # TRL's labels: the token where trained, -100 where not
        assert row["labels"][start : start + len(item_tokens)] == item_tokens  # the identifier is in TRL's loss
        assert set(row["labels"][: len(prompt) - len(inputs.answer)]) == {-100}  # the prompt is not
    return inputs, prompts


def check_pretrained_run(run: Path, final: str, out: Path) -> None:
    """What a user's Qwen3 run must give: LoRA on the pretrained folder, only catalogue items from every stage and
    every GRPO rollout, training text == decoding prompt + item tokens (after the think block), beam scores equal to
    the teacher-forced log-probabilities, and a published folder that reproduces the final stage's test metrics."""
    data = load_run_data(run / "data")
    assert (run / "sft" / "model" / "adapter_config.json").is_file()
    for stage in ("sft", final):
        metrics = json.loads((run / stage / "metrics.json").read_text())["test"]
        assert metrics["metrics"]["valid_rate"] == 1.0, stage  # every decoded item is a catalogue item
    if (run / "grpo").is_dir():
        rollouts = [json.loads(line) for line in (run / "grpo" / "train_log.jsonl").open()]
        valid = [r["rollout/valid_rate"] for r in rollouts if "rollout/valid_rate" in r]
        assert valid and all(v == 1.0 for v in valid)

    model, tokenizer = load_model(run / final / "model")
    inputs, prompts = assert_training_text_is_the_decoding_prompt(model, tokenizer, data, out)
    assert tokenizer.decode(inputs.answer) == THINK_BLOCK
    assert tokenizer.decode(prompts[0]).endswith("<|im_start|>assistant\n" + THINK_BLOCK)
    assert tokenizer.convert_ids_to_tokens(inputs.trie.stop_token) == "<|im_end|>"
    if data.stats["identifier"] == "sid":  # codes are single added tokens, not BPE pieces
        assert len(inputs.trie.sequences[0]) == data.identifiers[data.item_ids[0]].count("<") + 1

    # Beam scores are the teacher-forced log-probabilities of the same completions under the chat template.
    position = {item: i for i, item in enumerate(inputs.trie.item_ids)}
    ranked = rlrec.decoding.recommend(model, tokenizer, prompts[:3], k=5, trie=inputs.trie)
    for prompt, items in zip(prompts[:3], ranked, strict=True):
        assert len(items) == 5 and all(item in data.identifiers for item, _ in items)
        for item, score in items:
            tokens = inputs.trie.sequences[position[item]]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
            forced = float(logprobs.gather(1, torch.tensor(tokens).unsqueeze(1)).sum())
            assert forced == pytest.approx(score, abs=1e-3)

    # The published folder reloads and reproduces the stage's test metrics.
    folder = out / "published"
    result = subprocess.run([sys.executable, "-m", "rlrec.cli", "publish", str(run / final), "--repo-id",
                             "someone/rec", "--dry-run", "--out", str(folder)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stage_test = json.loads((run / final / "metrics.json").read_text())["test"]
    recommender = rlrec.load(folder)
    test_rows = data.rows("test", stage_test["num_users"])
    lists = recommender.recommend_batch(test_rows["history"], k=max(recommender.eval.ks))
    scored = score_lists([[item for item, _ in r] for r in lists], test_rows["target"], data, recommender.eval.ks)
    assert scored == stage_test["metrics"]


# Titles with beam rollouts on Qwen3 run in the MovieLens recipe test below (through `accelerate launch`); the
# from-scratch word-level pipelines in test_pipeline.py.
@pytest.mark.slow(reason="a whole pipeline (items, data, SFT, GRPO, S-DPO, eval, publish) with a 151k-token model")
def test_whole_pipeline_on_a_pretrained_path_with_semantic_ids_and_sampled_rollouts(qwen3_folder, tmp_path):
    run = run_pipeline(pipeline_recipe(tmp_path, "sid", qwen3_folder, "sample"), tmp_path)
    check_pretrained_run(run, "dpo", tmp_path)
    assert json.loads((run / "sft" / "metrics.json").read_text())["test"]["num_users"] == 8


def test_our_template_adds_nothing_between_prompt_and_answer(tmp_path):
    """The from-scratch path (our word-level tokenizer and chat template): no answer prefix, and TRL's tokenised
    training rows are the decoding prompt followed by the item's trie tokens, for titles (several words each)."""
    from rlrec.models import build_for_training
    from rlrec.recipe import Recipe
    from rlrec.schema import ModelConfig
    from rlrec.stages import data as data_stage
    from rlrec.stages.sft import tokenizer_texts

    recipe = from_dict(Recipe, pipeline_recipe(tmp_path, "title", None, "beam"))
    data_stage.run(recipe)
    data = load_run_data(recipe.stage_dir("data"))
    texts = tokenizer_texts(data.dataset, data.catalog_rows, with_titles=False)
    model, tokenizer, _ = build_for_training(ModelConfig(hidden_size=16, layers=1, heads=1), data.identifiers,
                                             texts, seed=0)  # fmt: skip
    inputs, _ = assert_training_text_is_the_decoding_prompt(model, tokenizer, data, tmp_path)
    assert inputs.answer == []
    assert max(len(sequence) for sequence in inputs.trie.sequences) > 2  # titles of several tokens


# --- the shipped GPU recipes, run on CPU with the small model and a handful of steps ---------------------------------

QWEN_RECIPES = ["movielens-100k/qwen3_title.yaml", "amazon18-scientific/qwen3_sid.yaml",
                "minionerec-industrial/qwen2.5_sid.yaml"]  # fmt: skip


def cpu_overrides(recipe_path: Path, model: Path, shared_data: Path, out: Path) -> list[str]:
    """What turns a GPU recipe into a CPU smoke run: the small local model instead of the hub id, one process,
    two steps a stage of small batches and short histories, a few users for selection, the guards and evaluation.
    The recipes with an items stage take a ready index from the shared data (Scientific's `rqvae_zcr` IDs instead of
    embedding and quantising 4,344 items)."""
    recipe = yaml.safe_load(recipe_path.read_text())
    source = Path(recipe["data"]["source"]["path"]).name
    few = ["train.max_steps=2", "guard.users=8", "guard.eval_steps=2", "eval_max_users=8", "max_train_prompts=8"]
    batch = {"grpo": ["prompts_per_device=1", "num_generations=4"], "dpo": ["train.batch_size=2"]}
    overrides = [
        f"output_dir={out}", f"sft.model.path={model}", f"data.source.path={shared_data / source}",
        "data.split.max_history=3",  # short prompts: every row's logits span the 151k-token vocabulary
        f"pipeline.accelerate_config={REPO / 'accelerate_configs/single.yaml'}",
        "sft.train.max_steps=2", "sft.train.batch_size=2", "sft.max_train_rows=16", "sft.select.users=8",
        "sft.eval_max_users=8", "sasrec.max_epochs=1", "eval.max_users=8", "eval.ks=[1,5,10]", "eval.beam_width=10",
        # the plain output layer scores only the labelled positions: on CPU the cheaper one (docs/sft.md); the fused
        # kernel a GPU run of a title recipe gets is compared with it in test_upstream.py
        *[f"{stage}.train.lm_head=plain" for stage in ("sft", "grpo", "dpo") if stage in recipe],
        *[f"{stage}.{o}" for stage in ("grpo", "dpo") if stage in recipe for o in [*few, *batch[stage]]],
    ]  # fmt: skip
    if "items" in recipe:  # a ready index on the shared data: the recipe's own, or the ready Scientific IDs
        ready = recipe["items"].get("index_path", f"{source}/indexes/rqvae_zcr/Scientific.index.json")
        overrides.append(f"items.index_path={shared_data / ready.split('shared/data/')[-1]}")
    return overrides


@pytest.mark.slow(reason="three shipped recipes, each a whole pipeline on real data with a 151k-token model")
@pytest.mark.parametrize("name", QWEN_RECIPES)
def test_gpu_recipe_runs_on_cpu_with_a_small_local_model(name, qwen3_folder, shared_data, tmp_path):
    path = REPO / "recipes" / name
    recipe = yaml.safe_load(path.read_text())
    assert recipe["sft"]["model"]["path"].startswith("Qwen/") and recipe["sft"]["finetune"] == "lora"
    assert yaml.safe_load((REPO / recipe["pipeline"]["accelerate_config"]).read_text())["mixed_precision"] == "bf16"
    command = [sys.executable, "-m", "rlrec.cli", "pipeline", "--config", str(path),
               *cpu_overrides(path, qwen3_folder, shared_data, tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run = tmp_path / recipe["name"]
    last = "grpo" if "grpo" in recipe else "dpo"
    metrics = json.loads((run / last / "metrics.json").read_text())
    assert metrics["test"]["metrics"]["valid_rate"] == 1.0 and metrics["test"]["num_users"] == 8
    adapter = json.loads((run / "sft" / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(qwen3_folder)  # the override reached the model loader
    summary = (run / "summary.md").read_text()
    assert "| sft |" in summary and f"| {last} |" in summary
    if name.startswith("movielens"):  # Qwen3 titles with beam rollouts: the user's path, checked in full
        check_pretrained_run(run, last, tmp_path)
