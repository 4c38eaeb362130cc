// {{name}}: a chanhost channel plugin (JavaScript, componentize-js).
//
// Serves the Misskey channel `{{name}}` and the Socket.IO namespace
// `/{{name}}`. Every instance joins room `{{name}}`; an `echo` message is
// sent back to its sender. The contract is wit/plugin.wit: records are
// objects with camelCase fields, enums strings, u64 BigInts, options
// undefined when absent; a `result` error is thrown.
import { join, send, emit, log } from 'chanhost:plugin/host@0.3.0';

const NAME = '{{name}}';

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
  message(target, event, data, _ackId) {
    if (event !== 'echo') return;
    // Socket.IO (ids are namespaces) passes the arguments as an array.
    if (target.id.startsWith('/')) emit(target, 'echo', data);
    else send(target, 'echo', data);
  },
  disconnect(_target, _reason) {},
  event(_room, _event, _data) {},
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
