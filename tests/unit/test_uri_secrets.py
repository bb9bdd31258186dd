"""Secrets in URIs: what redact_uri hides, and pymongo's refusals without them, without a server."""

from __future__ import annotations

import pytest

from broker.pools import Pools
from broker.settings import ConfigError, Settings, redact_text, redact_uri, uri_secrets


@pytest.mark.parametrize(
    ("uri", "redacted", "secret"),
    [
        (
            "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=Canary-Tls-1&appname=x",
            "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=***&appname=x",
            "Canary-Tls-1",
        ),
        (
            "mongodb://db/?TLSCERTIFICATEKEYFILEPASSWORD=Canary-Tls-2",
            "mongodb://db/?TLSCERTIFICATEKEYFILEPASSWORD=***",
            "Canary-Tls-2",
        ),
        (
            "mongodb://k@db/?authMechanism=MONGODB-AWS"
            "&authMechanismProperties=SERVICE_NAME:svc,AWS_SESSION_TOKEN:Canary-Aws-3",
            "mongodb://k@db/?authMechanism=MONGODB-AWS"
            "&authMechanismProperties=SERVICE_NAME:svc,AWS_SESSION_TOKEN:***",
            "Canary-Aws-3",
        ),
        (
            "mongodb://db/?authMechanismProperties=AWS_SESSION_TOKEN%3ACanary-Aws-4",
            "mongodb://db/?authMechanismProperties=AWS_SESSION_TOKEN:***",
            "Canary-Aws-4",
        ),
        ("mongodb://db/?x=1;apiSecret=Canary-5;y=2", "mongodb://db/?x=1;apiSecret=***;y=2", "Canary-5"),
        ("mongodb://db/?refreshToken=Canary-6", "mongodb://db/?refreshToken=***", "Canary-6"),
        # Passwords with characters pymongo needs escaped are still hidden whole.
        ("mongodb://u:Canary/7@db/", "mongodb://u:***@db/", "Canary/7"),
        ("mongodb://u:Canary?8@db/app", "mongodb://u:***@db/app", "Canary?8"),
        ("mongodb://u:Can@ry-9@db/?appname=a@b", "mongodb://u:***@db/?appname=a@b", "Can@ry-9"),
        ("u:Canary-10@db", "u:***@db", "Canary-10"),
        # Nothing secret: unchanged.
        ("mongodb://db:27017/app?authSource=admin&tls=true", None, None),
        ("mongodb://user@db/?tlsCAFile=/etc/ca.pem", None, None),
    ],
)
def test_redact_uri_hides_every_secret_bearing_part(uri, redacted, secret):
    assert redact_uri(uri) == (redacted if redacted is not None else uri)
    if secret is not None:
        assert secret not in redact_uri(uri)
        assert secret in uri_secrets(uri)
        assert redact_text(f"error about {secret}!", uri) == "error about ***!"


def test_settings_repr_shows_no_uri_option_secret():
    canary = "Canary-Option-5512"
    settings = Settings(databases={"app": {"uri": f"mongodb://db/?tlsCertificateKeyFilePassword={canary}"}})
    assert canary not in repr(settings) and canary not in str(settings)
    assert settings.databases["app"].redacted_uri == "mongodb://db/?tlsCertificateKeyFilePassword=***"


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("mongodb://127.0.0.1:99999/", "Port must be an integer between 0 and 65535"),
        ("mongodb://db/?maxPoolSize=many", "maxpoolsize must be an integer"),
        ("mongodb+srv://db.example:27017/", "must not include a port number"),
        # pymongo would only warn and run without it.
        ("mongodb://db/?maxPoolSise=3", "Unknown option"),
    ],
)
def test_a_uri_pymongo_refuses_is_a_config_error_naming_the_key(uri, needle):
    settings = Settings(databases={"good": {"uri": "mongodb://db/"}, "bad": {"uri": uri}})
    with pytest.raises(ConfigError) as caught:
        Pools.build(settings.databases)
    message = str(caught.value)
    assert "databases.bad.uri: pymongo refuses" in message and needle in message, message


def test_a_refused_uri_never_shows_its_password():
    # pymongo cuts an unescaped '/' in the password and quotes the piece after it.
    uri = "mongodb://user:Canary/Piece-6630@127.0.0.1:27017/"
    settings = Settings(databases={"app": {"uri": uri}})
    with pytest.raises(ConfigError) as caught:
        Pools.build(settings.databases)
    message = str(caught.value)
    assert "databases.app.uri" in message and "quote_plus" in message, message
    assert "Canary" not in message and "Piece-6630" not in message, message
