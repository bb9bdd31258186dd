"""listen settings: the Unix socket path must fit sun_path; TCP beyond loopback needs TLS."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.settings import ListenSettings, is_loopback_host


def test_a_socket_whose_staging_path_fits_is_accepted():
    directory = "/" + "d" * 92  # 93 bytes: the staged DIR/.mbXXXXXXXX/s is 107
    assert ListenSettings(unix=f"{directory}/b.sock").unix == f"{directory}/b.sock"


def test_a_socket_directory_too_long_for_the_staging_path_is_refused():
    directory = "/" + "d" * 93
    with pytest.raises(ValidationError) as caught:
        ListenSettings(unix=f"{directory}/b.sock")
    assert "is longer than 93 bytes" in str(caught.value)


def test_a_socket_path_longer_than_sun_path_is_refused():
    with pytest.raises(ValidationError) as caught:
        ListenSettings(unix="/" + "x" * 107)
    assert "longer than 107 bytes" in str(caught.value)


# --- listen.tcp beyond loopback needs TLS ---------------------------------------------


@pytest.mark.parametrize(
    "tcp", ["127.0.0.1:50051", "127.8.9.10:1", "[::1]:50051", "localhost:50051", "50051"]
)
def test_a_loopback_tcp_listener_needs_no_tls(tcp: str) -> None:
    assert ListenSettings(unix=None, tcp=tcp).tcp is not None


@pytest.mark.parametrize("tcp", ["0.0.0.0:50051", "[::]:50051", "10.0.0.7:50051", "broker.internal:50051"])
def test_a_tcp_listener_other_hosts_reach_is_refused_without_tls(tcp: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ListenSettings(unix=None, tcp=tcp)
    message = str(caught.value)
    assert "has no TLS" in message
    assert "tls_cert_file" in message and "allow_plaintext_tcp" in message


def test_allow_plaintext_tcp_lets_an_open_listener_start() -> None:
    settings = ListenSettings(unix=None, tcp="0.0.0.0:50051", allow_plaintext_tcp=True)
    assert settings.tcp == "0.0.0.0:50051"


def test_an_open_listener_with_tls_is_accepted(tmp_path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    settings = ListenSettings(unix=None, tcp="0.0.0.0:50051", tls_cert_file=cert, tls_key_file=key)
    assert settings.tls_cert_file == cert


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.255.0.1", True), ("::1", True), ("LOCALHOST", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.internal", False), ("", False)],
)  # fmt: skip
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
