"""Test setup: quiet TensorFlow, two logical CPU devices for the distribution tests, and
the GCS emulator for the modules that ask for it."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from model.quiet import import_tensorflow  # noqa: E402

tf = import_tensorflow()  # without the CUDA/absl start-up lines in every xdist worker

# Must happen before TensorFlow initialises its devices; MirroredStrategy tests
# use both, everything else runs on CPU:0 as usual.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

_strategies: dict[tuple[str, ...], tf.distribute.MirroredStrategy] = {}


def mirrored(*devices: str) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per device set for the whole session.

    Two strategies over the same devices in one process number their collectives
    from the same start, and TensorFlow caches a collective by its keys: a later
    strategy's all-reduce then meets an earlier model's shapes.
    """
    if devices not in _strategies:
        _strategies[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _strategies[devices]


# The longest test files, first: with `pytest -n 2 --dist loadfile` one worker takes
# each of them while the other works through the rest, and both finish together.
LONGEST_FIRST = (  # 300, 295, 235 and 210 s on 2 cores (2026-12-06)
    "tests/test_caption_table.py",
    "tests/test_multiworker.py",
    "tests/test_gcs.py",
    "tests/test_data_and_train.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file is kept


GCS_BUCKET = "captioning"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator (JSON and XML APIs) for this module's tests, and the environment that
    points every client at it (set in this process while the module runs)."""
    from tests.gcs import environment, gcs_emulator

    with gcs_emulator(tmp_path_factory.mktemp("gcs"), GCS_BUCKET) as env, environment(env):
        yield env
