// Operating the host: the CLI, config errors, the publish API, health,
// metrics and graceful shutdown.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  startHost, runBin, pluginPath, publish, rawStream, sendJson, frame, barrier, collect, until,
} from './helpers.mjs';

/** Writes a config file; `text` may be a function of the folder it lives in. */
function tmpConfig(text) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chanhost-cfg-'));
  fs.mkdirSync(path.join(dir, 'plugins'));
  const file = path.join(dir, 'bad.toml');
  fs.writeFileSync(file, typeof text === 'function' ? text(dir) : text);
  return { dir, file };
}

describe('command line and config', () => {
  test('an unknown config key is named, with the file', async () => {
    const { file } = tmpConfig('lisen = "127.0.0.1:0"\n');
    const r = await runBin(['serve', '--config', file]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /lisen/);
    assert.ok(r.stderr.includes(file), r.stderr);
  });

  test('a bad value names its key', async () => {
    const { file } = tmpConfig((dir) => `listen = "nowhere"\nplugins = ${JSON.stringify(path.join(dir, 'plugins'))}\n`);
    const r = await runBin(['serve', '--config', file]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /`listen`: `nowhere` is not a socket address/);
    const { file: f2 } = tmpConfig('[misskey]\nping_interval_ms = "often"\n');
    const r2 = await runBin(['serve', '--config', f2]);
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /ping_interval_ms/);
  });

  test('a missing plugins folder is a clear error', async () => {
    const r = await runBin(['serve', '--listen', '127.0.0.1:0', '--plugins', '/nonexistent/plugins']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /plugins folder \/nonexistent\/plugins does not exist/);
  });

  test('check prints what a plugin serves, or why it is invalid', async () => {
    const ok = await runBin(['check', pluginPath('misskey')]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /implements: chanhost:plugin\/channel@0\.4\.0/);
    assert.match(ok.stdout, /globalTimeline/);
    assert.match(ok.stdout, /listens to rooms: notesStream, internal/);
    assert.match(ok.stdout, /main \(requires a user, shared\)/);

    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chanhost-check-'));
    const junk = path.join(dir, 'junk.wasm');
    fs.writeFileSync(junk, 'not a component');
    const bad = await runBin(['check', junk]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /junk\.wasm: invalid plugin: not a valid WebAssembly component/);
    // A core module (not a component) is refused too.
    const core = path.join(dir, 'core.wasm');
    fs.writeFileSync(core, Buffer.from([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0]));
    const c = await runBin(['check', core]);
    assert.equal(c.code, 1);
    assert.match(c.stderr, /core\.wasm: invalid plugin/);
  });
});

describe('publish API, health and metrics', () => {
  let host;
  before(async () => { host = await startHost(); });
  after(() => host.stop());

  test('a wrong or missing key is 401', async () => {
    const wrong = await publish(host.url, { room: 'r', event: 'e', data: 1 }, 'wrong');
    assert.equal(wrong.status, 401);
    assert.match(wrong.body.error, /wrong API key/);
    const missing = await publish(host.url, { room: 'r', event: 'e', data: 1 }, null);
    assert.equal(missing.status, 401);
  });

  test('a bad body is 400 saying what is wrong', async () => {
    for (const [body, msg] of [
      ['not json', /JSON object/],
      [{ event: 'e', data: 1 }, /room/],
      [{ room: '', event: 'e' }, /`room` must not be empty/],
      [{ room: 'r', event: 'e', extra: 1 }, /extra/],
      [[{ room: 'r', event: 'e' }, { room: 'r' }], /event/],
      ['{"room":"r","event":"e","data":', /invalid publish object/],
    ]) {
      const r = await publish(host.url, body);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.match(r.body.error, msg);
    }
  });

  test('a publish reaches room members; an array publishes each item in order', async () => {
    const s = host.stream();
    const ch = s.useChannel('probe', { room: 'api-room' });
    await barrier(s);
    const got = collect(ch, 'tick');
    const one = await host.publish({ room: 'api-room', event: 'tick', data: 0 });
    assert.deepEqual(one, { status: 200, body: { published: 1 } });
    const many = await host.publish([1, 2, 3].map((i) => ({ room: 'api-room', event: 'tick', data: i })));
    assert.equal(many.body.published, 3);
    await host.publish({ room: 'api-room', event: 'tick' });
    await until(() => got.length === 5);
    assert.deepEqual(got, [0, 1, 2, 3, null]);
  });

  test('healthz and metrics report the host', async () => {
    const h = await (await fetch(`${host.url}/healthz`)).json();
    assert.equal(h.status, 'ok');
    assert.deepEqual(h.plugins, ['misskey', 'probe']);
    const ws = await rawStream(host);
    sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'm', params: { room: 'metrics-room' }, pong: true } });
    sendJson(ws, { type: 's', body: { id: 'metrics-note' } });
    await frame(ws, (f) => f.type === 'connected');
    const before = await host.metrics();
    await host.publish({ room: 'metrics-room', event: 'x', data: 1 });
    await frame(ws, (f) => f.body?.type === 'x');
    const m = await host.metrics();
    for (const k of ['chanhost_connections', 'chanhost_channel_instances', 'chanhost_rooms', 'chanhost_captures']) {
      assert.ok(m[k] >= 1, `${k} = ${m[k]}`);
    }
    assert.equal(m.chanhost_publishes_total - before.chanhost_publishes_total, 1);
    assert.ok(m.chanhost_frames_sent_total > before.chanhost_frames_sent_total);
    assert.ok(m['chanhost_plugin_calls_total{plugin="probe",hook="connect"}'] >= 1);
    assert.equal(m['chanhost_plugin_errors_total{plugin="probe",hook="connect"}'], 0);
    assert.equal(m['chanhost_plugin_reloads_total{result="ok"}'], 2);
    assert.equal(m.chanhost_plugins, 2);
  });
});

describe('without an API key', () => {
  test('/api/* answers loopback clients', async () => {
    const host = await startHost({ apiKey: null });
    try {
      const r = await publish(host.url, { room: 'r', event: 'e' }, null);
      assert.deepEqual(r, { status: 200, body: { published: 1 } });
    } finally {
      await host.stop();
    }
  });
});

describe('graceful shutdown', () => {
  test('SIGTERM closes every client with 1001 and exits 0', async () => {
    const host = await startHost();
    const a = await rawStream(host);
    const b = host.stream('tok-alice');
    await barrier(b);
    const closedA = once(a, 'close');
    host.proc.kill('SIGTERM');
    const [code, reason] = await closedA;
    assert.equal(code, 1001);
    assert.equal(reason.toString(), 'server shutting down');
    const [exit] = await once(host.proc, 'exit');
    assert.equal(exit, 0);
    await host.stop();
  });
});

