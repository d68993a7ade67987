"""rlrf4rec.core.formats on the hand-written fixtures: exact counts, rejection reasons, parsed rows and strict mode.

Every fixture holds 18 items and 3 users x 12 valid interactions (user u rates 12 consecutive items starting at
3u-2), plus deliberately malformed rows; the protocol tests reuse them.
"""

from __future__ import annotations

import gzip
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.formats import FORMATS, MalformedRowError, load_dataset

FIXTURES = Path(__file__).parent / "fixtures"
REPEATED = "repeated (user, item) interaction (latest kept)"
NO_METADATA = "item id has no metadata row"

# format, fixture directory, users loaded, rejected reason -> count, first bad row ("file:line") for strict mode
CASES = [
    (
        "recbole",
        "recbole",
        3,
        {
            "expected 4 tab-separated fields, got 3": 2,  # one in .item, one in .inter
            "item title is empty": 1,
            "rating is not a number": 1,
            "item id is empty": 1,
            "duplicate user id (first kept)": 1,
            NO_METADATA: 1,
            REPEATED: 1,
        },
        "ml-fixture.item:5",
    ),
    (
        "ml-100k",
        "ml-100k",
        3,
        {
            "expected 24 '|'-separated fields, got 5": 1,
            "genre flags must be 0 or 1": 1,
            "rating is not a number": 1,
            "user id is empty": 1,
            "expected 4 tab-separated fields, got 3": 1,
            "age is not a number": 1,
            NO_METADATA: 1,
            REPEATED: 1,
        },
        "u.item:7",
    ),
    (
        "ml-1m",
        "ml-1m",
        3,
        {
            "expected 3 '::'-separated fields, got 2": 1,
            "movie id is empty": 1,
            "rating is not a number": 1,
            "item id is empty": 1,
            "expected 4 '::'-separated fields, got 3": 1,
            "occupation code not in 0-20": 1,
            NO_METADATA: 1,
            REPEATED: 1,
        },
        "movies.dat:9",
    ),
    (
        "ml-latest",
        "ml-latest",
        0,
        {
            "expected 3 comma-separated fields, got 4": 1,  # an unquoted comma in a title
            "item title is empty": 1,
            "rating is not a number": 1,
            "user id is empty": 1,
            "expected 4 comma-separated fields, got 3": 1,
            NO_METADATA: 1,
            REPEATED: 1,
        },
        "movies.csv:11",
    ),
    (
        "amazon",
        "amazon-2018",
        0,
        {
            "duplicate item id (first kept)": 1,
            "item title is empty": 1,
            "invalid JSON (Invalid control character at)": 1,  # a line cut off inside a string
            "rating is not a number": 1,
            "user id is empty": 1,
            "review has neither reviewerID (2018) nor user_id (2023)": 1,
            NO_METADATA: 1,
            REPEATED: 1,
        },
        "meta_Movies_and_TV.json:6",
    ),
    (
        "amazon",
        "amazon-2023",
        0,
        {
            "JSON line is not an object": 1,
            "categories is not a list of strings": 1,
            "invalid JSON (Expecting property name enclosed in double quotes)": 1,
            "rating is not a number": 1,
            "user id is empty": 1,
            "timestamp is negative or not finite": 1,
            NO_METADATA: 1,
            REPEATED: 1,
        },
        "meta_Movies_and_TV.jsonl:8",
    ),
]


@pytest.mark.parametrize("fmt, directory, num_users, rejected, first_bad", CASES, ids=[c[1] for c in CASES])
def test_fixture_counts_and_rejections(fmt, directory, num_users, rejected, first_bad):
    data = load_dataset(fmt, FIXTURES / directory)
    assert (data.interactions.num_rows, data.items.num_rows, data.users.num_rows) == (36, 18, num_users)
    assert dict(data.report.rejected) == rejected
    assert sorted(Counter(data.interactions.column(S.USER_ID).to_pylist()).values()) == [12, 12, 12]
    assert data.interactions.schema == S.INTERACTIONS and data.items.schema == S.ITEMS and data.users.schema == S.USERS


@pytest.mark.parametrize("fmt, directory, num_users, rejected, first_bad", CASES, ids=[c[1] for c in CASES])
def test_strict_raises_at_first_bad_row(fmt, directory, num_users, rejected, first_bad):
    with pytest.raises(MalformedRowError, match=re.escape(f"{directory}/{first_bad}: ")):
        load_dataset(fmt, FIXTURES / directory, strict=True)


def _row(table: pa.Table, **key: str) -> dict:
    rows = [r for r in table.to_pylist() if all(r[k] == v for k, v in key.items())]
    assert len(rows) == 1, (key, rows)
    return rows[0]


def test_recbole_rows():
    data = load_dataset("recbole", FIXTURES / "recbole")
    assert _row(data.items, item_id="11") == {
        "item_id": "11",
        "title": "Usual Suspects, The",
        "year": 1995,
        "genres": ["Crime", "Thriller"],
    }
    # (2, 5) also appears later in the file with an older timestamp: the latest rating wins.
    assert _row(data.interactions, user_id="2", item_id="5") == {
        "user_id": "2",
        "item_id": "5",
        "rating": 4.0,
        "timestamp": 882003600,
    }
    assert _row(data.users, user_id="2") == {"user_id": "2", "age": 53, "gender": "F", "occupation": "other"}
    assert data.report.examples[REPEATED] == ["ml-fixture.inter:42"]
    assert data.report.rows_read == {"ml-fixture.item": 20, "ml-fixture.inter": 41, "ml-fixture.user": 4}


def test_ml100k_rows():
    data = load_dataset("ml-100k", FIXTURES / "ml-100k")
    assert _row(data.items, item_id="14") == {  # latin-1 in the file
        "item_id": "14",
        "title": "Misérables, Les",
        "year": 1995,
        "genres": ["Drama", "Musical"],
    }
    assert _row(data.interactions, user_id="1", item_id="2") == {
        "user_id": "1",
        "item_id": "2",
        "rating": 4.0,
        "timestamp": 881003600,
    }
    assert _row(data.users, user_id="1") == {"user_id": "1", "age": 24, "gender": "M", "occupation": "technician"}


def test_ml1m_rows():
    data = load_dataset("ml-1m", FIXTURES / "ml-1m")
    assert _row(data.items, item_id="14") == {
        "item_id": "14",
        "title": "Misérables, Les",
        "year": 1995,
        "genres": ["Drama", "Musical"],
    }
    assert _row(data.interactions, user_id="3", item_id="18") == {
        "user_id": "3",
        "item_id": "18",
        "rating": 4.0,
        "timestamp": 981039600,
    }
    # Age stays the age-group code; Occupation codes map to the README's names.
    assert data.users.to_pylist() == [
        {"user_id": "1", "age": 25, "gender": "M", "occupation": "technician/engineer"},
        {"user_id": "2", "age": 50, "gender": "F", "occupation": "other/not specified"},
        {"user_id": "3", "age": 18, "gender": "M", "occupation": "writer"},
    ]


def test_ml1m_without_users_file(tmp_path):
    for name in ("movies.dat", "ratings.dat"):
        shutil.copy(FIXTURES / "ml-1m" / name, tmp_path)
    data = load_dataset("ml-1m", tmp_path)
    assert (data.interactions.num_rows, data.users.num_rows) == (36, 0)


def test_ml_latest_rows():
    data = load_dataset("ml-latest", FIXTURES / "ml-latest")
    assert _row(data.items, item_id="13") == {  # quoted title with a comma, "(no genres listed)"
        "item_id": "13",
        "title": "Postino, Il",
        "year": 1994,
        "genres": [],
    }
    assert _row(data.items, item_id="14")["title"] == "Misérables, Les"
    assert _row(data.interactions, user_id="1", item_id="1") == {
        "user_id": "1",
        "item_id": "1",
        "rating": 2.5,
        "timestamp": 1101000000,
    }


def test_ml_latest_line_numbers_follow_multiline_titles(tmp_path):
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n1,"Two\nLines",Drama\n2,Bad,Row,Drama\n')
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,5\n")
    data = load_dataset("ml-latest", tmp_path)
    assert _row(data.items, item_id="1")["title"] == "Two\nLines"
    assert data.report.examples == {"expected 3 comma-separated fields, got 4": ["movies.csv:4"]}


def test_ml_latest_header_without_a_column(tmp_path):
    shutil.copy(FIXTURES / "ml-latest" / "movies.csv", tmp_path)
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating\n1,1,4.0\n")
    with pytest.raises(ValueError, match=r"ratings\.csv.*lacks column\(s\) \['timestamp'\]"):
        load_dataset("ml-latest", tmp_path)


def test_amazon_2018_rows():
    data = load_dataset("amazon", FIXTURES / "amazon-2018")
    assert _row(data.items, item_id="B000000011") == {  # year from the metadata date "08 15, 2000"
        "item_id": "B000000011",
        "title": "Usual Suspects, The",
        "year": 2000,
        "genres": ["Movies & TV", "Crime", "Thriller"],
    }
    assert _row(data.items, item_id="B000000003")["title"] == "Four Rooms"  # the later duplicate row is dropped
    assert _row(data.items, item_id="B000000016") == {
        "item_id": "B000000016",
        "title": 'Taxi Driver "Collector\'s Edition"',
        "year": None,
        "genres": ["Movies & TV", "Drama", "Thriller"],
    }
    assert _row(data.interactions, user_id="AUSER2", item_id="B000000005") == {
        "user_id": "AUSER2",
        "item_id": "B000000005",
        "rating": 4.0,
        "timestamp": 1352003600,
    }


def test_amazon_2023_rows():
    data = load_dataset("amazon", FIXTURES / "amazon-2023")
    genres = {r["item_id"]: r["genres"] for r in data.items.to_pylist()}
    assert genres["B000000001"] == ["Movies & TV", "Animation", "Children's", "Comedy"]  # main_category prepended
    assert genres["B000000002"] == ["Movies & TV", "Action", "Adventure", "Thriller"]  # already there: not twice
    assert genres["B000000003"] == ["Thriller"]  # main_category null
    assert genres["B000000004"] == ["Movies & TV", "Action", "Comedy", "Drama"]  # empty category dropped
    assert _row(data.items, item_id="B000000014") == {
        "item_id": "B000000014",
        "title": "Misérables, Les",
        "year": None,
        "genres": ["Movies & TV", "Drama", "Musical"],
    }
    # A review of a variant asin counts for its parent_asin; milliseconds become seconds.
    assert _row(data.interactions, user_id="AGUSER1", item_id="B000000002") == {
        "user_id": "AGUSER1",
        "item_id": "B000000002",
        "rating": 4.0,
        "timestamp": 1581003600,
    }
    assert _row(data.interactions, user_id="AGUSER3", item_id="B000000018")["timestamp"] == 1583039600  # no parent


def test_amazon_reads_gzip(tmp_path):
    for src in (FIXTURES / "amazon-2023").iterdir():
        (tmp_path / f"{src.name}.gz").write_bytes(gzip.compress(src.read_bytes(), mtime=0))
    data = load_dataset("amazon", tmp_path)
    assert (data.interactions.num_rows, data.items.num_rows, data.report.num_rejected) == (36, 18, 8)


def test_amazon_needs_one_metadata_and_one_reviews_file(tmp_path):
    shutil.copy(FIXTURES / "amazon-2018" / "Movies_and_TV.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"found metadata \[\], reviews \['Movies_and_TV\.json'\]"):
        load_dataset("amazon", tmp_path)


# --------------------------------------------------------------------------------------------------- parquet

PARQUET_REJECTED = {
    "item id is empty": 1,
    "item title is empty": 1,
    "rating is not a number": 1,
    "user id is empty": 1,
    NO_METADATA: 1,
    "rating out of range [0, 10]": 1,
    REPEATED: 1,
    "age out of range [0, 120]": 1,
}


def _write_parquet(directory: Path, drop: str | None = None) -> Path:
    """The ml-100k fixture's clean rows with integer item and user ids, plus one bad row per reason."""
    base = load_dataset("ml-100k", FIXTURES / "ml-100k")
    items = [{**r, "item_id": int(r["item_id"])} for r in base.items.to_pylist()]
    items[0]["genres"] = ["Animation", None, "Comedy"]
    items.insert(2, {"item_id": None, "title": "No Id", "year": 1995, "genres": []})  # row 3
    items.append({"item_id": 19, "title": None, "year": None, "genres": None})  # row 20
    inter = [{**r, "item_id": int(r["item_id"])} for r in base.interactions.to_pylist()]
    inter.insert(1, {"user_id": "1", "item_id": 13, "rating": None, "timestamp": 881000500})  # row 2
    inter.insert(9, {"user_id": "", "item_id": 16, "rating": 3.0, "timestamp": 882000500})  # row 10
    inter.insert(19, {"user_id": "3", "item_id": 99, "rating": 4.0, "timestamp": 883000500})  # row 20
    inter.insert(29, {"user_id": "3", "item_id": 1, "rating": 11.0, "timestamp": 883000600})  # row 30
    inter.append({"user_id": "2", "item_id": 5, "rating": 1.0, "timestamp": 881999999})  # row 41, older
    users = [{**r, "user_id": int(r["user_id"])} for r in base.users.to_pylist()]
    users.append({"user_id": 4, "age": 200, "gender": "F", "occupation": "artist"})  # row 4
    tables = {
        "items": pa.Table.from_pylist(
            items,
            schema=pa.schema(
                [
                    ("item_id", pa.int64()),
                    ("title", pa.string()),
                    ("year", pa.int32()),
                    ("genres", pa.list_(pa.string())),
                ]
            ),
        ),
        "interactions": pa.Table.from_pylist(
            inter,
            schema=pa.schema(
                [("user_id", pa.string()), ("item_id", pa.int64()), ("rating", pa.float64()), ("timestamp", pa.int64())]
            ),
        ),
        "users": pa.Table.from_pylist(
            users,
            schema=pa.schema(
                [("user_id", pa.int64()), ("age", pa.int32()), ("gender", pa.string()), ("occupation", pa.string())]
            ),
        ),
    }
    for name, table in tables.items():
        table = table.drop_columns([drop]) if drop in table.column_names else table
        pq.write_table(table, directory / f"{name}.parquet")
    return directory


def test_parquet_counts_rows_and_rejections(tmp_path):
    data = load_dataset("parquet", _write_parquet(tmp_path))
    assert (data.interactions.num_rows, data.items.num_rows, data.users.num_rows) == (36, 18, 3)
    assert dict(data.report.rejected) == PARQUET_REJECTED
    assert data.report.examples[REPEATED] == ["interactions.parquet:41"]
    assert _row(data.items, item_id="1") == {
        "item_id": "1",
        "title": "Toy Story",
        "year": 1995,
        "genres": ["Animation", "Comedy"],
    }
    assert _row(data.interactions, user_id="2", item_id="5") == {
        "user_id": "2",
        "item_id": "5",
        "rating": 4.0,
        "timestamp": 882003600,
    }
    assert _row(data.users, user_id="3") == {"user_id": "3", "age": 23, "gender": "M", "occupation": "writer"}


def test_parquet_strict_names_file_and_row(tmp_path):
    with pytest.raises(MalformedRowError, match=re.escape("items.parquet:3: item id is empty")):
        load_dataset("parquet", _write_parquet(tmp_path), strict=True)


def test_parquet_missing_required_column(tmp_path):
    with pytest.raises(ValueError, match=r"interactions\.parquet: missing required column 'timestamp'; expected "):
        load_dataset("parquet", _write_parquet(tmp_path, drop="timestamp"))


# --------------------------------------------------------------------------------------------------- registry


def test_unknown_format_lists_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="not supported") as info:
        load_dataset("movielens", tmp_path)
    for name in ("recbole", "ml-100k", "ml-1m", "ml-latest", "amazon", "parquet"):
        assert repr(name) in str(info.value)
    assert sorted(FORMATS) == ["amazon", "ml-100k", "ml-1m", "ml-latest", "parquet", "recbole"]


@pytest.mark.parametrize(
    "fmt, directory, present, missing",
    [
        ("recbole", "recbole", "ml-fixture.inter", "*.item"),
        ("ml-100k", "ml-100k", "u.item", "u.data"),
        ("ml-1m", "ml-1m", "ratings.dat", "movies.dat"),
        ("ml-latest", "ml-latest", "movies.csv", "ratings.csv"),
        ("parquet", None, None, "items.parquet"),
    ],
)
def test_missing_file_is_named(tmp_path, fmt, directory, present, missing):
    if present:
        shutil.copy(FIXTURES / directory / present, tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_dataset(fmt, tmp_path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path does not exist: .*nowhere"):
        load_dataset("ml-1m", tmp_path / "nowhere")
