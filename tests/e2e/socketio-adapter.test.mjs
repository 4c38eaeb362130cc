// chanhost beside a Node socket.io 4.8 server on one real redis-server
// ([socketio.adapter]): @socket.io/redis-adapter 8.3 and
// @socket.io/redis-emitter 5.1 reach chanhost's clients, chanhost's
// publishes reach the Node server's clients, and the adapter's requests
// (fetchSockets, serverCount, socketsJoin/Leave, disconnectSockets,
// serverSideEmit, broadcasts with acks) include chanhost's sockets.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { once } from 'node:events';
import { io as connect } from 'socket.io-client';
import { Server } from 'socket.io';
import { createAdapter, createShardedAdapter } from '@socket.io/redis-adapter';
import { createAdapter as createStreamsAdapter } from '@socket.io/redis-streams-adapter';
import { Emitter } from '@socket.io/redis-emitter';
import { createClient } from 'redis';
import { startHost, startRedis, until, metrics, API_KEY } from './helpers.mjs';

/** A Node socket.io server with the Redis adapter; its sockets join `auth.room`. */
async function nodeServer(redis) {
  const pub = createClient({ url: redis.url });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const httpServer = http.createServer();
  const io = new Server(httpServer, { adapter: createAdapter(pub, sub, { requestsTimeout: 3000 }) });
  io.on('connection', (socket) => {
    if (socket.handshake.auth?.room) socket.join(socket.handshake.auth.room);
  });
  httpServer.listen(0, '127.0.0.1');
  await once(httpServer, 'listening');
  return {
    io,
    url: `http://127.0.0.1:${httpServer.address().port}`,
    async stop() {
      io.close();
      await Promise.allSettled([pub.quit(), sub.quit()]);
    },
  };
}

/** A connected socket.io-client; every event it gets is kept in `got`. */
async function client(url, auth = {}, transports = ['websocket']) {
  const socket = connect(url, { auth, transports, forceNew: true, reconnection: false });
  socket.got = [];
  socket.onAny((event, ...args) => socket.got.push([event, ...args]));
  await once(socket, 'connect');
  return socket;
}

const events = (socket, name) => socket.got.filter(([e]) => e === name).map(([, ...args]) => args);

/** Publishes `marker` to everyone and waits for it: what was sent before has arrived. */
async function barrier(emitter, sockets, marker) {
  emitter.emit(marker);
  await until(() => sockets.every((s) => events(s, marker).length === 1), 10000, marker);
}

describe('chanhost in a socket.io cluster on Redis', () => {
  let redis; let host; let node; let emitterClient; let emitter;
  before(async () => {
    redis = await startRedis();
    host = await startHost({
      plugins: ['socketio-conformance'],
      config: `[socketio.adapter]\nredis = "${redis.url}"\n`,
    });
    node = await nodeServer(redis);
    emitterClient = createClient({ url: redis.url });
    await emitterClient.connect();
    emitter = new Emitter(emitterClient);
    // chanhost subscribed to the request channel: it counts as a server.
    await until(async () => (await node.io.of('/').adapter.serverCount()) === 2, 15000, 'two servers');
  });
  after(async () => {
    await emitterClient?.quit();
    await node?.stop();
    await host?.stop();
    await redis?.stop();
  });

  test('the emitter and a Node server reach chanhost\'s sockets: rooms, except, socket ids, binary arguments', async () => {
    const inR = await client(host.url, { room: 'r' });
    const polling = await client(host.url, { room: 'r' }, ['polling']);
    const elsewhere = await client(host.url, { room: 'other' });
    const nodeSide = await client(node.url, { room: 'r' });
    try {
      emitter.to('r').emit('hello', 1, { a: 'x' }, Buffer.from([1, 2, 3]));
      node.io.to('r').emit('from-node', 'n');
      // The Node server publishes on its own connection: wait for it too.
      await until(() => [inR, polling, nodeSide].every((s) => events(s, 'from-node').length > 0), 10000, 'from the Node server');
      await barrier(emitter, [inR, polling, elsewhere], 'b1');
      for (const s of [inR, polling]) {
        const [[n, obj, buf]] = events(s, 'hello');
        assert.equal(n, 1);
        assert.deepEqual(obj, { a: 'x' });
        assert.ok(Buffer.isBuffer(buf) || buf instanceof ArrayBuffer, `binary arrives as binary: ${typeof buf}`);
        assert.deepEqual([...new Uint8Array(buf)], [1, 2, 3]);
        assert.deepEqual(events(s, 'from-node'), [['n']], 'once');
      }
      assert.deepEqual(events(elsewhere, 'hello'), []);
      assert.deepEqual(events(elsewhere, 'from-node'), []);
      assert.deepEqual(events(nodeSide, 'from-node'), [['n']]);

      // A socket's id is a room; except leaves out a room's sockets.
      emitter.to(inR.id).emit('direct', 'd');
      emitter.to('r').except(polling.id).emit('not-polling', 'p');
      emitter.except('r').emit('not-r');
      emitter.volatile.to('other').emit('volatile', 'v');
      await barrier(emitter, [inR, polling, elsewhere], 'b2');
      assert.deepEqual(events(inR, 'direct'), [['d']]);
      assert.deepEqual(events(polling, 'direct'), []);
      assert.deepEqual(events(inR, 'not-polling'), [['p']]);
      assert.deepEqual(events(polling, 'not-polling'), []);
      assert.deepEqual(events(elsewhere, 'not-r'), [[]]);
      assert.deepEqual(events(inR, 'not-r'), []);
      assert.deepEqual(events(elsewhere, 'volatile'), [['v']]);
      assert.ok((await metrics(host.url))['chanhost_socketio_adapter_messages_total{result="received"}'] >= 6);
    } finally {
      for (const s of [inR, polling, elsewhere, nodeSide]) s.disconnect();
    }
  });

  test('what chanhost publishes reaches the Node server\'s sockets, and chanhost\'s own once', async () => {
    const here = await client(host.url, { room: 'out' });
    const sender = await client(host.url, { room: 'out' });
    const there = await client(node.url, { room: 'out' });
    const notThere = await client(node.url, { room: 'no' });
    try {
      const res = await fetch(`${host.url}/api/publish`, {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify([{ room: 'out', event: 'api', data: { x: 1 } }, { room: 'out', event: 'api', data: 2 }]),
      });
      assert.equal(res.status, 200);
      // A plugin broadcast, its sender excepted on both sides.
      sender.emit('broadcast', { room: 'out', event: 'pb', data: ['y'], exceptSelf: true });
      await until(() => events(there, 'pb').length === 1 && events(here, 'pb').length === 1, 10000, 'the broadcast on both servers');
      await until(() => events(there, 'api').length === 2, 10000, 'the API publishes on the Node server');
      assert.deepEqual(events(there, 'api'), [[{ x: 1 }], [2]], 'in order');
      assert.deepEqual(events(there, 'pb'), [[['y']]]);
      await barrier(emitter, [here, sender], 'b3');
      assert.deepEqual(events(here, 'api'), [[{ x: 1 }], [2]], 'chanhost\'s own sockets once');
      assert.deepEqual(events(sender, 'pb'), []);
      assert.deepEqual(events(notThere, 'api'), []);
    } finally {
      for (const s of [here, sender, there, notThere]) s.disconnect();
    }
  });

  test('fetchSockets, allRooms, socketsJoin, socketsLeave and disconnectSockets act on chanhost\'s sockets', async () => {
    const a = await client(host.url, { room: 'fetch', token: 'x' });
    const b = await client(host.url, { room: 'fetch-b' });
    try {
      const all = await node.io.in('fetch').fetchSockets();
      const mine = all.find((s) => s.id === a.id);
      assert.ok(mine, `fetchSockets has chanhost's socket: ${all.map((s) => s.id)}`);
      assert.deepEqual(new Set(mine.rooms), new Set([a.id, 'fetch']));
      assert.deepEqual(mine.handshake.auth, { room: 'fetch', token: 'x' });
      assert.equal(typeof mine.handshake.headers, 'object');
      assert.equal(mine.handshake.address, '127.0.0.1');
      assert.equal(mine.handshake.secure, false);
      assert.ok(mine.handshake.url.startsWith('/socket.io/'), mine.handshake.url);
      assert.equal(typeof mine.handshake.issued, 'number');
      assert.match(mine.handshake.time, /^\w{3} \w{3} \d{2} \d{4} \d{2}:\d{2}:\d{2} GMT\+0000 \(Coordinated Universal Time\)$/);
      assert.ok(!all.some((s) => s.id === b.id), 'only the room asked for');
      const rooms = await node.io.of('/').adapter.allRooms();
      assert.ok(rooms.has('fetch') && rooms.has('fetch-b') && rooms.has(a.id));

      // Joined by selection (Node server), then by the emitter; a remote socket object's join.
      node.io.in(a.id).socketsJoin('joined');
      emitter.in(b.id).socketsJoin('joined');
      await until(async () => (await node.io.in('joined').fetchSockets()).length === 2, 10000, 'both joined');
      emitter.to('joined').emit('in-joined');
      await barrier(emitter, [a, b], 'b4');
      assert.equal(events(a, 'in-joined').length, 1);
      assert.equal(events(b, 'in-joined').length, 1);
      node.io.in('joined').socketsLeave('joined');
      await until(async () => (await node.io.in('joined').fetchSockets()).length === 0, 10000, 'both left');

      // Disconnected: the namespace (the client is told "io server disconnect").
      const gone = once(b, 'disconnect');
      emitter.in(b.id).disconnectSockets();
      const [reason] = await gone;
      assert.equal(reason, 'io server disconnect');
      const closed = once(a, 'disconnect');
      node.io.in(a.id).disconnectSockets(true);
      await closed;
    } finally {
      a.disconnect();
      b.disconnect();
    }
  });

  test('serverSideEmit reaches the plugins, with and without ack', async () => {
    const watcher = await client(host.url, { room: 'server-side-watchers' });
    try {
      node.io.serverSideEmit('hello-plugins', { n: 1 });
      emitter.serverSideEmit('from-emitter', 'a', 'b');
      await until(() => events(watcher, 'server-side').length === 2, 10000, 'both relayed');
      const relayed = events(watcher, 'server-side').map(([r]) => r).sort((x, y) => x.event.localeCompare(y.event));
      assert.deepEqual(relayed, [
        { event: 'from-emitter', data: ['a', 'b'] },
        { event: 'hello-plugins', data: { n: 1 } },
      ]);
      // One answer from chanhost: the number of plugins it reached.
      const answers = await node.io.serverSideEmitWithAck('ping');
      assert.deepEqual(answers, [1]);
    } finally {
      watcher.disconnect();
    }
  });

  test('a broadcast with acks from the Node server collects chanhost\'s clients\' acks', async () => {
    const a = await client(host.url, { room: 'ask' });
    const b = await client(host.url, { room: 'ask' });
    const n = await client(node.url, { room: 'ask' });
    a.on('question', (x, cb) => cb(`a:${x}`));
    b.on('question', (x, cb) => cb(`b:${x}`));
    n.on('question', (x, cb) => cb(`n:${x}`));
    try {
      const answers = await node.io.timeout(5000).to('ask').emitWithAck('question', 7);
      assert.deepEqual(answers.sort(), ['a:7', 'b:7', 'n:7']);
      // A single chanhost socket.
      const one = await node.io.timeout(5000).to(a.id).emitWithAck('question', 8);
      assert.deepEqual(one, ['a:8']);
    } finally {
      for (const s of [a, b, n]) s.disconnect();
    }
  });

  test('with [cluster] too: chanhost nodes keep their broker, take part for their own sockets, and nobody gets an event twice', async () => {
    const config = `[cluster]\nredis = "${redis.url}"\nprefix = "adapter-${process.pid}"\nnode_ttl_ms = 1000\n[socketio.adapter]\n`;
    const [a, b] = await Promise.all([0, 1].map(() => startHost({ plugins: ['socketio-conformance'], config })));
    const sockets = [];
    try {
      // Node, the first host of this file, and these two.
      await until(async () => (await node.io.of('/').adapter.serverCount()) === 4, 15000, 'four servers');
      const onA = await client(a.url, { room: 'c' });
      const onB = await client(b.url, { room: 'c' });
      const there = await client(node.url, { room: 'c' });
      sockets.push(onA, onB, there);
      node.io.to('c').emit('from-node', 1);
      await until(() => [onA, onB].every((s) => events(s, 'from-node').length === 1), 10000, 'on both chanhost nodes');
      const res = await fetch(`${a.url}/api/publish`, {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify({ room: 'c', event: 'from-a', data: 2 }),
      });
      assert.equal(res.status, 200);
      await until(() => [onA, onB, there].every((s) => events(s, 'from-a').length === 1), 10000, 'everywhere');
      // What B could get twice (through the cluster and through the adapter) has arrived by now.
      await barrier(emitter, [onA, onB], 'b5');
      for (const s of [onA, onB]) {
        assert.deepEqual(events(s, 'from-node'), [[1]]);
        assert.deepEqual(events(s, 'from-a'), [[2]]);
      }
      // fetchSockets sees each chanhost node's own sockets once.
      const ids = (await node.io.in('c').fetchSockets()).map((s) => s.id).sort();
      assert.deepEqual(ids, [onA.id, onB.id, there.id].sort());
    } finally {
      for (const s of sockets) s.disconnect();
      await Promise.all([a.stop(), b.stop()]);
    }
  });
});

describe('the adapter\'s Redis lost and back', () => {
  test('chanhost keeps its clients and its own delivery, says "down", counts what it could not publish, and takes part again by itself', async () => {
    const redis = await startRedis();
    const host = await startHost({ plugins: ['socketio-conformance'], config: `[socketio.adapter]\nredis = "${redis.url}"\n` });
    const health = async () => (await (await fetch(`${host.url}/healthz`)).json()).socketio_adapter;
    const publish = (data) => fetch(`${host.url}/api/publish`, {
      method: 'POST',
      headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify({ room: 'o', event: 'e', data }),
    });
    let emitterClient;
    const mine = await client(host.url, { room: 'o' });
    try {
      await until(async () => (await health()) === 'up', 15000, 'up');
      await redis.stop();
      await until(async () => (await health()) === 'down', 15000, 'down');
      assert.equal((await publish(1)).status, 200, 'chanhost\'s own delivery does not need the adapter');
      await until(() => events(mine, 'e').length === 1, 10000, 'delivered here');
      await until(async () => (await metrics(host.url))['chanhost_socketio_adapter_messages_total{result="not_carried"}'] >= 1, 10000, 'counted');
      assert.ok(mine.connected, 'the client stayed');
      await redis.start();
      await until(async () => (await health()) === 'up', 20000, 'up again');
      emitterClient = createClient({ url: redis.url });
      await emitterClient.connect();
      const emitter = new Emitter(emitterClient);
      // Subscribed again: the emitter reaches chanhost's socket.
      await until(async () => {
        emitter.to('o').emit('again', 2);
        await new Promise((r) => setTimeout(r, 100));
        return events(mine, 'again').length > 0;
      }, 20000, 'the emitter reaches chanhost again');
    } finally {
      mine.disconnect();
      await emitterClient?.quit();
      await host.stop();
      await redis.stop();
    }
  });
});

describe('adapter variants chanhost does not speak', () => {
  test('a sharded and a streams adapter on the same Redis are reported', async () => {
    const redis = await startRedis();
    const clients = [];
    const servers = [];
    let host;
    try {
      const pub = createClient({ url: redis.url });
      const sub = pub.duplicate();
      const streams = pub.duplicate();
      clients.push(pub, sub, streams);
      await Promise.all(clients.map((c) => c.connect()));
      servers.push(new Server(http.createServer(), { adapter: createShardedAdapter(pub, sub) }));
      servers.push(new Server(http.createServer(), { adapter: createStreamsAdapter(streams) }));
      // The streams adapter writes its stream with what it broadcasts.
      servers[1].emit('hello', 1);
      host = await startHost({ plugins: ['socketio-conformance'], config: `[socketio.adapter]\nredis = "${redis.url}"\n` });
      await until(async () => {
        const m = await metrics(host.url);
        return m['chanhost_socketio_adapter_unsupported{variant="sharded"}'] === 1
          && m['chanhost_socketio_adapter_unsupported{variant="streams"}'] === 1;
      }, 15000, 'both variants reported');
    } finally {
      for (const io of servers) io.close();
      await Promise.allSettled(clients.map((c) => c.quit()));
      await host?.stop();
      await redis.stop();
    }
  });
});
