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
    features = encode(pixels)  # (N, 299, 299, 3) uint8 -> (N, 64, 2048) float16

Features come out as stage 1 stores them, float16, rounded by the runtime as it writes
its output (round to nearest even, as NumPy's `astype`): a NumPy cast of the float32
output cost 1 ms of CPU an image, an eighth of the int8 encoder's own.

`int8` is an encoder quantized on the user's photos by `model.images.calibrate`, read
from its folder (`--calibration`, local or gs://) into the cache once per worker.
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
# int8: the quantized layers run in int8 whatever the hint; the others in f32.
OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "f32"}


def check_runtime(
    runtime: str, precision: str | None = None, calibration: str | None = None
) -> None:
    """One line when the runtime asked for is not installed here, or int8 is asked of
    TensorFlow or without a calibrated encoder."""
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
    if precision == "int8" and runtime != "openvino":
        raise UsageError("--precision int8 runs on --runtime openvino only")
    if precision == "int8" and not calibration:
        raise UsageError(
            "--precision int8 needs --calibration DIR, an encoder calibrated on your photos "
            "by python -m model.images.calibrate"
        )
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise UsageError(
                "--runtime openvino needs OpenVINO: pip install 'show-attend-tell[openvino]'"
            ) from None


def identity_precision(precision: str, runtime: str, calibration: str | None = None) -> str:
    """How a table or manifest names the extractor's compute: the precision, prefixed
    with the runtime when it is not TensorFlow (its features differ in the last digits),
    and for int8 the calibration's id (`openvino/int8@ID`)."""
    if runtime == "tensorflow":
        return precision
    if precision == "int8" and calibration:
        from model.io.formats import read_calibration

        return f"{runtime}/int8@{read_calibration(calibration)['id']}"
    return f"{runtime}/{precision}"


def extractor_settings(
    precision: str | None,
    runtime: str | None,
    calibration: str | None,
    features: dict,
) -> tuple[str, str, str | None]:
    """(precision, runtime, calibration) a captioner runs the extractor with: the flags',
    else those of the features its model was trained on; checked (`check_runtime`)."""
    precision = precision or features.get("precision", "float32")
    runtime = runtime or features.get("runtime", "tensorflow")
    int8 = precision == "int8"
    calibration = (calibration or features.get("calibration_uri")) if int8 else None
    check_runtime(runtime, precision, calibration)
    return precision, runtime, calibration


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
    move_into_place(aside, folder)
    return xml


def move_into_place(aside: str, folder: str) -> None:
    """Renames a folder written aside to its cache place, whole or not at all; when
    another process got there first, its copy (the same files) stays."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    try:
        os.rename(aside, folder)
    except OSError:
        import shutil

        shutil.rmtree(aside, ignore_errors=True)


def int8_encoder(calibration: str, weights: str, variant: str | None) -> str:
    """The calibrated int8 encoder's encoder.xml in the local cache (copied from
    `calibration`, local or gs://, once); one line if it was calibrated for other weights."""
    from model.images.extractor import weights_hash, weights_variant
    from model.io import storage
    from model.io.formats import read_calibration

    record = read_calibration(calibration)
    mine = (weights_hash(weights), weights_variant(weights, variant))
    if (record["weights_hash"], record["variant"]) != mine:
        raise UsageError(
            f"--calibration {calibration}: calibrated for weights {record['weights']} "
            f"({record['weights_hash']}, variant {record['variant']}), not these "
            f"({mine[0]}, variant {mine[1]})"
        )
    folder = os.path.join(weights_cache_dir(), "openvino-int8", record["id"])
    xml = os.path.join(folder, "encoder.xml")
    if os.path.exists(xml):
        return xml
    aside = f"{folder}.tmp-{os.getpid()}"
    os.makedirs(aside, exist_ok=True)
    for name in ("encoder.xml", "encoder.bin"):
        storage.copy_to_local(f"{calibration.rstrip('/')}/{name}", os.path.join(aside, name))
    move_into_place(aside, folder)
    return xml


def build_encoder(
    weights: str,
    precision: str,
    variant: str | None,
    runtime: str,
    calibration: str | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """pixels (N, 299, 299, 3) uint8 -> features (N, 64, 2048) float16, as stored, on
    `runtime` (`calibration`: the int8 encoder's folder, for precision int8)."""
    check_runtime(runtime, precision, calibration)
    if runtime == "tensorflow":
        import tensorflow as tf

        from model.images.extractor import build_feature_extractor

        extractor = build_feature_extractor(weights, precision, variant)
        spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8)
        call = tf.function(
            lambda x: tf.cast(extractor(x, training=False), tf.float16), input_signature=[spec]
        )
        return lambda pixels: call(pixels).numpy()
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    network = (
        int8_encoder(calibration, weights, variant)
        if precision == "int8" and calibration
        else converted_encoder(weights, variant)
    )
    core = ov.Core()
    steps = PrePostProcessor(core.read_model(network))
    steps.output(0).tensor().set_element_type(ov.Type.f16)  # rounded as it is written
    compiled = core.compile_model(
        steps.build(),
        "CPU",
        {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision]},
    )
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one request: a worker's threads take turns (it uses every core)

    def encode(pixels: np.ndarray) -> np.ndarray:
        with lock:
            pixels = np.ascontiguousarray(pixels, np.uint8)
            return request.infer([pixels], share_inputs=True)[0]  # a copy of the output

    return encode
