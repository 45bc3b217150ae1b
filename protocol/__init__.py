"""Sans-IO wire protocol of gguf-swarm: frames, messages, CIDs. No sockets, no trio."""

from .cid import InvalidCID, cid_from_digest, cid_from_hex, cid_of, digest_of_cid, is_cid
from .framing import MAX_FRAME, FrameDecoder, encode_frame
from .messages import (
    PROTOCOL_ID,
    Data,
    Error,
    ErrorCode,
    FragmentRequest,
    Have,
    HaveRequest,
    ManifestRequest,
    Message,
    ProtocolError,
    Request,
    Response,
    decode_bitfield,
    encode_bitfield,
)

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_ID",
    "Data",
    "Error",
    "ErrorCode",
    "FragmentRequest",
    "FrameDecoder",
    "Have",
    "HaveRequest",
    "InvalidCID",
    "ManifestRequest",
    "Message",
    "ProtocolError",
    "Request",
    "Response",
    "cid_from_digest",
    "cid_from_hex",
    "cid_of",
    "decode_bitfield",
    "digest_of_cid",
    "encode_bitfield",
    "encode_frame",
    "is_cid",
]
