// Misskey's own event bus read from a real redis-server ([misskey.bus]):
// messages PUBLISHed on Redis in the exact shape of Misskey's
// GlobalEventService reach misskey-js clients, malformed ones are counted
// and harm nothing, the subscription comes back after Redis does, and two
// nodes reading one bus deliver each event once to each of their clients.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import WebSocket from 'ws';
import { startHost, startRedis, barrier, collect, until, metrics, note } from './helpers.mjs';

const CHANNEL = 'misskey.test';

describe('Misskey event bus on Redis', () => {
  let redis;
  let host;
  const busConfig = () => `[misskey.bus]\nredis = "${redis.url}"\nchannel = "${CHANNEL}"\n`;
  // What GlobalEventService.publish writes: {channel, message}.
  const publish = (channel, message) => redis.publish(CHANNEL, JSON.stringify({ channel, message }));
  const busUp = async (h) => (await metrics(h.url)).chanhost_misskey_bus_up === 1;

  before(async () => {
    redis = await startRedis();
    host = await startHost({ config: busConfig() });
    await until(() => busUp(host), 10000, 'the bus subscribed');
  });
  after(async () => {
    await host?.stop();
    await redis?.stop();
  });

  test('notes, main-stream notifications and captured-note updates arrive as Misskey publishes them', async () => {
    const s = host.stream('tok-alice');
    const main = s.useChannel('main');
    const tl = s.useChannel('globalTimeline', {});
    s.send('s', { id: 'bus-n1' });
    await barrier(s);
    const notes = collect(tl, 'note');
    const notifications = collect(main, 'notification');
    const updates = collect(s, 'noteUpdated');
    const n = note({ text: 'over redis' });
    assert.equal(await publish('notesStream', n), 1, 'the host is subscribed');
    await publish('mainStream:alice', { type: 'notification', body: { id: 'nt-1', type: 'follow' } });
    await publish('noteStream:bus-n1', { type: 'reacted', body: { id: 'bus-n1', body: { reaction: '👍', userId: 'u2' } } });
    await until(() => notes.length === 1 && notifications.length === 1 && updates.length === 1);
    assert.deepEqual(notes[0], n);
    assert.deepEqual(notifications[0], { id: 'nt-1', type: 'follow' });
    assert.deepEqual(updates[0], { id: 'bus-n1', type: 'reacted', body: { reaction: '👍', userId: 'u2' } });
    const m = await metrics(host.url);
    assert.ok(m['chanhost_misskey_bus_messages_total{result="delivered"}'] >= 3);
  });

  test('broadcast events (emojiAdded, announcementCreated) reach every stream as top-level frames, as Misskey sends them', async () => {
    const anon = host.stream();
    const alice = host.stream('tok-alice');
    await barrier(anon);
    await barrier(alice);
    const got = [collect(anon, 'emojiAdded'), collect(alice, 'emojiAdded'), collect(alice, 'announcementCreated')];
    const emoji = { emoji: { id: 'e1', name: 'blobcat', url: 'https://x.example/blobcat.png' } };
    await publish('broadcast', { type: 'emojiAdded', body: emoji });
    await publish('broadcast', { type: 'announcementCreated', body: { announcement: { id: 'a1', text: 'hi' } } });
    await until(() => got.every((g) => g.length === 1));
    assert.deepEqual(got[0][0], emoji);
    assert.deepEqual(got[1][0], emoji);
    assert.deepEqual(got[2][0], { announcement: { id: 'a1', text: 'hi' } });
  });

  test('a followers-only note update reaches its author, not a user who does not follow them', async () => {
    const alice = host.stream('tok-alice');
    const bob = host.stream('tok-bob');
    alice.send('s', { id: 'bus-f1' });
    bob.send('s', { id: 'bus-f1' });
    await barrier(alice);
    await barrier(bob);
    const toAlice = collect(alice, 'noteUpdated');
    const toBob = collect(bob, 'noteUpdated');
    // Bob wrote the note: he is its audience; nobody follows him here.
    await publish('noteStream:bus-f1', {
      type: 'deleted',
      body: { id: 'bus-f1', userId: 'bob', visibility: 'followers', visibleUserIds: [], body: { deletedAt: 'now' } },
    });
    await publish('noteStream:bus-f1', { type: 'reacted', body: { id: 'bus-f1', body: { reaction: 'x' } } });
    await until(() => toBob.length === 2 && toAlice.length === 1);
    assert.equal(toAlice[0].type, 'reacted', 'alice does not follow bob: no deletion of his followers-only note');
  });

  test('a malformed message is counted and harms nothing', async () => {
    const s = host.stream();
    const tl = s.useChannel('globalTimeline', {});
    await barrier(s);
    const notes = collect(tl, 'note');
    const before = (await metrics(host.url))['chanhost_misskey_bus_messages_total{result="malformed"}'];
    await redis.publish(CHANNEL, 'not json');
    await redis.publish(CHANNEL, JSON.stringify({ channel: 'mainStream:alice', message: { body: 1 } }));
    const n = note();
    await publish('notesStream', n);
    await until(() => notes.length === 1);
    const m = await metrics(host.url);
    assert.equal(m['chanhost_misskey_bus_messages_total{result="malformed"}'], before + 2);
    assert.equal(m.chanhost_misskey_bus_up, 1);
  });

  test('Redis lost and back: the bus resubscribes by itself, clients stay connected', async () => {
    const s = host.stream();
    const tl = s.useChannel('globalTimeline', {});
    await barrier(s);
    const notes = collect(tl, 'note');
    await redis.stop();
    await until(async () => !(await busUp(host)), 10000, 'the bus noticed the outage');
    await redis.start();
    await until(() => busUp(host), 15000, 'the bus back');
    const n = note({ text: 'after the outage' });
    assert.equal(await publish('notesStream', n), 1);
    await until(() => notes.length === 1);
    assert.deepEqual(notes[0], n);
    await barrier(s);
  });

  test('two nodes on one bus: each client gets each event once', async () => {
    const second = await startHost({ config: busConfig() });
    try {
      await until(() => busUp(second), 10000, 'the second node subscribed');
      const a = host.stream();
      const b = second.stream();
      const ta = a.useChannel('globalTimeline', {});
      const tb = b.useChannel('globalTimeline', {});
      await barrier(a);
      await barrier(b);
      const gotA = collect(ta, 'note');
      const gotB = collect(tb, 'note');
      const first = note({ text: 'one' });
      const last = note({ text: 'two' });
      assert.equal(await publish('notesStream', first), 2, 'both nodes read the bus');
      await publish('notesStream', last);
      await until(() => gotA.some((n) => n.id === last.id) && gotB.some((n) => n.id === last.id));
      assert.deepEqual(gotA.map((n) => n.id), [first.id, last.id]);
      assert.deepEqual(gotB.map((n) => n.id), [first.id, last.id]);
    } finally {
      await second.stop();
    }
  });

  test('a user suspended, or a token regenerated, on the bus: the cached answer goes, the next stream is checked again', async () => {
    // A Misskey double answering /api/i; what it says changes under the host.
    const users = { 'mk-dan': { id: 'dan', username: 'dan' }, 'mk-eve': { id: 'eve', username: 'eve' } };
    const suspended = new Set();
    const backend = http.createServer((req, res) => {
      let body = '';
      req.on('data', (d) => { body += d; });
      req.on('end', () => {
        const { i } = JSON.parse(body || '{}');
        const user = users[i];
        if (!user) { res.writeHead(401).end('{"error":{}}'); return; }
        if (suspended.has(user.id)) { res.writeHead(403).end('{"error":{"code":"YOUR_ACCOUNT_SUSPENDED"}}'); return; }
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(user));
      });
    });
    backend.listen(0, '127.0.0.1');
    await once(backend, 'listening');
    const h = await startHost({
      config: `${busConfig()}[auth.backend]\nurl = "http://127.0.0.1:${backend.address().port}/api/i"\ncache_ttl_ms = 600000\n`,
    });
    const status = async (token) => {
      const ws = new WebSocket(`${h.ws}/streaming?i=${token}`);
      ws.on('error', () => {});
      const r = await Promise.race([once(ws, 'open').then(() => 101), once(ws, 'unexpected-response').then(([, res]) => res.statusCode)]);
      ws.terminate();
      return r;
    };
    try {
      await until(() => busUp(h), 10000, 'the bus subscribed');
      assert.equal(await status('mk-dan'), 101);
      assert.equal(await status('mk-eve'), 101);
      suspended.add('dan');
      assert.equal(await status('mk-dan'), 101, 'the cached answer still holds');
      await redis.publish(CHANNEL, JSON.stringify({ channel: 'internal', message: { type: 'userChangeSuspendedState', body: { id: 'dan', isSuspended: true } } }));
      await until(async () => (await status('mk-dan')) === 403, 5000, 'a suspended user refused');
      // The token regenerated: the old one goes, other users' answers stay.
      users['mk-eve-2'] = users['mk-eve'];
      delete users['mk-eve'];
      assert.equal(await status('mk-eve'), 101, 'cached');
      await redis.publish(CHANNEL, JSON.stringify({ channel: 'internal', message: { type: 'userTokenRegenerated', body: { id: 'eve', oldToken: 'mk-eve', newToken: 'mk-eve-2' } } }));
      await until(async () => (await status('mk-eve')) === 401, 5000, 'the old token refused');
      assert.equal(await status('mk-eve-2'), 101);
    } finally {
      await h.stop();
      backend.close();
    }
  });

  test('a password, a database number and TLS (rediss://, a private CA in ca_file) work as Misskey\'s redisForPubsub allows', async () => {
    const tlsRedis = await startRedis({ password: 'p@ss word', tls: true, db: 3 });
    const h = await startHost({ config: `[misskey.bus]\nredis = "${tlsRedis.url}"\nchannel = "${CHANNEL}"\nca_file = "${tlsRedis.ca}"\n` });
    try {
      await until(() => busUp(h), 10000, 'subscribed over TLS');
      const s = h.stream();
      const tl = s.useChannel('globalTimeline', {});
      await barrier(s);
      const notes = collect(tl, 'note');
      const n = note({ text: 'over tls' });
      assert.equal(await tlsRedis.publish(CHANNEL, JSON.stringify({ channel: 'notesStream', message: n })), 1);
      await until(() => notes.length === 1);
      assert.deepEqual(notes[0], n);
      assert.ok(!h.stderr.includes('p@ss') && !h.stderr.includes('p%40ss'), 'the password is never logged');
    } finally {
      await h.stop();
      await tlsRedis.stop();
    }
    // Without the CA the server's certificate is not trusted: the node
    // serves, the bus stays down.
    const untrusted = await startRedis({ tls: true });
    const h2 = await startHost({ config: `[misskey.bus]\nredis = "${untrusted.url}"\nchannel = "${CHANNEL}"\n` });
    try {
      await h2.waitLog('cannot reach Redis');
      assert.equal((await metrics(h2.url)).chanhost_misskey_bus_up, 0);
    } finally {
      await h2.stop();
      await untrusted.stop();
    }
  });

  test('[misskey.bus] without a channel, or with a URL that is not Redis, is a clear config error', async () => {
    await assert.rejects(
      startHost({ config: `[misskey.bus]\nredis = "${redis.url}"\n` }),
      /misskey\.bus\.channel.*config\.host/s,
    );
    await assert.rejects(
      startHost({ config: '[misskey.bus]\nredis = "http://127.0.0.1:1"\nchannel = "x"\n' }),
      /misskey\.bus\.redis.*not a Redis URL/s,
    );
    await assert.rejects(
      startHost({ config: `[misskey.bus]\nredis = "${redis.url}"\nchannel = "x"\nca_file = "/nonexistent.pem"\n` }),
      /misskey\.bus\.ca_file.*only for a TLS URL/s,
    );
    await assert.rejects(
      startHost({ config: '[misskey.bus]\nredis = "rediss://localhost:1"\nchannel = "x"\nca_file = "/nonexistent.pem"\n' }),
      /misskey\.bus\.ca_file.*cannot read \/nonexistent\.pem/s,
    );
  });
});
