// Seed 000's and seed 002's flows with @stomp/stompjs (the client most of their users run),
// unchanged, against a running sensorgate.
// Usage: node check.mjs ws://127.0.0.1:PORT/stomp/websocket DEVELOPER_TOKEN
// The subscriber is anonymous (seed 000's users); the publisher sends a developer's token as
// its passcode (by default only developers SEND to /topic/). Exits 0 when every expectation
// holds, 1 (with the reason) otherwise.
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

const url = process.argv[2];
const developerToken = process.argv[3];
const fail = (why) => { console.error(`FAIL ${why}`); process.exit(1); };
setTimeout(() => fail('timed out'), 15000);

function client(name, extra = {}) {
  return new Client({
    // Node 20 has no global WebSocket; stompjs's own default offers these subprotocols.
    webSocketFactory: () => new WebSocket(url, ['v12.stomp', 'v11.stomp', 'v10.stomp']),
    heartbeatIncoming: 10000,
    heartbeatOutgoing: 10000,
    reconnectDelay: 0,
    onStompError: (f) => fail(`${name}: ERROR ${f.headers.message}`),
    onWebSocketError: (e) => fail(`${name}: websocket error ${e.message ?? e}`),
    ...extra,
  });
}

const connected = (c) => new Promise((resolve) => { c.onConnect = resolve; c.activate(); });
const receipt = (c, id) => new Promise((resolve) => c.watchForReceipt(id, resolve));

const sub = client('subscriber');
const pub = client('publisher', {
  splitLargeFrames: true,
  maxWebSocketChunkSize: 1024,
  connectHeaders: { passcode: developerToken },
});
const frame = await connected(sub);
if (frame.headers.version !== '1.2') fail(`version ${frame.headers.version}`);
if (frame.headers['heart-beat'] !== '10000,10000') fail(`heart-beat ${frame.headers['heart-beat']}`);
await connected(pub);

const got = [];
const want = 3;
const done = new Promise((resolve) => {
  const on = (m) => { got.push(m); if (got.length === want) resolve(); };
  const r1 = receipt(sub, 'r-workout');
  sub.subscribe('/topic/workout/record', on, { id: 'any_client_id', receipt: 'r-workout' });
  const r2 = receipt(sub, 'r-chat');
  sub.subscribe('/topic/chat/42', on, { id: 'chat', receipt: 'r-chat' });
  Promise.all([r1, r2]).then(() => {
    pub.publish({
      destination: '/topic/workout/record',
      body: JSON.stringify({ workout: { id: 4711, person_id: 1234 } }),
      headers: { 'content-type': 'application/json;charset=UTF-8' },
    });
    pub.publish({
      destination: '/topic/chat/42',
      body: JSON.stringify({ startTyping: { userId: 'u-1' } }),
    });
    // Larger than one 1 KiB WebSocket chunk: stompjs splits it, the server joins it.
    pub.publish({ destination: '/topic/chat/42', body: 'x'.repeat(5000) });
  });
});
await done;

const [workout, typing, big] = got;
if (workout.headers['content-type'] !== 'application/json;charset=UTF-8') fail('content-type');
if (workout.headers.subscription !== 'any_client_id') fail(`subscription ${workout.headers.subscription}`);
if (workout.headers.destination !== '/topic/workout/record') fail('destination');
if (!workout.headers['message-id']) fail('message-id');
if (JSON.parse(workout.body).workout.id !== 4711) fail('workout body');
if (JSON.parse(typing.body).startTyping.userId !== 'u-1') fail('typing body');
if (typing.headers.subscription !== 'chat') fail('chat subscription');
if (big.body.length !== 5000) fail(`split frame arrived as ${big.body.length} bytes`);

await pub.deactivate();
await sub.deactivate();
console.log('OK stompjs: version 1.2, 3/3 messages, split frame joined');
process.exit(0);
