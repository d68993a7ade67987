"""Teacher profiles: a user's preferences written from the history window's statistics, without any LLM.

Consumes one user's history window (item titles, years, genres, ratings), the prompt domain and, optionally, the
train users' co-watching counts (`CoWatch`); produces a few short sentences in the factor structure the
factorization prompt asks for (prompts.FACTORS): the titles that viewers of the same recent items went on to watch
(what a well-read LLM knows as "fans of X also watch Y"), which genres the user rates above and below their own
average, the mood those genres add up to, the era they favour, and the titles that stand out. It is what a good
preference text should say, so it serves as user knowledge (a controls row) and as the target of the policy's
supervised warm start (stages/sft.py).

Of the user, only the window `item_ids[history_start:history_end]` (optionally its last `max_items` entries: what
the prompt shows) is read; items at or after `history_end` are the re-rank lists' and never reach a profile. The
co-watching counts are the train users' (valid and test users never count), and a train user's own sequence is taken
out of them before its profile is written (leave-user-out): its own later items cannot come back through the counts.
Knows nothing about encoders, models or files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa

from rlrf4rec.core import schema as S
from rlrf4rec.core.prompts import FACTORS, sanitize

# A genre or era is named when its shrunken mean rating deviation from the user's own mean reaches this many stars.
MIN_DEVIATION = 0.25
SHRINKAGE = 1.0  # pseudo-items at the user's mean added to every genre / era: one 5-star item is not a taste
MAX_GENRES = 3
MAX_TITLES = 2
NEXT_TITLES = 4  # co-watched titles named per profile
COWATCH_SPAN = 20  # item b counts as following item a when it comes within this many interactions after it
TITLE_CHARS = 48

_NO_GENRE = frozenset({"", "unknown", "(no genres listed)"})  # placeholders, not tastes
# Movie genres (MovieLens' names, lower case) that make a film dark and serious, or light.
_DARK = frozenset({"crime", "film-noir", "horror", "thriller", "war", "mystery", "drama"})
_LIGHT = frozenset({"comedy", "children's", "children", "musical", "animation", "romance", "fantasy"})


@dataclass(frozen=True)
class ProfileItem:
    title: str
    year: int | None
    genres: tuple[str, ...]
    rating: float


@dataclass(frozen=True)
class CoWatch:
    """How often item b followed item a within `span` interactions, over some users' time-ordered sequences (the
    train users'), and those sequences, so that one user's own contribution can be taken out again."""

    follows: Mapping[str, Counter]
    sequences: Mapping[str, Sequence[str]]
    span: int = COWATCH_SPAN

    @classmethod
    def build(cls, sequences: Mapping[str, Sequence[str]], span: int = COWATCH_SPAN) -> CoWatch:
        follows: dict[str, Counter] = {}
        for items in sequences.values():
            for a, head in enumerate(items):
                follows.setdefault(head, Counter()).update(items[a + 1 : a + 1 + span])
        return cls(follows, sequences, span)

    def next_items(self, user: str, history: Sequence[str], k: int = NEXT_TITLES) -> list[str]:
        """The `k` items most often watched after the `history` items, by users other than `user`; items of the
        history itself are left out. Ties go to the item id (a pure function)."""
        heads = set(history)
        score: Counter = Counter()
        for head in history:
            score.update(self.follows.get(head, Counter()))
        own = self.sequences.get(user, ())
        for a, head in enumerate(own):  # leave-user-out: the user's own pairs, taken out again
            if head in heads:
                score.subtract(own[a + 1 : a + 1 + self.span])
        ranked = sorted((n, i) for i, n in score.items() if n > 0 and i not in heads)
        return [i for _, i in sorted(ranked, key=lambda x: (-x[0], x[1]))[:k]]


def train_sequences(interactions: pa.Table, held_out: set[str], min_interactions: int) -> dict[str, list[str]]:
    """user -> item ids in time order (ties in file order, as the protocol sorts) for every user of the split's
    train part: users with at least `min_interactions` interactions who are not in `held_out` (valid and test)."""
    import pyarrow.compute as pc

    order = pc.sort_indices(interactions, sort_keys=[(S.USER_ID, "ascending"), (S.TIMESTAMP, "ascending")])
    rows = interactions.take(order).select([S.USER_ID, S.ITEM_ID]).to_pydict()
    out: dict[str, list[str]] = {}
    for user, item in zip(rows[S.USER_ID], rows[S.ITEM_ID]):
        if user not in held_out:
            out.setdefault(user, []).append(item)
    return {u: items for u, items in out.items() if len(items) >= min_interactions}


def _deviations(groups: dict[str, list[float]], mean: float) -> dict[str, float]:
    """group -> shrunken mean deviation of its ratings from the user's mean (SHRINKAGE pseudo-items at the mean)."""
    return {g: sum(r - mean for r in rs) / (len(rs) + SHRINKAGE) for g, rs in groups.items()}


def _era(year: int) -> str:
    if year < 1970:
        return "before 1970"
    if year < 1990:
        return "the 1970s and 1980s"
    return "the 1990s and later"


def _names(values: Sequence[str]) -> str:
    """a; a and b; a, b and c."""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _factor(domain: str, word: str) -> str:
    """The domain factor naming `word` ("genre" -> "genre" or "genre or category"), capitalised."""
    return next(f for f in FACTORS[domain] if word in f).capitalize()


def _titles(titles: Sequence[str]) -> str:
    return _names([f'"{sanitize(t, TITLE_CHARS)}"' for t in titles])


def teacher_profile(items: Sequence[ProfileItem], domain: str = "movies", next_titles: Sequence[str] = ()) -> str:
    """The user's preferences from their history window, oldest item first; one sentence per factor it can tell,
    after the co-watched `next_titles` when given (first: the most telling, and what a cut-off text keeps)."""
    if domain not in FACTORS:
        raise ValueError(f"profile domain {domain!r} is not known; choose one of {sorted(FACTORS)}")
    if not items:
        return "No ratings yet: nothing is known about this user's taste."
    sentences = [f"Likely to watch next: {_titles(next_titles)}."] if next_titles else []
    ratings = [it.rating for it in items]
    mean = sum(ratings) / len(ratings)
    by_genre: dict[str, list[float]] = {}
    for it in items:
        for g in dict.fromkeys(g.strip().lower() for g in it.genres if g.strip().lower() not in _NO_GENRE):
            by_genre.setdefault(g, []).append(it.rating)
    genre_dev = _deviations(by_genre, mean)
    # Ties broken by how often the genre was watched, then by name: the profile is a pure function of the window.
    ranked = sorted(genre_dev, key=lambda g: (-genre_dev[g], -len(by_genre[g]), g))
    liked = [g for g in ranked if genre_dev[g] >= MIN_DEVIATION][:MAX_GENRES]
    disliked = [g for g in reversed(ranked) if genre_dev[g] <= -MIN_DEVIATION][:MAX_GENRES]
    if liked or disliked:
        parts = ([f"likes {_names(liked)}"] if liked else []) + ([f"dislikes {_names(disliked)}"] if disliked else [])
        sentences.append(f"{_factor(domain, 'genre')}: {'; '.join(parts)}.")
    elif by_genre:
        common = sorted(by_genre, key=lambda g: (-len(by_genre[g]), g))[:2]
        sentences.append(f"{_factor(domain, 'genre')}: mostly watches {_names(common)}, rated alike.")
    if domain == "movies":
        dark = sum(genre_dev.get(g, 0.0) for g in _DARK) - sum(genre_dev.get(g, 0.0) for g in _LIGHT)
        if abs(dark) >= MIN_DEVIATION:
            mood = "dark, serious films over light ones" if dark > 0 else "light, cheerful films over dark ones"
            sentences.append(f"Mood and tone: prefers {mood}.")
    by_era: dict[str, list[float]] = {}
    for it in items:
        if it.year:
            by_era.setdefault(_era(it.year), []).append(it.rating)
    if len(by_era) > 1:
        era_dev = _deviations(by_era, mean)
        best = max(era_dev, key=lambda e: (era_dev[e], len(by_era[e]), e))
        worst = min(era_dev, key=lambda e: (era_dev[e], -len(by_era[e]), e))
        if era_dev[best] - era_dev[worst] >= MIN_DEVIATION:
            sentences.append(f"{_factor(domain, 'era')}: favours {best} over {worst}.")
    order = sorted(range(len(items)), key=lambda i: (-items[i].rating, -i))  # highest first, then most recent
    loved = [i for i in order if items[i].rating >= max(4.0, mean + 0.5)][:MAX_TITLES]
    hated = [i for i in reversed(order) if items[i].rating <= min(2.0, mean - 1.0)][:MAX_TITLES]

    if loved or hated:
        parts = ([f"loved {_titles([items[i].title for i in loved])}"] if loved else []) + (
            [f"disliked {_titles([items[i].title for i in hated])}"] if hated else []
        )
        sentences.append(f"Stand-outs: {'; '.join(parts)}.")
    if not sentences:
        sentences.append(f"Rates everything alike, about {mean:.1f} stars.")
    return " ".join(sentences)


def teacher_profiles(
    sequences: pa.Table,
    items: pa.Table,
    domain: str = "movies",
    max_items: int | None = None,
    cowatch: CoWatch | None = None,
) -> dict[str, str]:
    """user_id -> teacher profile of its window `item_ids[history_start:history_end]` (schema.SEQUENCES rows), the
    last `max_items` entries of it when given (what a prompt with generate.prompt_history shows), naming the items
    `cowatch` (leave-user-out) says follow that window.

    Only the window is read: items at or after `history_end` are held out for re-ranking and never reach a profile.
    """
    meta = {
        r[S.ITEM_ID]: (r[S.TITLE], r[S.YEAR], tuple(r[S.GENRES]))
        for r in items.select([S.ITEM_ID, S.TITLE, S.YEAR, S.GENRES]).to_pylist()
    }
    profiles = {}
    for r in sequences.select([S.USER_ID, S.ITEM_IDS, S.RATINGS, S.HISTORY_START, S.HISTORY_END]).to_pylist():
        start = r[S.HISTORY_START] if max_items is None else max(r[S.HISTORY_START], r[S.HISTORY_END] - max_items)
        ids = r[S.ITEM_IDS][start : r[S.HISTORY_END]]
        ratings = r[S.RATINGS][start : r[S.HISTORY_END]]
        window = [ProfileItem(*meta[i], float(x)) for i, x in zip(ids, ratings) if x is not None]
        following = cowatch.next_items(r[S.USER_ID], ids) if cowatch is not None else []
        profiles[r[S.USER_ID]] = teacher_profile(window, domain, [meta[i][0] for i in following if i in meta])
    return profiles
