"""The pipeline behind `python -m beam_jobs.caption_images` (see that module for
the command): inputs are matched and expanded, deduplicated by uri, read and
decoded ahead of the model, captioned in batches by RunInference, and written
as Parquet tables with a manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_jobs.commit import commit, remove_stale_staging, staging_dir, supersede_retried_errors
from beam_jobs.common import (
    ERRORS_TAG,
    Loaded,
    Meta,
    PreprocessFn,
    UsageError,
    counter_values,
    dry_run_result,
    error_row,
    pipeline_options,
    run_pipeline,
)
from beam_jobs.inference import CaptionerHandler, CaptionResult
from beam_jobs.progress import (
    ERROR_PREFIX,
    ProgressReporter,
    Tally,
    describe_errors,
    errors_by_type,
)
from beam_jobs.sources import (
    Item,
    display_name,
    match_input,
    printable_uri,
    read_path,
    read_uri,
)
from model import formats
from model.cli import decoding_settings
from model.defaults import MAX_BYTES

NAMESPACE = "caption_images"


def check_export(export_dir: str) -> dict[str, Any]:
    """Fails at start, in one line, on a missing or incompatible export."""
    paths = formats.export_paths(export_dir)
    manifest = formats.read_manifest(paths["manifest"], formats.KIND_EXPORT)
    formats.check_backbone(manifest["features"], paths["manifest"])
    for key in ("model", "vocab"):
        if not FileSystems.exists(paths[key]):
            raise formats.FormatError(f"{paths[key]}: missing from the export")
    return manifest


def check_one_model(
    existing: list[str], model_id: str, output_dir: str, allow_mixed: bool = False
) -> None:
    """--skip_existing adds rows to a table: refuse, in one line, to add another model's."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for path in existing:
        if posixpath.basename(path).startswith("captions-"):
            with FileSystems.open(path, compression_type="uncompressed") as f:
                ids.update(pq.read_table(f, columns=["model_id"]).column(0).unique().to_pylist())
    others = sorted(ids - {model_id})
    if others and not allow_mixed:
        raise UsageError(
            f"{output_dir} holds captions of model {', '.join(others)} and this export is "
            f"{model_id}: --skip_existing would mix models in one table "
            "(use another --output_dir, or --allow_mixed_models)"
        )


def existing_outputs(output_dir: str) -> list[str]:
    found = []
    for table in ("captions", "errors"):
        pattern = f"{output_dir.rstrip('/')}/{table}-*.parquet"
        found += [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
    return sorted(found)


class ExpandInputsFn(beam.DoFn):
    """A matched path -> (uri, Item): the file itself unread, or each archive member's bytes."""

    def __init__(self, progress_dir: str | None = None, max_bytes: int = MAX_BYTES):
        self.tally = Tally(NAMESPACE, progress_dir)
        self.max_bytes = max_bytes

    def setup(self) -> None:
        self.tally.setup()

    def process(self, path: str | Item) -> Iterator[tuple[str, Item]]:
        if isinstance(path, Item):  # already an error row (see matched_inputs)
            self.tally.inc("inputs_matched")
            yield path.uri, path
            return
        for item in read_path(path, defer_files=True, max_bytes=self.max_bytes):
            if (printable := printable_uri(item.uri)) is not None:
                item = bad_file_name(printable)
            self.tally.inc("inputs_matched")
            yield item.uri, item

    def finish_bundle(self) -> None:
        self.tally.flush()


def bad_file_name(printable: str) -> Item:
    return Item(
        printable,
        error_type="bad_file_name",
        message="the file name is not valid UTF-8; rename the file",
    )


def matched_inputs(spec: str, exclude: Sequence[str] = ()) -> Iterator[str | Item]:
    """The paths one --input matches, except those under `exclude` (the job's own output
    folders); a path whose name is not UTF-8 (which Beam could not even carry as a
    string) is already its error row."""
    for path in match_input(spec):
        if any(path.startswith(folder.rstrip("/") + "/") for folder in exclude):
            continue
        printable = printable_uri(path)
        yield path if printable is None else bad_file_name(printable)


def own_outputs(args: argparse.Namespace) -> list[str]:
    """The folders this job writes, as match_input spells paths: never inputs."""
    folders = [args.output_dir] + ([args.attention_dir] if args.attention_dir else [])
    return [f if "://" in f else os.path.abspath(f) for f in folders]


def first_new(element: tuple[str, dict[str, list]]) -> Iterator[Item]:
    """After grouping by uri: the one Item of each uri not already in the output."""
    uri, groups = element
    items, done = groups["input"], groups.get("done", [])
    if items and not done:
        yield items[0]  # the same file matched twice (overlapping --input) is captioned once


def batch_errors(failure: tuple[Any, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    """A model batch that raised (RunInference's dead letters: the batch of (Meta, pixels)
    and the exception) -> one error row per image in it, so no image vanishes."""
    batch, error = failure
    if isinstance(error, tuple) and error and isinstance(error[0], type):
        message = f"{error[0].__name__}: {error[1] if len(error) > 1 else ''}"
    else:
        message = f"{type(error).__name__}: {error}"
    for meta, _ in batch:
        yield (
            meta.key,
            error_row(meta.key, "inference_error", f"the model failed on its batch: {message}"),
        )


def to_loaded(item: Item) -> Iterator[Any]:
    """An Item -> Loaded for PreprocessFn (plain files are read there), or its error row."""
    if item.error_type is not None:
        row = error_row(item.uri, item.error_type, item.message)
        yield beam.pvalue.TaggedOutput(ERRORS_TAG, (item.uri, row))
        return
    yield Loaded(item.uri, item.uri, item.data)


class CountErrorsFn(beam.DoFn):
    """Counts error rows by error_type (the `error.<type>` counters) and passes them on."""

    def __init__(self, progress_dir: str | None = None):
        self.tally = Tally(NAMESPACE, progress_dir)

    def setup(self) -> None:
        self.tally.setup()

    def process(self, element: tuple[str, dict[str, str]]) -> Iterator[tuple[str, dict[str, str]]]:
        self.tally.inc(ERROR_PREFIX + element[1]["error_type"])
        yield element

    def finish_bundle(self) -> None:
        self.tally.flush()


class ToRowFn(beam.DoFn):
    def __init__(self, model_id: str, progress_dir: str | None = None):
        self.model_id = model_id
        self.tally = Tally(NAMESPACE, progress_dir)

    def setup(self) -> None:
        self.tally.setup()

    def finish_bundle(self) -> None:
        self.tally.flush()

    def process(self, element: tuple[Meta, CaptionResult]) -> Iterator[dict[str, Any]]:
        meta, result = element
        self.tally.inc("images_captioned")
        yield {
            "uri": meta.key,
            "caption": result.caption,
            "token_ids": result.token_ids,
            "log_prob": result.log_prob,
            "length": len(result.token_ids),
            "hit_max_length": result.hit_max_length,
            "width": meta.width,
            "height": meta.height,
            "sha256": meta.sha256,
            "model_id": self.model_id,
        }


def plot_one(element: tuple[Meta, CaptionResult], attention_dir: str) -> str:
    from model.plot import attention_png
    from model.preprocess import decode_image

    meta, result = element
    uri = meta.key
    image, _ = decode_image(read_uri(uri))
    image.thumbnail((320, 320))
    words = result.caption.split() + ([] if result.hit_max_length else ["<end>"])
    name = hashlib.sha1(uri.encode()).hexdigest()[:10] + "_" + display_name(uri)
    path = FileSystems.join(attention_dir, os.path.splitext(name)[0] + ".png")
    png = attention_png(image, words or ["<end>"], result.attention, title=result.caption)
    with FileSystems.create(path, mime_type="image/png") as f:
        f.write(png)
    return path


def write_manifest(
    _: None,
    output_dir: str,
    body: dict[str, Any],
    captioned: int,
    failed: int,
    files: list[str],
    inputs: int | None = None,
) -> str:
    """Writes CAPTIONS_DIR/manifest.json once every table file is final. `inputs` counts
    the distinct uris to caption, after grouping: if they are not all in one table or
    the other, the job fails here, loudly, instead of describing a silent loss."""
    inputs = captioned + failed if inputs is None else inputs
    if captioned + failed != inputs:
        raise RuntimeError(
            f"{inputs} inputs but {captioned} captions and {failed} error rows: "
            f"{inputs - captioned - failed} input(s) are in neither table"
        )
    path = f"{output_dir.rstrip('/')}/{formats.MANIFEST_FILE}"
    formats.write_manifest(
        path,
        formats.KIND_CAPTIONS,
        {
            **body,
            "counts": {"captioned": captioned, "failed": failed, "inputs": inputs},
            "files": sorted(os.path.basename(f) for f in files),
        },
    )
    return path


def build_pipeline(
    p: beam.Pipeline,
    args: argparse.Namespace,
    manifest: dict[str, Any],
    run_id: str,
    progress_dir: str | None = None,
    staging: str | None = None,
) -> None:
    """The job, writing its tables and manifest into `staging` (default: the output dir)."""
    model_id = manifest["model_id"]
    precision = args.precision or manifest["features"].get("precision", "float32")
    out = args.output_dir.rstrip("/")
    keyed = (
        p
        | "Inputs" >> beam.Create(args.input)
        | "MatchInputs" >> beam.FlatMap(matched_inputs, own_outputs(args))
        | "SpreadPaths" >> beam.Reshuffle()
        | "ExpandInputs" >> beam.ParDo(ExpandInputsFn(progress_dir, args.max_bytes))
    )
    groups: dict[str, Any] = {"input": keyed}
    if args.skip_existing:
        existing = existing_outputs(args.output_dir)
        tables = {t: [f for f in existing if f"/{t}-" in f] for t in ("captions", "errors")}
        captioned = (
            p
            | "CaptionTables" >> beam.Create(tables["captions"])
            | "CaptionedUris" >> beam.io.ReadAllFromParquet(columns=["uri"])
        )
        failed = (
            p
            | "ErrorTables" >> beam.Create(tables["errors"])
            | "FailedUris" >> beam.io.ReadAllFromParquet(columns=["uri", "error_type"])
            | "NotTransient"
            >> beam.Filter(lambda r: r["error_type"] not in formats.TRANSIENT_ERRORS)
        )
        groups["done"] = (
            (captioned, failed)
            | "DoneUris" >> beam.Flatten()
            | "KeyExisting" >> beam.Map(lambda r: (r["uri"], True))
        )
    # Grouping by uri dedupes overlapping inputs, skips finished ones, and
    # spreads the members of a few big archives over all workers. Plain files
    # are read after it, so their bytes stream rather than being grouped.
    new_inputs = (
        groups | "GroupByUri" >> beam.CoGroupByKey() | "NewInputs" >> beam.FlatMap(first_new)
    )
    fresh = new_inputs | "ToLoad" >> beam.FlatMap(to_loaded).with_outputs(ERRORS_TAG, main="loaded")
    decoded = fresh.loaded | "ReadAndPreprocess" >> beam.ParDo(
        PreprocessFn.from_flags(NAMESPACE, args, progress_dir)
    ).with_outputs(ERRORS_TAG, main="pixels")
    handler = CaptionerHandler(
        args.model,
        precision,
        args.batch_size,
        args.model_copies,
        args.large_model,
        decoding_settings(args),
    )
    captioned, failures = (
        decoded.pixels
        | "Caption" >> RunInference(KeyedModelHandler(handler)).with_exception_handling()
    )
    rows = captioned | "ToRows" >> beam.ParDo(ToRowFn(model_id, progress_dir))
    input_errors = (
        (
            fresh[ERRORS_TAG],
            failures.failed_inferences | "BatchErrors" >> beam.FlatMap(batch_errors),
        )
        | "InputAndBatchErrors" >> beam.Flatten()
        | "CountInputErrors" >> beam.ParDo(CountErrorsFn(progress_dir))
    )  # PreprocessFn counts its own
    errors = (
        (input_errors, decoded[ERRORS_TAG])
        | "AllErrors" >> beam.Flatten()
        | "ErrorRows" >> beam.Map(lambda kv: kv[1])
    )
    failed = Metrics.counter(NAMESPACE, "errors_written")

    def count_failed(row: dict[str, str]) -> dict[str, str]:
        failed.inc()
        return row

    errors = errors | "CountFailed" >> beam.Map(count_failed)
    target = staging or out
    written_rows = rows | "WriteCaptions" >> beam.io.WriteToParquet(
        f"{target}/captions-{run_id}",
        formats.CAPTIONS_SCHEMA,
        codec=formats.PARQUET_CODEC,
        file_name_suffix=".parquet",
        num_shards=args.num_shards,
    )
    written_errors = errors | "WriteErrors" >> beam.io.WriteToParquet(
        f"{target}/errors-{run_id}",
        formats.ERRORS_SCHEMA,
        codec=formats.PARQUET_CODEC,
        file_name_suffix=".parquet",
        num_shards=1,
    )
    if args.attention_dir:
        _ = (
            captioned
            | "FirstForPlots"
            >> beam.combiners.Top.Of(args.attention_plots, key=lambda e: e[0].key, reverse=True)
            | "EachPlot" >> beam.FlatMap(lambda xs: xs)
            | "PlotAttention" >> beam.Map(plot_one, args.attention_dir)
        )
    body = {
        "model": args.model,
        "model_id": model_id,
        "inputs": list(args.input),
        "precision": precision,
        "decoding": {"max_length": manifest["decoding"]["max_length"], **decoding_settings(args)},
        "skip_existing": bool(args.skip_existing),
        "run_id": run_id,
    }
    _ = (
        p
        | "ManifestTrigger" >> beam.Create([None])
        | "WriteManifest"
        >> beam.Map(
            write_manifest,
            target,
            body,
            captioned=beam.pvalue.AsSingleton(
                rows | "CountRows" >> beam.combiners.Count.Globally()
            ),
            failed=beam.pvalue.AsSingleton(
                errors | "CountErrors" >> beam.combiners.Count.Globally()
            ),
            files=beam.pvalue.AsList((written_rows, written_errors) | "Written" >> beam.Flatten()),
            inputs=beam.pvalue.AsSingleton(
                new_inputs | "CountInputs" >> beam.combiners.Count.Globally()
            ),
        )
    )


def run_job(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    """Checks the export and inputs, runs the pipeline, returns a summary dict."""
    manifest = check_export(args.model)
    for spec in args.input:
        if not match_input(spec):
            raise UsageError(f"--input matches nothing: {spec}")
    if args.attention_dir and not FileSystems.exists(args.attention_dir):
        FileSystems.mkdirs(args.attention_dir)  # a no-op on object stores
    for stale in remove_stale_staging(args.output_dir):
        print(f"caption_images: removed {stale}, left by a run that did not finish")
    existing = existing_outputs(args.output_dir)
    if args.skip_existing and not existing:
        args.skip_existing = False  # nothing to skip
    if args.skip_existing:
        check_one_model(existing, manifest["model_id"], args.output_dir, args.allow_mixed_models)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    staging = staging_dir(args.output_dir, run_id)
    print(
        f"caption_images: {len(args.input)} input(s) -> {args.output_dir} "
        f"(model {manifest['model_id']}, batch {args.batch_size})",
        flush=True,
    )
    options = pipeline_options(beam_args)
    reporter = ProgressReporter(
        "caption_images",
        NAMESPACE,
        done_keys=["images_captioned"],
        interval=args.progress_seconds,
        total_key="inputs_matched",
    )
    result, seconds = run_pipeline(
        options,
        lambda p, progress: build_pipeline(p, args, manifest, run_id, progress, staging),
        reporter,
        bool(args.verbose),
    )
    if (dry := dry_run_result(result, options, "caption_images")) is not None:
        return dry
    # Complete: only now are the previous tables replaced (or, --skip_existing, added to).
    if existing and not args.skip_existing:
        print(f"caption_images: replacing {len(existing)} files of the previous run")
    retried = supersede_retried_errors(staging, existing) if args.skip_existing else 0
    if retried:
        print(f"caption_images: {retried} input(s) that failed before were tried again")
    commit(args.output_dir, staging, existing, add=args.skip_existing, retried=retried)
    c = counter_values(result, NAMESPACE)
    done = c.get("images_captioned", 0) + c.get("errors_written", 0)
    summary = {
        "matched": c.get("inputs_matched", 0),
        "captioned": c.get("images_captioned", 0),
        "failed": c.get("errors_written", 0),
        "errors": errors_by_type(c),
        "bytes_read": c.get("bytes_read", 0),
        "seconds": round(seconds, 2),
        "images_per_second": round(done / seconds, 2) if seconds else 0.0,
    }
    print(
        f"caption_images: done: {summary['captioned']} captioned, {summary['failed']} failed"
        f"{describe_errors(summary['errors'])} ({summary['matched']} matched, "
        f"{summary['bytes_read'] / 1e6:.1f} MB) in "
        f"{summary['seconds']}s ({summary['images_per_second']} images/s)",
        flush=True,
    )
    return summary
