// Engine.IO v4 with raw HTTP requests and WebSocket frames: the handshake,
// heartbeats, timeouts, the upgrade, CORS, and every refusal the reference
// server makes.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import WebSocket from 'ws';
import { io } from 'socket.io-client';
import { startHost, until } from './helpers.mjs';

const CONFIG = `
[socketio]
ping_interval_ms = 300
ping_timeout_ms = 300
connect_timeout_ms = 800
upgrade_timeout_ms = 1000
max_payload = 2000
cors_origins = ["https://app.example"]
`;

describe('Engine.IO', () => {
  let host;
  before(async () => { host = await startHost({ plugins: ['socketio-conformance'], config: CONFIG }); });
  after(() => host.stop());

  const base = () => `${host.url}/socket.io/?EIO=4&transport=polling`;
  const at = (sid) => `${base()}&sid=${sid}`;
  async function get(sid, headers = {}) {
    const r = await fetch(at(sid), { headers });
    return { status: r.status, body: await r.text(), headers: r.headers };
  }
  async function post(sid, body) {
    const r = await fetch(at(sid), { method: 'POST', body });
    return { status: r.status, body: await r.text() };
  }
  async function handshake(headers = {}) {
    const r = await fetch(base(), { headers });
    const body = await r.text();
    assert.equal(r.status, 200, body);
    assert.equal(body[0], '0');
    return { open: JSON.parse(body.slice(1)), headers: r.headers };
  }
  /** A session with the default namespace connected. */
  async function connected() {
    const { open } = await handshake();
    assert.equal((await post(open.sid, '40')).body, 'ok');
    const reply = await get(open.sid);
    assert.match(reply.body, /^40\{"sid":"[^"]+"\}/);
    return open.sid;
  }
  /** Polls, answering pings, until something else than a ping comes. */
  async function nextAnsweringPings(sid) {
    for (;;) {
      const { body } = await get(sid);
      if (body !== '2') return body;
      await post(sid, '3');
    }
  }
  /** Opens the upgrade WebSocket of a polling session and probes it. */
  async function probe(sid) {
    const ws = new WebSocket(`${host.ws}/socket.io/?EIO=4&transport=websocket&sid=${sid}`);
    host.streams.push({ close: () => ws.terminate() });
    await once(ws, 'open');
    const frames = [];
    ws.on('message', (d) => frames.push(d.toString()));
    ws.send('2probe');
    await until(() => frames.includes('3probe'));
    return { ws, frames };
  }
  async function assertGone(sid) {
    const r = await get(sid);
    assert.equal(r.status, 400);
    assert.deepEqual(JSON.parse(r.body), { code: 1, message: 'Session ID unknown' });
  }

  test('the handshake carries sid, upgrades and the configured timings', async () => {
    const { open, headers } = await handshake();
    assert.equal(typeof open.sid, 'string');
    assert.ok(open.sid.length >= 16);
    assert.deepEqual(open.upgrades, ['websocket']);
    assert.equal(open.pingInterval, 300);
    assert.equal(open.pingTimeout, 300);
    assert.equal(open.maxPayload, 2000);
    assert.match(headers.get('content-type'), /^text\/plain/);
  });

  test('the server pings; an answered ping keeps the session, a missed one ends it', async () => {
    const sid = await connected();
    assert.equal((await get(sid)).body, '2');
    assert.equal((await post(sid, '3')).body, 'ok');
    assert.equal((await get(sid)).body, '2', 'still alive for the next ping');
    // No pong this time: the pending poll gets the close packet.
    assert.equal((await get(sid)).body, '1');
    await assertGone(sid);
  });

  test('a session that connects no namespace in time is closed', async () => {
    const { open } = await handshake();
    assert.equal(await nextAnsweringPings(open.sid), '1');
    await assertGone(open.sid);
  });

  test('unknown versions, transports, sids and methods are refused like the reference server', async () => {
    const cases = [
      [`${host.url}/socket.io/?EIO=3&transport=polling`, 'GET', 400, { code: 5, message: 'Unsupported protocol version' }],
      [`${host.url}/socket.io/?transport=polling`, 'GET', 400, { code: 5, message: 'Unsupported protocol version' }],
      [`${host.url}/socket.io/?EIO=4&transport=carrier-pigeon`, 'GET', 400, { code: 0, message: 'Transport unknown' }],
      [`${host.url}/socket.io/?EIO=4&transport=polling&sid=nope`, 'GET', 400, { code: 1, message: 'Session ID unknown' }],
      [`${host.url}/socket.io/?EIO=4&transport=polling`, 'PUT', 400, { code: 2, message: 'Bad handshake method' }],
      [`${host.url}/socket.io/?EIO=4&transport=websocket`, 'GET', 400, { code: 3, message: 'Bad request' }],
    ];
    for (const [url, method, status, body] of cases) {
      const r = await fetch(url, { method });
      assert.equal(r.status, status, url);
      assert.deepEqual(await r.json(), body, `${method} ${url}`);
    }
  });

  test('a client close over polling is answered ok and ends the session', async () => {
    const sid = await connected();
    const r = await post(sid, '1');
    assert.deepEqual(r, { status: 200, body: 'ok' });
    await assertGone(sid);
  });

  test('a session a plugin closes ends even if the client never polls again', async () => {
    const sid = await connected();
    const before = (await host.metrics()).chanhost_connections;
    assert.equal((await post(sid, '42["close-me"]')).body, 'ok');
    // No GET fetches the close packet: the session still goes.
    await until(async () => (await host.metrics()).chanhost_connections === before - 1, 10000, 'session gone');
    await assertGone(sid);
  });

  test('a second concurrent poll closes the session', async () => {
    const sid = await connected();
    const first = get(sid);
    await new Promise((r) => setTimeout(r, 50));
    const second = await get(sid);
    assert.equal(second.status, 400);
    assert.equal((await first).body, '1');
    await assertGone(sid);
  });

  test('a body over maxPayload closes the session', async () => {
    const sid = await connected();
    const r = await post(sid, `42${JSON.stringify(['message', 'x'.repeat(3000)])}`);
    assert.equal(r.status, 413);
    await assertGone(sid);
  });

  test('malformed packets close only that session', async () => {
    const bystander = io(host.url, { transports: ['websocket'], forceNew: true, reconnection: false });
    host.streams.push({ close: () => bystander.close() });
    await once(bystander, 'connect');
    for (const bad of ['9', '4abc', '42{}', '42abc["a"]', '42["a"', '42["connect"]', '4', '41{}', '44{"message":"x"}',
      '451-["a",{"_placeholder":true,"num":3}]', '452-["a",{"_placeholder":true,"num":0}]', 'bAQI=',
      '42/not-connected,["a"]']) {
      const sid = await connected();
      const r = await post(sid, bad);
      assert.equal(r.status, 400, bad);
      await assertGone(sid);
    }
    const back = once(bystander, 'message-back');
    bystander.emit('message', 'still here');
    assert.deepEqual(await back, ['still here']);
  });

  test('binary attachments over polling are base64 records', async () => {
    const sid = await connected();
    assert.equal((await post(sid, '451-["message",{"_placeholder":true,"num":0}]\x1ebAQID')).body, 'ok');
    const r = await get(sid);
    assert.equal(r.body, '451-["message-back",{"_placeholder":true,"num":0}]\x1ebAQID');
  });

  test('the upgrade: probe, noop to the pending poll, then polling is refused', async () => {
    const sid = await connected();
    const pending = get(sid);
    const { ws, frames } = await probe(sid);
    assert.equal((await pending).body, '6');
    ws.send('5');
    ws.send('42["message","over ws"]');
    await until(() => frames.some((f) => f.startsWith('42["message-back"')));
    assert.equal(frames.find((f) => f.startsWith('42')), '42["message-back","over ws"]');
    const r = await get(sid);
    assert.equal(r.status, 400);
    assert.deepEqual(JSON.parse(r.body), { code: 3, message: 'Bad request' });
    // Heartbeats continue over the WebSocket.
    await until(() => frames.includes('2'));
    ws.send('3');
  });

  test('a client close while a poll waits: that poll gets a noop, the next an unknown sid', async () => {
    const { open } = await handshake();
    const pending = get(open.sid);
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(await post(open.sid, '1'), { status: 200, body: 'ok' });
    assert.deepEqual([(await pending).status, (await pending).body], [200, '6']);
    const next = await get(open.sid);
    assert.equal(next.status, 400);
    assert.deepEqual(JSON.parse(next.body), { code: 1, message: 'Session ID unknown' });
  });

  test('a second WebSocket for an upgraded session is accepted, then closed; the session carries on', async () => {
    const sid = await connected();
    const { ws, frames } = await probe(sid);
    ws.send('5');
    const second = new WebSocket(`${host.ws}/socket.io/?EIO=4&transport=websocket&sid=${sid}`);
    second.on('error', () => {});
    const outcome = await Promise.race([
      once(second, 'open').then(() => 'open'),
      once(second, 'unexpected-response').then(() => 'refused'),
    ]);
    assert.equal(outcome, 'open');
    await once(second, 'close');
    ws.send('42["message","still here"]');
    await until(() => frames.includes('42["message-back","still here"]'));
  });

  test('an upgrade not completed in time is abandoned; polling carries on', async () => {
    const sid = await connected();
    const { ws, frames } = await probe(sid);
    assert.equal((await get(sid)).body, '6');
    // Keep the session alive over polling while the WebSocket idles.
    let wsClosed = false;
    ws.on('close', () => { wsClosed = true; });
    while (!wsClosed) {
      const { body } = await get(sid);
      assert.equal(body, '2');
      await post(sid, '3');
    }
    // Never sent `5`: the WebSocket was dropped after upgrade_timeout_ms,
    // and the session still works over polling.
    assert.equal((await post(sid, '42["message","by poll"]')).body, 'ok');
    assert.equal(await nextAnsweringPings(sid), '42["message-back","by poll"]');
  });

  test('a WebSocket-only session needs no prior handshake', async () => {
    const ws = new WebSocket(`${host.ws}/socket.io/?EIO=4&transport=websocket`);
    host.streams.push({ close: () => ws.terminate() });
    const frames = [];
    ws.on('message', (d) => frames.push(d.toString()));
    await once(ws, 'open');
    await until(() => frames.length >= 1);
    const open = JSON.parse(frames[0].slice(1));
    assert.equal(frames[0][0], '0');
    assert.deepEqual(open.upgrades, []);
    ws.send('40{"k":1}');
    await until(() => frames.some((f) => f.startsWith('42["auth"')));
    assert.match(frames[1], /^40\{"sid":"[^"]+"\}$/);
    assert.equal(frames[2], '42["auth",{"k":1}]');
    // A message over maxPayload closes it with 1009.
    const closed = once(ws, 'close');
    ws.send(`42["message","${'y'.repeat(3000)}"]`);
    const [code] = await closed;
    assert.equal(code, 1009);
  });

  test('CORS: allowed origins get credentials; others get no CORS headers and no WebSocket', async () => {
    const ok = await handshake({ origin: 'https://app.example' });
    assert.equal(ok.headers.get('access-control-allow-origin'), 'https://app.example');
    assert.equal(ok.headers.get('access-control-allow-credentials'), 'true');
    const evil = await handshake({ origin: 'https://evil.example' });
    assert.equal(evil.headers.get('access-control-allow-origin'), null);
    assert.equal(evil.headers.get('access-control-allow-credentials'), null);
    const none = await handshake();
    assert.equal(none.headers.get('access-control-allow-origin'), null);

    const pre = await fetch(base(), {
      method: 'OPTIONS',
      headers: { origin: 'https://app.example', 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type' },
    });
    assert.equal(pre.status, 204);
    assert.equal(pre.headers.get('access-control-allow-origin'), 'https://app.example');
    assert.match(pre.headers.get('access-control-allow-methods'), /POST/);

    const refused = new WebSocket(`${host.ws}/socket.io/?EIO=4&transport=websocket`, { origin: 'https://evil.example' });
    const [, res] = await once(refused, 'unexpected-response');
    assert.equal(res.statusCode, 403);
    refused.on('error', () => {});
    refused.terminate();
    const allowed = new WebSocket(`${host.ws}/socket.io/?EIO=4&transport=websocket`, { origin: 'https://app.example' });
    host.streams.push({ close: () => allowed.terminate() });
    await once(allowed, 'open');
  });
});
