"""`propolis bench watcher`: k8s-watcher initial sync and event->KV latency, racing identity allocators, RSS.

Every process is separate so RSS figures are honest: the sandbox API server
(`python -m propolis_sandbox.apiserver`), nats-server, and each service
(`deploy.start_service`, the way `propolis dev up` starts them); this process
only writes objects through the API and watches KV.

1. Initial sync: N pods and M services are created in the API before the
   k8s-watcher starts; the figure is the time from spawning the watcher process
   (Python start-up included) until its watermark in PROPOLIS_K8S_V1 covers the
   API's resourceVersion, and objects/s = objects mirrored / that time.
2. Event->KV latency: pods' labels are merge-patched at a fixed rate (open loop);
   from just before each PATCH is sent until the KV watch delivers that object with
   the new label value (also from the PATCH's answer: the watcher's share). The
   patched pods' namespace has no Services (see `_populate`).
3. Identity allocations/s: two `IdentityAllocator`s, each in its own process
   (`python -m propolis_sandbox.bench.watcher allocator-replica …`) on its own NATS
   connection, start at the same instant and race on the same label sets in the
   same order (CAS decides); allocations/s = label sets agreed / elapsed.
4. RSS: the watcher process after the sync (N pods mirrored) and after the update
   stream; idle RSS of every cluster-scoped service process against an empty API;
   and what importing kubernetes-asyncio costs, fully vs as `k8s.kubeclient` does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from propolis import deploy
from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.kv import EventType, Kv
from propolis.bus.messages import K8sObject, Watermark
from propolis.errors import CliError, TemporaryError
from propolis.identity.allocator import IdentityAllocator
from propolis_sandbox.apiserver import KUBECONFIG_FILE, URL_FILE
from propolis_sandbox.bench.common import RSS_TARGET_MB, idle_rss, percentile, report, rss_mb
from propolis_sandbox.cluster import Api

MERGE_PATCH = "application/merge-patch+json"
SEQ_LABEL = "bench-seq"


@dataclass
class Options:
    pods: int = 10_000
    services: int = 1_000
    namespaces: int = 10
    updates: int = 1_000  # part 2: label patches
    rate: float = 100.0  # part 2: patches per second (open loop)
    allocations: int = 2_000  # part 3: distinct label sets, each raced by both replicas
    concurrency: int = 16  # part 3: allocations in flight per replica
    create_concurrency: int = 32  # objects POSTed in parallel while populating the API
    rss_settle: float = 5.0  # idle services run this long before their RSS is read
    sync_timeout: float = 300.0

    def validate(self) -> None:
        for name in ("pods", "services", "namespaces", "updates", "allocations", "concurrency", "create_concurrency"):
            if getattr(self, name) < 1:
                raise CliError(f"--{name.replace('_', '-')} must be >= 1")
        if self.rate <= 0:
            raise CliError("--rate must be > 0")


# --- processes -----------------------------------------------------------------------------------
async def _start_apiserver(run_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The sandbox API server in its own process (the sandbox starts it the same way)."""
    # once per bench run, before any timing: a plain Popen (its own session, as the sandbox starts it)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "propolis_sandbox.apiserver", "--run-dir", str(run_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 20
    while not (run_dir / URL_FILE).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise TemporaryError(f"the API server did not start (log: {log_path})")
        await asyncio.sleep(0.05)
    return proc, (run_dir / URL_FILE).read_text().strip()


def _service(name: str) -> Any:
    for spec in deploy.without_node():
        if spec.name == name:
            return spec
    raise CliError(f"{name} is not in the suite")


def _import_rss(statement: str) -> float:
    """RSS (MB) of a fresh interpreter after ``statement``: what an import costs."""
    code = f"{statement}\nfor l in open('/proc/self/status'):\n    l.startswith('VmRSS:') and print(l.split()[1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return int(out.stdout.split()[0]) / 1024 if out.returncode == 0 and out.stdout.strip() else float("nan")


# --- the API's contents --------------------------------------------------------------------------
def _pod(i: int, ns: str, services: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"pod-{i}", "namespace": ns,
                         "labels": {"app": f"svc-{i % services}", "tier": "bench"}},
            "spec": {"nodeName": "bench-node", "containers": [
                {"name": "c", "image": "echo", "ports": [{"name": "http", "containerPort": 8080}]}]}}


def _svc(i: int, ns: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": ns},
            "spec": {"selector": {"app": f"svc-{i}"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


async def _populate(api: Api, opt: Options) -> float:
    """Namespaces, pods, then services through the API's HTTP interface; returns objects/s of the writes.

    Pods go first and Services live outside ``bench-0`` (the namespace whose pods part 2 patches): the
    sandbox API's in-process EndpointSlice controller re-syncs every Service of a namespace on each pod
    event there, which would make the API itself, not the watcher, the bottleneck (in a real cluster that
    controller runs in kube-controller-manager)."""
    nss = [f"bench-{n}" for n in range(opt.namespaces)]
    svc_nss = nss[1:] or nss
    for ns in nss:
        await api.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns, "labels": {"bench": "yes"}}})
    start = time.perf_counter()

    async def post_all(todo: list[tuple[str, dict[str, Any]]]) -> None:
        queue = iter(todo)

        async def worker() -> None:
            for path, body in queue:
                await api.request("POST", path, body=body)

        await asyncio.gather(*[worker() for _ in range(opt.create_concurrency)])

    await post_all([(f"/api/v1/namespaces/{nss[i % len(nss)]}/pods", _pod(i, nss[i % len(nss)], opt.services))
                    for i in range(opt.pods)])
    await post_all([(f"/api/v1/namespaces/{svc_nss[i % len(svc_nss)]}/services", _svc(i, svc_nss[i % len(svc_nss)]))
                    for i in range(opt.services)])
    return (opt.pods + opt.services) / (time.perf_counter() - start)


async def _quiet_revision(api: Api, quiet: float = 0.5, timeout: float = 60.0) -> int:
    """The API's resourceVersion once it stopped moving (the EndpointSlice controller catches up)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rv = int(await api.resource_version())
        if rv != last:
            last, since = rv, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return rv
        await asyncio.sleep(0.1)
    return last


# --- part 1: initial sync ------------------------------------------------------------------------
async def _wait_watermark(kv: Kv, target: int, timeout: float, watcher: deploy.ServiceProcess) -> float:
    """Monotonic time at which the watermark reached ``target`` (the watch runs in its own task: cancelling
    a pending ``__anext__`` would close the generator)."""
    reached: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def follow() -> None:
        async for ev in kv.watch(subjects.WATERMARK_KEY):
            if ev.type is EventType.PUT and isinstance(ev.value, Watermark) and ev.value.resource_version >= target:
                reached.set_result(time.monotonic())
                return

    task = asyncio.create_task(follow(), name="bench-watermark")
    deadline = time.monotonic() + timeout
    try:
        while not reached.done():
            if time.monotonic() > deadline or not watcher.alive() or task.done():
                raise TemporaryError(f"the watermark did not reach {target} (watcher log: {watcher.log_path})")
            await asyncio.wait([reached], timeout=0.5)
        return reached.result()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _count_objects(kv: Kv) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in await kv.items():
        parsed = subjects.parse_k8s_key(key)
        if parsed is not None:
            counts[parsed.kind] = counts.get(parsed.kind, 0) + 1
    return counts


# --- part 2: event -> KV latency -----------------------------------------------------------------
async def _latency(api: Api, kv: Kv, opt: Options) -> dict[str, Any]:
    ns = "bench-0"
    targets = [f"pod-{i}" for i in range(0, opt.pods, opt.namespaces)][:200]  # pods of bench-0
    sent: dict[int, float] = {}
    ack_at: dict[int, float] = {}
    acked: list[float] = []
    latencies: dict[int, float] = {}
    delivered_at: dict[int, float] = {}
    done = asyncio.Event()
    watch = kv.watch(subjects.k8s_keys("pods", ns))
    async for ev in watch:  # the initial values, then SYNCED
        if ev.type is EventType.SYNCED:
            break

    async def follow() -> None:
        async for ev in watch:
            if ev.type is EventType.PUT and isinstance(ev.value, K8sObject):
                seq = ev.value.labels.get(SEQ_LABEL)
                if seq is not None and int(seq) in sent and int(seq) not in latencies:
                    delivered_at[int(seq)] = time.perf_counter()
                    latencies[int(seq)] = (delivered_at[int(seq)] - sent[int(seq)]) * 1000
                    if len(latencies) == opt.updates:
                        done.set()

    async def patch(seq: int) -> None:
        name = targets[seq % len(targets)]
        t0 = time.perf_counter()
        sent[seq] = t0
        await api.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}",
                          body={"metadata": {"labels": {SEQ_LABEL: str(seq)}}}, content_type=MERGE_PATCH)
        ack_at[seq] = time.perf_counter()
        acked.append((ack_at[seq] - t0) * 1000)

    follower = asyncio.create_task(follow(), name="bench-follow")
    patches: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    try:
        for seq in range(opt.updates):
            delay = start + seq / opt.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            patches.append(asyncio.create_task(patch(seq)))
        await asyncio.gather(*patches)
        try:
            await asyncio.wait_for(done.wait(), 30)
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - start
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await watch.aclose()
    lat = list(latencies.values())
    # from the API's answer: the API's own processing left out (negative when KV was faster than the answer)
    from_ack = [(delivered_at[q] - ack_at[q]) * 1000 for q in delivered_at if q in ack_at]
    return {"from_ack_p50_ms": percentile(from_ack, 50), "from_ack_p99_ms": percentile(from_ack, 99),
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "max_ms": max(lat, default=float("nan")),
            "delivered": len(lat), "sent": opt.updates, "achieved_rate": opt.updates / elapsed,
            "api_ack_p50_ms": percentile(acked, 50), "api_ack_p99_ms": percentile(acked, 99)}


# --- part 3: racing allocators -------------------------------------------------------------------
def _label_sets(n: int) -> list[list[str]]:
    return [[f"k8s:app=bench-{i}", "k8s:io.kubernetes.pod.namespace=bench", "k8s:io.cilium.k8s.policy.cluster=bench"]
            for i in range(n)]


async def _replica(url: str, name: str, allocations: int, concurrency: int, start_at: float) -> dict[str, Any]:
    """One allocator replica on its own connection: allocate every label set, ``concurrency`` in flight,
    starting at wall-clock ``start_at`` so that replicas in different processes race."""
    bus = Bus(url, name=name)
    await bus.connect(max_wait=5)
    try:
        alloc = IdentityAllocator(await bus.kv(subjects.IDENTITIES_BUCKET))
        sem = asyncio.Semaphore(concurrency)

        async def one(labels: list[str]) -> int:
            async with sem:
                return await alloc.allocate(labels)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        ids = await asyncio.gather(*[one(ls) for ls in _label_sets(allocations)])
        return {"ids": ids, "end": time.time(), "conflicts": alloc.conflicts}
    finally:
        await bus.close()


async def _allocations(url: str, opt: Options, processes: bool = True) -> dict[str, Any]:
    """Two replicas race; each in its own process (``processes``) or both in this one."""
    start_at = time.time() + (2.0 if processes else 0.2)
    if processes:
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "propolis_sandbox.bench.watcher", "allocator-replica", url, f"bench-alloc-{i}",
            str(opt.allocations), str(opt.concurrency), repr(start_at), stdout=asyncio.subprocess.PIPE)
            for i in range(2)]
        outs = [await p.communicate() for p in procs]
        if any(p.returncode for p in procs):
            raise TemporaryError("an allocator replica failed (see its traceback above)")
        results = [json.loads(out) for out, _ in outs]
    else:
        results = list(await asyncio.gather(*[_replica(url, f"bench-alloc-{i}", opt.allocations, opt.concurrency,
                                                      start_at) for i in range(2)]))
    elapsed = max(r["end"] for r in results) - start_at
    a, b = results[0]["ids"], results[1]["ids"]
    return {"allocations_per_s": opt.allocations / elapsed, "seconds": elapsed, "agree": a == b,
            "distinct": len(set(a)), "conflicts": sum(r["conflicts"] for r in results),
            "replicas": "2 processes" if processes else "1 process"}


def _replica_main(argv: list[str]) -> int:
    url, name, allocations, concurrency, start_at = argv
    result = asyncio.run(_replica(url, name, int(allocations), int(concurrency), float(start_at)))
    print(json.dumps(result))
    return 0


# --- the whole run -------------------------------------------------------------------------------
async def run(opt: Options, command: str = "propolis bench watcher") -> int:
    opt.validate()
    rows: list[dict[str, Any]] = []

    def row(figure: str, value: float, unit: str, target: str = "", met: bool | None = None, note: str = "") -> None:
        rows.append({"figure": figure, "value": value, "unit": unit, "target": target,
                     "met": "" if met is None else ("yes" if met else "NO"), "note": note})

    with tempfile.TemporaryDirectory(prefix="propolis-bench-watcher-") as tmp_name:
        tmp = Path(tmp_name)
        nats = EmbeddedNats(tmp / "nats", log_file=None)
        url = await nats.start()
        api_proc, api_url = await _start_apiserver(tmp / "api", tmp / "apiserver.log")
        env = {"PROPOLIS_NATS_URL": url, "PROPOLIS_KUBECONFIG": str(tmp / "api" / KUBECONFIG_FILE),
               "PROPOLIS_CLUSTER_NAME": "bench"}
        bus = Bus(url, name="bench-watcher")
        watcher: deploy.ServiceProcess | None = None
        try:
            await bus.connect(max_wait=5)
            await bus.ensure_buckets()
            k8s = await bus.kv(subjects.K8S_BUCKET)
            # 4a. idle RSS of each service process (empty API: four namespaces), before any load
            for r in await idle_rss(env, opt.rss_settle):
                row(f"idle RSS {r['service']}", r["idle_rss_mb"], "MB", f"< {RSS_TARGET_MB}",
                    r["idle_rss_mb"] < RSS_TARGET_MB, "own process, connected to NATS and the API")
            full = _import_rss("import kubernetes_asyncio.client, kubernetes_asyncio.config")
            light = _import_rss("import propolis.k8s.kubeclient")
            row("import kubernetes-asyncio (full)", full, "MB", note="fresh interpreter; what the watcher paid before")
            row("import propolis.k8s.kubeclient", light, "MB", note=f"what it pays now: {full - light:.1f} MB less")

            async with Api(api_url) as api:
                create_rate = await _populate(api, opt)
                target = await _quiet_revision(api)
                # 1. initial sync: spawn the watcher, wait for its watermark to cover the API's revision
                t0 = time.monotonic()
                watcher = deploy.start_service(_service("k8s-watcher"), node="bench-node", env=env, log_dir=tmp)
                t1 = await _wait_watermark(k8s, target, opt.sync_timeout, watcher)
                sync_s = t1 - t0
                counts = await _count_objects(k8s)
                objects = sum(counts.values())
                if counts.get("pods", 0) < opt.pods or counts.get("services", 0) < opt.services:
                    raise TemporaryError(f"the watermark covers the API but KV holds {counts}")
                row("initial sync (spawn -> watermark)", sync_s, "s", "< 10", sync_s < 10,
                    f"{opt.pods} pods + {opt.services} services ({objects} objects, every kind); "
                    f"API populated at {create_rate:,.0f} objects/s beforehand")
                row("initial sync throughput", objects / sync_s, "objects/s", "> 2,000", objects / sync_s > 2000,
                    "end to end, Python start-up of the watcher included")
                await asyncio.sleep(1.0)
                rss_sync = rss_mb(watcher.proc.pid)
                row(f"k8s-watcher RSS at {opt.pods} pods", rss_sync, "MB", note="after the initial sync")
                # 2. event -> KV latency under a steady stream of label patches
                lat = await _latency(api, k8s, opt)
                note = (f"{lat['delivered']}/{lat['sent']} updates at {lat['achieved_rate']:.0f}/s; "
                        f"API ack p50 {lat['api_ack_p50_ms']:.1f} / p99 {lat['api_ack_p99_ms']:.1f} ms")
                row("event -> KV p50", lat["p50_ms"], "ms", note="from the PATCH being sent to the KV watch delivery")
                row("event -> KV p99", lat["p99_ms"], "ms", "< 50", lat["p99_ms"] < 50, note)
                row("API answer -> KV p99", lat["from_ack_p99_ms"], "ms",
                    note=f"the watcher's share: from the PATCH's answer (p50 {lat['from_ack_p50_ms']:.2f} ms)")
                row(f"k8s-watcher RSS at {opt.pods} pods, after updates", rss_mb(watcher.proc.pid), "MB")
            deploy.stop_services([watcher])
            # 3. identity allocations with two racing replicas
            alloc = await _allocations(url, opt)
            row("identity allocations, 2 racing replicas", alloc["allocations_per_s"], "allocs/s", "> 1,000",
                alloc["allocations_per_s"] > 1000,
                f"{alloc['replicas']}, {opt.allocations} label sets, both agree: {alloc['agree']}, "
                f"{alloc['distinct']} distinct ids, {alloc['conflicts']} CAS conflicts")
            report("watcher", rows, ["figure", "value", "unit", "target", "met", "note"],
                   {"command": command, "options": asdict(opt), "details": {
                       "initial_sync": {"seconds": sync_s, "objects": counts, "api_revision": target,
                                        "api_create_rate": create_rate},
                       "latency": lat, "allocations": alloc}})
        finally:
            if watcher is not None and watcher.alive():
                deploy.stop_services([watcher])
            await bus.close()
            api_proc.terminate()
            try:
                api_proc.wait(10)
            except subprocess.TimeoutExpired:
                api_proc.kill()
                api_proc.wait()
            await nats.stop()
    return 0


if __name__ == "__main__":  # `python -m propolis_sandbox.bench.watcher allocator-replica …`: one racing replica (part 3)
    if sys.argv[1:2] != ["allocator-replica"]:
        raise SystemExit("usage: python -m propolis_sandbox.bench.watcher allocator-replica URL NAME N CONCURRENCY START_AT")
    raise SystemExit(_replica_main(sys.argv[2:]))
