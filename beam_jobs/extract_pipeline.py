"""The pipeline behind `python -m beam_jobs.extract_features` (see that module for
the command): annotations are parsed, images read and decoded ahead of the
model, embedded in batches by RunInference (InceptionV3 `mixed10`), and
written as gzipped TFRecord shards with a vocabulary and a manifest.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from beam_jobs.annotations import ImageRecord, parse_file
from beam_jobs.features_output import (
    check_existing_manifest,
    commit_features_manifest,
    features_manifest_body,
    prepare_vocab,
    remove_beam_temp,
    write_vocab,
)
from beam_jobs.inference import FeatureExtractorHandler
from beam_jobs.lease import output_lease
from beam_jobs.preprocessing import ERRORS_TAG, Loaded, Meta, PreprocessFn
from beam_jobs.progress import ProgressReporter, TallyFn, describe_errors, errors_by_type
from beam_jobs.runner import (
    LOG,
    counter_values,
    dry_run_result,
    pipeline_options,
    run_pipeline,
    runs_remotely,
)
from beam_jobs.sources import path_exists
from beam_jobs.tfrecord_sink import WriteGzipTFRecords
from model.cli import UsageError
from model.defaults import IMAGES_PER_SHARD, NAMED_WEIGHTS, named_weights_path
from model.images.extractor import (
    check_weights,
    fetch_keras_imagenet,
    weights_hash,
    weights_variant,
)
from model.images.runtimes import check_runtime
from model.io import formats
from model.text.vocab import count_words

NAMESPACE = "extract_features"


def stage_weights(weights: str, options: PipelineOptions) -> str:
    """The --weights value the workers use. Named weights live in this machine's cache:
    for workers on other machines (Dataflow) they are copied once under
    --temp_location, named by their content hash."""
    if weights not in NAMED_WEIGHTS or not runs_remotely(options):
        return weights
    temp = options.view_as(GoogleCloudOptions).temp_location
    if not temp:
        raise UsageError(
            f"--weights {weights} on a distributed runner needs --temp_location, "
            "where the converted file is staged for the workers"
        )
    local = named_weights_path(weights)
    digest = (weights_hash(weights) or "").removeprefix("sha256:")[:16]
    target = f"{temp.rstrip('/')}/show-attend-tell/{digest}-{os.path.basename(local)}"
    if not FileSystems.exists(target):
        print(f"extract_features: staging {local} at {target} for the workers", flush=True)
        with open(local, "rb") as src, FileSystems.create(target) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    return target


def image_path(images_dir: str, file_name: str) -> str:
    return f"{images_dir.rstrip('/')}/{file_name}"


class ToExampleFn(TallyFn):
    """(Meta, float16 features) -> (split, serialized Example, caption count)."""

    def __init__(self, progress_dir: str | None = None):
        super().__init__(NAMESPACE, progress_dir)

    def process(self, element: tuple[Meta, Any]) -> Iterator[tuple[str, bytes, int]]:
        meta, features = element
        record: ImageRecord = meta.key
        self.tally.inc("images_embedded")
        yield (
            record.split,
            formats.make_example(
                record.image_id,
                record.file_name,
                features,
                record.captions,
                meta.width,
                meta.height,
            ),
            len(record.captions),
        )


class WordCountFn(beam.CombineFn):
    """Word frequencies of captions, merged associatively across workers."""

    def create_accumulator(self) -> collections.Counter:
        return collections.Counter()

    def add_input(self, acc: collections.Counter, caption: str) -> collections.Counter:
        acc.update(count_words([caption]))
        return acc

    def merge_accumulators(self, accs: Iterable[collections.Counter]) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for acc in accs:
            total.update(acc)
        return total

    def extract_output(self, acc: collections.Counter) -> dict[str, int]:
        return dict(acc)


def sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    a = b = 0
    for x, y in pairs:
        a, b = a + x, b + y
    return a, b


def embed_images(
    records: beam.PCollection, args: argparse.Namespace, progress_dir: str | None
) -> tuple[beam.PCollection, beam.PCollection]:
    """Image records -> (examples (split, serialized Example, captions), errors (split,
    error row)): each image read and decoded ahead of the model, then InceptionV3."""
    images_dir = args.images_dir
    decoded = (
        records
        | "ImagePaths" >> beam.Map(lambda r: Loaded(r, image_path(images_dir, r.file_name)))
        | "ReadAndPreprocess"
        >> beam.ParDo(PreprocessFn.from_flags(NAMESPACE, args, progress_dir)).with_outputs(
            ERRORS_TAG, main="pixels"
        )
    )
    handler = FeatureExtractorHandler(
        args.worker_weights,
        args.precision,
        args.batch_size,
        args.model_copies,
        NAMESPACE,
        large_model=args.large_model,
        variant=weights_variant(args.weights),
        runtime=args.runtime,
        calibration=args.calibration,
    )
    examples = (
        decoded.pixels
        | "InceptionV3" >> RunInference(KeyedModelHandler(handler))
        | "ToExamples" >> beam.ParDo(ToExampleFn(progress_dir))
    )
    errors = decoded[ERRORS_TAG] | "ErrorSplit" >> beam.Map(lambda kv: (kv[0].split, kv[1]))
    return examples, errors


def build_vocab(records: beam.PCollection, args: argparse.Namespace) -> Any:
    """Counts the train captions' words and writes the run's vocabulary; its size, as a
    side input."""
    size = (
        records
        | "TrainOnly" >> beam.Filter(lambda r: r.split == "train")
        | "TrainCaptions" >> beam.FlatMap(lambda r: r.captions)
        | "CountWords" >> beam.CombineGlobally(WordCountFn())
        | "WriteVocab"
        >> beam.Map(
            write_vocab,
            f"{args.output_dir.rstrip('/')}/{formats.vocab_file(args.run_id)}",
            args.vocab_size,
        )
    )
    return beam.pvalue.AsSingleton(size)


def write_split(
    examples: beam.PCollection, errors: beam.PCollection, split: str, args: argparse.Namespace
) -> list[beam.PCollection]:
    """One split's shards and errors table; the paths written."""
    shards = (
        examples
        | f"Select[{split}]" >> beam.Filter(lambda e, s=split: e[0] == s)
        | f"Serialized[{split}]" >> beam.Map(lambda e: e[1])
        | f"WriteShards[{split}]"
        >> WriteGzipTFRecords(
            formats.shard_prefix(args.output_dir, f"{split}-{args.run_id}"),
            file_name_suffix=formats.SHARD_SUFFIX,
            num_shards=args.num_shards,
            max_records_per_shard=None if args.num_shards else IMAGES_PER_SHARD,
        )
    )
    error_table = (
        errors
        | f"SelectErrors[{split}]" >> beam.Filter(lambda e, s=split: e[0] == s)
        | f"ErrorRows[{split}]" >> beam.Map(lambda e: e[1])
        | f"WriteErrors[{split}]"
        >> beam.io.WriteToParquet(
            f"{args.output_dir.rstrip('/')}/errors-{split}-{args.run_id}",
            formats.ERRORS_SCHEMA,
            codec=formats.PARQUET_CODEC,
            file_name_suffix=".parquet",
            num_shards=1,
        )
    )
    return [shards, error_table]


def build_pipeline(
    p: beam.Pipeline,
    args: argparse.Namespace,
    splits: Sequence[str],
    orphans: dict[str, int],
    vocab_info: dict[str, Any],
    progress_dir: str | None = None,
    dropped: dict[str, int] | None = None,
) -> None:
    """The job: annotations -> image records -> features and errors per split, the
    vocabulary (when train is among the splits), then the manifest once all is final."""
    source = args.karpathy_json or args.captions_json
    records = (
        p
        | "AnnotationFile" >> beam.Create([source])
        | "ParseAnnotations"
        >> beam.FlatMap(lambda path: parse_file(path, bool(args.karpathy_json), args.split).records)
        | "SpreadRecords" >> beam.Reshuffle()
    )
    examples, errors = embed_images(records, args, progress_dir)
    # The vocabulary size is a side input when this run builds it, a constant otherwise.
    size = build_vocab(records, args) if "train" in splits else vocab_info["size"]
    written = [pc for split in splits for pc in write_split(examples, errors, split, args)]
    split_stats = (
        examples
        | "PerSplit" >> beam.Map(lambda e: (e[0], (1, e[2])))
        | "CountPerSplit" >> beam.CombinePerKey(sum_pairs)
    )
    error_stats = errors | "ErrorsPerSplit" >> beam.combiners.Count.PerKey()
    vocab_static = {k: v for k, v in vocab_info.items() if k != "size"}
    body = features_manifest_body(args)  # here: it hashes the launcher's weights file
    _ = (
        p
        | "ManifestTrigger" >> beam.Create([None])
        | "WriteManifest"
        >> beam.Map(
            lambda _, split_stats, error_stats, shards, size: commit_features_manifest(
                args.output_dir,
                body,
                split_stats,
                error_stats,
                shards,
                {**vocab_static, "size": size},
                splits,
                orphans,
                args.images_dir,
                dropped,
            ),
            split_stats=beam.pvalue.AsDict(split_stats),
            error_stats=beam.pvalue.AsDict(error_stats),
            shards=beam.pvalue.AsList(written | "AllWritten" >> beam.Flatten()),
            size=size,
        )
    )


def take_existing_settings(args: argparse.Namespace) -> None:
    """--weights, --precision and --runtime left out: FEATURES_DIR's own when it has a
    manifest (a split added to it must match them), else imagenet, float32, tensorflow."""
    if None not in (args.weights, args.precision, args.runtime):
        return
    path = formats.features_manifest_path(args.output_dir)
    existing = formats.read_manifest(path, formats.KIND_FEATURES) if path_exists(path) else None
    taken = []
    defaults = (("weights", "imagenet"), ("precision", "float32"), ("runtime", "tensorflow"))
    for flag, default in defaults:
        if getattr(args, flag) is None:
            value = existing.get(flag) if existing else None
            setattr(args, flag, value or default)
            taken += [f"--{flag} {getattr(args, flag)}"] if value else []
    if args.precision == "int8" and not args.calibration and existing:
        args.calibration = existing.get("calibration_uri")
        taken += [f"--calibration {args.calibration}"] if args.calibration else []
    if taken:
        said = ", ".join(taken[:-1]) + (" and " if len(taken) > 1 else "") + taken[-1]
        print(f"extract_features: {said} from {path}", flush=True)


def run_job(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    """Checks the inputs, runs the pipeline; returns a summary dict (counts, seconds,
    images/s). Holds the lease on --output_dir (`beam_jobs.lease`) while it runs: a
    second run on it refuses in one line."""
    with output_lease(args.output_dir, "extract_features"):
        return _run_job(args, beam_args)


def _run_job(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    take_existing_settings(args)
    check_runtime(args.runtime, args.precision, args.calibration)
    args.weights = check_weights(args.weights)
    if args.weights == "imagenet":
        fetch_keras_imagenet()  # here, not on a worker: offline is one line at start
    if not path_exists(args.images_dir):
        raise UsageError(f"--images_dir does not exist: {args.images_dir}")
    source = args.karpathy_json or args.captions_json
    parsed = parse_file(source, bool(args.karpathy_json), args.split)
    per_split = collections.Counter(r.split for r in parsed.records)
    splits = sorted(per_split) if args.karpathy_json else [args.split]
    if not parsed.records:
        raise UsageError(f"{source}: no images listed")
    existing = check_existing_manifest(args.output_dir, features_manifest_body(args))
    if not FileSystems.exists(args.output_dir):
        FileSystems.mkdirs(args.output_dir)
    # Every file this run writes carries its id: nothing a manifest names is overwritten.
    args.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    remove_beam_temp(args.output_dir)  # a killed run's (the lease says none is running)
    vocab_info = prepare_vocab(args, splits, existing)
    orphans = {splits[0]: parsed.orphan_annotations} if parsed.orphan_annotations else {}
    if parsed.orphan_annotations:
        LOG.warning("%s: %d captions name unknown image ids", source, parsed.orphan_annotations)
    if n_dropped := sum(parsed.dropped_captions.values()):
        LOG.warning(
            "%s: %d captions have no word (empty, punctuation only or not text); "
            "not used (manifest: dropped_captions)",
            source,
            n_dropped,
        )
    print(
        f"extract_features: {len(parsed.records)} images in "
        f"{', '.join(f'{s}={per_split[s]}' for s in splits)}"
        f" -> {args.output_dir} (weights={args.weights}, batch={args.batch_size})",
        flush=True,
    )
    options = pipeline_options(beam_args)
    args.worker_weights = stage_weights(args.weights, options)
    reporter = ProgressReporter(
        "extract_features",
        NAMESPACE,
        done_keys=["images_embedded"],
        interval=args.progress_seconds,
        total=len(parsed.records),
    )
    result, seconds = run_pipeline(
        options,
        lambda p, progress: build_pipeline(
            p, args, splits, orphans, vocab_info, progress, parsed.dropped_captions
        ),
        reporter,
        bool(args.verbose),
    )
    if (dry := dry_run_result(result, options, "extract_features")) is not None:
        return dry
    counts = counter_values(result, NAMESPACE)
    images = len(parsed.records)
    summary = {
        "images": images,
        "embedded": counts.get("images_embedded", 0),
        "failed": counts.get("images_failed", 0),
        "errors": errors_by_type(counts),
        "bytes_read": counts.get("bytes_read", 0),
        "seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 2) if seconds else 0.0,
        "output_dir": args.output_dir,
    }
    print(
        f"extract_features: done: {summary['embedded']} embedded, {summary['failed']} failed"
        f"{describe_errors(summary['errors'])} of {images} images in {summary['seconds']}s "
        f"({summary['images_per_second']} images/s)",
        flush=True,
    )
    return summary
