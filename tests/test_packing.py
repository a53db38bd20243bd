"""A deployed message's arrays travel as one array (``rcsr_flower.packing``): fewer
objects on the wire, and exactly the same content once unpacked."""

from __future__ import annotations

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from test_strategy import task_identity  # noqa: F401

from rcsr_flower.packing import is_packed, pack, packing_mod, unpack
from rcsr_flower.server.grid import PackingGrid


def adapter_content(seed: int = 0) -> RecordDict:
    """What a train message carries: 32 adapter tensors, a config, and a second
    ArrayRecord between other records (a reply's stats)."""
    g = torch.Generator().manual_seed(seed)
    arrays = {f"layer{i}.{p}": torch.randn(8, 4, generator=g) for i in range(16) for p in "ab"}
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"server-round": 3, "lr": 1e-3}),
            "stats": ArrayRecord(
                {"mask": Array(torch.tensor([1.0, 0.0])), "n": Array(torch.tensor([5]))}
            ),
            "metrics": MetricRecord({"train-loss": 0.5}),
        }
    )


def same(a: RecordDict, b: RecordDict) -> bool:
    if list(a.keys()) != list(b.keys()):
        return False
    for name, record in a.items():
        other = b[name]
        if isinstance(record, ArrayRecord):
            if list(record.keys()) != list(other.keys()):
                return False
            for key, array in record.items():
                o = other[key]
                if (array.dtype, tuple(array.shape), array.stype, array.data) != (
                    o.dtype,
                    tuple(o.shape),
                    o.stype,
                    o.data,
                ):
                    return False
        elif dict(record) != dict(other):
            return False
    return True


def test_packed_content_is_fewer_objects_and_unpacks_to_the_same_bytes(task_identity):  # noqa: F811
    content = adapter_content()
    packed = pack(content)
    assert is_packed(packed) and "arrays" not in packed.array_records
    assert dict(packed["config"]) == dict(content["config"])  # other records as they are
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    packed_msg = Message(packed, dst_node_id=7, message_type=MessageType.TRAIN)
    objects, packed_objects = get_all_nested_objects(msg), get_all_nested_objects(packed_msg)
    assert len(objects) >= 70 and len(packed_objects) <= 8, (len(objects), len(packed_objects))
    # through Flower's own object serialization, as it crosses the wire
    wire = {oid: obj.deflate() for oid, obj in packed_objects.items()}
    received = inflate_object_from_contents(packed_msg.object_id, wire, keep_object_contents=False)
    assert same(unpack(received.content), content)
    restored = unpack(received.content)["arrays"].to_torch_state_dict()
    original = content["arrays"].to_torch_state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)
    # nothing to gain: left alone; and unpacking what was never packed changes nothing
    small = RecordDict({"arrays": ArrayRecord({"x": Array(torch.zeros(2))})})
    assert pack(small) is small and unpack(content) is content


def test_the_clientapp_mod_unpacks_for_the_handler_and_packs_its_reply(task_identity):  # noqa: F811
    seen: list[RecordDict] = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        return Message(adapter_content(seed=1), reply_to=msg)

    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    packed = Message(pack(adapter_content()), dst_node_id=7, message_type=MessageType.TRAIN)
    reply = packing_mod(packed, ctx, handler)
    assert same(seen[-1], adapter_content()) and is_packed(reply.content)
    assert same(unpack(reply.content), adapter_content(seed=1))
    # simulation: nothing is packed, nothing changes either way
    plain = Message(adapter_content(), dst_node_id=7, message_type=MessageType.TRAIN)
    reply = packing_mod(plain, ctx, handler)
    assert seen[-1] is plain.content and not is_packed(reply.content)


def test_the_server_grid_packs_what_it_pushes_and_unpacks_what_it_pulls(task_identity):  # noqa: F811
    class Wire:
        def __init__(self):
            self.pushed: list[Message] = []

        def push_messages(self, messages):
            self.pushed = list(messages)
            return [str(i) for i in range(len(self.pushed))]

        def pull_messages(self, ids):
            return [Message(pack(adapter_content(seed=2)), reply_to=m) for m in self.pushed]

        def get_node_ids(self):
            return [7]

    wire = Wire()
    grid = PackingGrid(wire)
    grid.push_messages([Message(adapter_content(), dst_node_id=7, message_type="train")])
    assert is_packed(wire.pushed[0].content)
    (pulled,) = grid.pull_messages(["0"])
    assert same(pulled.content, adapter_content(seed=2)) and grid.get_node_ids() == [7]
