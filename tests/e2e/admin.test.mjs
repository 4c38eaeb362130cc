// The operator page (/admin) in a real headless browser: Debian's chromium
// driven by puppeteer-core. An operator logs in with the API key, sees the
// plugins and a connection count that follows clients as they come and go,
// looks at a user's connection, disconnects the user, and logs out; a wrong
// key is refused, and no data endpoint answers before logging in or without
// the page's CSRF token.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import { once } from 'node:events';
import puppeteer from 'puppeteer-core';
import { io as connect } from 'socket.io-client';
import { startHost, startRedis, until, API_KEY } from './helpers.mjs';

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p));

async function launch() {
  assert.ok(CHROMIUM, 'Debian chromium is installed (cargo xtask test installs it)');
  return puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
}

/** A Socket.IO client of the conformance plugin, identified as `token`'s user. */
async function sioClient(url, token) {
  const s = connect(url, { transports: ['websocket'], forceNew: true, reconnection: false, auth: { quiet: true } });
  await once(s, 'connect');
  if (token) {
    const who = await s.emitWithAck('identify', token);
    assert.equal(who.count >= 1, true, JSON.stringify(who));
  }
  return s;
}

const text = (page, sel) => page.$eval(sel, (e) => e.textContent.trim());

/** The first snapshot of a node's /admin stream, read with the bearer key. */
async function snapshot(url) {
  const ctl = new AbortController();
  const res = await fetch(`${url}/admin/api/stream`, { headers: { authorization: `Bearer ${API_KEY}` }, signal: ctl.signal });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /text\/event-stream/);
  const reader = res.body.getReader();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error('stream ended before a snapshot');
      buf += new TextDecoder().decode(value);
      const end = buf.indexOf('\n\n');
      if (end >= 0) {
        const data = buf.slice(0, end).split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
        return JSON.parse(data);
      }
    }
  } finally {
    ctl.abort();
  }
}

/** Logs a browser page in to a host's /admin. */
async function logIn(page, url) {
  await page.goto(`${url}/admin`);
  if (await page.$('#key')) {
    await page.type('#key', API_KEY);
    await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  }
}

describe('the operator page behind the API key', () => {
  let host; let browser; let page;
  before(async () => {
    host = await startHost({ plugins: ['socketio-conformance', 'misskey'] });
    browser = await launch();
    page = await browser.newPage();
  });
  after(async () => {
    await browser?.close();
    await host?.stop();
  });

  test('nothing answers before logging in, and a wrong key is refused', async () => {
    for (const path of ['/admin/api/stream', '/admin/api/rooms', '/admin/api/connections/1']) {
      const res = await fetch(`${host.url}${path}`);
      assert.equal(res.status, 401, path);
    }
    const res = await fetch(`${host.url}/admin/api/disconnect`, { method: 'POST', body: '{"user":"alice"}' });
    assert.equal(res.status, 401);
    await page.goto(`${host.url}/admin`);
    assert.ok(await page.$('#key'), 'the login form');
    assert.equal(await page.$('#conn-total'), null, 'no figures before logging in');
    await page.type('#key', 'not-the-key');
    const [answer] = await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
    assert.equal(answer.status(), 401);
    assert.match(await text(page, '#login-error'), /wrong api key/i);
  });

  test('an operator logs in and watches plugins and connections live', async () => {
    await page.goto(`${host.url}/admin`);
    await page.type('#key', API_KEY);
    await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
    const cookies = await browser.cookies();
    const session = cookies.find((c) => c.name === 'chanhost_admin');
    assert.ok(session?.httpOnly, 'an HttpOnly session cookie');
    assert.equal(session.sameSite, 'Strict');
    await page.waitForSelector('#plugins [data-plugin="socketio-conformance"]');
    await page.waitForSelector('#plugins [data-plugin="misskey"]');
    await page.waitForFunction(() => document.querySelector('#stream-state')?.textContent.includes('live'));
    const count = async () => Number(await text(page, '#conn-total'));
    await until(async () => (await count()) === 0, 5000, 'no connections');
    const a = await sioClient(host.url, 'tok-alice');
    const b = await sioClient(host.url, null);
    try {
      await until(async () => (await count()) === 2, 5000, 'two connections shown');
      b.close();
      await until(async () => (await count()) === 1, 5000, 'one connection shown');
    } finally {
      a.close();
      b.close();
    }
    await until(async () => (await count()) === 0, 5000, 'none shown');
  });

  test('an operator looks at a user\'s connection and disconnects the user', async () => {
    const a = await sioClient(host.url, 'tok-alice');
    const b = await sioClient(host.url, 'tok-bob');
    try {
      await page.goto(`${host.url}/admin`);
      await page.waitForSelector('#inspect-user');
      await page.type('#inspect-user', 'alice');
      await page.click('#inspect-button');
      // The user's connections, then one of them.
      await page.waitForFunction(() => /socketio/.test(document.querySelector('#inspect-result')?.textContent ?? ''));
      // Alice has one connection: listed, then looked at.
      const listed = await page.$$('#inspect-result button');
      assert.equal(listed.length, 1);
      await listed[0].click();
      await page.waitForFunction(() => /alice/.test(document.querySelector('#inspect-result')?.textContent ?? '') && /websocket/.test(document.querySelector('#inspect-result')?.textContent ?? ''));

      const gone = once(a, 'disconnect');
      page.once('dialog', (d) => d.accept());
      await page.type('#disconnect-user', 'alice');
      await page.click('#disconnect-button');
      await page.waitForFunction(() => /1/.test(document.querySelector('#action-status')?.textContent ?? ''));
      assert.match(await text(page, '#action-status'), /alice/);
      const [reason] = await gone;
      assert.ok(reason, 'alice\'s client saw its connection end');
      assert.equal(b.connected, true, 'bob stays connected');
    } finally {
      a.close();
      b.close();
    }
  });

  test('an action without the page\'s CSRF token is refused, and logging out ends the session', async () => {
    const cookies = await browser.cookies();
    const session = cookies.find((c) => c.name === 'chanhost_admin');
    const cookie = `chanhost_admin=${session.value}`;
    const noToken = await fetch(`${host.url}/admin/api/disconnect`, {
      method: 'POST',
      headers: { cookie, 'content-type': 'application/json' },
      body: '{"user":"alice"}',
    });
    assert.equal(noToken.status, 403);
    const withCookie = await fetch(`${host.url}/admin/api/rooms`, { headers: { cookie } });
    assert.equal(withCookie.status, 200);
    await page.goto(`${host.url}/admin`);
    await page.waitForSelector('#logout button', { visible: true });
    await Promise.all([page.waitForNavigation(), page.click('#logout button')]);
    assert.ok(await page.$('#key'), 'back to the login form');
    const after = await fetch(`${host.url}/admin/api/rooms`, { headers: { cookie } });
    assert.equal(after.status, 401, 'the old cookie no longer opens anything');
  });
});

describe('the operator page without an API key', () => {
  let host; let browser;
  before(async () => {
    host = await startHost({ plugins: ['socketio-conformance'], apiKey: null });
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await host?.stop();
  });

  test('is served to loopback clients without a login, and its actions still need its token', async () => {
    const page = await browser.newPage();
    await page.goto(`${host.url}/admin`);
    await page.waitForSelector('#plugins [data-plugin="socketio-conformance"]');
    assert.equal(await page.$('#key'), null);
    const res = await fetch(`${host.url}/admin/api/disconnect`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: '{"user":"alice"}',
    });
    assert.equal(res.status, 403);
  });

  test('refuses a loopback request made to another name (DNS rebinding) or passed on by a proxy', async () => {
    const get = (headers) => new Promise((resolve, reject) => {
      const u = new URL(`${host.url}/admin/api/rooms`);
      http.get({ host: u.hostname, port: u.port, path: u.pathname, headers }, (res) => {
        res.resume();
        resolve(res.statusCode);
      }).on('error', reject);
    });
    assert.equal(await get({}), 200);
    assert.equal(await get({ host: 'rebound.example' }), 403);
    assert.equal(await get({ 'x-forwarded-for': '203.0.113.7' }), 403);
  });
});

describe('the operator page and a failing plugin', () => {
  let host; let browser;
  before(async () => {
    host = await startHost({ plugins: ['faulty'] });
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await host?.stop();
  });

  test('shows its failures and its last error as text', async () => {
    const s = host.stream();
    const ch = s.useChannel('faulty');
    ch.send('trap', {});
    await until(async () => (await snapshot(host.url)).plugins.find((p) => p.name === 'faulty')?.last_error, 10000, 'the error recorded');
    const p = (await snapshot(host.url)).plugins.find((x) => x.name === 'faulty');
    assert.ok(p.failures >= 1);
    assert.match(p.last_error.text, /asked to trap|unreachable/);
    assert.equal(p.wit, '0.4.0');
    assert.match(p.sha256, /^[0-9a-f]{64}$/);
    const page = await browser.newPage();
    await logIn(page, host.url);
    await page.waitForSelector('#plugins [data-plugin="faulty"] pre');
    // Shown as the text it is (Rust names in a wasm backtrace carry < and >).
    const shown = await page.$eval('#plugins [data-plugin="faulty"] pre', (e) => ({ text: e.textContent, elements: e.children.length }));
    assert.equal(shown.elements, 0);
    assert.ok(shown.text.includes(p.last_error.text.slice(0, 40)));
  });
});

describe('the operator page of a cluster', () => {
  let redis; let a; let b;
  before(async () => {
    redis = await startRedis();
    const config = `[cluster]\nredis = "${redis.url}"\nnode_ttl_ms = 1500\n`;
    a = await startHost({ plugins: ['socketio-conformance'], config });
    b = await startHost({ plugins: ['socketio-conformance'], config });
  });
  after(async () => {
    await a?.stop();
    await b?.stop();
    await redis?.stop();
  });

  test('lists every node with its connections, and disconnects a user on another node', async () => {
    const alice = await sioClient(b.url, 'tok-alice');
    try {
      await until(async () => {
        const nodes = (await snapshot(a.url)).cluster.nodes;
        return nodes.length === 2 && nodes.some((n) => n.self && n.connections === 0) && nodes.some((n) => !n.self && n.connections === 1);
      }, 15000, 'both nodes with their connections');
      const gone = once(alice, 'disconnect');
      const res = await fetch(`${a.url}/admin/api/disconnect`, {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify({ user: 'alice' }),
      });
      assert.equal(res.status, 200);
      assert.deepEqual(await res.json(), { connections: 1 });
      await gone;
    } finally {
      alice.close();
    }
  });
});
