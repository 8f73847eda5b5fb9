"""Models and tokenizers: load any causal LM, or build a small Llama plus a tokenizer offline.

No weights can be downloaded here, so tests, the demo and CPU benchmarks build a model from a config:
- `build_tokenizer(texts, extra_tokens)`: a `tokenizers` WordLevel tokenizer over the words of the prompts and
  identifiers, with every semantic-ID code as one added token, eos/pad/unk, and a chat template whose assistant
  turn is wrapped in `{% generation %}` (TRL's `assistant_only_loss` needs it);
- `tiny_llama(tokenizer, ...)`: a Llama-architecture `LlamaForCausalLM` from a config (Llama, not Qwen2: with a
  Qwen2 config transformers 5's `AutoTokenizer` silently ignores a custom tokenizer.json and builds a
  `Qwen2Tokenizer`, because "qwen2" is in its `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`);
- `tiny_phi(tokenizer, ...)`: a Phi-architecture `PhiForCausalLM`, for the dropout Llama does not have.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from rlrec.errors import RlrecError
from rlrec.items.index import CODE_IN_TEXT, identifier_codes
from rlrec.items.tokens import add_code_tokens, check_round_trip, resize_model
from rlrec.schema import ModelConfig

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_tokenizer(texts: Iterable[str], extra_tokens: Iterable[str] = (), min_count: int = 1):
    """A word-level tokenizer for `texts` (prompts and identifiers). Code tokens such as `<a_12>` found in the
    texts, and `extra_tokens`, become added tokens: one id each, matched before the words are split."""
    extra = list(dict.fromkeys(extra_tokens))
    words: Counter = Counter()
    pre = _pre_tokenizer()
    for text in texts:
        codes = CODE_IN_TEXT.findall(text)
        extra.extend(c for c in codes if c not in extra)
        words.update(w for w, _ in pre.pre_tokenize_str(CODE_IN_TEXT.sub(" ", text)))
    specials = [PAD, EOS, UNK, *ROLE_TOKENS]
    vocab = {token: i for i, token in enumerate(specials)}
    for word, count in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if count >= min_count and word not in vocab:
            vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in dict.fromkeys(extra)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, chat_template=CHAT_TEMPLATE
    )
    tokenizer.padding_side = "left"  # generation pads on the left
    return tokenizer


def tiny_llama(
    tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 2, intermediate_size: int | None = None,
    max_position_embeddings: int = 1024, seed: int = 0,
) -> LlamaForCausalLM:  # fmt: skip
    """A from-scratch Llama sized to the tokenizer (tied input/output embeddings)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def tiny_phi(
    tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 2, intermediate_size: int | None = None,
    dropout: float = 0.0, max_position_embeddings: int = 1024, seed: int = 0,
) -> PhiForCausalLM:  # fmt: skip
    """A from-scratch Phi sized to the tokenizer (tied embeddings, rotary on every dimension), with dropout on the
    embeddings (`embd_pdrop`), the attention weights (`attention_dropout`) and the residual branches
    (`resid_pdrop`): active in train mode, off in eval mode."""
    torch.manual_seed(seed)
    config = PhiConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings, partial_rotary_factor=1.0,
        embd_pdrop=dropout, resid_pdrop=dropout, attention_dropout=dropout,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )  # fmt: skip
    return PhiForCausalLM(config)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template ours (with generation tags); one without eos is an error."""
    if tokenizer.eos_token_id is None:
        raise RlrecError("the tokenizer has no eos token; set one (tokenizer.eos_token) before training")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE


GGUF_SOURCE = "rlrec_gguf.json"  # in a converted folder: the GGUF file it came from and its SHA-256


def cache_root() -> Path:
    """Where rlrec keeps what it derives once per machine (converted GGUF models): `$RLREC_CACHE`, else
    `$XDG_CACHE_HOME/rlrec`, else `~/.cache/rlrec`."""
    if os.environ.get("RLREC_CACHE"):
        return Path(os.environ["RLREC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlrec"


def model_folder(path: str) -> str:
    """A model as users have it -> what `from_pretrained` reads. A folder or hub id is returned as it is. A `.gguf`
    file (llama.cpp's format, in which many small models ship; SmolLM2-135M-Instruct in ../shared/models) is
    dequantised once into an ordinary folder under `cache_root()/gguf/`, keyed by the file's SHA-256, and that
    folder is reused afterwards: a 135M model's GGUF takes ~25 s to read, the folder about 1 s."""
    if not path.endswith(".gguf"):
        return path
    from rlrec.manifest import hash_path

    file = Path(path).expanduser()
    if not file.is_file():
        raise RlrecError(f"model path not found: {path}")
    digest = hash_path(file)
    folder = cache_root() / "gguf" / f"{file.stem}-{digest[:16]}"
    if not (folder / GGUF_SOURCE).is_file():
        convert_gguf(file, folder, digest)
    return str(folder)


def convert_gguf(file: Path, folder: Path, digest: str) -> None:
    """Read a GGUF file with transformers' own reader (it dequantises to float32), rebuild the model as its plain
    class (transformers refuses to save a GGUF-loaded model), and save it with its tokenizer and chat template.
    Written into a temporary sibling and renamed when complete: a killed conversion leaves no half folder, and two
    processes converting at once both end with the same complete folder."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"rlrec: converting {file} to a model folder in {folder} (once per file)", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except ImportError as err:
        raise RlrecError(f"reading {file} needs the `gguf` package ({err}); install rlrec[gguf]") from None
    except (OSError, ValueError) as err:
        raise RlrecError(f"cannot read {file} as a GGUF model: {err}") from None
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32 tensors
    config.name_or_path = str(file)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(work)  # float32: exactly the dequantised weights (the GGUF blocks are not bf16-exact)
        tokenizer.save_pretrained(work)
        (work / GGUF_SOURCE).write_text(json.dumps({"gguf": str(file.resolve()), "sha256": digest}) + "\n")
        os.replace(work, folder)
    except OSError:
        if not (folder / GGUF_SOURCE).is_file():  # not another process's complete folder: a real failure
            raise
    finally:
        if work.exists():
            shutil.rmtree(work)


def _load_pretrained(path: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (os.path.sep in path or path.startswith(".")) and not os.path.exists(path):
        raise RlrecError(f"model path not found: {path}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    folder = model_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except OSError as err:
        raise RlrecError(f"cannot load model {path!r}: {err}") from None
    # what an adapter names as its base: the user's model, a local one by its absolute path (an adapter published
    # or loaded from another folder still finds it); a hub id as it is
    model.name_or_path = model.config.name_or_path = os.path.abspath(path) if os.path.exists(path) else path
    return model, tokenizer


def build_for_training(config: ModelConfig, identifiers: Mapping[str, str], texts: Iterable[str], seed: int):
    """(model, tokenizer, identifier token ids). Semantic-ID code tokens are added to the tokenizer and the
    embeddings resized; their ids are returned so that the stage can make exactly those rows trainable."""
    codes = identifier_codes(identifiers)
    if config.from_scratch:
        tokenizer = build_tokenizer([*texts, *identifiers.values()], codes)
        if config.architecture == "phi":
            model = tiny_phi(tokenizer, config.hidden_size, config.layers, config.heads, config.intermediate_size,
                             config.dropout, seed=seed)  # fmt: skip
        else:
            model = tiny_llama(tokenizer, config.hidden_size, config.layers, config.heads, config.intermediate_size,
                               seed=seed)  # fmt: skip
    else:
        model, tokenizer = _load_pretrained(config.path, config.dtype)
        ensure_chat_template(tokenizer)
    token_ids = add_code_tokens(tokenizer, codes) if codes else []
    if codes:  # a base tokenizer that splits or normalises a code token would train on other ids than it decodes
        check_round_trip(tokenizer, identifiers)
    resize_model(model, tokenizer)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, token_ids


BASE_MODEL_DIR = "base_model"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole, or None: its header (8-byte length, then JSON) must parse and its
    tensors must end exactly at the end of the file (a truncated copy fails here, not in a library traceback)."""
    size = path.stat().st_size
    if size < 8:
        return f"{path}: {size} bytes, not a safetensors file (empty or truncated)"
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > size - 8:
            return f"{path}: truncated (the header says {length:,} bytes of metadata, the file has {size:,})"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return f"{path}: the safetensors header is not valid JSON (corrupted)"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{path}: truncated or padded ({size:,} bytes, the tensors it lists need {8 + length + end:,})"
    return None


def model_folder_problems(path: Path, tokenizer: bool = True) -> list[str]:
    """What a saved model folder (a full model, or a LoRA adapter) lacks to load: config, weights (whole), tokenizer
    (not for a from-scratch `base_model/`, which loads with its adapter's). Empty when it is complete."""
    adapter = (path / "adapter_config.json").is_file()
    config = "adapter_config.json" if adapter else "config.json"
    problems = [] if (path / config).is_file() else [f"{path / config} (the model's config) is missing"]
    for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer else ():
        if not (path / name).is_file():
            problems.append(f"{path / name} (the tokenizer with the identifier tokens) is missing")
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    index = path / f"{weights}.index.json"
    if index.is_file():  # sharded: every shard the index names
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            return [*problems, f"{index}: not a safetensors index (corrupted)"]
        files = [path / shard for shard in shards]
    else:
        files = [path / weights]
    for file in files:
        if not file.is_file():
            problems.append(f"{file} (the {'adapter' if adapter else 'model'} weights) is missing")
        elif (problem := safetensors_problem(file)) is not None:
            problems.append(problem)
    return problems


def load_model(path: str | Path, device: str | None = None, trainable: bool = False):
    """Load a stage's model folder (full model, or LoRA adapter) with its tokenizer, for inference (or, with
    `trainable`, for a later stage that continues training the adapter).

    For an adapter, the base model named in `adapter_config.json` is loaded and resized to the saved tokenizer
    (identifier tokens added during training) before the adapter is applied; a from-scratch base is saved beside
    the adapter as `../base_model` (or inside a published folder as `base_model/`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise RlrecError(f"model path not found: {path}")
    problems = model_folder_problems(path)
    if problems:
        raise RlrecError(f"{path}: cannot load the model: " + "; ".join(problems))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_name = json.loads(adapter.read_text())["base_model_name_or_path"]
        # a from-scratch base: inside a published folder, or beside the adapter in runs/<name>/<stage>/
        local = [p for p in (path / BASE_MODEL_DIR, path.parent / BASE_MODEL_DIR) if p.is_dir()]
        if local and (problems := model_folder_problems(local[0], tokenizer=False)):
            raise RlrecError(f"{path}: cannot load the adapter's base model: " + "; ".join(problems))
        base = AutoModelForCausalLM.from_pretrained(str(local[0]) if local else model_folder(base_name))
        if base.get_input_embeddings().weight.shape[0] != len(tokenizer):
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path))
    if device is not None:
        model.to(device)
    return (model.train() if trainable else model.eval()), tokenizer
