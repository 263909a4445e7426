"""XLA FFI custom-call handlers written in Python with ctypes (xla/ffi/api/c_api.h, a C ABI versioned for binary
compatibility): the call frame's structures, and a wrapper that answers XLA's metadata query and hands a handler the
arguments' and results' buffers. The handler runs on XLA's thread holding the GIL only while it reads the frame;
the ctypes calls it makes into C release it."""

from __future__ import annotations

import ctypes as C
import logging
import threading
from collections.abc import Callable

import jax

logger = logging.getLogger("m3jax")

_METADATA = 1  # XLA_FFI_Extension_Metadata


class _ExtensionBase(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("type", C.c_int), ("next", C.c_void_p)]


class _ApiVersion(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("major", C.c_int),
                ("minor", C.c_int)]


class _Metadata(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("api_version", _ApiVersion), ("traits", C.c_uint32),
                ("state_type_id", C.c_int64)]


class _MetadataExtension(C.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", C.POINTER(_Metadata))]


class Buffer(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("dtype", C.c_int),
                ("data", C.c_void_p), ("rank", C.c_int64), ("dims", C.POINTER(C.c_int64))]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dims[i] for i in range(self.rank))


class _Values(C.Structure):  # XLA_FFI_Args and XLA_FFI_Rets share this layout
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("size", C.c_int64),
                ("types", C.c_void_p), ("values", C.POINTER(C.c_void_p))]


class _Attrs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("size", C.c_int64),
                ("types", C.c_void_p), ("names", C.c_void_p), ("attrs", C.c_void_p)]


class _CallFrame(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.POINTER(_ExtensionBase)),
                ("api", C.c_void_p), ("ctx", C.c_void_p), ("stage", C.c_int), ("args", _Values),
                ("rets", _Values), ("attrs", _Attrs), ("future", C.c_void_p)]


_HANDLER_TYPE = C.CFUNCTYPE(C.c_void_p, C.POINTER(_CallFrame))


def _buffers(values: _Values) -> list[Buffer]:
    return [C.cast(values.values[i], C.POINTER(Buffer)).contents for i in range(values.size)]


def register(target: str, run: Callable[[list[Buffer], list[Buffer]], None]):
    """Registers run(args, results) as the CPU custom call `target` (FFI API version 1). Returns the ctypes
    callback, which the caller must keep alive: XLA holds only its bare pointer. Shapes and dtypes are the
    caller's to check when it traces the call; run must not raise."""

    def handler(frame_ptr):
        frame = frame_ptr.contents
        if frame.extension_start and frame.extension_start.contents.type == _METADATA:
            meta = C.cast(frame.extension_start, C.POINTER(_MetadataExtension)).contents.metadata.contents
            meta.api_version.major, meta.api_version.minor, meta.traits = 0, 1, 0
            return None
        run(_buffers(frame.args), _buffers(frame.rets))
        return None

    callback = _HANDLER_TYPE(handler)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(C.cast(callback, C.c_void_p).value), platform="cpu",
                                api_version=1)
    return callback


class Once:
    """A custom call's set-up, run on the first available() (thread-safe): setup() -> (ok, reason why not). A
    failure is logged once as "`fallback`: reason"."""

    def __init__(self, setup: Callable[[], tuple[bool, str | None]], fallback: str):
        self._setup, self._fallback, self._lock = setup, fallback, threading.Lock()
        self._result: tuple[bool, str | None] | None = None

    def available(self) -> bool:
        with self._lock:
            if self._result is None:
                self._result = self._setup()
                if not self._result[0]:
                    logger.info("%s: %s", self._fallback, self._result[1])
        return self._result[0]

    def reason(self) -> str | None:
        self.available()
        return self._result[1]
