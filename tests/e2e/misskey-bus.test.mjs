// Misskey's own event bus read from a real redis-server ([misskey.bus]):
// messages PUBLISHed on Redis in the exact shape of Misskey's
// GlobalEventService reach misskey-js clients, malformed ones are counted
// and harm nothing, the subscription comes back after Redis does, and two
// nodes reading one bus deliver each event once to each of their clients.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
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

  test('a followers-only note update reaches only the author\'s followers', async () => {
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

  test('[misskey.bus] without a channel, or with a URL that is not Redis, is a clear config error', async () => {
    await assert.rejects(
      startHost({ config: `[misskey.bus]\nredis = "${redis.url}"\n` }),
      /misskey\.bus\.channel.*config\.host/s,
    );
    await assert.rejects(
      startHost({ config: '[misskey.bus]\nredis = "http://127.0.0.1:1"\nchannel = "x"\n' }),
      /misskey\.bus\.redis.*not a Redis URL/s,
    );
  });
});
