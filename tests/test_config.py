"""Config: validated at start, errors name the key, every default documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailwarden import config as config_mod
from mailwarden.config import ConfigError
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def test_defaults_validate_and_are_production_safe() -> None:
    cfg = config_mod.validate({}, Path("/srv/mail"))
    assert cfg.listen("mx") == ("0.0.0.0", 25)
    assert cfg.listen("submission") == ("0.0.0.0", 587)
    assert cfg.listen("submissions") == ("0.0.0.0", 465)
    assert cfg.listen("metrics") == ("127.0.0.1", 9025)  # never public by default
    assert cfg.get("accounts.password_min_length") == 12
    assert cfg.path("tls.cert") == Path("/srv/mail/tls/cert.pem")


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ('[smtp]\nmax_recipients = "many"\n', "smtp.max_recipients", "expected int"),
        ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients", "at least 1"),
        ('[listen]\nmx = "localhost"\n', "listen.mx", "HOST:PORT"),
        ('[listen]\nmx = "127.0.0.1:99999"\n', "listen.mx", "out of range"),
        ("[smtp]\nmax_recipents = 5\n", "smtp.max_recipents", "unknown key"),
        ('[log]\nlevel = "chatty"\n', "log.level", "one of"),
        ("[smtp]\nmax_recipients = true\n", "smtp.max_recipients", "boolean"),
    ],
)
def test_errors_name_the_key_and_the_problem(tmp_path: Path, toml: str, key: str, problem: str) -> None:
    path = tmp_path / "mailwarden.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert err.value.key == key and problem in str(err.value)
    code, _, stderr = run_cli("config", "check", str(path))
    assert code == 1
    assert stderr.count("\n") == 1 and key in stderr


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[smtp\n")
    code, _, stderr = run_cli("config", "check", str(path))
    assert code == 1 and "not valid TOML" in stderr


def test_rendered_defaults_round_trip_and_document_every_key() -> None:
    text = config_mod.render()
    for opt in config_mod.OPTIONS:
        assert f"# {opt.doc}" in text
    assert (
        config_mod.validate(config_mod.tomllib.loads(text), Path(".")).values
        == config_mod.validate({}, Path(".")).values
    )


def test_docs_list_every_default() -> None:
    """docs/configuration.md carries the generated table; regenerate it when a default changes."""
    assert config_mod.markdown_table() in (REPO / "docs" / "configuration.md").read_text()
