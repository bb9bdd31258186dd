"""Configuration: validation at start-up, environment overrides, secrets, sockets."""

from __future__ import annotations

import os
import socket
import subprocess

import bson
import pytest

from broker.settings import ConfigError, Settings, load_settings, redact_uri
from harness.process import free_port
from tests.rpc import open_stub, pb


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_documented_sidecar_defaults(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("MONGO_BROKER_"):
            monkeypatch.delenv(key)
    settings = load_settings(_write(tmp_path, '[databases.app]\nuri = "mongodb://db:27017/"\n'))
    db = settings.databases["app"]
    assert settings.listen.unix == "/run/mongo-broker/broker.sock" and settings.listen.tcp is None
    assert (db.max_pool_size, db.min_pool_size, db.max_connecting) == (10, 1, 2)
    assert (db.max_idle_time_ms, db.wait_queue_timeout_ms, db.connect_timeout_ms) == (
        300_000,
        1_000,
        5_000,
    )
    assert (db.server_selection_timeout_ms, db.heartbeat_frequency_ms) == (5_000, 5_000)
    assert db.socket_timeout_ms is None and db.retry_reads and db.retry_writes
    assert db.app_name == "mongo-broker" and db.default_timeout_ms == 30_000
    assert settings.limits.max_response_message_bytes == 1024 * 1024
    assert settings.mongo_database("app") == "app"


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = _write(tmp_path, '[databases.app]\nuri = "mongodb://db/"\nmax_pool_size = 5\n')
    monkeypatch.setenv("MONGO_BROKER_CONFIG", path)
    monkeypatch.setenv("MONGO_BROKER_DATABASES__app__MAX_POOL_SIZE", "7")
    monkeypatch.setenv("MONGO_BROKER_LISTEN__TCP", "50051")
    settings = load_settings()
    assert settings.databases["app"].max_pool_size == 7
    assert settings.listen.tcp == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "configure at least one [databases.NAME]"),
        ('[databases.app]\nuri = "http://x"\n', "databases.app.uri"),
        (
            '[databases.app]\nuri = "mongodb://x/"\nmax_pool_size = 0\n',
            "databases.app.max_pool_size",
        ),
        (
            '[databases.app]\nuri = "mongodb://x/"\nmax_pool_sise = 3\n',
            "databases.app.max_pool_sise",
        ),
        (
            '[databases.app]\nuri = "mongodb://x/"\nmin_pool_size = 20\n',
            "min_pool_size (20) must not exceed",
        ),
        ('[databases."bad name"]\nuri = "mongodb://x/"\n', "database name 'bad name'"),
        ('[listen]\ntcp = "host:99999"\n[databases.a]\nuri = "mongodb://x/"\n', "listen.tcp"),
        (
            '[listen]\nunix = ""\n[databases.a]\nuri = "mongodb://x/"\n',
            "set listen.unix, listen.tcp or both",
        ),
        ("[databases.app\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, text))
    assert needle in str(caught.value)


def test_broker_refuses_bad_config_at_startup_with_exit_2(start_broker):
    proc = start_broker('[databases.app]\nuri = "mongodb://x/"\nmax_pool_size = -1\n', wait=False)
    assert proc.wait(timeout=30) == 2
    assert "databases.app.max_pool_size" in proc.log_text()


def test_password_is_redacted_everywhere():
    canary = "Canary-Pa55word-7319"
    uri = f"mongodb://user:{canary}@db.example:27017/app?authSource=admin"
    assert canary not in redact_uri(uri)
    assert redact_uri(uri) == "mongodb://user:***@db.example:27017/app?authSource=admin"
    settings = Settings(databases={"app": {"uri": uri}})
    assert canary not in repr(settings) and canary not in str(settings)


def test_canary_password_never_reaches_the_log(start_broker, db_server, collection_name):
    canary = "Canary-Pa55word-4411"
    config = start_broker.base_config()
    # An unauthenticated server ignores credentials only if none are sent, so
    # the canary goes to a second database that is never called.
    config["databases"]["secret"] = {
        "uri": f"mongodb://user:{canary}@127.0.0.1:{db_server.port}/",
        "server_selection_timeout_ms": 500,
    }
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        stub.Ping(pb.PingRequest(), timeout=15)
        stub.Insert(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})])
        )
    proc.stop()
    log = proc.log_text()
    assert "user:***@" in log
    assert canary not in log


def test_stale_socket_is_replaced_and_live_one_is_refused(start_broker):
    path = start_broker.socket_path()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed broker leaves
    config = start_broker.base_config()
    config["listen"] = {"unix": str(path)}
    first = start_broker(config)
    with open_stub(first.unix_target) as stub:
        assert stub.Ping(pb.PingRequest(), timeout=10).databases[0].ok
    second = start_broker(config, wait=False)
    assert second.wait(timeout=30) == 2
    assert "another process is serving" in second.log_text()
    # The first broker still serves.
    with open_stub(first.unix_target) as stub:
        assert stub.Ping(pb.PingRequest(), timeout=10).databases[0].ok


# --- secrets in URI options, end to end (tests/unit/test_uri_secrets.py has the rule) ---------


def _encrypted_client_pem(directory, password: str) -> str:
    """A self-signed certificate and its key encrypted with ``password``, in one PEM file."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", "key.pem", "-out", "cert.pem", "-passout", f"pass:{password}",
            "-subj", "/CN=broker", "-days", "2",
        ],
        cwd=directory, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pem = directory / "client.pem"
    pem.write_text((directory / "cert.pem").read_text() + (directory / "key.pem").read_text())
    return str(pem)


def test_uri_option_secrets_never_reach_the_log_or_replies(start_broker, tmp_path):
    key_password = "Canary-KeyPass-2291"
    session_token = "Canary-Session-7730"
    secret_key = "Canary-SecretKey-1047"
    pem = _encrypted_client_pem(tmp_path, key_password)
    config = start_broker.base_config()
    quiet = {"server_selection_timeout_ms": 500, "min_pool_size": 0, "connect_timeout_ms": 300}
    # Nothing listens on these ports: the clients are built, never authenticated.
    config["databases"]["tlsdb"] = {
        "uri": f"mongodb://127.0.0.1:{free_port()}/?tls=true&tlsCertificateKeyFile={pem}"
        f"&tlsCertificateKeyFilePassword={key_password}",
        **quiet,
    }
    config["databases"]["awsdb"] = {
        "uri": f"mongodb://AKIDEXAMPLE:{secret_key}@127.0.0.1:{free_port()}/?authMechanism=MONGODB-AWS"
        f"&authMechanismProperties=AWS_SESSION_TOKEN:{session_token}",
        **quiet,
    }
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        replies = [
            str(stub.Ping(pb.PingRequest(), timeout=15)),
            str(stub.Stats(pb.StatsRequest(), timeout=15)),
        ]
    proc.stop()
    log = proc.log_text()
    assert "tlsCertificateKeyFilePassword=***" in log
    assert "AWS_SESSION_TOKEN:***" in log
    for text in (log, *replies):
        assert key_password not in text and session_token not in text and secret_key not in text
