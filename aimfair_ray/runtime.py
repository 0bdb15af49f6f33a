"""Connecting to Ray: a local cluster when RAY_ADDRESS is unset, else that cluster."""

from __future__ import annotations

import os
import sys

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


def ensure_ray(rcfg) -> dict:
    """Start or join a Ray cluster once per process; returns the cluster's resources."""
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
