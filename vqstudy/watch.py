"""The driver's watch on its cluster while a study runs.

Two ways a cluster fails under a running study, and what Tune alone would do:
- the nodes that can run a trial die and none comes back (a lost worker pool, a dead
  raylet): Tune waits for resources forever. The watch reads Ray's node table every few
  seconds; when no alive node has room for one trial for `grace_s`, it stops the study as
  Ctrl-C would (Tune saves its state), so it ends interrupted and resumable;
- the cluster's control plane (the GCS) dies: every Ray call blocks (Tune's loop with it),
  and Ray ends the driver process after 60 s with one C++ log line, leaving the MLflow runs
  RUNNING. A thread of the watch probes the GCS port instead of asking Ray; when it has not
  answered for a third of `grace_s`, the driver abandons the Tuner: it commits what Tune last
  saved, closes the runs as interrupted and exits (Tune could not save again without the GCS).
`grace_s` is VQSTUDY_CLUSTER_GRACE_S, default 60 s for nodes (long enough for a replacement
to join) and a third of it, 20 s, for the GCS (it must beat Ray's own 60 s).
"""
from __future__ import annotations

import os
import threading
import time

from .connection import unanswered
from .preflight import has_room

GRACE_S = 60.0
EVERY_S = 5.0


class ClusterWatch:
    def __init__(self, cpu: float, gpu: float, gcs_address: str | None = None, grace_s: float | None = None):
        self.need = {"CPU": cpu, "GPU": gpu}
        self.gcs = gcs_address
        self.grace_s = grace_s if grace_s is not None else float(os.environ.get("VQSTUDY_CLUSTER_GRACE_S", GRACE_S))
        self.last = -float("inf")
        self.no_room_since: float | None = None
        self.closed = threading.Event()

    def _room(self) -> bool:
        import ray

        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
        except Exception:   # the control plane does not answer: no room either
            return False
        return any(has_room(n, self.need) for n in nodes)

    def check(self) -> str | None:
        """Tune's loop asks this each step: a reason to stop the study, or None (looks at
        most every few seconds)."""
        now = time.monotonic()
        if now - self.last < min(EVERY_S, self.grace_s / 6):
            return None
        self.last = now
        if self._room():
            self.no_room_since = None
            return None
        self.no_room_since = self.no_room_since if self.no_room_since is not None else now
        if now - self.no_room_since >= self.grace_s:
            return f"no node of the Ray cluster could run a trial for {self.grace_s:.0f} s"
        return None

    def watch_gcs(self, on_lost) -> None:
        """Probe the GCS from a daemon thread (Tune's loop is blocked when it is gone); call
        `on_lost(reason)` once it has not answered for a third of the grace period."""
        if not self.gcs:
            return
        limit = self.grace_s / 3

        def loop():
            since = None
            while not self.closed.wait(min(EVERY_S, limit / 4)):
                if unanswered(self.gcs, timeout_s=1.0) is None:
                    since = None
                    continue
                since = since if since is not None else time.monotonic()
                if time.monotonic() - since >= limit and not self.closed.is_set():
                    on_lost(f"the Ray cluster's control plane (GCS at {self.gcs}) has not answered for {limit:.0f} s")
                    return

        threading.Thread(target=loop, name="vqstudy-gcs-watch", daemon=True).start()

    def close(self) -> None:
        """The study is over: the thread stops (the cluster may go away now)."""
        self.closed.set()
