"""Where Ray keeps a study's experiment state and checkpoints.

By default the study folder (`DIR/ray`): enough on one machine, or on a cluster whose
nodes share the driver's disk. On a cluster whose nodes have their own disks, `--storage
URI` names any filesystem pyarrow opens from a URI -- `s3://bucket/prefix` (with
`?endpoint_override=host:port&scheme=http` for MinIO and other S3-compatible stores),
`gs://bucket/prefix`, `hdfs://host/path` -- which every node then reads and writes.
Credentials come from the environment of each node (AWS_ACCESS_KEY_ID, ...), never from the
URI: a URI with a user or password is refused, so none is written into the study folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError


@dataclass(frozen=True)
class Storage:
    """An experiment's location: a filesystem URI or local folder, and the experiment's
    folder name inside it."""
    root: str              # a local path or a pyarrow filesystem URI (query included)
    name: str              # the experiment's folder inside root

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def location(self):
        """(pyarrow filesystem, path of the storage root on it): what Tune's RunConfig takes."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem(), self.root.removeprefix("file://").rstrip("/")
        try:
            fs, path = pafs.FileSystem.from_uri(self.root)
        except Exception as e:   # pyarrow raises ArrowInvalid, OSError, ValueError depending on the scheme
            raise ConfigError(f"--storage: cannot open {self.root!r}: {str(e).splitlines()[0]}") from None
        return fs, path.rstrip("/")

    def filesystem(self):
        """(pyarrow filesystem, path of the experiment folder on it)."""
        fs, root = self.location()
        return fs, f"{root}/{self.name}"

    def describe(self) -> str:
        return self.root if self.is_local else f"{self.root.split('?')[0]}/{self.name}"


def check_uri(uri: str) -> str:
    """A --storage value as it may be recorded: no credentials in it."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        raise ConfigError(f"--storage: {uri.split('@')[-1]!r} carries credentials; give them to every node "
                          f"in the environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead")
    return uri


def exists(storage: Storage) -> bool:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem()
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(storage: Storage, relative: str) -> str:
    fs, path = storage.filesystem()
    with fs.open_input_stream(f"{path}/{relative}") as f:
        return f.read().decode("utf-8", errors="replace")


def list_names(storage: Storage, pattern_prefix: str) -> list[str]:
    """Names of the files directly in the experiment folder that start with `pattern_prefix`."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem()
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.base_name.startswith(pattern_prefix))


def clear(storage: Storage) -> None:
    """Delete the experiment folder (a study that committed nothing starts again in it)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem()
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def prune_checkpoints(storage: Storage) -> int:
    """Delete every trial's checkpoints but its newest; returns how many went.

    Tune keeps all of them while a study runs (`num_to_keep=None`): with a limit, it deletes
    a trial's previous checkpoint just before it saves the experiment state naming the new
    one, and a driver killed in between leaves a state that names a checkpoint that is gone.
    Once the Tuner has returned, its final state names each trial's newest, so the older
    ones can go."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem()
    pruned = 0
    for trial in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if trial.type != pafs.FileType.Directory or not trial.base_name.startswith("trial_"):
            continue
        found = fs.get_file_info(pafs.FileSelector(trial.path))
        checkpoints = sorted(i.path for i in found if i.base_name.startswith("checkpoint_"))
        for old in checkpoints[:-1]:
            fs.delete_dir(old)
            pruned += 1
    return pruned


PROBE_DIR = ".vqstudy-preflight"


def probe(storage: Storage, token: str) -> str:
    """Write a small file under the storage root, from wherever this runs (a Ray task pinned
    to a node, in preflight); returns its path for the driver to look for."""
    fs, path = storage.location()
    probe_dir = f"{path}/{PROBE_DIR}"
    fs.create_dir(probe_dir, recursive=True)
    target = f"{probe_dir}/{token}"
    with fs.open_output_stream(target) as f:
        f.write(token.encode())
    return target


def probe_seen(storage: Storage, target: str) -> bool:
    """The driver sees the file a node wrote: they share this storage."""
    import pyarrow.fs as pafs

    fs, _ = storage.filesystem()
    return fs.get_file_info(target).type == pafs.FileType.File


def clean_probes(storage: Storage) -> None:
    """Remove the probe files (and a local storage folder that only held them)."""
    fs, path = storage.location()
    try:
        fs.delete_dir(f"{path}/{PROBE_DIR}")
        if storage.is_local:
            Path(path).rmdir()   # only if empty: the preflight of a study that never started leaves nothing
    except OSError:
        pass
