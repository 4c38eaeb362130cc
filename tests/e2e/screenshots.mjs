// Makes the README's screenshots of the operator page: a host with the
// Misskey and Socket.IO test plugins, a few clients and a steady publisher,
// seen by Debian's chromium (puppeteer-core) on a desktop and a phone.
// Run by `cargo xtask screenshots`; writes docs/admin.png and
// docs/admin-phone.png.
import fs from 'node:fs';
import path from 'node:path';
import { once } from 'node:events';
import puppeteer from 'puppeteer-core';
import { io as connect } from 'socket.io-client';
import { startHost, sleep, ROOT, API_KEY } from './helpers.mjs';

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p));
if (!CHROMIUM) throw new Error('Debian chromium is needed (apt-get install chromium)');

const host = await startHost({ plugins: ['misskey', 'socketio-conformance'] });
const clients = [];
let browser;
try {
  // Clients: Misskey streams on a few channels, Socket.IO sockets in rooms,
  // some of them identified.
  for (const token of ['tok-alice', 'tok-bob', null, null]) {
    const s = host.stream(token);
    s.useChannel('globalTimeline');
    if (token) s.useChannel('main');
  }
  for (let i = 0; i < 6; i++) {
    const s = connect(host.url, {
      transports: i === 5 ? ['polling'] : ['websocket'],
      forceNew: true,
      auth: { room: `chat:${i % 3 === 0 ? 'lobby' : `room-${i}`}`, quiet: true },
    });
    await once(s, 'connect');
    if (i < 2) await s.emitWithAck('identify', i === 0 ? 'tok-alice' : 'tok-bob');
    clients.push(s);
  }
  // A publisher, so the chart has something to show.
  let running = true;
  const publisher = (async () => {
    for (let n = 0; running; n++) {
      await fetch(`${host.url}/api/publish`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
        body: JSON.stringify([
          { room: 'chat:lobby', event: 'message', data: { n } },
          { channel: 'notesStream', message: { id: `n${n}`, text: 'hello', userId: 'alice', user: { id: 'alice' }, visibility: 'public' } },
        ]),
      });
      if (n % 7 === 0) clients[n % clients.length].emit('message', { n });
      await sleep(40 + 30 * Math.sin(n / 15));
    }
  })();

  browser = await puppeteer.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 900 });
  await page.goto(`${host.url}/admin`);
  await page.type('#key', API_KEY);
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  await page.waitForSelector('#plugins [data-plugin="misskey"]');
  await sleep(25000);
  const out = path.join(ROOT, 'docs');
  await page.screenshot({ path: path.join(out, 'admin.png'), fullPage: true });
  await page.setViewport({ width: 390, height: 844, deviceScaleFactor: 2, isMobile: true });
  await sleep(1500);
  await page.screenshot({ path: path.join(out, 'admin-phone.png') });
  running = false;
  await publisher;
  console.log(`wrote ${path.join(out, 'admin.png')} and admin-phone.png`);
} finally {
  for (const c of clients) c.close();
  await browser?.close();
  await host.stop();
}
