// The Mew gateway plugins (`mew` on `/`, `mew-infra` on `/infra`) with
// socket.io-client, against a small double of the Mew backend.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { once } from 'node:events';
import { io } from 'socket.io-client';
import { startHost, collect, until, jwt, API_KEY } from './helpers.mjs';

/** The Mew API endpoints the plugins call: room lists and message creation. */
async function startBackend() {
  const rooms = { alice: ['server-1', 'dm-ab'], bob: ['server-1', 'dm-ab', 'server-2'] };
  const created = [];
  const server = http.createServer((req, res) => {
    const auth = req.headers.authorization ?? '';
    const token = auth.replace(/^Bearer /, '');
    let user = null;
    try { user = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString()).id; } catch {}
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      if (!user) { res.writeHead(401).end(); return; }
      if (req.method === 'GET' && req.url === '/rooms') {
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(rooms[user] ?? []));
        return;
      }
      const m = req.url.match(/^\/api\/channels\/([^/]+)\/messages$/);
      if (req.method === 'POST' && m) {
        if (m[1] === 'broken') { res.writeHead(500).end('{}'); return; }
        created.push({ user, channel: m[1], body: JSON.parse(body), contentType: req.headers['content-type'] });
        res.writeHead(201, { 'content-type': 'application/json' }).end('{"_id":"m1"}');
        return;
      }
      res.writeHead(404).end();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const origin = `http://127.0.0.1:${server.address().port}`;
  return { origin, created, close: () => server.close() };
}

const token = (id) => jwt({ id, username: id, exp: Math.floor(Date.now() / 1000) + 600 });

let transports = ['websocket'];

function connect(host, nsp, opts = {}) {
  const s = io(`${host.url}${nsp}`, { transports, reconnection: false, forceNew: true, ...opts });
  host.streams.push({ close: () => s.close() });
  return s;
}

function result(s) {
  return new Promise((resolve) => {
    s.once('connect', () => resolve({ ok: true }));
    s.once('connect_error', (e) => resolve({ ok: false, message: e.message }));
  });
}

/** Connects a user and records every event in order until `ready`. */
async function user(host, id, opts = {}) {
  const s = connect(host, '/', { auth: { token: token(id) }, ...opts });
  const events = [];
  s.onAny((event, ...args) => events.push([event, ...args]));
  await until(() => events.some(([e]) => e === 'ready'), 5000, `${id} ready`);
  return { s, events };
}

for (const t of [['websocket'], ['polling']]) describe(`mew gateway over ${t[0]}`, () => {
  let host;
  let backend;
  before(async () => {
    transports = t;
    backend = await startBackend();
    host = await startHost({
      plugins: ['mew', 'mew-infra'],
      config: `
[plugins.mew]
rooms_url = "${backend.origin}/rooms"
api_base = "${backend.origin}/api"
allow_http = ["${backend.origin}"]
[plugins.mew-infra]
admin_secret = "adm1n-s3cret"
[socketio]
cors_origins = ["https://mew.example"]
`,
    });
  });
  after(async () => { await host.stop(); backend.close(); });

  test('an allowed browser origin connects; a disallowed one gets no CORS headers and no WebSocket', async () => {
    const ok = await user(host, 'alice', { extraHeaders: { origin: 'https://mew.example' } });
    ok.s.close();
    const handshake = await fetch(`${host.url}/socket.io/?EIO=4&transport=polling`, { headers: { origin: 'https://evil.example' } });
    assert.equal(handshake.headers.get('access-control-allow-origin'), null);
    const allowed = await fetch(`${host.url}/socket.io/?EIO=4&transport=polling`, { headers: { origin: 'https://mew.example' } });
    assert.equal(allowed.headers.get('access-control-allow-origin'), 'https://mew.example');
    assert.equal(allowed.headers.get('access-control-allow-credentials'), 'true');
    const evil = io(host.url, { transports: ['websocket'], reconnection: false, forceNew: true,
      auth: { token: token('alice') }, extraHeaders: { origin: 'https://evil.example' } });
    host.streams.push({ close: () => evil.close() });
    assert.equal((await result(evil)).ok, false);
  });

  test('refusals: no token, invalid or expired token', async () => {
    assert.deepEqual(await result(connect(host, '/')), { ok: false, message: 'Authentication error: No token provided' });
    assert.deepEqual(await result(connect(host, '/', { auth: { token: 'garbage' } })),
      { ok: false, message: 'Authentication error: Invalid token' });
    const expired = jwt({ id: 'alice', exp: 1000 });
    assert.deepEqual(await result(connect(host, '/', { auth: { token: expired } })),
      { ok: false, message: 'Authentication error: Invalid token' });
    const forged = jwt({ id: 'alice' }, 'not-the-secret');
    assert.deepEqual(await result(connect(host, '/', { auth: { token: forged } })),
      { ok: false, message: 'Authentication error: Invalid token' });
  });

  test('on connect: presence update, initial state, then ready; the cookie works too', async () => {
    const observer = await user(host, 'carol');
    const { events } = await user(host, 'dave', { extraHeaders: { cookie: `theme=dark; mew_access_token=${token('dave')}` }, auth: {} });
    assert.deepEqual(events.map(([e]) => e), ['PRESENCE_UPDATE', 'PRESENCE_INITIAL_STATE', 'ready']);
    assert.deepEqual(events[0][1], { userId: 'dave', status: 'online' });
    assert.deepEqual([...events[1][1]].sort(), ['carol', 'dave']);
    await until(() => observer.events.some(([e, d]) => e === 'PRESENCE_UPDATE' && d.userId === 'dave'));
  });

  test('presence counts tabs: offline only when the last one closes', async () => {
    const observer = await user(host, 'erin');
    const updates = () => observer.events.filter(([e, d]) => e === 'PRESENCE_UPDATE' && d.userId === 'frank').map(([, d]) => d.status);
    const tab1 = await user(host, 'frank');
    const tab2 = await user(host, 'frank');
    assert.equal(tab2.events[0][0], 'PRESENCE_INITIAL_STATE', 'no second online broadcast');
    await until(() => updates().length === 1);
    tab1.s.close();
    // A later event for erin proves no offline went out in between.
    const marker = await user(host, 'gina');
    await until(() => observer.events.some(([e, d]) => e === 'PRESENCE_UPDATE' && d.userId === 'gina'));
    assert.deepEqual(updates(), ['online']);
    tab2.s.close();
    await until(() => updates().length === 2);
    assert.deepEqual(updates(), ['online', 'offline']);
    marker.s.close();
  });

  test('sockets join their user room and the rooms the backend lists; each event arrives once', async () => {
    const alice = await user(host, 'alice');
    const bob = await user(host, 'bob');
    const got = { alice: collect(alice.s, 'MESSAGE_CREATE'), bob: collect(bob.s, 'MESSAGE_CREATE') };
    await host.publish([
      { room: 'dm-ab', event: 'MESSAGE_CREATE', data: { id: 1 } },
      { room: 'server-2', event: 'MESSAGE_CREATE', data: { id: 2 } },
      { room: 'alice', event: 'MESSAGE_CREATE', data: { id: 3 } },
      { room: 'bob', event: 'MESSAGE_CREATE', data: { id: 4 } },
    ]);
    await until(() => got.alice.length === 2 && got.bob.length === 3);
    assert.deepEqual(got.alice.map((m) => m.id), [1, 3]);
    assert.deepEqual(got.bob.map((m) => m.id), [1, 2, 4]);
    // The backend adds alice to a channel later (Mew's refreshRoomsForUser).
    const r = await fetch(`${host.url}/api/rooms/join`, {
      method: 'POST',
      headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify({ user: 'alice', rooms: ['server-2'] }),
    });
    assert.equal(r.status, 200);
    await host.publish({ room: 'server-2', event: 'MESSAGE_CREATE', data: { id: 5 } });
    await until(() => got.alice.length === 3 && got.bob.length === 4);
  });

  test('message/create goes to the backend with the user\'s token; a failure emits error to that socket only', async () => {
    const alice = await user(host, 'alice');
    const bob = await user(host, 'bob');
    const errors = { alice: collect(alice.s, 'error'), bob: collect(bob.s, 'error') };
    alice.s.emit('message/create', { channelId: 'chan-7', content: 'hello', attachments: [], type: 'message/default' });
    await until(() => backend.created.length === 1);
    assert.deepEqual(backend.created[0], {
      user: 'alice',
      channel: 'chan-7',
      body: { content: 'hello', attachments: [], type: 'message/default' },
      contentType: 'application/json',
    });
    alice.s.emit('message/create', { channelId: 'broken', content: 'x' });
    await until(() => errors.alice.length === 1);
    assert.deepEqual(errors.alice[0], { message: 'Failed to create message' });
    alice.s.emit('message/create', { content: 'no channel' });
    await until(() => errors.alice.length === 2);
    assert.equal(errors.bob.length, 0);
  });

  test('infra: the admin secret from the header or auth, never the query; serviceType rules', async () => {
    const infra = (opts) => result(connect(host, '/infra', opts));
    assert.deepEqual(await infra({ auth: { serviceType: 'bot' } }), { ok: false, message: 'Authentication error: Invalid admin secret' });
    assert.deepEqual(await infra({ auth: { adminSecret: 'wrong', serviceType: 'bot' } }),
      { ok: false, message: 'Authentication error: Invalid admin secret' });
    assert.deepEqual(await infra({ query: { adminSecret: 'adm1n-s3cret', serviceType: 'bot' } }),
      { ok: false, message: 'Authentication error: Invalid admin secret' });
    assert.deepEqual(await infra({ auth: { adminSecret: 'adm1n-s3cret' } }),
      { ok: false, message: 'Authentication error: Missing serviceType' });
    assert.deepEqual(await infra({ auth: { adminSecret: 'adm1n-s3cret', serviceType: '  ' } }),
      { ok: false, message: 'Authentication error: Missing serviceType' });
    assert.deepEqual(await infra({ auth: { adminSecret: 'adm1n-s3cret', serviceType: ' sdk ' } }),
      { ok: false, message: 'Authentication error: Reserved serviceType: sdk' });
    assert.deepEqual(await infra({ extraHeaders: { 'x-mew-admin-secret': 'adm1n-s3cret' }, query: { serviceType: 'rss' } }), { ok: true });
  });

  test('infra: services join their room, and their presence is readable from the admin API', async () => {
    const online = async () => (await (await fetch(`${host.url}/api/plugins/mew-infra/kv/online-services`, {
      headers: { authorization: `Bearer ${API_KEY}` },
    })).json()).value;
    const a = connect(host, '/infra', { auth: { adminSecret: 'adm1n-s3cret', serviceType: ' translator ' } });
    const b = connect(host, '/infra', { auth: { adminSecret: 'adm1n-s3cret', serviceType: 'translator' } });
    const other = connect(host, '/infra', { auth: { adminSecret: 'adm1n-s3cret', serviceType: 'webhook' } });
    await Promise.all([result(a), result(b), result(other)]);
    assert.ok((await online()).includes('translator'));
    const got = { a: collect(a, 'SYSTEM_BOT_CONFIG_UPDATE'), b: collect(b, 'SYSTEM_BOT_CONFIG_UPDATE'), other: collect(other, 'SYSTEM_BOT_CONFIG_UPDATE') };
    await host.publish({ room: 'translator', event: 'SYSTEM_BOT_CONFIG_UPDATE', data: { serviceType: 'translator', botId: 'b1' } });
    await host.publish({ room: 'webhook', event: 'SYSTEM_BOT_CONFIG_UPDATE', data: { serviceType: 'webhook', botId: 'b2' } });
    await until(() => got.a.length === 1 && got.b.length === 1 && got.other.length === 1);
    assert.deepEqual(got.a[0], { serviceType: 'translator', botId: 'b1' });
    const disconnects = async () => (await host.metrics())['chanhost_plugin_calls_total{plugin="mew-infra",hook="disconnect"}'];
    const before = await disconnects();
    a.close();
    await until(async () => (await disconnects()) === before + 1, 5000, 'first translator gone');
    assert.ok((await online()).includes('translator'), 'one translator is still connected');
    b.close();
    await until(async () => !(await online()).includes('translator'), 5000, 'translator offline');
    assert.ok((await online()).includes('webhook'));
    // The plugins' own config and the users' tokens stay private.
    for (const path of ['mew-infra/kv/_config', 'mew/kv/_config']) {
      const r = await fetch(`${host.url}/api/plugins/${path}`, { headers: { authorization: `Bearer ${API_KEY}` } });
      assert.equal(r.status, 403, path);
    }
    const missing = await fetch(`${host.url}/api/plugins/mew-infra/kv/nope`, { headers: { authorization: `Bearer ${API_KEY}` } });
    assert.equal(missing.status, 404);
  });
});

describe('mew gateway with a raw Engine.IO client', () => {
  test('a Go-SDK-style client (WebSocket only, 40 with a token, answering pings) gets ready and events', async () => {
    const host = await startHost({ plugins: ['mew'], config: '[socketio]\nping_interval_ms = 150\nping_timeout_ms = 300\n' });
    try {
      const { default: WebSocket } = await import('ws');
      const ws = new WebSocket(`${host.ws}/socket.io/?EIO=4&transport=websocket`);
      host.streams.push({ close: () => ws.terminate() });
      const frames = [];
      let pings = 0;
      ws.on('message', (d) => {
        const f = d.toString();
        if (f === '2') { pings++; ws.send('3'); return; } // the server pings; the client answers
        frames.push(f);
      });
      await once(ws, 'open');
      await until(() => frames.length === 1 && frames[0].startsWith('0{'));
      ws.send(`40${JSON.stringify({ token: token('hank') })}`);
      await until(() => frames.includes('42["ready"]'));
      assert.match(frames[1], /^40\{"sid":"[^"]+"\}$/);
      assert.equal(frames[2], '42["PRESENCE_UPDATE",{"status":"online","userId":"hank"}]');
      assert.equal(frames[3], '42["PRESENCE_INITIAL_STATE",["hank"]]');
      const seen = pings;
      await until(() => pings >= seen + 3, 5000, 'three more ping rounds');
      await host.publish({ room: 'hank', event: 'MESSAGE_CREATE', data: { id: 'x' } });
      await until(() => frames.includes('42["MESSAGE_CREATE",{"id":"x"}]'));
      assert.equal(ws.readyState, WebSocket.OPEN);
    } finally {
      await host.stop();
    }
  });
});

describe('mew gateway limits', () => {
  test('without an admin secret /infra refuses; an origin outside allow_http is denied', async () => {
    const backend = await startBackend();
    const host = await startHost({
      plugins: ['mew', 'mew-infra'],
      config: `
[plugins.mew]
api_base = "${backend.origin}/api"
allow_http = ["http://127.0.0.1:1"]
`,
    });
    try {
      assert.deepEqual(await result(connect(host, '/infra', { auth: { adminSecret: 'x', serviceType: 'bot' } })),
        { ok: false, message: 'Authentication error: Admin secret not configured' });
      const alice = await user(host, 'alice');
      const errors = collect(alice.s, 'error');
      alice.s.emit('message/create', { channelId: 'c1', content: 'hi' });
      await until(() => errors.length === 1);
      assert.equal(backend.created.length, 0, 'the request never left');
      assert.match(host.stderr, /not in allow_http; denied/);
    } finally {
      await host.stop();
      backend.close();
    }
  });
});
