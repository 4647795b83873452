// Seed 003's flow as BIMserver's JavaScript API (BIMserver-JavaScript-API, not on npm)
// drives it, step for step, with the `ws` package in place of the browser's WebSocket:
//
//   setToken: AuthInterface.getLoggedInUser over POST <base>/json, then the socket
//   <base>/stream: welcome -> {"token"} -> endpointid, {"hb":true} as its 30 s timer sends
//   registerProgressHandler: POST /json registerProgressHandler {topicId, endPointId},
//   then getProgress {topicId}, whose state goes to the handler as handler(topicId, state)
//   pushes: {"request":{interface, method, parameters}} -> listeners[interface][method],
//   called with the values of `parameters` in key order (positionally)
//
// A backend's part (publishing progress through /api/publish) is played here too, so the
// order of events is fixed. Usage: node flow.mjs <base url> <token> <dev-id> <api-key>
import WebSocket from "ws";

const [base, token, devId, apiKey] = process.argv.slice(2);
const TOPIC = 4242;
const fail = (why) => {
  console.error("FAIL", why);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 15000).unref();

// bimserverclient.js: multiCall -> getJson(address, {request, token}).
const interfaceMapping = {
  AuthInterface: "org.bimserver.AuthInterface",
  NotificationRegistryInterface: "org.bimserver.NotificationRegistryInterface",
};
async function call(intf, method, parameters) {
  const request = {
    request: { interface: interfaceMapping[intf], method, parameters },
    token,
  };
  const res = await fetch(`${base}/json`, {
    method: "POST",
    headers: { "Content-Type": "application/json; charset=UTF-8" },
    body: JSON.stringify(request),
  });
  if (res.status !== 200) fail(`${method}: HTTP ${res.status}`);
  const data = await res.json();
  if (data.response.exception != null) fail(`${method}: ${data.response.exception.message}`);
  return data.response.result;
}

async function backendPublishes(data) {
  const res = await fetch(`${base.replace(/\/bimserver$/, "")}/api/publish`, {
    method: "POST",
    headers: { "dev-id": devId, "x-api-key": apiKey, "Content-Type": "application/json" },
    body: JSON.stringify({ destination: `/bimserver/progress/${TOPIC}`, data }),
  });
  if (res.status !== 200) fail(`publish: HTTP ${res.status} ${await res.text()}`);
}

// bimserverclient.js: register / processNotification.
const listeners = {};
function processNotification(message) {
  const methods = listeners[message["interface"]];
  if (methods == null || methods[message.method] == null) fail(`no listener: ${JSON.stringify(message)}`);
  const ar = [];
  let i = 0;
  for (const key in message.parameters) ar[i++] = message.parameters[key];
  methods[message.method].forEach((listener) => listener.apply(null, ar));
}

// bimserverapiwebsocket.js: connect / _onmessage.
function connectSocket() {
  return new Promise((resolve) => {
    const ws = new WebSocket(base.replace("http://", "ws://") + "/stream");
    ws.binaryType = "arraybuffer";
    ws.onmessage = (message) => {
      const incoming = JSON.parse(message.data);
      if (incoming.welcome !== undefined) {
        ws.send(JSON.stringify({ token }));
      } else if (incoming.endpointid !== undefined) {
        ws.send(JSON.stringify({ hb: true }));
        resolve({ ws, endPointId: incoming.endpointid });
      } else if (incoming.request !== undefined) {
        processNotification(incoming.request);
      } else if (incoming.requests !== undefined) {
        incoming.requests.forEach(processNotification);
      } else {
        fail(`unexpected message ${message.data}`);
      }
    };
    ws.onerror = (e) => fail(`socket error ${e.message}`);
  });
}

// The backend created the topic before handing out its id (as checkin does).
await backendPublishes({ progress: 0, state: "STARTED", title: "Checking in", stage: 1 });

const user = await call("AuthInterface", "getLoggedInUser", {});
if (user.__type !== "SUserObject" || user.username !== "designer") fail(`user ${JSON.stringify(user)}`);
const { ws, endPointId } = await connectSocket();

const seen = [];
let resolveDone;
const done = new Promise((r) => (resolveDone = r));
const handler = (topicId, state) => {
  seen.push(`${topicId}:${state.state}:${state.stage}:${state.progress}:${state.title}`);
  if (state.state === "FINISHED") resolveDone();
};
listeners.NotificationInterface = { progress: [handler] };
await call("NotificationRegistryInterface", "registerProgressHandler", { topicId: TOPIC, endPointId });
handler(TOPIC, await call("NotificationRegistryInterface", "getProgress", { topicId: TOPIC }));

await backendPublishes({ progress: 42, stage: 2, title: "Storing" });
await backendPublishes({ progress: 100, state: "FINISHED" });
await done;
await call("NotificationRegistryInterface", "unregisterProgressHandler", { topicId: TOPIC, endPointId });

const want = [
  `${TOPIC}:STARTED:1:0:Checking in`,
  `${TOPIC}:STARTED:2:42:Storing`,
  `${TOPIC}:FINISHED:2:100:Storing`,
];
if (JSON.stringify(seen) !== JSON.stringify(want)) fail(`handler saw ${JSON.stringify(seen)}`);
ws.close();
console.log(`OK bimserver flow: endpoint ${endPointId}, ${seen.length} progress calls`);
