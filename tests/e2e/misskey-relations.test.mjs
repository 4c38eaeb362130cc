// A signed-in user's relations while streams are open (plugin `misskey`,
// the Misskey API double of misskey-backend.mjs): a mute Misskey publishes
// no event for applies at the next periodic refresh; `localUserUpdated`
// reads the profile (muted instances) again at once; and a new
// connection's relations loading from a slow backend hold up neither the
// notes of open timelines nor anything but that connection's own reply.
import { describe, test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startHost, barrier, collect, until, rawStream, sendJson, frame, note } from './helpers.mjs';
import { startBackend } from './misskey-backend.mjs';

const POLICIES = { ltlAvailable: true, gtlAvailable: true };
const user = (id, extra = {}) => ({ id, username: id, host: null, isModerator: false, isAdmin: false, mutedInstances: [], policies: POLICIES, ...extra });
const by = (userId, host = null) => note({ userId, user: { id: userId, username: userId, host } });

/** Publishes `notes` then a sentinel by `sentinelBy`; the ids `chan` got before it. */
async function round(host, chan, notes, sentinelBy) {
  const got = collect(chan, 'note');
  const sentinel = by(sentinelBy);
  await host.publish([...notes, sentinel].map((n) => ({ channel: 'notesStream', message: n })));
  await until(() => got.some((n) => n.id === sentinel.id), 10000, 'the sentinel');
  return got.filter((n) => n.id !== sentinel.id).map((n) => n.id);
}

async function setup(misskey) {
  const backend = await startBackend();
  backend.db.tokens = {
    'mk-ra': { user: user('ra') },
    'mk-rb': { user: user('rb') },
  };
  backend.db.relations = {
    ra: { following: [{ id: 'f1' }, { id: 'f2' }], mutes: [], renoteMutes: [], channels: [] },
    rb: { following: [{ id: 'f1' }], mutes: [], renoteMutes: [], channels: [] },
  };
  const host = await startHost({ plugins: ['misskey', 'probe'], config: backend.config('', misskey) });
  return { backend, host };
}

describe('Misskey relations while streams are open', () => {
  const started = [];
  after(async () => {
    for (const { host, backend } of started) {
      await host.stop();
      backend.close();
    }
  });

  test('a mute made while a stream is open (Misskey publishes no event for it) applies at the next periodic refresh, per user', async () => {
    const s = await setup('relations_refresh_s = 1\n');
    started.push(s);
    const { host, backend } = s;
    const a = host.stream('mk-ra');
    const a2 = host.stream('mk-ra');
    const home = a.useChannel('homeTimeline', {});
    const home2 = a2.useChannel('homeTimeline', {});
    await barrier(a);
    await barrier(a2);
    const f2 = by('f2');
    assert.deepEqual(await round(host, home, [f2], 'f1'), [f2.id]);
    const loads = backend.calls('mute/list').length;
    assert.equal(loads, 1, 'one load for the user, not one per connection');
    backend.db.relations.ra.mutes = ['f2'];
    // Until a refresh has read the mute, f2's notes still arrive; after it,
    // never again, on both of the user's connections.
    await until(async () => (await round(host, home, [by('f2')], 'f1')).length === 0, 10000, 'the mute applied');
    const got2 = collect(home2, 'note');
    assert.deepEqual(await round(host, home, [by('f2')], 'f1'), []);
    await until(() => got2.length === 1, 5000, 'the sentinel on the other connection');
    assert.equal(got2[0].userId, 'f1', 'the mute applies to every connection of the user');
  });

  test('localUserUpdated (a profile change) reads the user again at once: muted instances apply', async () => {
    const s = await setup('relations_refresh_s = 0\n');
    started.push(s);
    const { host, backend } = s;
    const a = host.stream('mk-ra');
    const gtl = a.useChannel('globalTimeline', {});
    await barrier(a);
    const remote = by('r1', 'far.example');
    assert.deepEqual(await round(host, gtl, [remote], 'f1'), [remote.id]);
    backend.db.tokens['mk-ra'].user.mutedInstances = ['far.example'];
    const before = backend.calls('i').length;
    await host.publish({ channel: 'internal', message: { type: 'localUserUpdated', body: { id: 'ra' } } });
    await until(() => backend.calls('i').length > before, 5000, 'the profile read again');
    await until(async () => (await round(host, gtl, [by('r2', 'far.example')], 'f1')).length === 0, 5000, 'the muted instance applied');
  });

  test('meUpdated on the user\'s main stream reads the profile again too', async () => {
    const s = await setup('relations_refresh_s = 0\n');
    started.push(s);
    const { host, backend } = s;
    const a = host.stream('mk-ra');
    a.useChannel('main');
    const gtl = a.useChannel('globalTimeline', {});
    await barrier(a);
    const remote = by('r1', 'near.example');
    assert.deepEqual(await round(host, gtl, [remote], 'f1'), [remote.id]);
    backend.db.tokens['mk-ra'].user.mutedInstances = ['near.example'];
    await host.publish({ channel: 'mainStream:ra', message: { type: 'meUpdated', body: { id: 'ra', mutedInstances: ['near.example'] } } });
    await until(async () => (await round(host, gtl, [by('r2', 'near.example')], 'f1')).length === 0, 5000, 'the muted instance applied');
  });

  test('while a new connection\'s relations load from a slow backend, open timelines keep receiving notes; the new one gets connected, then its notes', async () => {
    const s = await setup('relations_refresh_s = 0\n');
    started.push(s);
    const { host, backend } = s;
    const a = host.stream('mk-ra');
    const gtl = a.useChannel('globalTimeline', {});
    await barrier(a);
    const notes = collect(gtl, 'note');
    // Every relations endpoint answers in 500 ms from now on.
    for (const e of ['i', 'users/following', 'mute/list', 'renote-mute/list', 'channels/followed']) backend.db.delays[e] = 500;
    const b = await rawStream(host, '?i=mk-rb');
    sendJson(b, { type: 'connect', body: { channel: 'homeTimeline', id: 'h', params: {}, pong: true } });
    await until(() => backend.calls('users/following').some((c) => c.params.i === 'mk-rb'), 5000, 'the load started');
    const sent = Date.now();
    const n = by('f1');
    await host.publish({ channel: 'notesStream', message: n });
    await until(() => notes.some((x) => x.id === n.id), 5000, 'the note on the open timeline');
    const latency = Date.now() - sent;
    assert.ok(!b.frames.some((f) => JSON.parse(f).type === 'connected'), `the note (${latency} ms) came while the new connection still waited`);
    await frame(b, (f) => f.type === 'connected', 5000);
    const after = by('f1');
    await host.publish({ channel: 'notesStream', message: after });
    await frame(b, (f) => f.body?.type === 'note' && f.body.body.id === after.id);
    const seen = b.frames.map((t) => JSON.parse(t)).map((f) => (f.type === 'connected' ? 'connected' : f.body.body.id));
    assert.deepEqual(seen, ['connected', after.id], 'connected first, then notes filtered by the loaded relations');
    assert.equal(backend.calls('mute/list').filter((c) => c.params.i === 'mk-rb').length, 1);
  });

  test('a userList open that waits on a slow users/lists/show does not hold up open timelines either', async () => {
    const s = await setup('relations_refresh_s = 0\n');
    started.push(s);
    const { host, backend } = s;
    backend.db.lists = { lr: { userId: 'rb', userIds: ['f1'] } };
    const a = host.stream('mk-ra');
    const gtl = a.useChannel('globalTimeline', {});
    await barrier(a);
    const b = await rawStream(host, '?i=mk-rb');
    // rb's relations first (fast), then the list lookup (slow).
    sendJson(b, { type: 'connect', body: { channel: 'probe', id: 'p', params: {}, pong: true } });
    await frame(b, (f) => f.type === 'connected');
    const notes = collect(gtl, 'note');
    backend.db.delays['users/lists/show'] = 500;
    sendJson(b, { type: 'connect', body: { channel: 'userList', id: 'l', params: { listId: 'lr' }, pong: true } });
    await until(() => backend.calls('users/lists/show').length === 1, 5000, 'the lookup started');
    const n = by('f1');
    await host.publish({ channel: 'notesStream', message: n });
    await until(() => notes.some((x) => x.id === n.id), 5000, 'the note on the open timeline');
    assert.ok(!b.frames.some((f) => JSON.parse(f).type === 'connected' && JSON.parse(f).body.id === 'l'), 'the list still loading');
    await frame(b, (f) => f.type === 'connected' && f.body.id === 'l', 5000);
    const listed = by('f1');
    await host.publish({ channel: 'notesStream', message: listed });
    await frame(b, (f) => f.body?.id === 'l' && f.body.type === 'note' && f.body.body.id === listed.id);
  });
});
