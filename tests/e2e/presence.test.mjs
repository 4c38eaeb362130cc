// Identity, presence counted per user across connections, and the
// server-side room API, with socket.io-client and misskey-js.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { startHost, barrier, collect, until, jwt, API_KEY } from './helpers.mjs';

function connect(host, opts = {}) {
  const s = io(host.url, { transports: ['websocket'], reconnection: false, forceNew: true, ...opts });
  host.streams.push({ close: () => s.close() });
  return s;
}

function connected(s) {
  return new Promise((resolve, reject) => {
    s.once('connect', resolve);
    s.once('connect_error', reject);
  });
}

async function rooms(host, action, body, key = API_KEY) {
  const headers = { 'content-type': 'application/json' };
  if (key) headers.authorization = `Bearer ${key}`;
  const r = await fetch(`${host.url}/api/rooms/${action}`, { method: 'POST', headers, body: JSON.stringify(body) });
  return { status: r.status, body: await r.json() };
}

describe('presence and server-side rooms', () => {
  let host;
  before(async () => { host = await startHost({ plugins: ['socketio-conformance', 'probe'] }); });
  after(() => host.stop());

  test('a user is online from their first connection to the end of their last', async () => {
    const watcher = connect(host, { auth: { room: 'presence-watchers' } });
    await connected(watcher);
    const changes = collect(watcher, 'presence');
    const tab1 = connect(host);
    const tab2 = connect(host);
    await Promise.all([connected(tab1), connected(tab2)]);
    const first = await tab1.timeout(5000).emitWithAck('identify', 'tok-alice');
    const second = await tab2.timeout(5000).emitWithAck('identify', 'tok-alice');
    assert.equal(first.count, 1);
    assert.equal(second.count, 2);
    assert.deepEqual(await watcher.timeout(5000).emitWithAck('online'), ['alice']);
    const wrong = await tab1.timeout(5000).emitWithAck('identify', 'tok-bob');
    assert.match(wrong.error, /already belongs to user alice/);
    const bad = await tab1.timeout(5000).emitWithAck('identify', 'forged');
    assert.match(bad.error, /unknown token/);

    // Closing one of two tabs keeps alice online (Mew's own map gets this wrong).
    tab1.close();
    const m = host.stream('tok-bob');
    await barrier(m);
    await until(() => changes.some((c) => c.change.userId === 'bob'));
    assert.deepEqual(changes, [
      { status: 'online', change: { userId: 'alice' } },
      { status: 'online', change: { userId: 'bob' } },
    ]);
    assert.deepEqual(await watcher.timeout(5000).emitWithAck('online'), ['alice', 'bob']);
    tab2.close();
    m.close();
    await until(() => changes.length === 4);
    assert.deepEqual(changes.slice(2).map((c) => `${c.status} ${c.change.userId}`).sort(), ['offline alice', 'offline bob']);
    assert.deepEqual(await watcher.timeout(5000).emitWithAck('online'), []);
  });

  test('rooms API: join and leave every connection of a user, or one connection', async () => {
    const a1 = connect(host);
    const a2 = connect(host);
    const other = connect(host);
    await Promise.all([connected(a1), connected(a2), connected(other)]);
    await a1.timeout(5000).emitWithAck('identify', 'tok-alice');
    const { connection: a2conn } = await a2.timeout(5000).emitWithAck('identify', 'tok-alice');
    const got = { a1: collect(a1, 'MESSAGE_CREATE'), a2: collect(a2, 'MESSAGE_CREATE'), other: collect(other, 'MESSAGE_CREATE') };

    const joined = await rooms(host, 'join', { user: 'alice', rooms: ['channel-1', 'server-9'] });
    assert.deepEqual(joined, { status: 200, body: { connections: 2, instances: 2 } });
    await host.publish({ room: 'channel-1', event: 'MESSAGE_CREATE', data: { id: 'm1' } });
    await until(() => got.a1.length === 1 && got.a2.length === 1);

    const left = await rooms(host, 'leave', { connection: a2conn, rooms: ['channel-1'] });
    assert.deepEqual(left.body, { connections: 1, instances: 1 });
    await host.publish({ room: 'channel-1', event: 'MESSAGE_CREATE', data: { id: 'm2' } });
    await host.publish({ room: 'server-9', event: 'MESSAGE_CREATE', data: { id: 'm3' } });
    await until(() => got.a1.length === 3 && got.a2.length === 2);
    assert.deepEqual(got.a1.map((m) => m.id), ['m1', 'm2', 'm3']);
    assert.deepEqual(got.a2.map((m) => m.id), ['m1', 'm3']);
    assert.equal(got.other.length, 0);

    // Narrowing to a namespace, and a user with no connections here.
    const narrowed = await rooms(host, 'join', { user: 'alice', rooms: ['x'], channel: '/custom' });
    assert.deepEqual(narrowed.body, { connections: 2, instances: 0 });
    const nobody = await rooms(host, 'join', { user: 'nobody', rooms: ['x'] });
    assert.deepEqual(nobody.body, { connections: 0, instances: 0 });
  });

  test('rooms API reaches Misskey streams too, narrowed to one channel', async () => {
    const m = host.stream(jwt({ id: 'carol' }));
    const probe = m.useChannel('probe', {});
    const other = m.useChannel('probeShared');
    await barrier(m);
    const got = collect(probe, 'NEWS');
    const gotOther = collect(other, 'NEWS');
    const r = await rooms(host, 'join', { user: 'carol', rooms: ['news'], channel: 'probe' });
    assert.deepEqual(r.body, { connections: 1, instances: 2 }); // the probe channel and the barrier's
    await host.publish({ room: 'news', event: 'NEWS', data: 1 });
    await until(() => got.length === 1);
    await barrier(m);
    assert.equal(gotOther.length, 0);
  });

  test('rooms API refusals', async () => {
    assert.equal((await rooms(host, 'join', { user: 'alice', rooms: ['x'] }, 'wrong')).status, 401);
    for (const [body, msg] of [
      [{ rooms: ['x'] }, /missing `user` or `connection`/],
      [{ user: 'a', connection: 1, rooms: ['x'] }, /not both/],
      [{ user: 'a', rooms: 'x' }, /rooms/],
      [{ user: 'a', rooms: [''] }, /must not be empty/],
      [{ user: 'a', rooms: ['x'], extra: 1 }, /extra/],
    ]) {
      const r = await rooms(host, 'leave', body);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.match(r.body.error, msg);
    }
  });
});
