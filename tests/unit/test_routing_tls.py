"""Encrypted hops: node certificates, records that pin them, and channels that trust the pinned one alone."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from homeswarm.client.transport import ChannelPool, HopFailed, ping
from homeswarm.protocol import node_pb2, node_pb2_grpc
from homeswarm.routing.records import InvalidRecord, PeerId, ServerRecord, ServerState
from homeswarm.routing.tls import NodeCertificate, fingerprint

PEER = "QmNodePeer"


class InfoOnly(node_pb2_grpc.NodeServicer):
    def Info(self, request, context):  # noqa: N802 - the gRPC method's name
        return node_pb2.InfoResponse(software_version="tls-test")


@pytest.fixture(scope="module")
def certificate():
    return NodeCertificate()


@pytest.fixture(scope="module")
def tls_node(certificate):
    """A node service on loopback presenting ``certificate``; its HOST:PORT."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    node_pb2_grpc.add_NodeServicer_to_server(InfoOnly(), server)
    port = server.add_secure_port("127.0.0.1:0", certificate.server_credentials())
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def record(**fields) -> ServerRecord:
    base = dict(peer_id=PeerId(PEER), address="127.0.0.1:1", model="m", start=0, end=2, state=ServerState.ONLINE,
                protocol_version=1, dtype="float32", throughput=1.0, cache_tokens_left=10)
    return ServerRecord(**{**base, **fields})


def test_fingerprint_is_the_sha256_of_the_der_and_differs_between_nodes(certificate):
    other = NodeCertificate()
    assert len(certificate.fingerprint) == 64 and certificate.fingerprint == fingerprint(certificate.cert_pem)
    assert other.fingerprint != certificate.fingerprint
    with pytest.raises(ValueError):
        fingerprint("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")


def test_records_carry_the_certificate_and_insecure_ones_omit_it(certificate):
    pinned = record(tls_cert=certificate.cert_pem)
    assert ServerRecord.from_dict(pinned.to_dict()) == pinned
    assert "tls_cert" not in record().to_dict()
    assert ServerRecord.from_dict(record().to_dict()).tls_cert == ""


@pytest.mark.parametrize("value", [42, "", "hello", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                   "-----BEGIN CERTIFICATE-----" + "A" * 5000])
def test_records_with_a_malformed_certificate_are_rejected(value):
    data = {**record().to_dict(), "tls_cert": value}
    with pytest.raises(InvalidRecord, match="tls_cert"):
        ServerRecord.from_dict(data)


def test_a_pool_reaches_a_node_over_tls_pinned_to_its_record(tls_node, certificate):
    pool = ChannelPool()
    try:
        pool.note_tls(PEER, certificate.cert_pem)
        _, info = ping(pool, PEER, tls_node, timeout=10)
        assert info.software_version == "tls-test"
    finally:
        pool.close()


def test_a_node_presenting_another_certificate_is_refused(tls_node):
    pool = ChannelPool()
    try:
        pool.note_tls(PEER, NodeCertificate().cert_pem)  # what a record pins, not what the node presents
        with pytest.raises(HopFailed, match="not the one its signed record pins") as error:
            ping(pool, PEER, tls_node, timeout=10)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        pool.close()


def test_plaintext_to_a_tls_node_fails_and_require_tls_refuses_unpinned_nodes(tls_node):
    pool = ChannelPool()
    try:
        with pytest.raises(HopFailed):
            ping(pool, PEER, tls_node, timeout=10)  # no certificate noted: plaintext, which a TLS node refuses
    finally:
        pool.close()
    strict = ChannelPool(require_tls=True)
    try:
        with pytest.raises(HopFailed, match="requires TLS") as error:
            ping(strict, PEER, tls_node, timeout=10)
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        strict.close()
