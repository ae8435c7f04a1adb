"""Images to captions with one compiled call per batch: what `beam_jobs.caption_images`
(through its RunInference handler) and `python -m model.caption` both run.

Pixels come from `model.images.preprocess.preprocess_image`; InceptionV3 runs on
them, its features make the float16 round trip of stage 1's stored features,
and `model.decoding.decoders` decodes them (greedy or beam search).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.images.preprocess import IMAGE_SIZE


@dataclass(frozen=True)
class CaptionResult:
    """The decoded caption of one image (token ids exclude `<end>`)."""

    caption: str
    token_ids: list[int]
    log_prob: float
    hit_max_length: bool
    attention: np.ndarray  # (length + 1 if <end> was produced, L)


@dataclass
class LoadedCaptioner:
    """A loaded export and its compiled caption function.

    Callers use the `caption` method: with --large_model or --model_copies, Beam hands
    the handler a proxy to a model living in another process, and a proxy forwards
    method calls only (reading `.export` through it fails)."""

    caption_batch: Callable  # pixels (B, 299, 299, 3) -> dict of decoded tensors
    export: Any

    def caption(self, pixels: np.ndarray) -> list[CaptionResult]:
        return split_results(self.caption_batch(pixels), self.export.vocab)


def build_caption_fn(
    export: Any,
    precision: str = "float32",
    decoding: dict[str, Any] | None = None,
    runtime: str = "tensorflow",
    calibration: str | None = None,
) -> Callable:
    """One compiled graph per batch: InceptionV3 -> float16 round trip -> decoding
    (greedy, or beam search with `decoding` = `model.cli.decoding_settings`); with
    `runtime` openvino, InceptionV3 runs there and the rest is one graph.

    The float16 round trip reproduces the features exactly as stage 1 stored them,
    so bulk captions equal what evaluation decodes from the shards.
    """
    import tensorflow as tf

    from model.decoding.decoders import decode_graph
    from model.images.extractor import build_feature_extractor

    model, max_length = export.model, export.max_length
    if runtime != "tensorflow":
        from model.images.runtimes import build_encoder

        encode = build_encoder(
            export.extractor_weights(), precision, export.extractor_variant, runtime, calibration
        )
        spec = tf.TensorSpec([None, *model.config.feature_shape], tf.float16)

        @tf.function(input_signature=[spec])
        def decode(features: tf.Tensor) -> dict[str, tf.Tensor]:  # float16, as stored
            features = tf.cast(features, tf.float32)
            return decode_graph(model, features, max_length, **(decoding or {}))

        return lambda pixels: decode(encode(pixels))

    extractor = build_feature_extractor(
        export.extractor_weights(), precision, export.extractor_variant
    )

    @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8)])
    def caption_batch(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        features = tf.cast(tf.cast(extractor(pixels, training=False), tf.float16), tf.float32)
        return decode_graph(model, features, max_length, **(decoding or {}))

    return caption_batch


def split_results(outputs: dict[str, Any], vocab: Any) -> list[CaptionResult]:
    """Per-image results from one decoded batch."""
    from model.decoding.decoders import to_decoded

    decoded = to_decoded(outputs)
    results = []
    for i in range(len(decoded.lengths)):
        words = decoded.words(i)
        steps = len(words) + (0 if decoded.hit_max_length[i] else 1)
        results.append(
            CaptionResult(
                caption=vocab.decode(words),
                token_ids=words,
                log_prob=decoded.sequence_log_prob(i),
                hit_max_length=bool(decoded.hit_max_length[i]),
                attention=decoded.attention[i, :steps].astype(np.float16),
            )
        )
    return results
