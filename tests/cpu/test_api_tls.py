"""TLS on the gRPC port (`dsv4 serve --ssl-certfile/--ssl-keyfile`): the port speaks TLS only, with a self-signed
certificate made here; the flags are checked by name before anything starts."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from api_fakes import TIMEOUT_S, FakeEngine, ServerThread, tokenizer, tokenizer_dir  # noqa: F401
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dsv4.cluster.cli import main
from dsv4.cluster.server import tls_files
from dsv4.protos import dsv4_pb2 as pb
from dsv4.protos import dsv4_pb2_grpc


def self_signed() -> tuple[bytes, bytes]:
    """(key, certificate) PEM for localhost and 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


def test_a_tls_port_serves_tls_clients_only(tokenizer) -> None:  # noqa: F811
    key, cert = self_signed()
    server = ServerThread(FakeEngine(tokenizer), tokenizer, tls=(key, cert)).start()
    try:
        with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(root_certificates=cert)) as channel:
            responses = list(dsv4_pb2_grpc.Dsv4EngineStub(channel).Generate(pb.GenerateRequest(
                text="hi", sampling_params=pb.SamplingParams(max_tokens=3, temperature=0.0)), timeout=TIMEOUT_S))
            assert responses[-1].WhichOneof("response") == "complete"
        with grpc.insecure_channel(server.address) as channel:      # plaintext gets no answer
            with pytest.raises(grpc.RpcError) as info:
                dsv4_pb2_grpc.Dsv4EngineStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        other_key, other_cert = self_signed()                         # a client trusting another certificate
        with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(root_certificates=other_cert)) as ch:
            with pytest.raises(grpc.RpcError) as info:
                dsv4_pb2_grpc.Dsv4EngineStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_the_tls_flags_are_checked_by_name(tmp_path, capsys) -> None:
    key, cert = self_signed()
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "junk.pem").write_bytes(b"not a pem")
    assert tls_files(None, None) is None
    assert tls_files(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")) == (key, cert)
    with pytest.raises(ValueError, match="--ssl-certfile and --ssl-keyfile go together"):
        tls_files(str(tmp_path / "cert.pem"), None)
    with pytest.raises(FileNotFoundError, match="--ssl-keyfile .*missing.pem: no such file"):
        tls_files(str(tmp_path / "cert.pem"), str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="--ssl-keyfile .*junk.pem: not a PEM private key"):
        tls_files(str(tmp_path / "cert.pem"), str(tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="--ssl-certfile .*key.pem: not a PEM certificate"):
        tls_files(str(tmp_path / "key.pem"), str(tmp_path / "key.pem"))
    # `dsv4 serve` refuses before it starts anything (no workers, no Ray)
    assert main(["serve", "--ssl-keyfile", str(tmp_path / "key.pem")]) == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in capsys.readouterr().err
