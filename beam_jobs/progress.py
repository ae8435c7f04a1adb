"""Live progress of a Beam job: tallied where the work is done, printed by the launcher.

DoFns count what they finish through a `Tally`. Each count is a Beam counter
(what Dataflow's job page shows) and, on the local runners, also goes to a
small JSON file per DoFn instance in a folder the launcher watches: the local
runners report counters only once the pipeline has finished. A
`ProgressReporter` thread beside `pipeline.run()` sums those files every few
seconds (or, on a runner whose `run()` returns at once, queries the counters)
and prints one line to stderr, redrawn in place on a terminal, as plain lines
in a log:

    caption_images: 120/360 (33%) | 14.2 images/s now, 12.9 overall
        | 3 errors (not_an_image 2, too_large 1) | 0:19 left
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import apache_beam as beam
from apache_beam.metrics import Metrics

ERROR_PREFIX = "error."  # counters named error.<error_type>
FLUSH_SECONDS = 0.5


class Tally:
    """Counters of one DoFn: Beam counters, mirrored to `progress_dir` when it exists here.

    Build it in the DoFn's constructor (it pickles as two strings) and call
    `setup()` from the DoFn's setup and `flush()` from its finish_bundle.
    """

    def __init__(self, namespace: str, progress_dir: str | None = None):
        self.namespace = namespace
        self.progress_dir = progress_dir

    def setup(self) -> None:
        self._counters: dict[str, Any] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._flushed = 0.0
        self._path = None
        if self.progress_dir and os.path.isdir(self.progress_dir):  # same machine as launcher
            self._path = os.path.join(self.progress_dir, f"{uuid.uuid4().hex}.json")

    def inc(self, name: str, n: int = 1) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Metrics.counter(self.namespace, name)
        counter.inc(n)
        if self._path is None:
            return
        with self._lock:
            self._counts[name] += n
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._path is None:
            return
        with self._lock:
            data = json.dumps(self._counts)
            self._flushed = time.monotonic()
        tmp = f"{self._path}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(data)
            os.replace(tmp, self._path)  # the reader never sees half a file
        except OSError:  # the launcher has finished and removed the folder
            self._path = None


class TallyFn(beam.DoFn):
    """A DoFn that counts: `self.tally` set up with the DoFn and flushed after each bundle.

    Subclasses pass their job's namespace and the progress folder to `__init__`, call
    `self.tally.inc(name)` as they go, and call `super().setup()` if they set up more."""

    def __init__(self, namespace: str, progress_dir: str | None = None):
        self.tally = Tally(namespace, progress_dir)

    def setup(self) -> None:
        self.tally.setup()

    def finish_bundle(self) -> Any:
        self.tally.flush()


def read_tallies(progress_dir: str) -> dict[str, int]:
    """The sum of every Tally file in `progress_dir`."""
    total: collections.Counter[str] = collections.Counter()
    try:
        names = os.listdir(progress_dir)
    except OSError:
        return {}
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(progress_dir, name)) as f:
                total.update(json.load(f))
        except (OSError, ValueError):
            continue  # replaced while reading: counted at the next report
    return dict(total)


def query_counters(result: Any, namespace: str) -> dict[str, int]:
    """Attempted counter values of a running (or finished) pipeline, if the runner reports them."""
    values: collections.Counter[str] = collections.Counter()
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # noqa: BLE001 - some runners report nothing while running
        return {}
    for c in counters:
        if c.key.metric.namespace == namespace:
            values[c.key.metric.name] += int(c.attempted or c.committed or 0)
    return dict(values)


def errors_by_type(counts: Mapping[str, int]) -> dict[str, int]:
    """{error_type: n} from the `error.<type>` counters."""
    return {
        k[len(ERROR_PREFIX) :]: v for k, v in counts.items() if k.startswith(ERROR_PREFIX) and v
    }


def describe_errors(errors: Mapping[str, int]) -> str:
    """' (not_an_image 2, too_large 1)', most frequent first; '' for none."""
    if not errors:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in sorted(errors.items(), key=_by_count)) + ")"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class ProgressLine:
    """What one progress line says; `str()` renders it."""

    job: str
    done: int
    total: int | None
    unit: str
    rate_now: float
    rate_overall: float
    errors: Mapping[str, int] = field(default_factory=dict)
    growing: bool = False  # the total rose since the last line: inputs are still listed

    def __str__(self) -> str:
        parts = []
        if self.total and self.growing:
            parts.append(f"{self.done}/{self.total}+ (still listing)")
        elif self.total:
            parts.append(f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)")
        else:
            parts.append(f"{self.done} done")
        parts.append(f"{self.rate_now:.1f} {self.unit}/s now, {self.rate_overall:.1f} overall")
        n_errors = sum(self.errors.values())
        parts.append(
            f"{n_errors} error{'' if n_errors == 1 else 's'}{describe_errors(self.errors)}"
        )
        if self.total and self.done >= self.total and not self.growing:
            parts.append("finishing")
        elif self.total and self.rate_overall > 0 and not self.growing:
            parts.append(f"{format_duration((self.total - self.done) / self.rate_overall)} left")
        else:
            parts.append("--:-- left")
        return f"{self.job}: " + " | ".join(parts)


SAME_LINE_SECONDS = 60.0  # a log repeats an unchanged line this often, as a heartbeat


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


def progress_line(
    job: str,
    counts: Mapping[str, int],
    done_keys: Sequence[str],
    total: int | None,
    unit: str,
    rate_now: float,
    rate_overall: float,
) -> ProgressLine:
    errors = errors_by_type(counts)
    done = sum(counts.get(k, 0) for k in done_keys) + sum(errors.values())
    return ProgressLine(job, done, total, unit, rate_now, rate_overall, errors)


class ProgressReporter:
    """Prints a progress line every `interval` seconds while the pipeline runs.

    Args:
      job, namespace: the name printed and the counters' namespace.
      done_keys: counters whose sum, with every `error.*` counter, is the inputs done.
      total: the inputs to do, or None to read it from the `total_key` counter.
    """

    def __init__(
        self,
        job: str,
        namespace: str,
        done_keys: Sequence[str],
        interval: float,
        total: int | None = None,
        total_key: str | None = None,
        unit: str = "images",
        stream: TextIO | None = None,
    ):
        self.job, self.namespace, self.done_keys = job, namespace, tuple(done_keys)
        self.interval, self.total, self.total_key, self.unit = interval, total, total_key, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.dir = tempfile.mkdtemp(prefix="sat-progress-")
        self.result: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False
        self._last_total: int | None = None
        self._last_said: tuple[int, int | None, int] | None = None  # done, total, errors
        self._said_at = 0.0

    def __enter__(self) -> ProgressReporter:
        self.started = self._last_time = time.monotonic()
        self._first_done_time: float | None = None
        self._last_done = 0
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        shutil.rmtree(self.dir, ignore_errors=True)

    def attach(self, result: Any) -> None:
        """A runner whose run() returns before the end: read its counters as well."""
        self.result = result

    def counts(self) -> dict[str, int]:
        counts = read_tallies(self.dir)
        if self.result is not None:
            for k, v in query_counters(self.result, self.namespace).items():
                counts[k] = max(counts.get(k, 0), v)
        return counts

    def line(self) -> ProgressLine:
        counts, now = self.counts(), time.monotonic()
        total = self.total if self.total is not None else counts.get(self.total_key or "", 0)
        done = progress_line(self.job, counts, self.done_keys, total, self.unit, 0, 0).done
        if done and self._first_done_time is None:
            self._first_done_time = self._last_time  # work began within the last interval
        rate_now = (done - self._last_done) / max(now - self._last_time, 1e-9)
        since = now - (self._first_done_time or now)
        rate_overall = done / since if since > 0 else 0.0
        self._last_done, self._last_time = done, now
        line = progress_line(
            self.job, counts, self.done_keys, total, self.unit, rate_now, rate_overall
        )
        growing = self._last_total is not None and (total or 0) > self._last_total
        self._last_total = total or 0
        return dataclasses.replace(line, growing=growing)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        line = self.line()
        said = (line.done, line.total, sum(line.errors.values()))
        now = time.monotonic()
        if not self.tty and said == self._last_said and now - self._said_at < SAME_LINE_SECONDS:
            return  # a log gets a line when something moved (or a heartbeat)
        self._last_said, self._said_at = said, now
        text = str(line)
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = True
