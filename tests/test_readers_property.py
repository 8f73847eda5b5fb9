"""Property-based tests (hypothesis) of the readers and splits: nothing is lost or invented, whatever the input."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlrec.config import from_dict
from rlrec.data import read_source
from rlrec.data.minionerec import parse_list_literal
from rlrec.data.splits import leave_one_out
from rlrec.data.types import Interactions
from rlrec.errors import DataError
from rlrec.schema import SourceConfig

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ids = st.text(alphabet="abcdefgh0123456789", min_size=1, max_size=4)
events = st.lists(st.tuples(ids, ids, st.integers(0, 50)), min_size=1, max_size=60)


@SETTINGS
@given(rows=events)
def test_generic_csv_groups_and_sorts_stably(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("g") / "e.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "timestamp"])
        writer.writerows(rows)
    raw = read_source(from_dict(SourceConfig, {"format": "generic", "path": str(path)}))
    expected: dict[str, list[tuple[str, int]]] = {}
    for user, item, time in rows:
        if (item, time) not in {(i, t) for i, t in expected.get(user, [])}:
            expected.setdefault(user, []).append((item, time))
    for user in expected:
        expected[user].sort(key=lambda pair: pair[1])  # stable: file order within a second
    assert raw.interactions.sequences == {u: [i for i, _ in pairs] for u, pairs in expected.items()}
    assert raw.interactions.num_interactions + raw.skipped["duplicate_event"] == len(rows)


def ml_line(draw_valid: bool, user: int, item: int, time: int) -> str:
    return f"{user}\t{item}\t4\t{time}" if draw_valid else f"{user}\t{item}\t4"


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(st.booleans(), st.integers(1, 30), st.integers(1, 5), st.integers(0, 10**9)), min_size=1, max_size=80
    )
)
def test_movielens_skip_mode_conserves_rows(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("ml")
    (folder / "u.item").write_text(
        "".join(f"{i}|Movie {i} (1990)|01-Jan-1990||url" + "|0" * 19 + "\n" for i in range(1, 6))
    )
    (folder / "u.data").write_text("".join(ml_line(*row) + "\n" for row in rows))
    config = {"format": "movielens", "path": str(folder)}
    raw = read_source(from_dict(SourceConfig, {**config, "on_error": "skip"}))
    kept = raw.interactions.num_interactions
    assert kept + sum(raw.skipped.values()) == len(rows)
    assert raw.skipped["bad_field_count"] == sum(1 for valid, *_ in rows if not valid)
    first_bad = next((n for n, (valid, *_) in enumerate(rows, start=1) if not valid), None)
    if first_bad is None:
        read_source(from_dict(SourceConfig, config))
    else:
        with pytest.raises(DataError, match=rf"u\.data:{first_bad}: expected 4"):
            read_source(from_dict(SourceConfig, config))


@given(values=st.lists(st.integers(-(10**6), 10**6), max_size=20))
def test_list_literal_round_trips(values):
    assert parse_list_literal(repr(values)) == values


# Expressions that leave a trace if anything ever evaluates them: each creates the file MARKER names.
CODE = [
    "__import__('pathlib').Path({marker!r}).touch()",
    "open({marker!r}, 'w').close()",
    "(lambda: __import__('pathlib').Path({marker!r}).touch())()",
    "[__import__('pathlib').Path({marker!r}).touch() for _ in [0]]",
    "f\"{{__import__('pathlib').Path({marker!r}).touch()}}\"",
    "*map(lambda p: __import__('pathlib').Path(p).touch(), [{marker!r}])",
]


@SETTINGS
@given(code=st.sampled_from(CODE), before=st.lists(st.integers(), max_size=3),
       after=st.lists(st.integers(), max_size=3), nested=st.booleans())  # fmt: skip
def test_list_literal_never_runs_code(tmp_path_factory, code, before, after, nested):
    """A CSV list cell holding code among literals is refused and never executed: if the parser evaluated it (an
    `eval` instead of `ast.literal_eval`), the marker file would exist."""
    marker = tmp_path_factory.mktemp("code") / "executed"
    expression = code.format(marker=str(marker))
    cell = repr(before)[:-1] + (", " if before else "") + (f"[{expression}]" if nested else expression)
    cell += ", " + repr(after)[1:] if after else "]"
    with pytest.raises((ValueError, SyntaxError, TypeError)):
        parse_list_literal(cell)
    assert not marker.exists()


@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=30), max_history=st.integers(1, 10))
def test_leave_one_out_sizes(lengths, max_history):
    sequences = {f"u{k}": [f"i{j}" for j in range(n)] for k, n in enumerate(lengths)}
    skipped = Counter()
    splits = leave_one_out(Interactions(sequences), max_history, skipped)
    eligible = [n for n in lengths if n >= 3]
    assert len(splits["train"]) == sum(n - 3 for n in eligible)
    assert len(splits["valid"]) == len(splits["test"]) == len(eligible)
    assert skipped["user_too_short"] == len(lengths) - len(eligible)
    assert all(1 <= len(s.history) <= max_history for split in splits.values() for s in split)
