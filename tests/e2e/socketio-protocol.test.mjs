// The scenarios of the official Socket.IO protocol test suite
// (socketio/socket.io-protocol, test-suite), served by the conformance
// plugin, read the way that suite reads: raw WebSocket frames, one
// listener attached per expected message. A server that puts two packets
// where such a client finds them in one read fails here, as it fails
// there.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { startHost } from './helpers.mjs';

const CONFIG = `
[socketio]
ping_interval_ms = 300
ping_timeout_ms = 200
connect_timeout_ms = 1000
`;

// One message (or event) at a time: the listener is attached when the
// test asks, as the suite's helper does.
function waitFor(ws, event) {
  return new Promise((resolve) => ws.addEventListener(event, resolve, { once: true }));
}
async function message(ws) {
  return (await waitFor(ws, 'message')).data;
}
// Several messages with one listener, pings left out (the suite reads a
// packet and its attachments this way).
function packets(ws, count) {
  return new Promise((resolve) => {
    const got = [];
    const onMessage = ({ data }) => {
      if (data === '2') return;
      got.push(typeof data === 'string' ? data : new Uint8Array(data));
      if (got.length === count) {
        ws.removeEventListener('message', onMessage);
        resolve(got);
      }
    };
    ws.addEventListener('message', onMessage);
  });
}
function closed(ws) {
  return ws.readyState === WebSocket.CLOSED ? Promise.resolve() : waitFor(ws, 'close');
}

describe('Socket.IO protocol scenarios', () => {
  let host;
  before(async () => { host = await startHost({ plugins: ['socketio-conformance'], config: CONFIG }); });
  after(() => host.stop());

  async function engine() {
    const ws = new WebSocket(`${host.ws}/socket.io/?EIO=4&transport=websocket`);
    ws.binaryType = 'arraybuffer';
    const open = await message(ws);
    assert.equal(open[0], '0');
    return ws;
  }
  async function connected(nsp = '', auth = '') {
    const ws = await engine();
    ws.send(`40${nsp}${nsp ? ',' : ''}${auth}`);
    const reply = await message(ws);
    const prefix = `40${nsp}${nsp ? ',' : ''}`;
    assert.ok(reply.startsWith(prefix), reply);
    const handshake = JSON.parse(reply.slice(prefix.length));
    assert.equal(typeof handshake.sid, 'string');
    assert.equal(handshake.sid.length, 20);
    const authPacket = await message(ws);
    return { ws, handshake, authPacket };
  }

  describe('connect', () => {
    test('to the main namespace: the reply, then the plugin\'s auth event', async () => {
      const { ws, authPacket } = await connected();
      assert.equal(authPacket, '42["auth",{}]');
      ws.close();
    });

    test('to the main namespace with a payload', async () => {
      const { ws, authPacket } = await connected('', '{"token":"123"}');
      assert.equal(authPacket, '42["auth",{"token":"123"}]');
      ws.close();
    });

    test('to a custom namespace', async () => {
      const { ws, authPacket } = await connected('/custom');
      assert.equal(authPacket, '42/custom,["auth",{}]');
      ws.close();
    });

    test('to a custom namespace with a payload', async () => {
      const { ws, authPacket } = await connected('/custom', '{"token":"abc"}');
      assert.equal(authPacket, '42/custom,["auth",{"token":"abc"}]');
      ws.close();
    });

    test('to an unknown namespace: CONNECT_ERROR "Invalid namespace"', async () => {
      const ws = await engine();
      ws.send('40/random');
      assert.equal(await message(ws), '44/random,{"message":"Invalid namespace"}');
      ws.close();
    });

    test('an invalid handshake closes the connection', async () => {
      const ws = await engine();
      ws.send('4abc');
      await closed(ws);
    });

    test('no handshake within connectTimeout closes the connection', async () => {
      const ws = await engine();
      // Pings answered, so only the connect timeout can end the session
      // (the heartbeat alone would close it after 500 ms).
      let pongs = 0;
      ws.addEventListener('message', ({ data }) => { if (data === '2') { pongs++; ws.send('3'); } });
      await closed(ws);
      assert.ok(pongs >= 2, `the session outlived the heartbeat (${pongs} pings answered)`);
    });
  });

  describe('disconnect', () => {
    test('from the main namespace: a packet for it afterwards closes the connection', async () => {
      const { ws } = await connected();
      ws.send('41');
      ws.send('42["message","after"]');
      await closed(ws);
    });

    test('from a custom namespace', async () => {
      const { ws } = await connected('/custom');
      ws.send('41/custom,');
      ws.send('42/custom,["message","after"]');
      await closed(ws);
    });

    test('from a custom namespace while the main one stays connected', async () => {
      const { ws } = await connected();
      ws.send('40/custom');
      assert.ok((await message(ws)).startsWith('40/custom,'));
      assert.equal(await message(ws), '42/custom,["auth",{}]');
      ws.send('41/custom');
      ws.send('42["message","message to main namespace"]');
      assert.equal(await message(ws), '42["message-back","message to main namespace"]');
      ws.close();
    });
  });

  describe('message', () => {
    // Sends a binary packet with attachments [1,2,3] and [4,5,6]; the
    // reply's head, then the same attachments, are expected back.
    async function binaryRoundTrip(head, replyHead) {
      const { ws } = await connected();
      const two = '{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}';
      ws.send(head.replace('$', two));
      ws.send(Uint8Array.from([1, 2, 3]));
      ws.send(Uint8Array.from([4, 5, 6]));
      assert.deepEqual(await packets(ws, 3), [
        replyHead.replace('$', two),
        Uint8Array.from([1, 2, 3]),
        Uint8Array.from([4, 5, 6]),
      ]);
      ws.close();
    }

    test('a plain-text event', async () => {
      const { ws } = await connected();
      ws.send('42["message",1,"2",{"3":[true]}]');
      assert.equal(await message(ws), '42["message-back",1,"2",{"3":[true]}]');
      ws.close();
    });

    test('an event with binary attachments', () =>
      binaryRoundTrip('452-["message",$]', '452-["message-back",$]'));

    test('a plain-text event with an ack', async () => {
      const { ws } = await connected();
      ws.send('42456["message-with-ack",1,"2",{"3":[false]}]');
      assert.equal(await message(ws), '43456[1,"2",{"3":[false]}]');
      ws.close();
    });

    test('an event with binary attachments and an ack', () =>
      binaryRoundTrip('452-789["message-with-ack",$]', '462-789[$]'));

    for (const [what, packet] of [
      ['an unknown packet type', '8'],
      ['a payload that is not an array', '42{"a":1}'],
      ['an ack id that is not a number', '42abc["message"]'],
      ['an event without a name', '42[]'],
    ]) {
      test(`the connection closes on ${what}`, async () => {
        const { ws } = await connected();
        ws.send(packet);
        await closed(ws);
      });
    }
  });

  test('a connected session answers pings and is kept alive by pongs', async () => {
    const { ws } = await connected();
    for (let i = 0; i < 3; i++) {
      assert.equal(await message(ws), '2');
      ws.send('3');
    }
    ws.send('2probe');
    assert.equal(await message(ws), '3probe');
    assert.equal(ws.readyState, WebSocket.OPEN);
    ws.close();
  });
});
