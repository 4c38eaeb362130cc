"""{{name}}: a chanhost channel plugin (Python, componentize-py).

Serves the Misskey channel `{{name}}` and the Socket.IO namespace
`/{{name}}`. Every instance joins room `{{name}}`; an `echo` message is sent
back to its sender. The contract is wit/plugin.wit; a `result` error is
raised as `componentize_py_types.Err`.
"""

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import ChannelSpec, LogLevel, Manifest, NamespaceSpec

NAME = "{{name}}"


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

    def message(self, target, event, data, ack_id):
        if event != "echo":
            return
        # Socket.IO (ids are namespaces) passes the arguments as an array.
        if target.id.startswith("/"):
            host.emit(target, "echo", data)
        else:
            host.send(target, "echo", data)

    def disconnect(self, target, reason):
        pass

    def event(self, room, event, data):
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
