// The operator page (/admin) in a real headless browser: Debian's chromium
// driven by puppeteer-core. An operator logs in with the API key, sees the
// plugins and a connection count that follows clients as they come and go,
// looks at a user's connection, disconnects the user, and logs out; a wrong
// key is refused, and no data endpoint answers before logging in or without
// the page's CSRF token.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { once } from 'node:events';
import puppeteer from 'puppeteer-core';
import { io as connect } from 'socket.io-client';
import { startHost, until, API_KEY } from './helpers.mjs';

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
      const listed = await page.$$('#inspect-result button');
      if (listed.length > 0) await listed[0].click();
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
});
