// The Misskey streaming protocol against a running host, with misskey-js
// (the official client) and raw frames where the client cannot go.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import WebSocket from 'ws';
import {
  startHost, barrier, collect, next, until, rawStream, sendJson, frame, note, jwt,
} from './helpers.mjs';

describe('misskey streaming', () => {
  let host;
  before(async () => {
    host = await startHost({ config: '[misskey]\nmax_captures = 3\nmax_channels = 4\n' });
  });
  after(() => host.stop());

  test('main relays a user\'s own stream and nothing of another user\'s', async () => {
    const alice = host.stream('tok-alice');
    const bob = host.stream('tok-bob');
    const ma = alice.useChannel('main');
    const mb = bob.useChannel('main');
    await barrier(alice);
    await barrier(bob);
    const gotA = collect(ma, 'notification');
    const gotB = collect(mb, 'notification');
    await host.publish({ room: 'mainStream:alice', event: 'notification', data: { id: 'for-alice', n: [1, 2] } });
    await host.publish({ room: 'mainStream:bob', event: 'notification', data: { id: 'for-bob' } });
    await until(() => gotA.length === 1 && gotB.length === 1);
    assert.deepEqual(gotA[0], { id: 'for-alice', n: [1, 2] });
    assert.deepEqual(gotB[0], { id: 'for-bob' });
    // Any event type is relayed unchanged.
    const follows = collect(ma, 'follow');
    await host.publish([{ room: 'mainStream:alice', event: 'follow', data: { id: 'u9' } }]);
    await until(() => follows.length === 1);
    assert.deepEqual(follows[0], { id: 'u9' });
  });

  test('no channel event reaches an instance before its connected', async () => {
    // The probe joins room `ann` in its connect and an event reaches that
    // room before the connect returns (as a busy publisher would).
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p1', params: { room: 'ann', announce: 1 }, pong: true } });
    await frame(ws, (f) => f.body?.type === 'announce');
    const forP1 = ws.frames.map((t) => JSON.parse(t)).filter((f) => f.body?.id === 'p1');
    assert.deepEqual(forP1.map((f) => f.type === 'connected' ? 'connected' : f.body.type), ['connected', 'announce']);
    // A second instance in the same room: the first gets the event at once,
    // the new one after its connected.
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p2', params: { room: 'ann', announce: 2 }, pong: true } });
    await frame(ws, (f) => f.body?.id === 'p2' && f.body?.type === 'announce');
    const forP2 = ws.frames.map((t) => JSON.parse(t)).filter((f) => f.body?.id === 'p2');
    assert.deepEqual(forP2.map((f) => f.type === 'connected' ? 'connected' : f.body.type), ['connected', 'announce']);
    // A refused connect leaves nothing behind.
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p3', params: { room: 'ann', announce: 3, reject: true }, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p4', params: {}, pong: true } });
    await frame(ws, (f) => f.type === 'connected' && f.body.id === 'p4');
    assert.ok(!ws.frames.some((t) => JSON.parse(t).body?.id === 'p3'), 'nothing for a refused instance');
  });

  test('main needs a user: an anonymous connect is silently ignored', async () => {
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'main', id: 'm', pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: {}, pong: true } });
    await frame(ws, (f) => f.type === 'connected' && f.body.id === 'p');
    assert.ok(!ws.frames.some((f) => JSON.parse(f).body?.id === 'm'), 'main must not answer an anonymous stream');
  });

  test('a JWT (HS256, user claim) and the Authorization header authenticate', async () => {
    const s = host.stream(jwt({ id: 'carol', exp: Math.floor(Date.now() / 1000) + 600 }));
    const m = s.useChannel('main');
    await barrier(s);
    const got = collect(m, 'mention');
    await host.publish({ room: 'mainStream:carol', event: 'mention', data: { id: 'x' } });
    await until(() => got.length === 1);

    const ws = await rawStream(host, '', { headers: { authorization: 'Bearer tok-bob' } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'w', params: {} } });
    sendJson(ws, { type: 'ch', body: { id: 'w', type: 'whoami', body: null } });
    const who = await frame(ws, (f) => f.body?.type === 'whoami');
    assert.equal(who.body.body.userId, 'bob');

    // As in Misskey, the header wins over `?i=`.
    const both = await rawStream(host, '?i=tok-alice', { headers: { authorization: 'Bearer tok-bob' } });
    sendJson(both, { type: 'connect', body: { channel: 'probe', id: 'w', params: {} } });
    sendJson(both, { type: 'ch', body: { id: 'w', type: 'whoami', body: null } });
    assert.equal((await frame(both, (f) => f.body?.type === 'whoami')).body.body.userId, 'bob');
  });

  test('an unknown or expired token is refused with HTTP 401 before the upgrade', async () => {
    // An empty `?i=` is a token too (Misskey authenticates it and fails),
    // not an anonymous stream.
    for (const token of ['nope', '', jwt({ id: 'carol', exp: 1000 }), jwt({ id: 'carol' }, 'wrong-secret')]) {
      const ws = new WebSocket(`${host.ws}/streaming?i=${encodeURIComponent(token)}&_t=1`);
      const [, res] = await once(ws, 'unexpected-response');
      assert.equal(res.statusCode, 401);
      // Misskey's own header (StreamingApiServerService).
      assert.equal(res.headers['www-authenticate'], 'Bearer realm="Misskey", error="invalid_token", error_description="Failed to authenticate"');
      ws.on('error', () => {});
      ws.terminate();
    }
    // Other query keys are ignored; no token is an anonymous stream.
    const ws = await rawStream(host, '?_t=123&foo=bar');
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: '1', params: {} } });
    sendJson(ws, { type: 'ch', body: { id: '1', type: 'whoami', body: null } });
    const who = await frame(ws, (f) => f.body?.type === 'whoami');
    assert.equal(who.body.body.userId, null);
  });

  test('globalTimeline delivers public notes outside channels, honouring withRenotes and withFiles', async () => {
    const s = host.stream();
    const all = s.useChannel('globalTimeline', { withRenotes: true, withFiles: false });
    const noRenotes = s.useChannel('globalTimeline', { withRenotes: false });
    const filesOnly = s.useChannel('globalTimeline', { withFiles: true });
    await barrier(s);
    const got = { all: collect(all, 'note'), noRenotes: collect(noRenotes, 'note'), filesOnly: collect(filesOnly, 'note') };
    const notes = {
      plain: note({ text: 'plain' }),
      followers: note({ visibility: 'followers' }),
      home: note({ visibility: 'home' }),
      specified: note({ visibility: 'specified' }),
      inChannel: note({ channelId: 'c1' }),
      pureRenote: note({ text: null, renoteId: 'r1' }),
      quote: note({ text: 'q', renoteId: 'r1' }),
      withFile: note({ fileIds: ['f1'] }),
      renoteOfFile: note({ text: null, renoteId: 'r2', fileIds: [] }),
    };
    for (const n of Object.values(notes)) await host.publish({ room: 'notesStream', event: 'note', data: n });
    const sentinel = note({ text: 'sentinel', fileIds: ['f2'] });
    await host.publish({ room: 'notesStream', event: 'note', data: sentinel });
    await until(() => Object.values(got).every((g) => g.some((n) => n.id === sentinel.id)));
    const ids = (g) => g.map((n) => n.id).filter((id) => id !== sentinel.id);
    assert.deepEqual(ids(got.all), [notes.plain.id, notes.pureRenote.id, notes.quote.id, notes.withFile.id, notes.renoteOfFile.id]);
    assert.deepEqual(ids(got.noRenotes), [notes.plain.id, notes.quote.id, notes.withFile.id]);
    assert.deepEqual(ids(got.filesOnly), [notes.withFile.id]);
    assert.deepEqual(got.all[0], notes.plain, 'the note arrives unchanged');
  });

  test('Misskey\'s own event bus messages can be published unchanged', async () => {
    const s = host.stream('tok-alice');
    const main = s.useChannel('main');
    const tl = s.useChannel('globalTimeline', {});
    s.send('s', { id: 'bus-note' });
    await barrier(s);
    const notes = collect(tl, 'note');
    const notifications = collect(main, 'notification');
    const updates = collect(s, 'noteUpdated');
    const n = note({ text: 'from the bus' });
    // What GlobalEventService sends over Redis: {channel, message}.
    const r = await host.publish([
      { channel: 'notesStream', message: n },
      { channel: 'mainStream:alice', message: { type: 'notification', body: { id: 'nt1' } } },
      { channel: 'noteStream:bus-note', message: { type: 'reacted', body: { id: 'bus-note', body: { reaction: '🎉', userId: 'u3' } } } },
    ]);
    assert.deepEqual(r, { status: 200, body: { published: 3 } });
    await until(() => notes.length === 1 && notifications.length === 1 && updates.length === 1);
    assert.deepEqual(notes[0], n);
    assert.deepEqual(notifications[0], { id: 'nt1' });
    assert.deepEqual(updates[0], { id: 'bus-note', type: 'reacted', body: { reaction: '🎉', userId: 'u3' } });
  });

  test('globalTimeline gives the plugin one event per note, whatever the number of subscribers', async () => {
    const streams = Array.from({ length: 5 }, () => host.stream());
    const chans = streams.map((s, i) => s.useChannel('globalTimeline', { withRenotes: i % 2 === 0 }));
    for (const s of streams) await barrier(s);
    const got = chans.map((c) => collect(c, 'note'));
    const before = (await host.metrics())['chanhost_plugin_items_total{plugin="misskey",hook="event"}'];
    const n = note();
    await host.publish({ room: 'notesStream', event: 'note', data: n });
    await until(() => got.every((g) => g.length === 1));
    const after = (await host.metrics())['chanhost_plugin_items_total{plugin="misskey",hook="event"}'];
    assert.equal(after - before, 1);
  });

  test('filtered broadcasts test each member\'s attribute sets natively', async () => {
    const members = {};
    for (const [name, attrs] of Object.entries({
      plain: {},
      mutesU9: { muting: ['u9'] },
      followsU2: { following: ['u2', 'u3'] },
      followsU2mutesU9: { following: ['u2'], muting: ['u9', 'u8'] },
    })) {
      const s = host.stream();
      const ch = s.useChannel('probe', { room: 'filtered' });
      for (const [attr, values] of Object.entries(attrs)) ch.send('attr', { name: attr, values });
      await barrier(s);
      members[name] = collect(ch, 'note');
    }
    const sender = host.stream();
    const ch = sender.useChannel('probe', {});
    await barrier(sender);
    const before = (await host.metrics())['chanhost_plugin_items_total{plugin="probe",hook="message"}'];
    const send = (id, conditions) => ch.send('fbroadcast', { room: 'filtered', event: 'note', data: { id }, conditions });
    send('by-u9', [{ attribute: 'muting', keys: ['u9'], exclude: true }]);
    send('from-u2', [{ attribute: 'following', keys: ['u2'] }]);
    send('from-u2-renoting-u8', [{ attribute: 'following', keys: ['u2'] }, { attribute: 'muting', keys: ['u2', 'u8'], exclude: true }]);
    send('everyone', []);
    await until(() => Object.values(members).every((g) => g.some((n) => n.id === 'everyone')));
    const ids = (g) => g.map((n) => n.id);
    assert.deepEqual(ids(members.plain), ['by-u9', 'everyone']);
    assert.deepEqual(ids(members.mutesU9), ['everyone']);
    assert.deepEqual(ids(members.followsU2), ['by-u9', 'from-u2', 'from-u2-renoting-u8', 'everyone']);
    assert.deepEqual(ids(members.followsU2mutesU9), ['from-u2', 'everyone']);
    const after = (await host.metrics())['chanhost_plugin_items_total{plugin="probe",hook="message"}'];
    assert.equal(after - before, 4, 'one plugin message per broadcast');
  });

  test('a room of 1,000 subscribers gives the plugin each event once', async () => {
    const sockets = [];
    let received = 0;
    for (let i = 0; i < 1000; i += 100) {
      await Promise.all(Array.from({ length: 100 }, async () => {
        const ws = await rawStream(host);
        sockets.push(ws);
        ws.on('message', (d) => { if (JSON.parse(d.toString()).body?.type === 'note') received++; });
        sendJson(ws, { type: 'connect', body: { channel: 'globalTimeline', id: 'g', params: { withRenotes: false }, pong: true } });
        await frame(ws, (f) => f.type === 'connected');
      }));
    }
    const key = 'chanhost_plugin_items_total{plugin="misskey",hook="event"}';
    const before = (await host.metrics())[key];
    for (let i = 0; i < 3; i++) await host.publish({ room: 'notesStream', event: 'note', data: note() });
    await until(() => received === 3000, 20000, `3000 deliveries (got ${received})`);
    assert.equal((await host.metrics())[key] - before, 3);
    for (const ws of sockets) ws.terminate();
  });

  test('connect with pong is answered connected; unknown channels are ignored', async () => {
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'doesNotExist', id: 'x', pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'globalTimeline', id: 'g', params: {}, pong: true } });
    const c = await frame(ws, (f) => f.type === 'connected');
    assert.deepEqual(c, { type: 'connected', body: { id: 'g' } });
    assert.equal(ws.frames.length, 1, 'nothing for the unknown channel');
  });

  test('garbage frames are tolerated and never answered with non-JSON', async () => {
    const s = host.stream();
    s.heartbeat();
    s.ping();
    const ws = await rawStream(host);
    for (const g of ['h', 'ping', '', '{', '[]', 'null', '{"type":1}', '{"type":"connect"}', '{"type":"connect","body":"x"}',
      '{"type":"ch","body":{"id":"nope","type":"x"}}', '{"type":"subNote","body":{}}', '{"type":"disconnect","body":{"id":"zz"}}']) {
      ws.send(g);
    }
    ws.send(Buffer.from([0, 1, 2]), { binary: true });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: {} } });
    sendJson(ws, { type: 'ch', body: { id: 'p', type: 'echo', body: 'still here' } });
    const e = await frame(ws, (f) => f.body?.type === 'echo');
    assert.equal(e.body.body, 'still here');
    for (const f of ws.frames) assert.doesNotThrow(() => JSON.parse(f), `non-JSON frame ${f}`);
    // misskey-js itself survives its own heartbeat/ping strings.
    await barrier(s);
  });

  test('invalid JSON from a plugin is dropped, not sent', async () => {
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: {} } });
    sendJson(ws, { type: 'ch', body: { id: 'p', type: 'badjson', body: null } });
    await frame(ws, (f) => f.body?.type === 'after-badjson');
    for (const f of ws.frames) assert.doesNotThrow(() => JSON.parse(f));
    assert.ok(!ws.frames.some((f) => JSON.parse(f).body?.type === 'bad'));
  });

  test('subNote captures are ref-counted, aliases work, and the oldest is evicted past the limit', async () => {
    const s = host.stream();
    const updates = collect(s, 'noteUpdated');
    s.send('subNote', { id: 'a' });
    s.send('s', { id: 'a' });
    s.send('sr', { id: 'b' });
    await barrier(s);
    await host.publish({ room: 'noteStream:a', event: 'reacted', data: { reaction: '👍', userId: 'u2' } });
    await until(() => updates.length === 1);
    assert.deepEqual(updates[0], { id: 'a', type: 'reacted', body: { reaction: '👍', userId: 'u2' } });
    s.send('unsubNote', { id: 'a' }); // still captured once
    s.send('un', { id: 'b' }); // released
    await barrier(s);
    await host.publish({ room: 'noteStream:b', event: 'deleted', data: { deletedAt: 'x' } });
    await host.publish({ room: 'noteStream:a', event: 'pollVoted', data: { choice: 1 } });
    await until(() => updates.length === 2);
    assert.deepEqual(updates[1], { id: 'a', type: 'pollVoted', body: { choice: 1 } });
    // Limit 3 in this host's config: capturing c, d, e evicts a (the oldest).
    for (const id of ['c', 'd', 'e']) s.send('s', { id });
    await barrier(s);
    await host.publish({ room: 'noteStream:a', event: 'reacted', data: {} });
    await host.publish({ room: 'noteStream:e', event: 'reacted', data: {} });
    await until(() => updates.length === 3);
    assert.equal(updates[2].id, 'e');
  });

  test('disconnect ends an instance: the plugin is told, events stop', async () => {
    const watcher = host.stream();
    const log = watcher.useChannel('probe', { room: 'probe-log' });
    await barrier(watcher);
    const gone = collect(log, 'disconnected');
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'x1', params: { room: 'r-disc' }, pong: true } });
    await frame(ws, (f) => f.type === 'connected');
    sendJson(ws, { type: 'disconnect', body: { id: 'x1' } });
    await until(() => gone.some((g) => g.id === 'x1'));
    assert.equal(gone.find((g) => g.id === 'x1').reason, 'client');
    await host.publish({ room: 'r-disc', event: 'e', data: 1 });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'x2', params: {}, pong: true } });
    await frame(ws, (f) => f.type === 'connected' && f.body.id === 'x2');
    assert.ok(!ws.frames.some((f) => JSON.parse(f).body?.type === 'e'));
    // Closing the socket ends every instance with `connection-closed`.
    ws.close();
    await until(() => gone.some((g) => g.id === 'x2'));
    assert.equal(gone.find((g) => g.id === 'x2').reason, 'connection-closed');
  });

  test('a reused id replaces the instance; a shared channel opens once; credentials are enforced', async () => {
    const watcher = host.stream();
    const log = watcher.useChannel('probe', { room: 'probe-log' });
    await barrier(watcher);
    const gone = collect(log, 'disconnected');
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'same', params: { room: 'r-old' }, pong: true } });
    await frame(ws, (f) => f.type === 'connected');
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'same', params: { room: 'r-new' }, pong: true } });
    await until(() => gone.some((g) => g.id === 'same' && g.reason === 'replaced'));
    await until(() => ws.frames.filter((f) => JSON.parse(f).type === 'connected').length === 2);
    await host.publish({ room: 'r-old', event: 'old', data: 1 });
    await host.publish({ room: 'r-new', event: 'new', data: 2 });
    await frame(ws, (f) => f.body?.type === 'new');
    assert.ok(!ws.frames.some((f) => JSON.parse(f).body?.type === 'old'));

    sendJson(ws, { type: 'connect', body: { channel: 'probeShared', id: 's1', params: {}, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probeShared', id: 's2', params: {}, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probeUser', id: 'u1', params: {}, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'rej', params: { reject: true }, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'last', params: {}, pong: true } });
    await frame(ws, (f) => f.type === 'connected' && f.body.id === 'last');
    const connected = ws.frames.map((f) => JSON.parse(f)).filter((f) => f.type === 'connected').map((f) => f.body.id);
    assert.deepEqual(connected, ['same', 'same', 's1', 'last']);
  });

  test('at most max_channels instances per stream', async () => {
    const ws = await rawStream(host);
    for (let i = 0; i < 6; i++) sendJson(ws, { type: 'connect', body: { channel: 'probe', id: `c${i}`, params: {}, pong: true } });
    // Replacing an existing id is allowed at the limit.
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'c0', params: {}, pong: true } });
    await until(() => ws.frames.length >= 5);
    sendJson(ws, { type: 'ch', body: { id: 'c0', type: 'echo', body: 'end' } });
    await frame(ws, (f) => f.body?.type === 'echo');
    const connected = ws.frames.map((f) => JSON.parse(f)).filter((f) => f.type === 'connected').map((f) => f.body.id);
    assert.deepEqual(connected, ['c0', 'c1', 'c2', 'c3', 'c0']);
  });

  test('connection-level frames reach plugins that declare them', async () => {
    const watcher = host.stream();
    const log = watcher.useChannel('probe', { room: 'probe-log' });
    await barrier(watcher);
    const frames = collect(log, 'frame');
    const s = host.stream('tok-alice');
    s.send('readNotification');
    await until(() => frames.length === 1);
    assert.equal(frames[0].kind, 'readNotification');
    assert.equal(frames[0].body, null);
  });

  test('plugins can end an instance and close a connection; they cannot address other plugins\' instances', async () => {
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'e', params: { room: 'r-end' }, pong: true } });
    sendJson(ws, { type: 'connect', body: { channel: 'globalTimeline', id: 'g', params: {}, pong: true } });
    await until(() => ws.frames.length === 2);
    sendJson(ws, { type: 'ch', body: { id: 'e', type: 'whoami', body: null } });
    const me = (await frame(ws, (f) => f.body?.type === 'whoami')).body.body;
    sendJson(ws, { type: 'ch', body: { id: 'e', type: 'end', body: null } });
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'after', params: {}, pong: true } });
    await frame(ws, (f) => f.type === 'connected' && f.body.id === 'after');
    await host.publish({ room: 'r-end', event: 'ended?', data: 1 });
    sendJson(ws, { type: 'ch', body: { id: 'after', type: 'echo', body: 'x' } });
    await frame(ws, (f) => f.body?.type === 'echo');
    assert.ok(!ws.frames.some((f) => JSON.parse(f).body?.type === 'ended?'));
    // The probe tries to send to this connection's globalTimeline instance.
    sendJson(ws, { type: 'ch', body: { id: 'after', type: 'poke', body: { connection: me.connection, id: 'g' } } });
    sendJson(ws, { type: 'ch', body: { id: 'after', type: 'echo', body: 'y' } });
    await frame(ws, (f) => f.body?.type === 'echo' && f.body.body === 'y');
    assert.ok(!ws.frames.some((f) => JSON.parse(f).body?.type === 'poked'));

    const closed = once(ws, 'close');
    sendJson(ws, { type: 'ch', body: { id: 'after', type: 'close', body: { reason: 'bye now' } } });
    const [code, reason] = await closed;
    assert.equal(code, 1000);
    assert.equal(reason.toString(), 'bye now');
  });
});

describe('misskey streaming limits and heartbeats', () => {
  let host;
  before(async () => {
    host = await startHost({
      config: '[misskey]\nping_interval_ms = 150\nidle_timeout_ms = 600\n[limits]\nsend_queue = 256\n',
    });
  });
  after(() => host.stop());

  test('the server pings; a peer that answers stays, a silent one is dropped', async () => {
    const alive = await rawStream(host);
    const pings = [];
    alive.on('ping', () => pings.push(Date.now()));
    const silent = await rawStream(host, '', { autoPong: false });
    const [code] = await once(silent, 'close');
    assert.equal(code, 1001);
    assert.ok(pings.length >= 2, `pings seen: ${pings.length}`);
    assert.equal(alive.readyState, WebSocket.OPEN);
    sendJson(alive, { type: 'connect', body: { channel: 'probe', id: 'p', params: {}, pong: true } });
    await frame(alive, (f) => f.type === 'connected');
  });

  test('by default a stream holds 32 channel instances and 1536 captured notes', async () => {
    const ws = await rawStream(host);
    for (let i = 0; i < 33; i++) sendJson(ws, { type: 'connect', body: { channel: 'probe', id: `c${i}`, params: {}, pong: true } });
    sendJson(ws, { type: 'ch', body: { id: 'c0', type: 'echo', body: 'done' } });
    await frame(ws, (f) => f.body?.type === 'echo');
    const connected = ws.frames.map((f) => JSON.parse(f)).filter((f) => f.type === 'connected');
    assert.equal(connected.length, 32);
    assert.equal(connected.at(-1).body.id, 'c31');

    for (let i = 0; i <= 1536; i++) sendJson(ws, { type: 's', body: { id: `note${i}` } });
    sendJson(ws, { type: 'ch', body: { id: 'c0', type: 'echo', body: 'captured' } });
    await frame(ws, (f) => f.body?.body === 'captured');
    await host.publish({ room: 'noteStream:note0', event: 'deleted', data: {} }); // evicted
    await host.publish({ room: 'noteStream:note1', event: 'deleted', data: {} });
    await host.publish({ room: 'noteStream:note1536', event: 'deleted', data: {} });
    await until(() => ws.frames.filter((f) => JSON.parse(f).type === 'noteUpdated').length === 2);
    await host.publish({ room: 'noteStream:note2', event: 'sentinel', data: {} });
    await frame(ws, (f) => f.body?.type === 'sentinel');
    const ids = ws.frames.map((f) => JSON.parse(f)).filter((f) => f.type === 'noteUpdated').map((f) => f.body.id);
    assert.deepEqual(ids, ['note1', 'note1536', 'note2']);
  });

  test('a frame over 64 KiB closes that stream with 1009, and nobody else', async () => {
    const other = await rawStream(host);
    const big = await rawStream(host);
    const closed = once(big, 'close');
    big.send(JSON.stringify({ type: 'ch', body: { id: 'x', type: 'y', body: 'z'.repeat(70 * 1024) } }));
    const [code] = await closed;
    assert.equal(code, 1009);
    sendJson(other, { type: 'connect', body: { channel: 'probe', id: 'p', params: {}, pong: true } });
    await frame(other, (f) => f.type === 'connected');
  });

  test('a slow reader is disconnected; the others keep receiving everything', async () => {
    const fast = host.stream();
    const fastCh = fast.useChannel('probe', { room: 'flood' });
    await barrier(fast);
    const got = collect(fastCh, 'flood');
    const slow = await rawStream(host);
    sendJson(slow, { type: 'connect', body: { channel: 'probe', id: 's', params: { room: 'flood' }, pong: true } });
    await frame(slow, (f) => f.type === 'connected');
    const closed = once(slow, 'close');
    slow._socket.pause(); // stop reading: the kernel buffers fill, then the host's queue
    const payload = 'x'.repeat(16 * 1024);
    const total = 2000;
    for (let i = 0; i < total; i += 100) {
      await host.publish(Array.from({ length: 100 }, (_, j) => ({ room: 'flood', event: 'flood', data: { i: i + j, payload } })));
    }
    await until(async () => (await host.metrics()).chanhost_slow_consumer_closes_total >= 1, 20000, 'slow consumer close');
    await until(() => got.length === total, 20000, `fast reader receiving everything (got ${got.length})`);
    assert.deepEqual(got.map((g) => g.i), Array.from({ length: total }, (_, i) => i));
    slow._socket.resume();
    const [code] = await closed;
    assert.ok(code === 1008 || code === 1006, `close code ${code}`);
  });
});

describe('misskey tokens checked by the backend', () => {
  let host;
  let backend;
  let calls = 0;
  before(async () => {
    const http = await import('node:http');
    const users = { 'mk-token-ivy': { id: 'ivy', username: 'ivy', isModerator: true } };
    backend = http.createServer((req, res) => {
      let body = '';
      req.on('data', (d) => { body += d; });
      req.on('end', () => {
        calls++;
        const { i } = JSON.parse(body || '{}');
        if (i === 'mk-suspended') { res.writeHead(403).end('{"error":{"code":"YOUR_ACCOUNT_SUSPENDED"}}'); return; }
        // An app token without read:account, which `i` needs.
        if (i === 'mk-noperm') { res.writeHead(403).end('{"error":{"code":"PERMISSION_DENIED"}}'); return; }
        if (i === 'mk-broken') { res.writeHead(500).end('{}'); return; }
        const user = users[i];
        if (!user || req.headers.authorization !== `Bearer ${i}`) { res.writeHead(401).end('{"error":{}}'); return; }
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(user));
      });
    });
    backend.listen(0, '127.0.0.1');
    await once(backend, 'listening');
    host = await startHost({
      config: `[auth.backend]\nurl = "http://127.0.0.1:${backend.address().port}/api/i"\ncache_ttl_ms = 60000\n`,
    });
  });
  after(async () => { await host.stop(); backend.close(); });

  test('a Misskey token is resolved by the backend, cached, and reaches the user\'s stream', async () => {
    const s = host.stream('mk-token-ivy');
    const main = s.useChannel('main');
    await barrier(s);
    const got = collect(main, 'notification');
    await host.publish({ channel: 'mainStream:ivy', message: { type: 'notification', body: { id: 'n' } } });
    await until(() => got.length === 1);
    const ws = await rawStream(host, '?i=mk-token-ivy');
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: {} } });
    sendJson(ws, { type: 'ch', body: { id: 'p', type: 'whoami', body: null } });
    const who = (await frame(ws, (f) => f.body?.type === 'whoami')).body.body;
    assert.equal(who.userId, 'ivy');
    assert.equal(who.claims.isModerator, true, 'the backend\'s answer is the claims');
    // Plugins that call the backend on the user's behalf get the token.
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'c', params: { echoCredential: true } } });
    const cred = await frame(ws, (f) => f.body?.type === 'credential');
    assert.equal(cred.body.body, 'mk-token-ivy');
    assert.equal(calls, 1, 'the second connection used the cached answer');
  });

  test('unknown is 401, suspended is 403, a failing backend is 503 — all before the upgrade', async () => {
    for (const [token, status] of [['mk-nope', 401], ['mk-noperm', 401], ['mk-suspended', 403], ['mk-broken', 503]]) {
      const ws = new WebSocket(`${host.ws}/streaming?i=${token}`);
      const [, res] = await once(ws, 'unexpected-response');
      assert.equal(res.statusCode, status, token);
      if (status === 403) {
        // As Misskey writes it: the status alone.
        let body = '';
        for await (const chunk of res) body += chunk;
        assert.equal(body, '', 'a suspended user\'s 403 has no body');
        assert.equal(res.headers['www-authenticate'], undefined);
      }
      ws.on('error', () => {});
      ws.terminate();
    }
    // Local providers still answer without the backend.
    const s = host.stream('tok-alice');
    await barrier(s);
  });
});
