// Hostile clients: what one client may make the host hold, how long a
// request may take, how many connections one address or the whole process
// may hold, close codes for bad frames, strict JWTs, unforgeable logs and
// a plugin's back-off. Each test drives the host as an attacker would and
// asserts on what clients receive.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import net from 'node:net';
import { once } from 'node:events';
import WebSocket from 'ws';
import {
  startHost, rawStream, sendJson, frame, until, sleep, jwt, API_KEY, collect, next, barrier,
} from './helpers.mjs';

/** A masked client frame with any header bits (RFC 6455 §5.2). */
function clientFrame(opcode, payload, { rsv = 0, fin = true } = {}) {
  const data = Buffer.from(payload);
  const mask = crypto.randomBytes(4);
  let head;
  if (data.length < 126) {
    head = Buffer.from([(fin ? 0x80 : 0) | rsv | opcode, 0x80 | data.length]);
  } else {
    head = Buffer.alloc(4);
    head[0] = (fin ? 0x80 : 0) | rsv | opcode;
    head[1] = 0x80 | 126;
    head.writeUInt16BE(data.length, 2);
  }
  const masked = Buffer.from(data.map((b, i) => b ^ mask[i % 4]));
  return Buffer.concat([head, mask, masked]);
}

/**
 * A WebSocket over a raw TCP socket: the handshake by hand, then server
 * frames parsed as they come (`frames`: {opcode, payload}); `closeCode`
 * resolves with the code of the server's close frame, or null if the TCP
 * connection ends without one.
 */
async function rawWs(host, path, headers = {}) {
  const { port } = new URL(host.url);
  const sock = net.connect(port, '127.0.0.1');
  await once(sock, 'connect');
  const extra = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('');
  sock.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n`
    + `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${crypto.randomBytes(16).toString('base64')}\r\n${extra}\r\n`);
  let buf = Buffer.alloc(0);
  let upgraded = false;
  const frames = [];
  let resolveClose;
  const closeCode = new Promise((r) => { resolveClose = r; });
  let status = null;
  const statusKnown = new Promise((resolve) => {
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (!upgraded) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        status = Number(buf.subarray(0, end).toString().split(' ')[1]);
        upgraded = status === 101;
        buf = buf.subarray(end + 4);
        resolve(status);
        if (!upgraded) return;
      }
      for (;;) {
        if (buf.length < 2) return;
        let len = buf[1] & 0x7f;
        let off = 2;
        if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
        else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); off = 10; }
        if (buf.length < off + len) return;
        const f = { opcode: buf[0] & 0x0f, payload: buf.subarray(off, off + len) };
        buf = buf.subarray(off + len);
        frames.push(f);
        if (f.opcode === 0x8) resolveClose(f.payload.length >= 2 ? f.payload.readUInt16BE(0) : 1005);
      }
    });
  });
  sock.on('close', () => resolveClose(null));
  sock.on('error', () => {});
  await statusKnown;
  return {
    sock, frames, closeCode, status,
    send: (opcode, payload, opts) => sock.write(clientFrame(opcode, payload, opts)),
    text: (t) => sock.write(clientFrame(0x1, t)),
    texts: () => frames.filter((f) => f.opcode === 0x1).map((f) => f.payload.toString()),
  };
}

/** A raw HTTP/1.1 exchange: writes `request`, resolves with everything the server sent before closing. */
async function rawHttp(host, request, { endAfter = null } = {}) {
  const { port } = new URL(host.url);
  const sock = net.connect(port, '127.0.0.1');
  await once(sock, 'connect');
  let got = '';
  sock.on('data', (d) => { got += d; });
  sock.on('error', () => {});
  sock.write(request);
  if (endAfter) setTimeout(() => sock.destroy(), endAfter);
  await once(sock, 'close');
  return got;
}

/** Engine.IO over a raw WebSocket, namespace `/` connected. */
async function eioSocket(host, auth = {}) {
  const ws = await rawWs(host, '/socket.io/?EIO=4&transport=websocket');
  assert.equal(ws.status, 101);
  await until(() => ws.texts().some((t) => t.startsWith('0{')), 5000, 'open packet');
  ws.text(`40${JSON.stringify(auth)}`);
  await until(() => ws.texts().some((t) => t.startsWith('40')), 5000, 'CONNECT reply');
  return ws;
}

async function upgradeStatus(url, headers = {}) {
  const ws = new WebSocket(url, { headers });
  return new Promise((resolve) => {
    ws.on('open', () => resolve({ status: 101, ws }));
    ws.on('unexpected-response', (_req, res) => resolve({ status: res.statusCode }));
    ws.on('error', () => resolve({ status: null }));
  });
}

const api = (host, path, body) => fetch(`${host.url}${path}`, {
  method: 'POST',
  headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
  body: JSON.stringify(body),
});

describe('what one client may make the host keep', () => {
  let host;
  before(async () => {
    host = await startHost({
      plugins: ['misskey', 'probe', 'socketio-conformance'],
      config: '[socketio]\nmax_payload = 4096\n',
    });
  });
  after(() => host.stop());

  test('Misskey ids and channel names past 128 bytes are ignored like other bad frames', async () => {
    const ws = await rawStream(host);
    const long = 'x'.repeat(129);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: long, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: long, id: '2', pong: true } });
    sendJson(ws, { type: 'subNote', body: { id: long } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'x'.repeat(128), pong: true } });
    await frame(ws, (f) => f.type === 'connected' && f.body.id === 'x'.repeat(128));
    assert.ok(!ws.frames.some((f) => [long, '2'].includes(JSON.parse(f).body?.id)));
    assert.equal((await host.metrics()).chanhost_captures, 0);
    sendJson(ws, { type: 'subNote', body: { id: 'n'.repeat(128) } });
    await until(async () => (await host.metrics()).chanhost_captures === 1, 5000, 'capture');
  });

  test('a Socket.IO namespace past 256 bytes ends the session; a short unknown one is refused', async () => {
    const ws = await eioSocket(host);
    ws.text('40/nope,');
    await until(() => ws.texts().includes('44/nope,{"message":"Invalid namespace"}'), 5000, 'CONNECT_ERROR');
    ws.text(`40/${'n'.repeat(300)},`);
    assert.equal(await ws.closeCode, 1000);
    assert.ok(!ws.texts().some((t) => t.includes('n'.repeat(300))));
  });

  test('attachments of one packet are bounded by maxPayload in all', async () => {
    const ws = await eioSocket(host);
    ws.text('452-["message",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]');
    ws.send(0x2, Buffer.alloc(3000, 1));
    ws.send(0x2, Buffer.alloc(3000, 2));
    assert.equal(await ws.closeCode, 1000);
    assert.ok(!ws.texts().some((t) => t.includes('message-back')));
  });

  test('plugins are handed a bounded subset of the opening request', async () => {
    const headers = { 'x-small': 'a', 'x-big': 'b'.repeat(9000) };
    for (let i = 0; i < 40; i++) headers[`x-fill-${i}`] = 'f'.repeat(1000);
    const ws = await rawStream(host, `?q=${'q'.repeat(10)}`, { headers });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: '1', params: { echoRequest: true } } });
    const got = (await frame(ws, (f) => f.body?.type === 'request')).body.body;
    const names = got.headers.map(([k]) => k);
    assert.ok(names.includes('x-small'));
    assert.ok(!names.includes('x-big'), 'a value over 8 KiB is left out');
    assert.ok(!names.includes('sec-websocket-key') && !names.includes('connection'));
    const size = [...got.headers, ...got.query].reduce((n, [k, v]) => n + k.length + v.length, 0);
    assert.ok(size <= 16384, `${size} bytes kept`);
    assert.ok(names.filter((n) => n.startsWith('x-fill-')).length < 40);
  });

  test('a request head past max_header_bytes gets 431', async () => {
    const res = await rawHttp(host, `GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'h'.repeat(300_000)}\r\n\r\n`);
    assert.match(res, /^HTTP\/1\.1 431/);
  });
});

describe('slow consumers are bounded in bytes', () => {
  let host;
  before(async () => {
    host = await startHost({
      plugins: ['misskey', 'probe', 'socketio-conformance'],
      config: '[limits]\nsend_queue_bytes = 262144\n',
    });
  });
  after(() => host.stop());

  const publishBig = async (room, count, size) => {
    const data = { blob: 'z'.repeat(size) };
    for (let i = 0; i < count; i += 10) {
      const batch = Array.from({ length: Math.min(10, count - i) }, (_, j) => ({ room, event: 'big', data: { ...data, n: i + j } }));
      const r = await host.publish(batch);
      assert.equal(r.status, 200);
    }
  };

  test('a WebSocket client that stops reading is closed; the others get everything', async () => {
    const slow = await rawWs(host, '/streaming');
    slow.text(JSON.stringify({ type: 'connect', body: { channel: 'probe', id: '1', params: { room: 'wide' }, pong: true } }));
    await until(() => slow.texts().some((t) => t.includes('"connected"')), 5000, 'connected');
    slow.sock.pause();
    const reader = host.stream();
    const got = collect(reader.useChannel('probe', { room: 'wide' }), 'big');
    await barrier(reader);
    // 400 frames (under the frame bound of 1024), 20 MB: over the 256 KiB byte bound.
    await publishBig('wide', 400, 50_000);
    await until(() => got.length === 400, 30000, 'every event at the reader');
    await until(async () => (await host.metrics()).chanhost_slow_consumer_closes_total >= 1, 10000, 'slow consumer closed');
    assert.deepEqual(got.map((b) => b.n), [...Array(400).keys()]);
  });

  test('a polling session that stops polling is closed', async () => {
    const base = `${host.url}/socket.io/?EIO=4&transport=polling`;
    const open = await (await fetch(base)).text();
    const sid = JSON.parse(open.slice(1)).sid;
    await fetch(`${base}&sid=${sid}`, { method: 'POST', body: '40{"room":"poll"}' });
    // The CONNECT reply and the plugin's `auth` emit, then nothing is fetched.
    const first = await (await fetch(`${base}&sid=${sid}`)).text();
    assert.match(first, /^40/);
    await publishBig('poll', 100, 20_000);
    const res = await fetch(`${base}&sid=${sid}`);
    assert.equal(res.status, 400);
    assert.equal((await res.json()).code, 1, 'the session is gone');
  });
});

describe('every phase of a request has a deadline', () => {
  let host;
  before(async () => {
    host = await startHost({ plugins: ['probe', 'socketio-conformance'], config: '[limits]\nbody_timeout_ms = 300\n' });
  });
  after(() => host.stop());

  const head = (path, extra) => `POST ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\nContent-Type: application/json\r\n${extra}\r\n`;

  test('a publish whose body stalls gets 408 and its connection is closed', async () => {
    const res = await rawHttp(host, `${head('/api/publish', 'Content-Length: 100\r\n')}{"room":`, { endAfter: 10000 });
    assert.match(res, /^HTTP\/1\.1 408/);
  });

  test('a chunked rooms API body that never ends gets 408', async () => {
    const res = await rawHttp(host, `${head('/api/rooms/join', 'Transfer-Encoding: chunked\r\n')}5\r\n{"use\r\n`, { endAfter: 10000 });
    assert.match(res, /^HTTP\/1\.1 408/);
  });

  test('a polling POST whose body stalls gets 408', async () => {
    const open = await (await fetch(`${host.url}/socket.io/?EIO=4&transport=polling`)).text();
    const sid = JSON.parse(open.slice(1)).sid;
    const res = await rawHttp(host, `POST /socket.io/?EIO=4&transport=polling&sid=${sid} HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n40`, { endAfter: 10000 });
    assert.match(res, /^HTTP\/1\.1 408/);
  });

  test('a refused publish is answered at once, its body never buffered', async () => {
    const res = await rawHttp(host, 'POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Length: 100\r\n\r\n{"ro', { endAfter: 3000 });
    assert.match(res, /^HTTP\/1\.1 401/);
  });

  test('a complete body is served as before', async () => {
    const r = await host.publish({ room: 'r', event: 'e', data: 1 });
    assert.equal(r.status, 200);
  });
});

describe('one client cannot take the whole process', () => {
  test('per-address and process caps refuse new connections, with X-Forwarded-For from trusted proxies only', async () => {
    const host = await startHost({
      plugins: ['probe', 'socketio-conformance'],
      config: '[limits]\nmax_connections = 3\nper_ip_connections = 2\ntrusted_proxies = ["127.0.0.1"]\n',
    });
    try {
      const url = `${host.ws}/streaming`;
      const from = (ip) => ({ 'x-forwarded-for': ip });
      const a1 = await upgradeStatus(url, from('10.0.0.1'));
      const a2 = await upgradeStatus(url, from('10.0.0.1'));
      assert.deepEqual([a1.status, a2.status], [101, 101]);
      assert.equal((await upgradeStatus(url, from('10.0.0.1'))).status, 429);
      const poll = await fetch(`${host.url}/socket.io/?EIO=4&transport=polling`, { headers: from('10.0.0.1') });
      assert.equal(poll.status, 429, 'Socket.IO sessions count too');
      const b1 = await upgradeStatus(url, from('10.0.0.2'));
      assert.equal(b1.status, 101);
      assert.equal((await upgradeStatus(url, from('10.0.0.3'))).status, 503, 'max_connections');
      assert.equal((await fetch(`${host.url}/healthz`)).status, 200);
      const m = await host.metrics();
      assert.equal(m['chanhost_connections_refused_total{reason="per_address"}'], 2);
      assert.equal(m['chanhost_connections_refused_total{reason="capacity"}'], 1);
      a1.ws.close();
      await until(async () => (await host.metrics()).chanhost_connections === 2, 5000, 'a1 gone');
      assert.equal((await upgradeStatus(url, from('10.0.0.1'))).status, 101);
    } finally {
      await host.stop();
    }
  });

  test('however many sockets one client opens, the operational endpoints answer', async () => {
    // An open-file limit of 256: the default max_connections keeps 64 free.
    const host = await startHost({ plugins: ['probe'], wrap: ['prlimit', '--nofile=256:256'] });
    const sockets = [];
    try {
      assert.equal((await host.metrics()).chanhost_connections_max, 192);
      const results = await Promise.all(Array.from({ length: 260 }, async () => {
        const r = await upgradeStatus(`${host.ws}/streaming`);
        if (r.ws) sockets.push(r.ws);
        return r.status;
      }));
      assert.equal(results.filter((s) => s === 101).length, 192);
      assert.equal(results.filter((s) => s === 503).length, 68);
      const health = await (await fetch(`${host.url}/healthz`)).json();
      assert.equal(health.connections, 192);
      const r = await host.publish({ room: 'r', event: 'e', data: 1 });
      assert.equal(r.status, 200, 'the API answers');
      const failures = host.stderr.split('\n').filter((l) => l.includes('accept failed')).length;
      assert.ok(failures <= 1, `accept failures logged ${failures} times`);
    } finally {
      for (const s of sockets) s.terminate();
      await host.stop();
    }
  });
});

describe('timers', () => {
  let host;
  before(async () => {
    host = await startHost({
      plugins: ['socketio-conformance'],
      config: '[socketio]\nping_interval_ms = 300\nping_timeout_ms = 200\nconnect_timeout_ms = 400\n',
    });
  });
  after(() => host.stop());

  test('a connected Socket.IO session that stops answering pings is closed after pingInterval + pingTimeout', async () => {
    const start = Date.now();
    const ws = await eioSocket(host);
    await until(() => ws.texts().includes('2'), 5000, 'a ping');
    const code = await ws.closeCode;
    assert.ok(code === 1000 || code === null, `close ${code}`);
    assert.ok(Date.now() - start >= 500);
  });

  test('an abandoned polling session is reaped the same way', async () => {
    const base = `${host.url}/socket.io/?EIO=4&transport=polling`;
    const sid = JSON.parse((await (await fetch(base)).text()).slice(1)).sid;
    await fetch(`${base}&sid=${sid}`, { method: 'POST', body: '40' });
    await until(async () => (await host.metrics()).chanhost_connections === 0, 5000, 'the session reaped');
    const res = await fetch(`${base}&sid=${sid}`);
    assert.equal((await res.json()).code, 1);
  });
});

describe('close codes per RFC 6455', () => {
  let host;
  before(async () => { host = await startHost({ plugins: ['probe', 'socketio-conformance'] }); });
  after(() => host.stop());

  for (const [path, label] of [['/streaming', 'Misskey'], ['/socket.io/?EIO=4&transport=websocket', 'Socket.IO']]) {
    test(`${label}: invalid UTF-8 in a text frame closes with 1007`, async () => {
      const ws = await rawWs(host, path);
      ws.send(0x1, Buffer.from([0x7b, 0xff, 0xfe, 0x7d]));
      assert.equal(await ws.closeCode, 1007);
    });

    test(`${label}: reserved bits without an extension, or a reserved opcode, close with 1002`, async () => {
      const rsv = await rawWs(host, path);
      rsv.send(0x1, '{}', { rsv: 0x40 });
      assert.equal(await rsv.closeCode, 1002);
      const op = await rawWs(host, path);
      op.send(0x3, 'x');
      assert.equal(await op.closeCode, 1002);
    });
  }

  test('on SIGTERM every client gets 1001, Socket.IO clients included', async () => {
    const h = await startHost({ plugins: ['probe', 'socketio-conformance'] });
    const sio = await Promise.all(Array.from({ length: 20 }, () => eioSocket(h)));
    const mk = await Promise.all(Array.from({ length: 5 }, () => rawWs(h, '/streaming')));
    h.proc.kill('SIGTERM');
    const codes = await Promise.all([...sio, ...mk].map((w) => w.closeCode));
    assert.deepEqual(codes, Array(25).fill(1001));
    await h.stop();
  });
});

describe('credentials and logs', () => {
  let host;
  before(async () => { host = await startHost({ plugins: ['probe'], env: { CHANHOST_LOG: 'debug' } }); });
  after(() => host.stop());

  test('time claims of the wrong type make a JWT invalid', async () => {
    const url = (t) => `${host.ws}/streaming?i=${t}`;
    assert.equal((await upgradeStatus(url(jwt({ id: 'u1', exp: '9999999999' })))).status, 401);
    assert.equal((await upgradeStatus(url(jwt({ id: 'u1', nbf: 'soon' })))).status, 401);
    assert.equal((await upgradeStatus(url(jwt({ id: 'u1', exp: 9999999999 })))).status, 101);
  });

  test('a token cannot write a line of its own into the log, nor be echoed', async () => {
    const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const evil = `${b64({ alg: 'HS256\nFORGED INFO chanhost: owned', typ: 'JWT' })}.${b64({ id: 'u' })}.c2ln`;
    const res = await rawHttp(host, `GET /streaming?i=${evil} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n`
      + 'Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n', { endAfter: 1000 });
    assert.match(res, /^HTTP\/1\.1 401/);
    assert.ok(!res.includes('FORGED'));
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe\nFORGED line', id: '1' } });
    await sleep(200);
    assert.ok(!host.stderr.split('\n').some((l) => l.startsWith('FORGED')), host.stderr.slice(-2000));
  });
});

describe('a plugin backing off', () => {
  test('refused calls are counted and the rebuild comes when the back-off ends, without a call', async () => {
    const host = await startHost({ plugins: ['faulty', 'probe'] });
    try {
      const s = host.stream();
      const ch = s.useChannel('faulty', {});
      await until(async () => (await host.metrics())['chanhost_plugin_calls_total{plugin="faulty",hook="connect"}'] === 1, 5000, 'connected');
      const m = async (k) => (await host.metrics())[k] ?? 0;
      const errors = () => m('chanhost_plugin_errors_total{plugin="faulty",hook="message"}');
      const rebuilds = () => m('chanhost_plugin_rebuilds_total{plugin="faulty"}');
      // Four traps in a row: after the second, each waits out a back-off
      // (200, 400 ms) that ends in a rebuild nobody asked for; the fourth
      // leaves 800 ms of back-off.
      for (let n = 1; n <= 4; n++) {
        const rebuilt = await rebuilds();
        ch.send('trap', {});
        await until(async () => await errors() === n, 5000, `trap ${n}`);
        if (n >= 2 && n < 4) {
          await until(async () => await rebuilds() === rebuilt + (n === 2 ? 2 : 1), 10000, `rebuild after trap ${n}`);
        }
      }
      const rebuilt = await rebuilds();
      ch.send('echo', 1);
      await until(async () => await m('chanhost_plugin_refused_total{plugin="faulty",reason="backoff"}') === 1, 5000, 'a refusal');
      await host.waitLog('plugin backing off after repeated failures');
      // Nothing more is sent: the rebuild is the back-off's own.
      await until(async () => await rebuilds() === rebuilt + 1, 10000, 'rebuild');
      const echo = next(ch, 'echo');
      ch.send('echo', 2);
      assert.equal((await echo).body, 2);
    } finally {
      await host.stop();
    }
  });
});
