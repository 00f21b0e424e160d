#!/usr/bin/env python3
"""An OTLP/gRPC logs receiver for the OTLP sink tests, built from the
OpenTelemetry protocol's own Python stubs (PyPI `opentelemetry-proto`) and
grpcio: nothing of the daemon's code.

Every Export request is written as one JSON line to --out:
  {"metadata": {name: value, ...}, "request": <proto3 JSON of the request>,
   "answer": "ok" | "<code name>"}
(the metadata of refused requests too, so a test can see what was sent).
The bound port is written to --port-file once the server listens.

Ways to misbehave, for the failure tests:
  --fail-first N --fail-code CODE   answer the first N requests with CODE
  --reject-first N                  partial success: the first request's
                                    first N records rejected
  --require KEY=VALUE               UNAUTHENTICATED without that metadata
  --tls-cert/--tls-key [--client-ca] TLS, with client certificates checked
"""

import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import (
    logs_service_pb2,
    logs_service_pb2_grpc,
)


class Receiver(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, args):
        self.args = args
        self.out = open(args.out, "a", buffering=1)
        self.lock = threading.Lock()
        self.calls = 0

    def Export(self, request, context):
        metadata = {k: v for k, v in context.invocation_metadata()}
        with self.lock:
            self.calls += 1
            n = self.calls
            answer = "ok"
            want = self.args.require
            if want:
                k, _, v = want.partition("=")
                if metadata.get(k) != v:
                    answer = "UNAUTHENTICATED"
            if answer == "ok" and n <= self.args.fail_first:
                answer = self.args.fail_code
            self.out.write(
                json.dumps(
                    {
                        "metadata": metadata,
                        "request": json_format.MessageToDict(request),
                        "answer": answer,
                    }
                )
                + "\n"
            )
        if answer != "ok":
            context.abort(getattr(grpc.StatusCode, answer), f"test receiver: {answer}")
        resp = logs_service_pb2.ExportLogsServiceResponse()
        if n == 1 and self.args.reject_first:
            resp.partial_success.rejected_log_records = self.args.reject_first
            resp.partial_success.error_message = "test receiver: rejected"
        return resp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--fail-code", default="UNAVAILABLE")
    p.add_argument("--reject-first", type=int, default=0)
    p.add_argument("--require", default="")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--client-ca")
    args = p.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Receiver(args), server)
    addr = f"127.0.0.1:{args.port}"
    if args.tls_cert:
        with open(args.tls_key, "rb") as k, open(args.tls_cert, "rb") as c:
            pair = (k.read(), c.read())
        ca = open(args.client_ca, "rb").read() if args.client_ca else None
        creds = grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=ca is not None
        )
        port = server.add_secure_port(addr, creds)
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        sys.exit(f"cannot listen on {addr}")
    server.start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(port))
    import os

    os.replace(args.port_file + ".tmp", args.port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main()
