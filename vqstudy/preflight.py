"""Preflight: before any trial starts, show that the cluster can run the study.

- a trial fits on a node: some alive node has `resources.cpu` CPUs and `resources.gpu` GPUs;
- every node that can run a trial writes to the study's storage, and the driver sees what it
  wrote (a zero-CPU Ray task pinned to each node): a node whose "storage" is its own disk is
  caught here, not at its first checkpoint;
- the tracking store answers the driver (the only process that writes to it).

Each failure is one `ConfigError` line naming the node and what it cannot reach, within
about `TIMEOUT_S` seconds: exit code 2, before any compute is spent.
"""
from __future__ import annotations

import math
import os
import uuid
from urllib.parse import urlsplit

from .errors import ConfigError
from .storage import Storage, clean_probes, probe, probe_seen
from .study import Study

TIMEOUT_S = 30


def check_local_gpus(study: Study) -> None:
    """A study run on this machine (no cluster) that asks for GPUs: the machine has them.
    Said before Ray starts, in one line (a trial would otherwise wait for a GPU forever)."""
    gpu = study.resources.gpu
    if gpu == 0:
        return
    from .devices import describe_gpus, local_gpus

    if local_gpus() < math.ceil(gpu):
        raise ConfigError(f"{study.source}: resources.gpu: {gpu:g} asked per trial but this machine has {describe_gpus()}")


def check_gpus_asked(study: Study, address: str | None) -> None:
    """What a dry run refuses of a run: GPUs this machine, or the cluster once joined, does not
    have. Only a study that asks for GPUs imports torch or joins a cluster here."""
    if study.resources.gpu == 0:
        return
    if address or os.environ.get("RAY_ADDRESS"):
        from .connection import connect

        connect(address)
        trial_nodes(study)
    else:
        check_local_gpus(study)


def has_room(node: dict, need: dict[str, float]) -> bool:
    """A node of Ray's node table has the CPUs and GPUs of one trial (`need`)."""
    return all(node["Resources"].get(k, 0) >= v for k, v in need.items() if v)


def trial_nodes(study: Study) -> list[dict]:
    """The alive nodes one trial fits on; ConfigError when none does."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    need = {"CPU": study.resources.cpu, "GPU": study.resources.gpu}
    fits = [n for n in nodes if has_room(n, need)]
    if not fits:
        for kind, v in need.items():
            largest = max((n["Resources"].get(kind, 0) for n in nodes), default=0)
            if v > largest:
                raise ConfigError(f"{study.source}: resources.{kind.lower()}: {v:g} asked but the largest node of "
                                  f"the Ray cluster has {largest:g} {kind}s")
        raise ConfigError(f"{study.source}: resources: no node of the Ray cluster has {need['CPU']:g} CPUs and "
                          f"{need['GPU']:g} GPUs at once")
    return fits


def _name(node: dict) -> str:
    return f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def check_storage(storage: Storage, nodes: list[dict]) -> None:
    """Each node writes a probe file into the storage; the driver must see every one."""
    import ray
    from ray.exceptions import RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(storage, f"{n['NodeID'][:12]}-{uuid.uuid4().hex[:8]}"): n for n in nodes}
    _, late = ray.wait(list(refs), num_returns=len(refs), timeout=TIMEOUT_S)
    try:
        if late:
            raise ConfigError(f"preflight: {_name(refs[late[0]])} did not answer within {TIMEOUT_S} s")
        for ref, node in refs.items():
            try:
                target = ray.get(ref)
            except RayError as e:
                cause = getattr(e, "cause", None) or e
                raise ConfigError(f"preflight: {_name(node)} cannot write to the storage {storage.describe()}: "
                                  f"{str(cause).strip().splitlines()[0]}") from None
            if not probe_seen(storage, target):
                raise ConfigError(f"preflight: {_name(node)} does not see the storage the driver sees "
                                  f"({storage.describe()}): its disk is its own; give --storage URI (e.g. "
                                  f"s3://bucket/prefix) that every node reaches")
    finally:
        clean_probes(storage)


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def trial_bytes(cfg) -> tuple[int, int]:
    """(a floor of one trial's memory in bytes, the vectors in its largest batch). Counted:
    the codebook and the encoder/decoder weights with their gradients and Adam's two moments
    (4 copies), the distances between a batch's vectors and the codes (one search block, or,
    for a quantizer with a softmax over every code, 3 x N x K for what backprop keeps; an
    evaluation batch keeps none), and the full-resolution
    activations of a training batch, forward and backward. Only a floor; what it catches is a
    K, a width or a batch no machine holds (K = 2**40, a width of a million)."""
    from .quantizers._common import SEARCH_BLOCK_ELEMENTS
    from .registry import DATASETS, QUANTIZERS

    m, k, d = cfg.model, cfg.quantizer.codebook_size, cfg.model.latent_dim
    image = DATASETS.entry(cfg.data.name).modality == "image"
    kernel, positions = (9, cfg.data.image_size ** 2) if image else (1, 1)
    tokens = max(1, cfg.data.image_size // 2 ** m.downsample) ** 2 if image else 1
    n = cfg.train.batch_size * tokens
    weights = k * d + kernel * ((m.encoder_depth + 1) * m.encoder_width ** 2 + (m.decoder_depth + 1) * m.decoder_width ** 2)
    if QUANTIZERS.entry(cfg.quantizer.name).dense_over_k:
        distances = max(3 * n, cfg.train.eval_batch_size * tokens) * k   # evaluation keeps no gradients
    else:
        distances = min(n * k, SEARCH_BLOCK_ELEMENTS)                      # the search works block by block
    activations = 4 * cfg.train.batch_size * positions * max(m.encoder_width, m.decoder_width)
    return 4 * (4 * weights + distances + activations), n


def check_memory(study: Study, nodes: list[dict]) -> None:
    """Refuse a CPU trial whose memory floor is beyond the largest node's memory (Ray's
    count). GPU trials are not checked: Ray's node table holds no GPU memory."""
    memory = max(n["Resources"].get("memory", 0) for n in nodes)
    if not memory or study.resources.gpu > 0:
        return
    for cfg in study.trial_configs():
        need, n = trial_bytes(cfg)
        if need > memory:
            m = cfg.model
            raise ConfigError(f"{study.source}: one trial needs at least {need / 2**30:,.1f} GiB (quantizer.codebook_size "
                              f"{cfg.quantizer.codebook_size:,} x model.latent_dim {m.latent_dim}, model widths "
                              f"{m.encoder_width:,}/{m.decoder_width:,}, batches of {n:,} vectors); the largest node "
                              f"has {memory / 2**30:,.1f} GiB")


def check_data_roots(study: Study) -> None:
    """On one machine, every data.root a trial will read exists (the trials would otherwise
    fail inside Ray, three times each). A relative root is the driver's working directory's
    (as trainable.py resolves it). Not on a cluster: there the data lives on the nodes."""
    from pathlib import Path

    from .registry import DATASETS

    seen = set()
    for cfg in study.trial_configs():
        data = cfg.data
        if (data.name, data.root) in seen or not DATASETS.entry(data.name).reads_root or data.download:
            continue
        seen.add((data.name, data.root))
        if not Path(data.root).expanduser().is_dir():
            raise ConfigError(f"{study.source}: data.root: no folder {data.root!r} for data.name {data.name} "
                              f"(give the folder holding it{'' if data.name == 'imagefolder' else ', or set data.download: true'})")


def check_tracking_uri(uri: str) -> str:
    """A tracking URI as it may be recorded: a scheme MLflow serves, and no password in it
    (vqstudy.json is an ordinary file; a server reads MLFLOW_TRACKING_USERNAME/PASSWORD, a
    database PGPASSWORD or ~/.pgpass, from the environment)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"--tracking-uri: {uri.split('@')[-1]!r} is not an MLflow tracking URI "
                          f"(schemes: {', '.join(TRACKING_SCHEMES)})")
    if parts.password:
        raise ConfigError(f"--tracking-uri: {uri.split('@')[-1]!r} carries a password; give it in the environment "
                          f"instead (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for a server, "
                          f"PGPASSWORD for PostgreSQL)")
    return uri


def check_tracking(uri: str) -> None:
    """A tracking server must answer the driver before trials start (SQLite files need no check).
    The URI itself was checked before anything was written (`check_tracking_uri`)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError as e:
        hint = " (MLflow 3.17 refuses hosts it does not allow: start it with --allowed-hosts)" if e.code == 403 else ""
        raise ConfigError(f"--tracking-uri: {uri} answered HTTP {e.code}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"--tracking-uri: cannot reach {uri}: {reason}") from None
