"""{{name}}: a chanhost channel plugin (Python, componentize-py).

Serves the Misskey channel `{{name}}` and the Socket.IO namespace
`/{{name}}`. Every instance joins room `{{name}}`; an `echo` message is sent
back to its sender. The contract is wit/plugin.wit; a `result` error is
raised as `componentize_py_types.Err`.
"""

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    ChannelSpec,
    Delivery,
    Effect_Emit,
    Effect_Send,
    Instance,
    LogLevel,
    Manifest,
    NamespaceSpec,
    Payload,
)

NAME = "{{name}}"


def batch_messages(batch):
    """The messages of a packed batch, in order, as (target, event, data,
    ack_id): every id, event and JSON text is in `batch.text` (bytes), and
    `batch.words` has twelve words per message (see `message-batch` in
    wit/plugin.wit)."""
    w, text, attachment = batch.words, batch.text, 0

    def part(i):
        return text[w[i] : w[i] + w[i + 1]].decode()

    for i in range(0, len(w) - 11, 12):
        n = w[i + 8]
        target = Instance(connection=w[i] | w[i + 1] << 32, id=part(i + 2))
        data = Payload(json=part(i + 6), attachments=batch.attachments[attachment : attachment + n])
        attachment += n
        ack_id = w[i + 10] | w[i + 11] << 32 if w[i + 9] else None
        yield target, part(i + 4), data, ack_id


class Channel(exports.Channel):
    def describe(self):
        return Manifest(
            version="0.1.0",
            channels=[ChannelSpec(name=NAME, requires_user=False, shared=False)],
            namespaces=[NamespaceSpec(name="/" + NAME)],
            frames=[],
        )

    def init(self, config):
        pass

    def connect(self, request):
        host.log(LogLevel.INFO, f"{request.target.connection} opened {request.channel}")
        host.join(request.target, NAME)

    def messages(self, batch):
        # Clients' messages, in the order they came: every message that
        # waited while the plugin was busy (one alone when it was not).
        # The answers go back to the host in one `apply` call.
        effects = []
        for target, event, data, _ack_id in batch_messages(batch):
            if event != "echo":
                continue
            delivery = Delivery(target=target, event="echo", data=data)
            # Socket.IO (ids are namespaces) passes the arguments as an array.
            if target.id.startswith("/"):
                effects.append(Effect_Emit(delivery))
            else:
                effects.append(Effect_Send(delivery))
        if effects:
            host.apply(effects)

    def disconnect(self, target, reason):
        pass

    def events(self, batch):
        # Events of rooms the plugin listens to, in order, batched like
        # messages (this skeleton listens to none).
        pass

    def frame(self, connection, kind, body):
        pass

    def fetched(self, id, response):
        # The answer to a `host.fetch` (this skeleton starts none).
        pass

    def timer(self, key):
        # A timer set with `host.set_timer` is due (this skeleton sets none).
        pass

    def recover(self, request):
        # A Socket.IO socket back within `[socketio.recovery]
        # max_disconnection_ms` of losing its connection, instead of a second
        # `connect`: the host restored its rooms and identity and replays
        # what it missed. Raising `Err` refuses it.
        host.log(LogLevel.INFO, f"{request.socket_id} came back after {request.away_ms} ms")
