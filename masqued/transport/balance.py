"""Relay workers: new clients go to the least busy worker, by QUIC Retry.

A client's first Initial reaches a worker picked by its own random DCID
(masqued.transport.steering), so with few clients the spread can be lopsided (README,
Performance). When the worker that got the first Initial serves more clients than
the least busy one, it answers with a Retry (RFC 9000 §8.1.2) whose source
connection ID starts with that worker's index: the client's next Initial, carrying
the token, is steered there, and that worker takes it. It costs the redirected
clients one round trip. The token is sealed with a key all the workers share, binds
the client's address, the original DCID and the Retry's own SCID, and expires.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TOKEN_LIFETIME = 10.0  # seconds a Retry token is good for
CID_LENGTH = 8  # aioquic's default connection_id_length
_NONCE = 12


class InvalidToken(ValueError):
    """A Retry token that this relay did not make for this client, or too old."""


class RetryTokens:
    """Seal and open Retry tokens (AES-GCM under a key the workers share)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, addr: str, odcid: bytes, retry_scid: bytes, now: float | None = None) -> bytes:
        issued = time.time() if now is None else now
        plain = struct.pack("!dB", issued, len(odcid)) + odcid + retry_scid
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plain, addr.encode())

    def open(
        self, addr: str, token: bytes, dcid: bytes, now: float | None = None
    ) -> tuple[bytes, bytes]:
        """(original DCID, Retry SCID) of a token for ``addr`` arriving with ``dcid``."""
        if len(token) <= _NONCE:
            raise InvalidToken("too short")
        try:
            plain = self._aead.decrypt(token[:_NONCE], token[_NONCE:], addr.encode())
        except InvalidTag:
            raise InvalidToken("not ours, or for another address") from None
        issued, n = struct.unpack_from("!dB", plain)
        odcid, retry_scid = plain[9 : 9 + n], plain[9 + n :]
        age = (time.time() if now is None else now) - issued
        if not 0 <= age <= TOKEN_LIFETIME:
            raise InvalidToken(f"expired ({age:.0f}s old)")
        if retry_scid != dcid:
            raise InvalidToken("not the connection ID the Retry gave")
        return odcid, retry_scid


class Balancer:
    """Where a new client should go: this worker, or (by Retry) the least busy one.

    ``loads`` holds each worker's clients as last reported (the main process sends
    them); this worker's own entry is replaced by its live count, and every client
    sent elsewhere counts there until the next report.
    """

    def __init__(self, worker: int, workers: int, tokens: RetryTokens) -> None:
        self.worker = worker
        self.workers = workers
        self.tokens = tokens
        self.loads = [0] * workers
        self._sent = [0] * workers  # redirected since the last report
        self.redirects = 0

    def report(self, loads: Sequence[int]) -> None:
        """The clients of every worker, as the main process last saw them."""
        if len(loads) == self.workers:
            self.loads = [max(0, int(n)) for n in loads]
            self._sent = [0] * self.workers

    def target(self, own: int) -> int | None:
        """The worker a new client should be sent to, or None to keep it here."""
        loads = [n + s for n, s in zip(self.loads, self._sent, strict=True)]
        loads[self.worker] = own
        best = min(range(self.workers), key=lambda k: (loads[k], k != self.worker))
        if loads[best] >= own:
            return None
        self._sent[best] += 1
        self.redirects += 1
        return best


def retry_cid(target: int) -> bytes:
    """A connection ID that the steering program sends to worker ``target``."""
    return bytes((target,)) + os.urandom(CID_LENGTH - 1)
