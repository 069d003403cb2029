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

class Token(_message.Message):
    __slots__ = ("public_key", "audience", "issued_at", "nonce", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    audience: str
    issued_at: float
    nonce: bytes
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., audience: _Optional[str] = ..., issued_at: _Optional[float] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class NextHop(_message.Message):
    __slots__ = ("peer_id", "address", "session_id", "tls_cert", "relay_peer_id")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    RELAY_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    session_id: str
    tls_cert: str
    relay_peer_id: str
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., session_id: _Optional[str] = ..., tls_cert: _Optional[str] = ..., relay_peer_id: _Optional[str] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "start_layer", "end_layer", "batch_size", "max_length", "pad_lengths", "open_timeout_s", "token", "next", "upstream_peer_id", "keep_outputs", "push_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PAD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    OPEN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PUSH_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_layer: int
    end_layer: int
    batch_size: int
    max_length: int
    pad_lengths: _containers.RepeatedScalarFieldContainer[int]
    open_timeout_s: float
    token: Token
    next: NextHop
    upstream_peer_id: str
    keep_outputs: bool
    push_key: bytes
    def __init__(self, session_id: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., pad_lengths: _Optional[_Iterable[int]] = ..., open_timeout_s: _Optional[float] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., next: _Optional[_Union[NextHop, _Mapping]] = ..., upstream_peer_id: _Optional[str] = ..., keep_outputs: _Optional[bool] = ..., push_key: _Optional[bytes] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("hidden", "start_position", "step_id", "step_positions", "rope_lengths", "pushed_by", "tickets")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ROPE_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    PUSHED_BY_FIELD_NUMBER: _ClassVar[int]
    TICKETS_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    start_position: int
    step_id: int
    step_positions: int
    rope_lengths: _containers.RepeatedScalarFieldContainer[int]
    pushed_by: Attestation
    tickets: _containers.RepeatedCompositeFieldContainer[PushTicket]
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., start_position: _Optional[int] = ..., step_id: _Optional[int] = ..., step_positions: _Optional[int] = ..., rope_lengths: _Optional[_Iterable[int]] = ..., pushed_by: _Optional[_Union[Attestation, _Mapping]] = ..., tickets: _Optional[_Iterable[_Union[PushTicket, _Mapping]]] = ...) -> None: ...

class PushTicket(_message.Message):
    __slots__ = ("session_id", "step_start", "tag")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_START_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_start: int
    tag: bytes
    def __init__(self, session_id: _Optional[str] = ..., step_start: _Optional[int] = ..., tag: _Optional[bytes] = ...) -> None: ...

class Attach(_message.Message):
    __slots__ = ("session_id", "token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: Token
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[_Union[Token, _Mapping]] = ...) -> None: ...

class Relink(_message.Message):
    __slots__ = ("next", "upstream_peer_id")
    NEXT_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    next: NextHop
    upstream_peer_id: str
    def __init__(self, next: _Optional[_Union[NextHop, _Mapping]] = ..., upstream_peer_id: _Optional[str] = ...) -> None: ...

class Relinked(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step", "attach", "relink", "session_id")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    RELINK_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    attach: Attach
    relink: Relink
    session_id: str
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., attach: _Optional[_Union[Attach, _Mapping]] = ..., relink: _Optional[_Union[Relink, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "max_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...

class Attestation(_message.Message):
    __slots__ = ("peer_id", "session_id", "step_id", "start_position", "start_layer", "end_layer", "input_sha256", "output_sha256", "signature", "rope_sha256")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ROPE_SHA256_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session_id: str
    step_id: int
    start_position: int
    start_layer: int
    end_layer: int
    input_sha256: bytes
    output_sha256: bytes
    signature: bytes
    rope_sha256: bytes
    def __init__(self, peer_id: _Optional[str] = ..., session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., start_position: _Optional[int] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., input_sha256: _Optional[bytes] = ..., output_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., rope_sha256: _Optional[bytes] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("hidden", "length", "step_id", "compute_ms", "peer_leaving", "start_position", "positions", "forwarded", "forward_error", "attestation", "queue_ms", "upstream", "upstream_positions")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    PEER_LEAVING_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    length: int
    step_id: int
    compute_ms: float
    peer_leaving: bool
    start_position: int
    positions: int
    forwarded: bool
    forward_error: str
    attestation: Attestation
    queue_ms: float
    upstream: Attestation
    upstream_positions: int
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., length: _Optional[int] = ..., step_id: _Optional[int] = ..., compute_ms: _Optional[float] = ..., peer_leaving: _Optional[bool] = ..., start_position: _Optional[int] = ..., positions: _Optional[int] = ..., forwarded: _Optional[bool] = ..., forward_error: _Optional[str] = ..., attestation: _Optional[_Union[Attestation, _Mapping]] = ..., queue_ms: _Optional[float] = ..., upstream: _Optional[_Union[Attestation, _Mapping]] = ..., upstream_positions: _Optional[int] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "result", "relinked", "push_refused")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RELINKED_FIELD_NUMBER: _ClassVar[int]
    PUSH_REFUSED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: StepResult
    relinked: Relinked
    push_refused: PushRefused
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., relinked: _Optional[_Union[Relinked, _Mapping]] = ..., push_refused: _Optional[_Union[PushRefused, _Mapping]] = ...) -> None: ...

class PushRefused(_message.Message):
    __slots__ = ("step_id", "reason")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    reason: str
    def __init__(self, step_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("start_layer", "end_layer", "hidden", "pad_lengths", "token")
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PAD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    start_layer: int
    end_layer: int
    hidden: Tensor
    pad_lengths: _containers.RepeatedScalarFieldContainer[int]
    token: Token
    def __init__(self, start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., pad_lengths: _Optional[_Iterable[int]] = ..., token: _Optional[_Union[Token, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "compute_ms")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    compute_ms: float
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("session_id", "start", "end", "token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    end: int
    token: Token
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., token: _Optional[_Union[Token, _Mapping]] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("peer_id", "model_name", "start_layer", "end_layer", "num_layers", "hidden_size", "dtype", "quantization", "version", "max_length", "free_cache_tokens", "open_sessions", "state", "throughput", "software_version", "started_at", "cache_tokens", "compute_passes", "computed_steps", "compute_seconds", "asyncio_tasks")
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
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_PASSES_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASYNCIO_TASKS_FIELD_NUMBER: _ClassVar[int]
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
    software_version: str
    started_at: float
    cache_tokens: int
    compute_passes: int
    computed_steps: int
    compute_seconds: float
    asyncio_tasks: int
    def __init__(self, peer_id: _Optional[str] = ..., model_name: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., quantization: _Optional[str] = ..., version: _Optional[str] = ..., max_length: _Optional[int] = ..., free_cache_tokens: _Optional[int] = ..., open_sessions: _Optional[int] = ..., state: _Optional[str] = ..., throughput: _Optional[float] = ..., software_version: _Optional[str] = ..., started_at: _Optional[float] = ..., cache_tokens: _Optional[int] = ..., compute_passes: _Optional[int] = ..., computed_steps: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., asyncio_tasks: _Optional[int] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("address", "tls_cert", "token", "timeout_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    tls_cert: str
    token: Token
    timeout_s: float
    def __init__(self, address: _Optional[str] = ..., tls_cert: _Optional[str] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("reachable", "detail", "observed_host", "rtt_ms")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_HOST_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    detail: str
    observed_host: str
    rtt_ms: float
    def __init__(self, reachable: _Optional[bool] = ..., detail: _Optional[str] = ..., observed_host: _Optional[str] = ..., rtt_ms: _Optional[float] = ...) -> None: ...

class RelayRegister(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: Token
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ...) -> None: ...

class RelayControl(_message.Message):
    __slots__ = ("register",)
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    register: RelayRegister
    def __init__(self, register: _Optional[_Union[RelayRegister, _Mapping]] = ...) -> None: ...

class RelayRegistered(_message.Message):
    __slots__ = ("address", "max_connections", "max_bytes_per_hour")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    address: str
    max_connections: int
    max_bytes_per_hour: int
    def __init__(self, address: _Optional[str] = ..., max_connections: _Optional[int] = ..., max_bytes_per_hour: _Optional[int] = ...) -> None: ...

class RelayIncoming(_message.Message):
    __slots__ = ("connection_id",)
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: bytes
    def __init__(self, connection_id: _Optional[bytes] = ...) -> None: ...

class RelayNotice(_message.Message):
    __slots__ = ("registered", "incoming")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    registered: RelayRegistered
    incoming: RelayIncoming
    def __init__(self, registered: _Optional[_Union[RelayRegistered, _Mapping]] = ..., incoming: _Optional[_Union[RelayIncoming, _Mapping]] = ...) -> None: ...

class RelayChunk(_message.Message):
    __slots__ = ("connection_id", "data")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    connection_id: bytes
    data: bytes
    def __init__(self, connection_id: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...
