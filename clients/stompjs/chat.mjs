// Seed 002's chat flows with @stomp/stompjs, unchanged, against a running sensorgate:
// an employee and a customer on /api/v1/chat with `Authorization: Bearer` in CONNECT,
// online-employees, presence, typing, and client-individual ACKs through stompjs's own
// message.ack(). Usage: node chat.mjs ws://HOST:PORT/api/v1/chat EMPLOYEE_TOKEN CUSTOMER_TOKEN
// Exits 0 when every expectation holds, 1 (with the reason) otherwise.
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

const [url, employeeToken, customerToken] = process.argv.slice(2);
const fail = (why) => { console.error(`FAIL ${why}`); process.exit(1); };
setTimeout(() => fail('timed out'), 15000);

const conversation = '/v1/topic/conversation/28ccd489-f588-4d35-99a9-1e74ec2475b2';
const typing = '/v1/app/conversation/28ccd489-f588-4d35-99a9-1e74ec2475b2/typing';

function client(name, token) {
  return new Client({
    webSocketFactory: () => new WebSocket(url, ['v12.stomp', 'v11.stomp', 'v10.stomp']),
    connectHeaders: { Authorization: `Bearer ${token}` },
    heartbeatIncoming: 0,
    heartbeatOutgoing: 0,
    reconnectDelay: 0,
    onStompError: (f) => fail(`${name}: ERROR ${f.headers.message}`),
    onWebSocketError: (e) => fail(`${name}: websocket error ${e.message ?? e}`),
  });
}

const connected = (c) => new Promise((resolve) => { c.onConnect = resolve; c.activate(); });
const receipt = (c, id) => new Promise((resolve) => c.watchForReceipt(id, resolve));

// Messages of one subscription, awaited one by one.
function queue() {
  const items = [];
  const waiting = [];
  return {
    push: (m) => (waiting.length ? waiting.shift()(m) : items.push(m)),
    next: () => new Promise((resolve) => (items.length ? resolve(items.shift()) : waiting.push(resolve))),
  };
}

const employee = client('employee', employeeToken);
await connected(employee);
const online = queue();
employee.subscribe('/v1/topic/online-employees', online.push);
const count = JSON.parse((await online.next()).body);
if (count.online !== 1) fail(`online ${JSON.stringify(count)}`);

const staffSide = queue();
const r = receipt(employee, 'r-conv');
employee.subscribe(conversation, staffSide.push, { receipt: 'r-conv' });
await r;
const self = JSON.parse((await staffSide.next()).body);
if (self.userConnected?.userId !== 'e-1') fail(`own arrival ${JSON.stringify(self)}`);

const customer = client('customer', customerToken);
await connected(customer);
const customerSide = queue();
customer.subscribe(conversation, customerSide.push, { ack: 'client-individual' });
const joined = JSON.parse((await staffSide.next()).body);
if (joined.userConnected?.userId !== 'c-1') fail(`joined ${JSON.stringify(joined)}`);
const mine = await customerSide.next();
if (!mine.headers.ack) fail('no ack header on a client-individual MESSAGE');
mine.ack();

// The server runs with stomp_max_unacked = 1: each ACK must settle its message before the
// next one arrives, or the customer is closed.
customer.publish({ destination: `${typing}/start`, body: '' });
const start = JSON.parse((await staffSide.next()).body);
if (start.startTyping?.userId !== 'c-1') fail(`typing ${JSON.stringify(start)}`);
(await customerSide.next()).ack();
customer.publish({ destination: `${typing}/stop`, body: '' });
const stop = JSON.parse((await staffSide.next()).body);
if (stop.stopTyping?.userId !== 'c-1') fail(`typing ${JSON.stringify(stop)}`);
(await customerSide.next()).ack();

await customer.deactivate();
const left = JSON.parse((await staffSide.next()).body);
if (left.userDisconnected?.userId !== 'c-1') fail(`left ${JSON.stringify(left)}`);
await employee.deactivate();
console.log('OK stompjs chat: online-employees, presence, typing, client-individual acks');
process.exit(0);
