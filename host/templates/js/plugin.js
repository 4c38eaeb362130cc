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
const u64 = (low, high) => BigInt(low) | (BigInt(high) << 32n);

// The messages of a packed batch, in order: every id, event and JSON text
// is in `batch.text` (bytes), and `batch.words` has twelve words per
// message (see `message-batch` in wit/plugin.wit).
function* batchMessages({ text, words, attachments }) {
  const part = (i) => utf8.decode(text.subarray(words[i], words[i] + words[i + 1]));
  let attachment = 0;
  for (let i = 0; i + 12 <= words.length; i += 12) {
    const n = words[i + 8];
    yield {
      target: { connection: u64(words[i], words[i + 1]), id: part(i + 2) },
      event: part(i + 4),
      data: { json: part(i + 6), attachments: attachments.slice(attachment, attachment + n) },
      ackId: words[i + 9] ? u64(words[i + 10], words[i + 11]) : undefined,
    };
    attachment += n;
  }
}

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
  // while the plugin was busy (one alone when it was not). The answers go
  // back to the host in one `apply` call.
  messages(batch) {
    const effects = [];
    for (const { target, event, data } of batchMessages(batch)) {
      if (event !== 'echo') continue;
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
