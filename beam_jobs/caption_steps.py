"""The steps of the caption job's graph, one job each: match and key the inputs, skip
the finished ones, read archives, turn failures into error rows, build table rows,
plot attention. `beam_jobs.caption_pipeline` wires them together.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

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
    archive_of,
    display_name,
    is_archive_name,
    match_input,
    printable_uri,
    read_path,
    read_uri,
)
from model.defaults import MAX_BYTES
from model.images.fetch import FetchSettings, fetcher_for

NAMESPACE = "caption_images"


class Origin(NamedTuple):
    """Where a row comes from, carried beside the pixels to the table row: its uri, its
    key (the uri, or a table's key column) and a table's kept values."""

    uri: str
    key: str
    kept: tuple[tuple[str, Any], ...] = ()


def origin(item: Item) -> Origin:
    return Origin(item.uri, item.identity, item.kept)


class KeyInputsFn(TallyFn):
    """An input keyed for grouping (`done_key` of its identity): a plain file by its uri,
    an archive by its path, a table row by its key. An archive's members are read after
    the grouping, so their bytes never wait in a shuffle (which local runners hold in
    memory). Other inputs are counted as matched here, before any is read, so progress
    lines show their total from the start; an archive's members are counted as it is
    read."""

    def __init__(self, progress_dir: str | None = None):
        super().__init__(NAMESPACE, progress_dir)

    def process(self, path: str | Item) -> Iterator[tuple[str, Item]]:
        item = path if isinstance(path, Item) else Item(path)
        if item.key is not None or item.error_type is not None or not is_archive_name(item.uri):
            self.tally.inc("inputs_matched")
        yield done_key(item.identity)[0], item


def done_key(identity: str) -> tuple[str, str | None]:
    """A row's identity (its key), keyed like the input it came from: an archive member
    under its archive (with its member name), anything else under itself (with None)."""
    if MEMBER_SEPARATOR in identity:
        archive, member = identity.split(MEMBER_SEPARATOR, 1)
        if is_archive_name(archive):  # else a path that holds "!/": its own error row
            return archive, member
    return identity, None


SUPERSEDED_TAG = "superseded"
DUPLICATE_KEY = "duplicate_key"


class NewInputsFn(TallyFn):
    """After grouping by key (archives by path): each input not already in the output,
    once. A plain file or a table row comes out unread; an archive is read here, and each
    member not in the output comes out with its bytes, or as its error row.

    Inputs that claim one key (a table's repeated key, a table row naming a file an
    --input also matched) make one row: the first claim (a matched file, else the table
    rows in a fixed order) is the input, the others `duplicate_key` error rows. "done"
    holds (member or None, key, whether a duplicate_key row) of the rows the table already
    has (`done_entries`), so a rerun adds only what is missing: the input if it has no
    row, and as many duplicate rows as the table lacks.

    The "retried" group holds (table file, key) of the key's transient error rows
    (`formats.TRANSIENT_ERRORS`), which are not in "done": the input is tried again, so
    each such row goes out on SUPERSEDED_TAG, to be dropped from its file in this run's
    commit, once the input has a new row: made now, or in a file adopted from a killed
    attempt of this run (in "done")."""

    def __init__(
        self,
        progress_dir: str | None = None,
        max_bytes: int = MAX_BYTES,
        keep: Sequence[tuple[str, str]] = (),
    ):
        super().__init__(NAMESPACE, progress_dir)
        self.max_bytes = max_bytes
        self.keep = tuple(keep)

    def process(self, element: tuple[str, dict[str, list]]) -> Iterator[Any]:
        group, groups = element
        inputs = groups["input"]  # none: not an input of this run; its rows stay as they are
        done = Done(groups.get("done", []), {k: f for f, k in groups.get("retried", [])})
        rows: dict[str | None, list[Item]] = collections.defaultdict(list)
        for row in sorted((i for i in inputs if i.key is not None), key=claim_order):
            rows[done_key(row.key)[1]].append(row)
        files = [i for i in inputs if i.key is None]
        if files and files[0].error_type is None and is_archive_name(group):
            if not done.finished(None, group):  # else the archive has its row: none is read
                yield from done.superseded(group)  # an archive-level failure, read again
                yield from self.archive(group, rows, done)
        elif files:  # the same file matched twice (overlapping --input) is one claim
            rows[None].insert(0, files[0])
        for member, claims in rows.items():
            yield from claim(claims, member, done)

    def archive(self, path: str, rows: dict[str | None, list[Item]], done: Done) -> Iterator[Any]:
        """The archive's members, each the first claim of its key; table rows that claim
        a member's key are duplicates of it."""
        for item in read_path(path, max_bytes=self.max_bytes, keep=self.keep):
            member = done_key(item.uri)[1]
            if not done.finished(member, item.identity):
                self.tally.inc("inputs_matched")
            if (printable := printable_uri(item.uri)) is not None:
                item = bad_file_name(printable)
            # Rows name a member by its uri: they claim a plain member's key, not a sample's.
            others = rows.pop(member, []) if item.key is None else []
            yield from claim([item, *others], member, done)


class Done:
    """What a group's inputs find in the table: the rows it holds (by member and key) and
    the transient rows a new row supersedes."""

    def __init__(self, entries: Iterable[tuple[str | None, str, bool]], retried: dict[str, str]):
        entries = list(entries)  # a grouping's values: read twice below
        self.rows = {(m, k) for m, k, duplicate in entries if not duplicate}
        self.duplicates = collections.Counter((m, k) for m, k, dup in entries if dup)
        self.retried = retried

    def finished(self, member: str | None, key: str) -> bool:
        return (member, key) in self.rows

    def superseded(self, key: str) -> Iterator[Any]:
        """The transient row of `key` (once), on SUPERSEDED_TAG."""
        if key in self.retried:
            yield beam.pvalue.TaggedOutput(SUPERSEDED_TAG, (self.retried.pop(key), key))


def claim(claims: list[Item], member: str | None, done: Done) -> Iterator[Any]:
    """The first claim on a key, unless the table has its row; the others as the
    duplicate rows the table lacks."""
    first, others = claims[0], claims[1:]
    # A transient row goes either way: the key has a new row now, or (when finished) in a
    # file adopted from a killed attempt of this run ("done" holds no transient row).
    yield from done.superseded(first.identity)
    if not done.finished(member, first.identity):
        yield first
    held = done.duplicates[(member, first.identity)]
    for n, other in enumerate(others[held:], start=held + 2):
        yield duplicate(other, first, n)


def done_entries(row: dict[str, Any]) -> Iterator[tuple[str, tuple[str | None, str, bool]]]:
    """A row of the table as the groups its inputs meet in: under its key (`done_key`),
    and, when it is an archive member keyed otherwise (a WebDataset sample, a table row
    naming a member), also under its archive, where the archive's reader looks."""
    key, uri = row["key"], row["uri"]
    duplicate_row = row["error_type"] == DUPLICATE_KEY
    group, member = done_key(key)
    yield group, (member, key, duplicate_row)
    if key != uri and archive_of(uri) is not None:
        archive, member = done_key(uri)
        yield archive, (member, key, duplicate_row)


def claim_order(item: Item) -> tuple[str, ...]:
    """Table rows that claim one key, in an order no runner changes."""
    return (item.uri, repr(item.kept), item.error_type or "", item.message)


def duplicate(item: Item, first: Item, n: int) -> Item:
    """A claim on a key another input holds, as its error row."""
    return Item(
        item.uri,
        error_type=DUPLICATE_KEY,
        message=f"claim {n} on key {first.identity!r}, whose row is that of {first.uri}",
        key=item.identity,
        kept=item.kept,
    )


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


def batch_errors(failure: tuple[Any, Any]) -> Iterator[tuple[Origin, dict[str, str]]]:
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
            error_row(meta.key.uri, "inference_error", f"the model failed on its batch: {message}"),
        )


def to_loaded(item: Item) -> Iterator[Any]:
    """An Item -> Loaded for PreprocessFn (plain files, table rows and URLs are read
    there), or its error row; either carries the item's Origin."""
    if item.error_type is not None:
        row = error_row(item.uri, item.error_type, item.message)
        yield beam.pvalue.TaggedOutput(ERRORS_TAG, (origin(item), row))
        return
    yield Loaded(origin(item), item.uri, item.data)


class CountErrorsFn(TallyFn):
    """Counts error rows by error_type (the `error.<type>` counters) and passes them on."""

    def __init__(self, progress_dir: str | None = None):
        super().__init__(NAMESPACE, progress_dir)

    def process(self, element: tuple[Origin, dict[str, str]]) -> Iterator[Any]:
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


def table_row(where: Origin, settings: dict[str, Any], **values: Any) -> dict[str, Any]:
    """A row of the caption table: uri, key and kept values, the run's settings, `values`;
    every other column null."""
    return {"uri": where.uri, "key": where.key, **dict(where.kept), **settings, **values}


def error_table_row(
    where: Origin, error: dict[str, str], settings: dict[str, Any]
) -> dict[str, Any]:
    """An error row (`preprocessing.error_row`) as a row of the caption table."""
    return table_row(where, settings, error_type=error["error_type"], message=error["message"])


def plot_one(element: tuple[Meta, CaptionResult], attention_dir: str) -> str:
    from model.evaluation.plot import attention_png
    from model.images.preprocess import decode_image

    meta, result = element
    uri = meta.key.uri
    image, _ = decode_image(read_uri(uri, fetcher_for(FetchSettings()).fetch))
    image.thumbnail((320, 320))
    words = result.caption.split() + ([] if result.hit_max_length else ["<end>"])
    name = hashlib.sha1(uri.encode()).hexdigest()[:10] + "_" + display_name(uri)
    path = FileSystems.join(attention_dir, os.path.splitext(name)[0] + ".png")
    png = attention_png(image, words or ["<end>"], result.attention, title=result.caption)
    with FileSystems.create(path, mime_type="image/png") as f:
        f.write(png)
    return path
