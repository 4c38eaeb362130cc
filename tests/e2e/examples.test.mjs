// The chat-room example plugin, written in Rust, JavaScript, Python and C
// (examples/chat-*, built by `cargo xtask examples`): one behaviour test,
// run once per language, over both protocols.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { startHost, barrier, collect, until, touchPlugin } from './helpers.mjs';

const LANGS = ['rust', 'js', 'python', 'c'];

function socket(host, name, auth) {
  return io(`${host.url}/${name}`, { auth, transports: ['websocket'], forceNew: true, reconnection: false });
}

async function connected(s) {
  return new Promise((resolve, reject) => {
    s.once('connect', resolve);
    s.once('connect_error', reject);
  });
}

for (const lang of LANGS) {
  const name = `chat-${lang}`;
  describe(`the chat example in ${lang}`, () => {
    let host;
    const sockets = [];
    before(async () => { host = await startHost({ plugins: [name, 'probe'] }); });
    after(async () => { for (const s of sockets) s.close(); await host.stop(); });

    test('room members on both protocols get every post with the sender and the room\'s count; other rooms get nothing', async () => {
      const alice = host.stream('tok-alice');
      const bob = host.stream('tok-bob');
      const a = alice.useChannel(name, { room: 'lobby' });
      const b = bob.useChannel(name, { room: 'lobby' });
      const elsewhere = bob.useChannel(name, { room: 'den' });
      await barrier(alice);
      await barrier(bob);
      const sio = socket(host, name, { token: 'tok-bob', room: 'lobby' });
      sockets.push(sio);
      const got = { a: collect(a, 'message'), b: collect(b, 'message'), den: collect(elsewhere, 'message'), sio: [] };
      sio.on('message', (m) => got.sio.push(m));
      await connected(sio);

      const text = 'hi "there" \\ 👋\n';
      a.send('post', { text });
      const first = { userId: 'alice', text, n: 1 };
      await until(() => got.a.length === 1 && got.b.length === 1 && got.sio.length === 1);
      assert.deepEqual(got.a[0], first);
      assert.deepEqual(got.b[0], first);
      assert.deepEqual(got.sio[0], first);

      sio.emit('post', { text: 'from socket.io' });
      await until(() => got.a.length === 2 && got.sio.length === 2);
      assert.deepEqual(got.a[1], { userId: 'bob', text: 'from socket.io', n: 2 });
      assert.deepEqual(got.sio[1], got.a[1]);

      // Not a post, or no text: nothing is sent.
      a.send('other', { text: 'x' });
      a.send('post', { nope: 1 });
      elsewhere.send('post', { text: 'in the den' });
      await until(() => got.den.length === 1);
      assert.deepEqual(got.den[0], { userId: 'bob', text: 'in the den', n: 1 });
      assert.equal(got.a.length, 2);
    });

    test('Socket.IO needs a token and a room; Misskey needs a signed-in stream', async () => {
      for (const [auth, message] of [
        [{ room: 'lobby' }, /a token is required/],
        [{ token: 'nope', room: 'lobby' }, /invalid token: /],
        [{ token: 'tok-alice' }, /a room is required/],
      ]) {
        const s = socket(host, name, auth);
        sockets.push(s);
        await assert.rejects(connected(s), (e) => { assert.match(e.message, message); return true; });
      }
      const anon = host.stream();
      const ch = anon.useChannel(name, { room: 'lobby' });
      await barrier(anon);
      const got = collect(ch, 'message');
      const alice = host.stream('tok-alice');
      alice.useChannel(name, { room: 'lobby' }).send('post', { text: 'anyone?' });
      await barrier(alice);
      const mine = collect(alice.useChannel(name, { room: 'lobby' }), 'message');
      alice.useChannel(name, { room: 'lobby' }).send('post', { text: 'sentinel' });
      await until(() => mine.some((m) => m.text === 'sentinel'));
      assert.deepEqual(got, [], 'an anonymous stream cannot open the channel');
    });

    test('the count lives in the key-value store: a hot reload keeps it, and clients stay in their rooms', async () => {
      const alice = host.stream('tok-alice');
      const ch = alice.useChannel(name, { room: 'reload' });
      await barrier(alice);
      const got = collect(ch, 'message');
      ch.send('post', { text: 'before' });
      await until(() => got.length === 1);
      const reloads = async () => (await host.metrics())['chanhost_plugin_reloads_total{result="ok"}'];
      const before = await reloads();
      touchPlugin(host.pluginsDir, name);
      await until(async () => (await reloads()) > before, 60000, 'the reload');
      ch.send('post', { text: 'after' });
      await until(() => got.length === 2);
      assert.deepEqual(got.map((m) => [m.text, m.n]), [['before', 1], ['after', 2]]);
    });
  });
}
