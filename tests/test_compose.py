"""The Dockerfile and docker-compose.yml configure Carina with settings it actually reads.

No Docker engine is needed: both files are parsed, compose's ``${VAR:-default}`` interpolation is
applied here, and the result is fed to the real ``Settings``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from carina.settings import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

# Variables the Dockerfile may set that are not Carina's (PIP_* too, in the build stage).
NOT_CARINA = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}

# Values a user might export before `docker compose up`, to check that the carina service follows
# them rather than repeating the defaults.
OVERRIDES = {
    "POSTGRES_USER": "archivist",
    "POSTGRES_PASSWORD": "pg-Pa55word",
    "POSTGRES_DB": "pacs",
    "MINIO_ROOT_USER": "objects",
    "MINIO_ROOT_PASSWORD": "minio-Pa55word",
    "CARINA_S3_BUCKET": "dicom",
}


# --- compose interpolation (compose-spec "Interpolation") -------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is not set: compose refuses to start."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Apply compose's variable substitution to text, reading variables from env."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return arg if unset else str(value)
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if unset else arg
        return value or ""

    return _VAR.sub(sub, text)


def compose() -> dict[str, Any]:
    """docker-compose.yml as parsed YAML (before interpolation)."""
    return yaml.safe_load(COMPOSE.read_text())


def service_environment(service: str, env: Mapping[str, str]) -> dict[str, str]:
    """A service's environment after interpolation with env (mapping or list form)."""
    raw = compose()["services"][service].get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    out = {}
    for name, value in raw.items():
        # YAML would turn an unquoted true/false/number into a non-string; compose's conversion
        # of those is not what Settings expects, so the file quotes them.
        assert isinstance(value, str), f"{service}: quote the value of {name}"
        out[name] = interpolate(value, env)
    return out


def settings_env_names() -> set[str]:
    """Every environment variable Settings reads."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add((prefix + field_name).upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.update(str(choice).upper() for choice in alias.choices)
    return names


def settings_from(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings built from exactly env: the test runner's own Carina variables are removed."""
    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def container_ports(service: str) -> set[int]:
    """The container ports a service publishes (short or long port syntax)."""
    ports = set()
    for entry in compose()["services"][service].get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def minio_api_port() -> int:
    """The port MinIO serves S3 on, from its command line (MinIO's default is 9000)."""
    command = compose()["services"]["minio"]["command"]
    args = shlex.split(command) if isinstance(command, str) else list(command)
    if "--address" in args:
        return int(args[args.index("--address") + 1].rsplit(":", 1)[-1])
    return 9000


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    """Variables set by ENV in the final stage (the one after the last FROM)."""
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            tokens = shlex.split(args)
            if "=" in tokens[0]:
                env.update(token.split("=", 1) for token in tokens)
            else:  # legacy form: ENV NAME value with spaces
                env[tokens[0]] = " ".join(tokens[1:])
    return env


def dockerfile_all_env_names() -> set[str]:
    """Every name any ENV instruction sets, in any stage."""
    names = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            tokens = shlex.split(args)
            if "=" in tokens[0]:
                names.update(token.split("=", 1)[0] for token in tokens)
            else:
                names.add(tokens[0])
    return names


def dockerfile_exposed_ports() -> set[int]:
    """Ports named by EXPOSE (``8080`` or ``8080/tcp``)."""
    ports = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "EXPOSE":
            ports.update(int(token.split("/")[0]) for token in args.split())
    return ports


def dockerfile_volumes() -> set[str]:
    """Paths named by VOLUME (JSON or plain form)."""
    paths: set[str] = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "VOLUME":
            paths.update(yaml.safe_load(args) if args.startswith("[") else args.split())
    return paths


# --- tests ----------------------------------------------------------------------------------

ENVIRONMENTS = pytest.mark.parametrize(
    "shell_env",
    [{"CARINA_SECRET_KEY": "k" * 64}, {"CARINA_SECRET_KEY": "k" * 64, **OVERRIDES}],
    ids=["defaults", "overridden"],
)


def test_setting_names_include_each_field_and_not_a_misspelling() -> None:
    names = settings_env_names()
    assert {"CARINA_S3_ENDPOINT", "CARINA_SECRET_KEY", "DATABASE_URL"} <= names
    assert "CARINA_S3_ENDPOIN" not in names


def test_compose_carina_service_sets_only_variables_settings_reads() -> None:
    env = service_environment("carina", {"CARINA_SECRET_KEY": "x"})
    unknown = sorted(set(env) - settings_env_names())
    assert not unknown, f"carina service sets variables Settings does not read: {unknown}"


@ENVIRONMENTS
def test_compose_carina_environment_validates_as_s3_settings_with_minio_credentials(
    shell_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(service_environment("carina", shell_env), monkeypatch)
    minio = service_environment("minio", shell_env)
    assert settings.storage == "s3"
    assert settings.s3_endpoint == f"minio:{minio_api_port()}"
    assert settings.s3_secure is False
    assert settings.s3_access_key == minio["MINIO_ROOT_USER"]
    assert settings.s3_secret_key == minio["MINIO_ROOT_PASSWORD"]
    assert settings.s3_bucket == shell_env.get("CARINA_S3_BUCKET", "carina")
    assert settings.secret_key == shell_env["CARINA_SECRET_KEY"]
    assert settings.host == "0.0.0.0"
    assert settings.data_dir == Path("/data")


@ENVIRONMENTS
def test_compose_database_url_uses_postgres_service_credentials_and_host(
    shell_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(service_environment("carina", shell_env), monkeypatch)
    postgres = service_environment("postgres", shell_env)
    assert settings.database_url is not None
    url = urlsplit(settings.database_url)
    assert url.scheme in ("postgresql", "postgres")
    assert url.hostname == "postgres"
    assert url.port in (None, 5432)
    assert unquote(url.username or "") == postgres["POSTGRES_USER"]
    assert unquote(url.password or "") == postgres["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == postgres["POSTGRES_DB"]


def test_compose_refuses_to_start_without_secret_key() -> None:
    with pytest.raises(MissingVariable, match="CARINA_SECRET_KEY"):
        service_environment("carina", {})


def test_compose_carina_waits_for_healthy_postgres_and_minio() -> None:
    services = compose()["services"]
    depends_on = services["carina"]["depends_on"]
    for name in ("postgres", "minio"):
        assert depends_on[name]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"]


def test_compose_publishes_the_http_port_carina_listens_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_from(service_environment("carina", {"CARINA_SECRET_KEY": "x"}), monkeypatch)
    assert settings.port in container_ports("carina")


def test_dockerfile_env_names_only_real_settings() -> None:
    real = settings_env_names()
    unknown = sorted(
        name
        for name in dockerfile_all_env_names()
        if name not in real and name not in NOT_CARINA and not name.startswith("PIP_")
    )
    assert not unknown, f"Dockerfile sets variables Settings does not read: {unknown}"


def test_dockerfile_image_listens_on_all_interfaces_with_data_in_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    carina_env = {k: v for k, v in dockerfile_env().items() if k in settings_env_names()}
    settings = settings_from(carina_env, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert str(settings.data_dir) in dockerfile_volumes()


def test_dockerfile_exposes_every_port_compose_publishes_for_carina() -> None:
    published = container_ports("carina")
    assert published, "carina service publishes no ports"
    assert published <= dockerfile_exposed_ports()
