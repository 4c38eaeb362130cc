// Socket.IO against a running host with the official client
// (socket.io-client) over every transport, served by the conformance plugin.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { startHost, barrier, collect, until } from './helpers.mjs';

const TRANSPORTS = [['websocket'], ['polling'], ['polling', 'websocket']];

function connect(host, nsp = '/', opts = {}) {
  const s = io(`${host.url}${nsp}`, { reconnection: false, forceNew: true, ...opts });
  host.streams.push({ close: () => s.close() });
  return s;
}

function once(emitter, event, timeout = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${event} within ${timeout} ms`)), timeout);
    emitter.once(event, (...args) => { clearTimeout(t); resolve(args); });
  });
}

describe('socket.io-client', () => {
  let host;
  before(async () => {
    host = await startHost({
      plugins: ['socketio-conformance', 'probe'],
      config: '[socketio]\nping_interval_ms = 200\nping_timeout_ms = 400\n',
    });
  });
  after(() => host.stop());

  for (const transports of TRANSPORTS) {
    const name = transports.join('+');
    describe(`transport ${name}`, () => {
      test('connects with auth; the plugin sees the auth payload', async () => {
        const s = connect(host, '/', { transports, auth: { token: 'abc', n: 1 } });
        const [auth] = await once(s, 'auth');
        assert.deepEqual(auth, { token: 'abc', n: 1 });
        assert.ok(s.connected);
        assert.ok(s.id);
        if (transports.length === 2) await until(() => s.io.engine.transport.name === 'websocket', 5000, 'upgrade');
        // Several heartbeats pass without the client dropping the connection.
        const pings = [];
        s.io.engine.on('ping', () => pings.push(1));
        await until(() => pings.length >= 3, 5000, 'three pings');
        assert.ok(s.connected);
      });

      test('events and acks carry every argument, binary included', async () => {
        const s = connect(host, '/', { transports });
        await once(s, 'connect');
        const back = once(s, 'message-back');
        s.emit('message', 1, '2', { 3: '4', 5: Buffer.from([6]) });
        const args = await back;
        assert.equal(args.length, 3);
        assert.equal(args[0], 1);
        assert.equal(args[1], '2');
        assert.equal(args[2][3], '4');
        assert.ok(Buffer.isBuffer(args[2][5]));
        assert.deepEqual([...args[2][5]], [6]);
        const ack = await s.timeout(5000).emitWithAck('message-with-ack', Buffer.from([1, 2, 3]), 'x');
        assert.deepEqual([...ack], [1, 2, 3]);
        const plain = await s.timeout(5000).emitWithAck('message-with-ack', { a: [1, { b: null }] });
        assert.deepEqual(plain, { a: [1, { b: null }] });
      });

      test('namespaces are multiplexed; an unknown one is refused', async () => {
        const root = connect(host, '/', { transports, auth: { who: 'root' } });
        const custom = root.io.socket('/custom', { auth: { who: 'custom' } });
        const [[a], [b]] = await Promise.all([once(root, 'auth'), once(custom, 'auth')]);
        assert.deepEqual([a.who, b.who], ['root', 'custom']);
        assert.equal(root.io.engine.id, custom.io.engine.id, 'one Engine.IO session');
        const back = once(custom, 'message-back');
        custom.emit('message', 'on custom');
        assert.deepEqual(await back, ['on custom']);
        const nope = root.io.socket('/nope');
        const [err] = await once(nope, 'connect_error');
        assert.equal(err.message, 'Invalid namespace');
        assert.ok(root.connected && custom.connected, 'others unaffected');
      });

      test('a plugin refusal is a connect_error with message and data', async () => {
        const s = connect(host, '/', { transports, auth: { reject: { code: 42 } } });
        const [err] = await once(s, 'connect_error');
        assert.equal(err.message, 'rejected');
        assert.deepEqual(err.data, { code: 42 });
      });

      test('server-side disconnect, and reconnect after a lost transport', async () => {
        const s = connect(host, '/', { transports });
        await once(s, 'connect');
        const gone = once(s, 'disconnect');
        s.emit('disconnect-me');
        const [reason] = await gone;
        assert.equal(reason, 'io server disconnect');

        const r = connect(host, '/', { transports, reconnection: true, reconnectionDelay: 50, auth: { again: true } });
        const auths = collect(r, 'auth');
        await until(() => auths.length === 1, 5000, 'first auth');
        const firstId = r.id;
        const reconnected = once(r, 'connect');
        r.io.engine.close(); // the transport drops: the client reconnects by itself
        await reconnected;
        assert.notEqual(r.id, firstId);
        await until(() => auths.length === 2, 5000, 'auth after reconnect');
        assert.deepEqual(auths[1], { again: true });
      });

      test('a plugin can close the whole connection', async () => {
        const s = connect(host, '/', { transports });
        const c = s.io.socket('/custom');
        // Both replies may arrive in one read: listen for both first.
        await Promise.all([once(s, 'connect'), once(c, 'connect')]);
        const gone = [once(s, 'disconnect'), once(c, 'disconnect')];
        s.emit('close-me');
        const [[r1], [r2]] = await Promise.all(gone);
        assert.deepEqual([r1, r2], ['io server disconnect', 'io server disconnect']);
      });
    });
  }

  test('plugins verify tokens with the host\'s providers', async () => {
    const s = connect(host, '/', { transports: ['websocket'] });
    await once(s, 'connect');
    assert.deepEqual(await s.timeout(5000).emitWithAck('verify', 'tok-alice'), { userId: 'alice' });
    const bad = await s.timeout(5000).emitWithAck('verify', 'nope');
    assert.match(bad.error, /unknown token/);
  });

  test('rooms: broadcast to a room, or to all but the sender', async () => {
    const a = connect(host, '/', { transports: ['websocket'], auth: { room: 'sio-room' } });
    const b = connect(host, '/', { transports: ['polling'], auth: { room: 'sio-room' } });
    await Promise.all([once(a, 'auth'), once(b, 'auth')]);
    const gotA = collect(a, 'hello');
    const gotB = collect(b, 'hello');
    a.emit('broadcast', { room: 'sio-room', event: 'hello', data: 1, exceptSelf: true });
    a.emit('broadcast', { room: 'sio-room', event: 'hello', data: 2 });
    await until(() => gotB.length === 2 && gotA.length === 1);
    assert.deepEqual(gotB, [1, 2]);
    assert.deepEqual(gotA, [2]);
  });

  test('one publish reaches Socket.IO and Misskey members of the same room', async () => {
    const s = connect(host, '/', { transports: ['websocket'], auth: { room: 'shared-room' } });
    await once(s, 'auth');
    const m = host.stream();
    const ch = m.useChannel('probe', { room: 'shared-room' });
    await barrier(m);
    const sioGot = once(s, 'news');
    const mkGot = once(ch, 'news');
    const r = await host.publish({ room: 'shared-room', event: 'news', data: { headline: 'both' } });
    assert.equal(r.body.published, 1);
    assert.deepEqual(await sioGot, [{ headline: 'both' }]);
    assert.deepEqual(await mkGot, [{ headline: 'both' }]);
  });
});
