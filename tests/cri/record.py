#!/usr/bin/env python3
"""Records a real containerd's CRI answers for the test beds without one.

    record.py [--out tests/fixtures/cri/recorded.json] [--host-network]

Starts a private containerd (``containerd.py``), runs two pods as kubelet
would -- a Deployment's ``client-7c9d5b8f4-abcde`` and a StatefulSet's
``server-0``, both in namespace ``shop``, each with one running container --
on the CNI bridge (or the host's network when the bridge cannot be set up, or
with ``--host-network``), and saves the answers of ``Version``,
``ListPodSandbox``, ``ListContainers`` and each sandbox's ``PodSandboxStatus``
as protobuf JSON with proto field names:

    {"version": ..., "list_pod_sandbox": ..., "list_containers": ...,
     "pod_sandbox_status": {"<sandbox id>": ...},
     "recorded": {"containerd": "<version>", "date": "<UTC ISO 8601>", "network": "..."}}

Only the fields of ``proto/cri/runtime.proto`` are kept (the daemon's subset
of the CRI).  The server container runs busybox httpd on port 18080; the
client fetches from it every 2 s.  The pods are removed afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import containerd as cd  # noqa: E402

DEFAULT_OUT = cd.REPO / "tests" / "fixtures" / "cri" / "recorded.json"
SERVER_PORT = 18080

#: Fixed pod UIDs, so that a new recording differs only in what the runtime chose.
CLIENT_UID = str(uuid.uuid5(uuid.NAMESPACE_DNS, "client-7c9d5b8f4-abcde.shop.sockscope.test"))
SERVER_UID = str(uuid.uuid5(uuid.NAMESPACE_DNS, "server-0.shop.sockscope.test"))


def record(rt: cd.PrivateContainerd, host_network: bool) -> dict:
    cri = rt.cri
    server_sb = cri.run_pod(
        "server-0", "shop", uid=SERVER_UID, host_network=host_network,
        labels={"app": "server", "controller-revision-hash": "server-6f7d9",
                "statefulset.kubernetes.io/pod-name": "server-0"})
    server_ip = (cri.pod_ips(server_sb) or ["127.0.0.1"])[0]
    cri.create_container(server_sb, "server", rt.image, [
        "sh", "-c", f"mkdir -p /www && echo server-0 > /www/index.html && "
                    f"exec httpd -f -p {SERVER_PORT} -h /www"])
    client_sb = cri.run_pod(
        "client-7c9d5b8f4-abcde", "shop", uid=CLIENT_UID, host_network=host_network,
        labels={"app": "client", "pod-template-hash": "7c9d5b8f4"})
    cri.create_container(client_sb, "client", rt.image, [
        "sh", "-c", f"while true; do wget -q -O - http://{server_ip}:{SERVER_PORT}/; "
                    "sleep 2; done"])
    # Both containers running, and the client has had an answer from the
    # server (its log holds the server's page), before the answers are taken.
    cd.wait_for(lambda: all(c.state == cd.pb2.CONTAINER_RUNNING
                            for c in cri.list_containers().containers)
                and len(cri.list_containers().containers) == 2, 20,
                what="both containers running")
    client_log = Path(cri.sandbox_configs[client_sb].log_directory) / "client" / "0.log"
    cd.wait_for(lambda: client_log.exists() and "server-0" in client_log.read_text(), 20,
                what=f"the client's fetch from the server ({client_log})")
    version = cri.version()
    sandboxes = cri.list_pod_sandbox()
    containers = cri.list_containers()
    status = {sb.id: cd.to_dict(cri.pod_sandbox_status(sb.id)) for sb in sandboxes.items}
    network = ("host network" if host_network
               else f"CNI bridge, host-local IPAM on {rt.cni_subnet}")
    return {
        "version": cd.to_dict(version),
        "list_pod_sandbox": cd.to_dict(sandboxes),
        "list_containers": cd.to_dict(containers),
        "pod_sandbox_status": status,
        "recorded": {"containerd": version.runtime_version,
                     "date": datetime.datetime.now(datetime.timezone.utc)
                     .replace(microsecond=0).isoformat(),
                     "network": network},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--host-network", action="store_true",
                    help="run the pods on the host's network even when CNI works")
    args = ap.parse_args(argv)
    with cd.PrivateContainerd(cni=not args.host_network) as rt:
        host_network = args.host_network or bool(rt.cni_error)
        if rt.cni_error:
            print(f"no pod network ({rt.cni_error}); recording host-network pods", file=sys.stderr)
        data = record(rt, host_network)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    for sb in data["list_pod_sandbox"]["items"]:
        net = data["pod_sandbox_status"][sb["id"]]["status"]["network"]
        print(f"sandbox {sb['id']} {sb['metadata']['namespace']}/{sb['metadata']['name']} "
              f"ip {net.get('ip') or '-'}")
    for c in data["list_containers"]["containers"]:
        print(f"container {c['id']} {c['metadata']['name']} in {c['pod_sandbox_id'][:12]}")
    print(f"wrote {args.out} (containerd {data['recorded']['containerd']})")


if __name__ == "__main__":
    main()
