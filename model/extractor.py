"""InceptionV3 `mixed10` feature extractor: (N, 299, 299, 3) uint8 -> (N, 64, 2048).

`weights` is "imagenet" (Keras downloads and caches it), "none" (random init
from a fixed seed, so every worker and every stage builds the same network),
or a local or remote (gs://, ...) weights file such as Keras's
`inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import keras

from model import storage
from model.defaults import PRECISIONS
from model.formats import BACKBONE, BACKBONE_LAYER, FEATURE_DTYPE, FEATURE_SHAPE
from model.preprocess import IMAGE_SIZE, PREPROCESSING

# Random init must be identical in stage 1 and stage 3, or features differ.
NONE_WEIGHTS_SEED = 1234


def features_identity(weights: str, precision: str = "float32") -> dict[str, Any]:
    """The features manifest fields that describe how features are computed."""
    return {
        "backbone": BACKBONE,
        "layer": BACKBONE_LAYER,
        "weights": weights,
        "weights_seed": NONE_WEIGHTS_SEED if weights == "none" else None,
        "image_size": IMAGE_SIZE,
        "preprocessing": PREPROCESSING,
        "precision": precision,
        "feature_shape": list(FEATURE_SHAPE),
        "feature_dtype": FEATURE_DTYPE,
    }


def check_weights(weights: str) -> str:
    """Normalises the --weights flag; fails at start with one line if a file is missing."""
    if weights.lower() in ("imagenet", "none"):
        return weights.lower()
    if not storage.exists(weights):
        raise FileNotFoundError(f"--weights: no weights file at {weights}")
    return weights


def local_weights_file(weights: str) -> str:
    """Returns a local path for a weights file, copying remote files to a temp dir once."""
    if "://" not in weights or weights.startswith("file://"):
        return weights.removeprefix("file://")
    local = os.path.join(tempfile.mkdtemp(prefix="sat-weights-"), os.path.basename(weights))
    return storage.copy_to_local(weights, local)


def build_feature_extractor(weights: str = "imagenet", precision: str = "float32") -> keras.Model:
    """uint8 pixels -> InceptionV3 up to `mixed10` -> (N, 64, 2048) float32 locations.

    The model scales pixels to [-1, 1] itself (`preprocess_input`'s 'tf' mode),
    so callers pass `preprocess_image` output as it is.

    Args:
      weights: "imagenet", "none" or a weights file path/URL.
      precision: compute dtype; "bfloat16" runs much faster on CPUs with AMX or
        AVX512-BF16 and on GPUs. The output is float32 either way.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    weights = check_weights(weights)
    if weights == "none":
        keras.utils.set_random_seed(NONE_WEIGHTS_SEED)
        source = None
    elif weights == "imagenet":
        source = "imagenet"
    else:
        source = local_weights_file(weights)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if precision == "float32" else f"mixed_{precision}")
    try:
        inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name="pixels")
        scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="inception_scale")(inputs)
        backbone = keras.applications.InceptionV3(
            include_top=False, weights=source, input_tensor=scaled
        )
        x = keras.layers.Reshape(FEATURE_SHAPE, name="locations")(backbone.output)
        x = keras.layers.Activation("linear", dtype="float32", name="to_float32")(x)
    finally:
        keras.config.set_dtype_policy(previous)
    return keras.Model(inputs, x, name="inception_v3_mixed10")
