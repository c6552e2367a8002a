"""The driver's watch on its cluster while a study runs.

When the nodes that can run a trial die and none comes back (a lost worker pool, a dead
raylet), Ray Tune waits for resources forever, printing that it cannot detect them. The
watch looks every few seconds at Ray's node table; when no alive node has room for one
trial for `grace_s` (VQSTUDY_CLUSTER_GRACE_S, default 60 s: long enough for a replacement
node to join), it stops the study as Ctrl-C would, so it ends interrupted and resumable.
"""
from __future__ import annotations

import os
import time

GRACE_S = 60.0
EVERY_S = 5.0


class ClusterWatch:
    def __init__(self, cpu: float, gpu: float, grace_s: float | None = None):
        self.need = {"CPU": cpu, "GPU": gpu}
        self.grace_s = grace_s if grace_s is not None else float(os.environ.get("VQSTUDY_CLUSTER_GRACE_S", GRACE_S))
        self.last = -float("inf")
        self.lost_since: float | None = None

    def _room(self) -> bool:
        import ray

        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
        except Exception:   # the cluster's control plane does not answer: no room either
            return False
        return any(all(n["Resources"].get(k, 0) >= v for k, v in self.need.items() if v) for n in nodes)

    def check(self) -> str | None:
        """A reason to stop the study, or None (looks at most every EVERY_S seconds)."""
        now = time.monotonic()
        if now - self.last < min(EVERY_S, self.grace_s / 3):
            return None
        self.last = now
        if self._room():
            self.lost_since = None
            return None
        self.lost_since = self.lost_since if self.lost_since is not None else now
        if now - self.lost_since >= self.grace_s:
            return f"no node of the Ray cluster could run a trial for {self.grace_s:.0f} s"
        return None
