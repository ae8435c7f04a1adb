"""RunInference model handlers of our own: InceptionV3 features, and features + greedy captions.

Beam's built-in TensorFlow handler imports tensorflow_hub and cannot load Keras 3
models, hence these. Each loads once per worker (`load_model`), runs one
compiled call per batch with a `None` batch dimension (BatchElements makes
batches of any size), and counts bytes from array sizes rather than pickling.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from model.inference.end_to_end import (  # noqa: F401 - CaptionResult is re-exported
    CaptionResult,
    LoadedCaptioner,
    build_caption_fn,
    split_results,
)


def _batching(batch_size: int) -> dict[str, int]:
    # Full batches from the start: BatchElements would otherwise begin at 1 and
    # grow adaptively, running InceptionV3 on many small, inefficient batches.
    # A bundle's remainder is still flushed as a smaller batch.
    return {"min_batch_size": batch_size, "max_batch_size": batch_size}


def _nbytes(batch: Sequence[np.ndarray]) -> int:
    return int(sum(x.nbytes for x in batch))


class LoadedExtractor:
    """The compiled extractor behind a method: with --large_model or --model_copies,
    Beam hands the handler a proxy to a model in another process, which forwards
    method calls only, and whose results must pickle (NumPy, not tensors)."""

    def __init__(self, embed: Callable) -> None:
        self._embed = embed

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self._embed(pixels))


class FeatureExtractorHandler(ModelHandler[np.ndarray, np.ndarray, LoadedExtractor]):
    """pixels (299, 299, 3) uint8 -> features (64, 2048) float16."""

    def __init__(
        self,
        weights: str,
        precision: str = "float32",
        batch_size: int = 32,
        model_copies: int | None = None,
        namespace: str = "extract_features",
        large_model: bool = False,
        variant: str | None = None,
        runtime: str = "tensorflow",
        calibration: str | None = None,
    ):
        super().__init__(
            **_batching(batch_size), model_copies=model_copies, large_model=large_model
        )
        self.weights = weights
        self.variant = variant  # of the backbone (model.images.extractor); None: the weights' own
        self.precision = precision
        self.runtime = runtime  # model.images.runtimes
        self.calibration = calibration  # the int8 encoder's folder (model.images.calibrate)
        self.namespace = namespace

    def load_model(self) -> LoadedExtractor:
        from model.quiet import import_tensorflow

        # Take GPU memory as needed: several SDK processes may share one GPU.
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        import_tensorflow()  # on a worker process, as quiet as the launcher
        from model.images.runtimes import build_encoder

        encode = build_encoder(
            self.weights, self.precision, self.variant, self.runtime, self.calibration
        )
        return LoadedExtractor(encode)

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: LoadedExtractor,
        inference_args: dict | None = None,
    ) -> Iterable[np.ndarray]:
        return list(model.embed(np.stack(batch)))

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return _nbytes(batch)

    def get_metrics_namespace(self) -> str:
        return self.namespace


class CaptionerHandler(ModelHandler[np.ndarray, CaptionResult, LoadedCaptioner]):
    """pixels (299, 299, 3) uint8 -> CaptionResult, with the export loaded once per worker."""

    def __init__(
        self,
        export_dir: str,
        precision: str = "float32",
        batch_size: int = 32,
        model_copies: int | None = None,
        large_model: bool = False,
        decoding: dict[str, Any] | None = None,
        runtime: str = "tensorflow",
        calibration: str | None = None,
    ):
        super().__init__(
            **_batching(batch_size), model_copies=model_copies, large_model=large_model
        )
        self.export_dir = export_dir
        self.precision = precision
        self.decoding = decoding or {}
        self.runtime = runtime
        self.calibration = calibration  # the int8 encoder's folder (model.images.calibrate)

    def load_model(self) -> LoadedCaptioner:
        from model.quiet import import_tensorflow

        # Take GPU memory as needed: several SDK processes may share one GPU.
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        import_tensorflow()  # on a worker process, as quiet as the launcher
        from model.network.export import load_export

        export = load_export(self.export_dir)
        caption_fn = build_caption_fn(
            export, self.precision, self.decoding, self.runtime, self.calibration
        )
        return LoadedCaptioner(caption_fn, export)

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: LoadedCaptioner,
        inference_args: dict | None = None,
    ) -> Iterable[CaptionResult]:
        return model.caption(np.stack(batch))

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return _nbytes(batch)

    def get_metrics_namespace(self) -> str:
        return "caption_images"
