"""Seed 000's flow with stomp.py's WSStompConnection, which offers no WebSocket subprotocol,
against a running sensorgate. Usage: python check.py HOST PORT PATH
Exits 0 when every expectation holds, 1 (with the reason) otherwise."""

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

    def connection():
        c = stomp.WSStompConnection([(host, port)], ws_path=path, heartbeats=(0, 0))
        c.set_listener("l", Listener())
        c.connect(wait=True, headers={"accept-version": "1.1"})
        return c

    sub = connection()
    sub.subscribe("/topic/workout/record", id="any_client_id", receipt="sub-1")
    if not receipted.wait(10) or receipts != ["sub-1"]:
        print(f"FAIL no receipt for SUBSCRIBE: {receipts}", file=sys.stderr)
        return 1
    pub = connection()
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


if __name__ == "__main__":
    sys.exit(main())
