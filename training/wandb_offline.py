"""Read back the history of an offline W&B run (wandb 0.31 has no Python API for local runs).

The `.wandb` file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32 4, length 2, type 1: full / first / middle / last), whose payloads are
`wandb_internal_pb2.Record` protobufs. Used by tests and to show what a run sent to W&B.
"""
import glob
import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_runs(run_dir: Path) -> list[Path]:
    """The .wandb files under a run folder, oldest first."""
    return sorted(Path(p) for p in glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*" / "run-*.wandb")))


def read_records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file.")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:
            break
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def read_history(path: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of one offline run; values are decoded from JSON."""
    from wandb.proto import wandb_internal_pb2 as pb

    config, rows = {}, []
    for raw in read_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            for item in record.run.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config, rows


def has_exit_record(path: Path) -> bool:
    """Whether an offline run file is complete: its last record is wandb's `exit` record."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        records = read_records(path)
    except (OSError, ValueError, struct.error):
        return False
    if not records:
        return False
    last = pb.Record()
    last.ParseFromString(records[-1])
    return last.WhichOneof("record_type") == "exit"


def wait_until_written(folder: Path, timeout: float = 120.0) -> bool:
    """Wait (up to `timeout` s) until the offline run in `folder` has its exit record: wandb's service can still be
    writing the file after run.finish() returns on a loaded machine. True when complete."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(Path(folder).glob("run-*.wandb"))
        if files and has_exit_record(files[-1]):
            return True
        time.sleep(0.2)
    return False
