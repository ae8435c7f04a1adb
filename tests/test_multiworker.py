"""MultiWorkerMirroredStrategy through the command line: 2 worker processes on loopback.

Two workers with clipping active end with the weights of one process on the
whole batch; killed together mid-epoch and restarted, they end with the weights
of an uninterrupted run; with enough shards each host reads whole files.
"""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from model.network.export import load_export
from tests.fixtures import write_features_dir
from tests.test_data_and_train import ENV, ROOT, train_cmd

pytestmark = pytest.mark.slow

# 40 images -> 60 captions -> 15 steps of 4 per epoch; clipping at 0.05 is active throughout.
# No dropout: each replica draws its own masks, one device one mask for the whole batch.
FLAGS = (
    *("--epochs", "4", "--clip_norm", "0.05", "--learning_rate", "1e-2", "--patience", "0"),
    *("--dropout", "0"),
)


def _free_ports(n: int) -> list[int]:
    """n distinct free ports below the kernel's ephemeral range: a port from that range,
    released for a worker to bind, can be taken first by any connection or server (Beam's
    gRPC servers in the other test process start many), which then fails the worker with
    "Could not start gRPC server"; ports below it are taken only by explicit binds."""
    import random

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    chosen: list[int] = []
    while len(chosen) < n:
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in chosen:
            chosen.append(port)
    return chosen


def start_workers(data, model_dir, n, *extra):
    """Start n workers; each one's output goes to its own log file (a pipe nobody
    reads while another worker is awaited would fill and stall the writer)."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(n)]
    procs = []
    for i in range(n):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        log = open(f"{model_dir}.worker{i}.log", "wb")  # noqa: SIM115 - closed in wait_all
        proc = subprocess.Popen(
            train_cmd(data, model_dir, *extra),
            env={**ENV, "TF_CONFIG": json.dumps(tf_config)} if n > 1 else ENV,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        proc.log = log
        procs.append(proc)
    return procs


def _output(proc) -> str:
    proc.log.close()
    with open(proc.log.name, errors="replace") as f:
        return f.read()


def wait_all(procs, timeout=300):
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
            q.wait()
        pytest.fail("multi-worker training hung:\n" + _logs(procs))
    if any(p.returncode != 0 for p in procs):
        pytest.fail("a worker failed:\n" + _logs(procs))
    return [_output(p) for p in procs]


def _logs(procs) -> str:
    return "\n".join(
        f"--- worker {i} (exit {p.returncode}) ---\n{_output(p)[-3000:]}"
        for i, p in enumerate(procs)
    )


def weights(model_dir):
    model = load_export(str(model_dir / "export")).model
    return {w.path: np.asarray(w) for w in model.weights}


def assert_same_weights(got, expected):
    for path, a in expected.items():
        if path == "decoder/attention/V/bias":
            continue  # softmax ignores it: its gradient is round-off, which Adam normalises
        np.testing.assert_allclose(got[path], a, rtol=1e-4, atol=2e-5, err_msg=path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same command in one process, one device."""
    tmp = tmp_path_factory.mktemp("ref")
    write_features_dir(str(tmp / "f"), {"train": 40})
    (out,) = wait_all(start_workers(tmp / "f", tmp / "m", 1, *FLAGS))
    return tmp / "f", weights(tmp / "m"), out


def checkpoint_steps(model_dir) -> list[int]:
    return [
        int(p.name.split("-")[1].split(".")[0])
        for p in (model_dir / "checkpoints").glob("ckpt-*.index")
    ]


def kill_at_checkpoint(procs, model_dir, step: int) -> None:
    """SIGKILL every worker once the chief has a checkpoint at `step` or later."""
    deadline = time.time() + 240
    while time.time() < deadline:
        if max(checkpoint_steps(model_dir), default=0) >= step:
            break
        if any(p.poll() is not None for p in procs):
            pytest.fail("a worker ended before the kill:\n" + _logs(procs))
        time.sleep(0.02)
    else:
        pytest.fail(f"no checkpoint at step {step} in time:\n" + _logs(procs))
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
        p.log.close()


def test_two_workers_with_clipping_equal_one_process(one_process, tmp_path):
    data, expected, _ = one_process
    outs = wait_all(start_workers(data, tmp_path / "m", 2, *FLAGS))
    assert "on 2 replica(s)" in outs[0]
    manifest = load_export(str(tmp_path / "m" / "export")).manifest
    assert manifest["training"]["replicas"] == 2
    assert manifest["training"]["steps"] == 4 * 15
    assert_same_weights(weights(tmp_path / "m"), expected)


def test_two_workers_killed_at_several_steps_resume_to_the_same_weights(one_process, tmp_path):
    """DATA sharding (2 shards): every worker forms the global batches and keeps its
    slices; killed twice and resumed, two workers end as one process."""
    data, expected, _ = one_process
    cmd = (*FLAGS, "--checkpoint_every", "3", "--steps_per_execution", "1")
    for step in (3, 21):  # epoch 1, batch 3; epoch 2, batch 6
        kill_at_checkpoint(start_workers(data, tmp_path / "m", 2, *cmd), tmp_path / "m", step)
    assert not (tmp_path / "m" / "export").exists()
    outs = wait_all(start_workers(data, tmp_path / "m", 2, *cmd))
    for out in outs:  # every worker restores the chief's checkpoint, at one position
        resumed = [line for line in out.splitlines() if "resumed from" in line]
        assert resumed and os.sep + "checkpoints" + os.sep in resumed[0], out[-2000:]
    assert (
        len(
            {
                line.split(" at step")[1]
                for o in outs
                for line in o.splitlines()
                if "resumed from" in line
            }
        )
        == 1
    )
    manifest = load_export(str(tmp_path / "m" / "export")).manifest
    assert manifest["training"]["steps"] == 4 * 15
    assert [h["epoch"] for h in manifest["training"]["history"]] == [1, 2, 3, 4]
    assert_same_weights(weights(tmp_path / "m"), expected)


def test_two_workers_split_whole_files_when_there_are_enough(tmp_path):
    write_features_dir(str(tmp_path / "f"), {"train": 16}, shards=8)  # 24 captions
    outs = wait_all(start_workers(tmp_path / "f", tmp_path / "m", 2, "--epochs", "2"))
    assert "on 2 replica(s)" in outs[0]
    history = load_export(str(tmp_path / "m" / "export")).manifest["training"]["history"]
    assert [h["pairs"] for h in history] == [24, 24]  # each pair once per epoch, none twice


def test_two_workers_splitting_files_killed_at_several_steps_resume_exactly(tmp_path):
    """FILE sharding: each worker reads 4 of the 8 shards (16 and 32 caption pairs), 2 pairs
    a step; killed mid-epoch at two moments (one an odd step) and resumed, the run ends
    with the steps and the weights of an uninterrupted one."""
    write_features_dir(str(tmp_path / "f"), {"train": 32}, shards=8)  # 48 captions
    cmd = (*FLAGS[:1], "2", *FLAGS[2:], "--checkpoint_every", "3", "--steps_per_execution", "1")
    wait_all(start_workers(tmp_path / "f", tmp_path / "whole", 2, *cmd))
    expected = load_export(str(tmp_path / "whole" / "export")).manifest["training"]
    assert [h["pairs"] for h in expected["history"]] == [48, 48]
    for step in (3, 21):  # epoch 1, step 3; epoch 2, step 5
        kill_at_checkpoint(
            start_workers(tmp_path / "f", tmp_path / "m", 2, *cmd), tmp_path / "m", step
        )
    wait_all(start_workers(tmp_path / "f", tmp_path / "m", 2, *cmd))
    got = load_export(str(tmp_path / "m" / "export")).manifest["training"]
    assert got["steps"] == expected["steps"]
    assert [h["pairs"] for h in got["history"]] == [48, 48]
    assert_same_weights(weights(tmp_path / "m"), weights(tmp_path / "whole"))


# One CE epoch, then one self-critical epoch of 40 images: 8 steps of 8 images x 5 samples.
SCST_FLAGS = (
    *("--epochs", "1", "--scst_epochs", "1", "--batch_size", "40"),
    *("--clip_norm", "0.05", "--learning_rate", "1e-2", "--scst_learning_rate", "1e-2"),
    *("--patience", "0", "--dropout", "0"),
)


def test_two_workers_self_critical_equal_one_process(tmp_path):
    """Each worker samples its half of the images (every row's draws seeded by the step
    and the row), its replica back-propagates them, the gradients are clipped after the
    all-reduce: two workers end with one process's weights. No val split: the export
    is the last step."""
    write_features_dir(str(tmp_path / "f"), {"train": 40})
    (one,) = wait_all(start_workers(tmp_path / "f", tmp_path / "one", 1, *SCST_FLAGS))
    outs = wait_all(start_workers(tmp_path / "f", tmp_path / "two", 2, *SCST_FLAGS))
    assert "on 2 replica(s)" in outs[0] and "self-critical epoch 1/1" in outs[0]
    # Each worker samples only its half of every batch, and the samples are one process's.
    assert "8 images x 5 samples per step (this worker samples 8)" in one
    assert all("8 images x 5 samples per step (this worker samples 4)" in o for o in outs)
    training = load_export(str(tmp_path / "two" / "export")).manifest["training"]
    assert (training["ce_epochs"], training["scst_epochs"], training["steps"]) == (1, 1, 2 + 5)
    expected = weights(tmp_path / "one")
    got = weights(tmp_path / "two")
    assert any(not np.array_equal(got[k], v) for k, v in weights_after_ce(tmp_path).items())
    assert_same_weights(got, expected)


def weights_after_ce(tmp_path):
    """The same command without the self-critical epoch: the SCST step must move away."""
    flags = [f for f in SCST_FLAGS]
    flags[flags.index("--scst_epochs") + 1] = "0"
    wait_all(start_workers(tmp_path / "f", tmp_path / "ce", 1, *flags))
    return weights(tmp_path / "ce")


def test_two_workers_with_validation_and_self_critical_resumed_equal_one_process(tmp_path):
    """With a val split, selection, early-stopping counts and the self-critical start are
    decided once for all workers (the best epoch's weights are part of the checkpoint, not
    a file only the chief writes); val decoding is split between the workers. Killed
    inside the self-critical stage and resumed, two workers end as one process."""
    write_features_dir(str(tmp_path / "f"), {"train": 40, "val": 12})
    flags = [*SCST_FLAGS, "--checkpoint_every", "1", "--steps_per_execution", "1"]
    flags[flags.index("--epochs") + 1] = "3"  # 3 x 2 steps of cross-entropy, then 5 of SCST
    (one,) = wait_all(start_workers(tmp_path / "f", tmp_path / "one", 1, *flags))
    kill_at_checkpoint(
        start_workers(tmp_path / "f", tmp_path / "two", 2, *flags), tmp_path / "two", 8
    )
    outs = wait_all(start_workers(tmp_path / "f", tmp_path / "two", 2, *flags))
    assert all("resumed from" in o and "at step 8" in o for o in outs), outs[0][-2000:]
    expected = load_export(str(tmp_path / "one" / "export")).manifest["training"]
    got = load_export(str(tmp_path / "two" / "export")).manifest["training"]
    assert [h.get("selected") for h in got["history"]] == [
        h.get("selected") for h in expected["history"]
    ]
    for a, b in zip(got["history"], expected["history"], strict=True):
        assert a.get("val_cider") == pytest.approx(b.get("val_cider"), abs=1e-6)
    assert (got["ce_epochs"], got["scst_epochs"], got["steps"]) == (3, 1, 6 + 5)
    assert_same_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))
