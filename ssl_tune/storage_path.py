"""Where a search keeps Ray Tune's state and its trials' checkpoints (`storage_path`): a directory on this
machine (shared by every node on a cluster) or an object-store URI (s3://, gs://, ...), which Ray's storage
reads and writes through pyarrow's file systems. Every check of which one a path is lives here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def is_uri(text: str) -> bool:
    """Whether `text` names a location by scheme (s3://bucket/runs, sqlite:///mlflow.db) rather than a local path."""
    return "://" in text


@dataclass(frozen=True)
class StoragePath:
    """A storage path: an absolute local directory, or a URI without a trailing slash. Build it with `of`."""

    text: str

    @classmethod
    def of(cls, path: str | Path | StoragePath) -> StoragePath:
        """A local path made absolute (Ray's workers change directory), or a URI as given."""
        if isinstance(path, StoragePath):
            return path
        text = str(path)
        return cls(text.rstrip("/")) if is_uri(text) else cls(str(Path(text).resolve()))

    @property
    def scheme(self) -> str:
        """The object store's scheme (s3, gs, ...), or "" for a local directory."""
        return self.text.partition("://")[0] if self.in_object_store else ""

    @property
    def in_object_store(self) -> bool:
        return is_uri(self.text)

    @property
    def local(self) -> Path | None:
        """The directory on this machine; None in an object store."""
        return None if self.in_object_store else Path(self.text)

    @property
    def name(self) -> str:
        return self.text.rpartition("/")[2]

    @property
    def parent(self) -> StoragePath:
        return StoragePath(self.text.rpartition("/")[0])

    def __truediv__(self, name: str) -> StoragePath:
        return StoragePath(f"{self.text}/{name}")

    def __str__(self) -> str:
        return self.text

    def with_scheme(self, path: str) -> str:
        """Ray names a checkpoint in an object store by its path inside the bucket: give it back this storage's
        scheme, so that it is a URI another process can open. A URI, an absolute path (a local staging copy of
        Ray Train's) or a path under local storage is returned as it is."""
        if not self.in_object_store or is_uri(path) or path.startswith("/"):
            return path
        return f"{self.scheme}://{path}"
