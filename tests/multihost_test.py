"""Several processes: `train.py` as 2 processes x 2 fake CPU devices on 127.0.0.1 (gloo) gives
the numbers and the export of 1 process x 4 devices; a SIGTERM stops every process at the same
step, and the rerun resumes to the same export."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
from conftest import ROOT, TINY_CONFIG

import amap_jax
from amap_jax.train import checkpoint

TIMEOUT = 600
# The tiny config, shorter: what is tested is that processes agree, not what they learn.
SHORT = (
    "--config.num_devices=0",
    "--config.train.epochs=0.5",
    "--config.search.epochs=0.5",
    "--config.finetune.epochs=0.25",
    "--config.eval.bench_seconds=0",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, processes: int, devices: int, *extra, envs=None) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(processes):
        cmd = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            f"--config={TINY_CONFIG}",
            f"--workdir={workdir}",
            *SHORT,
            *extra,
        ]
        if processes > 1:
            cmd += [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={i}",
            ]
        e = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), **(envs[i] if envs else {})}
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _finish(procs) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout + stderr))
    return out


def _run(workdir, processes: int, devices: int, *extra):
    results = _finish(_start(workdir, processes, devices, *extra))
    for code, text in results:
        assert code == 0, text[-3000:]
    return results


def _losses(text: str) -> list[tuple[str, dict[str, float]]]:
    """(stage, metrics) of every epoch line of the log."""
    out = []
    for line in text.splitlines():
        if " epoch " in line:
            head, _, tail = line.split(" ", 1)[1].partition(": ")
            out.append((head, {k: float(v) for k, v in (kv.split("=") for kv in tail.split())}))
    return out


def _same_losses(a, b):
    """Equal to the printed digits (4 decimals); a gradient norm may differ in the last one:
    the all-reduce over processes sums in another order."""
    assert [h for h, _ in a] == [h for h, _ in b] and a
    for (_, ma), (_, mb) in zip(a, b, strict=True):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert abs(ma[k] - mb[k]) <= (1e-5 if k != "grad_norm" else 2e-4), (k, ma, mb)


def _export(workdir):
    summary = checkpoint.read_json(os.path.join(workdir, "summary.json"))
    _, variables = amap_jax.load_pruned(os.path.join(workdir, "export"))
    return summary, variables["params"]


def _same_export(a, b):
    sa, pa = _export(a)
    sb, pb = _export(b)
    for key in ("dense", "pruned"):
        assert sa[key]["top1"] == sb[key]["top1"]
    assert sa["masked_top1"] == sb["masked_top1"]
    assert sa["arch"] == sb["arch"]
    flat_a = dict(_leaves(pa))
    flat_b = dict(_leaves(pb))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_allclose(flat_a[k], flat_b[k], atol=1e-5, err_msg=k)


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", np.asarray(v)


def test_two_processes_agree_with_one_and_stop_together(tmp_path):
    """2 processes x 2 devices == 1 process x 4 devices: every logged loss and the export. A
    SIGTERM seen by one process stops both at the same step (exit 75, both saved); the rerun
    of both finishes with the export of the uninterrupted run."""
    one = tmp_path / "one"
    (_, one_text), *_ = _run(one, 1, 4)
    two = tmp_path / "two"
    fault = {"AMAP_FAULT": "SIGTERM@search:5"}  # delivered to process 1 only
    results = _finish(_start(two, 2, 2, envs=[{}, fault]))
    assert [code for code, _ in results] == [75, 75], results[1][1][-3000:]
    stops = [line for _, text in results for line in text.splitlines() if "preempted" in line]
    assert len(stops) == 2 and all("at step 5;" in line for line in stops), stops
    (_, text0), (_, text1) = results
    _same_losses(_losses(text0), _losses(one_text)[: len(_losses(text0))])  # train stage
    assert _losses(text0) and not _losses(text1)  # the chief logs, the others do not
    (_, text0), (_, text1) = _run(two, 2, 2)
    assert "top-1" in text0 and "top-1" not in text1  # the chief prints the summary
    _same_export(one, two)
