"""The one settings object: environment variables with prefix CARINA_, plus DATABASE_URL."""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from carina.archive.originals import Area


class Settings(BaseSettings):
    """Carina's configuration, read once at start-up and passed down."""

    model_config = SettingsConfigDict(env_prefix="CARINA_", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(default=Path("carina-data"), description="Everything local lives here")
    host: str = Field(default="127.0.0.1", description="HTTP and DIMSE bind address")
    port: int = Field(default=8080, description="HTTP port")
    dimse_port: int = Field(default=11112, description="DICOM (DIMSE) port of the listener")
    ae_title: str = Field(default="CARINA", description="AE title of the DICOM listener")
    dimse_enabled: bool = Field(
        default=True, description="`carina serve` also runs the DICOM listener"
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "CARINA_DATABASE_URL"),
        description="PostgreSQL URL; unset starts an embedded PostgreSQL in data_dir/pg",
    )
    storage: Literal["fs", "s3"] = Field(default="fs", description="Object store backend")
    s3_endpoint: str = Field(default="127.0.0.1:9000", description="S3 host:port")
    s3_access_key: str = Field(default="", description="S3 access key")
    s3_secret_key: str = Field(default="", description="S3 secret key")
    s3_bucket: str = Field(default="carina", description="S3 bucket (created when missing)")
    s3_secure: bool = Field(default=False, description="Use TLS to reach S3")
    s3_region: str | None = Field(default=None, description="S3 region, if the server needs one")
    secret_key: str | None = Field(
        default=None,
        description="Master key for pseudonyms and UID remapping; unset: generated once "
        "into data_dir/secret.key",
    )
    deid_profile: str = Field(default="basic", description="Default de-identification profile")
    deid_options: list[str] = Field(
        default=["retain_long_modified_dates"],
        description="PS3.15 options layered over the profile (JSON list), e.g. "
        '["retain_long_modified_dates"]: dates are shifted per patient, not removed',
    )
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        description="Processes that parse and de-identify instances",
    )
    settle_seconds: float = Field(
        default=5.0,
        ge=0,
        description="Quiet period after a C-STORE before its series is evaluated (the end of "
        "the association settles at once)",
    )
    request_settle_seconds: float = Field(
        default=1.0,
        ge=0,
        description="Quiet period after a STOW request before its series are evaluated; a "
        "further request for a series pushes it back, so an upload in many requests is judged "
        "once, not after each",
    )
    serve_worker: bool = Field(
        default=True,
        description="`carina serve` also evaluates settled series (as `carina worker` does)",
    )
    series_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Threads that evaluate settled series (in `carina serve` and in each "
        "`carina worker`): a series whose pixels OCR is reading does not hold up the others",
    )
    tesseract: str = Field(
        default="tesseract",
        description="The tesseract command (a name on PATH or a path) the burned-in text rule "
        "reads frames with",
    )
    log_level: str = Field(default="info", description="Log level")
    cors_origins: list[str] = Field(
        default=[],
        description="Origins (JSON list) whose browser viewers, e.g. OHIF, may call the API "
        'across origins, e.g. ["https://viewer.example.org"]; empty: no CORS headers',
    )
    coercion_warnings: bool = Field(
        default=True,
        description="Report de-identification's changes as warnings (PS3.4 B.2.3, PS3.18 "
        "10.5.3): C-STORE 0xB000/0xB006, STOW-RS WarningReason with 202; false: plain success "
        "(0x0000, 200) for senders that take a warning for a failure",
    )
    dimse_ack: Literal["intake", "indexed"] = Field(
        default="intake",
        description="When a C-STORE gets its status: `intake`, once the instance is parsed, "
        "checked and its original durable (encrypted) in the intake area, de-identification, "
        "storing and indexing following in the background (an association's release waits "
        "for them); `indexed`, only once it is de-identified, stored and indexed",
    )
    originals_dir: Path | None = Field(
        default=None,
        description="Where the identified originals are kept, encrypted, until their series is "
        "decided; unset: data_dir/originals",
    )
    originals_key: str | None = Field(
        default=None,
        description="Master key of the originals' encryption; unset: generated once into "
        "data_dir/originals.key",
    )
    originals_retention_days: float = Field(
        default=0.0,
        ge=0,
        description="Days the originals of a published series are kept (for a reprocessing "
        "after release); 0: purged at once. Rejected and forgotten series' go at once",
    )
    auth_failure_limit: str = Field(
        default="10/minute",
        description="Bad tokens one client address may present in a moving window (e.g. "
        '"10/minute", "100/hour") before its token requests get 429',
    )

    oidc_issuer: str | None = Field(
        default=None,
        description="OpenID Connect issuer (the JWT `iss`) whose bearer JWTs are accepted "
        "besides Carina's tokens; unset: none are",
    )
    oidc_audience: str | None = Field(
        default=None, description="The JWT `aud` Carina requires (its client id at the issuer)"
    )
    oidc_jwks_url: str | None = Field(
        default=None, description="The issuer's JWKS URL (its keys; fetched and cached)"
    )
    oidc_roles_claim: str = Field(
        default="roles",
        description="Claim holding the roles (admin, curator, submitter, reader); a dotted "
        "path reaches into objects, e.g. realm_access.roles",
    )
    oidc_collection_claim: str = Field(
        default="collections",
        description="Claim holding the collection(s) the roles other than admin apply to",
    )

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        if self.oidc_issuer and not (self.oidc_audience and self.oidc_jwks_url):
            raise ValueError(
                "CARINA_OIDC_ISSUER needs CARINA_OIDC_AUDIENCE and CARINA_OIDC_JWKS_URL"
            )
        return self

    @field_validator("auth_failure_limit")
    @classmethod
    def _rate(cls, v: str) -> str:
        from limits import parse

        parse(v)  # refuse a rate that does not parse at start-up, not at the first bad token
        return v

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def intake_dir(self) -> Path:
        """Restricted area where identified bytes may exist while an instance is processed."""
        return self.data_dir / "intake"

    @property
    def staging_dir(self) -> Path:
        """De-identified objects waiting to be moved into the store."""
        return self.data_dir / "staging"

    @property
    def objects_dir(self) -> Path:
        """Root of the filesystem object store."""
        return self.data_dir / "objects"

    @property
    def originals_root(self) -> Path:
        """The originals area (restricted, like the intake area)."""
        return (self.originals_dir or self.data_dir / "originals").expanduser().resolve()

    @property
    def pg_dir(self) -> Path:
        """Data directory of the embedded PostgreSQL."""
        return self.data_dir / "pg"

    @cached_property
    def master_key(self) -> bytes:
        """The key every pseudonym, date offset and remapped UID is derived from."""
        return self._key(self.secret_key, "secret.key")

    @cached_property
    def originals_area(self) -> Area:
        """The originals area: directory, master key (not the pseudonyms') and retention."""
        from carina.archive.originals import Area

        key = self._key(self.originals_key, "originals.key")
        return Area(self.originals_root, key, self.originals_retention_days)

    def _key(self, value: str | None, file_name: str) -> bytes:
        """A key from its setting, or from its file in the data directory (made once, 0600)."""
        if value:
            return value.encode()
        path = self.data_dir / file_name
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip().encode()

    def prepare_dirs(self) -> None:
        """Create the local directories, the intake area readable by this user only."""
        for d in (self.data_dir, self.staging_dir, self.objects_dir):
            d.mkdir(parents=True, exist_ok=True)
        for restricted in (self.intake_dir, self.originals_root):
            restricted.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(restricted, 0o700)
