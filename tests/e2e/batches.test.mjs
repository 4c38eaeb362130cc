// Batched plugin calls (chanhost:plugin@0.4.0): what waits in a plugin's
// queue goes to it in one `messages` or `events` call, in order, and what
// it sends back goes in one `apply`. The `faulty` test plugin (built with
// the SDK) works on request (`busy`), so that what comes meanwhile waits;
// its echoes carry the size of the batch they came in. Plugins built
// against 0.1.0, 0.2.0 and 0.3.0 keep one call per message beside it.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startHost, barrier, collect, until, rawStream, sendJson } from './helpers.mjs';

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe('batched plugin calls', () => {
  let host;
  before(async () => {
    // Calls may run long, so that what comes meanwhile surely waits.
    host = await startHost({
      plugins: ['faulty', 'probe', 'legacy', 'legacy-v2', 'legacy-v3'],
      config: '[plugin_runtime]\ncall_timeout_ms = 5000\n',
    });
  });
  after(() => host.stop());

  const metric = async (key) => (await host.metrics())[key] ?? 0;
  const errors = (hook) => metric(`chanhost_plugin_errors_total{plugin="faulty",hook="${hook}"}`);
  const retried = () => metric('chanhost_plugin_retried_total{plugin="faulty"}');

  async function faulty() {
    const s = host.stream();
    const ch = s.useChannel('faulty', {});
    await barrier(s);
    return ch;
  }

  test('messages that waited come in batches of at most 128, in order inside and across batches', async () => {
    const ch = await faulty();
    const echoes = collect(ch, 'echo');
    const batchesBefore = await metric('chanhost_plugin_batches_total{plugin="faulty"}');
    // While the plugin works, 300 messages queue up behind it.
    ch.send('busy', { ms: 800 });
    for (const n of range(1, 300)) ch.send('echo', n);
    await until(() => echoes.length === 300, 20000, `300 echoes (got ${echoes.length})`);
    assert.deepEqual(echoes.map((e) => e.body), range(1, 300));
    const sizes = echoes.map((e) => e.batch);
    assert.equal(Math.max(...sizes), 128, `batch sizes ${JSON.stringify([...new Set(sizes)])}`);
    assert.ok(await metric('chanhost_plugin_batches_total{plugin="faulty"}') >= batchesBefore + 2);
    // The items count every message, the calls far fewer.
    const items = await metric('chanhost_plugin_items_total{plugin="faulty",hook="message"}');
    const calls = await metric('chanhost_plugin_calls_total{plugin="faulty",hook="message"}');
    assert.ok(items >= 301 && calls < items - 250, `${calls} calls for ${items} messages`);
  });

  test('a lone message goes through at once, alone', async () => {
    const ch = await faulty();
    const echoes = collect(ch, 'echo');
    ch.send('echo', 'alone');
    await until(() => echoes.length === 1);
    assert.equal(echoes[0].batch, 1);
  });

  test('a trap in the middle of a batch: the others are each given again alone and answered once, in order', async () => {
    const ch = await faulty();
    const echoes = collect(ch, 'echo');
    const [errorsBefore, retriedBefore] = [await errors('message'), await retried()];
    const calls = () => metric('chanhost_plugin_calls_total{plugin="faulty",hook="message"}');
    const callsBefore = await calls();
    ch.send('busy', { ms: 800 });
    // Once the plugin works, all that follows waits behind it: one batch.
    await until(async () => (await calls()) > callsBefore, 5000, 'the busy call started');
    for (const n of range(1, 20)) {
      if (n === 10) ch.send('trap', null);
      else ch.send('echo', n);
    }
    await until(() => echoes.length === 19, 20000, `19 echoes (got ${echoes.length})`);
    const expected = range(1, 20).filter((n) => n !== 10);
    assert.deepEqual(echoes.map((e) => e.body), expected);
    // What the failed batch gathered was never sent: every echo is from
    // the retry, one message per call.
    assert.deepEqual(echoes.map((e) => e.batch), expected.map(() => 1));
    // The batch failed, then the trap alone.
    await until(async () => (await errors('message')) === errorsBefore + 2, 10000, 'two failures');
    assert.equal((await retried()) - retriedBefore, 20);
    assert.match(host.stderr, /a batched call failed; each of its items is given again alone.*plugin="faulty" hook="message" items=20/);
    // The rebuilt instance serves on.
    ch.send('echo', 'after');
    await until(() => echoes.length === 20);
    assert.equal(echoes[19].body, 'after');
  });

  test('events of a listened room come in batches, in order; a trap among them fails alone', async () => {
    const ch = await faulty();
    const heard = collect(ch, 'heard');
    const events = (ns, trap) => ns.map((n) => ({ room: 'faulty-in', event: n === trap ? 'trap' : 'tick', data: n }));
    await host.publish([{ room: 'faulty-in', event: 'busy', data: { ms: 800 } }, ...events(range(1, 200))]);
    await until(() => heard.length === 200, 20000, `200 events (got ${heard.length})`);
    assert.deepEqual(heard.map((h) => h.body), range(1, 200));
    assert.ok(Math.max(...heard.map((h) => h.batch)) > 1, 'some came together');

    const errorsBefore = await errors('event');
    await host.publish([{ room: 'faulty-in', event: 'busy', data: { ms: 800 } }, ...events(range(201, 260), 230)]);
    await until(() => heard.length === 259, 20000, `259 events (got ${heard.length})`);
    assert.deepEqual(heard.slice(200).map((h) => h.body), range(201, 260).filter((n) => n !== 230));
    await until(async () => (await errors('event')) >= errorsBefore + 2, 10000, 'the batch and the trap counted');
  });

  test('plugins built against 0.1.0, 0.2.0 and 0.3.0 get one message per call, in order, beside a batching one', async () => {
    const ws = await rawStream(host);
    const echoes = {};
    let connected = 0;
    ws.on('message', (d) => {
      const f = JSON.parse(d.toString());
      if (f.type === 'connected') connected += 1;
      if (f.type === 'channel' && f.body.type === 'echo') (echoes[f.body.id] ??= []).push(f.body.body);
    });
    const channels = { legacy: '0.1.0', 'legacy-v2': '0.2.0', 'legacy-v3': '0.3.0', faulty: null };
    for (const channel of Object.keys(channels)) {
      sendJson(ws, { type: 'connect', body: { channel, id: channel, params: {}, pong: true } });
    }
    await until(() => connected === 4, 10000, 'four channels connected');
    // The batching plugin is kept busy while everyone's messages arrive.
    sendJson(ws, { type: 'ch', body: { id: 'faulty', type: 'busy', body: { ms: 800 } } });
    const calls = async (plugin) => metric(`chanhost_plugin_calls_total{plugin="${plugin}",hook="message"}`);
    const before = {};
    for (const channel of Object.keys(channels)) before[channel] = await calls(channel);
    for (const n of range(1, 50)) {
      for (const channel of Object.keys(channels)) {
        sendJson(ws, { type: 'ch', body: { id: channel, type: 'echo', body: n } });
      }
    }
    // legacy-v2 answers through a timer per instance, which a message
    // coming before it fires replaces: its last echo is the one that counts.
    const done = (c) => (c === 'legacy-v2' ? echoes[c]?.at(-1)?.body === 50 : echoes[c]?.length === 50);
    await until(() => Object.keys(channels).every(done), 20000, 'every echo');
    for (const [channel, wit] of Object.entries(channels)) {
      if (channel === 'legacy-v2') {
        assert.deepEqual(echoes[channel].at(-1), { wit, body: 50 });
        assert.equal((await calls(channel)) - before[channel], 50, `${channel}: one call per message`);
      } else if (wit) {
        assert.deepEqual(echoes[channel], range(1, 50).map((n) => ({ wit, body: n })), channel);
        assert.equal((await calls(channel)) - before[channel], 50, `${channel}: one call per message`);
      } else {
        assert.deepEqual(echoes[channel].map((e) => e.body), range(1, 50));
        assert.ok((await calls(channel)) - before[channel] < 50, 'the batching plugin made fewer calls');
      }
    }
    ws.terminate();
  });
});
