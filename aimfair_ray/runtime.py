"""Connecting to Ray: a local cluster when RAY_ADDRESS is unset, else that cluster."""

from __future__ import annotations

import math
import os
import sys
import uuid

from aimfair_ray import AimfairError


def use_cluster_token() -> None:
    """Send the cluster's auth token when one is available locally (~/.ray/auth_token, RAY_AUTH_TOKEN)
    and RAY_AUTH_MODE is unset: what Ray's own CLI does. Ray 2.60 heads enable token auth by default."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # another Ray version: RAY_AUTH_MODE=token does the same
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


# A local cluster: no preemption watcher actor starts with every Ray Train run (nothing preempts a
# laptop); set the variable to keep Ray's default. Ray Train's 2 s worker poll is kept on purpose: at
# 0.2 s, a Ray Tune trial deadlocked (Tune's function trainable forwarded the run's last report into its
# full one-slot result queue, which only that same thread drains, as the trial function ended).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(rcfg, output_dir: str | None = None) -> dict:
    """Start or join a Ray cluster once per process; returns the cluster's resources. With ``output_dir``,
    refuses (once per process) a store that can't be written, or a local folder the cluster's nodes
    don't share (:func:`check_output_dir`)."""
    resources = _ensure_ray(rcfg)
    _STATE["autoscaling"] = rcfg.autoscaling
    if output_dir is not None:
        check_output_dir(output_dir)
    return resources


_STATE: dict = {"autoscaling": False, "checked": set()}


def check_store(uri: str) -> None:
    """A URI this process can write, read and delete in, or one line naming it and the usual fixes. Credentials
    come from the environment, the instance's role or a mounted Secret, never from a config file."""
    from aimfair_ray.storage import atomic_write_bytes, is_uri, read_bytes, remove

    if not is_uri(uri) or uri in _STATE["checked"]:
        return
    probe = f"{uri.rstrip('/')}/.aimfair-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        atomic_write_bytes(probe, b"ok")
        if read_bytes(probe) != b"ok":
            raise OSError("what was written did not read back")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - any failure is the same one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AimfairError(f"output_dir {uri} can't be written ({first}): check the bucket exists, the endpoint "
                           "(AWS_ENDPOINT_URL) and the credentials (environment, instance role or a Kubernetes "
                           "Secret)") from None
    _STATE["checked"].add(uri)


def check_output_dir(output_dir: str) -> None:
    """On a cluster of more than one node, a local ``output_dir`` must be one folder that every node sees
    (a shared mount): each node writes a token there and this process looks for all of them. A node-local
    disk would scatter a run's files over the nodes, so that is refused in one line naming the fix."""
    import ray

    from aimfair_ray.storage import is_uri, local_path

    if is_uri(output_dir):
        return check_store(output_dir)
    if output_dir in _STATE["checked"]:  # every stage calls this: the node listing only until the check passed
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = os.path.join(os.path.abspath(local_path(output_dir)), f".aimfair-nodes-{uuid.uuid4().hex[:8]}")

    @ray.remote(num_cpus=0)
    def token(path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()

    try:
        ray.get([token.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            os.path.join(folder, n["NodeID"])) for n in nodes], timeout=120)
        seen = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    unseen = [n["NodeID"] for n in nodes if n["NodeID"] not in seen]
    if unseen:
        raise AimfairError(f"output_dir {output_dir} is not shared by the cluster's {len(nodes)} nodes ({len(unseen)} "
                           "wrote there and this process can't see it): set output_dir=s3://<bucket>/<path> (or "
                           "gs://), or a folder every node mounts")
    _STATE["checked"].add(output_dir)


def holds(nodes: list[dict], cpus: float, gpus: float) -> int:
    """How many actors or workers of ``cpus`` / ``gpus`` each the ``nodes`` (their resources) hold at once."""
    return sum(min(math.floor(n.get("CPU", 0) / cpus + 1e-9) if cpus else 10**6,
                   math.floor(n.get("GPU", 0) / gpus + 1e-9) if gpus else 10**6) for n in nodes)


def require(what: str, units: int, cpus: float, gpus: float, knobs: str) -> None:
    """Refuse at once, in one line, ``units`` actors or workers of ``cpus`` / ``gpus`` each that the cluster's
    live nodes can't hold together (instead of waiting for them forever); ``knobs``: the settings that
    lower the request. Skipped with ``ray.autoscaling`` (nodes come on demand)."""
    import ray

    if _STATE["autoscaling"] or not ray.is_initialized() or not units:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fit = holds(nodes, cpus, gpus)
    if fit >= units:
        return
    best = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    fix = ("this cluster has no GPUs: add --config cpu" if gpus and not any(n.get("GPU") for n in nodes) else
           f"lower {knobs} (--set), or set ray.autoscaling=true where an autoscaler adds nodes")
    raise AimfairError(f"{what} asks {units} x ({cpus:g} CPUs, {gpus:g} GPUs) and this cluster holds {fit} at once "
                       f"(largest node: {best.get('CPU', 0):g} CPUs, {best.get('GPU', 0):g} GPUs): {fix}")


def _ensure_ray(rcfg) -> dict:
    import ray

    from aimfair_ray import ray_logs

    # Ray Train's controller polls its workers this often (2 s by default); a finished run waits for two
    # polls before fit() returns. Ray Train passes the variable on to the controller, on any cluster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized():
        ray_logs.attach_workers()  # a run routed after Ray started (a second command in one process)
        return ray.cluster_resources()
    address = os.environ.get("RAY_ADDRESS") or rcfg.address
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if address:
        use_cluster_token()
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise AimfairError(f"cannot connect to the Ray cluster at {address}: {e}; "
                               "check RAY_ADDRESS / ray.address, or unset it to start a local cluster") from e
    else:
        if len(rcfg.temp_dir) > 60:
            raise AimfairError(f"ray.temp_dir {rcfg.temp_dir!r} is too long: Ray's socket paths must stay under "
                               "107 bytes; use a short path such as /tmp/aimfair-ray")
        # Logical CPUs: at least 4, so Ray Data's read tasks can run beside 2 Train workers.
        num_cpus = rcfg.num_cpus or max(os.cpu_count() or 1, 4)
        for k, v in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(k, v)
        # The dashboard serves the State API, which Ray Train V2 uses to remove the placement groups of a run
        # whose controller died (a sweep trial that ASHA stopped, a killed driver); without it they leak.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=rcfg.temp_dir,
                 log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    resources = ray.cluster_resources()
    if ray_logs.log_dir():  # the command line's quiet console: its own bars, Ray's output in the run's logs
        ctx.enable_progress_bars = False
        ray_logs.attach_workers()
        gpus = f", {int(resources['GPU'])} GPUs" if resources.get("GPU") else ""
        ray_logs.say(f"ray: {'joined ' + address if address else 'started a local cluster'} "
                     f"({int(resources.get('CPU', 0))} CPUs{gpus}); Ray's own output -> {ray_logs.log_dir()}/")
    else:
        # Ray Data's bars only on a terminal (or AIMFAIR_PROGRESS=1); logs stay readable in CI and jobs.
        ctx.enable_progress_bars = os.environ.get("AIMFAIR_PROGRESS", "1" if sys.stdout.isatty() else "0") == "1"
    return resources
