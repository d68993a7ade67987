"""Teacher profiles: hand-computed sentences, co-watching counts with the user's own sequence taken out, and the
leakage guard (nothing at or after a user's history_end can reach its profile)."""

import pyarrow as pa
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.profile import CoWatch, ProfileItem, teacher_profile, teacher_profiles, train_sequences


def test_profile_names_genres_mood_era_and_stand_outs_as_computed_by_hand():
    items = [
        ProfileItem("Noir A", 1950, ("Film-Noir", "Crime"), 5.0),
        ProfileItem("Noir B", 1955, ("Film-Noir",), 5.0),
        ProfileItem("Comedy A", 1995, ("Comedy",), 1.0),
        ProfileItem("Comedy B", 1996, ("Comedy", "Romance"), 2.0),
        ProfileItem("Plain", 1994, ("unknown",), 3.0),
    ]
    # Mean 3.2. Shrunken deviations (one pseudo-item at the mean): film-noir (1.8 + 1.8) / 3 = 1.2,
    # crime 1.8 / 2 = 0.9, romance -1.2 / 2 = -0.6, comedy (-2.2 - 1.2) / 3 = -1.133; "unknown" is no genre.
    # Dark minus light: 1.2 + 0.9 - (-1.133 - 0.6) > 0. Eras: before 1970 3.6 / 3 = 1.2, 1990s -4.0 / 4 = -1.0.
    # Loved: rating >= max(4, 3.7); disliked: rating <= min(2, 2.2), lowest first.
    assert teacher_profile(items, "movies", ["Next One", "Next Two"]) == (
        'Likely to watch next: "Next One" and "Next Two". '
        "Genre: likes film-noir and crime; dislikes comedy and romance. "
        "Mood and tone: prefers dark, serious films over light ones. "
        "Era and country: favours before 1970 over the 1990s and later. "
        'Stand-outs: loved "Noir B" and "Noir A"; disliked "Comedy A" and "Comedy B".'
    )


def test_profile_of_a_user_who_rates_everything_alike_says_so():
    items = [ProfileItem(f"T{i}", 1995, ("Drama",), 4.0) for i in range(3)]
    assert teacher_profile(items) == "Genre: mostly watches drama, rated alike."
    assert teacher_profile([]).startswith("No ratings yet")
    with pytest.raises(ValueError, match="domain 'songs'"):
        teacher_profile(items, "songs")


def test_cowatch_counts_what_followed_and_leaves_the_users_own_sequence_out():
    sequences = {"a": ["x", "y", "z"], "b": ["x", "z"], "u": ["x", "w", "w2"]}
    cw = CoWatch.build(sequences, span=2)
    assert cw.follows["x"] == {"y": 1, "z": 2, "w": 1, "w2": 1}
    # For "u" its own x -> w, w2 are taken out: only what others watched after x remains.
    assert cw.next_items("u", ["x"], k=5) == ["z", "y"]
    # A user outside the counts (valid / test) gets everything, ties by item id.
    assert cw.next_items("v", ["x"], k=5) == ["z", "w", "w2", "y"]
    assert cw.next_items("v", ["x", "z"], k=5) == ["w", "w2", "y"]  # history items are never named


def test_train_sequences_keep_train_users_in_time_order():
    interactions = pa.table(
        {
            S.USER_ID: ["a", "a", "a", "v", "v", "v", "s"],
            S.ITEM_ID: ["i3", "i1", "i2", "i1", "i2", "i3", "i1"],
            S.RATING: [4.0] * 7,
            S.TIMESTAMP: [30, 10, 20, 1, 2, 3, 1],
        }
    )
    assert train_sequences(interactions, held_out={"v"}, min_interactions=2) == {"a": ["i1", "i2", "i3"]}


def _tables(ratings_after: float, item_after: str):
    items = pa.Table.from_pylist(
        [
            {S.ITEM_ID: i, S.TITLE: f"Title {i}", S.YEAR: 1990 + n, S.GENRES: [g]}
            for n, (i, g) in enumerate([("1", "Drama"), ("2", "Comedy"), ("3", "Horror"), ("4", "War"), ("5", "Drama")])
        ]
    )
    sequences = pa.Table.from_pylist(
        [
            {
                S.USER_ID: "u",
                S.SPLIT: "train",
                S.ITEM_IDS: ["1", "2", "3", item_after],
                S.RATINGS: [5.0, 1.0, 4.0, ratings_after],
                S.TIMESTAMPS: [1, 2, 3, 4],
                S.HISTORY_START: 0,
                S.HISTORY_END: 3,
            }
        ],
        schema=S.SEQUENCES,
    )
    return sequences, items


def test_no_item_after_the_window_reaches_a_profile():
    # The co-watch counts hold the user's own full sequence (as the train users' counts do): leave-user-out must
    # keep its later item "4"/"5" out, and ratings or items after history_end must not change a word.
    profiles = []
    for rating, later in ((1.0, "4"), (5.0, "5")):
        sequences, items = _tables(rating, later)
        cw = CoWatch.build({"u": ["1", "2", "3", later], "other": ["3", "1"]})
        profiles.append(teacher_profiles(sequences, items, "movies", None, cw)["u"])
    assert profiles[0] == profiles[1]
    assert "Title 4" not in profiles[0] and "Title 5" not in profiles[0]
    assert "likes drama" in profiles[0] and "dislikes comedy" in profiles[0]
    # The prompt's window (the last 2 entries): item "1" is no longer read.
    sequences, items = _tables(1.0, "4")
    assert "drama" not in teacher_profiles(sequences, items, "movies", 2)["u"]
