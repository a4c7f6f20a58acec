"""Read an offline W&B run (``wandb/offline-run-*/run-*.wandb``) back, without a server.

W&B writes a run as a LevelDB-style log of protobuf ``Record`` messages: a 7-byte file header
(``:W&B``, a 2-byte magic, a version byte), then 32 KiB blocks of chunks, each with a 7-byte
header (CRC32C, little-endian length, type: full / first / middle / last). Tests and notebooks
use this to check what a run logged (config, every loss term, group) with ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FILE_HEADER = 7
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline run recorded."""

    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    job_type: str = ""
    name: str = ""
    artifacts: list[dict[str, str]] = field(default_factory=list)
    """``{"name", "type"}`` of each artifact the run logged (e.g. a ``model`` checkpoint)."""
    directory: Path | None = None

    @property
    def metric_keys(self) -> set[str]:
        return {k for row in self.history for k in row if not k.startswith("_")}


def _records(data: bytes):
    position, pending = _FILE_HEADER, b""
    while position + _CHUNK_HEADER <= len(data):
        block_left = _BLOCK - position % _BLOCK
        if block_left < _CHUNK_HEADER:  # trailer padding at the end of a block
            position += block_left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        if kind == 0 and length == 0:  # zero padding
            position += block_left
            continue
        chunk = data[position + _CHUNK_HEADER : position + _CHUNK_HEADER + length]
        position += _CHUNK_HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse ``run_dir`` (an ``offline-run-*`` folder, or the ``.wandb`` file itself)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(run_dir)
    files = [path] if path.is_file() else sorted(path.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {str(path)!r}")
    data = files[0].read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{str(files[0])!r} is not a W&B run file")
    run = OfflineRun(directory=files[0].parent)
    for raw in _records(data):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group, run.job_type, run.name = (
                record.run.run_group,
                record.run.job_type,
                record.run.display_name,
            )
            for item in record.run.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append(
                {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            run.artifacts.append({"name": record.artifact.name, "type": record.artifact.type})
    return run


def read_offline_runs(wandb_dir: str | Path) -> list[OfflineRun]:
    """Every ``offline-run-*`` under ``wandb_dir`` (a ``wandb`` folder), oldest first."""
    folders = sorted(Path(wandb_dir).rglob("offline-run-*"))
    return [read_offline_run(f) for f in folders if f.is_dir()]


def read_table(run: OfflineRun, key: str) -> list[dict[str, Any]]:
    """Rows of a ``wandb.Table`` the run logged under ``key`` (read from the run's files)."""
    for row in run.history:
        value = row.get(key)
        if not isinstance(value, dict):  # nested values arrive flattened: "<key>/_type", ...
            value = {k[len(key) + 1 :]: v for k, v in row.items() if k.startswith(key + "/")}
        if value.get("_type") == "table-file":
            path = run.directory / "files" / value["path"]
            data = json.loads(path.read_text())
            return [dict(zip(data["columns"], values, strict=True)) for values in data["data"]]
    raise KeyError(f"no table {key!r} in the run's history; keys: {sorted(run.metric_keys)}")
