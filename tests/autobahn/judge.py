"""Judges kosoku's Autobahn reports for an endpoint that is not an echo server.

Usage: python3 judge.py REPORT_DIR ENDPOINT   (ENDPOINT: connect, stomp or stream)

The Autobahn cases expect every message to be echoed. sensorgate's endpoints speak their own
protocols, so a case is judged on what a non-echo server can be judged on:

- the events the server produced, once its greeting (HELLO on /connect, the welcome on
  /stream) is set aside, must match what the case expects whenever the case expects no echo
  (pings answered with pongs, frames refused, close handshakes) -- Autobahn's own verdict,
  re-applied without the greeting;
- a case whose expectation includes an echoed message cannot be met by a non-echo server:
  there the server must close with a code its README documents for data it does not accept
  (or, for STOMP, may keep waiting for the rest of a frame until the client closes);
- every close the server initiates carries a documented code.

Prints one line per case that fails and a summary; exits 1 if any case fails.
"""

import glob
import json
import sys

# Close codes each endpoint documents for a client's data it does not accept: a bad frame
# (1002), not its protocol (1007 on the JSON endpoints; STOMP answers ERROR then 1002), too
# large (1009). 1000 answers the client's own close.
DOCUMENTED = {
    "connect": {1000, 1002, 1007, 1009},
    "stomp": {1000, 1002, 1007, 1009},
    "stream": {1000, 1002, 1007, 1009},
}
GREETING = {"connect": '{"op":2,', "stomp": None, "stream": '{"welcome":'}


def events_without_greeting(report, endpoint):
    prefix = GREETING[endpoint]
    received = report.get("received", [])
    if prefix and received and received[0][0] == "message" and str(received[0][1]).startswith(prefix):
        received = received[1:]
    return received


def expects_echo(report):
    return any(
        any(event[0] == "message" for event in outcome)
        for outcome in report.get("expected", {}).values()
    )


def close_ok(report):
    """Autobahn's close verdict, or: the server failed the connection with a documented code
    where the case wanted it failed."""
    return report.get("behaviorClose") in ("OK", "NON-STRICT", "INFORMATIONAL")


def judge(report, endpoint):
    code = report.get("remoteCloseCode")
    if code is not None and code not in DOCUMENTED[endpoint]:
        return f"closed with {code}, not a documented code"
    if report.get("behavior") in ("OK", "NON-STRICT", "INFORMATIONAL") and close_ok(report):
        return None
    received = events_without_greeting(report, endpoint)
    expected = report.get("expected", {})
    if not expects_echo(report):
        matches = any(received == outcome for outcome in expected.values())
        if not matches:
            return f"events {received} match none of {expected}"
        want = report.get("expectedClose", {}).get("closeCode", [])
        if code is not None and want and code not in want:
            return f"closed with {code}, the case wants {want}"
        return None
    # An echo was expected: the server may refuse the data with a documented code, or (STOMP)
    # wait for the rest of a frame until the client closes. Whatever else it sent (pongs)
    # must be what the case expects, in order, up to where the server stopped.
    if code is None and endpoint != "stomp":
        return "no close frame where data was refused"
    control = [e for e in received if e[0] != "message"]
    wanted = [
        [e for e in outcome if e[0] != "message"] for outcome in expected.values()
    ]
    if not any(control == w[: len(control)] for w in wanted):
        return f"control frames {control} are not what the case expects ({wanted})"
    return None


def main():
    directory, endpoint = sys.argv[1], sys.argv[2]
    failed = 0
    cases = 0
    for path in sorted(glob.glob(f"{directory}/*_case_*.json")):
        report = json.load(open(path))
        cases += 1
        why = judge(report, endpoint)
        if why:
            failed += 1
            print(f"FAILED {endpoint} {report['id']}: {why}")
    print(f"{endpoint}: {cases} cases, {cases - failed} passed, {failed} failed")
    if cases == 0 or failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
