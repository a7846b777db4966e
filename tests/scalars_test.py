"""Scalars for TensorBoard and their JSON-lines copy."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2

from amap_jax.train import scalars


def read_events(logdir: str) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TFRecord event files under `logdir`."""
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_resumed_stage_drops_its_lines_past_the_checkpoint(tmp_path):
    w = scalars.Scalars(str(tmp_path), "train", 0)
    for step in range(1, 11):
        w.write(step, {"loss": 1.0 / step}, epoch=step / 5)
    w.close()
    s = scalars.Scalars(str(tmp_path), "search", 0)
    s.write(3, {"macs_ratio": 0.7})
    s.close()
    again = scalars.Scalars(str(tmp_path), "train", 6)  # resumed from the step-6 checkpoint
    again.write(7, {"loss": 0.5})
    again.close()
    lines = scalars.read(str(tmp_path))
    train = [(r["step"], r["loss"]) for r in lines if r["stage"] == "train"]
    assert train == [(s, 1.0 / s) for s in range(1, 7)] + [(7, 0.5)]
    assert [r for r in lines if r["stage"] == "search"] == [
        {"stage": "search", "step": 3, "macs_ratio": 0.7}
    ]
    events = read_events(os.path.join(tmp_path, scalars.EVENTS))
    assert ("search/macs_ratio", 3, 0.699999988079071) in events
    assert [e for e in events if e[0] == "train/loss" and e[1] == 10]


def test_only_the_chief_writes(tmp_path):
    w = scalars.Scalars(str(tmp_path), "train", 0, enabled=False)
    w.write(1, {"loss": 1.0})
    w.close()
    assert os.listdir(tmp_path) == []
