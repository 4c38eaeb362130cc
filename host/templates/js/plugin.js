// {{name}}: a chanhost channel plugin (JavaScript, componentize-js).
//
// Serves the Misskey channel `{{name}}` and the Socket.IO namespace
// `/{{name}}`. Every instance joins room `{{name}}`; an `echo` message is
// sent back to its sender. The contract is wit/plugin.wit: records are
// objects with camelCase fields, enums strings, u64 BigInts, options
// undefined when absent; a `result` error is thrown.
import { join, apply, log } from 'chanhost:plugin/host@0.4.0';

const NAME = '{{name}}';
const utf8 = new TextDecoder();

/** The text of a range of a batch. */
const part = (batch, span) => utf8.decode(batch.text.subarray(span.start, span.start + span.len));

export const channel = {
  describe() {
    return {
      version: '0.1.0',
      channels: [{ name: NAME, requiresUser: false, shared: false }],
      namespaces: [{ name: `/${NAME}` }],
      frames: [],
    };
  },
  init(_config) {},
  connect(request) {
    log('info', `${request.target.connection} opened ${request.channel}`);
    join(request.target, NAME);
  },
  // Clients' messages, in the order they came: every message that waited
  // while the plugin was busy (one alone when it was not). Every id, event
  // and JSON text of the batch is in `batch.text` (bytes), each message
  // naming its own by ranges. The answers go back to the host in one
  // `apply` call.
  messages(batch) {
    const effects = [];
    for (const m of batch.messages) {
      if (part(batch, m.event) !== 'echo') continue;
      const target = { connection: m.connection, id: part(batch, m.id) };
      const first = m.attachments.start;
      const data = {
        json: part(batch, m.data),
        attachments: batch.attachments.slice(first, first + m.attachments.len),
      };
      // Socket.IO (ids are namespaces) passes the arguments as an array.
      const tag = target.id.startsWith('/') ? 'emit' : 'send';
      effects.push({ tag, val: { target, event: 'echo', data } });
    }
    if (effects.length > 0) apply(effects);
  },
  disconnect(_target, _reason) {},
  // Events of rooms the plugin listens to, in order, batched like messages
  // (this skeleton listens to none).
  events(_batch) {},
  frame(_connection, _kind, _body) {},
  // The answer to a `fetch` (this skeleton starts none).
  fetched(_id, _response) {},
  // A timer set with `setTimer` is due (this skeleton sets none).
  timer(_key) {},
  // A Socket.IO socket back within `[socketio.recovery]
  // max_disconnection_ms` of losing its connection, instead of a second
  // `connect`: the host restored its rooms and identity and replays what
  // it missed. Throwing refuses it.
  recover(request) {
    log('info', `${request.socketId} came back after ${request.awayMs} ms`);
  },
};
