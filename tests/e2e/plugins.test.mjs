// The plugin runtime seen from clients: hot reload keeps connections,
// channels, rooms and captures; faulty plugins fail alone.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  startHost, installPlugin, barrier, collect, until, note, runBin,
} from './helpers.mjs';

describe('hot reload', () => {
  let host;
  before(async () => {
    host = await startHost({ plugins: ['probe'] });
    installPlugin(host.pluginsDir, 'reload-a', 'reloadable');
    await host.waitLog(/plugin loaded plugin="?reloadable/);
  });
  after(() => host.stop());

  async function version(ch) {
    const got = new Promise((resolve) => ch.once('version', resolve));
    ch.send('version', null);
    return got;
  }

  test('a replaced plugin serves the same connection with its new behaviour; an invalid file leaves it serving; removal ends its instances', async () => {
    const s = host.stream('tok-alice');
    let disconnects = 0;
    s.on('_disconnected_', () => { disconnects++; });
    const ch = s.useChannel('reloadable', {});
    const first = await version(ch);
    assert.equal(first.version, 'a');
    s.send('subNote', { id: 'kept' });
    await barrier(s);

    installPlugin(host.pluginsDir, 'reload-b', 'reloadable');
    let v;
    await until(async () => { v = await version(ch); return v.version === 'b'; }, 20000, 'version b');
    assert.ok(v.count > first.count, 'the key-value store survives the reload');
    assert.equal(disconnects, 0, 'the client stayed connected');

    // Rooms and captures made before the reload still deliver.
    const events = collect(ch, 'hello');
    const updates = collect(s, 'noteUpdated');
    await host.publish({ room: 'reloadable', event: 'hello', data: { after: 'reload' } });
    await host.publish({ room: 'noteStream:kept', event: 'reacted', data: { r: 1 } });
    await until(() => events.length === 1 && updates.length === 1);
    assert.deepEqual(updates[0], { id: 'kept', type: 'reacted', body: { r: 1 } });

    // An invalid file is reported and the running version keeps serving.
    const failedBefore = (await host.metrics())['chanhost_plugin_reloads_total{result="error"}'];
    fs.writeFileSync(path.join(host.pluginsDir, 'reloadable.wasm'), 'this is not wasm');
    await until(async () => (await host.metrics())['chanhost_plugin_reloads_total{result="error"}'] > failedBefore, 20000, 'reload error');
    assert.match(host.stderr, /plugin not loaded: not a valid WebAssembly component.*previous version keeps serving plugin="reloadable"/);
    assert.equal((await version(ch)).version, 'b');

    // Removing the file ends the instances; new connects are ignored.
    const watcher = s.useChannel('probe', {});
    await barrier(s);
    fs.unlinkSync(path.join(host.pluginsDir, 'reloadable.wasm'));
    await host.waitLog('plugin removed');
    const late = collect(ch, 'late');
    await host.publish({ room: 'reloadable', event: 'late', data: 1 });
    const echo = new Promise((resolve) => watcher.once('echo', resolve));
    watcher.send('echo', 'after-removal');
    await echo;
    await barrier(s);
    assert.equal(late.length, 0, 'an ended instance gets nothing');
    assert.equal(disconnects, 0);

    // Adding it back serves new instances again.
    installPlugin(host.pluginsDir, 'reload-a', 'reloadable');
    await until(() => host.stderr.split('plugin loaded plugin="reloadable"').length === 3, 20000, 'plugin loaded again');
    const again = s.useChannel('reloadable', {});
    assert.equal((await version(again)).version, 'a');
  });
});

describe('faulty plugins', () => {
  let host;
  before(async () => {
    host = await startHost({
      plugins: ['misskey', 'probe', 'faulty'],
      config: '[plugin_runtime]\ncall_timeout_ms = 1500\nmemory_mb = 16\n',
    });
  });
  after(() => host.stop());

  const errors = async () => (await host.metrics())['chanhost_plugin_errors_total{plugin="faulty",hook="message"}'];

  async function echo(ch, body) {
    const got = new Promise((resolve) => ch.once('echo', resolve));
    ch.send('echo', body);
    return got;
  }

  for (const [fault, cause] of [['spin', /timed out/], ['trap', /trap: /], ['bomb', /out of memory/]]) {
    test(`a plugin that ${fault}s fails that call only; the host and other channels carry on`, async () => {
      const reader = host.stream();
      const tl = reader.useChannel('globalTimeline', {});
      await barrier(reader);
      const notes = collect(tl, 'note');
      const s = host.stream();
      const ch = s.useChannel('faulty', {});
      const warm = await echo(ch, 'warm');
      assert.ok(warm.served >= 1);
      const errorsBefore = await errors();

      ch.send(fault, null);
      // Deliveries to another plugin's channel flow while the fault runs.
      const n = note();
      await host.publish({ room: 'notesStream', event: 'note', data: n });
      await until(() => notes.some((x) => x.id === n.id));
      if (fault === 'spin') assert.equal(await errors(), errorsBefore, 'delivered while the plugin was still spinning');

      await until(async () => (await errors()) === errorsBefore + 1, 20000, 'the fault to be counted');
      // The instance was rebuilt: guest memory starts over, the same client channel works.
      const after = await echo(ch, 'again');
      assert.deepEqual(after, { body: 'again', served: 1, batch: 1 });
      assert.match(host.stderr, new RegExp(`plugin call failed: ${cause.source}.*plugin="faulty" hook="message"`));
      assert.equal(host.proc.exitCode, null, 'host still running');
    });
  }
});

describe('plugin configuration and conflicts', () => {
  test('init gets the [plugins.<name>] table as JSON', async () => {
    const host = await startHost({ plugins: ['probe'], config: '[plugins.probe]\ngreeting = "hi"\nlimits = { n = 3 }\n' });
    try {
      const s = host.stream();
      const ch = s.useChannel('probe', {});
      const got = new Promise((resolve) => ch.once('config', resolve));
      ch.send('config', null);
      assert.deepEqual(await got, { greeting: 'hi', limits: { n: 3 } });
    } finally {
      await host.stop();
    }
  });

  test('a plugin whose init refuses its config is not loaded; check says why', async () => {
    const host = await startHost({ plugins: ['probe', 'misskey'], config: '[plugins.probe]\nfail_init = true\n' });
    try {
      const h = await (await fetch(`${host.url}/healthz`)).json();
      assert.deepEqual(h.plugins, ['misskey']);
      assert.match(host.stderr, /plugin not loaded: init refused the configuration: fail_init is set plugin="probe"/);
      const r = await runBin(['check', path.join(host.pluginsDir, 'probe.wasm'), '--config', host.configPath]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /init refused the configuration: fail_init is set/);
    } finally {
      await host.stop();
    }
  });

  test('a second plugin claiming a served channel is refused; the first keeps it', async () => {
    const host = await startHost({ plugins: ['probe'] });
    try {
      installPlugin(host.pluginsDir, 'probe', 'probe2');
      await host.waitLog(/channel `probe` is already served by plugin `probe`/);
      const h = await (await fetch(`${host.url}/healthz`)).json();
      assert.deepEqual(h.plugins, ['probe']);
      const s = host.stream();
      await barrier(s);
    } finally {
      await host.stop();
    }
  });
});
