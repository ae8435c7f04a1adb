"""InceptionV3 `mixed10` feature extractor: (N, 299, 299, 3) uint8 -> (N, 64, 2048).

`weights` is
- "inception-2015": Google's 2015-12-05 Inception-v3 with its ImageNet weights,
  converted offline by `make weights` (`model.images.pretrained`) into the cache;
- "imagenet": Keras's ImageNet weights (Keras downloads and caches them);
- "none": random init from a fixed seed, so every worker and every stage builds
  the same network;
- a local or remote (gs://, ...) weights file, such as Keras's
  `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`.

Two backbone variants exist. "keras" is `keras.applications.InceptionV3`, which
takes x / 127.5 - 1. "2015" is the network Google released in 2015 (the one
behind FID): the same layers, but it scales its input as (x - 128) / 128 and its
last block (mixed10) max-pools the pool branch where Keras averages.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from typing import Any

import keras

from model.cli import UsageError, first_line
from model.defaults import NAMED_WEIGHTS, PRECISIONS, named_weights_path
from model.images.preprocess import IMAGE_SIZE, PREPROCESSING
from model.io import storage
from model.io.formats import BACKBONE, BACKBONE_LAYER, FEATURE_DTYPE, FEATURE_SHAPE

# Random init must be identical in stage 1 and stage 3, or features differ.
NONE_WEIGHTS_SEED = 1234
VARIANTS = ("keras", "2015")
# Keras checks its download of the no-top ImageNet weights against this md5.
KERAS_IMAGENET_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"
# Input scaling of each variant: pixels * scale + offset.
INPUT_SCALING = {"keras": (1 / 127.5, -1.0), "2015": (1 / 128, -1.0)}


class WeightsUnavailableError(FileNotFoundError):
    """Weights that cannot be had here (not converted yet, or no network): one line."""


def weights_variant(weights: str, variant: str | None = None) -> str:
    """The backbone variant: given, else the named weights' own, else Keras's."""
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"backbone variant must be one of {VARIANTS}, got {variant!r}")
        return variant
    return NAMED_WEIGHTS[weights][0] if weights in NAMED_WEIGHTS else "keras"


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with storage.open_file(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(weights: str) -> str | None:
    """The weights by content: None for random init (its seed is recorded instead), Keras's
    own md5 for "imagenet", else the sha256 of the file's bytes (where it lives does not
    matter: a moved or copied file keeps its identity)."""
    weights = check_weights(weights)
    if weights == "none":
        return None
    if weights == "imagenet":
        return f"md5:{KERAS_IMAGENET_MD5}"
    path = named_weights_path(weights) if weights in NAMED_WEIGHTS else weights
    stat = storage.gfile().stat(path)
    return f"sha256:{_file_sha256(path, stat.length, stat.mtime_nsec)}"


def features_identity(
    weights: str,
    precision: str = "float32",
    variant: str | None = None,
    runtime: str = "tensorflow",
    calibration: str | None = None,
) -> dict[str, Any]:
    """The features manifest fields that describe how features are computed. An int8
    encoder (`calibration`, its folder) is known by its calibration id; its folder is
    recorded too, for the stages after this one."""
    int8 = None
    if precision == "int8" and calibration:
        from model.io.formats import read_calibration

        int8 = read_calibration(calibration)["id"]
    return {
        "backbone": BACKBONE,
        "variant": weights_variant(weights, variant),
        "layer": BACKBONE_LAYER,
        "weights": weights,
        "weights_hash": weights_hash(weights),
        "weights_seed": NONE_WEIGHTS_SEED if weights == "none" else None,
        "image_size": IMAGE_SIZE,
        "preprocessing": PREPROCESSING,
        "precision": precision,
        "runtime": runtime,
        "calibration": int8,
        "calibration_uri": calibration if int8 else None,
        "feature_shape": list(FEATURE_SHAPE),
        "feature_dtype": FEATURE_DTYPE,
    }


def check_weights(weights: str) -> str:
    """Normalises the --weights flag; fails at start with one line if a file is missing."""
    if weights.lower() in ("imagenet", "none"):
        return weights.lower()
    if weights in NAMED_WEIGHTS:
        if not os.path.exists(named_weights_path(weights)):
            raise WeightsUnavailableError(
                f"--weights {weights}: not converted yet; run `make weights` "
                f"(python -m model.images.pretrained) first"
            )
        return weights
    if not storage.exists(weights):
        raise FileNotFoundError(f"--weights: no weights file at {weights}")
    return weights


def fetch_keras_imagenet() -> str:
    """Keras's ImageNet file (downloaded once into ~/.keras); one line when offline."""
    from keras.src.applications.inception_v3 import WEIGHTS_PATH_NO_TOP

    try:
        return keras.utils.get_file(
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            WEIGHTS_PATH_NO_TOP,
            cache_subdir="models",
            file_hash=KERAS_IMAGENET_MD5,
        )
    except Exception as e:  # noqa: BLE001 - Keras wraps URL, HTTP and hash errors alike
        reason = first_line(e, 160)
        raise WeightsUnavailableError(
            f"--weights imagenet: Keras could not download its weights ({reason}); "
            "offline, run `make weights` and pass --weights inception-2015"
        ) from None


def local_weights_file(weights: str) -> str:
    """Returns a local path for a weights file, copying remote files to a temp dir once."""
    if weights in NAMED_WEIGHTS:
        return named_weights_path(weights)
    if "://" not in weights or weights.startswith("file://"):
        return weights.removeprefix("file://")
    local = os.path.join(tempfile.mkdtemp(prefix="sat-weights-"), os.path.basename(weights))
    return storage.copy_to_local(weights, local)


def build_backbone(inputs: Any, variant: str = "keras") -> keras.Model:
    """uint8 pixels -> InceptionV3 (no top, random init) of the given variant, up to mixed10.

    The 2015 variant is Keras's network with the 2015 input scaling and a max pool in
    mixed10's pool branch (Keras builds that block with an average pool).
    """
    scale, offset = INPUT_SCALING[variant]
    scaled = keras.layers.Rescaling(scale, offset=offset, name="inception_scale")(inputs)
    backbone = keras.applications.InceptionV3(include_top=False, weights=None, input_tensor=scaled)
    if variant == "keras":
        return backbone
    mixed10_pool = [
        layer for layer in backbone.layers if isinstance(layer, keras.layers.AveragePooling2D)
    ][-1]

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if layer is mixed10_pool:
            config = layer.get_config()
            return keras.layers.MaxPooling2D(
                config["pool_size"], config["strides"], config["padding"], name=layer.name
            )
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(backbone, clone_function=clone)


def conv_bn_layers(backbone: keras.Model) -> list[tuple[Any, Any]]:
    """The 94 (Conv2D, BatchNormalization) pairs in the order Keras creates them (which is
    the order of its auto-numbered names, not of `backbone.layers`, a topological order)."""

    def creation_order(layer: keras.layers.Layer) -> int:
        suffix = layer.name.rsplit("_", 1)[-1]
        return int(suffix) if "_" in layer.name and suffix.isdigit() else 0

    convs = sorted(
        (x for x in backbone.layers if isinstance(x, keras.layers.Conv2D)), key=creation_order
    )
    norms = sorted(
        (x for x in backbone.layers if isinstance(x, keras.layers.BatchNormalization)),
        key=creation_order,
    )
    return list(zip(convs, norms, strict=True))


def build_feature_extractor(
    weights: str = "imagenet", precision: str = "float32", variant: str | None = None
) -> keras.Model:
    """uint8 pixels -> InceptionV3 up to `mixed10` -> (N, 64, 2048) float32 locations.

    The model scales pixels itself, as its variant expects, so callers pass
    `preprocess_image` output as it is.

    Args:
      weights: "inception-2015", "imagenet", "none" or a weights file path/URL.
      precision: compute dtype; "bfloat16" runs much faster on CPUs with AMX or
        AVX512-BF16 and on GPUs. The output is float32 either way.
      variant: "keras" or "2015"; by default the named weights' own, else "keras".
        An export records it, since a copied weights file no longer says.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8":
        raise UsageError("--precision int8 runs on --runtime openvino only")
    weights = check_weights(weights)
    variant = weights_variant(weights, variant)
    if weights == "none":
        keras.utils.set_random_seed(NONE_WEIGHTS_SEED)
        source = None
    elif weights == "imagenet":
        source = fetch_keras_imagenet()
    else:
        source = local_weights_file(weights)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if precision == "float32" else f"mixed_{precision}")
    try:
        inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name="pixels")
        backbone = build_backbone(inputs, variant)
        if source is not None:
            backbone.load_weights(source)
        x = keras.layers.Reshape(FEATURE_SHAPE, name="locations")(backbone.output)
        x = keras.layers.Activation("linear", dtype="float32", name="to_float32")(x)
    finally:
        keras.config.set_dtype_policy(previous)
    return keras.Model(backbone.inputs[0], x, name="inception_v3_mixed10")
