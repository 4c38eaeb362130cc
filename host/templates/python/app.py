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


def part(batch, span):
    """The text of a range of a batch."""
    return batch.text[span.start : span.start + span.len].decode()


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
        # Every id, event and JSON text of the batch is in `batch.text`
        # (bytes), each message naming its own by ranges. The answers go
        # back to the host in one `apply` call.
        effects = []
        for m in batch.messages:
            if part(batch, m.event) != "echo":
                continue
            target = Instance(connection=m.connection, id=part(batch, m.id))
            first = m.attachments.start
            data = Payload(
                json=part(batch, m.data),
                attachments=batch.attachments[first : first + m.attachments.len],
            )
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
