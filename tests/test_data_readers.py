"""Readers on the real files in ../shared/data, and their failure modes on corrupted copies."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from rlrec.config import from_dict
from rlrec.data import read_source
from rlrec.data.filters import kcore
from rlrec.data.types import Interactions
from rlrec.errors import ConfigError, DataError
from rlrec.schema import SourceConfig
from tests.conftest import minionerec_copy, run_cli


def source(**kwargs) -> SourceConfig:
    return from_dict(SourceConfig, kwargs)


# ------------------------------------------------------------------ MovieLens


def test_movielens_100k_counts_and_order(shared_data):
    raw = read_source(source(format="movielens", path=str(shared_data / "movielens-100k")))
    assert len(raw.catalog) == 1682
    assert raw.interactions.num_users == 943
    assert raw.interactions.num_interactions == 100_000
    assert raw.catalog["1"].title == "Toy Story (1995)"
    assert raw.catalog["1"].attributes["genres"] == "Animation, Children's, Comedy"
    # Latin-1 titles decode (u.item has byte 0xE9).
    assert any("\u00e9" in item.title for item in raw.catalog.items.values())
    for user, stamps in raw.interactions.timestamps.items():
        assert stamps == sorted(stamps), user
    assert not raw.skipped


def test_movielens_1m_layout_reads_by_the_same_code_path(shared_data, tmp_path):
    """Write ML-100K in the ML-1M layout (`::`, ratings.dat, movies.dat) and get identical sequences."""
    ml = shared_data / "movielens-100k"
    lines = (ml / "u.data").read_text().splitlines()
    (tmp_path / "ratings.dat").write_text("\n".join("::".join(line.split("\t")) for line in lines) + "\n")
    movies = []
    for line in (ml / "u.item").read_bytes().decode("latin-1").splitlines():
        fields = line.split("|")
        movies.append(f"{fields[0]}::{fields[1]}::Drama|Comedy")
    (tmp_path / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    one_m = read_source(source(format="movielens", path=str(tmp_path)))
    hundred_k = read_source(source(format="movielens", path=str(ml)))
    assert one_m.interactions.sequences == hundred_k.interactions.sequences
    assert one_m.catalog["1"].title == "Toy Story (1995)"
    assert one_m.catalog["1"].attributes["genres"] == "Drama, Comedy"


def test_min_rating_filters_and_counts(shared_data):
    raw = read_source(source(format="movielens", path=str(shared_data / "movielens-100k"), min_rating=4))
    kept = raw.interactions.num_interactions
    assert kept + raw.skipped["below_min_rating"] == 100_000
    assert kept == 55_375  # ratings 4 and 5 in ML-100K


@pytest.fixture
def ml_copy(shared_data, tmp_path):
    folder = tmp_path / "ml"
    shutil.copytree(shared_data / "movielens-100k", folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def corrupt_line(path, number: int, new_text: str) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = new_text.encode("latin-1")
    path.write_bytes(b"\n".join(lines))


def test_missing_field_names_file_and_line(ml_copy):
    corrupt_line(ml_copy / "u.data", 17, "22\t377\t1")
    with pytest.raises(DataError, match=r"u\.data:17: expected 4 tab-separated fields .* got 3"):
        read_source(source(format="movielens", path=str(ml_copy)))


def test_missing_field_through_the_cli_exits_2_without_traceback(ml_copy, tmp_path):
    corrupt_line(ml_copy / "u.data", 17, "22\t377\t1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: bad\noutput_dir: {tmp_path}/runs\ndata:\n  source: {{format: movielens, path: {ml_copy}}}\n"
    )
    result = run_cli("data", "prepare", "--config", str(recipe))
    assert result.returncode == 2
    assert "u.data:17" in result.stderr and "Traceback" not in result.stderr


def test_skip_mode_counts_every_bad_row(ml_copy):
    corrupt_line(ml_copy / "u.data", 17, "22\t377\t1")
    corrupt_line(ml_copy / "u.data", 18, "22\t377\tfive\t878887116")
    corrupt_line(ml_copy / "u.data", 19, "22\t99999\t4\t878887116")
    raw = read_source(source(format="movielens", path=str(ml_copy), on_error="skip"))
    assert raw.skipped == Counter(bad_field_count=1, bad_value=1, unknown_item=1)
    assert raw.interactions.num_interactions == 100_000 - 3
    assert "u.data:17" in raw.examples["bad_field_count"]


def test_bad_encoding_names_the_line(ml_copy):
    corrupt_line(ml_copy / "u.item", 5, "5|Copycat (1995)|01-Jan-1995||x" + "|0" * 19)
    with pytest.raises(DataError, match=r"u\.item:\d+: byte .* not valid utf-8"):
        read_source(source(format="movielens", path=str(ml_copy), encoding="utf-8"))


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing folder"):
        read_source(source(format="movielens", path=str(tmp_path / "nope")))
    (tmp_path / "u.data").write_text("1\t1\t5\t1\n")
    with pytest.raises(DataError, match=r"missing file: .*u\.item"):
        read_source(source(format="movielens", path=str(tmp_path)))


# ------------------------------------------------------------------ LC-Rec


def test_lcrec_scientific_counts_and_index(shared_data):
    folder = shared_data / "amazon18-scientific"
    raw = read_source(
        source(format="lcrec", path=str(folder), index_path=str(folder / "indexes/rqvae_zcr/Scientific.index.json"))
    )
    assert len(raw.catalog) == 4344
    assert raw.interactions.num_users == 8317
    assert raw.interactions.num_interactions == 58_492
    assert raw.interactions.timestamps is None
    assert raw.sid_index["0"] == ["<a_105>", "<b_30>", "<c_3>", "<d_75>"]
    assert raw.catalog["0"].attributes["brand"] == "Sealed Unit Parts Co., Inc."
    assert sum(1 for item in raw.catalog.items.values() if not item.attributes.get("brand")) == 12


def lcrec_copy(shared_data, tmp_path, inter: dict) -> str:
    folder = tmp_path / "lc"
    folder.mkdir()
    shutil.copy(shared_data / "amazon18-scientific" / "Scientific.item.json", folder / "X.item.json")
    (folder / "X.inter.json").write_text(json.dumps(inter))
    return str(folder)


def test_lcrec_bad_rows_name_the_user(shared_data, tmp_path):
    path = lcrec_copy(shared_data, tmp_path, {"0": [0, 1, 2], "1": [0, 99999, 1], "2": []})
    with pytest.raises(DataError, match=r"X\.inter\.json \[user 1\]: item 99999"):
        read_source(source(format="lcrec", path=path))
    raw = read_source(source(format="lcrec", path=path, on_error="skip"))
    assert raw.skipped == Counter(unknown_item=1, empty_sequence=1)
    assert list(raw.interactions.sequences) == ["0"]


def test_lcrec_duplicate_user_key_fails(shared_data, tmp_path):
    path = lcrec_copy(shared_data, tmp_path, {})
    (tmp_path / "lc" / "X.inter.json").write_text('{"0": [0, 1, 2], "0": [3, 4, 5]}')
    with pytest.raises(DataError, match="key '0' appears twice"):
        read_source(source(format="lcrec", path=path))


def test_lcrec_json_syntax_error_names_line(shared_data, tmp_path):
    path = lcrec_copy(shared_data, tmp_path, {})
    (tmp_path / "lc" / "X.inter.json").write_text('{\n"0": [0, 1, 2],\n"1": [3, 4\n}')
    with pytest.raises(DataError, match=r"X\.inter\.json:4: invalid JSON"):
        read_source(source(format="lcrec", path=path))


# ------------------------------------------------------------------ MiniOneRec


def test_minionerec_export(shared_data):
    raw = read_source(source(format="minionerec", path=str(shared_data / "minionerec-industrial")))
    assert len(raw.catalog) == 3686
    assert raw.interactions is None
    assert {k: len(v) for k, v in raw.given_splits.items()} == {"valid": 4532, "test": 4533}
    first = raw.given_splits["test"][0]
    assert first.user == "A6948" and first.target == "3681" and len(first.history) == 10
    assert raw.sid_index["0"] == ["<a_236>", "<b_231>", "<c_226>"]
    assert len({tuple(codes) for codes in raw.sid_index.values()}) == 3670  # 31 items share 15 codes
    assert raw.catalog["0"].attributes["brand"]


def test_minionerec_rejects_non_literal_lists(shared_data, tmp_path):
    root, csv = minionerec_copy(shared_data, tmp_path)
    lines = csv.read_text().splitlines()
    header = lines[0]
    evil = 'A1,"[]",t,"__import__(\'os\').getcwd()",5,"[]",<a_1>'
    csv.write_text(header + "\n" + evil + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"valid/.*\.csv:2: expected history_item_id as a list literal"):
        read_source(source(format="minionerec", path=str(root)))


# ------------------------------------------------------------------ generic


def test_generic_csv_with_items_and_iso_times(tmp_path):
    (tmp_path / "events.csv").write_text(
        "uid,iid,when,stars\n"
        "a,x,2024-01-02T00:00:00,5\n"
        "a,y,2024-01-01T00:00:00,4\n"
        "b,x,2024-01-03T00:00:00,2\n"
        "a,z,2024-01-03T00:00:00,5\n"
    )
    (tmp_path / "items.csv").write_text("iid,name,color\nx,Item X,red\ny,Item Y,blue\nz,Item Z,\n")
    raw = read_source(
        source(
            format="generic",
            path=str(tmp_path / "events.csv"),
            items_path=str(tmp_path / "items.csv"),
            min_rating=3,
            columns={"user": "uid", "item": "iid", "timestamp": "when", "rating": "stars", "title": "name"},
        )
    )
    assert raw.interactions.sequences == {"a": ["y", "x", "z"]}
    assert raw.skipped["below_min_rating"] == 1
    assert raw.catalog["x"].title == "Item X" and raw.catalog["x"].attributes == {"color": "red"}


def test_generic_parquet_and_wrong_field_count(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"user_id": ["a", "a", "b"], "item_id": [1, 2, 1], "timestamp": [2, 1, 5]}), tmp_path / "e.parquet"
    )
    raw = read_source(source(format="generic", path=str(tmp_path / "e.parquet")))
    assert raw.interactions.sequences == {"a": ["2", "1"], "b": ["1"]}
    (tmp_path / "e.csv").write_text("user_id,item_id,timestamp\na,1,1\na,2\na,3,3\n")
    with pytest.raises(DataError, match=r"e\.csv:3: expected 3 fields as in the header, got 2"):
        read_source(source(format="generic", path=str(tmp_path / "e.csv")))
    raw = read_source(source(format="generic", path=str(tmp_path / "e.csv"), on_error="skip"))
    assert raw.interactions.sequences == {"a": ["1", "3"]} and raw.skipped["bad_field_count"] == 1


def test_generic_missing_column_is_named(tmp_path):
    (tmp_path / "e.csv").write_text("user,item\na,1\n")
    with pytest.raises(DataError, match="missing column.*user_id.*set source.columns"):
        read_source(source(format="generic", path=str(tmp_path / "e.csv")))


# ------------------------------------------------------------------ filters and config cross-checks


def test_kcore_by_hand():
    interactions = Interactions({"u1": ["a", "b", "c"], "u2": ["a", "b"], "u3": ["a", "c", "d"]})
    skipped = Counter()
    out = kcore(interactions, 2, skipped)
    # d is rare -> u3 keeps a, c; then every item has >= 2 users and every user >= 2 items.
    assert out.sequences == {"u1": ["a", "b", "c"], "u2": ["a", "b"], "u3": ["a", "c"]}
    assert skipped == Counter(kcore_interactions=1)
    skipped = Counter()
    assert kcore(interactions, 3, skipped).sequences == {}
    assert skipped["kcore_users"] == 3 and skipped["kcore_interactions"] == 8


def test_config_cross_checks():
    with pytest.raises(ConfigError, match="path is required"):
        source(format="lcrec")
    with pytest.raises(ConfigError, match="columns is only for format 'generic'"):
        source(format="lcrec", path="x", columns={})
    with pytest.raises(ConfigError, match="has no ratings"):
        read_source(source(format="synthetic", min_rating=3))


def test_synthetic_is_seeded():
    a = read_source(source(format="synthetic", synthetic={"num_users": 50, "seed": 3}))
    b = read_source(source(format="synthetic", synthetic={"num_users": 50, "seed": 3}))
    c = read_source(source(format="synthetic", synthetic={"num_users": 50, "seed": 4}))
    assert a.interactions.sequences == b.interactions.sequences != c.interactions.sequences
    assert len(a.catalog) == 300 and len({item.title for item in a.catalog.items.values()}) == 300
