"""The graph of `python -m beam_jobs.caption_images` (see that module for
the command): inputs are matched and expanded, deduplicated by uri, read and
decoded ahead of the model, captioned in batches by RunInference, and written
as data files of the caption table, which the launcher then commits in one
transaction (`beam_jobs.caption_run`, `beam_jobs.caption_table`).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_jobs.caption_run import (
    PART_PREFIX,
    REWRITE_PREFIX,
    RunPlan,
    check_export,
    commit_run,
    disk_full_message,
    extractor_settings,
    is_disk_full,
    plan_run,
    row_settings,
    write_run_record,
)
from beam_jobs.caption_steps import (
    NAMESPACE,
    SUPERSEDED_TAG,
    CountErrorsFn,
    KeyInputsFn,
    NewInputsFn,
    Origin,
    ToRowFn,
    batch_errors,
    done_entries,
    error_table_row,
    matched_inputs,
    own_outputs,
    plot_one,
    to_loaded,
)
from beam_jobs.inference import CaptionerHandler
from beam_jobs.parts import (
    IDENTITY_COLUMNS,
    WritePartsFn,
    part_name,
    part_record,
    read_parquet,
    row_identity,
    write_part,
)
from beam_jobs.paths import absolute
from beam_jobs.preprocessing import ERRORS_TAG, PreprocessFn
from beam_jobs.progress import (
    ProgressReporter,
    describe_errors,
    errors_by_type,
)
from beam_jobs.runner import (
    counter_values,
    dry_run_result,
    pipeline_options,
    run_pipeline,
    runs_remotely,
)
from beam_jobs.sources import match_input
from beam_jobs.tables import (
    TableSpec,
    describe_tables,
    keep_list,
    read_text_table,
    row_item,
    table_files,
)
from model.cli import UsageError, decoding_settings, empty_captions_warning
from model.images.fetch import FetchSettings
from model.io import formats


def done_and_retried(p: beam.Pipeline, plan: RunPlan, output_dir: str) -> dict[str, Any]:
    """CoGroupByKey groups, keyed like the inputs (`done_entries`): "done",
    (member or None, key, whether a duplicate_key row) of every row the run must not make again
    (the table's when it appends, but not its transient failures; every row of the files
    it adopted), and "retried", the (file, key) of the table's transient failures, which
    are tried again."""
    groups: dict[str, Any] = {}
    sources = []
    if plan.table_files:
        rows = (
            p
            | "TableFiles" >> beam.Create(sorted(plan.table_files))
            | "TableRows" >> beam.io.ReadAllFromParquet(columns=DONE_COLUMNS, with_filename=True)
        )
        sources.append(
            rows
            | "Final" >> beam.Filter(lambda fr: fr[1]["error_type"] not in formats.TRANSIENT_ERRORS)
            | "FinalRows" >> beam.Map(lambda fr: fr[1])
        )
        groups["retried"] = (
            rows
            | "Transient" >> beam.Filter(lambda fr: fr[1]["error_type"] in formats.TRANSIENT_ERRORS)
            | "KeyTransient"
            >> beam.FlatMapTuple(
                lambda file, row: ((g, (file, row["key"])) for g, _ in done_entries(row))
            )
        )
    if plan.adopted:
        sources.append(
            p
            | "AdoptedFiles" >> beam.Create([f"{output_dir.rstrip('/')}/{n}" for n in plan.adopted])
            | "AdoptedRows" >> beam.io.ReadAllFromParquet(columns=DONE_COLUMNS)
        )
    if sources:
        groups["done"] = (
            tuple(sources) | "DoneRows" >> beam.Flatten() | "KeyDone" >> beam.FlatMap(done_entries)
        )
    return groups


DONE_COLUMNS = ["key", "uri", "error_type"]


def input_items(p: beam.Pipeline, args: argparse.Namespace, specs: list[TableSpec]) -> Any:
    """Every input of the run as it is keyed for grouping: the paths each --input matches,
    and the rows of each --input_table (read on the workers)."""
    sources = []
    if args.input:
        sources.append(
            p
            | "Inputs" >> beam.Create(args.input)
            | "MatchInputs" >> beam.FlatMap(matched_inputs, own_outputs(args))
        )
    for i, spec in enumerate(specs):
        label = f"Table{i + 1}"
        files = p | f"{label}Pattern" >> beam.Create([spec.pattern])
        if spec.kind == "parquet":
            read = beam.io.ReadAllFromParquet(columns=spec.columns, with_filename=True)
            rows = (
                files
                | f"{label}Read" >> read
                | f"{label}Rows" >> beam.MapTuple(lambda path, r, s=spec: row_item(r, s, path))
            )
        else:
            rows = (
                files
                | f"{label}Files" >> beam.FlatMap(table_files)
                | f"{label}Spread" >> beam.Reshuffle()
                | f"{label}Rows" >> beam.FlatMap(read_text_table, spec)
            )
        sources.append(rows)
    return tuple(sources) | "AllInputs" >> beam.Flatten()


def write_rows(
    rows: beam.PCollection, label: str, plan: RunPlan, args: argparse.Namespace
) -> beam.PCollection:
    """Writes rows as data files of the table; returns the parts (`parts.part_record`). Parts
    are written as rows are finished (`beam_jobs.parts`); with --num_shards, the captions
    are written as exactly that many files at the end instead."""
    prefix = f"{PART_PREFIX}{plan.attempt}"
    schema = plan.schema
    if label == "Captions" and args.num_shards:
        shards = args.num_shards
        return (
            rows
            | "ShardCaptions" >> beam.Map(lambda r: (_shard_of(row_identity(r), shards), r))
            | "GroupShards" >> beam.GroupByKey()
            | "WriteCaptions"
            >> beam.MapTuple(lambda _, rs: _write_rows(args.output_dir, prefix, list(rs), schema))
        )
    return rows | f"Write{label}" >> beam.ParDo(
        WritePartsFn(
            args.output_dir,
            prefix,
            schema,
            formats.PARQUET_CODEC,
            args.checkpoint_seconds,
        )
    )


def _shard_of(identity: str, shards: int) -> int:
    return int(hashlib.sha1(identity.encode()).hexdigest()[:8], 16) % shards


def _write_rows(folder: str, prefix: str, rows: list[Any], schema: Any) -> dict[str, Any]:
    name = part_name(prefix, rows)
    return write_part(folder, name, rows, schema, formats.PARQUET_CODEC)


def rewrite_without(
    element: tuple[str, Any], output_dir: str, prefix: str, sizes: dict[str, int]
) -> dict[str, Any]:
    """A table file some of whose transient error rows this run supersedes (by key) -> the
    file to remove, and its other rows as a new part of this run (None if it keeps none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path, keys = element
    table = read_parquet(path)
    superseded = pc.and_(
        pc.is_in(table["key"], pa.array(sorted(set(keys)), pa.string())),
        pc.is_in(table["error_type"], pa.array(formats.TRANSIENT_ERRORS, pa.string())),
    )
    kept = table.filter(pc.invert(pc.fill_null(superseded, False)))
    add = None
    if kept.num_rows:
        name = part_name(prefix, kept.select(IDENTITY_COLUMNS).to_pylist())
        add = write_part(output_dir, name, kept, None, formats.PARQUET_CODEC)
    return {
        "remove": path,
        "size": sizes[path],
        "dropped": table.num_rows - kept.num_rows,
        "add": add,
    }


def adopted_part(name: str, output_dir: str) -> dict[str, Any]:
    """A part a killed run of this command finished: what the commit needs of it."""
    path = f"{output_dir.rstrip('/')}/{name}"
    table = read_parquet(path)
    size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    return part_record(name, size, table)


def looping_sums(rows: beam.PCollection) -> beam.PCollection:
    """(captions, with a repeated trigram, at the length limit, empty): sums a table's
    commits add up."""

    def add(counts: Any) -> tuple[int, ...]:
        totals = [0, 0, 0, 0]
        for c in counts:
            totals = [a + b for a, b in zip(totals, c, strict=True)]
        return tuple(totals)

    def figures(r: dict[str, Any]) -> tuple[int, ...]:
        return (1, int(r["repeated_trigram"]), int(r["hit_max_length"]), int(not r["caption"]))

    return rows | "LoopingFigures" >> beam.Map(figures) | "SumLooping" >> beam.CombineGlobally(add)


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
    """The job: data files of the table, then the run record its commit reads."""
    settings = {**row_settings(args, manifest), "run_id": plan.run_id}
    groups: dict[str, Any] = {
        "input": input_items(p, args, plan.tables)
        | "KeyInputs" >> beam.ParDo(KeyInputsFn(progress_dir)),
        **done_and_retried(p, plan, args.output_dir),
    }
    new_inputs_fn = NewInputsFn(progress_dir, args.max_bytes, list(plan.keep))
    # Grouping by key dedupes overlapping inputs and skips finished ones; files and
    # archives are read after it, so their bytes stream rather than being grouped.
    grouped = (
        groups
        | "GroupByKey" >> beam.CoGroupByKey()
        | "NewInputs" >> beam.ParDo(new_inputs_fn).with_outputs(SUPERSEDED_TAG, main="inputs")
    )
    new_inputs = grouped.inputs
    if spreads_work(p):  # the members of a few big archives, over all workers
        new_inputs = new_inputs | "SpreadMembers" >> beam.Reshuffle()
    fresh = new_inputs | "ToLoad" >> beam.FlatMap(to_loaded).with_outputs(ERRORS_TAG, main="loaded")
    decoded = fresh.loaded | "ReadAndPreprocess" >> beam.ParDo(
        PreprocessFn.from_flags(
            NAMESPACE, args, progress_dir, FetchSettings.from_flags(args, args.max_bytes)
        )
    ).with_outputs(ERRORS_TAG, main="pixels")
    precision, runtime, calibration = extractor_settings(args, manifest)
    handler = CaptionerHandler(
        args.model,
        precision,
        args.batch_size,
        args.model_copies,
        args.large_model,
        decoding_settings(args),
        runtime,
        calibration,
    )
    captioned, failures = (
        decoded.pixels
        | "Caption" >> RunInference(KeyedModelHandler(handler)).with_exception_handling()
    )
    rows = captioned | "ToRows" >> beam.ParDo(ToRowFn(settings, progress_dir))
    input_errors = (
        (
            fresh[ERRORS_TAG],
            failures.failed_inferences | "BatchErrors" >> beam.FlatMap(batch_errors),
        )
        | "InputAndBatchErrors" >> beam.Flatten()
        | "CountInputErrors" >> beam.ParDo(CountErrorsFn(progress_dir))
    )  # PreprocessFn counts its own
    failed = Metrics.counter(NAMESPACE, "errors_written")

    def error_row(element: tuple[Origin, dict[str, str]]) -> dict[str, Any]:
        failed.inc()
        return error_table_row(*element, settings)

    errors = (
        (input_errors, decoded[ERRORS_TAG])
        | "AllErrors" >> beam.Flatten()
        | ("ErrorRows" >> beam.Map(error_row))
    )
    parts = (
        write_rows(rows, "Captions", plan, args),
        write_rows(errors, "Errors", plan, args),
    ) | "Parts" >> beam.Flatten()
    rewritten = (
        grouped[SUPERSEDED_TAG]
        | "GroupSuperseded" >> beam.GroupByKey()
        | "RewriteSuperseded"
        >> beam.Map(
            rewrite_without, args.output_dir, f"{REWRITE_PREFIX}{plan.attempt}", plan.table_files
        )
    )
    adopted = (
        p
        | "Adopted" >> beam.Create(plan.adopted)
        | "AdoptedPartRecords" >> beam.Map(adopted_part, args.output_dir)
    )
    if args.attention_dir:
        _ = (
            captioned
            | "FirstForPlots"
            >> beam.combiners.Top.Of(args.attention_plots, key=lambda e: e[0].key.key, reverse=True)
            | "EachPlot" >> beam.FlatMap(lambda xs: xs)
            | "PlotAttention" >> beam.Map(plot_one, args.attention_dir)
        )
    _ = (
        p
        | "RecordTrigger" >> beam.Create([None])
        | "WriteRunRecord"
        >> beam.Map(
            write_run_record,
            args.output_dir,
            plan.attempt,
            parts=beam.pvalue.AsList(parts),
            rewritten=beam.pvalue.AsList(rewritten),
            adopted=beam.pvalue.AsList(adopted),
            inputs=beam.pvalue.AsSingleton(
                new_inputs | "CountInputs" >> beam.combiners.Count.Globally()
            ),
            looping=beam.pvalue.AsSingleton(looping_sums(rows)),
            distinct=beam.pvalue.AsSingleton(
                rows
                | "Captions" >> beam.Map(lambda r: r["caption"])
                | "DistinctCaptions" >> beam.Distinct()
                | "CountDistinct" >> beam.combiners.Count.Globally()
            ),
        )
    )


def compact_if_needed(output_dir: str, above: int) -> None:
    """Past `above` small files (a part per bundle and per --checkpoint_seconds adds up
    over daily runs), the table is compacted in a commit of its own."""
    from beam_jobs import caption_table

    table = caption_table.open_table(output_dir)
    if above and table is not None and caption_table.small_files(table) > above:
        metrics = caption_table.compact(output_dir)
        print(
            f"caption_images: compacted {metrics.get('numFilesRemoved', 0)} small files into "
            f"{metrics.get('numFilesAdded', 0)}"
        )


def run_job(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    """Checks the export and inputs, runs the pipeline, commits its files to the table
    in one transaction; returns a summary dict."""
    try:
        return _run_job(args, beam_args)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise UsageError(disk_full_message(args.output_dir)) from None


def _run_job(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    manifest = check_export(args.model)
    for spec in args.input:
        where = absolute(spec)
        for own in own_outputs(args):
            if (where.rstrip("/") + "/").startswith(own.rstrip("/") + "/"):
                raise UsageError(
                    f"--input {spec} is in this job's own output folder {own}, whose files "
                    "are never inputs; caption another folder"
                )
        if not match_input(spec):
            raise UsageError(f"--input matches nothing: {spec}")
    keep = keep_list(args.keep_columns, formats.CAPTION_TABLE_SCHEMA.names)
    specs = describe_tables(args.input_table, args.uri_column, args.key_column, keep)
    if args.attention_dir and not FileSystems.exists(args.attention_dir):
        FileSystems.mkdirs(args.attention_dir)  # a no-op on object stores
    options = pipeline_options(beam_args)
    plan = plan_run(args, manifest, specs, keep)
    print(
        f"caption_images: {len(args.input) + len(specs)} input(s) -> {args.output_dir} "
        f"(model {manifest['model_id']}, batch {args.batch_size}, "
        f"{'replacing the table' if plan.replace else 'adding to the table'})",
        flush=True,
    )
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
        return dry
    body = {
        "model": args.model,
        "inputs": list(args.input),
        "input_tables": [t.pattern for t in specs],
        "decoding": {"max_length": manifest["decoding"]["max_length"], **decoding_settings(args)},
        **row_settings(args, manifest),
        "run_id": plan.run_id,
    }
    committed = commit_run(args.output_dir, plan, body)  # the table changes only now
    compact_if_needed(args.output_dir, args.compact_above)
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
        "version": committed["version"],
        "counts": committed["counts"],
    }
    print(
        f"caption_images: done: {summary['captioned']} captioned, {summary['failed']} failed"
        f"{describe_errors(summary['errors'])} ({summary['matched']} matched, "
        f"{summary['bytes_read'] / 1e6:.1f} MB) in "
        f"{summary['seconds']}s ({summary['images_per_second']} images/s); "
        f"table version {summary['version']}",
        flush=True,
    )
    looping = committed.get("looping", {})
    empty, images = looping.get("empty_captions", 0), looping.get("images", 0)
    if warning := empty_captions_warning(empty, images):
        print(f"caption_images: {warning}", file=sys.stderr, flush=True)
    return summary
