"""The encode stage's embedding cache: a text is encoded once per encoder, across calls and processes."""

import hashlib

import numpy as np
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_parquet
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.core.knowledge import (
    EMBEDDING_CACHE,
    embedding_cache,
    encode_cached,
    encode_user_texts,
    text_hash,
    text_segments,
)
from rlrf4rec.core.layout import RunLayout


def expected(text: str) -> list[float]:
    """The fake encoder's vector of `text`: a pure function of the text, so a cached vector can be checked."""
    codes = [ord(c) for c in text]
    return [len(text), sum(codes) / 1000, (codes[0] if codes else 0) / 7, 0.25]


class CountingEncoder:
    """Stands in for TextEncoder (`.dim`, `.encode`): deterministic vectors, and a record of every text encoded."""

    dim = 4

    def __init__(self):
        self.calls = 0
        self.encoded: list[str] = []

    def encode(self, texts):
        self.calls += 1
        self.encoded.extend(texts)
        return np.array([expected(t) for t in texts], dtype=np.float32).reshape(len(texts), self.dim)


def vectors(texts: list[str]) -> np.ndarray:
    return np.array([expected(t) for t in texts], dtype=np.float32)


@pytest.fixture
def cache(tmp_path):
    return RunLayout(tmp_path / "run").embedding_cache("test")  # its folder does not exist yet


def test_a_second_call_with_the_same_texts_encodes_nothing_and_returns_the_same_vectors(cache):
    encoder = CountingEncoder()
    first = encode_cached(encoder, ["likes sci-fi", "hates romance"], cache)
    assert sorted(encoder.encoded) == ["hates romance", "likes sci-fi"] and encoder.calls == 1
    assert first.dtype == np.float32 and np.array_equal(first, vectors(["likes sci-fi", "hates romance"]))
    again = encode_cached(encoder, ["hates romance", "likes sci-fi"], cache)  # same texts, other order
    assert encoder.calls == 1 and len(encoder.encoded) == 2
    assert np.array_equal(again, first[::-1])


def test_only_a_new_text_is_encoded_and_rows_keep_the_input_order(cache):
    encoder = CountingEncoder()
    encode_cached(encoder, ["a first text", "a second text"], cache)
    out = encode_cached(encoder, ["a second text", "a new text", "a first text"], cache)
    assert encoder.encoded[2:] == ["a new text"] and encoder.calls == 2
    assert np.array_equal(out, vectors(["a second text", "a new text", "a first text"]))
    table = read_parquet(cache, EMBEDDING_CACHE)  # the file grows by the new text; old entries stay
    assert sorted(table.column(S.TEXT_HASH).to_pylist()) == sorted(
        text_hash(t) for t in ("a first text", "a second text", "a new text")
    )


def test_the_parquet_cache_is_read_back_by_a_fresh_encoder(cache):
    texts = ["Preferences: quiet dramas.", "History: 'Heat' (1995), 5 stars"]
    written = encode_cached(CountingEncoder(), texts, cache)
    assert cache.is_file()
    fresh = CountingEncoder()  # another process: nothing in memory, only the file
    read_back = encode_cached(fresh, texts, cache)
    assert fresh.calls == 0 and fresh.encoded == []
    assert np.array_equal(read_back, written)
    table = read_parquet(cache, EMBEDDING_CACHE)
    row = table.column(S.TEXT_HASH).to_pylist().index(text_hash(texts[1]))
    assert table.column(S.VECTOR)[row].as_py() == pytest.approx(expected(texts[1]), rel=1e-6)


def test_duplicates_in_one_call_are_encoded_once(cache):
    encoder = CountingEncoder()
    out = encode_cached(encoder, ["same", "other", "same", "same"], cache)
    assert sorted(encoder.encoded) == ["other", "same"] and encoder.calls == 1
    assert np.array_equal(out, vectors(["same", "other", "same", "same"]))
    assert read_parquet(cache, EMBEDDING_CACHE).num_rows == 2


def test_without_a_cache_path_nothing_is_written_and_nothing_is_remembered(tmp_path):
    encoder = CountingEncoder()
    encode_cached(encoder, ["x text", "x text"], None)
    encode_cached(encoder, ["x text"], None)
    assert encoder.encoded == ["x text", "x text"] and encoder.calls == 2  # once per call, duplicates folded
    assert list(tmp_path.iterdir()) == []


def test_no_texts_give_an_empty_matrix_of_the_encoder_width(cache):
    encoder = CountingEncoder()
    out = encode_cached(encoder, [], cache)
    assert out.shape == (0, 4) and encoder.calls == 0 and not cache.exists()


def test_text_hash_is_the_sha256_prefix_of_the_text():
    assert text_hash("abc") == hashlib.sha256(b"abc").hexdigest()[:32] == "ba7816bf8f01cfea414140de5dae2223"
    assert text_hash("abc ") != text_hash("abc")  # no normalisation: any change is another text


def test_user_texts_as_one_vector_or_as_padded_segments_through_the_same_cache(cache):
    texts = ["Likes A. Hates B.", "Short one"]
    encoder = CountingEncoder()
    whole = encode_user_texts(encoder, texts, 0, cache)
    assert np.array_equal(whole, vectors(texts))
    segments = encode_user_texts(encoder, texts, 4, cache)  # [N, S, D], S = the most segments of any text
    assert segments.shape == (2, 2, 4)
    assert np.array_equal(segments[0], vectors(["Likes A.", "Hates B."]))
    assert np.array_equal(segments[1, 0], vectors(["Short one"])[0]) and not segments[1, 1].any()  # zero padding
    # "Short one" has one segment, the text itself: it came from the cache, only the two sentences were new
    assert sorted(encoder.encoded) == sorted([*texts, "Likes A.", "Hates B."])
    fresh = CountingEncoder()
    assert np.array_equal(encode_user_texts(fresh, texts, 4, cache), segments) and fresh.calls == 0


def test_segments_drop_fragments_and_keep_head_and_tail_over_an_odd_cap():
    text = "One. a. Two! Three?\n\nFour; Five."
    assert text_segments(text, 10) == ["One.", "Two!", "Three?", "Four;", "Five."]  # "a." is too short to keep
    assert text_segments(text, 3) == ["One.", "Four;", "Five."]  # 1 from the head, 2 from the tail


def _cfg(tmp_path, **sections) -> RunConfig:
    return from_dict(RunConfig, {"name": "e", "run_dir": str(tmp_path / "run"), **sections})


def test_one_cache_file_per_encoder_and_max_length(tmp_path):
    base = embedding_cache(_cfg(tmp_path, models={"encoder": "enc-a"}, encode={"max_length": 64}))
    assert base.parent == RunLayout(tmp_path / "run").embedding_cache("k").parent
    assert base == embedding_cache(_cfg(tmp_path, models={"encoder": "enc-a"}, encode={"max_length": 64}))
    assert base == embedding_cache(  # the batch size changes no vector
        _cfg(tmp_path, models={"encoder": "enc-a"}, encode={"max_length": 64, "batch_size": 4})
    )
    assert base != embedding_cache(_cfg(tmp_path, models={"encoder": "enc-b"}, encode={"max_length": 64}))
    assert base != embedding_cache(_cfg(tmp_path, models={"encoder": "enc-a"}, encode={"max_length": 128}))
