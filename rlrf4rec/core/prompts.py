"""Factorization prompts (METHOD.md section 2) from a user's history window.

Consumes the history window of one user (item titles, years, ratings) and optional user attributes; produces the
history text (the tail of every user knowledge text) and the chat messages that ask an instruct LLM to analyse the
user's preferences along domain factors. Titles and attributes are data: they are sanitised so that no title can
open a chat turn or change a role. Knows nothing about tokenizers, engines or files.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from rlrf4rec.core import schema as S

# Factors per domain, as listed in METHOD.md section 2.
FACTORS = {
    "movies": (
        "genre",
        "director and actors",
        "era and country",
        "characters",
        "plot and theme",
        "mood and tone",
        "critical acclaim and awards",
        "production quality",
        "soundtrack",
    ),
    "products": (
        "genre or category",
        "author or brand",
        "style",
        "theme",
        "setting",
        "length and complexity",
        "era",
        "quality",
    ),
}

# Words of which a preference text must name at least one to be on topic: the factors' own words and common genres.
_GENRE_WORDS = {
    "movies": """action adventure animation animated comedy comedies crime documentary drama dramas fantasy horror
        musical mystery romance romantic sci fi science fiction thriller thrillers war western film films movie
        movies director directors actor actress cast story stories music""",
    "products": """book books novel novels fiction nonfiction mystery romance fantasy history biography science
        children product products brand price design read reading writing""",
}
TOPIC_WORDS = {
    domain: frozenset(w for factor in FACTORS[domain] for w in re.findall(r"[a-z]+", factor) if w not in ("and", "or"))
    | frozenset(words.split())
    for domain, words in _GENRE_WORDS.items()
}


def mentions_topic(text: str, domain: str = "movies") -> bool:
    """Whether `text` names at least one factor or genre word of the domain (a crude on-topic check)."""
    return not TOPIC_WORDS[domain].isdisjoint(re.findall(r"[a-z]+", text.lower()))


# Anything that looks like a chat-template control sequence: ChatML (<|im_start|>), Llama 3 (<|start_header_id|>),
# Llama 2 ([INST], <<SYS>>), Gemma (<start_of_turn>) and generic <s>/</s>.
_CONTROL = re.compile(r"<\|[^|>]{0,40}\|>|\[/?INST\]|<</?SYS>>|</?start_of_turn>|</?end_of_turn>|</?s>", re.I)


def sanitize(text: str, max_chars: int = 200) -> str:
    """One line of plain text: control sequences, control characters and newlines removed, length capped."""
    text = _CONTROL.sub(" ", text)
    text = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:max_chars]


@dataclass(frozen=True)
class HistoryItem:
    title: str
    year: int | None
    rating: float | None  # None: unknown (an on-line request may send item ids only)


# A user's knowledge text, written here and read back here (preference_of): an optional preference line, an optional
# user-attribute line, then the history line.
PREFERENCES_PREFIX = "Preferences: "
USER_PREFIX = "User: "
HISTORY_PREFIX = "History: "


def history_text(items: Sequence[HistoryItem], user_attributes: dict[str, object] | None = None) -> str:
    """`"<title>" (<year>), <r> stars;` per item, oldest first, preceded by the known user attributes."""
    parts = []
    attrs = {k: v for k, v in (user_attributes or {}).items() if v not in (None, "")}
    if attrs:
        pairs = (f"{sanitize(str(k), 40)} {sanitize(str(v), 40)}" for k, v in attrs.items())
        parts.append(USER_PREFIX + ", ".join(pairs))
    entries = []
    for item in items:
        title = sanitize(item.title).replace('"', "'")
        year = f" ({item.year})" if item.year else ""
        if item.rating is None:
            entries.append(f'"{title}"{year};')
            continue
        stars = f"{item.rating:g} star" + ("" if item.rating == 1 else "s")
        entries.append(f'"{title}"{year}, {stars};')
    parts.append(HISTORY_PREFIX + " ".join(entries))
    return "\n".join(parts)


def user_knowledge_text(history: str, preference_text: str | None = None, with_history: bool = True) -> str:
    """What the encoder reads for a user: the preference text (when there is one) before the history text, or
    without it (`with_history` false: knowledge.history_text); the history text alone when there is no preference."""
    if preference_text is None:
        return history
    if not with_history:
        return f"{PREFERENCES_PREFIX}{preference_text.strip()}"
    return f"{PREFERENCES_PREFIX}{preference_text.strip()}\n{history}"


def preference_of(knowledge_text: str) -> str | None:
    """The preference part of a `user_knowledge_text`, None for a history-only one."""
    if not knowledge_text.startswith(PREFERENCES_PREFIX):
        return None
    # The history text closes the knowledge text: an optional "User: ..." line, then the "History: ..." line.
    end = knowledge_text.rfind("\n" + HISTORY_PREFIX)
    user_line = knowledge_text.rfind("\n" + USER_PREFIX, 0, end)
    if user_line != -1 and "\n" not in knowledge_text[user_line + 1 : end]:
        end = user_line
    return knowledge_text[len(PREFERENCES_PREFIX) : end if end != -1 else None].strip()


def preference_messages(history: str, domain: str = "movies") -> list[dict[str, str]]:
    """Chat messages asking for a factor-by-factor analysis of the user's preferences, grounded in the history."""
    if domain not in FACTORS:
        raise ValueError(f"prompt domain {domain!r} is not known; choose one of {sorted(FACTORS)}")
    noun = "movies" if domain == "movies" else "products"
    factors = ", ".join(FACTORS[domain])
    system = f"You are an expert recommender who explains what a user likes in {noun}."
    user = (
        f"Here is a user's rating history of {noun}, oldest first (ratings from 1 to 5 stars).\n"
        f"{history}\n\n"
        f"Analyse this user's preferences. Consider these factors: {factors}. For each factor that matters, say "
        f"what the user likes or dislikes and give the reason from the history. Be concise."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def item_messages(title: str, year: int | None, genres: Sequence[str], domain: str = "movies") -> list[dict[str, str]]:
    """Chat messages asking for a factual introduction of one item along the domain's factors (KAR's item prompt):
    the LLM's knowledge of the item, which a user's preference text can then be matched against."""
    if domain not in FACTORS:
        raise ValueError(f"prompt domain {domain!r} is not known; choose one of {sorted(FACTORS)}")
    noun = "movie" if domain == "movies" else "product"
    known = f" Its known genres: {', '.join(sanitize(g, 40) for g in genres)}." if genres else ""
    year_text = f" ({year})" if year else ""
    system = f"You are an expert who knows every {noun} and describes it accurately."
    user = (
        f'Introduce the {noun} "{sanitize(title)}"{year_text}.{known} Describe its attributes, including but not '
        f"limited to: {', '.join(FACTORS[domain])}. Be concise and factual."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def item_meta(items: pa.Table) -> dict[str, tuple[str, int | None]]:
    """item_id -> (title, year): what a prompt says of an item (schema.ITEMS rows)."""
    return {r[S.ITEM_ID]: (r[S.TITLE], r[S.YEAR]) for r in items.select([S.ITEM_ID, S.TITLE, S.YEAR]).to_pylist()}


def user_attributes(users: pa.Table | None) -> dict[str, dict[str, object]]:
    """user_id -> the attributes a prompt names (schema.USERS rows); empty without a users table."""
    if users is None:
        return {}
    return {
        r[S.USER_ID]: {"age": r[S.AGE], "gender": r[S.GENDER], "occupation": r[S.OCCUPATION]} for r in users.to_pylist()
    }


def history_texts(
    sequences: pa.Table, items: pa.Table, users: pa.Table | None = None, max_items: int | None = None
) -> dict[str, str]:
    """user_id -> history text of its window `item_ids[history_start:history_end]` (schema.SEQUENCES rows), the
    last `max_items` entries of it when given (a shorter prompt).

    Only the window is read: items at or after `history_end` are held out for re-ranking and never reach a prompt.
    """
    meta, attrs = item_meta(items), user_attributes(users)
    texts = {}
    cols = [S.USER_ID, S.ITEM_IDS, S.RATINGS, S.HISTORY_START, S.HISTORY_END]
    for r in sequences.select(cols).to_pylist():
        start = r[S.HISTORY_START] if max_items is None else max(r[S.HISTORY_START], r[S.HISTORY_END] - max_items)
        window = range(start, r[S.HISTORY_END])
        history = [HistoryItem(*meta[r[S.ITEM_IDS][i]], r[S.RATINGS][i]) for i in window]
        texts[r[S.USER_ID]] = history_text(history, attrs.get(r[S.USER_ID]))
    return texts


def prompt_messages(
    sequences: pa.Table, items: pa.Table, users: pa.Table | None, max_items: int | None, domain: str
) -> dict[str, list[dict[str, str]]]:
    """user_id -> the chat messages of the user's preference prompt (history_texts' window, `domain`'s factors):
    what the generate stage renders, and what the pairs, SFT examples and GRPO prompts carry."""
    return {u: preference_messages(h, domain) for u, h in history_texts(sequences, items, users, max_items).items()}


def item_metadata_texts(items: pa.Table) -> dict[str, str]:
    """item_id -> the cheap item knowledge text: `"<title>" (<year>). Genres: a, b.` (schema.ITEMS rows)."""
    texts = {}
    for r in items.select([S.ITEM_ID, S.TITLE, S.YEAR, S.GENRES]).to_pylist():
        year = f" ({r[S.YEAR]})" if r[S.YEAR] else ""
        genres = ", ".join(sanitize(g, 40) for g in r[S.GENRES]) or "unknown"
        texts[r[S.ITEM_ID]] = f'"{sanitize(r[S.TITLE])}"{year}. Genres: {genres}.'
    return texts
