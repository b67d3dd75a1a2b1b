"""The coordinator's settings, read from ``GRADWIRE_*`` environment variables.

Every field can be set in the environment with the ``GRADWIRE_`` prefix (``GRADWIRE_PORT=9000``)
or passed to :class:`Settings` directly. ``GRADWIRE_TOKENS`` takes a comma-separated list
(``GRADWIRE_TOKENS=alpha,beta``) or a JSON array. ``RAY_ADDRESS`` is honoured as well as
``GRADWIRE_RAY_ADDRESS``, as Ray's own tools read it.

Binding beyond loopback without a token is refused: the REST API starts training jobs (and, with
``allow_import_paths``, imports code named in a job spec), so a coordinator reachable from other
machines must know who is calling. So is a token still holding ``.env.example``'s placeholder
(``replace-me...``): a deployment copied from the example without its secrets replaced would
otherwise accept a token everyone who read the repository knows.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gradwire.server.store import DEFAULT_URL
from gradwire.server.telemetry_sink import is_loopback

__all__ = ["Settings"]

MIB = 1 << 20
#: how every secret in .env.example starts; a value that still does was never replaced
PLACEHOLDER_PREFIX = "replace-me"


class Settings(BaseSettings):
    """How one coordinator process serves: addresses, database, security switches and job limits."""

    model_config = SettingsConfigDict(
        env_prefix="GRADWIRE_",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,  # tokens stay out
    )

    host: str = Field("127.0.0.1", min_length=1, description="address the REST API binds")
    port: int = Field(8000, ge=0, le=65535, description="REST API port")
    grpc_host: str = Field("127.0.0.1", min_length=1, description="address the gRPC telemetry sink binds")
    grpc_port: int = Field(50051, ge=0, le=65535, description="telemetry sink port; 0 picks a free one")
    database_url: str = Field(DEFAULT_URL, min_length=1, description="SQLAlchemy URL of the job store")
    tokens: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="bearer tokens accepted on /v1 routes; none turns auth off (loopback only)"
    )
    allow_import_paths: bool = Field(
        False, description="accept 'module:function' models and datasets (runs code named in a spec)"
    )
    max_body_bytes: int = Field(MIB, ge=1, description="largest request body accepted")
    max_workers_per_job: int = Field(64, ge=1, description="largest workers.count a job may ask for")
    max_steps_per_job: int = Field(1_000_000, ge=1, description="largest steps a job may ask for")
    max_epochs_per_job: int = Field(10_000, ge=1, description="largest epochs a job may ask for")
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("ray_address", "gradwire_ray_address"),
        description="Ray cluster to join (RAY_ADDRESS); None starts an embedded local Ray",
    )
    metrics_retention_s: float = Field(
        900.0, ge=0, description="how long a finished job's Prometheus series stay visible"
    )
    telemetry_public_address: str | None = Field(
        None, description="host:port workers dial for telemetry; default 127.0.0.1:<grpc port>"
    )

    @field_validator("tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, (list, tuple)):
            kept = [v.strip() if isinstance(v, str) else v for v in value]
            return tuple(v for v in kept if v != "")
        return value

    @field_validator("tokens")
    @classmethod
    def _header_safe(cls, tokens: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for token in tokens:  # never echo a token in the error
            if any(c.isspace() or not c.isprintable() for c in token.get_secret_value()):
                raise ValueError("a token cannot contain whitespace or control characters")
            if token.get_secret_value().lower().startswith(PLACEHOLDER_PREFIX):
                raise ValueError(
                    "GRADWIRE_TOKENS still holds the placeholder from .env.example "
                    f"({PLACEHOLDER_PREFIX}...), which anyone who read the repository knows. Generate a "
                    'token with python3 -c "import secrets; print(secrets.token_urlsafe(32))" and set it '
                    "in .env."
                )
        return tokens

    @model_validator(mode="after")
    def _no_open_network_without_tokens(self) -> Settings:
        if self.tokens:
            return self
        exposed = [
            f"{var}={value}"
            for var, value in (("GRADWIRE_HOST", self.host), ("GRADWIRE_GRPC_HOST", self.grpc_host))
            if not is_loopback(value)
        ]
        if exposed:
            raise ValueError(
                f"{' and '.join(exposed)} can be reached from other machines, but no GRADWIRE_TOKENS are "
                "set, so anyone who reaches the port could run jobs. Set GRADWIRE_TOKENS (comma-separated "
                "bearer tokens) or bind 127.0.0.1."
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)

    def telemetry_address(self, bound_port: int | None = None) -> str:
        """The ``host:port`` workers dial; ``bound_port`` is the sink's real port when it picked one."""
        if self.telemetry_public_address:
            return self.telemetry_public_address
        return f"127.0.0.1:{bound_port if bound_port is not None else self.grpc_port}"
