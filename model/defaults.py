"""Presets and defaults the command lines need before anything heavy is imported.

Nothing here imports TensorFlow, Beam or numpy: argument parsing uses these,
and a wrong flag must answer at once.
"""

from __future__ import annotations

from typing import Any

# Model sizes for `model.train --preset`.
PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {"embedding_dim": 256, "units": 512},
    "small": {"embedding_dim": 128, "units": 256},
    "tiny": {"embedding_dim": 32, "units": 64},
}
# model.train --dropout: measured on Flickr8k (docs/benchmarks.md), it delays the
# overfitting a few thousand photos show after a few epochs.
DEFAULT_DROPOUT = 0.5
# Greedy decoding stops after this many words unless `<end>` comes first.
DEFAULT_MAX_LENGTH = 20
# Decoding never completes an n-gram of this size that the caption already holds
# (0: off). Trigrams: see model/text/ngrams.py and docs for the measurements behind it.
DEFAULT_BLOCK_REPEATS = 3
# How InceptionV3 may compute the features (stored as float16 either way); int8 is an
# encoder calibrated on your photos (model.images.calibrate), on OpenVINO only.
PRECISIONS = ("float32", "bfloat16", "float16", "int8")
# Where InceptionV3 runs (model.images.runtimes): TensorFlow, or OpenVINO on CPUs.
RUNTIMES = ("tensorflow", "openvino")
# Images with more pixels are refused as decompression bombs (PIL's own limit).
MAX_PIXELS = 89_478_485
# Feature shards of at most this many images when `--num_shards` is 0 (1000 images:
# 262 MB of float16 mixed10 features, about 150 MB once gzipped).
IMAGES_PER_SHARD = 1000
# Inputs (files and archive members) larger than this are error rows, refused before
# they are read: a 50 MP JPEG is about 20 MB.
MAX_BYTES = 64 << 20
# http(s) inputs (model.images.fetch): seconds an attempt may take from connecting to the
# last byte, attempts after the first on 429/5xx/timeouts/resets, redirects followed,
# and requests in flight to one host per worker process.
FETCH_TIMEOUT = 30.0
FETCH_RETRIES = 2
MAX_REDIRECTS = 5
PER_HOST = 8
# Archive members read ahead of the model, waiting to be decoded, hold at most this
# many bytes per worker thread (beyond the one being decoded by each decode thread).
PENDING_BYTES = 256 << 20
# caption_images saves finished rows at least this often (seconds): a killed run
# resumed with --skip_existing redoes at most this much work.
CHECKPOINT_SECONDS = 60.0
# A caption run compacts its table after committing when it holds more small data files
# than this (beam_jobs.caption_table; --compact_above).
COMPACT_ABOVE = 1000
# `--weights NAME` for real ImageNet weights that `make weights` (python -m
# model.images.pretrained) converts offline into the cache: name -> (backbone variant, file).
NAMED_WEIGHTS: dict[str, tuple[str, str]] = {
    "inception-2015": ("2015", "inception-2015.weights.h5"),
}


def weights_cache_dir() -> str:
    """Where converted weights live: $SAT_CACHE_DIR, else ~/.cache/show-attend-tell."""
    import os

    default = os.path.join(os.path.expanduser("~"), ".cache", "show-attend-tell")
    return os.environ.get("SAT_CACHE_DIR") or default


def named_weights_path(name: str) -> str:
    import os

    return os.path.join(weights_cache_dir(), NAMED_WEIGHTS[name][1])
