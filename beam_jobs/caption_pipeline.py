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
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_jobs.commit import (
    commit,
    finish_commit,
    read_commit_plan,
    resumable,
    staging_dir,
    stale_staging,
    supersede_retried_errors,
    write_run_record,
)
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
    runs_remotely,
)
from beam_jobs.inference import CaptionerHandler, CaptionResult
from beam_jobs.lease import output_lease
from beam_jobs.parts import (
    WritePartsFn,
    finished_parts,
    remove_inflight,
    row_count,
    without_overlaps,
)
from beam_jobs.progress import (
    ERROR_PREFIX,
    ProgressReporter,
    Tally,
    describe_errors,
    errors_by_type,
)
from beam_jobs.sources import (
    MEMBER_SEPARATOR,
    Item,
    display_name,
    is_archive_name,
    match_input,
    printable_uri,
    read_path,
    read_uri,
)
from model.cli import decoding_settings
from model.defaults import MAX_BYTES
from model.io import formats

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


def check_one_decoding(output_dir: str, decoding: dict[str, Any], allow_mixed: bool) -> None:
    """--skip_existing adds rows to a table: refuse, in one line, rows decoded otherwise
    (beam rows in a greedy table would make the manifest's decoding untrue)."""
    path = f"{output_dir.rstrip('/')}/{formats.MANIFEST_FILE}"
    if allow_mixed or not FileSystems.exists(path):
        return
    before = formats.read_manifest(path, formats.KIND_CAPTIONS).get("decoding") or {}
    diff = {k: (before.get(k), v) for k, v in decoding.items() if k in before and before[k] != v}
    if diff:
        raise UsageError(
            f"{output_dir} holds captions decoded with "
            + ", ".join(f"{k} {a}" for k, (a, _) in diff.items())
            + "; this run has "
            + ", ".join(f"{k} {b}" for k, (_, b) in diff.items())
            + ": --skip_existing would mix decodings in one table "
            "(use the same flags, another --output_dir, or --allow_mixed_models)"
        )


def existing_outputs(output_dir: str) -> list[str]:
    found = []
    for table in ("captions", "errors"):
        pattern = f"{output_dir.rstrip('/')}/{table}-*.parquet"
        found += [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
    return sorted(found)


class KeyInputsFn(beam.DoFn):
    """A matched path keyed for grouping: a plain file by its uri, an archive by its path.
    An archive's members are read after the grouping, so their bytes never wait in a
    shuffle (which local runners hold in memory). Plain files are counted as matched
    here, before any is read, so progress lines show their total from the start; an
    archive's members are counted as it is read."""

    def __init__(self, progress_dir: str | None = None):
        self.tally = Tally(NAMESPACE, progress_dir)

    def setup(self) -> None:
        self.tally.setup()

    def process(self, path: str | Item) -> Iterator[tuple[str, Item]]:
        item = path if isinstance(path, Item) else Item(path)
        if item.error_type is not None or not is_archive_name(item.uri):
            self.tally.inc("inputs_matched")
        yield item.uri, item

    def finish_bundle(self) -> None:
        self.tally.flush()


def done_key(uri: str) -> tuple[str, str | None]:
    """A uri already in the output, keyed like the input it came from: an archive member
    under its archive (with its member name), anything else under itself (with None)."""
    if MEMBER_SEPARATOR in uri:
        archive, member = uri.split(MEMBER_SEPARATOR, 1)
        if is_archive_name(archive):  # else a path that holds "!/": its own error row
            return archive, member
    return uri, None


class NewInputsFn(beam.DoFn):
    """After grouping by uri (archives by path): each input not already in the output,
    once. A plain file comes out unread; an archive is read here, and each member not in
    the output and not seen before in it comes out with its bytes, or as its error row."""

    def __init__(self, progress_dir: str | None = None, max_bytes: int = MAX_BYTES):
        self.tally = Tally(NAMESPACE, progress_dir)
        self.max_bytes = max_bytes

    def setup(self) -> None:
        self.tally.setup()

    def process(self, element: tuple[str, dict[str, list]]) -> Iterator[Item]:
        key, groups = element
        items, done = groups["input"], groups.get("done", [])
        if not items or None in done:  # not an input, or it (or its archive) has its row
            return
        if items[0].error_type is not None or not is_archive_name(key):
            yield items[0]  # the same file matched twice (overlapping --input) is read once
            return
        skip = set(done)
        for item in read_path(key, max_bytes=self.max_bytes):
            if MEMBER_SEPARATOR in item.uri:
                member = item.uri.split(MEMBER_SEPARATOR, 1)[1]
                if member in skip:
                    continue  # finished before, or a second member of that name
                skip.add(member)
            if (printable := printable_uri(item.uri)) is not None:
                item = bad_file_name(printable)
            self.tally.inc("inputs_matched")
            yield item

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
        if printable is not None:
            yield bad_file_name(printable)
        elif MEMBER_SEPARATOR in path:  # "x!/a.jpg" would read as member a.jpg of archive x
            yield Item(
                path,
                error_type="ambiguous_name",
                message=f"the path holds {MEMBER_SEPARATOR!r}, which names archive members; "
                "rename the folder or file",
            )
        else:
            yield path


def own_outputs(args: argparse.Namespace) -> list[str]:
    """The folders this job writes, as match_input spells paths: never inputs."""
    folders = [args.output_dir] + ([args.attention_dir] if args.attention_dir else [])
    return [f if "://" in f else os.path.abspath(f) for f in folders]


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
    from model.evaluation.plot import attention_png
    from model.images.preprocess import decode_image

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


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes, and what it builds on."""

    run_id: str
    staging: str  # CAPTIONS_DIR/.staging-RUN_ID: parts, then the manifest
    add: bool  # adds to the committed tables (--skip_existing) instead of replacing them
    existing: list[str] = field(default_factory=list)  # the committed table files
    adopted: list[str] = field(default_factory=list)  # parts of the killed run resumed
    adopted_counts: dict[str, int] = field(default_factory=dict)  # their captioned, failed


def write_manifest(
    _: None,
    output_dir: str,
    body: dict[str, Any],
    captioned: int,
    failed: int,
    files: list[str],
    inputs: int | None = None,
    adopted: RunPlan | None = None,
) -> str:
    """Writes CAPTIONS_DIR/manifest.json once every table file is final. `inputs` counts
    the distinct uris to caption, after grouping: if they are not all in one table or
    the other, the job fails here, loudly, instead of describing a silent loss. The
    parts `adopted` from a killed run count as well."""
    inputs = captioned + failed if inputs is None else inputs
    if captioned + failed != inputs:
        raise RuntimeError(
            f"{inputs} inputs but {captioned} captions and {failed} error rows: "
            f"{inputs - captioned - failed} input(s) are in neither table"
        )
    before = adopted.adopted_counts if adopted else {}
    captioned += before.get("captioned", 0)
    failed += before.get("failed", 0)
    path = f"{output_dir.rstrip('/')}/{formats.MANIFEST_FILE}"
    formats.write_manifest(
        path,
        formats.KIND_CAPTIONS,
        {
            **body,
            "counts": {"captioned": captioned, "failed": failed, "inputs": captioned + failed},
            "files": sorted(
                {os.path.basename(f) for f in [*files, *(adopted.adopted if adopted else [])]}
            ),
        },
    )
    return path


def done_uris(p: beam.Pipeline, plan: RunPlan) -> beam.PCollection | None:
    """(key, member or None) of every uri the run must not caption again: the committed
    tables' when it adds to them (but transient failures, tried again), and every row of
    the parts it adopted. None when there are none."""
    sources = []
    if plan.add:
        tables = {t: [f for f in plan.existing if f"/{t}-" in f] for t in ("captions", "errors")}
        sources.append(
            p
            | "CaptionTables" >> beam.Create(tables["captions"])
            | "CaptionedUris" >> beam.io.ReadAllFromParquet(columns=["uri"])
        )
        sources.append(
            p
            | "ErrorTables" >> beam.Create(tables["errors"])
            | "FailedUris" >> beam.io.ReadAllFromParquet(columns=["uri", "error_type"])
            | "NotTransient"
            >> beam.Filter(lambda r: r["error_type"] not in formats.TRANSIENT_ERRORS)
        )
    if plan.adopted:
        sources.append(
            p
            | "AdoptedParts" >> beam.Create(plan.adopted)
            | "AdoptedUris" >> beam.io.ReadAllFromParquet(columns=["uri"])
        )
    if not sources:
        return None
    return (
        tuple(sources)
        | "DoneUris" >> beam.Flatten()
        | "KeyDone" >> beam.Map(lambda r: done_key(r["uri"]))
    )


def write_table(
    rows: beam.PCollection, table: str, schema: Any, plan: RunPlan, args: argparse.Namespace
) -> beam.PCollection:
    """Writes one table into the staging folder; returns the paths of its files. Parts are
    written as rows are finished (`beam_jobs.parts`); with --num_shards, the captions are
    written as exactly that many files at the end instead."""
    prefix = f"{table}-{plan.run_id}"
    if table == "captions" and args.num_shards:
        return rows | f"Write{table.title()}" >> beam.io.WriteToParquet(
            f"{plan.staging}/{prefix}",
            schema,
            codec=formats.PARQUET_CODEC,
            file_name_suffix=".parquet",
            num_shards=args.num_shards,
        )
    return rows | f"Write{table.title()}" >> beam.ParDo(
        WritePartsFn(plan.staging, prefix, schema, formats.PARQUET_CODEC, args.checkpoint_seconds)
    )


def spreads_work(p: beam.Pipeline) -> bool:
    """Whether to reshuffle archive members over workers: on a distributed runner, whose
    shuffle lives on disk, yes; on a local one, which holds a shuffle in memory, no."""
    return runs_remotely(p.options)


def build_pipeline(
    p: beam.Pipeline,
    args: argparse.Namespace,
    manifest: dict[str, Any],
    plan: RunPlan,
    progress_dir: str | None = None,
) -> None:
    """The job, writing its tables and manifest into the plan's staging folder."""
    model_id = manifest["model_id"]
    precision = args.precision or manifest["features"].get("precision", "float32")
    groups: dict[str, Any] = {
        "input": p
        | "Inputs" >> beam.Create(args.input)
        | "MatchInputs" >> beam.FlatMap(matched_inputs, own_outputs(args))
        | "KeyInputs" >> beam.ParDo(KeyInputsFn(progress_dir))
    }
    if (done := done_uris(p, plan)) is not None:
        groups["done"] = done
    # Grouping by uri dedupes overlapping inputs and skips finished ones; files and
    # archives are read after it, so their bytes stream rather than being grouped.
    new_inputs = (
        groups
        | "GroupByUri" >> beam.CoGroupByKey()
        | "NewInputs" >> beam.ParDo(NewInputsFn(progress_dir, args.max_bytes))
    )
    if spreads_work(p):  # the members of a few big archives, over all workers
        new_inputs = new_inputs | "SpreadMembers" >> beam.Reshuffle()
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
    written_rows = write_table(rows, "captions", formats.CAPTIONS_SCHEMA, plan, args)
    written_errors = write_table(errors, "errors", formats.ERRORS_SCHEMA, plan, args)
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
        "skip_existing": plan.add,
        "run_id": plan.run_id,
    }
    _ = (
        p
        | "ManifestTrigger" >> beam.Create([None])
        | "WriteManifest"
        >> beam.Map(
            write_manifest,
            plan.staging,
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
            adopted=plan,
        )
    )


def run_identity(args: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: a killed one is resumed only by its own command."""
    return {
        "model_id": manifest["model_id"],
        "inputs": sorted(s if "://" in s else os.path.abspath(s) for s in args.input),
        "precision": args.precision or manifest["features"].get("precision", "float32"),
        "decoding": decoding_settings(args),
        "max_bytes": args.max_bytes,
        "max_pixels": args.max_pixels,
    }


def adopt_parts(staging: str, run_id: str) -> tuple[list[str], dict[str, int]]:
    """A killed run's finished parts (half-written ones deleted, and any whose uris an
    earlier part holds), and how many captions and error rows they hold."""
    remove_inflight(staging)
    tables = ("captions", "errors")
    parts = without_overlaps([p for t in tables for p in finished_parts(staging, f"{t}-{run_id}")])
    counts = {
        key: sum(row_count(p) for p in parts if posixpath.basename(p).startswith(f"{t}-"))
        for key, t in (("captioned", "captions"), ("failed", "errors"))
    }
    return parts, counts


def plan_run(args: argparse.Namespace, manifest: dict[str, Any]) -> RunPlan:
    """Resumes the killed run this command started (with --skip_existing), or starts a new
    one; removes every other unfinished run's staging folder."""
    identity = run_identity(args, manifest)
    for folder in stale_staging(args.output_dir):
        if read_commit_plan(folder) is not None:  # killed while committing: finish it
            finish_commit(folder)
            print(f"caption_images: finished the commit of {folder}, killed while committing")
    stale = stale_staging(args.output_dir)
    found = resumable(stale, identity) if args.skip_existing else None
    for folder in stale:
        if not found or folder != found[0]:
            FileSystems.delete([folder])
            print(f"caption_images: removed {folder}, left by a run that did not finish")
    existing = existing_outputs(args.output_dir)
    if found:
        staging, record = found
        adopted, counts = adopt_parts(staging, record["run_id"])
        plan = RunPlan(
            record["run_id"],
            staging,
            bool(record["add"]),
            existing,
            adopted,
            counts,
        )
        print(
            f"caption_images: resuming run {plan.run_id}, killed after "
            f"{counts['captioned']} captions and {counts['failed']} error rows"
        )
    else:
        run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        plan = RunPlan(
            run_id,
            staging_dir(args.output_dir, run_id),
            bool(args.skip_existing and existing),
            existing,
        )
        write_run_record(plan.staging, {"run_id": run_id, "add": plan.add, "identity": identity})
    if plan.add:
        check_one_model(existing, manifest["model_id"], args.output_dir, args.allow_mixed_models)
        check_one_decoding(args.output_dir, decoding_settings(args), args.allow_mixed_models)
    return plan


def run_job(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    """Checks the export and inputs, runs the pipeline, returns a summary dict. Holds the
    lease on --output_dir (`beam_jobs.lease`) from start to commit: a second run on it
    refuses in one line."""
    with output_lease(args.output_dir, "caption_images"):
        return _run_job(args, beam_args)


def _run_job(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    manifest = check_export(args.model)
    for spec in args.input:
        where = spec if "://" in spec else os.path.abspath(spec)
        for own in own_outputs(args):
            if (where.rstrip("/") + "/").startswith(own.rstrip("/") + "/"):
                raise UsageError(
                    f"--input {spec} is in this job's own output folder {own}, whose files "
                    "are never inputs; caption another folder"
                )
        if not match_input(spec):
            raise UsageError(f"--input matches nothing: {spec}")
    if args.attention_dir and not FileSystems.exists(args.attention_dir):
        FileSystems.mkdirs(args.attention_dir)  # a no-op on object stores
    plan = plan_run(args, manifest)
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
        lambda p, progress: build_pipeline(p, args, manifest, plan, progress),
        reporter,
        bool(args.verbose),
    )
    if (dry := dry_run_result(result, options, "caption_images")) is not None:
        if not plan.adopted:
            FileSystems.delete([plan.staging])
        return dry
    # Complete: only now are the previous tables replaced (or, --skip_existing, added to).
    if plan.existing and not plan.add:
        print(f"caption_images: replacing {len(plan.existing)} files of the previous run")
    retried = supersede_retried_errors(plan.staging, plan.existing) if plan.add else 0
    if retried:
        print(f"caption_images: {retried} input(s) that failed before were tried again")
    commit(args.output_dir, plan.staging, plan.existing, add=plan.add, retried=retried)
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
