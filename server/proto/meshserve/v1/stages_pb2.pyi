from meshserve.server.proto.meshserve.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillMessage(_message.Message):
    __slots__ = ("request", "release")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    request: PrefillRequest
    release: Release
    def __init__(self, request: _Optional[_Union[PrefillRequest, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "kv_shards")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    KV_SHARDS_FIELD_NUMBER: _ClassVar[int]
    request: _inference_pb2.GenerateRequest
    kv_shards: int
    def __init__(self, request: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ..., kv_shards: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("first", "handoff")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    first: _inference_pb2.GenerateResponse
    handoff: Handoff
    def __init__(self, first: _Optional[_Union[_inference_pb2.GenerateResponse, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ...) -> None: ...

class Handoff(_message.Message):
    __slots__ = ("transfer_address", "transfer_id", "piece_shape", "dtype", "num_pieces", "prompt_token_ids", "output_token_ids", "sampling", "seed", "num_cached_tokens", "queue_s", "time_to_first_token_s", "cache_salt")
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_PIECES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    transfer_address: str
    transfer_id: int
    piece_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    num_pieces: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParams
    seed: int
    num_cached_tokens: int
    queue_s: float
    time_to_first_token_s: float
    cache_salt: str
    def __init__(self, transfer_address: _Optional[str] = ..., transfer_id: _Optional[int] = ..., piece_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., num_pieces: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "handoff")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handoff: Handoff
    def __init__(self, request_id: _Optional[str] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("landed", "response")
    LANDED_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    landed: Landed
    response: _inference_pb2.GenerateResponse
    def __init__(self, landed: _Optional[_Union[Landed, _Mapping]] = ..., response: _Optional[_Union[_inference_pb2.GenerateResponse, _Mapping]] = ...) -> None: ...

class Landed(_message.Message):
    __slots__ = ("transfer_s", "bytes")
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    transfer_s: float
    bytes: int
    def __init__(self, transfer_s: _Optional[float] = ..., bytes: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("role", "layout", "num_devices", "kv_shards", "transfer_address", "stats")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_DEVICES_FIELD_NUMBER: _ClassVar[int]
    KV_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    role: str
    layout: str
    num_devices: int
    kv_shards: int
    transfer_address: str
    stats: _inference_pb2.StageStats
    def __init__(self, role: _Optional[str] = ..., layout: _Optional[str] = ..., num_devices: _Optional[int] = ..., kv_shards: _Optional[int] = ..., transfer_address: _Optional[str] = ..., stats: _Optional[_Union[_inference_pb2.StageStats, _Mapping]] = ...) -> None: ...
