"""Server reflection that keeps the protos' comments.

grpcio-reflection serializes descriptors with ``CopyToProto``, which drops
source info, so ``grpcurl describe`` would show no documentation. This pool
wrapper answers with the FileDescriptorProtos of the checked-in descriptor set
(``make proto`` writes it with ``--include_source_info``) and falls back to the
pool for everything else (health, reflection, well-known types).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool


class _DocumentedFile:
    """A FileDescriptor look-alike whose CopyToProto keeps comments."""

    def __init__(
        self, descriptor: Any, documented: dict[str, descriptor_pb2.FileDescriptorProto]
    ) -> None:
        self._descriptor = descriptor
        self._documented = documented

    @property
    def name(self) -> str:
        return str(self._descriptor.name)

    @property
    def dependencies(self) -> list[_DocumentedFile]:
        return [_DocumentedFile(d, self._documented) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        documented = self._documented.get(self.name)
        if documented is not None:
            proto.CopyFrom(documented)
        else:
            self._descriptor.CopyToProto(proto)


class DocumentedPool:
    """Delegates to a DescriptorPool; file lookups come back with their comments."""

    def __init__(
        self,
        pool: descriptor_pool.DescriptorPool,
        documented: dict[str, descriptor_pb2.FileDescriptorProto],
    ) -> None:
        self._pool = pool
        self._documented = documented

    def FindFileByName(self, name: str) -> _DocumentedFile:
        return _DocumentedFile(self._pool.FindFileByName(name), self._documented)

    def FindFileContainingSymbol(self, symbol: str) -> _DocumentedFile:
        return _DocumentedFile(self._pool.FindFileContainingSymbol(symbol), self._documented)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def documented_pool() -> DocumentedPool:
    """The default pool (where the generated modules registered tether.v1), with comments."""
    import tether.v1
    from tether.v1 import cluster_service_pb2, task_service_pb2  # noqa: F401 - register them

    data = (Path(tether.v1.__file__).parent / "descriptor_set.binpb").read_bytes()
    documented = {
        f.name: f
        for f in descriptor_pb2.FileDescriptorSet.FromString(data).file
        if f.name.startswith("tether/")
    }
    return DocumentedPool(descriptor_pool.Default(), documented)
