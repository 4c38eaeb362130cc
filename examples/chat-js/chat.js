// A chat-room channel: clients join a room by param, messages they post are
// broadcast to the room with the sender's user id, and the room's message
// count lives in the host's key-value store (so it survives a hot reload).
// The same plugin exists in Rust, Python and C beside this folder.
//
// - Misskey: channel `chat-js`, params `{room}`, send `post {text}`.
// - Socket.IO: namespace `/chat-js`, auth `{token, room}`, emit `post {text}`.
// - Every member of the room, sender included, receives `message {userId, text, n}`.
//
// WIT mapping (componentize-js): records are objects with camelCase fields,
// enums are strings, u64/s64 are BigInts, `option<T>` is T or undefined, a
// `result` error is thrown (imports throw, exports throw to refuse).
import {
  join, broadcast, kvGet, kvSet, kvDelete, kvIncr, connectionIdentity, verifyToken, setIdentity,
} from 'chanhost:plugin/host@0.1.0';

const NAME = 'chat-js';

// Where an instance's room is kept: the store outlives guest memory.
const memberKey = (target) => `member:${target.connection}:${target.id}`;

const reject = (message) => ({ message, data: undefined });

function parse(text) {
  try { return JSON.parse(text); } catch { return null; }
}

export const channel = {
  describe() {
    return {
      version: '1.0.0',
      channels: [{ name: NAME, requiresUser: true, shared: false }],
      namespaces: [{ name: `/${NAME}` }],
      frames: [],
    };
  },

  init(_config) {},

  connect(request) {
    const params = parse(request.params) ?? {};
    const room = params.room;
    if (typeof room !== 'string' || room === '') throw reject('a room is required');
    if (request.protocol === 'socketio') {
      // Socket.IO connections start anonymous: check the token.
      if (typeof params.token !== 'string') throw reject('a token is required');
      let who;
      try {
        who = verifyToken(params.token);
        setIdentity(request.target.connection, who);
      } catch (e) {
        throw reject(`invalid token: ${e.payload ?? e.message ?? e}`);
      }
    }
    kvSet(memberKey(request.target), room);
    join(request.target, `${NAME}:${room}`);
  },

  message(target, event, data, _ackId) {
    if (event !== 'post') return;
    let body = parse(data.json);
    // Socket.IO passes the event's arguments as an array.
    if (Array.isArray(body)) body = body[0];
    if (typeof body?.text !== 'string') return;
    const room = kvGet(memberKey(target));
    const who = connectionIdentity(target.connection);
    if (room === undefined || who === undefined) return;
    const n = Number(kvIncr(`count:${room}`, 1n));
    const message = JSON.stringify({ userId: who.userId, text: body.text, n });
    broadcast(`${NAME}:${room}`, 'message', { json: message, attachments: [] }, undefined);
  },

  disconnect(target, _reason) {
    kvDelete(memberKey(target));
  },

  event(_room, _event, _data) {},

  frame(_connection, _kind, _body) {},
};
