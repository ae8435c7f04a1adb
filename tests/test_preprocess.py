import numpy as np
import pytest
import tensorflow as tf
from keras.applications.inception_v3 import preprocess_input

from model.images.extractor import build_feature_extractor
from model.images.preprocess import IMAGE_SIZE, ImageError, preprocess_image
from tests.helpers import bad_images, good_images


@pytest.mark.parametrize("name", sorted(good_images()))
def test_every_mode_becomes_inception_input(name):
    out = preprocess_image(good_images()[name])
    assert out.pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert out.pixels.dtype == np.uint8


def test_mode_specific_content():
    imgs = good_images()
    centre = lambda name: preprocess_image(imgs[name]).pixels[150, 150].astype(int)  # noqa: E731
    np.testing.assert_array_equal(centre("rgba.png"), [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(centre("palette_alpha.png"), [255, 255, 255])
    np.testing.assert_array_equal(centre("sixteen_bit.png"), [255, 255, 255])  # 65535 -> 255
    np.testing.assert_allclose(centre("animated.gif"), [255, 0, 0], atol=3)  # first frame: red
    assert abs(centre("cmyk.jpg")[0] - centre("cmyk.jpg")[1]) > 64  # still reddish, not gray
    g = centre("gray.png")
    assert g[0] == g[1] == g[2]


def test_exif_orientation_reports_upright_size():
    out = preprocess_image(good_images()["exif_rotated.jpg"])
    assert (out.width, out.height) == (20, 40)  # stored 40x20, rotated 90 degrees


def test_extractor_scales_uint8_pixels_as_keras_preprocess_input():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    scale = build_feature_extractor("none").get_layer("inception_scale")
    np.testing.assert_allclose(scale(x), preprocess_input(x.astype(np.float32)), atol=1e-6)


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_files_raise_one_clear_error(name):
    data, kind = bad_images()[name]
    with pytest.raises(ImageError) as err:
        preprocess_image(data)
    assert err.value.kind == kind, str(err.value)
    assert str(err.value)


def test_max_pixels_is_configurable():
    with pytest.raises(ImageError, match="exceeds 100 pixels"):
        preprocess_image(good_images()["rgb.jpg"], max_pixels=100)


def test_same_result_eagerly_and_inside_tf_data():
    files = [good_images()[n] for n in ("rgb.jpg", "cmyk.jpg", "exif_rotated.jpg", "rgba.png")]
    eager = np.stack([preprocess_image(b).pixels for b in files])

    def pixels(data):
        return tf.numpy_function(lambda b: preprocess_image(b).pixels, [data], tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices(files).map(pixels, num_parallel_calls=2).batch(4)
    np.testing.assert_array_equal(next(iter(ds)).numpy(), eager)
