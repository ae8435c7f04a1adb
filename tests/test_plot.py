import numpy as np
import pytest
from PIL import Image

from model.evaluation.plot import plot_attention


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 20])
def test_plot_any_caption_length(tmp_path, n):
    image = Image.new("RGB", (120, 90), (30, 120, 200))
    attention = np.random.RandomState(n).dirichlet(np.ones(64), size=20)
    path = plot_attention(image, [f"w{i}" for i in range(n)], attention, str(tmp_path / "p.png"))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 100


def test_plot_rejects_empty_caption(tmp_path):
    with pytest.raises(ValueError, match="at least one word"):
        plot_attention(
            np.zeros((8, 8, 3), np.uint8), [], np.zeros((1, 64)), str(tmp_path / "x.png")
        )


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (120, 90)])
def test_image_and_attention_fill_the_panel(size):
    import matplotlib.pyplot as plt

    from model.evaluation.plot import attention_figure

    image = Image.new("RGB", size, (200, 30, 30))
    fig = attention_figure(image, ["a", "b"], np.full((2, 64), 1 / 64))
    width, height = size
    for ax in fig.axes[:2]:
        assert ax.get_xlim() == (0, width) and ax.get_ylim() == (height, 0)
        for artist in ax.get_images():
            assert tuple(artist.get_extent()) == (0, width, height, 0)
    plt.close(fig)
