"""Train RecBole 1.2.1's SASRec on MovieLens-100k with leave-one-out and print one JSON line of results.

Runs in the RecBole venv (benchmarks/.recbole-venv, made by benchmarks/setup_recbole.sh), not the project venv:

    benchmarks/.recbole-venv/bin/python benchmarks/recbole_sasrec.py --data-dir DIR [--max-epochs N] ...

DIR holds RecBole atomic files; `<DIR>/ml-100k.inter` is read (only the .inter file: no item/user features).
RecBole 1.2.1 ignores `data_path` for a dataset named "ml-100k" (Config._set_default_parameters points it at the
copy bundled in the wheel, recbole/dataset_example/ml-100k), so the file is handed to RecBole under another name,
"ml-100k-loo", with the settings of RecBole's ml-100k dataset config given explicitly below.

Two RecBole 1.2.1 behaviours are corrected by default (each has a flag to keep it):
- Importing `recbole.model.sequential_recommender` imports `sine.py`, which calls
  `torch.autograd.set_detect_anomaly(True)` at import time, so every SASRec step runs under anomaly detection
  (NaN checks after every backward op; ~1.5x slower here). It is switched off again unless --stock-anomaly-detection.
- RecBole keeps float fields as float32, so the timestamps (~8.9e8 s, normalized to [0, 1]) lose their last bit:
  timestamps 1 s apart can tie and then fall back to file order, which moved the valid/test item of 5 of the 943
  ML-100k users. By default the runner feeds RecBole a copy of the .inter file whose timestamps are replaced by
  their dense rank (same order, same ties, exact in float32; normalize_all off). --raw-timestamps keeps the
  original file.

Protocol, shared with rlrf4rec's `train_sasrec_loo`:
- interactions sorted by time per user (stable: equal timestamps keep file order); last item = test target,
  second-to-last = valid target, the rest train (RecBole `eval_args.split = {'LS': 'valid_and_test'}`, order TO).
- full-sort ranking over all items; HR@10 / NDCG@10; early stopping on valid NDCG@10.
- the ranking excludes the user's other interacted items (for valid: the train items; for test: train + valid
  items). RecBole 1.2.1 does *not* do this for sequential models (its FullSortEvalDataLoader passes no history
  mask when MODEL_TYPE is SEQUENTIAL; only the padding item 0 is masked), so the trainer below adds it. The
  unmasked numbers of the same best model are reported too, under "native/...", for comparison with published
  RecBole results.
Per-epoch timing excludes evaluation: `_train_epoch` and `_valid_epoch` are timed separately.
Early stopping: --patience N stops after N epochs without improvement (RecBole's stopping_step = N - 1, because
RecBole stops once the count of non-improving epochs exceeds stopping_step). RecBole counts a tie as an
improvement; best_epoch is 0-based (the epoch index RecBole logs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# RecBole's best-model reload calls torch.load on a pickled checkpoint (config included); torch >= 2.6 defaults to
# weights_only=True, which refuses it.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

DATASET = "ml-100k"  # the file read from --data-dir
RECBOLE_NAME = "ml-100k-loo"  # the name RecBole sees; "ml-100k" would make it read its bundled copy instead
ANOMALY_ON_IMPORT = torch.is_anomaly_enabled()  # True: set by recbole/model/sequential_recommender/sine.py


class TimedLOOTrainer(Trainer):
    """RecBole's Trainer with per-epoch train/eval timing and the user's other items excluded from the ranking."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.train_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.valid_history: list[dict] = []
        self.saved_epochs: list[int] = []
        self.exclude: torch.Tensor | None = None  # [num_users, num_items] bool, True = ranked out

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.train_seconds.append(time.perf_counter() - start)
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.eval_seconds.append(time.perf_counter() - start)
        self.valid_history.append({k: float(v) for k, v in result.items()})
        return score, result

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        self.saved_epochs.append(epoch)  # fit() saves exactly when the valid score improves
        return super()._save_checkpoint(epoch, verbose=verbose, **kwargs)

    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if self.exclude is not None:
            users = interaction[self.config["USER_ID_FIELD"]].to(self.exclude.device)
            drop = self.exclude[users].to(scores.device)  # [B, num_items]
            drop[positive_u, positive_i] = False  # the target itself is always ranked
            scores = scores.masked_fill(drop, -np.inf)
        return interaction, scores, positive_u, positive_i


def _exclusion_masks(user_ids, item_ids, valid_data, test_data, num_users, num_items):
    """Bool masks [num_users, num_items]: every item the user interacted with, minus what the phase may not see.

    valid: all items minus the valid and test targets (= the train items); test: all items minus the test target.
    """
    seen = torch.zeros(num_users, num_items, dtype=torch.bool)
    seen[torch.as_tensor(user_ids), torch.as_tensor(item_ids)] = True
    masks = {}
    test_inter = test_data._dataset.inter_feat
    valid_inter = valid_data._dataset.inter_feat
    uid, iid = test_data._dataset.uid_field, test_data._dataset.iid_field
    test_mask = seen.clone()
    test_mask[test_inter[uid], test_inter[iid]] = False
    valid_mask = test_mask.clone()
    valid_mask[valid_inter[uid], valid_inter[iid]] = False
    masks["valid"], masks["test"] = valid_mask, test_mask
    return masks


def _ranked_timestamps_copy(src: Path, dst: Path) -> None:
    """Copy a RecBole .inter file with `timestamp:float` replaced by its dense rank (order and ties unchanged)."""
    frame = pd.read_csv(src, sep="\t", dtype=str, keep_default_na=False)
    col = "timestamp:float"
    if col not in frame.columns:
        raise SystemExit(f"{src} has no {col} column: {list(frame.columns)}")
    frame[col] = pd.to_numeric(frame[col]).rank(method="dense").astype(np.int64).astype(str)
    frame.to_csv(dst, sep="\t", index=False)


def _targets(data) -> dict[str, str]:
    """user token -> target item token for one eval split."""
    ds = data._dataset
    inter = ds.inter_feat
    users = ds.id2token(ds.uid_field, inter[ds.uid_field].numpy())
    items = ds.id2token(ds.iid_field, inter[ds.iid_field].numpy())
    return {str(u): str(i) for u, i in zip(users, items)}


def _metrics(result, prefix: str) -> dict[str, float]:
    return {f"{prefix}/ndcg@10": float(result["ndcg@10"]), f"{prefix}/hr@10": float(result["hit@10"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help=f"directory holding {DATASET}.inter")
    p.add_argument("--max-epochs", type=int, default=50)
    p.add_argument("--patience", type=int, default=10, help="stop after this many epochs without improvement")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--splits-out", type=Path, help="write {user: [valid_item, test_item]} (raw tokens) here")
    p.add_argument("--raw-timestamps", action="store_true", help="feed the original timestamps (float32 ties)")
    p.add_argument("--stock-anomaly-detection", action="store_true", help="keep RecBole's import-time anomaly mode")
    args = p.parse_args(argv)

    inter_file = args.data_dir / f"{DATASET}.inter"
    if not inter_file.is_file():
        p.error(f"{inter_file} not found")
    if args.patience < 1:
        p.error("--patience must be >= 1")
    torch.set_num_threads(args.threads)
    torch.autograd.set_detect_anomaly(ANOMALY_ON_IMPORT if args.stock_anomaly_detection else False)

    with tempfile.TemporaryDirectory(prefix="recbole-sasrec-") as tmp:
        tmp = Path(tmp)
        # RecBole reads <data_path>/<dataset>/<dataset>.inter; only the .inter file is provided.
        (tmp / "data" / RECBOLE_NAME).mkdir(parents=True)
        feed = tmp / "data" / RECBOLE_NAME / f"{RECBOLE_NAME}.inter"
        if args.raw_timestamps:
            feed.symlink_to(inter_file.resolve())
        else:
            _ranked_timestamps_copy(inter_file, feed)
        os.chdir(tmp)  # RecBole writes log_tensorboard/ under the working directory
        settings = {
            "data_path": str(tmp / "data"),
            "checkpoint_dir": str(tmp / "saved"),
            "use_gpu": False,
            "seed": args.seed,
            "reproducibility": True,
            "show_progress": False,
            "state": "WARNING",
            # RecBole's properties/dataset/ml-100k.yaml, which the renamed dataset does not pick up by itself:
            "field_separator": "\t",
            "seq_separator": " ",
            "USER_ID_FIELD": "user_id",
            "ITEM_ID_FIELD": "item_id",
            "RATING_FIELD": "rating",
            "TIME_FIELD": "timestamp",
            "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
            "val_interval": None,
            "user_inter_num_interval": None,
            "item_inter_num_interval": None,
            "rm_dup_inter": None,
            "normalize_all": args.raw_timestamps,  # RecBole's default (True) for raw timestamps; ranks stay exact
            "MAX_ITEM_LIST_LENGTH": 50,
            "hidden_size": 64,
            "n_layers": 2,
            "n_heads": 2,
            "inner_size": 256,
            "hidden_dropout_prob": 0.5,
            "attn_dropout_prob": 0.5,
            "hidden_act": "gelu",
            "loss_type": "CE",
            "train_neg_sample_args": None,
            "learner": "adam",
            "learning_rate": 1e-3,
            "weight_decay": 0.0,
            "train_batch_size": 2048,
            "eval_batch_size": 4096,
            "epochs": args.max_epochs,
            "stopping_step": args.patience - 1,
            "eval_step": 1,
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
            "metrics": ["Hit", "NDCG"],
            "topk": [10],
            "valid_metric": "NDCG@10",
            "metric_decimal_place": 6,
        }
        config = Config(model="SASRec", dataset=RECBOLE_NAME, config_dict=settings)
        if Path(config["data_path"]).resolve() != (tmp / "data" / RECBOLE_NAME).resolve():
            raise SystemExit(f"RecBole would read {config['data_path']}, not the given file")
        init_seed(config["seed"], config["reproducibility"])
        t0 = time.perf_counter()
        dataset = create_dataset(config)
        uid_field, iid_field = dataset.uid_field, dataset.iid_field
        user_ids = np.asarray(dataset.inter_feat[uid_field]).copy()  # all interactions, before the split
        item_ids = np.asarray(dataset.inter_feat[iid_field]).copy()
        num_users, num_items, num_inter = dataset.user_num, dataset.item_num, len(dataset.inter_feat)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        data_seconds = time.perf_counter() - t0

        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = SASRec(config, train_data._dataset).to(config["device"])
        trainer = TimedLOOTrainer(config, model)
        masks = _exclusion_masks(user_ids, item_ids, valid_data, test_data, num_users, num_items)

        trainer.exclude = masks["valid"]
        t0 = time.perf_counter()
        trainer.fit(train_data, valid_data, verbose=False, saved=True, show_progress=False)
        fit_seconds = time.perf_counter() - t0
        best_epoch = trainer.saved_epochs[-1]

        # Same best model for every number below.
        test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
        trainer.exclude = None
        native_valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
        native_test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

        if args.splits_out:
            valid_t, test_t = _targets(valid_data), _targets(test_data)
            splits = {u: [valid_t.get(u), test_t[u]] for u in test_t}
            args.splits_out.write_text(json.dumps(splits, sort_keys=True))

        best_valid = trainer.valid_history[best_epoch]
        out = {
            "impl": "recbole",
            "seconds_per_epoch": float(np.mean(trainer.train_seconds)),
            "eval_seconds_per_epoch": float(np.mean(trainer.eval_seconds)),
            "train_seconds_total": float(np.sum(trainer.train_seconds)),
            "fit_seconds_total": fit_seconds,
            "data_seconds": data_seconds,
            "epochs_run": len(trainer.train_seconds),
            "best_epoch": best_epoch,  # 0-based
            **_metrics(best_valid, "valid"),
            **_metrics(test_result, "test"),
            **_metrics(native_valid, "native/valid"),
            **_metrics(native_test, "native/test"),
            "valid_ndcg@10_per_epoch": [round(v["ndcg@10"], 6) for v in trainer.valid_history],
            "train_seconds_per_epoch": [round(s, 3) for s in trainer.train_seconds],
            "settings": {
                **{k: v for k, v in settings.items() if k not in ("data_path", "checkpoint_dir", "state")},
                "model": "SASRec",
                "dataset": str(inter_file),
                "users": num_users - 1,
                "items": num_items - 1,
                "interactions": num_inter,
                "train_rows": len(train_data._dataset),
                "valid_rows": len(valid_data._dataset),
                "test_rows": len(test_data._dataset),
                "train_batches_per_epoch": len(train_data),
                "exclusion": "valid: user's train items; test: user's train + valid items",
                "patience": args.patience,
                "early_stopping": f"stop after {args.patience} epochs without valid NDCG@10 improvement "
                f"(RecBole stopping_step={args.patience - 1}); a tie counts as an improvement",
                "timestamps": "original (float32, ties)" if args.raw_timestamps else "dense rank of the original",
                "anomaly_detection": torch.is_anomaly_enabled(),
                "anomaly_detection_on_import": ANOMALY_ON_IMPORT,
                "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))},
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "recbole": __import__("recbole").__version__,
                "python": platform.python_version(),
            },
        }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
