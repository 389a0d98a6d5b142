"""Read a W&B offline run file (`run-<id>.wandb`) with no network.

wandb (0.31) writes no summary JSON offline, only a binary record log: a 7-byte header
(b":W&B", magic, version), then LevelDB-log records in 32 KiB blocks, each
crc32c(4) | length(2, little endian) | type(1: FULL=1 FIRST=2 MIDDLE=3 LAST=4) | payload,
where every payload is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: Path) -> Iterator[bytes]:
    buf = Path(path).read_bytes()
    if buf[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {buf[:7]!r})")
    pos, pending = HEADER, b""
    while pos + 7 <= len(buf):
        left = BLOCK - (pos % BLOCK)
        if left < 7:  # a block's trailer too small for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        data = buf[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield data
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        elif kind == LAST:
            yield pending + data
            pending = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> dict:
    """{"meta": {id, project, name, group, exit_code}, "config", "history": [rows], "summary"}."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, summary, config, meta = [], {}, {}, {}
    for data in iter_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(it): json.loads(it.value_json) for it in record.history.item})
        elif kind == "summary":
            summary.update({_key(it): json.loads(it.value_json) for it in record.summary.update})
        elif kind == "config":
            config.update({_key(it): json.loads(it.value_json) for it in record.config.update})
        elif kind == "run":
            run = record.run
            meta.update(id=run.run_id, project=run.project, name=run.display_name,
                        group=run.run_group, tags=list(run.tags))
            config.update({it.key: json.loads(it.value_json) for it in run.config.update})
        elif kind == "exit":
            meta["exit_code"] = record.exit.exit_code
    config.pop("_wandb", None)
    return {"meta": meta, "config": config, "history": history, "summary": summary}


def find_run_files(run_dir: Path) -> list[Path]:
    """All offline run files under a run folder, oldest first (a resumed run adds one)."""
    return sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
