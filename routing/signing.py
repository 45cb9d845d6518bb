"""Signed DHT records: a node's records can be written only with its key, and its peer id is that key's.

A node has one RSA key. Its libp2p identity is made from it, so its peer id is the hash of the public key
(libp2p's rule), and hivemind's ``RSASignatureValidator`` signs every value the node stores under a
subkey that names the key (``"<peer id>[owner:ssh-rsa ...]"``). ``SwarmRecordValidator`` then accepts,
under any key but the model index, only a well-formed ``ServerRecord`` whose subkey names an owner key
(so the signature was checked), whose ``peer_id`` is the subkey's, and whose peer id is that key's hash.
Nobody can therefore write or overwrite a record in another node's name: the subkey holding the victim's
key needs the victim's signature, and a subkey with the writer's own key cannot carry the victim's peer
id. Anything else is dropped, with one log line, by every DHT peer that receives it, stores it, or reads it.

The model index (``homeswarm/models``: model name -> number of blocks) is not owned by anyone; only its
shape is checked. Clients count blocks from their own checkpoint, never from the index.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from homeswarm.routing.records import InvalidRecord, ServerRecord

logger = logging.getLogger(__name__)

_OWNED_SUBKEY = re.compile(r"([1-9A-HJ-NP-Za-km-z]{1,128})(\[owner:(ssh-rsa [A-Za-z0-9+/=]{1,4096})\])")
_MAX_MODEL_NAME = 256


class NodeKey:
    """A node's RSA key: its libp2p identity, its peer id, and the signer of its DHT records."""

    def __init__(self, private_key: RSAPrivateKey | None = None):
        self.private_key = private_key or RSAPrivateKey()
        public = self.private_key.get_public_key().to_bytes().decode()
        self.marker = f"[owner:{public}]"
        self.peer_id = peer_id_of(public)

    def subkey(self) -> str:
        """The subkey this node's records are stored under."""
        return f"{self.peer_id}{self.marker}"

    def write_identity(self, path: str) -> None:
        """Write the key as a libp2p identity file (what p2pd reads), readable by this user alone."""
        data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=self.private_key.to_bytes())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data.SerializeToString())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> NodeKey:
        """The key in libp2p identity file ``path`` (written by :meth:`write_identity`), or a new key written
        there when no file exists yet: a peer keeps its peer id, and so its DHT address, across restarts.
        ValueError (naming the file) when it holds no RSA key."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            key = cls()
            key.write_identity(os.fspath(path))
            return key
        try:
            message = crypto_pb2.PrivateKey.FromString(data)
            if message.key_type != crypto_pb2.KeyType.RSA:
                raise ValueError("not an RSA key")
            loaded = serialization.load_der_private_key(message.data, password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise ValueError("not an RSA key")
        except Exception as e:  # protobuf and cryptography raise several types for a damaged file
            raise ValueError(f"{os.fspath(path)} is not a peer identity file (an RSA key in libp2p's format): "
                             f"{e or type(e).__name__}") from None
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        private_key._private_key = loaded  # hivemind's class has no constructor from bytes
        return cls(private_key)

    def validators(self, models_key: str) -> list[RecordValidatorBase]:
        return [SignatureValidator(self.private_key), SwarmRecordValidator(models_key)]


class SignatureValidator(RSASignatureValidator):
    """hivemind's signature check (only the owner named in a subkey may write under it), logging its drops."""

    def validate(self, record: DHTRecord) -> bool:
        if super().validate(record):
            return True
        logger.warning("dropping a DHT record: not signed by the key its subkey names")
        return False


@functools.lru_cache(maxsize=1024)
def peer_id_of(public_key: str) -> str:
    """The libp2p peer id (base58) of an RSA public key in OpenSSH form ("ssh-rsa AAAA...")."""
    key = RSAPublicKey.from_bytes(public_key.encode())._public_key
    der = key.public_bytes(encoding=serialization.Encoding.DER,
                           format=serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def owner_of(subkey: Any) -> str | None:
    """The peer id a record's subkey claims, if the subkey also names an owner key; else None."""
    if isinstance(subkey, str):
        match = _OWNED_SUBKEY.fullmatch(subkey)
        if match:
            return match.group(1)
    return None


class SwarmRecordValidator(RecordValidatorBase):
    """Accepts only signed server records of their own peer id, and well-formed model index entries."""

    def __init__(self, models_key: str):
        self.models_key = models_key
        self._models_key_id = DHTID.generate(source=models_key).to_bytes()

    def __getstate__(self) -> dict[str, Any]:
        return {"models_key": self.models_key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["models_key"])

    def validate(self, record: DHTRecord) -> bool:
        why = self.why_invalid(record)
        if why is not None:
            logger.warning("dropping a DHT record: %s", why)
            return False
        return True

    def why_invalid(self, record: DHTRecord) -> str | None:
        try:
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
            value = MSGPackSerializer.loads(record.value)
        except Exception as e:  # noqa: BLE001 - any undecodable bytes
            return f"undecodable: {e}"
        if record.key == self._models_key_id:
            if (isinstance(subkey, str) and 0 < len(subkey) <= _MAX_MODEL_NAME and isinstance(value, dict)
                    and set(value) == {"num_blocks"} and isinstance(value["num_blocks"], int)
                    and not isinstance(value["num_blocks"], bool) and 0 < value["num_blocks"] <= 100_000):
                return None
            return f"a malformed model index entry {str(subkey)[:64]!r}"
        claimed = owner_of(subkey)
        if claimed is None:
            return f"a record under subkey {str(subkey)[:64]!r}, which names no owner key (unsigned)"
        try:
            server = ServerRecord.from_dict(value)
        except InvalidRecord as e:
            return f"a malformed server record from {claimed[:16]}: {e}"
        if server.peer_id != claimed:
            return f"a record of peer {server.peer_id[:16]} stored under the subkey of {claimed[:16]}"
        match = _OWNED_SUBKEY.fullmatch(subkey)
        assert match is not None
        try:
            key_owner = peer_id_of(match.group(3))
        except Exception as e:  # noqa: BLE001 - a key that does not parse
            return f"a record of {claimed[:16]} with an unreadable key: {e}"
        if key_owner != claimed:
            return f"a record in the name of {claimed[:16]} signed by another key (of {key_owner[:16]})"
        return None

    @property
    def priority(self) -> int:
        return 5  # after the signature check (10), which strips the signature it checked

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmRecordValidator)  # one is enough
