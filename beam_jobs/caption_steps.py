"""The steps of the caption job's graph, one job each: match and key the inputs, skip
the finished ones, read archives, turn failures into error rows, build table rows,
plot attention. `beam_jobs.caption_pipeline` wires them together.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_jobs.inference import CaptionResult
from beam_jobs.paths import absolute
from beam_jobs.preprocessing import ERRORS_TAG, Loaded, Meta, error_row
from beam_jobs.progress import (
    ERROR_PREFIX,
    TallyFn,
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
from model.defaults import MAX_BYTES

NAMESPACE = "caption_images"


class KeyInputsFn(TallyFn):
    """A matched path keyed for grouping: a plain file by its uri, an archive by its path.
    An archive's members are read after the grouping, so their bytes never wait in a
    shuffle (which local runners hold in memory). Plain files are counted as matched
    here, before any is read, so progress lines show their total from the start; an
    archive's members are counted as it is read."""

    def __init__(self, progress_dir: str | None = None):
        super().__init__(NAMESPACE, progress_dir)

    def process(self, path: str | Item) -> Iterator[tuple[str, Item]]:
        item = path if isinstance(path, Item) else Item(path)
        if item.error_type is not None or not is_archive_name(item.uri):
            self.tally.inc("inputs_matched")
        yield item.uri, item


def done_key(uri: str) -> tuple[str, str | None]:
    """A uri already in the output, keyed like the input it came from: an archive member
    under its archive (with its member name), anything else under itself (with None)."""
    if MEMBER_SEPARATOR in uri:
        archive, member = uri.split(MEMBER_SEPARATOR, 1)
        if is_archive_name(archive):  # else a path that holds "!/": its own error row
            return archive, member
    return uri, None


SUPERSEDED_TAG = "superseded"


class NewInputsFn(TallyFn):
    """After grouping by uri (archives by path): each input not already in the output,
    once. A plain file comes out unread; an archive is read here, and each member not in
    the output and not seen before in it comes out with its bytes, or as its error row.

    The "retried" group holds (table file, uri) of the input's transient error rows
    (`formats.TRANSIENT_ERRORS`), which are not in "done": the input is tried again, so
    each such row goes out on SUPERSEDED_TAG, to be dropped from its file in this run's
    commit, once the input has a new row: made now, or in a file adopted from a killed
    attempt of this run (in "done")."""

    def __init__(self, progress_dir: str | None = None, max_bytes: int = MAX_BYTES):
        super().__init__(NAMESPACE, progress_dir)
        self.max_bytes = max_bytes

    def process(self, element: tuple[str, dict[str, list]]) -> Iterator[Any]:
        key, groups = element
        items, done = groups["input"], groups.get("done", [])
        retried = {uri: file for file, uri in groups.get("retried", [])}
        if not items:
            return  # not an input (this run's): its rows stay as they are
        if items[0].error_type is not None or not is_archive_name(key):
            yield from superseded(retried, retried)
            if None not in done:  # else it has its row
                yield items[0]  # the same file matched twice (overlapping --input): once
            return
        if None in done:  # the archive has its row: nothing under it is read again
            return
        yield from superseded(retried, [key])  # an archive-level failure, read again now
        skip = set(done)
        for item in read_path(key, max_bytes=self.max_bytes):
            if MEMBER_SEPARATOR in item.uri:
                member = item.uri.split(MEMBER_SEPARATOR, 1)[1]
                yield from superseded(retried, [item.uri])
                if member in skip:
                    continue  # finished before, or a second member of that name
                skip.add(member)
            if (printable := printable_uri(item.uri)) is not None:
                item = bad_file_name(printable)
            self.tally.inc("inputs_matched")
            yield item


def superseded(retried: dict[str, str], uris: Iterable[str]) -> Iterator[Any]:
    """The transient rows of `uris` (taken out of `retried`), on SUPERSEDED_TAG."""
    for uri in list(uris):
        if uri in retried:
            yield beam.pvalue.TaggedOutput(SUPERSEDED_TAG, (retried.pop(uri), uri))


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
    return [absolute(f) for f in folders]


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


class CountErrorsFn(TallyFn):
    """Counts error rows by error_type (the `error.<type>` counters) and passes them on."""

    def __init__(self, progress_dir: str | None = None):
        super().__init__(NAMESPACE, progress_dir)

    def process(self, element: tuple[str, dict[str, str]]) -> Iterator[tuple[str, dict[str, str]]]:
        self.tally.inc(ERROR_PREFIX + element[1]["error_type"])
        yield element


class ToRowFn(TallyFn):
    """A caption -> its table row (`formats.CAPTION_TABLE_SCHEMA`), with the run's settings."""

    def __init__(self, settings: dict[str, Any], progress_dir: str | None = None):
        self.settings = settings
        super().__init__(NAMESPACE, progress_dir)

    def process(self, element: tuple[Meta, CaptionResult]) -> Iterator[dict[str, Any]]:
        from model.text.ngrams import LOOP_NGRAM, has_repeated_ngram

        meta, result = element
        self.tally.inc("images_captioned")
        yield table_row(
            meta.key,
            self.settings,
            caption=result.caption,
            token_ids=result.token_ids,
            log_prob=result.log_prob,
            length=len(result.token_ids),
            hit_max_length=result.hit_max_length,
            repeated_trigram=has_repeated_ngram(result.caption.split(), LOOP_NGRAM),
            width=meta.width,
            height=meta.height,
            sha256=meta.sha256,
        )


def table_row(uri: str, settings: dict[str, Any], **values: Any) -> dict[str, Any]:
    """A row of the caption table: `uri` (also its key), the run's settings, `values`;
    every other column null."""
    return {"uri": uri, "key": uri, **settings, **values}


def error_table_row(error: dict[str, str], settings: dict[str, Any]) -> dict[str, Any]:
    """An error row (`preprocessing.error_row`) as a row of the caption table."""
    return table_row(
        error["uri"], settings, error_type=error["error_type"], message=error["message"]
    )


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
