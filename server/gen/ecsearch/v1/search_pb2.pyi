from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Retrieval(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_UNSPECIFIED: _ClassVar[Retrieval]
    RETRIEVAL_DENSE: _ClassVar[Retrieval]
    RETRIEVAL_LEXICAL: _ClassVar[Retrieval]
    RETRIEVAL_HYBRID: _ClassVar[Retrieval]

class Fusion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_UNSPECIFIED: _ClassVar[Fusion]
    FUSION_RRF: _ClassVar[Fusion]
    FUSION_WEIGHTED: _ClassVar[Fusion]
RETRIEVAL_UNSPECIFIED: Retrieval
RETRIEVAL_DENSE: Retrieval
RETRIEVAL_LEXICAL: Retrieval
RETRIEVAL_HYBRID: Retrieval
FUSION_UNSPECIFIED: Fusion
FUSION_RRF: Fusion
FUSION_WEIGHTED: Fusion

class SearchRequest(_message.Message):
    __slots__ = ("text", "image", "top_k", "filters", "nprobe", "page_size", "page_token", "retrieval", "hybrid")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    HYBRID_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    top_k: int
    filters: _containers.RepeatedCompositeFieldContainer[MetadataFilter]
    nprobe: int
    page_size: int
    page_token: str
    retrieval: Retrieval
    hybrid: HybridOptions
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Iterable[_Union[MetadataFilter, _Mapping]]] = ..., nprobe: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., retrieval: _Optional[_Union[Retrieval, str]] = ..., hybrid: _Optional[_Union[HybridOptions, _Mapping]] = ...) -> None: ...

class HybridOptions(_message.Message):
    __slots__ = ("fusion", "dense_weight", "lexical_weight", "rrf_k")
    FUSION_FIELD_NUMBER: _ClassVar[int]
    DENSE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RRF_K_FIELD_NUMBER: _ClassVar[int]
    fusion: Fusion
    dense_weight: float
    lexical_weight: float
    rrf_k: int
    def __init__(self, fusion: _Optional[_Union[Fusion, str]] = ..., dense_weight: _Optional[float] = ..., lexical_weight: _Optional[float] = ..., rrf_k: _Optional[int] = ...) -> None: ...

class MetadataFilter(_message.Message):
    __slots__ = ("field", "values")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    field: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, field: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "index_version", "timings", "encode_batch_size", "next_page_token", "dense_serving", "retrieval")
    HITS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DENSE_SERVING_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    index_version: str
    timings: StageTimings
    encode_batch_size: int
    next_page_token: str
    dense_serving: DenseServing
    retrieval: Retrieval
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., encode_batch_size: _Optional[int] = ..., next_page_token: _Optional[str] = ..., dense_serving: _Optional[_Union[DenseServing, _Mapping]] = ..., retrieval: _Optional[_Union[Retrieval, str]] = ...) -> None: ...

class DenseServing(_message.Message):
    __slots__ = ("nprobe", "exact", "widened")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    WIDENED_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    exact: bool
    widened: bool
    def __init__(self, nprobe: _Optional[int] = ..., exact: _Optional[bool] = ..., widened: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("product_id", "score", "rank", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    score: float
    rank: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, product_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "encode_ms", "search_ms", "metadata_ms", "total_ms", "lexical_ms", "fusion_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_MS_FIELD_NUMBER: _ClassVar[int]
    FUSION_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    encode_ms: float
    search_ms: float
    metadata_ms: float
    total_ms: float
    lexical_ms: float
    fusion_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., metadata_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., lexical_ms: _Optional[float] = ..., fusion_ms: _Optional[float] = ...) -> None: ...

class GetProductsRequest(_message.Message):
    __slots__ = ("product_ids",)
    PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    product_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, product_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetProductsResponse(_message.Message):
    __slots__ = ("products", "missing_product_ids", "index_version")
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    products: _containers.RepeatedCompositeFieldContainer[Product]
    missing_product_ids: _containers.RepeatedScalarFieldContainer[str]
    index_version: str
    def __init__(self, products: _Optional[_Iterable[_Union[Product, _Mapping]]] = ..., missing_product_ids: _Optional[_Iterable[str]] = ..., index_version: _Optional[str] = ...) -> None: ...

class Product(_message.Message):
    __slots__ = ("product_id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, product_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
