from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "start_layer", "end_layer", "batch_size", "max_length", "pad_lengths", "open_timeout_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PAD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    OPEN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_layer: int
    end_layer: int
    batch_size: int
    max_length: int
    pad_lengths: _containers.RepeatedScalarFieldContainer[int]
    open_timeout_s: float
    def __init__(self, session_id: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., pad_lengths: _Optional[_Iterable[int]] = ..., open_timeout_s: _Optional[float] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("hidden", "start_position", "step_id")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    start_position: int
    step_id: int
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., start_position: _Optional[int] = ..., step_id: _Optional[int] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step", "session_id")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    session_id: str
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "max_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("hidden", "length", "step_id", "compute_ms", "peer_leaving")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    PEER_LEAVING_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    length: int
    step_id: int
    compute_ms: float
    peer_leaving: bool
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., length: _Optional[int] = ..., step_id: _Optional[int] = ..., compute_ms: _Optional[float] = ..., peer_leaving: _Optional[bool] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "result")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: StepResult
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("start_layer", "end_layer", "hidden", "pad_lengths")
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PAD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    start_layer: int
    end_layer: int
    hidden: Tensor
    pad_lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., pad_lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "compute_ms")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    compute_ms: float
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("peer_id", "model_name", "start_layer", "end_layer", "num_layers", "hidden_size", "dtype", "quantization", "version", "max_length", "free_cache_tokens", "open_sessions", "state", "throughput")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FREE_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    model_name: str
    start_layer: int
    end_layer: int
    num_layers: int
    hidden_size: int
    dtype: str
    quantization: str
    version: str
    max_length: int
    free_cache_tokens: int
    open_sessions: int
    state: str
    throughput: float
    def __init__(self, peer_id: _Optional[str] = ..., model_name: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., quantization: _Optional[str] = ..., version: _Optional[str] = ..., max_length: _Optional[int] = ..., free_cache_tokens: _Optional[int] = ..., open_sessions: _Optional[int] = ..., state: _Optional[str] = ..., throughput: _Optional[float] = ...) -> None: ...
