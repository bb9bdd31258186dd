"""listen.unix: the socket path and the private directory it is first bound in must fit sun_path."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.settings import ListenSettings


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
