from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE: _ClassVar[Compression]
    FLOAT16: _ClassVar[Compression]
    BFLOAT16: _ClassVar[Compression]
    INT8_BLOCKWISE: _ClassVar[Compression]
NONE: Compression
FLOAT16: Compression
BFLOAT16: Compression
INT8_BLOCKWISE: Compression

class Tensor(_message.Message):
    __slots__ = ("buffer", "shape", "dtype", "compression", "scales", "block_size")
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    buffer: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    compression: Compression
    scales: bytes
    block_size: int
    def __init__(self, buffer: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., compression: _Optional[_Union[Compression, str]] = ..., scales: _Optional[bytes] = ..., block_size: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("protocol_version", "model", "start_block", "end_block", "dtype", "peer_id", "throughput", "cache_tokens_left", "active_sessions", "software_version", "steps_from_client", "steps_from_peers", "pushes_sent", "forward_passes", "batched_steps", "inline_steps", "quant", "uptime_seconds", "block_digests", "file_digests")
    class FileDigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_LEFT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FROM_CLIENT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FROM_PEERS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_SENT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    INLINE_STEPS_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    FILE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model: str
    start_block: int
    end_block: int
    dtype: str
    peer_id: str
    throughput: float
    cache_tokens_left: int
    active_sessions: int
    software_version: str
    steps_from_client: int
    steps_from_peers: int
    pushes_sent: int
    forward_passes: int
    batched_steps: int
    inline_steps: int
    quant: str
    uptime_seconds: float
    block_digests: _containers.RepeatedScalarFieldContainer[str]
    file_digests: _containers.ScalarMap[str, str]
    def __init__(self, protocol_version: _Optional[int] = ..., model: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., dtype: _Optional[str] = ..., peer_id: _Optional[str] = ..., throughput: _Optional[float] = ..., cache_tokens_left: _Optional[int] = ..., active_sessions: _Optional[int] = ..., software_version: _Optional[str] = ..., steps_from_client: _Optional[int] = ..., steps_from_peers: _Optional[int] = ..., pushes_sent: _Optional[int] = ..., forward_passes: _Optional[int] = ..., batched_steps: _Optional[int] = ..., inline_steps: _Optional[int] = ..., quant: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., block_digests: _Optional[_Iterable[str]] = ..., file_digests: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("protocol_version", "hidden", "start_block", "end_block", "response_compression", "prompts", "adapter", "lora")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    hidden: Tensor
    start_block: int
    end_block: int
    response_compression: Compression
    prompts: Tensor
    adapter: str
    lora: _containers.RepeatedCompositeFieldContainer[LoraMatrices]
    def __init__(self, protocol_version: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., response_compression: _Optional[_Union[Compression, str]] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ..., lora: _Optional[_Iterable[_Union[LoraMatrices, _Mapping]]] = ...) -> None: ...

class LoraMatrices(_message.Message):
    __slots__ = ("block", "module", "a", "b", "scale")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    block: int
    module: str
    a: Tensor
    b: Tensor
    scale: float
    def __init__(self, block: _Optional[int] = ..., module: _Optional[str] = ..., a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ..., scale: _Optional[float] = ...) -> None: ...

class LoraGradients(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: Tensor
    b: Tensor
    def __init__(self, a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("protocol_version", "hidden", "grad_output", "start_block", "end_block", "response_compression", "prompts", "adapter", "lora")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    hidden: Tensor
    grad_output: Tensor
    start_block: int
    end_block: int
    response_compression: Compression
    prompts: Tensor
    adapter: str
    lora: _containers.RepeatedCompositeFieldContainer[LoraMatrices]
    def __init__(self, protocol_version: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., response_compression: _Optional[_Union[Compression, str]] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ..., lora: _Optional[_Iterable[_Union[LoraMatrices, _Mapping]]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_hidden", "grad_prompts", "grad_lora")
    GRAD_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_LORA_FIELD_NUMBER: _ClassVar[int]
    grad_hidden: Tensor
    grad_prompts: Tensor
    grad_lora: _containers.RepeatedCompositeFieldContainer[LoraGradients]
    def __init__(self, grad_hidden: _Optional[_Union[Tensor, _Mapping]] = ..., grad_prompts: _Optional[_Union[Tensor, _Mapping]] = ..., grad_lora: _Optional[_Iterable[_Union[LoraGradients, _Mapping]]] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("protocol_version", "open", "step")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    open: OpenSession
    step: Step
    def __init__(self, protocol_version: _Optional[int] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model", "start_block", "end_block", "batch_size", "max_length", "response_compression", "mirror", "adapter", "lora")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    model: str
    start_block: int
    end_block: int
    batch_size: int
    max_length: int
    response_compression: Compression
    mirror: bool
    adapter: str
    lora: _containers.RepeatedCompositeFieldContainer[LoraMatrices]
    def __init__(self, model: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., response_compression: _Optional[_Union[Compression, str]] = ..., mirror: _Optional[bool] = ..., adapter: _Optional[str] = ..., lora: _Optional[_Iterable[_Union[LoraMatrices, _Mapping]]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step_id", "hidden", "next", "keep_length", "replay")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    KEEP_LENGTH_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    next: _containers.RepeatedCompositeFieldContainer[NextHop]
    keep_length: int
    replay: bool
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., next: _Optional[_Iterable[_Union[NextHop, _Mapping]]] = ..., keep_length: _Optional[int] = ..., replay: _Optional[bool] = ...) -> None: ...

class NextHop(_message.Message):
    __slots__ = ("address", "session_id", "peer_id", "relays")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RELAYS_FIELD_NUMBER: _ClassVar[int]
    address: str
    session_id: str
    peer_id: str
    relays: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, address: _Optional[str] = ..., session_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., relays: _Optional[_Iterable[str]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("protocol_version", "session_id", "step")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: str
    step: Step
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[str] = ..., step: _Optional[_Union[Step, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "result", "handoff_failed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FAILED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: StepResult
    handoff_failed: HandoffFailed
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., handoff_failed: _Optional[_Union[HandoffFailed, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "hidden", "cache_length", "compute_seconds")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    cache_length: int
    compute_seconds: float
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., cache_length: _Optional[int] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class HandoffFailed(_message.Message):
    __slots__ = ("step_id", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    error: str
    def __init__(self, step_id: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class WeightsRequest(_message.Message):
    __slots__ = ("protocol_version", "model", "block", "offset", "chunk_size", "file")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model: str
    block: int
    offset: int
    chunk_size: int
    file: str
    def __init__(self, protocol_version: _Optional[int] = ..., model: _Optional[str] = ..., block: _Optional[int] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ..., file: _Optional[str] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...
