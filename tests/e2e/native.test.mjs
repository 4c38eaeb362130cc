// A host embedded in another program with a native (Rust) plugin: the
// benchmarks' `chanhost-bench serve-native`, serving the broadcast contract
// (join a room on connect, `publish {room, data}` -> `message data`) to
// real Misskey and Socket.IO clients.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';
import WebSocket from 'ws';
import * as Misskey from 'misskey-js';
import { io } from 'socket.io-client';
import { ROOT, next } from './helpers.mjs';

const BENCH_BIN = process.env.CHANHOST_BENCH_BIN ?? path.join(ROOT, 'target/debug/chanhost-bench');

describe('native plugin in an embedded host', () => {
  let proc;
  let url;
  const clients = [];
  before(async () => {
    proc = spawn(BENCH_BIN, ['serve-native', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    const addr = await new Promise((resolve, reject) => {
      proc.stdout.on('data', (d) => {
        out += d;
        const m = out.match(/listening on (\S+)/);
        if (m) resolve(m[1]);
      });
      proc.once('exit', (code) => reject(new Error(`serve-native exited with ${code}`)));
    });
    url = `http://${addr}`;
  });
  after(async () => {
    for (const c of clients) c.close();
    if (proc.exitCode === null) {
      proc.kill('SIGTERM');
      await once(proc, 'exit');
    }
  });

  test('Misskey and Socket.IO clients of one room get what either publishes', async () => {
    const sio = io(url, { transports: ['websocket'], auth: { room: 'r' } });
    clients.push(sio);
    await next(sio, 'connect');
    const stream = new Misskey.Stream(url, null, { WebSocket });
    clients.push(stream);
    const ch = stream.useChannel('bench', { room: 'r' });

    // The channel's own publish follows its connect, so it is a member by then.
    const atSio = next(sio, 'message');
    const atMisskey = next(ch, 'message');
    ch.send('publish', { room: 'r', data: { from: 'misskey', n: 1 } });
    assert.deepEqual(await atSio, { from: 'misskey', n: 1 });
    assert.deepEqual(await atMisskey, { from: 'misskey', n: 1 });

    const again = next(ch, 'message');
    sio.emit('publish', { room: 'r', data: ['from socket.io', 2] });
    assert.deepEqual(await again, ['from socket.io', 2]);
  });

  test('a namespace the native plugin does not serve is refused', async () => {
    const other = io(`${url}/nowhere`, { transports: ['websocket'] });
    clients.push(other);
    const err = await next(other, 'connect_error');
    assert.match(err.message, /Invalid namespace/);
  });
});
