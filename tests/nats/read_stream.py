#!/usr/bin/env python3
"""Reads a JetStream stream with nats-py, a client independent of the
daemon's, and prints it as one JSON object: the stream's message count and
every message (sequence, subject, headers, payload in base64).

    read_stream.py --url nats://127.0.0.1:4222 --stream FLOWS [--expect N]
        [--timeout S] [--user U --password P | --token T] [--republish-first]
        [--ca CA.pem [--cert CERT.pem --key KEY.pem]]

--expect waits (up to --timeout seconds) until the stream holds at least N
messages. --republish-first publishes the first message again with its own
headers (its Nats-Msg-Id among them) and reports the acknowledgement and
the count after it: JetStream's duplicate window must drop it.
"""

import argparse
import asyncio
import base64
import json
import ssl
import sys
import time

import nats


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--token")
    ap.add_argument("--republish-first", action="store_true")
    ap.add_argument("--ca")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()

    opts = {"servers": [a.url], "connect_timeout": 5, "allow_reconnect": False}
    if a.user:
        opts["user"] = a.user
        opts["password"] = a.password
    if a.token:
        opts["token"] = a.token
    if a.ca:
        ctx = ssl.create_default_context(cafile=a.ca)
        if a.cert:
            ctx.load_cert_chain(a.cert, a.key)
        opts["tls"] = ctx
    nc = await nats.connect(**opts)
    js = nc.jetstream()
    deadline = time.monotonic() + a.timeout
    while True:
        info = await js.stream_info(a.stream)
        if info.state.messages >= a.expect or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    out = {"stream_messages": info.state.messages, "messages": []}
    first = info.state.first_seq
    last = info.state.last_seq
    for seq in range(first, last + 1) if info.state.messages else []:
        try:
            m = await js.get_msg(a.stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        out["messages"].append(
            {
                "seq": m.seq,
                "subject": m.subject,
                "headers": dict(m.headers or {}),
                "payload": base64.b64encode(m.data or b"").decode(),
            }
        )
    if a.republish_first and out["messages"]:
        m = out["messages"][0]
        ack = await js.publish(
            m["subject"], base64.b64decode(m["payload"]), headers=m["headers"]
        )
        after = await js.stream_info(a.stream)
        out["republished"] = {
            "duplicate": bool(ack.duplicate),
            "stream_messages_after": after.state.messages,
        }
    await nc.close()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
