// Shared helpers of the end-to-end tests: start a real chanhost process on
// a free port with a temporary plugins folder and config, talk to it with
// misskey-js, raw WebSockets and HTTP.
import { execFile, execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import * as Misskey from 'misskey-js';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = process.env.CHANHOST_ROOT ?? path.resolve(here, '../..');
export const BIN = process.env.CHANHOST_BIN ?? path.join(ROOT, 'target/debug/chanhost');
export const API_KEY = 'test-api-key';
export const JWT_SECRET = 'test-jwt-secret';

/** Path of a built plugin: `plugins/<name>.wasm`, `target/test-plugins/<name>.wasm` or `target/example-plugins/<name>.wasm`. */
export function pluginPath(name) {
  for (const dir of ['plugins', 'target/test-plugins', 'target/example-plugins']) {
    const p = path.join(ROOT, dir, `${name}.wasm`);
    if (fs.existsSync(p)) return p;
  }
  throw new Error(`plugin ${name} is not built (run cargo xtask plugins, or cargo xtask examples)`);
}

/** Copies a plugin (a name, or a path to a .wasm file) into a folder under
 * a name, atomically (write + rename). */
export function installPlugin(dir, name, as = name.endsWith('.wasm') ? path.basename(name, '.wasm') : name) {
  const tmp = path.join(dir, `.${as}.tmp`);
  fs.copyFileSync(name.endsWith('.wasm') ? name : pluginPath(name), tmp);
  fs.renameSync(tmp, path.join(dir, `${as}.wasm`));
}

/**
 * Replaces an installed plugin with the same component plus one custom
 * section: a new file (new hash) that behaves the same, as a hot reload.
 */
export function touchPlugin(dir, name, tag = `${Date.now()}`) {
  const file = path.join(dir, `${name}.wasm`);
  const label = Buffer.from('chanhost-test');
  const payload = Buffer.from(tag);
  const body = Buffer.concat([Buffer.from([label.length]), label, payload]);
  if (body.length > 127) throw new Error('tag too long');
  const section = Buffer.concat([Buffer.from([0, body.length]), body]);
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, Buffer.concat([fs.readFileSync(file), section]));
  fs.renameSync(tmp, file);
}

const AUTH_CONFIG = `
[auth]
tokens = { "tok-alice" = "alice", "tok-bob" = "bob" }
[auth.jwt]
secret = "${JWT_SECRET}"
user_claim = "id"
`;

/**
 * Starts a host. `plugins`: names to install; `config`: extra TOML appended;
 * `apiKey`: the [api] key, or null for none.
 * Resolves once it listens. The caller must `await host.stop()`.
 */
export async function startHost({ plugins = ['misskey', 'probe'], config = '', env = {}, apiKey = API_KEY, cacheDir = path.join(ROOT, 'target/test-cache'), wrap = [] } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chanhost-test-'));
  const pluginsDir = path.join(dir, 'plugins');
  fs.mkdirSync(pluginsDir);
  for (const p of plugins) installPlugin(pluginsDir, p);
  const configPath = path.join(dir, 'chanhost.toml');
  const api = apiKey ? `[api]\nkey = "${apiKey}"\n` : '';
  fs.writeFileSync(configPath, `listen = "127.0.0.1:0"\ncache_dir = ${JSON.stringify(cacheDir)}\n${api}${AUTH_CONFIG}\n${config}\n`);
  // `wrap`: a command the host runs under (e.g. prlimit), its arguments first.
  const [cmd, ...pre] = [...wrap, BIN];
  const proc = spawn(cmd, [...pre, 'serve', '--config', configPath, '--plugins', pluginsDir], {
    env: { ...process.env, CHANHOST_LOG: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  proc.stderr.on('data', (d) => { stderr += d; });
  let stdout = '';
  const addr = await new Promise((resolve, reject) => {
    const onData = (d) => {
      stdout += d;
      const m = stdout.match(/listening on (\S+)/);
      if (m) { proc.stdout.off('data', onData); resolve(m[1]); }
    };
    proc.stdout.on('data', onData);
    proc.once('exit', (code) => reject(new Error(`chanhost exited with ${code} before listening:\n${stderr}`)));
  });
  const url = `http://${addr}`;
  const host = {
    proc, dir, pluginsDir, configPath, url, ws: `ws://${addr}`,
    get stderr() { return stderr; },
    streams: [],
    async stop() {
      for (const s of host.streams) { try { s.close(); } catch {} }
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGTERM');
        await once(proc, 'exit');
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
    /** A misskey-js Stream (closed by stop()). */
    stream(token = null) {
      const s = new Misskey.Stream(url, token ? { token } : null, { WebSocket });
      host.streams.push(s);
      return s;
    },
    publish: (body, key = API_KEY) => publish(url, body, key),
    metrics: () => metrics(url),
    /** Waits until the log contains a pattern. */
    async waitLog(pattern, timeout = 20000) {
      await until(() => (typeof pattern === 'string' ? stderr.includes(pattern) : pattern.test(stderr)), timeout, `log ${pattern}`);
    },
  };
  return host;
}

export async function publish(url, body, key = API_KEY) {
  const headers = { 'content-type': 'application/json' };
  if (key) headers.authorization = `Bearer ${key}`;
  const res = await fetch(`${url}/api/publish`, { method: 'POST', headers, body: typeof body === 'string' ? body : JSON.stringify(body) });
  return { status: res.status, body: await res.json().catch(() => null) };
}

/** Parses /metrics into { "name{labels}": value }. */
export async function metrics(url) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const out = {};
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out[line.slice(0, i)] = Number(line.slice(i + 1));
  }
  return out;
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `cond` until true or throws after `timeout` ms. */
export async function until(cond, timeout = 10000, what = 'condition') {
  const end = Date.now() + timeout;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Resolves with the next `event` of an emitter, or rejects after `timeout`. */
export function next(emitter, event, timeout = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { emitter.off(event, on); reject(new Error(`no ${event} within ${timeout} ms`)); }, timeout);
    const on = (v) => { clearTimeout(t); resolve(v); };
    emitter.once(event, on);
  });
}

/** Collects every `event` an emitter emits. */
export function collect(emitter, event) {
  const got = [];
  emitter.on(event, (v) => got.push(v));
  return got;
}

let barrierSeq = 0;
/**
 * Waits until the host has processed every frame this stream sent so far:
 * a probe channel echoes a token, and the host handles a stream's frames in
 * order (a `connect` completes, joins included, before the next frame).
 */
export async function barrier(stream) {
  if (!stream._probe) stream._probe = stream.useChannel('probe', {});
  const token = `b${++barrierSeq}`;
  const got = new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('barrier timed out')), 5000);
    const on = (body) => { if (body === token) { clearTimeout(t); stream._probe.off('echo', on); resolve(); } };
    stream._probe.on('echo', on);
  });
  stream._probe.send('echo', token);
  await got;
}

/** A raw WebSocket to /streaming that records every frame. */
export async function rawStream(host, query = '', opts = {}) {
  const ws = new WebSocket(`${host.ws}/streaming${query}`, opts);
  ws.frames = [];
  ws.on('message', (d, isBinary) => ws.frames.push(isBinary ? d : d.toString()));
  await once(ws, 'open');
  host.streams.push({ close: () => ws.terminate() });
  return ws;
}

/** Sends a JSON frame on a raw socket. */
export function sendJson(ws, obj) {
  ws.send(JSON.stringify(obj));
}

/** Waits for a raw socket frame (parsed JSON) matching a predicate. */
export async function frame(ws, pred, timeout = 5000) {
  await until(() => ws.frames.some((f) => { try { return pred(JSON.parse(f)); } catch { return false; } }), timeout, 'frame');
  return JSON.parse(ws.frames.find((f) => { try { return pred(JSON.parse(f)); } catch { return false; } }));
}

/** Runs the binary to completion (killed after `timeout` ms); resolves { code, stdout, stderr }. */
export async function runBin(args, env = {}, timeout = 20000) {
  const proc = spawn(BIN, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout.on('data', (d) => { stdout += d; });
  proc.stderr.on('data', (d) => { stderr += d; });
  const killer = setTimeout(() => proc.kill('SIGKILL'), timeout);
  const [code] = await once(proc, 'exit');
  clearTimeout(killer);
  return { code, stdout, stderr };
}

/** Signs an HS256 JWT (the test hosts' [auth.jwt] secret by default). */
export function jwt(claims, secret = JWT_SECRET) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${crypto.createHmac('sha256', secret).update(head).digest('base64url')}`;
}

export function note(overrides = {}) {
  return {
    id: `n${Math.random().toString(36).slice(2, 10)}`,
    createdAt: new Date().toISOString(),
    userId: 'u1',
    user: { id: 'u1', username: 'u1', host: null },
    text: 'hello',
    cw: null,
    visibility: 'public',
    renoteId: null,
    replyId: null,
    fileIds: [],
    channelId: null,
    ...overrides,
  };
}

/** A free loopback TCP port. */
export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/**
 * Starts a real `redis-server` (Debian's) on a free port, without
 * persistence. `publish(channel, text)` PUBLISHes with redis-cli and
 * resolves with the number of subscribers that got it; `stop()` kills the
 * server, `start()` starts it again on the same port. `password`: the
 * server requires it (AUTH); `tls`: the server speaks TLS only, with a
 * certificate for `localhost` from a fresh test CA (`redis.ca`, a PEM
 * file); `db`: the database number the URL names.
 */
export async function startRedis({ password = null, tls = false, db = null } = {}) {
  const port = await freePort();
  const auth = password ? `:${encodeURIComponent(password)}@` : '';
  const hostName = tls ? 'localhost' : '127.0.0.1';
  let tlsArgs = [];
  let cliTls = [];
  let ca = null;
  if (tls) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chanhost-redis-tls-'));
    const f = (n) => path.join(dir, n);
    const ssl = (args) => execFileSync('openssl', args, { stdio: 'ignore' });
    ssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', f('ca.key'), '-out', f('ca.pem'), '-days', '2', '-subj', '/CN=chanhost test CA']);
    ssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', f('srv.key'), '-out', f('srv.csr'), '-subj', '/CN=localhost']);
    fs.writeFileSync(f('ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n');
    ssl(['x509', '-req', '-in', f('srv.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial', '-out', f('srv.pem'), '-days', '2', '-extfile', f('ext')]);
    ca = f('ca.pem');
    tlsArgs = ['--port', '0', '--tls-port', String(port), '--tls-cert-file', f('srv.pem'), '--tls-key-file', f('srv.key'), '--tls-ca-cert-file', ca, '--tls-auth-clients', 'no'];
    cliTls = ['--tls', '--cacert', ca, '-h', 'localhost'];
  }
  const redis = {
    port,
    ca,
    url: `${tls ? 'rediss' : 'redis'}://${auth}${hostName}:${port}${db === null ? '' : `/${db}`}`,
    proc: null,
    async start() {
      const args = tls ? tlsArgs : ['--port', String(port)];
      const proc = spawn('redis-server', [...args, '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...(password ? ['--requirepass', password] : [])], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      await new Promise((resolve, reject) => {
        proc.stdout.on('data', (d) => {
          out += d;
          if (out.includes('Ready to accept connections')) resolve();
        });
        proc.once('exit', (code) => reject(new Error(`redis-server exited with ${code}:\n${out}`)));
      });
      proc.stdout.resume();
      redis.proc = proc;
    },
    async stop() {
      if (!redis.proc) return;
      const p = redis.proc;
      redis.proc = null;
      const exited = once(p, 'exit');
      p.kill('SIGKILL');
      await exited;
    },
    publish(channel, text) {
      const cli = [...cliTls, '-p', String(port), ...(password ? ['-a', password, '--no-auth-warning'] : []), 'PUBLISH', channel, text];
      return new Promise((resolve, reject) => {
        execFile('redis-cli', cli, (err, stdout) => {
          if (err) reject(err);
          else resolve(Number(stdout.trim()));
        });
      });
    },
  };
  await redis.start();
  return redis;
}
