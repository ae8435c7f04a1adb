"""Packaging for the Show-Attend-Tell captioning system.

Dataflow workers install the code with ``--setup_file ./setup.py``.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.15,<4",
    # The [tfrecord] extra brings crcmod etc. that WriteToTFRecord needs since 2.70.
    "apache-beam[tfrecord]>=2.77,<2.78",
    "pyarrow>=17",
    "pillow>=10",
    "numpy>=1.26,<3",
    "matplotlib>=3.8",
    "google-crc32c>=1.5",  # TFRecord checksums (beam_jobs.tfrecord_sink)
    "isal>=1.6",  # ISA-L gzip for feature shards, 20x faster than zlib's default level
    "deltalake>=1.6.6,<1.7",  # the caption table (delta-rs: commits, stats, vacuum; no JVM)
    "urllib3>=2.2",  # http(s) inputs (model.images.fetch): pooled, read1 for the deadline
]

# Workers (Dataflow installs install_requires through --setup_file) need neither.
TRAIN_REQUIRES = [
    "tensorboard>=2.19",  # model.train: tf.summary needs it; TF 2.21 no longer pulls it in
    "pycocoevalcap>=1.2,<2",  # model.evaluate: BLEU, METEOR, ROUGE-L, CIDEr
]

# `python -m beam_jobs.caption_table sql`: DuckDB reads the caption table with its `delta`
# extension, which PyPI ships per DuckDB version, so the pair is pinned together and
# loaded from the package (nothing downloaded at run time).
QUERY_REQUIRES = ["duckdb==1.5.5", "duckdb-extension-delta==1.5.5"]
# --runtime openvino: InceptionV3 on CPUs about twice as fast (model.images.runtimes).
OPENVINO_REQUIRES = ["openvino==2026.4.1", "nncf==3.4.0"]  # nncf: int8 calibration

EXTRAS_REQUIRE = {
    "query": QUERY_REQUIRES,
    "openvino": OPENVINO_REQUIRES,
    "train": TRAIN_REQUIRES,
    # gs:// in the Beam jobs (GcsIO) and the Dataflow runner; TensorFlow reads gs:// itself.
    "gcp": ["apache-beam[gcp]>=2.77,<2.78"],
    # [gcp] lets the tests translate both jobs for Dataflow with --dry_run.
    "test": [
        *TRAIN_REQUIRES,
        "pytest>=8",
        "pytest-timeout",
        "pytest-xdist",  # make test: two workers, one test file each at a time
        "gcp-storage-emulator>=2026.7",  # tests/test_gcs.py: every stage on gs://
        "cryptography",  # tests/gcs.py: the TLS proxy's throw-away CA
        *QUERY_REQUIRES,
        *OPENVINO_REQUIRES,
        "duckdb-extension-httpfs==1.5.5",  # gs:// for DuckDB (tests/test_gcs.py)
        "pandas>=2",  # the docs' pandas reader of the caption table
        "polars>=1.30",  # the docs' polars reader of the caption table
        "scikit-image>=0.22",  # real photos for the converted weights' batch-norm check
        "ruff>=0.6",
        "apache-beam[gcp]>=2.77,<2.78",
    ],
}

setup(
    name="show-attend-tell",
    version="0.1.0",
    description="Show, Attend and Tell image captioning: Beam feature extraction, "
    "tf.distribute training and bulk captioning to Parquet.",
    python_requires=">=3.11",
    packages=find_packages(include=["model", "model.*", "beam_jobs", "beam_jobs.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
