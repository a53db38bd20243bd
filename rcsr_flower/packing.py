"""One array per message on the wire instead of one per tensor (deployment only).

Flower moves a message as a tree of objects (the message, each record, each ``Array``,
each of its chunks) and a SuperNode or ServerApp fetches or sends each object with a
request of its own, two at a time on a 2-core machine. The retrieval app's adapters are
32 tensors, so a train message and its reply are some 70 objects each: 2–3.5 s to receive
or send 0.5 MB on loopback here, most of a deployed round's overhead (docs/deployment.md,
"Per-message start-up"). Packed, a message's arrays travel as one ``Array`` (their
serialized bytes, back to back) beside a ``ConfigRecord`` that says where each one was.

The bytes of every ``Array`` are moved, never converted, so an unpacked message holds
exactly what was packed. The server packs what it sends and unpacks what it pulls
(``rcsr_flower.server.grid.PackingGrid``, a layer of a deployed run's grid); the
ClientApp's :func:`packing_mod` unpacks a packed message before the handler sees it and
packs the reply. A message that
was not packed (simulation: no wire) passes through untouched both ways.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

PACKED = "rcsr-packed"  # the RecordDict key of the one ArrayRecord a packed message has
LAYOUT = "rcsr-packed-layout"  # ... and of the ConfigRecord that says where each array was


def is_packed(content: RecordDict) -> bool:
    return PACKED in content.array_records and LAYOUT in content.config_records


def pack(content: RecordDict) -> RecordDict:
    """``content`` with the arrays of all its ArrayRecords in one ``Array``; the other
    records as they are. Returned as it is when it holds fewer than two arrays."""
    records = content.array_records
    if sum(len(r) for r in records.values()) < 2 or is_packed(content):
        return content
    blobs: list[bytes] = []
    layout: dict[str, list] = {}
    offset = 0
    for name, record in records.items():
        entries = []
        for key, array in record.items():
            size = len(array.data)
            entries.append([key, array.dtype, list(array.shape), array.stype, offset, size])
            blobs.append(array.data)
            offset += size
        layout[name] = entries
    packed = RecordDict()
    for name, record in content.items():
        if name not in records:
            packed[name] = record
    blob = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    packed[PACKED] = ArrayRecord({"bytes": Array(blob)})
    order = list(content.keys())
    packed[LAYOUT] = ConfigRecord({"layout": json.dumps(layout), "order": json.dumps(order)})
    return packed


def unpack(content: RecordDict) -> RecordDict:
    """What :func:`pack` was given, record for record and byte for byte; ``content`` as
    it is when it was not packed."""
    if not is_packed(content):
        return content
    blob = content.array_records[PACKED]["bytes"].numpy().tobytes()
    meta = content.config_records[LAYOUT]
    layout = json.loads(str(meta["layout"]))
    arrays = {
        name: ArrayRecord(
            {
                key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blob[at : at + size])
                for key, dtype, shape, stype, at, size in entries
            }
        )
        for name, entries in layout.items()
    }
    out = RecordDict()
    for name in json.loads(str(meta["order"])):
        out[name] = arrays[name] if name in arrays else content[name]
    return out


def pack_message(msg: Message) -> Message:
    """``msg`` with its content packed (:func:`pack`), in place."""
    if msg.has_content():
        msg.content = pack(msg.content)
    return msg


def unpack_message(msg: Message) -> Message:
    """``msg`` with its content unpacked (:func:`unpack`), in place."""
    if msg.has_content():
        msg.content = unpack(msg.content)
    return msg


def packing_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """ClientApp mod: a packed message is unpacked for the handler and its reply packed;
    anything else passes through as it is."""
    if not (msg.has_content() and is_packed(msg.content)):
        return call_next(msg, context)
    reply = call_next(unpack_message(msg), context)
    return pack_message(reply)
