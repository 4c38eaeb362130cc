"""A chat-room channel: clients join a room by param, messages they post
are broadcast to the room with the sender's user id, and the room's message
count lives in the host's key-value store (so it survives a hot reload).
The same plugin exists in Rust, JavaScript and C beside this folder.

- Misskey: channel `chat-python`, params `{room}`, send `post {text}`.
- Socket.IO: namespace `/chat-python`, auth `{token, room}`, emit `post {text}`.
- Every member of the room, sender included, receives `message {userId, text, n}`.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    ChannelSpec,
    Manifest,
    NamespaceSpec,
    Payload,
    Protocol,
    Rejection,
)

NAME = "chat-python"


def member_key(target):
    # Where an instance's room is kept: the store outlives guest memory.
    return f"member:{target.connection}:{target.id}"


def reject(message):
    return Err(Rejection(message=message, data=None))


class Channel(exports.Channel):
    def describe(self):
        return Manifest(
            version="1.0.0",
            channels=[ChannelSpec(name=NAME, requires_user=True, shared=False)],
            namespaces=[NamespaceSpec(name="/" + NAME)],
            frames=[],
        )

    def init(self, config):
        pass

    def connect(self, request):
        try:
            params = json.loads(request.params)
        except ValueError:
            params = None
        if not isinstance(params, dict):
            params = {}
        room = params.get("room")
        if not isinstance(room, str) or not room:
            raise reject("a room is required")
        if request.protocol == Protocol.SOCKETIO:
            # Socket.IO connections start anonymous: check the token.
            token = params.get("token")
            if not isinstance(token, str):
                raise reject("a token is required")
            try:
                who = host.verify_token(token)
                host.set_identity(request.target.connection, who)
            except Err as e:
                raise reject(f"invalid token: {e.value}")
        host.kv_set(member_key(request.target), room)
        host.join(request.target, f"{NAME}:{room}")

    def message(self, target, event, data, ack_id):
        if event != "post":
            return
        try:
            body = json.loads(data.json)
        except ValueError:
            return
        # Socket.IO passes the event's arguments as an array.
        if isinstance(body, list):
            body = body[0] if body else None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return
        room = host.kv_get(member_key(target))
        who = host.connection_identity(target.connection)
        if room is None or who is None:
            return
        n = host.kv_incr(f"count:{room}", 1)
        message = json.dumps({"userId": who.user_id, "text": body["text"], "n": n})
        host.broadcast(f"{NAME}:{room}", "message", Payload(json=message, attachments=[]), None)

    def disconnect(self, target, reason):
        host.kv_delete(member_key(target))

    def event(self, room, event, data):
        pass

    def frame(self, connection, kind, body):
        pass
