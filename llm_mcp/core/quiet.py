"""Silence known-harmless library log noise in the processes we start (trainer, merge worker, sampler).

Imports only `logging`: safe to call before torch / peft / bitsandbytes are imported, which is
when it must run (bitsandbytes logs its warning at import time).
"""

from __future__ import annotations

import logging

# bitsandbytes, on CPUs with AVX512-BF16, tries the optional `kernels` package at import time and logs
# "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" when it is
# absent; the fallback kernel is used and nothing is wrong, yet the line lands in every job log.
_BNB_NOISE = "kernels-community"
# A logger's filters see only records logged on that logger, not those propagated from its children,
# so the filter goes on each logger that emits the message (and on the package logger).
_BNB_LOGGERS = (
    "bitsandbytes",
    "bitsandbytes.backends",
    "bitsandbytes.backends.cpu",
    "bitsandbytes.backends.cpu.ops",
    "bitsandbytes.backends.mps.ops",
)


class _DropBitsandbytesKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return _BNB_NOISE not in message


_FILTER = _DropBitsandbytesKernelsNotice()


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' "... from kernels-community ..." import-time warning. Idempotent."""
    for name in _BNB_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
