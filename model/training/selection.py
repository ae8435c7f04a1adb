"""Validation, the choice of the best epoch, early stopping, and the export of the chosen weights.

Every worker must take the same decision, or the next step's collectives wait
forever: the workers decode their shares of the val split, the captions are summed
into one array every worker holds, the chief scores them, and every worker receives
the chief's figures (`cluster.from_chief`) and applies the same rule to them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import tensorflow as tf

from model.data.shards import image_records, records
from model.io import formats
from model.network.export import save_export
from model.training import cluster
from model.training.run import Run

# Per real token: the trained objective (cross-entropy + attention penalty) and
# the cross-entropy alone (its exp is perplexity), on train and val.
LOSS_KEYS = ("loss", "ce", "val_loss", "val_ce", "val_cider", "val_loops")
# Per self-critical epoch: mean reward (CIDEr-D of the samples), mean baseline, val.
SCST_KEYS = ("reward", "baseline", "val_cider", "val_loops")
VAL_BATCH = 256


def val_captions(run: Run) -> np.ndarray:
    """Greedy captions of the whole val split (with the default repeat blocking), each
    worker decoding its share: (images, 2 + max_length) rows of length, hit-the-limit
    flag and token ids, the same on every worker."""
    from model.decoding.decoders import make_decoder

    if "val_decoder" not in run.cache:
        run.cache["val_decoder"] = make_decoder(run.model, run.args.max_length)
    images, workers = run.val_info.images, cluster.num_workers(run.strategy)
    sizes = cluster.split_sizes(images, workers)
    w = cluster.worker_index(run.strategy)
    first = sum(sizes[:w])
    rows = np.zeros((images, 2 + run.args.max_length), np.float64)
    at = first
    for batch in image_records(run.val_info.files, VAL_BATCH, first, sizes[w]):
        out = run.cache["val_decoder"](batch["features"])
        n = int(out["lengths"].shape[0])
        rows[at : at + n, 0] = out["lengths"].numpy()
        rows[at : at + n, 1] = out["hit_max_length"].numpy()
        ids = out["token_ids"].numpy()
        rows[at : at + n, 2 : 2 + ids.shape[1]] = ids
        at += n
    if at - first != sizes[w]:
        raise formats.FormatError(
            f"{run.args.data_dir}: split {run.args.val_split!r} holds fewer images than the "
            f"manifest's {images}; re-extract the split"
        )
    return cluster.sum_over_workers(run.strategy, rows)


def val_references(run: Run) -> list[list[str]]:
    """The val split's reference captions, image by image in file order (read once)."""
    if "val_references" not in run.cache:
        spec = {formats.KEY_CAPTIONS: tf.io.VarLenFeature(tf.string)}
        refs: list[list[str]] = []
        for batch in records(run.val_info.files, shuffle_files=False, seed=None).batch(512):
            parsed = tf.io.parse_example(batch, spec)[formats.KEY_CAPTIONS]
            rows = tf.RaggedTensor.from_sparse(parsed).to_list()
            refs += [[c.decode() for c in row] for row in rows]
        run.cache["val_references"] = refs
    return run.cache["val_references"]


def score_val_captions(run: Run, rows: np.ndarray) -> tuple[float, float]:
    """(CIDEr-D, share of captions with a repeated trigram) of `val_captions`' rows."""
    from model.evaluation.metrics import cider
    from model.text.ngrams import looping_figures

    lengths = rows[:, 0].astype(int)
    captions = [
        run.vocab.decode(row[2 : 2 + n].astype(int).tolist())
        for row, n in zip(rows, lengths, strict=True)
    ]
    refs = val_references(run)
    score = cider(dict(enumerate(refs)), dict(enumerate(captions)))
    figures = looping_figures(captions, rows[:, 1].astype(bool))
    return score, float(figures["repeated_3gram_share"])


def validation(run: Run, loss: tuple[float, float] | None) -> dict[str, float]:
    """The epoch's val figures, the chief's on every worker: val_loss and val_ce (when
    `loss` is given) and, when selecting by CIDEr, val_cider and val_loops."""
    keys = ["val_loss", "val_ce"] if loss is not None else []
    values = list(loss or ())
    if run.args.select_by == "cider":
        rows = val_captions(run)
        keys += ["val_cider", "val_loops"]
        values += list(score_val_captions(run, rows)) if run.chief else [0.0, 0.0]
    shared = cluster.from_chief(run.strategy, np.array(values), run.chief)
    return dict(zip(keys, (float(v) for v in shared), strict=True))


def judge(run: Run, record: dict[str, Any], score: float, patience: bool = True) -> None:
    """Selection from a shared `score` (lower is better): a new best keeps the weights
    (`Run.best`) and marks the record selected; with `patience`, the epochs without one
    are counted for early stopping (cross-entropy epochs only)."""
    better = score < float(run.state["best_val"].numpy())
    if better:
        run.state["best_val"].assign(score)
        run.best.keep()
        record["selected"] = True
    if patience:
        run.state["bad_epochs"].assign(0) if better else run.state["bad_epochs"].assign_add(1)


def close_epoch(
    run: Run, record: dict[str, Any], counter: str, sums: str, keys: tuple, prefix: str
) -> None:
    """The end of an epoch of either kind: its record joins the history, `counter`
    advances, the position and the running `sums` restart, a checkpoint is written, and
    the record's `keys` go to TensorBoard as `prefix/key`."""
    run.state["history"].assign(json.dumps([*run.history, record]))
    run.state[counter].assign_add(1)
    run.state["position"].assign(0)
    run.state[sums].assign(tf.zeros_like(run.state[sums]))
    run.manager.save(checkpoint_number=run.var("step"))
    if run.chief:
        with run.writer.as_default(step=run.var("step")):
            for key in keys:
                if key in record:
                    tf.summary.scalar(f"{prefix}/{key}", record[key])


def selected_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Which epoch the export holds: the last one marked selected (best on val)."""
    chosen = [r for r in history if r.get("selected")]
    if not chosen:
        return None
    r = chosen[-1]
    phase = "self-critical" if "scst_epoch" in r else "cross-entropy"
    return {"phase": phase, "epoch": r.get("scst_epoch", r.get("epoch"))}


def best_val(run: Run) -> float | None:
    """The best epoch's selection metric (CIDEr, or the val loss), None without val."""
    if run.val_info is None or not math.isfinite(float(run.state["best_val"].numpy())):
        return None
    value = float(run.state["best_val"].numpy())
    return -value if run.args.select_by == "cider" else value


def exported_already(run: Run) -> dict[str, Any] | None:
    """The export's training summary when MODEL_DIR/export holds this very run's end (a
    finished run started again): the same steps and history, and the serving model if
    one is wanted. Then there is nothing to write."""
    export_dir = os.path.join(run.args.model_dir, formats.EXPORT_DIR)
    path = formats.export_paths(export_dir)["manifest"]
    if not tf.io.gfile.exists(path):
        return None
    try:
        training = formats.read_manifest(path, formats.KIND_EXPORT).get("training") or {}
    except formats.FormatError:
        return None
    from model.inference.saved_model import serving_path

    serving = run.args.no_serving_export or tf.io.gfile.exists(serving_path(export_dir))
    same = training.get("steps") == run.var("step") and training.get("history") == run.history
    return training if same and serving else None


def finish(run: Run, scst_summary: dict[str, Any] | None) -> dict[str, Any]:
    """Takes the best epoch's weights (early stopping) and, on the chief, writes the export."""
    if (done := exported_already(run)) is not None:
        print(
            f"train: {run.args.model_dir} is trained to step {run.var('step')} and exported "
            "already; nothing to do",
            flush=True,
        )
        return done
    if run.val_info is not None:
        run.best.load_into_model()
    summary = {
        "steps": run.var("step"),
        "epochs": run.var("epoch"),
        "steps_per_epoch": run.steps_per_epoch,
        "global_batch": run.global_batch,
        "history": run.history,
        "ce_epochs": run.var("epoch"),
        "scst_epochs": run.var("scst_epoch"),
        **({"scst": scst_summary} if scst_summary else {}),
        "selected": selected_epoch(run.history),
        "selected_by": run.args.select_by if run.val_info else None,
        "best_val": best_val(run),
        "stopped_early": run.stopped_early,
        "replicas": run.strategy.num_replicas_in_sync,
        "policy": run.policy,
    }
    if run.chief:
        export_dir = os.path.join(run.args.model_dir, formats.EXPORT_DIR)
        save_export(
            run.model, run.vocab, run.features_manifest, export_dir, run.args.max_length, summary
        )
        print(f"train: exported to {export_dir} ({summary['steps']} steps)", flush=True)
        if not getattr(run.args, "no_serving_export", False):
            from model.inference.saved_model import write_serving_export

            path = write_serving_export(export_dir)
            print(f"train: serving SavedModel in {path}", flush=True)
    return summary
