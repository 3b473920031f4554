"""Templates encrypted at rest: AES-256-GCM through `cryptography`, the one module using it.

Each ciphertext is stored with the id of the key that made it, so keys rotate without a
flag day: the current key encrypts, the current and previous keys decrypt, and
`FaceRecords.reencrypt` moves old rows to the current key in bounded batches. A key id is
derived from the key (a SHA-256 of a fixed label and the key, cut to 16 hex digits), so
the settings name only keys, and an id reveals nothing usable about its key.

The associated data binds a ciphertext to its account and key id: a ciphertext copied onto
another account's row, or relabelled with another key id, fails to decrypt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.face.domain import EMBEDDING_DIMENSIONS

NONCE_BYTES = 12
KEY_BYTES = 32


def key_id(key: bytes) -> str:
    """The public id of a template key."""
    return hashlib.sha256(b"citytap.face.template-key\x00" + key).hexdigest()[:16]


class TemplateDecryptionError(Exception):
    """A stored template could not be decrypted: an unknown key id, or a changed ciphertext."""


@dataclass(frozen=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


class TemplateCipher:
    """Encrypts with the current key; decrypts with the current or any previous key."""

    def __init__(self, current_key: bytes, previous_keys: Sequence[bytes] = ()) -> None:
        for key in (current_key, *previous_keys):
            if len(key) != KEY_BYTES:
                raise ValueError(f"a template key is {KEY_BYTES} bytes (64 hex digits)")
        self.current_key_id = key_id(current_key)
        self._keys = {key_id(k): AESGCM(bytes(k)) for k in (*previous_keys, current_key)}

    def __repr__(self) -> str:
        return f"TemplateCipher(current={self.current_key_id}, keys={len(self._keys)})"

    @staticmethod
    def _aad(account_id: str, kid: str) -> bytes:
        return f"citytap.face.template\x00{account_id}\x00{kid}".encode()

    def seal(self, account_id: str, template: np.ndarray) -> Sealed:
        vector = np.asarray(template, dtype="<f4")
        if vector.shape != (EMBEDDING_DIMENSIONS,):
            raise ValueError(f"a template has {EMBEDDING_DIMENSIONS} components")
        nonce = os.urandom(NONCE_BYTES)
        kid = self.current_key_id
        return Sealed(kid, nonce, self._keys[kid].encrypt(nonce, vector.tobytes(), self._aad(account_id, kid)))

    def open(self, account_id: str, sealed: Sealed) -> np.ndarray:
        aead = self._keys.get(sealed.key_id)
        if aead is None:
            raise TemplateDecryptionError(
                f"template of {account_id} is under key {sealed.key_id}, which is not configured")
        try:
            plain = aead.decrypt(sealed.nonce, sealed.ciphertext, self._aad(account_id, sealed.key_id))
        except InvalidTag:
            raise TemplateDecryptionError(f"template of {account_id} failed authentication") from None
        return np.frombuffer(plain, dtype="<f4").astype(np.float32)
