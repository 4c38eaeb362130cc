// WIT 0.2.0 end to end: `fetch` answered in a later call while the
// plugin's other calls go on, connects deferred until a fetch comes back
// (`defer-connect` / `settle-connect`), timers; and a component built
// against 0.1.0 serving beside 0.2.0 ones. Driven through the probe and
// legacy test plugins with raw Misskey frames and socket.io-client.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { once } from 'node:events';
import { io } from 'socket.io-client';
import { startHost, rawStream, sendJson, frame, runBin, pluginPath } from './helpers.mjs';

/**
 * A backend double: `/held/<name>` answers only when the test releases
 * `<name>`; `/fail` answers 500; anything else 200 `ok`.
 */
async function backend() {
  const held = new Map();
  const server = http.createServer((req, res) => {
    const m = req.url.match(/^\/held\/(\w+)/);
    if (m) {
      const entry = held.get(m[1]) ?? {};
      entry.res = res;
      held.set(m[1], entry);
      entry.arrived?.();
      return;
    }
    if (req.url === '/fail') { res.writeHead(500); res.end('no'); return; }
    res.end('ok');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const origin = `http://127.0.0.1:${server.address().port}`;
  return {
    origin,
    /** Resolves once a request for `name` is waiting. */
    arrived(name) {
      const entry = held.get(name);
      if (entry?.res) return Promise.resolve();
      return new Promise((resolve) => held.set(name, { ...entry, arrived: resolve }));
    },
    release(name, body = `released ${name}`) {
      held.get(name).res.end(body);
    },
    close: () => server.close(),
  };
}

const chFrames = (ws, id) => ws.frames.map((t) => JSON.parse(t)).filter((f) => f.body?.id === id);

describe('plugins on WIT 0.2.0: fetch, deferred connects, timers', () => {
  let host;
  let back;
  before(async () => {
    back = await backend();
    host = await startHost({
      plugins: ['probe', 'legacy'],
      config: `[plugins.probe]\nallow_http = ["${back.origin}"]\n[plugin_runtime]\npending_connect_ms = 400\n`,
    });
  });
  after(async () => {
    await host?.stop();
    back?.close();
  });

  test('a fetch does not hold up the plugin\'s other calls; its answer comes in a later call', async () => {
    const a = await rawStream(host);
    const b = await rawStream(host);
    for (const ws of [a, b]) sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: {}, pong: true } });
    await Promise.all([a, b].map((ws) => frame(ws, (f) => f.type === 'connected')));
    sendJson(a, { type: 'ch', body: { id: 'p', type: 'fetch', body: { url: `${back.origin}/held/one` } } });
    await back.arrived('one');
    // The backend has not answered: the plugin serves other calls meanwhile.
    sendJson(b, { type: 'ch', body: { id: 'p', type: 'echo', body: 'while waiting' } });
    const echo = await frame(b, (f) => f.body?.type === 'echo');
    assert.equal(echo.body.body, 'while waiting');
    assert.equal(chFrames(a, 'p').filter((f) => f.body.type === 'fetched').length, 0);
    back.release('one', 'hello');
    const got = await frame(a, (f) => f.body?.type === 'fetched');
    assert.deepEqual(got.body.body, { status: 200, body: 'hello' });
    // A refused origin is answered in `fetched` too, with the reason.
    sendJson(a, { type: 'ch', body: { id: 'p', type: 'fetch', body: { url: 'http://127.0.0.1:1/' } } });
    const denied = await frame(a, (f) => f.body?.type === 'fetched' && f.body.body.error);
    assert.match(denied.body.body.error, /not in allow_http/);
  });

  test('a deferred connect is answered when its fetch comes back: connected first, then what the plugin sent meanwhile', async () => {
    const ws = await rawStream(host);
    const other = await rawStream(host);
    sendJson(other, { type: 'connect', body: { channel: 'probe', id: 'o', params: {}, pong: true } });
    await frame(other, (f) => f.type === 'connected');
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'd', params: { deferFetch: `${back.origin}/held/two` }, pong: true } });
    await back.arrived('two');
    // Pending: no reply yet, and the plugin answers others.
    sendJson(other, { type: 'ch', body: { id: 'o', type: 'echo', body: 'meanwhile' } });
    await frame(other, (f) => f.body?.type === 'echo');
    assert.deepEqual(chFrames(ws, 'd'), []);
    back.release('two', 'relations');
    await frame(ws, (f) => f.body?.type === 'fetched');
    const seen = chFrames(ws, 'd').map((f) => (f.type === 'connected' ? 'connected' : f.body.type));
    assert.deepEqual(seen, ['connected', 'fetched']);
    // The instance is open.
    sendJson(ws, { type: 'ch', body: { id: 'd', type: 'echo', body: 'open' } });
    assert.equal((await frame(ws, (f) => f.body?.type === 'echo')).body.body, 'open');
  });

  test('a deferred connect refused on settlement, or never settled, leaves nothing behind; the plugin is told of the one that ran out of time', async () => {
    const log = await rawStream(host);
    sendJson(log, { type: 'connect', body: { channel: 'probe', id: 'log', params: { room: 'probe-log' }, pong: true } });
    await frame(log, (f) => f.type === 'connected');
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'refused', params: { deferFetch: `${back.origin}/fail` }, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'never', params: { defer: true }, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'last', params: {}, pong: true } });
    await frame(ws, (f) => f.type === 'connected' && f.body.id === 'last');
    assert.deepEqual(chFrames(ws, 'refused'), []);
    assert.deepEqual(chFrames(ws, 'never'), []);
    const told = await frame(log, (f) => f.body?.type === 'disconnected' && f.body.body.id === 'never');
    assert.equal(told.body.body.reason, 'server');
    // Neither instance exists: messages to them get nothing.
    sendJson(ws, { type: 'ch', body: { id: 'never', type: 'echo', body: 'x' } });
    sendJson(ws, { type: 'ch', body: { id: 'last', type: 'echo', body: 'y' } });
    await frame(ws, (f) => f.body?.type === 'echo');
    assert.deepEqual(ws.frames.map((t) => JSON.parse(t)).filter((f) => f.body?.type === 'echo').map((f) => f.body.body), ['y']);
  });

  test('timers fire once, in time order; setting a key again replaces its timer and cancel stops one', async () => {
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 't', params: {}, pong: true } });
    await frame(ws, (f) => f.type === 'connected');
    const set = (key, ms) => sendJson(ws, { type: 'ch', body: { id: 't', type: 'timer', body: { key, ms } } });
    set('late', 120);
    set('moved', 5);
    set('moved', 60);
    set('cancelled', 10);
    sendJson(ws, { type: 'ch', body: { id: 't', type: 'cancel-timer', body: { key: 'cancelled' } } });
    await frame(ws, (f) => f.body?.type === 'timer' && f.body.body.key === 'late');
    const fired = chFrames(ws, 't').filter((f) => f.body.type === 'timer').map((f) => f.body.body.key);
    assert.deepEqual(fired, ['moved', 'late']);
  });

  test('a 0.1.0 component serves beside 0.2.0 ones, on both protocols, and check names its version', async () => {
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'legacy', id: 'l', params: {}, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: {}, pong: true } });
    await frame(ws, (f) => f.type === 'connected' && f.body.id === 'p');
    sendJson(ws, { type: 'ch', body: { id: 'l', type: 'echo', body: { n: 1 } } });
    sendJson(ws, { type: 'ch', body: { id: 'p', type: 'echo', body: 'new' } });
    const old = await frame(ws, (f) => f.body?.id === 'l' && f.body.type === 'echo');
    assert.deepEqual(old.body.body, { wit: '0.1.0', body: { n: 1 } });
    assert.equal((await frame(ws, (f) => f.body?.id === 'p' && f.body.type === 'echo')).body.body, 'new');

    const socket = io(`${host.url}/legacy`, { transports: ['websocket'], reconnection: false });
    try {
      await once(socket, 'connect');
      socket.emit('echo', 'sio');
      const [reply] = await once(socket, 'echo');
      assert.deepEqual(reply, { wit: '0.1.0', body: 'sio' });
    } finally {
      socket.close();
    }

    const r = await runBin(['check', pluginPath('legacy')]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /WIT: chanhost:plugin@0\.1\.0 \(world `plugin`\); still linked, the current version is 0\.4\.0/);
  });
});
