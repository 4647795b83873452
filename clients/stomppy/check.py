"""Seed 000's flow, or (with `chat TOKEN`) seed 002's customer flow, with stomp.py's
WSStompConnection, which offers no WebSocket subprotocol, against a running sensorgate.
Usage: python check.py HOST PORT PATH DEVELOPER_TOKEN, or HOST PORT PATH chat USER_TOKEN
(seed 000's subscriber is anonymous; its publisher sends a developer's token as passcode).
Exits 0 when every expectation holds, 1 (with the reason) otherwise."""

import json
import queue
import sys
import threading

import stomp


def main() -> int:
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    got = []
    arrived = threading.Event()
    receipts = []
    receipted = threading.Event()

    class Listener(stomp.ConnectionListener):
        def on_message(self, frame):
            got.append(frame)
            arrived.set()

        def on_receipt(self, frame):
            receipts.append(frame.headers.get("receipt-id"))
            receipted.set()

        def on_error(self, frame):
            print(f"FAIL ERROR {frame.headers.get('message')}", file=sys.stderr)

    def connection(passcode=None):
        c = stomp.WSStompConnection([(host, port)], ws_path=path, heartbeats=(0, 0))
        c.set_listener("l", Listener())
        c.connect(passcode=passcode, wait=True, headers={"accept-version": "1.1"})
        return c

    sub = connection()
    sub.subscribe("/topic/workout/record", id="any_client_id", receipt="sub-1")
    if not receipted.wait(10) or receipts != ["sub-1"]:
        print(f"FAIL no receipt for SUBSCRIBE: {receipts}", file=sys.stderr)
        return 1
    pub = connection(passcode=sys.argv[4])
    pub.send(
        "/topic/workout/record",
        '{"workout": {"id": 4711}}',
        content_type="application/json;charset=UTF-8",
    )
    if not arrived.wait(10):
        print("FAIL no MESSAGE", file=sys.stderr)
        return 1
    m = got[0]
    checks = {
        "subscription": m.headers.get("subscription") == "any_client_id",
        "destination": m.headers.get("destination") == "/topic/workout/record",
        "content-type": m.headers.get("content-type") == "application/json;charset=UTF-8",
        "message-id": bool(m.headers.get("message-id")),
        "body": m.body == '{"workout": {"id": 4711}}',
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        print(f"FAIL {bad}: {m.headers} {m.body!r}", file=sys.stderr)
        return 1
    pub.disconnect()
    sub.disconnect()
    print("OK stomp.py: receipt, MESSAGE with seed 000's headers")
    return 0


def chat(host: str, port: int, path: str, token: str) -> int:
    """A 1.2 customer with a bearer token in CONNECT: joins a conversation with
    client-individual acks, ACKs through stomp.py's own ack(), and raises a typing event."""
    messages = queue.Queue()
    errors = []

    class Listener(stomp.ConnectionListener):
        def on_message(self, frame):
            messages.put(frame)

        def on_error(self, frame):
            errors.append(frame.headers.get("message"))

    c = stomp.WSStompConnection(
        [(host, port)], ws_path=path, heartbeats=(0, 0), vhost="localhost"
    )
    c.set_listener("l", Listener())
    c.connect(wait=True, headers={"accept-version": "1.2", "Authorization": f"Bearer {token}"})
    conversation = "/v1/topic/conversation/28ccd489-f588-4d35-99a9-1e74ec2475b2"
    c.subscribe(conversation, id="conv", ack="client-individual")
    events = []
    for step in ("userConnected", "startTyping"):
        if step == "startTyping":
            c.send(conversation.replace("/topic/", "/app/") + "/typing/start", "")
        try:
            m = messages.get(timeout=10)
        except queue.Empty:
            print(f"FAIL no {step} event; errors: {errors}", file=sys.stderr)
            return 1
        event = json.loads(m.body)
        if event.get(step, {}).get("userId") != "c-1" or not m.headers.get("ack"):
            print(f"FAIL {step}: {m.headers} {m.body!r}", file=sys.stderr)
            return 1
        c.ack(m.headers["ack"])
        events.append(step)
    c.disconnect(receipt="bye")
    if errors:
        print(f"FAIL ERROR {errors}", file=sys.stderr)
        return 1
    print(f"OK stomp.py chat: {', '.join(events)}, acked")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[4] == "chat":
        sys.exit(chat(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5]))
    sys.exit(main())
