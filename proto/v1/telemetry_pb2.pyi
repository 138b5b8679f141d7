from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReduceOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCE_UNSPECIFIED: _ClassVar[ReduceOp]
    REDUCE_SUM: _ClassVar[ReduceOp]
    REDUCE_MEAN: _ClassVar[ReduceOp]
    REDUCE_MAX: _ClassVar[ReduceOp]
    REDUCE_MIN: _ClassVar[ReduceOp]
    REDUCE_MEAN_NONZERO: _ClassVar[ReduceOp]
REDUCE_UNSPECIFIED: ReduceOp
REDUCE_SUM: ReduceOp
REDUCE_MEAN: ReduceOp
REDUCE_MAX: ReduceOp
REDUCE_MIN: ReduceOp
REDUCE_MEAN_NONZERO: ReduceOp

class ClientFrame(_message.Message):
    __slots__ = ("hello", "schema", "chunk", "end_of_step", "clip_ack", "dropped", "goodbye", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_OF_STEP_FIELD_NUMBER: _ClassVar[int]
    CLIP_ACK_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    schema: Schema
    chunk: StepChunk
    end_of_step: EndOfStep
    clip_ack: ClipAck
    dropped: StepsDropped
    goodbye: Goodbye
    batch: FrameBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., schema: _Optional[_Union[Schema, _Mapping]] = ..., chunk: _Optional[_Union[StepChunk, _Mapping]] = ..., end_of_step: _Optional[_Union[EndOfStep, _Mapping]] = ..., clip_ack: _Optional[_Union[ClipAck, _Mapping]] = ..., dropped: _Optional[_Union[StepsDropped, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., batch: _Optional[_Union[FrameBatch, _Mapping]] = ...) -> None: ...

class FrameBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ClientFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[ClientFrame, _Mapping]]] = ...) -> None: ...

class FrameHeader(_message.Message):
    __slots__ = ("run", "rank", "step", "seq")
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    run: str
    rank: int
    step: int
    seq: int
    def __init__(self, run: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("header", "world_size", "config_json", "protocol_version", "client_version", "session", "multiplexed", "collectors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MULTIPLEXED_FIELD_NUMBER: _ClassVar[int]
    COLLECTORS_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    world_size: int
    config_json: str
    protocol_version: int
    client_version: str
    session: str
    multiplexed: bool
    collectors: int
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., world_size: _Optional[int] = ..., config_json: _Optional[str] = ..., protocol_version: _Optional[int] = ..., client_version: _Optional[str] = ..., session: _Optional[str] = ..., multiplexed: _Optional[bool] = ..., collectors: _Optional[int] = ...) -> None: ...

class MetricDef(_message.Message):
    __slots__ = ("name", "layer", "expert", "head", "stat", "unit", "reduce")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: int
    expert: int
    head: int
    stat: str
    unit: str
    reduce: ReduceOp
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ..., head: _Optional[int] = ..., stat: _Optional[str] = ..., unit: _Optional[str] = ..., reduce: _Optional[_Union[ReduceOp, str]] = ...) -> None: ...

class Schema(_message.Message):
    __slots__ = ("header", "schema_id", "metrics", "packed")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    schema_id: int
    metrics: _containers.RepeatedCompositeFieldContainer[MetricDef]
    packed: PackedMetrics
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., schema_id: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[MetricDef, _Mapping]]] = ..., packed: _Optional[_Union[PackedMetrics, _Mapping]] = ...) -> None: ...

class PackedMetrics(_message.Message):
    __slots__ = ("count", "names", "name_ends", "layer", "expert", "head", "stats", "stat_index", "units", "unit_index", "reduce")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    NAME_ENDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STAT_INDEX_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    UNIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    count: int
    names: bytes
    name_ends: bytes
    layer: bytes
    expert: bytes
    head: bytes
    stats: _containers.RepeatedScalarFieldContainer[str]
    stat_index: bytes
    units: _containers.RepeatedScalarFieldContainer[str]
    unit_index: bytes
    reduce: bytes
    def __init__(self, count: _Optional[int] = ..., names: _Optional[bytes] = ..., name_ends: _Optional[bytes] = ..., layer: _Optional[bytes] = ..., expert: _Optional[bytes] = ..., head: _Optional[bytes] = ..., stats: _Optional[_Iterable[str]] = ..., stat_index: _Optional[bytes] = ..., units: _Optional[_Iterable[str]] = ..., unit_index: _Optional[bytes] = ..., reduce: _Optional[bytes] = ...) -> None: ...

class StepChunk(_message.Message):
    __slots__ = ("header", "schema_id", "offset", "total", "values", "ends_step", "step_values", "wall_time")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ENDS_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_VALUES_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    schema_id: int
    offset: int
    total: int
    values: bytes
    ends_step: bool
    step_values: int
    wall_time: float
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., schema_id: _Optional[int] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., values: _Optional[bytes] = ..., ends_step: _Optional[bool] = ..., step_values: _Optional[int] = ..., wall_time: _Optional[float] = ...) -> None: ...

class EndOfStep(_message.Message):
    __slots__ = ("header", "n_values", "wall_time")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    N_VALUES_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    n_values: int
    wall_time: float
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., n_values: _Optional[int] = ..., wall_time: _Optional[float] = ...) -> None: ...

class StepsDropped(_message.Message):
    __slots__ = ("header", "ranges", "total", "reason")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    ranges: _containers.RepeatedCompositeFieldContainer[StepRange]
    total: int
    reason: str
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., ranges: _Optional[_Iterable[_Union[StepRange, _Mapping]]] = ..., total: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StepRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("header", "half_closed")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    HALF_CLOSED_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    half_closed: bool
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., half_closed: _Optional[bool] = ...) -> None: ...

class ClipAck(_message.Message):
    __slots__ = ("header", "version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    version: int
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("welcome", "ack", "clip", "error", "goodbye", "to")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    clip: ClipUpdate
    error: Error
    goodbye: Goodbye
    to: FrameHeader
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., clip: _Optional[_Union[ClipUpdate, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., to: _Optional[_Union[FrameHeader, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("acked_seq", "protocol_version", "chunk_ends_step", "takes_dropped", "multiplexed", "takes_batches", "takes_packed_schema", "flushes_at_goodbye", "send_interval_ms", "takes_mean_nonzero")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ENDS_STEP_FIELD_NUMBER: _ClassVar[int]
    TAKES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MULTIPLEXED_FIELD_NUMBER: _ClassVar[int]
    TAKES_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TAKES_PACKED_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    FLUSHES_AT_GOODBYE_FIELD_NUMBER: _ClassVar[int]
    SEND_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TAKES_MEAN_NONZERO_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    protocol_version: int
    chunk_ends_step: bool
    takes_dropped: bool
    multiplexed: bool
    takes_batches: bool
    takes_packed_schema: bool
    flushes_at_goodbye: bool
    send_interval_ms: int
    takes_mean_nonzero: bool
    def __init__(self, acked_seq: _Optional[int] = ..., protocol_version: _Optional[int] = ..., chunk_ends_step: _Optional[bool] = ..., takes_dropped: _Optional[bool] = ..., multiplexed: _Optional[bool] = ..., takes_batches: _Optional[bool] = ..., takes_packed_schema: _Optional[bool] = ..., flushes_at_goodbye: _Optional[bool] = ..., send_interval_ms: _Optional[int] = ..., takes_mean_nonzero: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "step")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    seq: int
    step: int
    def __init__(self, seq: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class ClipSetting(_message.Message):
    __slots__ = ("layer", "site", "limit")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    site: str
    limit: float
    def __init__(self, layer: _Optional[int] = ..., site: _Optional[str] = ..., limit: _Optional[float] = ...) -> None: ...

class ClipUpdate(_message.Message):
    __slots__ = ("version", "settings", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    settings: _containers.RepeatedCompositeFieldContainer[ClipSetting]
    reason: str
    def __init__(self, version: _Optional[int] = ..., settings: _Optional[_Iterable[_Union[ClipSetting, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "permanent")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PERMANENT_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    permanent: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., permanent: _Optional[bool] = ...) -> None: ...
