"""Stage 3: bulk-captions image folders, globs and archives into Parquet tables.

    python -m beam_jobs.caption_images --model MODEL_DIR/export \
        --input PATH_OR_GLOB_OR_ARCHIVE [--input ...] --output_dir CAPTIONS_DIR [Beam flags]

Writes CAPTIONS_DIR/captions-*.parquet (one row per captioned image),
errors-*.parquet (one row per input that could not be captioned) and
manifest.json. Every matched input appears exactly once across the two tables.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_jobs.common import (
    ERRORS_TAG,
    Loaded,
    Meta,
    PreprocessFn,
    Timer,
    UsageError,
    add_common_flags,
    counter_values,
    dry_run_result,
    error_row,
    exit_on_usage_error,
    pipeline_options,
)
from beam_jobs.inference import CaptionerHandler, CaptionResult
from beam_jobs.sources import Item, display_name, match_input, read_path, read_uri
from model import formats
from model.extractor import PRECISIONS

NAMESPACE = "caption_images"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MODEL_DIR/export written by model.train")
    p.add_argument(
        "--input", action="append", required=True, help="folder, glob or .tar/.tar.gz/.zip (repeat)"
    )
    p.add_argument("--output_dir", required=True, help="CAPTIONS_DIR, local or gs://")
    p.add_argument("--skip_existing", action="store_true", help="skip uris already in the output")
    p.add_argument(
        "--precision", choices=PRECISIONS, help="extractor compute (default: as trained)"
    )
    p.add_argument(
        "--num_shards",
        type=int,
        default=0,
        help="exact captions files; 0 (default) streams one file per worker bundle",
    )
    p.add_argument("--model_copies", type=int, help="share N model copies across worker processes")
    p.add_argument("--large_model", action="store_true", help="one model shared per machine (GPU)")
    p.add_argument("--attention_dir", help="write attention plots here")
    p.add_argument("--attention_plots", type=int, default=8, help="how many (smallest uris)")
    add_common_flags(p)
    return p.parse_known_args(argv)


def check_export(export_dir: str) -> dict[str, Any]:
    """Fails at start, in one line, on a missing or incompatible export."""
    paths = formats.export_paths(export_dir)
    manifest = formats.read_manifest(paths["manifest"], formats.KIND_EXPORT)
    formats.check_backbone(manifest["features"], paths["manifest"])
    for key in ("model", "vocab"):
        if not FileSystems.exists(paths[key]):
            raise formats.FormatError(f"{paths[key]}: missing from the export")
    return manifest


def existing_outputs(output_dir: str) -> list[str]:
    found = []
    for table in ("captions", "errors"):
        pattern = f"{output_dir.rstrip('/')}/{table}-*.parquet"
        found += [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
    return sorted(found)


class ExpandInputsFn(beam.DoFn):
    """A matched path -> (uri, Item): the file itself unread, or each archive member's bytes."""

    def setup(self) -> None:
        self.matched = Metrics.counter(NAMESPACE, "inputs_matched")

    def process(self, path: str) -> Iterator[tuple[str, Item]]:
        for item in read_path(path, defer_files=True):
            self.matched.inc()
            yield item.uri, item


def first_new(element: tuple[str, dict[str, list]]) -> Iterator[Item]:
    """After grouping by uri: the one Item of each uri not already in the output."""
    uri, groups = element
    items, done = groups["input"], groups.get("done", [])
    if items and not done:
        yield items[0]  # the same file matched twice (overlapping --input) is captioned once


def to_loaded(item: Item) -> Iterator[Any]:
    """An Item -> Loaded for PreprocessFn (plain files are read there), or its error row."""
    if item.error_type is not None:
        row = error_row(item.uri, item.error_type, item.message)
        yield beam.pvalue.TaggedOutput(ERRORS_TAG, (item.uri, row))
        return
    yield Loaded(item.uri, item.uri, item.data)


class ToRowFn(beam.DoFn):
    def __init__(self, model_id: str):
        self.model_id = model_id

    def setup(self) -> None:
        self.captioned = Metrics.counter(NAMESPACE, "images_captioned")

    def process(self, element: tuple[Meta, CaptionResult]) -> Iterator[dict[str, Any]]:
        meta, result = element
        self.captioned.inc()
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
    from model.plot import plot_attention
    from model.preprocess import decode_image

    meta, result = element
    uri = meta.key
    image, _ = decode_image(read_uri(uri))
    image.thumbnail((320, 320))
    words = result.caption.split() + ([] if result.hit_max_length else ["<end>"])
    name = hashlib.sha1(uri.encode()).hexdigest()[:10] + "_" + display_name(uri)
    path = os.path.join(attention_dir, os.path.splitext(name)[0] + ".png")
    return plot_attention(image, words or ["<end>"], result.attention, path, title=result.caption)


def write_manifest(
    _: None, output_dir: str, body: dict[str, Any], captioned: int, failed: int, files: list[str]
) -> str:
    path = f"{output_dir.rstrip('/')}/{formats.MANIFEST_FILE}"
    formats.write_manifest(
        path,
        formats.KIND_CAPTIONS,
        {
            **body,
            "counts": {"captioned": captioned, "failed": failed, "inputs": captioned + failed},
            "files": sorted(os.path.basename(f) for f in files),
        },
    )
    return path


def build_pipeline(
    p: beam.Pipeline, args: argparse.Namespace, manifest: dict[str, Any], run_id: str
) -> None:
    model_id = manifest["model_id"]
    precision = args.precision or manifest["features"].get("precision", "float32")
    out = args.output_dir.rstrip("/")
    keyed = (
        p
        | "Inputs" >> beam.Create(args.input)
        | "MatchInputs" >> beam.FlatMap(match_input)
        | "SpreadPaths" >> beam.Reshuffle()
        | "ExpandInputs" >> beam.ParDo(ExpandInputsFn())
    )
    groups: dict[str, Any] = {"input": keyed}
    if args.skip_existing:
        groups["done"] = (
            p
            | "ExistingUris" >> beam.io.ReadFromParquet(f"{out}/*-*.parquet", columns=["uri"])
            | "KeyExisting" >> beam.Map(lambda r: (r["uri"], True))
        )
    # Grouping by uri dedupes overlapping inputs, skips finished ones, and
    # spreads the members of a few big archives over all workers. Plain files
    # are read after it, so their bytes stream rather than being grouped.
    fresh = (
        groups
        | "GroupByUri" >> beam.CoGroupByKey()
        | "NewInputs" >> beam.FlatMap(first_new)
        | "ToLoad" >> beam.FlatMap(to_loaded).with_outputs(ERRORS_TAG, main="loaded")
    )
    decoded = fresh.loaded | "ReadAndPreprocess" >> beam.ParDo(
        PreprocessFn(NAMESPACE, args.max_pixels, args.decode_threads, 2 * args.batch_size)
    ).with_outputs(ERRORS_TAG, main="pixels")
    handler = CaptionerHandler(
        args.model, precision, args.batch_size, args.model_copies, args.large_model
    )
    captioned = decoded.pixels | "Caption" >> RunInference(KeyedModelHandler(handler))
    rows = captioned | "ToRows" >> beam.ParDo(ToRowFn(model_id))
    errors = (
        (fresh[ERRORS_TAG], decoded[ERRORS_TAG])
        | "AllErrors" >> beam.Flatten()
        | "ErrorRows" >> beam.Map(lambda kv: kv[1])
    )
    failed = Metrics.counter(NAMESPACE, "errors_written")

    def count_failed(row: dict[str, str]) -> dict[str, str]:
        failed.inc()
        return row

    errors = errors | "CountFailed" >> beam.Map(count_failed)
    prefix = f"-{run_id}" if args.skip_existing else ""
    written_rows = rows | "WriteCaptions" >> beam.io.WriteToParquet(
        f"{out}/captions{prefix}",
        formats.CAPTIONS_SCHEMA,
        codec=formats.PARQUET_CODEC,
        file_name_suffix=".parquet",
        num_shards=args.num_shards,
    )
    written_errors = errors | "WriteErrors" >> beam.io.WriteToParquet(
        f"{out}/errors{prefix}",
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
        "skip_existing": bool(args.skip_existing),
        "run_id": run_id,
    }
    _ = (
        p
        | "ManifestTrigger" >> beam.Create([None])
        | "WriteManifest"
        >> beam.Map(
            write_manifest,
            out,
            body,
            captioned=beam.pvalue.AsSingleton(
                rows | "CountRows" >> beam.combiners.Count.Globally()
            ),
            failed=beam.pvalue.AsSingleton(
                errors | "CountErrors" >> beam.combiners.Count.Globally()
            ),
            files=beam.pvalue.AsList((written_rows, written_errors) | "Written" >> beam.Flatten()),
        )
    )


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, beam_args = parse_args(argv)
    manifest = check_export(args.model)
    for spec in args.input:
        if not match_input(spec):
            raise UsageError(f"--input matches nothing: {spec}")
    if args.attention_dir:
        os.makedirs(args.attention_dir, exist_ok=True)
    existing = existing_outputs(args.output_dir)
    if existing and not args.skip_existing:
        # Same command, same rows: replace the previous run's tables rather than adding to them.
        print(
            f"caption_images: replacing {len(existing)} files of a previous run "
            f"in {args.output_dir}"
        )
        FileSystems.delete(existing)
    if args.skip_existing and not existing:
        args.skip_existing = False  # nothing to skip; plain file names
    run_id = time.strftime("%Y%m%dT%H%M%S")
    print(
        f"caption_images: {len(args.input)} input(s) -> {args.output_dir} "
        f"(model {manifest['model_id']}, batch {args.batch_size})",
        flush=True,
    )
    options = pipeline_options(beam_args)
    with Timer() as timer:
        p = beam.Pipeline(options=options)
        build_pipeline(p, args, manifest, run_id)
        result = p.run()
        result.wait_until_finish()
    if (dry := dry_run_result(result, options, "caption_images")) is not None:
        return dry
    c = counter_values(result, NAMESPACE)
    done = c.get("images_captioned", 0) + c.get("errors_written", 0)
    summary = {
        "matched": c.get("inputs_matched", 0),
        "captioned": c.get("images_captioned", 0),
        "failed": c.get("errors_written", 0),
        "bytes_read": c.get("bytes_read", 0),
        "seconds": round(timer.seconds, 2),
        "images_per_second": round(done / timer.seconds, 2) if timer.seconds else 0.0,
    }
    print(
        f"caption_images: done: {summary['captioned']} captioned, {summary['failed']} failed "
        f"({summary['matched']} matched, {summary['bytes_read'] / 1e6:.1f} MB) in "
        f"{summary['seconds']}s ({summary['images_per_second']} images/s)",
        flush=True,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    exit_on_usage_error(run, argv)


if __name__ == "__main__":
    main()
