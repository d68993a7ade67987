"""Raw dataset formats -> the canonical interactions / items / users tables of rlrf4rec.core.schema.

Consumes files on disk in one of the supported layouts (FORMATS below) and produces Arrow tables with validated rows.
Every malformed row is counted under a reason with its file and line number; in strict mode the first one raises
MalformedRowError instead. Knows nothing about sequences, splits or re-rank lists (rlrf4rec.core.protocol does that).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlrf4rec.core import schema as S


class MalformedRowError(ValueError):
    """A raw row failed validation in strict mode; the message names file, line and reason."""


@dataclass
class LoadReport:
    """Rows read and rows rejected, with reasons. Examples keep the first few locations per reason."""

    rows_read: Counter = field(default_factory=Counter)  # file name -> rows read
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> ["file:line", ...]

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict:
        return {
            "rows_read": dict(self.rows_read),
            "rejected": dict(self.rejected),
            "examples": self.examples,
        }


class RowChecker:
    """Collects bad rows for one load; raises at the first one when strict."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.report = LoadReport()

    def bad(self, file: Path | str, line: int, reason: str) -> None:
        where = f"{Path(file).name}:{line}"
        if self.strict:
            raise MalformedRowError(
                f"{file}:{line}: {reason} (rerun without --data.strict to skip and count such rows)"
            )
        # Count by kind ("rating is not a number"), keep the offending value with the example location only:
        # a file with many distinct bad values must still report a handful of reasons.
        kind, _, detail = reason.partition(": ")
        self.report.rejected[kind] += 1
        examples = self.report.examples.setdefault(kind, [])
        if len(examples) < 5:
            examples.append(f"{where} ({detail})" if detail else where)

    def read(self, file: Path | str) -> None:
        self.report.rows_read[Path(file).name] += 1


@dataclass(frozen=True)
class CanonicalData:
    interactions: pa.Table
    items: pa.Table
    users: pa.Table
    report: LoadReport


# --------------------------------------------------------------------------------------------------- field parsers
# Each returns the parsed value or raises ValueError with a short reason; loaders turn that into a counted bad row.


def parse_rating(raw: str | float | int | None) -> float:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"rating is not a number: {raw!r}") from None
    if value != value or value < 0 or value > 10:
        raise ValueError(f"rating out of range [0, 10]: {raw!r}")
    return value


def parse_timestamp(raw: str | float | int | None) -> int:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"timestamp is not a number: {raw!r}") from None
    if not math.isfinite(value) or value < 0:  # int(inf) would raise OverflowError, not a counted bad row
        raise ValueError(f"timestamp is negative or not finite: {raw!r}")
    return int(value)


def parse_id(raw: object, name: str) -> str:
    text = "" if raw is None else str(raw).strip()
    if not text:
        raise ValueError(f"{name} is empty")
    return text


def parse_year(raw: object) -> int | None:
    text = "" if raw is None else str(raw).strip()
    if not text:
        return None
    match = re.search(r"(1[89]\d\d|20\d\d)", text)
    return int(match.group(1)) if match else None


_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-–]\d{0,4})?\)\s*$")


def split_title_year(raw: str) -> tuple[str, int | None]:
    """'Toy Story (1995)' -> ('Toy Story', 1995); a title without a trailing year keeps its text."""
    text = raw.strip()
    match = _TITLE_YEAR.match(text)
    if match and match.group("title"):
        return match.group("title").strip(), int(match.group("year"))
    return text, None


def parse_age(raw: object) -> int | None:
    text = "" if raw is None else str(raw).strip()
    if not text:
        return None
    try:
        age = float(text)
    except ValueError:
        raise ValueError(f"age is not a number: {raw!r}") from None
    if not 0 <= age <= 120:  # also rejects NaN, and inf before int() would raise OverflowError
        raise ValueError(f"age out of range [0, 120]: {raw!r}")
    return int(age)


# --------------------------------------------------------------------------------------------------- line readers


def open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    """Plain or gzip text, decoded with `encoding`; undecodable bytes are replaced, never fatal."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors="replace", newline="")
    return open(path, encoding=encoding, errors="replace", newline="")


def delimited_rows(
    path: Path, sep: str, *, encoding: str = "utf-8", skip_header: bool = False
) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) for each non-empty line split on a literal separator."""
    with open_text(path, encoding) as fh:
        for line_no, line in enumerate(fh, start=1):
            if skip_header and line_no == 1:
                continue
            line = line.rstrip("\r\n")
            if line.strip():
                yield line_no, line.split(sep)


def csv_rows(path: Path, columns: tuple[str, ...], checker: RowChecker) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number of the record's first line, record) for a CSV file whose header names at least `columns`.

    A header without one of `columns` is a ValueError; a record with another field count is counted as bad.
    """
    with open_text(path, "utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks column(s) {missing}; expected {list(columns)}")
        start = reader.line_num + 1
        for fields in reader:
            # reader.line_num is the record's last physical line; a quoted multi-line title spans several.
            line, start = start, reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            checker.read(path)
            if len(fields) != len(header):
                checker.bad(path, line, f"expected {len(header)} comma-separated fields, got {len(fields)}")
                continue
            yield line, dict(zip(header, fields, strict=True))


def json_rows(path: Path, checker: RowChecker) -> Iterator[tuple[int, dict]]:
    """(line number, object) for JSON-lines files; lines that are not a JSON object are counted as bad."""
    with open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            checker.read(path)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                checker.bad(path, line_no, f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                checker.bad(path, line_no, "JSON line is not an object")
                continue
            yield line_no, record


# --------------------------------------------------------------------------------------------------- table builders


class TableBuilder:
    """Accumulates canonical rows, then drops interactions whose item has no metadata and exact duplicates."""

    def __init__(self, checker: RowChecker) -> None:
        self.checker = checker
        self.interactions: list[tuple[str, str, float, int, str, int]] = []  # + (file, line) for reporting
        self.items: dict[str, tuple[str, int | None, list[str]]] = {}
        self.users: dict[str, tuple[int | None, str | None, str | None]] = {}

    def add_interaction(self, file: Path, line: int, user_id: str, item_id: str, rating: float, timestamp: int) -> None:
        self.interactions.append((user_id, item_id, rating, timestamp, str(file), line))

    def add_item(self, file: Path, line: int, item_id: str, title: str, year: int | None, genres: list[str]) -> None:
        if not title.strip():
            self.checker.bad(file, line, "item title is empty")
            return
        if item_id in self.items:
            self.checker.bad(file, line, "duplicate item id (first kept)")
            return
        self.items[item_id] = (title.strip(), year, [g.strip() for g in genres if g.strip()])

    def add_user(
        self, file: Path, line: int, user_id: str, age: int | None, gender: str | None, occupation: str | None
    ) -> None:
        if user_id in self.users:
            self.checker.bad(file, line, "duplicate user id (first kept)")
            return
        self.users[user_id] = (age, gender or None, occupation or None)

    def build(self) -> CanonicalData:
        # Keep the latest rating of a repeated (user, item) pair: a re-rating supersedes the earlier one, and a
        # sequence that repeats an item would let the item appear both in a history window and in a later list.
        latest: dict[tuple[str, str], int] = {}
        for pos, (user_id, item_id, _, timestamp, _, _) in enumerate(self.interactions):
            key = (user_id, item_id)
            if key not in latest or timestamp >= self.interactions[latest[key]][3]:
                latest[key] = pos
        keep_positions = set(latest.values())
        columns: dict[str, list] = {S.USER_ID: [], S.ITEM_ID: [], S.RATING: [], S.TIMESTAMP: []}
        for pos, (user_id, item_id, rating, timestamp, file, line) in enumerate(self.interactions):
            if pos not in keep_positions:
                self.checker.bad(file, line, "repeated (user, item) interaction (latest kept)")
                continue
            if item_id not in self.items:
                self.checker.bad(file, line, "item id has no metadata row")
                continue
            columns[S.USER_ID].append(user_id)
            columns[S.ITEM_ID].append(item_id)
            columns[S.RATING].append(rating)
            columns[S.TIMESTAMP].append(timestamp)
        interactions = pa.Table.from_pydict(columns, schema=S.INTERACTIONS)

        item_ids = sorted(self.items, key=_natural_key)
        items = pa.Table.from_pydict(
            {
                S.ITEM_ID: item_ids,
                S.TITLE: [self.items[i][0] for i in item_ids],
                S.YEAR: [self.items[i][1] for i in item_ids],
                S.GENRES: [self.items[i][2] for i in item_ids],
            },
            schema=S.ITEMS,
        )
        user_ids = sorted(self.users, key=_natural_key)
        users = pa.Table.from_pydict(
            {
                S.USER_ID: user_ids,
                S.AGE: [self.users[u][0] for u in user_ids],
                S.GENDER: [self.users[u][1] for u in user_ids],
                S.OCCUPATION: [self.users[u][2] for u in user_ids],
            },
            schema=S.USERS,
        )
        return CanonicalData(interactions, items, users, self.checker.report)


def _natural_key(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.isdigit() else (1, value)


def _interaction(
    builder: TableBuilder, file: Path, line: int, user: object, item: object, rating: object, ts: object
) -> None:
    try:
        builder.add_interaction(
            file, line, parse_id(user, "user id"), parse_id(item, "item id"), parse_rating(rating), parse_timestamp(ts)
        )
    except ValueError as exc:
        builder.checker.bad(file, line, str(exc))


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (check data.path and data.format in the config)")
    return path


# --------------------------------------------------------------------------------------------------- RecBole atomic


def _atomic_rows(path: Path, checker: RowChecker) -> Iterator[tuple[int, dict[str, str]]]:
    """RecBole atomic file: tab-separated, header of `name:type` fields; yields name -> raw text."""
    rows = delimited_rows(path, "\t")
    try:
        _, header = next(rows)
    except StopIteration:
        raise MalformedRowError(f"{path}:1: empty file, expected a RecBole header like 'user_id:token'") from None
    names = [h.split(":", 1)[0].strip() for h in header]
    for line_no, fields in rows:
        checker.read(path)
        if len(fields) != len(names):
            checker.bad(path, line_no, f"expected {len(names)} tab-separated fields, got {len(fields)}")
            continue
        yield line_no, dict(zip(names, fields, strict=True))


def _first(record: dict[str, str], *names: str) -> str | None:
    for name in names:
        if name in record:
            return record[name]
    return None


def load_recbole(path: Path, checker: RowChecker) -> CanonicalData:
    """A directory holding <name>.inter, <name>.item and optionally <name>.user (RecBole atomic files)."""
    inter = _single(path, "*.inter")
    item_file = _single(path, "*.item")
    builder = TableBuilder(checker)
    for line, rec in _atomic_rows(item_file, checker):
        try:
            item_id = parse_id(rec.get("item_id"), "item_id")
            raw_title = _first(rec, "movie_title", "title") or ""
            title, title_year = split_title_year(raw_title)
            year = parse_year(_first(rec, "release_year", "year")) or title_year
            genres = (_first(rec, "class", "genre", "categories") or "").split()
        except ValueError as exc:
            checker.bad(item_file, line, str(exc))
            continue
        builder.add_item(item_file, line, item_id, title, year, genres)
    for line, rec in _atomic_rows(inter, checker):
        _interaction(
            builder, inter, line, rec.get("user_id"), rec.get("item_id"), rec.get("rating"), rec.get("timestamp")
        )
    user_files = sorted(path.glob("*.user"))
    for line, rec in _atomic_rows(user_files[0], checker) if user_files else ():
        try:
            builder.add_user(
                user_files[0],
                line,
                parse_id(rec.get("user_id"), "user_id"),
                parse_age(rec.get("age")),
                rec.get("gender"),
                rec.get("occupation"),
            )
        except ValueError as exc:
            checker.bad(user_files[0], line, str(exc))
    return builder.build()


def _single(directory: Path, pattern: str) -> Path:
    matches = sorted(directory.glob(pattern))
    if len(matches) != 1:
        raise FileNotFoundError(
            f"expected exactly one {pattern} file in {directory}, found {len(matches)} "
            "(point data.path at one dataset directory)"
        )
    return matches[0]


# --------------------------------------------------------------------------------------------------- MovieLens 100k

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


def load_ml100k(path: Path, checker: RowChecker) -> CanonicalData:
    """GroupLens ml-100k: u.data (tab), u.item and u.user (pipe, latin-1)."""
    builder = TableBuilder(checker)
    item_file = _require(path / "u.item")
    for line, fields in delimited_rows(item_file, "|", encoding="latin-1"):
        checker.read(item_file)
        if len(fields) != 5 + len(ML100K_GENRES):
            checker.bad(item_file, line, f"expected {5 + len(ML100K_GENRES)} '|'-separated fields, got {len(fields)}")
            continue
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            checker.bad(item_file, line, "genre flags must be 0 or 1")
            continue
        try:
            item_id = parse_id(fields[0], "movie id")
        except ValueError as exc:
            checker.bad(item_file, line, str(exc))
            continue
        title, year = split_title_year(fields[1])
        genres = [g for g, flag in zip(ML100K_GENRES, flags, strict=True) if flag == "1" and g != "unknown"]
        builder.add_item(item_file, line, item_id, title, year or parse_year(fields[2]), genres)
    data_file = _require(path / "u.data")
    for line, fields in delimited_rows(data_file, "\t"):
        checker.read(data_file)
        if len(fields) != 4:
            checker.bad(data_file, line, f"expected 4 tab-separated fields, got {len(fields)}")
            continue
        _interaction(builder, data_file, line, *fields)
    user_file = path / "u.user"
    if user_file.is_file():
        for line, fields in delimited_rows(user_file, "|", encoding="latin-1"):
            checker.read(user_file)
            if len(fields) != 5:
                checker.bad(user_file, line, f"expected 5 '|'-separated fields, got {len(fields)}")
                continue
            try:
                user_id = parse_id(fields[0], "user id")
                builder.add_user(user_file, line, user_id, parse_age(fields[1]), fields[2], fields[3])
            except ValueError as exc:
                checker.bad(user_file, line, str(exc))
    return builder.build()


# --------------------------------------------------------------------------------------------------- MovieLens 1M

ML1M_OCCUPATIONS = (
    "other/not specified",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)


def _dat_rows(path: Path, width: int, checker: RowChecker) -> Iterator[tuple[int, list[str]]]:
    """ml-1m rows: '::'-separated latin-1 lines of exactly `width` fields; other widths are counted as bad."""
    for line, fields in delimited_rows(path, "::", encoding="latin-1"):
        checker.read(path)
        if len(fields) != width:
            checker.bad(path, line, f"expected {width} '::'-separated fields, got {len(fields)}")
            continue
        yield line, fields


def parse_ml1m_occupation(raw: str) -> str:
    code = raw.strip()
    if not code.isdigit() or int(code) >= len(ML1M_OCCUPATIONS):
        raise ValueError(f"occupation code not in 0-{len(ML1M_OCCUPATIONS) - 1}: {raw!r}")
    return ML1M_OCCUPATIONS[int(code)]


def load_ml1m(path: Path, checker: RowChecker) -> CanonicalData:
    """GroupLens ml-1m: movies.dat, ratings.dat and optionally users.dat ('::'-separated, latin-1).

    users.dat keeps Age as its age-group code (1, 18, 25, ...) and maps the Occupation code to the README's name.
    """
    builder = TableBuilder(checker)
    movie_file = _require(path / "movies.dat")
    for line, (movie_id, raw_title, genres) in _dat_rows(movie_file, 3, checker):
        try:
            item_id = parse_id(movie_id, "movie id")
        except ValueError as exc:
            checker.bad(movie_file, line, str(exc))
            continue
        title, year = split_title_year(raw_title)
        builder.add_item(movie_file, line, item_id, title, year, genres.split("|"))
    rating_file = _require(path / "ratings.dat")
    for line, fields in _dat_rows(rating_file, 4, checker):
        _interaction(builder, rating_file, line, *fields)
    user_file = path / "users.dat"
    user_rows = _dat_rows(user_file, 5, checker) if user_file.is_file() else ()
    for line, (user_id, gender, age, occupation, _zip) in user_rows:
        try:
            user_id = parse_id(user_id, "user id")
            builder.add_user(user_file, line, user_id, parse_age(age), gender, parse_ml1m_occupation(occupation))
        except ValueError as exc:
            checker.bad(user_file, line, str(exc))
    return builder.build()


# --------------------------------------------------------------------------------------------------- MovieLens latest


def load_ml_latest(path: Path, checker: RowChecker) -> CanonicalData:
    """MovieLens latest / 25m / 32m: movies.csv (movieId,title,genres) and ratings.csv; no user attributes."""
    builder = TableBuilder(checker)
    movie_file = _require(path / "movies.csv")
    for line, rec in csv_rows(movie_file, ("movieId", "title", "genres"), checker):
        try:
            item_id = parse_id(rec["movieId"], "movie id")
        except ValueError as exc:
            checker.bad(movie_file, line, str(exc))
            continue
        title, year = split_title_year(rec["title"])
        genres = [] if rec["genres"] == "(no genres listed)" else rec["genres"].split("|")
        builder.add_item(movie_file, line, item_id, title, year, genres)
    rating_file = _require(path / "ratings.csv")
    for line, rec in csv_rows(rating_file, ("userId", "movieId", "rating", "timestamp"), checker):
        _interaction(builder, rating_file, line, rec["userId"], rec["movieId"], rec["rating"], rec["timestamp"])
    return builder.build()


# --------------------------------------------------------------------------------------------------- Amazon reviews

AMAZON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def parse_string_list(raw: object, name: str) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(v, str) or v is None for v in raw):
        raise ValueError(f"{name} is not a list of strings")
    return [v for v in raw if v]


def _amazon_files(path: Path) -> tuple[Path, Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(AMAZON_SUFFIXES))
    meta = [p for p in files if "meta" in p.name.lower()]
    reviews = [p for p in files if p not in meta]
    if len(meta) != 1 or len(reviews) != 1:
        raise FileNotFoundError(
            f"expected in {path} one metadata file (name containing 'meta') and one reviews file, each ending in "
            f"{'/'.join(AMAZON_SUFFIXES)}; found metadata {[p.name for p in meta]}, reviews {[p.name for p in reviews]}"
        )
    return reviews[0], meta[0]


def load_amazon(path: Path, checker: RowChecker) -> CanonicalData:
    """Amazon reviews, 2018 (McAuley lab, Ni et al.) or 2023 (Hou et al.) JSON lines, the generation told per row.

    The directory holds two .json/.jsonl(.gz) files: the one whose name contains "meta" is the item metadata, the
    other the reviews. 2018 reviews: reviewerID, asin, overall, unixReviewTime (s); metadata: asin, title, category,
    date. 2023 reviews: user_id, parent_asin (else asin), rating, timestamp (ms); metadata: parent_asin, title,
    categories, main_category (prepended to the genres). Year comes from a metadata `date` only; no user attributes.
    """
    review_file, meta_file = _amazon_files(path)
    builder = TableBuilder(checker)
    for line, rec in json_rows(meta_file, checker):
        try:
            if "parent_asin" in rec:
                item_id = parse_id(rec["parent_asin"], "parent_asin")
                genres = parse_string_list(rec.get("categories"), "categories")
                main = rec.get("main_category")
                if isinstance(main, str) and main.strip() and main not in genres:
                    genres.insert(0, main)
            else:
                item_id = parse_id(rec.get("asin"), "asin")
                genres = parse_string_list(rec.get("category"), "category")
        except ValueError as exc:
            checker.bad(meta_file, line, str(exc))
            continue
        builder.add_item(meta_file, line, item_id, str(rec.get("title") or ""), parse_year(rec.get("date")), genres)
    for line, rec in json_rows(review_file, checker):
        if "reviewerID" in rec:
            ts = rec.get("unixReviewTime")
            _interaction(builder, review_file, line, rec["reviewerID"], rec.get("asin"), rec.get("overall"), ts)
        elif "user_id" in rec:
            try:
                ts = parse_timestamp(rec.get("timestamp")) // 1000  # 2023 timestamps are milliseconds
            except ValueError as exc:
                checker.bad(review_file, line, str(exc))
                continue
            item = rec.get("parent_asin") or rec.get("asin")
            _interaction(builder, review_file, line, rec["user_id"], item, rec.get("rating"), ts)
        else:
            checker.bad(review_file, line, "review has neither reviewerID (2018) nor user_id (2023)")
    return builder.build()


# --------------------------------------------------------------------------------------------------- generic Parquet

PARQUET_LAYOUT = (
    "interactions.parquet (user_id, item_id, rating, timestamp in seconds), items.parquet (item_id, title, "
    "optional year, optional genres: list<string>) and optionally users.parquet (user_id, optional age, gender, "
    "occupation)"
)


def parquet_rows(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...], checker: RowChecker
) -> Iterator[tuple[int, dict]]:
    """(1-based row number, record) for a Parquet file; a missing required column is a ValueError, not a bad row."""
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    for column in required:
        if column not in names:
            raise ValueError(f"{path}: missing required column {column!r}; expected {PARQUET_LAYOUT}")
    row = 0
    for batch in parquet.iter_batches(columns=[c for c in required + optional if c in names]):
        for record in batch.to_pylist():
            row += 1
            checker.read(path)
            yield row, record


def load_parquet(path: Path, checker: RowChecker) -> CanonicalData:
    """The generic layout, PARQUET_LAYOUT; integer ids become strings, rows are validated like the text formats."""
    builder = TableBuilder(checker)
    item_file = _require(path / "items.parquet")
    for row, rec in parquet_rows(item_file, (S.ITEM_ID, S.TITLE), (S.YEAR, S.GENRES), checker):
        try:
            item_id = parse_id(rec[S.ITEM_ID], "item id")
            genres = parse_string_list(rec.get(S.GENRES), "genres")
        except ValueError as exc:
            checker.bad(item_file, row, str(exc))
            continue
        builder.add_item(item_file, row, item_id, str(rec[S.TITLE] or ""), parse_year(rec.get(S.YEAR)), genres)
    inter_file = _require(path / "interactions.parquet")
    for row, rec in parquet_rows(inter_file, (S.USER_ID, S.ITEM_ID, S.RATING, S.TIMESTAMP), (), checker):
        _interaction(builder, inter_file, row, rec[S.USER_ID], rec[S.ITEM_ID], rec[S.RATING], rec[S.TIMESTAMP])
    user_file = path / "users.parquet"
    optional = (S.AGE, S.GENDER, S.OCCUPATION)
    for row, rec in parquet_rows(user_file, (S.USER_ID,), optional, checker) if user_file.is_file() else ():
        gender, occupation = (None if rec.get(c) is None else str(rec[c]) for c in (S.GENDER, S.OCCUPATION))
        try:
            user_id = parse_id(rec[S.USER_ID], "user id")
            builder.add_user(user_file, row, user_id, parse_age(rec.get(S.AGE)), gender, occupation)
        except ValueError as exc:
            checker.bad(user_file, row, str(exc))
    return builder.build()


# --------------------------------------------------------------------------------------------------- registry

Loader = Callable[[Path, RowChecker], CanonicalData]

FORMATS: dict[str, Loader] = {
    "recbole": load_recbole,
    "ml-100k": load_ml100k,
    "ml-1m": load_ml1m,
    "ml-latest": load_ml_latest,
    "amazon": load_amazon,
    "parquet": load_parquet,
}


def load_dataset(fmt: str, path: Path, *, strict: bool = False) -> CanonicalData:
    """Load `path` in format `fmt` into canonical tables; see FORMATS for the names."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r} is not supported; choose one of {sorted(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path does not exist: {path}")
    return FORMATS[fmt](path, RowChecker(strict))
