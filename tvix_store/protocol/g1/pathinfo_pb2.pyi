from . import castore_pb2 as _castore_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PathInfo(_message.Message):
    __slots__ = ("node", "references", "narinfo")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    NARINFO_FIELD_NUMBER: _ClassVar[int]
    node: Node
    references: _containers.RepeatedScalarFieldContainer[bytes]
    narinfo: NARInfo
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., references: _Optional[_Iterable[bytes]] = ..., narinfo: _Optional[_Union[NARInfo, _Mapping]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("directory", "file", "symlink")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    SYMLINK_FIELD_NUMBER: _ClassVar[int]
    directory: _castore_pb2.DirectoryNode
    file: _castore_pb2.FileNode
    symlink: _castore_pb2.SymlinkNode
    def __init__(self, directory: _Optional[_Union[_castore_pb2.DirectoryNode, _Mapping]] = ..., file: _Optional[_Union[_castore_pb2.FileNode, _Mapping]] = ..., symlink: _Optional[_Union[_castore_pb2.SymlinkNode, _Mapping]] = ...) -> None: ...

class NARInfo(_message.Message):
    __slots__ = ("nar_size", "nar_sha256", "signatures", "reference_names")
    class Signature(_message.Message):
        __slots__ = ("name", "data")
        NAME_FIELD_NUMBER: _ClassVar[int]
        DATA_FIELD_NUMBER: _ClassVar[int]
        name: str
        data: bytes
        def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
    NAR_SIZE_FIELD_NUMBER: _ClassVar[int]
    NAR_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_NAMES_FIELD_NUMBER: _ClassVar[int]
    nar_size: int
    nar_sha256: bytes
    signatures: _containers.RepeatedCompositeFieldContainer[NARInfo.Signature]
    reference_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, nar_size: _Optional[int] = ..., nar_sha256: _Optional[bytes] = ..., signatures: _Optional[_Iterable[_Union[NARInfo.Signature, _Mapping]]] = ..., reference_names: _Optional[_Iterable[str]] = ...) -> None: ...
