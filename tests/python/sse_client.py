"""Reads an SSE stream with httpx-sse (a third-party client, as Python services use it) and
reports every event it yields.

Usage: python sse_client.py <url> <expected-count> <timeout-seconds>
Prints `ready` once the response head has come, then one JSON line when `expected-count` events
have come or the time is up: {"events": [{"type": ..., "id": ..., "data": ..., "retry": ...}]}.
"""

import json
import sys
import threading

import httpx
from httpx_sse import connect_sse

url, expected, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
events = []


def report():
    print(json.dumps({"events": events}), flush=True)


def read():
    with httpx.Client(timeout=None) as client:
        with connect_sse(client, "GET", url) as source:
            source.response.raise_for_status()
            print("ready", flush=True)
            for event in source.iter_sse():
                events.append(
                    {"type": event.event, "id": event.id, "data": event.data, "retry": event.retry}
                )
                if len(events) >= expected:
                    return


reader = threading.Thread(target=read, daemon=True)
reader.start()
reader.join(timeout)
report()
