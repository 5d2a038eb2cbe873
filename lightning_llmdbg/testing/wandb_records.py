"""Read back a W&B offline run file (``wandb/offline-run-*/run-<id>.wandb``).

wandb 0.31 ships no Python reader (``sdk/internal/datastore.py`` is gone; the Go
``wandb-core`` writes the file), so the format is decoded here: 7-byte header
``b":W&B" <H 0xBEE1> <B 0>``, then a LevelDB log: 32 KiB blocks of chunks
``<I crc32(type+payload)> <H len> <B type> payload`` (FULL=1 FIRST=2 MIDDLE=3
LAST=4, <7 spare bytes at a block end are zero padding); each record is a
serialized ``wandb.proto.wandb_internal_pb2.Record``. A torn/unflushed tail ends
iteration quietly. Data is only fully on disk after ``run.finish()`` (or exit).
"""
from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from typing import Any, Iterator

_BLOCK, _HDR = 32768, 7


def iter_records(path: str) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:4] != b":W&B" or buf[4:6] != struct.pack("<H", 0xBEE1):
        raise ValueError(f"{path}: not a W&B run file")
    pos, parts = _HDR, None
    while True:
        if _BLOCK - pos % _BLOCK < _HDR:  # a block's last few bytes are zero padding
            pos += _BLOCK - pos % _BLOCK
        if pos + _HDR > len(buf):
            return
        crc, n, typ = struct.unpack_from("<IHB", buf, pos)
        end = pos + _HDR + n
        if typ not in (1, 2, 3, 4) or end > len(buf) or zlib.crc32(buf[pos + 6:end]) != crc:
            return  # zero fill, torn or unflushed tail
        data, pos = buf[pos + _HDR:end], end
        parts = [data] if typ in (1, 2) else (parts + [data] if parts is not None else None)
        if typ in (1, 4) and parts is not None:
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = None
            yield rec


def _put(d: dict, item: Any) -> None:
    """wandb-core flattens nested values (Histogram, Table refs) into leaf items whose
    ``nested_key`` is the path, in no fixed order; rebuild the nested dict."""
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        d = d.setdefault(k, {})
    if item.value_json:
        val = json.loads(item.value_json)
    else:  # opt-in "typed" history encoding (x_history_value_encoding="json,typed")
        kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
        val = json.loads(item.json) if kind == "json" else getattr(item, kind) if kind and kind != "none" else None
    d[path[-1]] = val


def find_run_file(path: str) -> str:
    """Accept a .wandb file, a run dir, a ``wandb/`` dir or a save_dir (newest run wins)."""
    if os.path.isfile(path):
        return path
    hits = [h for pat in ("*.wandb", "*run-*/*.wandb", "wandb/*run-*/*.wandb")
            for h in glob.glob(os.path.join(path, pat))]
    if not hits:
        raise FileNotFoundError(f"no run-*.wandb under {path}")
    return max(hits, key=os.path.getmtime)


def read_wandb_run(path: str) -> dict:
    """-> {"history": [row], "alerts": [dict], "summary": dict, "artifacts": [dict], "finished": bool,
    "exit_code": int | None}; rows are nested dicts keyed by logged key, incl. "_step"; artifacts (in
    logging order) are {"name", "type", "files": {path in artifact: local staged path}}."""
    out: dict = {"history": [], "alerts": [], "summary": {}, "artifacts": [], "finished": False, "exit_code": None}
    for rec in iter_records(find_run_file(path)):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict = {}
            for it in rec.history.item:
                _put(row, it)
            row.setdefault("_step", rec.history.step.num)
            out["history"].append(row)
        elif kind == "alert":
            a = rec.alert  # wait_duration is in milliseconds
            out["alerts"].append(dict(title=a.title, text=a.text, level=a.level, wait_duration=a.wait_duration))
        elif kind == "summary":
            for it in rec.summary.update:
                _put(out["summary"], it)
            for it in rec.summary.remove:  # top-level removal only
                out["summary"].pop(it.key or it.nested_key[0], None)
        elif kind == "artifact":  # e.g. a logged wandb.Table: its JSON and media, staged on this machine
            a = rec.artifact
            files = {e.path: e.local_path for e in a.manifest.contents}
            out["artifacts"].append(dict(name=a.name, type=a.type, files=files))
        elif kind == "exit":  # written only when the run is finished
            out["finished"], out["exit_code"] = True, rec.exit.exit_code
    return out


def read_finished_run(path: str, timeout: float = 10.0) -> dict:
    """read_wandb_run, polling until the exit record is on disk: ``run.finish()`` can
    return before wandb-core has written the file's tail (seen: 7 of 30 runs)."""
    deadline = time.monotonic() + timeout
    while True:
        out = read_wandb_run(path)
        if out["finished"] or time.monotonic() > deadline:
            return out
        time.sleep(0.02)
