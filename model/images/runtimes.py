"""Where the encoder (InceptionV3 to `mixed10`) runs: TensorFlow, or OpenVINO on CPUs.

Both Beam jobs and `model.caption` spend most of their time in the encoder's forward
pass, and OpenVINO runs a frozen CNN on a CPU about twice as fast as TensorFlow
(docs/benchmarks.md). The OpenVINO network is converted from the same Keras extractor
(`model.images.extractor.build_feature_extractor`, so the same weights file) by
`openvino.convert_model`, stored once per weights, variant and OpenVINO version under
the cache (`$SAT_CACHE_DIR/openvino/KEY/encoder.xml`, full-precision weights) and
compiled for the CPU with the precision asked: f32 unless `bfloat16` (OpenVINO would
otherwise pick bf16 by itself on CPUs that have it, which changes the numbers).

    encode = build_encoder("inception-2015", "float32", None, "openvino")
    features = encode(pixels)  # (N, 299, 299, 3) uint8 -> (N, 64, 2048) float32
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable

import numpy as np

from model.cli import UsageError
from model.defaults import RUNTIMES, weights_cache_dir
from model.images.preprocess import IMAGE_SIZE

# OpenVINO's inference precision for each --precision (float16 runs as f16 where the
# CPU has it, else as f32: OpenVINO decides).
OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def check_runtime(runtime: str) -> None:
    """One line when the runtime asked for is not installed here."""
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise UsageError(
                "--runtime openvino needs OpenVINO: pip install 'show-attend-tell[openvino]'"
            ) from None


def identity_precision(precision: str, runtime: str) -> str:
    """How a table or manifest names the extractor's compute: the precision, prefixed
    with the runtime when it is not TensorFlow (its features differ in the last digits)."""
    return precision if runtime == "tensorflow" else f"{runtime}/{precision}"


def cache_key(weights: str, variant: str | None) -> str:
    """The converted network by what it is made of: the weights by content, the
    backbone variant, and the OpenVINO version that converted it."""
    import openvino

    from model.images.extractor import NONE_WEIGHTS_SEED, weights_hash, weights_variant

    what = {
        "weights": weights_hash(weights) or f"seed:{NONE_WEIGHTS_SEED}",
        "variant": weights_variant(weights, variant),
        "openvino": openvino.__version__,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def converted_encoder(weights: str, variant: str | None) -> str:
    """The OpenVINO IR of the extractor (encoder.xml), converted now unless cached.
    Written aside and renamed, so a process killed mid-way leaves no half file and two
    workers converting at once both end with a whole one."""
    import openvino as ov

    from model.images.extractor import build_feature_extractor

    folder = os.path.join(weights_cache_dir(), "openvino", cache_key(weights, variant))
    xml = os.path.join(folder, "encoder.xml")
    if os.path.exists(xml):
        return xml
    keras_model = build_feature_extractor(weights, "float32", variant)
    shape = [-1, IMAGE_SIZE, IMAGE_SIZE, 3]
    with warnings.catch_warnings():  # Keras's note on the input's structure: harmless
        warnings.simplefilter("ignore", UserWarning)
        network = ov.convert_model(keras_model, input=[("pixels", shape, ov.Type.u8)])
    aside = f"{folder}.tmp-{os.getpid()}"
    ov.save_model(network, os.path.join(aside, "encoder.xml"), compress_to_fp16=False)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    try:
        os.rename(aside, folder)
    except OSError:  # another process got there first: its copy is the same network
        import shutil

        shutil.rmtree(aside, ignore_errors=True)
    return xml


def build_encoder(
    weights: str, precision: str, variant: str | None, runtime: str
) -> Callable[[np.ndarray], np.ndarray]:
    """pixels (N, 299, 299, 3) uint8 -> features (N, 64, 2048) float32 on `runtime`."""
    if runtime == "tensorflow":
        import tensorflow as tf

        from model.images.extractor import build_feature_extractor

        extractor = build_feature_extractor(weights, precision, variant)
        spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8)
        call = tf.function(lambda x: extractor(x, training=False), input_signature=[spec])
        return lambda pixels: call(pixels).numpy()
    check_runtime(runtime)
    import openvino as ov

    compiled = ov.Core().compile_model(
        converted_encoder(weights, variant),
        "CPU",
        {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision]},
    )
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one request: a worker's threads take turns (it uses every core)

    def encode(pixels: np.ndarray) -> np.ndarray:
        with lock:
            return np.array(request.infer([np.ascontiguousarray(pixels, np.uint8)])[0])

    return encode
