"""Slow loop forms of core/metrics.py's vectorised metrics, written straight from the definitions: the tests check the
fast forms against them."""

import numpy as np


def reference_rank_metrics(scores, labels, ks=(1, 3, 5, 7), mask=None) -> dict[str, np.ndarray]:
    """Slow loop form of `rank_metrics`, written straight from the definitions; for tests only."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=float)
    mask = np.ones(scores.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    out = {name: [] for k in ks for name in (f"ndcg@{k}", f"map@{k}", f"hr@{k}")}
    out["mrr"] = []
    for row_scores, row_labels, row_mask in zip(scores.tolist(), labels.tolist(), mask.tolist(), strict=True):
        valid = [i for i in range(len(row_scores)) if row_mask[i]]
        order = sorted(valid, key=lambda i: (-row_scores[i], i))
        ranked = [row_labels[i] for i in order]
        ideal = sorted(ranked, reverse=True)
        for k in ks:
            dcg = sum((2**r - 1) / np.log2(i + 2) for i, r in enumerate(ranked[:k]))
            idcg = sum((2**r - 1) / np.log2(i + 2) for i, r in enumerate(ideal[:k]))
            out[f"ndcg@{k}"].append(dcg / idcg if idcg > 0 else 0.0)
            hits, ap = 0, 0.0
            for i, r in enumerate(ranked[:k]):
                if r > 0:
                    hits += 1
                    ap += hits / (i + 1)
            out[f"map@{k}"].append(ap / hits if hits else 0.0)
            out[f"hr@{k}"].append(1.0 if hits else 0.0)
        first = next((i for i, r in enumerate(ranked) if r > 0), None)
        out["mrr"].append(0.0 if first is None else 1.0 / (first + 1))
    return {name: np.asarray(v, dtype=float) for name, v in out.items()}


def reference_full_sort_metrics(scores, target, exclude, ks=(10,)) -> dict[str, np.ndarray]:
    """Slow loop form of `full_sort_metrics` with exclude as index lists; for tests only."""
    out = {name: [] for k in ks for name in (f"hr@{k}", f"ndcg@{k}")}
    for row_scores, t, seen in zip(np.asarray(scores, dtype=float).tolist(), list(target), exclude, strict=True):
        skip = ({0} | {int(i) for i in seen}) - {int(t)}
        rank = sum(1 for i, s in enumerate(row_scores) if i not in skip and s >= row_scores[t])
        for k in ks:
            out[f"hr@{k}"].append(1.0 if rank <= k else 0.0)
            out[f"ndcg@{k}"].append(1.0 / np.log2(rank + 1) if rank <= k else 0.0)
    return {name: np.asarray(v, dtype=float) for name, v in out.items()}
