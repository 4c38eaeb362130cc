// Writing plugins in any WASM language: `chanhost check` on components from
// every toolchain, refusal of a component built against another WIT
// version, compiling a large component without holding up deliveries, and
// `chanhost new-plugin` skeletons built with their README's command.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { io } from 'socket.io-client';
import {
  ROOT, startHost, barrier, collect, until, runBin, pluginPath, touchPlugin,
} from './helpers.mjs';

const LANGS = ['rust', 'js', 'python', 'c'];

/** PATH with the guest toolchains `cargo xtask examples` installs. */
const TOOLS_PATH = [
  path.join(ROOT, 'target/toolchains/py/bin'),
  path.join(ROOT, 'target/toolchains/bin'),
  path.join(ROOT, 'examples/node_modules/.bin'),
  process.env.PATH,
].join(path.delimiter);

async function sh(command, cwd) {
  const proc = spawn('sh', ['-c', command], { cwd, env: { ...process.env, PATH: TOOLS_PATH }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout.on('data', (d) => { out += d; });
  proc.stderr.on('data', (d) => { out += d; });
  const [code] = await once(proc, 'exit');
  assert.equal(code, 0, `${command} failed:\n${out}`);
}

describe('plugin authoring', () => {
  for (const lang of LANGS) {
    test(`check reports what the ${lang} example serves and the WIT it targets`, async () => {
      const r = await runBin(['check', pluginPath(`chat-${lang}`)], {}, 120000);
      assert.equal(r.code, 0, r.stderr);
      // The Rust example builds with the SDK (the current WIT); the others
      // are built against 0.1.0, which the host still links.
      const wit = lang === 'rust' ? '0\\.4\\.0' : '0\\.1\\.0';
      assert.match(r.stdout, new RegExp(`WIT: chanhost:plugin@${wit} \\(world \`plugin\`\\)`));
      assert.match(r.stdout, new RegExp(`chat-${lang} \\(requires a user\\)`));
      assert.match(r.stdout, new RegExp(`Socket\\.IO namespaces: /chat-${lang}`));
    });
  }

  test('a component built against another WIT version is refused clearly, by check and by a running host', async () => {
    const r = await runBin(['check', pluginPath('wrong-version')]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /built against chanhost:plugin@0\.9\.0, but this host implements chanhost:plugin@0\.4\.0 \(and links 0\.1\.0, 0\.2\.0 and 0\.3\.0 beside it\)/);
    const host = await startHost({ plugins: ['probe', 'wrong-version'] });
    try {
      const h = await (await fetch(`${host.url}/healthz`)).json();
      assert.deepEqual(h.plugins, ['probe']);
      assert.match(host.stderr, /plugin not loaded: built against chanhost:plugin@0\.9\.0.*plugin="wrong-version"/);
    } finally {
      await host.stop();
    }
  });

  test('while a large (Python) component compiles, other plugins\' deliveries keep flowing', async () => {
    const host = await startHost({ plugins: ['probe', 'chat-python'] });
    try {
      const s = host.stream();
      const ch = s.useChannel('probe', { room: 'flow' });
      await barrier(s);
      const got = collect(ch, 'tick');
      const m = async () => await host.metrics();
      const reloads = async () => (await m())['chanhost_plugin_reloads_total{result="ok"}'];
      const before = await reloads();
      touchPlugin(host.pluginsDir, 'chat-python');
      await until(async () => (await m()).chanhost_plugin_loads_in_progress === 1, 20000, 'the compile to start');
      let during = 0;
      for (let i = 0; i < 3; i++) {
        await host.publish({ room: 'flow', event: 'tick', data: i });
        await until(() => got.length === i + 1);
        if ((await m()).chanhost_plugin_loads_in_progress === 1) during++;
      }
      assert.ok(during >= 1, 'an event was delivered while the component was compiling');
      await until(async () => (await reloads()) === before + 1, 120000, 'the reload');
    } finally {
      await host.stop();
    }
  });

  test('a restart with an unchanged JavaScript or Python component reads its compiled code from the cache', async () => {
    const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chanhost-cache-'));
    try {
      const loads = async (plugins) => {
        const host = await startHost({ plugins, cacheDir });
        try {
          const m = await host.metrics();
          return [m['chanhost_plugin_code_loads_total{source="compiled"}'], m['chanhost_plugin_code_loads_total{source="cache"}']];
        } finally {
          await host.stop();
        }
      };
      assert.deepEqual(await loads(['chat-js', 'chat-python']), [2, 0]);
      assert.deepEqual(await loads(['chat-js', 'chat-python']), [0, 2]);
    } finally {
      fs.rmSync(cacheDir, { recursive: true, force: true });
    }
  });

  for (const lang of LANGS) {
    test(`new-plugin --lang ${lang}: the skeleton builds with its README command and serves both protocols`, async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chanhost-new-'));
      const name = `hello-${lang}`;
      const where = path.join(dir, name);
      try {
        const r = await runBin(['new-plugin', '--lang', lang, name, '--dir', where]);
        assert.equal(r.code, 0, r.stderr);
        const readme = fs.readFileSync(path.join(where, 'README.md'), 'utf8');
        const command = r.stdout.split('\n').find((l) => l.startsWith('  ')).trim();
        assert.ok(readme.includes(command), `the README gives the build command: ${command}`);
        // Exactly the README's command, installs included (npm from the
        // skeleton's lockfile; pip into the toolchains' virtualenv).
        await sh(command, where);
        const wasm = path.join(where, `${name}.wasm`);
        const host = await startHost({ plugins: ['probe', wasm] });
        try {
          const s = host.stream();
          const ch = s.useChannel(name, {});
          await barrier(s);
          const echoed = collect(ch, 'echo');
          ch.send('echo', { hello: lang });
          const sio = io(`${host.url}/${name}`, { transports: ['websocket'], forceNew: true, reconnection: false });
          const back = new Promise((resolve) => sio.on('echo', (...args) => resolve(args)));
          sio.emit('echo', 1, 'two');
          assert.deepEqual(await back, [1, 'two']);
          sio.close();
          await until(() => echoed.length === 1);
          assert.deepEqual(echoed[0], { hello: lang });
        } finally {
          await host.stop();
        }
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});
