// Several chanhost processes on one real redis-server ([cluster]):
// publishes reach every node's members exactly once and in order, filters
// travel with the event, a node reads only the rooms it serves, and Redis
// lost (or absent at start) refuses API publishes with 503 while local
// delivery goes on, until Redis is back.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { io } from 'socket.io-client';
import { startHost, startRedis, rawStream, sendJson, frame, until, metrics, note, API_KEY } from './helpers.mjs';

let prefixes = 0;
const clusterConfig = (redis, extra = '') => `[cluster]\nredis = "${redis.url}"\nprefix = "t${process.pid}-${++prefixes}"\nnode_ttl_ms = 1000\n${extra}`;

/** A raw Misskey stream with a probe instance `p` in `room`. */
async function member(host, room, params = {}) {
  const ws = await rawStream(host);
  sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: { room, ...params }, pong: true } });
  await frame(ws, (f) => f.type === 'connected');
  return ws;
}

const events = (ws, type) => ws.frames.map((t) => JSON.parse(t)).filter((f) => f.type === 'channel' && f.body.type === type).map((f) => f.body.body);
const subscriptions = async (host) => (await metrics(host.url)).chanhost_broker_subscriptions;
const health = async (host) => (await fetch(`${host.url}/healthz`)).json();
const post = (host, body) => fetch(`${host.url}/api/publish`, {
  method: 'POST',
  headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
  body: JSON.stringify(body),
});

describe('a cluster on Redis', () => {
  let redis;
  before(async () => { redis = await startRedis(); });
  after(async () => { await redis?.stop(); });

  test('API publishes and plugin broadcasts reach every node\'s members once, in order; a node reads only the rooms it serves', async () => {
    const config = clusterConfig(redis);
    const [a, b, c] = await Promise.all([0, 1, 2].map(() => startHost({ plugins: ['probe'], config })));
    try {
      await until(async () => (await health(a)).cluster.nodes === 3, 10000, 'three nodes');
      assert.equal((await health(a)).cluster.redis, 'up');
      const onA = await member(a, 'r');
      const onB = await member(b, 'r');
      const onB2 = await member(b, 'r');
      const onC = await member(c, 'other');
      // Connection ids are unique across the cluster (plugins key shared
      // state by them), and safe as JavaScript numbers.
      const ids = [];
      for (const ws of [onA, onB, onB2, onC]) {
        sendJson(ws, { type: 'ch', body: { id: 'p', type: 'whoami', body: null } });
        ids.push((await frame(ws, (f) => f.body?.type === 'whoami')).body.body.connection);
      }
      assert.equal(new Set(ids).size, 4, `distinct: ${ids}`);
      assert.ok(ids.every(Number.isSafeInteger));
      // Each node subscribed to its rooms (and `broadcast`, every Misskey stream's).
      await until(async () => (await subscriptions(a)) === 2 && (await subscriptions(b)) === 2 && (await subscriptions(c)) === 2, 10000, 'subscribed');
      const before = (await metrics(c.url))['chanhost_broker_events_total{result="received"}'];
      const batch = Array.from({ length: 20 }, (_, i) => ({ room: 'r', event: 'n', data: i }));
      assert.equal((await post(a, batch)).status, 200);
      // Then one for C's room, published after: when C has it, it has
      // seen everything before it that it was subscribed to.
      assert.equal((await post(a, { room: 'other', event: 'n', data: 'last' })).status, 200);
      await until(() => [onA, onB, onB2].every((ws) => events(ws, 'n').length === 20), 10000, 'twenty everywhere');
      await frame(onC, (f) => f.body?.type === 'n');
      const want = Array.from({ length: 20 }, (_, i) => i);
      for (const ws of [onA, onB, onB2]) assert.deepEqual(events(ws, 'n'), want);
      assert.deepEqual(events(onC, 'n'), ['last']);
      assert.equal((await metrics(c.url))['chanhost_broker_events_total{result="received"}'] - before, 1, 'C read only its own room');

      // A plugin broadcast from B (outside `event`): everyone in the room once, the sender excepted.
      sendJson(onB, { type: 'ch', body: { id: 'p', type: 'broadcast', body: { room: 'r', event: 'b', data: { from: 'B' }, exceptSelf: true } } });
      await until(() => events(onA, 'b').length === 1 && events(onB2, 'b').length === 1, 10000, 'the broadcast on both nodes');
      assert.deepEqual(events(onA, 'b'), [{ from: 'B' }]);
      assert.equal(events(onB, 'b').length, 0, 'the sender excepted');
    } finally {
      await Promise.all([a, b, c].map((h) => h.stop()));
    }
  });

  test('conditions and note audiences travel with the event and are evaluated where the members are', async () => {
    const config = clusterConfig(redis);
    const [a, b] = await Promise.all([0, 1].map(() => startHost({ plugins: ['probe'], config })));
    try {
      const tagged = await member(b, 'f');
      const plain = await member(b, 'f');
      sendJson(tagged, { type: 'ch', body: { id: 'p', type: 'attr', body: { name: 'tags', values: ['x'] } } });
      await frame(tagged, (f) => f.body?.type === 'attr-set');
      const sender = await member(a, 'f');
      await until(async () => (await subscriptions(b)) === 2, 10000, 'B subscribed');
      sendJson(sender, {
        type: 'ch',
        body: { id: 'p', type: 'fbroadcast', body: { room: 'f', event: 'only', data: 1, conditions: [{ attribute: 'tags', keys: ['x'], exclude: false }] } },
      });
      sendJson(sender, { type: 'ch', body: { id: 'p', type: 'broadcast', body: { room: 'f', event: 'all', data: 2 } } });
      await until(() => events(plain, 'all').length === 1 && events(tagged, 'all').length === 1, 10000, 'the unfiltered one');
      assert.deepEqual(events(tagged, 'only'), [1]);
      assert.deepEqual(events(plain, 'only'), [], 'the condition held on the receiving node');
    } finally {
      await Promise.all([a, b].map((h) => h.stop()));
    }
  });

  test('Redis unreachable at start: the node serves locally, reports down, refuses API publishes with 503; when Redis comes, cross-node delivery starts by itself', async () => {
    const late = await startRedis();
    await late.stop();
    const config = clusterConfig(late);
    const [a, b] = await Promise.all([0, 1].map(() => startHost({ plugins: ['probe'], config })));
    try {
      const h = await health(a);
      assert.equal(h.status, 'ok');
      assert.equal(h.cluster.redis, 'down');
      assert.equal((await metrics(a.url)).chanhost_broker_up, 0);
      const onA = await member(a, 'r');
      const onA2 = await member(a, 'r');
      const onB = await member(b, 'r');
      const r = await post(a, { room: 'r', event: 'api', data: 1 });
      assert.equal(r.status, 503);
      assert.match((await r.json()).error, /Redis cannot be reached: nothing was published/);
      const joined = await fetch(`${a.url}/api/rooms/join`, {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify({ user: 'alice', rooms: ['x'] }),
      });
      assert.equal(joined.status, 503, 'the rooms API cannot reach the other nodes either');
      // A plugin broadcast still reaches this node's members, and is counted.
      sendJson(onA, { type: 'ch', body: { id: 'p', type: 'broadcast', body: { room: 'r', event: 'local', data: 1 } } });
      await frame(onA2, (f) => f.body?.type === 'local');
      assert.ok((await metrics(a.url))['chanhost_broker_events_total{result="not_carried"}'] >= 1);
      assert.equal(events(onA, 'api').length + events(onA2, 'api').length, 0, 'a refused publish is delivered nowhere');

      await late.start();
      await until(async () => (await health(a)).cluster.redis === 'up' && (await health(b)).cluster.redis === 'up', 15000, 'both nodes up');
      await until(async () => (await subscriptions(b)) === 2, 10000, 'B subscribed again');
      assert.equal((await post(a, { room: 'r', event: 'api', data: 2 })).status, 200);
      await frame(onB, (f) => f.body?.type === 'api');
      assert.deepEqual(events(onB, 'api'), [2]);
      assert.deepEqual(events(onB, 'local'), [], 'nothing sent late');
    } finally {
      await Promise.all([a, b].map((h) => h.stop()));
      await late.stop();
    }
  });

  test('presence is cluster-wide: a user online on two nodes is announced once, offline when the last connection anywhere closes, and a dead node\'s users go offline', async () => {
    const config = clusterConfig(redis);
    const [a, b, c] = await Promise.all([0, 1, 2].map(() => startHost({ plugins: ['probe'], config })));
    try {
      await until(async () => (await health(a)).cluster.nodes === 3, 10000, 'three nodes');
      const watchA = await member(a, 'chanhost:presence');
      const watchB = await member(b, 'chanhost:presence');
      await until(async () => (await subscriptions(a)) === 2 && (await subscriptions(b)) === 2, 10000, 'watchers subscribed');
      const said = (ws) => ws.frames.map((t) => JSON.parse(t)).filter((f) => f.type === 'channel' && ['online', 'offline'].includes(f.body.type) && f.body.body.userId === 'alice').map((f) => f.body.type);
      const tab1 = await rawStream(a, '?i=tok-alice');
      await until(() => said(watchA).length === 1 && said(watchB).length === 1, 10000, 'online on both nodes');
      const tab2 = await rawStream(b, '?i=tok-alice');
      // The plugin's view: online-users lists the cluster.
      sendJson(watchA, { type: 'ch', body: { id: 'p', type: 'online', body: null } });
      assert.deepEqual((await frame(watchA, (f) => f.body?.type === 'online' && Array.isArray(f.body.body))).body.body, ['alice']);
      tab1.close();
      // Bob's arrival after: once both watchers see it, alice's tab1 close
      // has been processed (one task per node applies changes in order).
      const bob = await rawStream(a, '?i=tok-bob');
      const bobOnline = (ws) => ws.frames.some((t) => { const f = JSON.parse(t); return f.body?.type === 'online' && f.body.body?.userId === 'bob'; });
      await until(() => bobOnline(watchA) && bobOnline(watchB), 10000, 'bob online');
      assert.deepEqual([said(watchA), said(watchB)], [['online'], ['online']], 'still online: a tab is open on B');
      tab2.close();
      await until(() => said(watchA).length === 2 && said(watchB).length === 2, 10000, 'offline on both nodes');
      assert.deepEqual(said(watchA), ['online', 'offline']);
      bob.close();

      // Alice only on C, which dies: the others take her offline.
      await rawStream(c, '?i=tok-alice');
      await until(() => said(watchA).length === 3, 10000, 'online again');
      const killed = once(c.proc, 'exit');
      c.proc.kill('SIGKILL');
      await killed;
      await until(() => said(watchA).length === 4 && said(watchB).length === 4, 10000, 'offline after the node died');
      assert.deepEqual(said(watchB), ['online', 'offline', 'online', 'offline']);
    } finally {
      await Promise.all([a, b, c].map((h) => h.stop()));
    }
  });

  test('the rooms API acts on every node: a user\'s instances everywhere, or one connection wherever it is', async () => {
    const config = clusterConfig(redis);
    const [a, b] = await Promise.all([0, 1].map(() => startHost({ plugins: ['probe'], config })));
    const rooms = async (h, action, body) => {
      const r = await fetch(`${h.url}/api/rooms/${action}`, {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      return [r.status, await r.json()];
    };
    try {
      await until(async () => (await health(a)).cluster.nodes === 2 && (await health(b)).cluster.nodes === 2, 10000, 'two nodes');
      const open = async (h) => {
        const ws = await rawStream(h, '?i=tok-alice');
        sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: {}, pong: true } });
        await frame(ws, (f) => f.type === 'connected');
        sendJson(ws, { type: 'ch', body: { id: 'p', type: 'whoami', body: null } });
        ws.connection = (await frame(ws, (f) => f.body?.type === 'whoami')).body.body.connection;
        return ws;
      };
      const onA = await open(a);
      const onB = await open(b);
      assert.deepEqual(await rooms(a, 'join', { user: 'alice', rooms: ['vip'] }), [200, { connections: 2, instances: 2 }]);
      await until(async () => (await subscriptions(b)) === 2, 10000, 'B serves vip');
      assert.equal((await post(a, { room: 'vip', event: 'v', data: 1 })).status, 200);
      await until(() => events(onA, 'v').length === 1 && events(onB, 'v').length === 1, 10000, 'both in vip');
      // One connection, on the other node.
      assert.deepEqual(await rooms(a, 'leave', { connection: onB.connection, rooms: ['vip'] }), [200, { connections: 1, instances: 1 }]);
      assert.equal((await post(a, { room: 'vip', event: 'v', data: 2 })).status, 200);
      await until(() => events(onA, 'v').length === 2, 10000, 'A still in vip');
      // And a sentinel B receives after: it got nothing from vip.
      assert.equal((await post(a, { room: 'broadcast', event: 'sentinel', data: null })).status, 200);
      await frame(onB, (f) => f.type === 'sentinel');
      assert.deepEqual(events(onB, 'v'), [1]);
    } finally {
      await Promise.all([a, b].map((h) => h.stop()));
    }
  });

  test('the plugin key-value store is one for the cluster: kv-incr is atomic across nodes, the API reads the same value everywhere, and it outlives every node', async () => {
    const config = clusterConfig(redis);
    const [a, b] = await Promise.all([0, 1].map(() => startHost({ plugins: ['probe'], config })));
    const kvOf = async (h) => (await (await fetch(`${h.url}/api/plugins/probe/kv/count`, { headers: { authorization: `Bearer ${API_KEY}` } })).json()).value;
    try {
      const onA = await member(a, 'kv');
      const onB = await member(b, 'kv');
      for (let i = 0; i < 10; i++) {
        sendJson(onA, { type: 'ch', body: { id: 'p', type: 'kv-incr', body: { key: 'count', delta: 1 } } });
        sendJson(onB, { type: 'ch', body: { id: 'p', type: 'kv-incr', body: { key: 'count', delta: 2 } } });
      }
      await until(() => events(onA, 'kv-incr').length === 10 && events(onB, 'kv-incr').length === 10, 10000, 'twenty increments');
      // Every answer distinct: no increment was lost between the nodes.
      const all = [...events(onA, 'kv-incr'), ...events(onB, 'kv-incr')];
      assert.equal(new Set(all).size, 20);
      assert.equal(Math.max(...all), 30);
      assert.deepEqual([await kvOf(a), await kvOf(b)], [30, 30]);
      // Private keys (`_...`: tokens, bookkeeping) stay on their node.
      sendJson(onA, { type: 'ch', body: { id: 'p', type: 'kv-incr', body: { key: '_mine', delta: 1 } } });
      sendJson(onB, { type: 'ch', body: { id: 'p', type: 'kv-incr', body: { key: '_mine', delta: 1 } } });
      await until(() => events(onA, 'kv-incr').length === 11 && events(onB, 'kv-incr').length === 11, 10000, 'private increments');
      assert.deepEqual([events(onA, 'kv-incr')[10], events(onB, 'kv-incr')[10]], [1, 1]);
    } finally {
      await Promise.all([a, b].map((h) => h.stop()));
    }
    const later = await startHost({ plugins: ['probe'], config });
    try {
      assert.equal(await kvOf(later), 30, 'kept in Redis across restarts');
    } finally {
      await later.stop();
    }
  });

  test('mew-infra\'s online services are right across nodes: a service online on two nodes stays online until its last socket anywhere leaves', async () => {
    const config = clusterConfig(redis, '[plugins.mew-infra]\nadmin_secret = "s3cret"\n');
    const [a, b] = await Promise.all([0, 1].map(() => startHost({ plugins: ['mew-infra'], config })));
    const online = async (h) => (await (await fetch(`${h.url}/api/plugins/mew-infra/kv/online-services`, {
      headers: { authorization: `Bearer ${API_KEY}` },
    })).json()).value;
    const service = async (h) => {
      const s = io(`${h.url}/infra`, { transports: ['websocket'], reconnection: false, auth: { adminSecret: 's3cret', serviceType: 'translator' } });
      await once(s, 'connect');
      return s;
    };
    try {
      const onA = await service(a);
      const onB = await service(b);
      assert.deepEqual([await online(a), await online(b)], [['translator'], ['translator']]);
      onA.close();
      const calls = async () => (await metrics(a.url))['chanhost_plugin_calls_total{plugin="mew-infra",hook="disconnect"}'];
      await until(async () => (await calls()) === 1, 5000, 'A saw its socket leave');
      assert.deepEqual([await online(a), await online(b)], [['translator'], ['translator']], 'still connected on B, and A knows it');
      onB.close();
      await until(async () => (await online(a)).length === 0, 5000, 'offline everywhere');
    } finally {
      await Promise.all([a, b].map((h) => h.stop()));
    }
  });

  test('Misskey\'s bus on the cluster\'s Redis (its default): each node reads it and each client gets each event once', async () => {
    const bus = `[misskey.bus]\nchannel = "mk.cluster.test"\n`;
    const config = clusterConfig(redis, bus);
    const [a, b] = await Promise.all([0, 1].map(() => startHost({ plugins: ['misskey', 'probe'], config })));
    try {
      await until(async () => (await metrics(a.url)).chanhost_misskey_bus_up === 1 && (await metrics(b.url)).chanhost_misskey_bus_up === 1, 10000, 'both on the bus');
      const streams = [await rawStream(a), await rawStream(b)];
      for (const ws of streams) sendJson(ws, { type: 'connect', body: { channel: 'globalTimeline', id: 'g', params: {}, pong: true } });
      await Promise.all(streams.map((ws) => frame(ws, (f) => f.type === 'connected')));
      const n1 = note({ id: 'cn1' });
      assert.equal(await redis.publish('mk.cluster.test', JSON.stringify({ channel: 'notesStream', message: n1 })), 2, 'both nodes subscribed');
      await Promise.all(streams.map((ws) => frame(ws, (f) => f.body?.type === 'note')));
      // A sentinel after: nothing more than the one note came before it.
      await redis.publish('mk.cluster.test', JSON.stringify({ channel: 'notesStream', message: note({ id: 'cn2' }) }));
      await Promise.all(streams.map((ws) => frame(ws, (f) => f.body?.type === 'note' && f.body.body.id === 'cn2')));
      for (const ws of streams) assert.deepEqual(events(ws, 'note').map((n) => n.id), ['cn1', 'cn2']);
    } finally {
      await Promise.all([a, b].map((h) => h.stop()));
    }
  });

  test('a node that stops leaves the count at once; one killed (SIGKILL) is gone within node_ttl_ms', async () => {
    const config = clusterConfig(redis);
    const [a, b, c] = await Promise.all([0, 1, 2].map(() => startHost({ plugins: ['probe'], config })));
    try {
      await until(async () => (await health(a)).cluster.nodes === 3, 10000, 'three nodes');
      await b.stop();
      await until(async () => (await health(a)).cluster.nodes === 2, 2000, 'two nodes');
      const killed = once(c.proc, 'exit');
      c.proc.kill('SIGKILL');
      await killed;
      await until(async () => (await health(a)).cluster.nodes === 1, 5000, 'one node');
      assert.equal((await metrics(a.url)).chanhost_cluster_nodes, 1);
    } finally {
      await Promise.all([a, b, c].map((h) => h.stop()));
    }
  });
});
