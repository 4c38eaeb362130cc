// Connection state recovery ([socketio.recovery]) with the real
// socket.io-client 4.8: a client whose connection is cut (a TCP proxy
// between it and chanhost drops every connection) reconnects by itself
// with {pid, offset} and gets its id, its rooms and every event published
// meanwhile, in order, exactly once, before new ones; on WebSocket and on
// polling, on one node and in a two-node cluster on a real redis-server
// where the first node is SIGKILLed. Plugins built against 0.1.0 and 0.2.0
// keep serving (their sockets are not recovered) beside a 0.4.0 plugin
// that is told of each recovery.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { io as connect } from 'socket.io-client';
import { startHost, startRedis, until, next, collect, metrics, sleep, API_KEY } from './helpers.mjs';

/**
 * A TCP proxy to `target` (`http://host:port`): `cut()` drops every
 * connection (the network is lost), `down()` also refuses new ones until
 * `up()`, `retarget(url)` sends new connections elsewhere.
 */
async function proxy(target) {
  let to = new URL(target);
  let refusing = false;
  const pairs = new Set();
  const server = net.createServer((client) => {
    if (refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(to.port), to.hostname);
    const pair = [client, upstream];
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const p = {
    url: `http://127.0.0.1:${server.address().port}`,
    cut() {
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      pairs.clear();
    },
    down() {
      refusing = true;
      p.cut();
    },
    up() {
      refusing = false;
    },
    retarget(url) {
      to = new URL(url);
    },
    close() {
      p.cut();
      server.close();
    },
  };
  return p;
}

const CONFIG = `
[socketio]
ping_interval_ms = 200
ping_timeout_ms = 300
[socketio.recovery]
max_disconnection_ms = 60000
`;

/** A socket.io-client that reconnects by itself; every event it gets is kept. */
async function client(url, { auth = {}, transports = ['websocket'], nsp = '/' } = {}) {
  const socket = connect(`${url}${nsp === '/' ? '' : nsp}`, {
    auth,
    transports,
    forceNew: true,
    reconnectionDelay: 700,
    reconnectionDelayMax: 700,
    randomizationFactor: 0,
  });
  socket.got = [];
  socket.onAny((event, ...args) => socket.got.push([event, ...args]));
  await once(socket, 'connect');
  // The conformance plugin's `auth` event follows the CONNECT reply.
  if (nsp === '/' && !auth.quiet && !auth.pid) {
    await until(() => socket.got.some(([e]) => e === 'auth'), 5000, 'auth event');
  }
  return socket;
}

const events = (socket, name) => socket.got.filter(([e]) => e === name).map(([, ...args]) => args);
/** The `n`s of the `tick` events a socket got, in order. */
const ticks = (socket) => events(socket, 'tick').map(([d]) => d.n);

async function publish(url, room, n, event = 'tick') {
  const res = await fetch(`${url}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify({ room, event, data: { n } }),
  });
  assert.equal(res.status, 200, await res.text());
}

/** The next `connect` of a socket after its connection was lost. */
function reconnected(socket, timeout = 15000) {
  return next(socket, 'connect', timeout);
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

for (const transports of [['websocket'], ['polling']]) {
  describe(`connection state recovery on one node (${transports[0]})`, () => {
    let host; let px;
    before(async () => {
      host = await startHost({ plugins: ['socketio-conformance', 'legacy', 'legacy-v2'], config: CONFIG });
      px = await proxy(host.url);
    });
    after(async () => {
      px?.close();
      await host?.stop();
    });

    test('a cut connection comes back with its id and rooms, and every missed event in order, once, before new ones', async () => {
      const room = `r-${transports[0]}`;
      const s = await client(px.url, { auth: { room }, transports });
      try {
        const { id } = s;
        assert.equal(typeof s._pid, 'string', 'the CONNECT reply carries a pid');
        await publish(host.url, room, 1);
        await until(() => ticks(s).length === 1);
        // Each room event carries its offset as the last argument.
        assert.equal(typeof events(s, 'tick')[0][1], 'string');

        px.down();
        await until(() => s.connected === false, 10000, 'disconnect seen');
        for (const n of range(2, 6)) await publish(host.url, room, n);
        // Sent to the socket itself (`io.to(socketId)`) while away.
        await publish(host.url, id, 0, 'direct');
        px.up();
        await reconnected(s);
        assert.equal(s.recovered, true);
        assert.equal(s.id, id);
        await publish(host.url, room, 7);
        await until(() => ticks(s).includes(7));
        assert.deepEqual(ticks(s), range(1, 7));
        assert.equal(events(s, 'direct').length, 1);
        // The direct event came in its place: after 6, before 7.
        const order = s.got.map(([e, d]) => (e === 'tick' ? d.n : e)).filter((e) => e !== 'auth' && e !== 'recovered');
        assert.deepEqual(order, [1, 2, 3, 4, 5, 6, 'direct', 7]);
        // The plugin was told, and did not connect the socket again.
        const [told] = events(s, 'recovered');
        assert.equal(told[0].socketId, id);
        assert.equal(told[0].missed, 6);
        assert.ok(told[0].rooms.includes(room) && told[0].rooms.includes(id));
        assert.ok(told[0].awayMs > 0);
        assert.equal(events(s, 'auth').length, 1, 'no second connect');
        const m = await metrics(host.url);
        assert.ok(m['chanhost_socketio_recovery_total{result="recovered"}'] >= 1);
      } finally {
        s.close();
      }
    });

    test('events published while the connection is cut again and again are each received once, in order', async () => {
      const room = `busy-${transports[0]}`;
      const s = await client(px.url, { auth: { room }, transports });
      try {
        let n = 0;
        let running = true;
        const publisher = (async () => {
          while (running) {
            n += 1;
            await publish(host.url, room, n);
            await sleep(5);
          }
        })();
        for (let i = 0; i < 3; i++) {
          const before = ticks(s).length;
          await until(() => ticks(s).length > before + 10, 20000, 'ticks flow');
          const back = reconnected(s);
          // Refused until the client sees it: a polling client between two
          // requests would not see a cut alone.
          px.down();
          await until(() => s.connected === false, 10000, 'disconnect seen');
          px.up();
          await back;
          assert.equal(s.recovered, true, `recovery ${i + 1}`);
        }
        running = false;
        await publisher;
        await until(() => ticks(s).length >= n, 20000, `all ${n} ticks`);
        assert.deepEqual(ticks(s), range(1, n));
      } finally {
        s.close();
      }
    });

    test('a socket that got no event yet recovers what was published to it', async () => {
      const room = `quiet-${transports[0]}`;
      const s = await client(px.url, { auth: { room, quiet: true }, transports });
      try {
        const { id } = s;
        assert.equal(s.got.length, 0);
        px.down();
        await until(() => s.connected === false, 10000, 'disconnect seen');
        await publish(host.url, room, 1);
        await publish(host.url, room, 2);
        px.up();
        await reconnected(s);
        assert.equal(s.recovered, true);
        assert.equal(s.id, id);
        await until(() => ticks(s).length === 2);
        assert.deepEqual(ticks(s), [1, 2]);
      } finally {
        s.close();
      }
    });

    test('sockets of 0.1.0 and 0.2.0 plugins serve beside it and reconnect as new sockets', async () => {
      const recovering = await client(px.url, { auth: { room: 'side' }, transports });
      const v1 = await client(px.url, { transports, nsp: '/legacy' });
      const v2 = await client(px.url, { transports, nsp: '/legacy-v2' });
      try {
        assert.equal(v1._pid, undefined);
        assert.equal(v2._pid, undefined);
        v1.emit('echo', 'one');
        v2.emit('echo', 'two');
        await until(() => events(v1, 'echo').length === 1 && events(v2, 'echo').length === 1);
        assert.deepEqual(events(v1, 'echo')[0], [{ wit: '0.1.0', body: 'one' }]);
        assert.deepEqual(events(v2, 'echo')[0], [{ wit: '0.2.0', body: 'two' }]);
        const ids = [recovering.id, v1.id, v2.id];
        const back = [recovering, v1, v2].map((s) => reconnected(s));
        px.cut();
        await Promise.all(back);
        assert.equal(recovering.recovered, true);
        assert.equal(recovering.id, ids[0]);
        assert.ok(!v1.recovered);
        assert.ok(!v2.recovered);
        assert.notEqual(v1.id, ids[1]);
        assert.notEqual(v2.id, ids[2]);
        v2.emit('echo', 'again');
        await until(() => events(v2, 'echo').length === 2);
      } finally {
        for (const s of [recovering, v1, v2]) s.close();
      }
    });
  });
}

describe('connection state recovery: what connects as new', () => {
  let host; let px;
  before(async () => {
    host = await startHost({
      plugins: ['socketio-conformance'],
      config: CONFIG.replace('max_disconnection_ms = 60000', 'max_disconnection_ms = 1500\nhistory_per_room = 3'),
    });
    px = await proxy(host.url);
  });
  after(async () => {
    px?.close();
    await host?.stop();
  });

  test('after max_disconnection_ms the session is gone: a new id, recovered false', async () => {
    const s = await client(px.url, { auth: { room: 'late' } });
    try {
      const { id } = s;
      px.down();
      await until(() => s.connected === false, 10000, 'disconnect seen');
      await sleep(2500);
      px.up();
      await reconnected(s);
      assert.equal(s.recovered, false);
      assert.notEqual(s.id, id);
      // Connected anew: its plugin's connect ran again.
      await until(() => events(s, 'auth').length === 2, 5000, 'second auth');
      const m = await metrics(host.url);
      assert.ok(m['chanhost_socketio_recovery_total{result="unknown"}'] >= 1);
    } finally {
      s.close();
    }
  });

  test('an unknown pid, a foreign offset or a client disconnect give a new socket', async () => {
    const stranger = await client(host.url, { auth: { pid: 'no-such-pid', offset: '1' } });
    assert.equal(stranger.recovered, false);
    stranger.close();

    const s = await client(host.url, { auth: { room: 'own' } });
    const { _pid: pid, id } = s;
    // The client leaves on its own: nothing is kept.
    s.disconnect();
    const again = await client(host.url, { auth: { pid, offset: '1' } });
    assert.equal(again.recovered, false);
    assert.notEqual(again.id, id);
    const bogus = await client(host.url, { auth: { pid: again._pid, offset: 'not-an-offset' } });
    assert.equal(bogus.recovered, false);
    again.close();
    bogus.close();
  });

  test('a history cut short by history_per_room connects as new, and says so in the metrics', async () => {
    const s = await client(px.url, { auth: { room: 'flood' } });
    try {
      const { id } = s;
      await publish(host.url, 'flood', 1);
      await until(() => ticks(s).length === 1);
      px.down();
      await until(() => s.connected === false, 10000, 'disconnect seen');
      // More than the three the room keeps.
      for (const n of range(2, 6)) await publish(host.url, 'flood', n);
      px.up();
      await reconnected(s);
      assert.equal(s.recovered, false);
      assert.notEqual(s.id, id);
      const m = await metrics(host.url);
      assert.ok(m['chanhost_socketio_recovery_total{result="history_cut"}'] >= 1);
      assert.ok(m.chanhost_socketio_recovery_history_cut_total >= 2);
    } finally {
      s.close();
    }
  });

  test('a plugin that refuses the recovery refuses the CONNECT', async () => {
    const s = await client(px.url, { auth: { room: 'refused' } });
    try {
      s.auth.refuseRecovery = true;
      const refused = once(s, 'connect_error');
      px.cut();
      const [err] = await refused;
      assert.equal(err.message, 'recovery refused');
    } finally {
      s.close();
    }
  });

  test('a refused recovery that brought an identity back ends its transport', async () => {
    const s = await client(px.url, { auth: { room: 'refused-identified' } });
    // A second namespace on the same transport keeps the client's manager
    // open when the first is refused (it closes an unused transport itself).
    const other = s.io.socket('/custom', { auth: { quiet: true } });
    other.connect();
    try {
      await once(other, 'connect');
      const who = await s.emitWithAck('identify', 'tok-alice');
      assert.equal(who.count, 1);
      s.auth.refuseRecovery = true;
      const refused = once(s, 'connect_error');
      const closes = collect(s.io, 'close');
      px.cut();
      const [err] = await refused;
      assert.equal(err.message, 'recovery refused');
      // The new transport took alice's identity from the session before
      // the plugin refused: it cannot keep it, so it is closed after the
      // refusal (the first close was the cut).
      await until(() => closes.length === 2, 5000, 'the transport closed');
      // Closed by the server (an Engine.IO close packet).
      assert.equal(closes[1], 'forced close');
    } finally {
      other.close();
      s.close();
    }
  });
});

describe('connection state recovery in a cluster, the first node SIGKILLed', () => {
  let redis; let a; let b; let px;
  before(async () => {
    redis = await startRedis();
    const cluster = `[cluster]\nredis = "${redis.url}"\n${CONFIG}`;
    a = await startHost({ plugins: ['socketio-conformance'], config: cluster });
    b = await startHost({ plugins: ['socketio-conformance'], config: cluster });
    px = await proxy(a.url);
  });
  after(async () => {
    px?.close();
    await a?.stop();
    await b?.stop();
    await redis?.stop();
  });

  for (const transports of [['websocket'], ['polling']]) {
    test(`a socket whose node died recovers on the other one with every missed event (${transports[0]})`, async () => {
      const room = `c-${transports[0]}`;
      if (a.proc.exitCode !== null || a.proc.signalCode !== null) {
        a = await startHost({ plugins: ['socketio-conformance'], config: `[cluster]\nredis = "${redis.url}"\n${CONFIG}` });
      }
      px.retarget(a.url);
      const s = await client(px.url, { auth: { room }, transports });
      // A member of the room on the other node too: both nodes serve it.
      const other = await client(b.url, { auth: { room } });
      try {
        const { id } = s;
        // Published on either node, delivered in offset order.
        for (const n of range(1, 10)) await publish(n % 2 ? a.url : b.url, room, n);
        await until(() => ticks(s).length === 10 && ticks(other).length === 10);
        assert.deepEqual(ticks(s), range(1, 10));

        px.down();
        a.proc.kill('SIGKILL');
        await once(a.proc, 'exit');
        for (const n of range(11, 20)) await publish(b.url, room, n);
        px.retarget(b.url);
        px.up();
        await reconnected(s);
        assert.equal(s.recovered, true);
        assert.equal(s.id, id);
        await publish(b.url, room, 21);
        await until(() => ticks(s).includes(21));
        assert.deepEqual(ticks(s), range(1, 21));
        assert.deepEqual(ticks(other), range(1, 21));
        const [told] = events(s, 'recovered');
        assert.equal(told[0].missed, 10);
      } finally {
        s.close();
        other.close();
      }
    });
  }

  test('events published on both nodes while the connection is cut, then while its node dies, are each received once, in order', async () => {
    const config = `[cluster]\nredis = "${redis.url}"\n${CONFIG}`;
    if (a.proc.exitCode !== null || a.proc.signalCode !== null) {
      a = await startHost({ plugins: ['socketio-conformance'], config });
    }
    px.retarget(a.url);
    const s = await client(px.url, { auth: { room: 'c-busy' } });
    try {
      let n = 0;
      let aAlive = true;
      let running = true;
      // The publish in flight, so that node A is killed between two.
      let inflight = Promise.resolve();
      const publisher = (async () => {
        while (running) {
          n += 1;
          inflight = publish(aAlive && n % 2 ? a.url : b.url, 'c-busy', n);
          await inflight;
          await sleep(5);
        }
      })();
      for (let i = 0; i < 2; i++) {
        const before = ticks(s).length;
        await until(() => ticks(s).length > before + 10, 20000, 'ticks flow');
        const back = reconnected(s);
        px.cut();
        await back;
        assert.equal(s.recovered, true, `recovery ${i + 1}`);
      }
      const before = ticks(s).length;
      await until(() => ticks(s).length > before + 10, 20000, 'ticks flow');
      aAlive = false;
      await inflight;
      // Killed with the connection still up: its session was written to
      // Redis while it was connected.
      a.proc.kill('SIGKILL');
      px.down();
      await once(a.proc, 'exit');
      px.retarget(b.url);
      const back = reconnected(s);
      px.up();
      await back;
      assert.equal(s.recovered, true, 'recovered on the other node');
      running = false;
      await publisher;
      await until(() => ticks(s).length >= n, 20000, `all ${n} ticks`).catch((e) => {
        const got = new Set(ticks(s));
        throw new Error(`${e.message}; missing ${JSON.stringify(range(1, n).filter((x) => !got.has(x)))}`);
      });
      assert.deepEqual(ticks(s), range(1, n));
    } finally {
      s.close();
    }
  });
});
