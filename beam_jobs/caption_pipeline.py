"""The graph of `python -m beam_jobs.caption_images` (see that module for
the command): inputs are matched and expanded, deduplicated by uri, read and
decoded ahead of the model, captioned in batches by RunInference, and written
as Parquet tables with a manifest.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_jobs.caption_run import (
    RunPlan,
    check_export,
    commit_run,
    discard_run,
    disk_full_message,
    is_disk_full,
    plan_run,
    write_staged_manifest,
)
from beam_jobs.caption_steps import (
    NAMESPACE,
    CountErrorsFn,
    KeyInputsFn,
    NewInputsFn,
    ToRowFn,
    batch_errors,
    done_key,
    matched_inputs,
    own_outputs,
    plot_one,
    to_loaded,
)
from beam_jobs.inference import CaptionerHandler
from beam_jobs.lease import Lease, output_lease
from beam_jobs.parts import (
    WritePartsFn,
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
from beam_jobs.sources import (
    match_input,
)
from model.cli import UsageError, decoding_settings
from model.io import formats


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
            write_staged_manifest,
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


def run_job(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    """Checks the export and inputs, runs the pipeline, returns a summary dict. Holds the
    lease on --output_dir (`beam_jobs.lease`) from start to commit: a second run on it
    refuses in one line."""
    try:
        with output_lease(args.output_dir, "caption_images") as lease:
            return _run_job(args, beam_args, lease)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise UsageError(disk_full_message(args.output_dir)) from None


def _run_job(args: argparse.Namespace, beam_args: Sequence[str], lease: Lease) -> dict[str, Any]:
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
        discard_run(plan)
        return dry
    lease.confirm()  # still this run's output: no other run has taken it over
    commit_run(args.output_dir, plan)  # only now are the previous tables replaced or added to
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
