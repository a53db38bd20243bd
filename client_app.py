"""Flower ClientApp entry point: messages in, ``rcsr_flower.client.handlers`` replies out.

Each handler's work runs in this process, or, on a SuperNode started with
``worker-idle-s`` in its node config, in the node's warm worker
(``rcsr_flower.client.node_worker``), which keeps torch, the backbone and the data loaded
between messages. Nothing here imports torch: a handler pays for it only when it runs
the work itself.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from rcsr_flower.client.node_worker import reply
from rcsr_flower.packing import packing_mod

# a deployed server sends the adapters as one array (rcsr_flower.packing); unpacked here
app = ClientApp(mods=[packing_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(reply("query", msg.content, context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(reply("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(reply("evaluate", msg.content, context), reply_to=msg)
