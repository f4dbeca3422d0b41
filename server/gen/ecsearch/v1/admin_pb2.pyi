from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DeleteProductsRequest(_message.Message):
    __slots__ = ("product_ids",)
    PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    product_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, product_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteProductsResponse(_message.Message):
    __slots__ = ("index_version", "deleted_product_ids", "unknown_product_ids", "deleted_count")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELETED_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    deleted_product_ids: _containers.RepeatedScalarFieldContainer[str]
    unknown_product_ids: _containers.RepeatedScalarFieldContainer[str]
    deleted_count: int
    def __init__(self, index_version: _Optional[str] = ..., deleted_product_ids: _Optional[_Iterable[str]] = ..., unknown_product_ids: _Optional[_Iterable[str]] = ..., deleted_count: _Optional[int] = ...) -> None: ...

class RestoreProductsRequest(_message.Message):
    __slots__ = ("product_ids",)
    PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    product_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, product_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RestoreProductsResponse(_message.Message):
    __slots__ = ("index_version", "restored_product_ids", "deleted_count")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESTORED_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    restored_product_ids: _containers.RepeatedScalarFieldContainer[str]
    deleted_count: int
    def __init__(self, index_version: _Optional[str] = ..., restored_product_ids: _Optional[_Iterable[str]] = ..., deleted_count: _Optional[int] = ...) -> None: ...

class ListDeletedProductsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeletedProductsResponse(_message.Message):
    __slots__ = ("index_version", "product_ids")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    product_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index_version: _Optional[str] = ..., product_ids: _Optional[_Iterable[str]] = ...) -> None: ...
