"""The README documents every option, metric and status reason the code has."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
from pydantic import BaseModel

import broker
from broker import errors, settings
from broker.metrics import METRIC_NAMES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

SECTIONS: dict[str, type[BaseModel]] = {
    "listen": settings.ListenSettings,
    "health": settings.HealthSettings,
    "metrics": settings.MetricsSettings,
    "server": settings.ServerSettings,
    "limits": settings.LimitSettings,
    "security": settings.SecuritySettings,
    "log": settings.LogSettings,
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_section_option_is_documented(section):
    missing = [
        f"{section}.{name}" for name in SECTIONS[section].model_fields if f"`{section}.{name}" not in README
    ]
    assert not missing, f"README lacks: {missing}"


def test_every_database_option_is_documented():
    missing = [name for name in settings.DatabaseSettings.model_fields if f"| `{name}` |" not in README]
    assert not missing, f"README lacks database options: {missing}"


def test_every_token_option_is_documented():
    # In the token table itself: a bare word such as `name` appears anywhere
    # in a README and would prove nothing.
    table = README.split("| token key | default | meaning |", 1)[1].split("\n\n", 1)[0]
    missing = [name for name in settings.TokenSettings.model_fields if f"| `{name}` |" not in table]
    assert not missing, f"README's token table lacks: {missing}"


def test_every_metric_is_documented():
    missing = [name for name in METRIC_NAMES if f"`{name}`" not in README]
    assert not missing, missing


def test_every_error_reason_is_documented():
    reasons = [v for k, v in vars(errors.Reason).items() if k.isupper()]
    missing = [reason for reason in reasons if f"`{reason}`" not in README]
    assert not missing, missing


@pytest.mark.parametrize(
    "module", sorted(m.name for m in pkgutil.iter_modules(broker.__path__) if not m.name.startswith("_"))
)
def test_module_all_is_honest(module):
    mod = importlib.import_module(f"broker.{module}")
    exported = getattr(mod, "__all__", None)
    assert exported is not None, f"broker.{module} has no __all__"
    for name in exported:
        assert hasattr(mod, name), f"broker.{module}.__all__ names missing {name}"
