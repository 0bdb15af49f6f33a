"""What a cluster that shares no disk costs a run: the tiny demo chain on one node with a local disk, against
three Ray nodes on this machine that share only an S3 server (moto on loopback), with the bytes each stage
moved to and from the store.

    python benchmarks/store_cost.py [--json benchmarks/results/store_cost.json]

The share-nothing cluster (``share_nothing``, also the test fixture of tests/test_share_nothing.py): a head with
no CPUs, where the driver runs, and two worker nodes of 2 CPUs, each in its own mount namespace (``unshare -m``,
as root) with a private tmpfs over its Ray temp dir, its temporary files and its store cache (the bundled LLM, as
`make setup` converts it, bound read-only into that cache: a node built from cluster/Dockerfile has it). The S3 endpoint
is moto behind a counting proxy: every request's body and every response's body are added to the stage folder
their path names (``data``, ``synthetic``, ``baseline``, ...), up (to the store) or down (from it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = os.path.dirname(sys.executable)
TINY = ["data.n_train=400", "data.n_val=100", "data.n_test_per_cell=50", "data.n_generator=40", "train.epochs=2",
        "train.batch_size=64", "model.width=8", "generate.backend=template", "generate.prompts_per_cell=3",
        "generate.n_balanced_per_cell=4", "generate.n_imbalanced=10", "generate.steps=2", "generate.batch_size=4",
        "generate.filter=false", "generate.cpus_per_actor=1", "finetune.epochs=2", "finetune.batch_size=8"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_start(*extra) -> list[str]:
    return [os.path.join(BIN, "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
            "--object-store-memory=150000000", "--disable-usage-stats", *extra]


def _wait_up(url: str, proc, timeout: float, failed) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(failed()) from None
            time.sleep(0.3)


@contextmanager
def share_nothing(env: dict | None = None):
    """Three Ray nodes on loopback that share no disk (see the module's docstring); yields ``address`` (GCS),
    ``dashboard`` (the job server), ``private`` (the folder each worker node sees as its own tmpfs), ``env``
    (for drivers: RAY_ADDRESS set), ``procs`` (by node name), ``add(name)`` and ``alive(n)``. Every node's
    process group is stopped at the end, also when the start fails."""
    tmp = tempfile.mkdtemp(prefix="afs-", dir="/tmp")  # short: AF_UNIX paths < 107 bytes
    private = os.path.join(tmp, "node")
    os.makedirs(os.path.join(private, "ray"))
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = free_ports(7)
    env = dict(env or os.environ, RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="6",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    if env.get("RAY_AUTH_MODE") != "token":  # token auth, as Ray 2.60 heads have it once a token exists
        subprocess.run([os.path.join(BIN, "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
        env["RAY_AUTH_MODE"] = "token"
    procs: dict[str, subprocess.Popen] = {}
    from aimfair_ray.llm import cached_llm_dir

    llm = cached_llm_dir()

    def start(name, cmd, node_env):
        log = open(f"{tmp}/{name}.log", "w")
        procs[name] = subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    address = f"127.0.0.1:{gcs}"

    def add(name):  # its own mount namespace, a tmpfs over <private>; every port its own
        ports = free_ports(6)
        cmd = _ray_start(f"--address={address}", "--num-cpus=2", f"--dashboard-agent-listen-port={ports[0]}",
                         f"--dashboard-agent-grpc-port={ports[1]}", f"--runtime-env-agent-port={ports[2]}",
                         f"--metrics-export-port={ports[3]}", f"--node-manager-port={ports[4]}",
                         f"--object-manager-port={ports[5]}")
        script = f'mount -t tmpfs tmpfs "{private}" && mkdir -p "{private}/tmp" "{private}/ray" && '
        if llm.is_dir():  # the bundled LLM as `make setup` converts it (a node built from cluster/Dockerfile has it
            # in its own cache): bound read-only, or every process on the node would dequantize the GGUF (~20 s)
            script += f'mkdir -p "{private}/cache/{llm.name}" && mount --bind -o ro "{llm}" "{private}/cache/{llm.name}" && '
        script += 'exec "$@"'
        start(name, ["unshare", "-m", "sh", "-c", script, "sh", *cmd],
              # RAY_TMPDIR too: Ray keeps its file locks there (a checkpoint's download lock), and two real
              # nodes never share one (with a shared one, a node waited on the other's lock and read an empty dir)
              dict(env, TMPDIR=f"{private}/tmp", RAY_TMPDIR=f"{private}/tmp", AIMFAIR_CACHE=f"{private}/cache"))

    def alive(n):
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.time() + 120
        while True:
            out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
            if out.stdout.strip() == str(n):
                return
            if time.time() > deadline:
                raise RuntimeError(f"the cluster has not {n} live nodes: {out.stdout} {out.stderr[-2000:]}")
            time.sleep(1)

    try:
        # The head's temp dir is <private>/ray: on the head, this machine's disk; on a worker node, its own tmpfs.
        start("head", _ray_start("--head", f"--port={gcs}", "--num-cpus=0", f"--temp-dir={private}/ray",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                 f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                                 f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
                                 f"--ray-client-server-port={client}"), env)
        _wait_up(f"http://127.0.0.1:{dash}/api/version", procs["head"], 120,
                 lambda: f"the head did not start: {open(f'{tmp}/head.log').read()[-3000:]}")
        add("node_a")  # one after the other: two `ray start` at once did not both join within 120 s here
        alive(2)
        add("node_b")
        alive(3)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "private": private, "procs": procs,
               "env": dict(env, RAY_ADDRESS=address), "add": add, "alive": alive}
    finally:
        for p in procs.values():  # each node's whole process group: `ray start` and what it started
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=20)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        shutil.rmtree(tmp, ignore_errors=True)


class Counter:
    """Bytes by (stage folder, "up" | "down") of the requests a :func:`counting_proxy` forwarded."""

    def __init__(self, run_prefix: str):
        self.prefix, self.lock, self.bytes = run_prefix.strip("/"), threading.Lock(), {}

    def add(self, path: str, up: int, down: int) -> None:
        key = path.split("?", 1)[0].lstrip("/")
        stage = (key[len(self.prefix):].lstrip("/").split("/", 1)[0] if key.startswith(self.prefix)
                 else "(outside the run: the generation model, store probes)")
        with self.lock:
            s = self.bytes.setdefault(stage or "(listing)", {"up": 0, "down": 0, "requests": 0})
            s["up"], s["down"], s["requests"] = s["up"] + up, s["down"] + down, s["requests"] + 1


@contextmanager
def counting_proxy(target_port: int, counter: Counter):
    """An HTTP proxy on loopback in front of the S3 server at ``target_port``, counting body bytes per request."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # pyarrow's uploads
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _forward(self):
            body = self._body()
            n = len(body)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
            headers["Content-Length"] = str(n)
            conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=120)
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():  # a HEAD's Content-Length is the object's size: kept
                if k.lower() not in ("transfer-encoding", "connection") and (
                        k.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()
            counter.add(self.path, n, len(data) if self.command != "HEAD" else 0)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def tiny_pipeline(path: str) -> str:
    import torch

    from aimfair_ray.generate.t2i import AimfairT2IPipeline, TextProjection, make_scheduler, make_unet

    torch.manual_seed(0)
    AimfairT2IPipeline(unet=make_unet(32, (8, 16, 16), 1), text_proj=TextProjection(out_dim=32),
                       scheduler=make_scheduler()).save_pretrained(path)
    return path


def stage_times(records: str) -> dict:
    """Seconds by stage from a run's logs/stages.jsonl (the demo's two audits: ``audit 1``, ``audit 2``)."""
    out, seen = {}, {}
    for r in (json.loads(x) for x in records.splitlines() if x.strip()):
        seen[r["stage"]] = seen.get(r["stage"], 0) + 1
        out[r["stage"] + (f" {seen[r['stage']]}" if r["stage"] == "audit" else "")] = r["seconds"]
    return out


def demo(sets: list[str], env: dict) -> tuple[float, str]:
    t0 = time.time()
    res = subprocess.run([os.path.join(BIN, "aimfair"), "demo", *[x for s in sets for x in ("--set", s)]], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"aimfair demo failed: {res.stdout[-3000:]}{res.stderr[-2000:]}")
    return time.time() - t0, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here (stamped with the command, machine and date)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from aimfair_ray.storage import read_text, upload_dir
    from aimfair_ray.tables import stamp

    work = Path(tempfile.mkdtemp(prefix="store-cost-"))
    s3_port = free_ports(1)[0]
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    counter = Counter("aimfair/cost/runs/cmnist")
    try:
        with counting_proxy(s3_port, counter) as port:
            creds = dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                         AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
            os.environ.update(creds)
            _wait_up(f"http://127.0.0.1:{s3_port}/", moto, 60, lambda: "moto did not start")
            import pyarrow.fs as pafs

            pafs.FileSystem.from_uri("s3://aimfair?allow_bucket_creation=true")[0].create_dir("aimfair")
            pipe = tiny_pipeline(str(work / "t2i"))
            upload_dir(pipe, "s3://aimfair/cost/models/t2i")
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            env["RAY_TMPDIR"] = str(work / "ray")

            print("one node, local disk: aimfair demo (tiny) ...", flush=True)
            local_s, _ = demo(TINY + [f"output_dir={work / 'runs'}", f"generate.pipeline={pipe}"], env)
            local_stages = stage_times((work / "runs" / "cmnist" / "logs" / "stages.jsonl").read_text())
            counter.bytes.clear()
            print("three nodes sharing only S3: aimfair demo (tiny) ...", flush=True)
            with share_nothing(env) as cluster:
                s3_s, _ = demo(TINY + ["output_dir=s3://aimfair/cost/runs", "generate.pipeline=s3://aimfair/cost/models/t2i"],
                               cluster["env"])
            s3_stages = stage_times(read_text("s3://aimfair/cost/runs/cmnist/logs/stages.jsonl"))
            moved = dict(sorted(counter.bytes.items()))
    finally:
        os.killpg(moto.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    out = {"what": "the tiny demo chain (aimfair demo, TINY overrides of the tests, 2 Train workers)",
           "one_node_local_disk": {"wall_s": round(local_s, 1), "stages_s": local_stages},
           "share_nothing_s3": {"wall_s": round(s3_s, 1), "stages_s": s3_stages,
                                "bytes_by_stage_folder": moved,
                                "bytes_total": {k: sum(v[k] for v in moved.values()) for k in ("up", "down", "requests")}},
           "ratio_wall": round(s3_s / local_s, 2),
           "bytes_are": "request and response bodies on the wire: listings, error replies and aws-chunked framing included",
           "notes": "one machine (2 cores) for both; the share-nothing cluster's 3 nodes and moto share its cores; "
                    "S3 on loopback has no network latency or bandwidth limit, so the figures are the store layer's "
                    "own overhead, not a cloud's"}
    out.update(stamp("python benchmarks/store_cost.py" + (f" --json {args.json}" if args.json else "")))
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
