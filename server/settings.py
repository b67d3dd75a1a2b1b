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
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gradwire.policy import JobPolicy, Limits
from gradwire.server.principals import PrincipalToken, parse_principals
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
        (),
        description="bearer tokens accepted on /v1 routes, each 'name:TOKEN' (or a bare TOKEN, named "
        "token:<fingerprint>); none turns auth off (loopback only)",
    )
    admins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="principals (names from GRADWIRE_TOKENS) that see and act on every job"
    )
    metrics_token: SecretStr | None = Field(
        None, description="bearer token /metrics requires; none leaves /metrics open"
    )
    allow_import_paths: bool = Field(
        False, description="accept 'module:function' models and datasets (runs code named in a spec)"
    )
    max_body_bytes: int = Field(MIB, ge=1, description="largest request body accepted")
    max_workers_per_job: int = Field(64, ge=1, description="largest workers.count a job may ask for")
    max_steps_per_job: int = Field(1_000_000, ge=1, description="largest steps a job may ask for")
    max_epochs_per_job: int = Field(10_000, ge=1, description="largest epochs a job may ask for")
    max_batch_size: int = Field(65_536, ge=1, description="largest data.batch_size")
    min_cpus_per_worker: float = Field(0.1, gt=0, description="smallest workers.cpus_per_worker")
    max_cpus_per_worker: float = Field(256.0, gt=0, description="largest workers.cpus_per_worker")
    max_gpus_per_worker: float = Field(16.0, ge=0, description="largest workers.gpus_per_worker")
    max_param_width: int = Field(65_536, ge=1, description="largest size param (hidden, d_model, ...)")
    max_param_depth: int = Field(1_024, ge=1, description="largest depth param (layers, heads, ...)")
    max_param_count: int = Field(10_000_000, ge=1, description="largest count param (samples, ...)")
    max_param_number: float = Field(1e9, gt=0, description="largest magnitude of any other number in params")
    max_string_length: int = Field(4_096, ge=1, description="longest string in params or checkpoint.storage")
    max_name_length: int = Field(256, ge=1, description="longest model.name, data.dataset, compression.name")
    max_params_bytes: int = Field(65_536, ge=1, description="model.params + data.params as JSON")
    max_checkpoints_kept: int = Field(100, ge=1, description="largest checkpoint.keep")
    max_queued_jobs: int = Field(10_000, ge=1, description="queued jobs on this coordinator, all tokens")
    max_queued_jobs_per_token: int = Field(1_000, ge=1, description="queued jobs submitted with one token")
    queue_full_retry_after_s: int = Field(30, ge=1, description="Retry-After of a 429 for a full queue")
    data_roots: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="folders file datasets may read (os.pathsep-separated); none: file datasets refused"
    )
    checkpoint_root: str | None = Field(
        None, description="folder checkpoint storage must be under; default <data dir>/checkpoints"
    )
    checkpoint_uris: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="URI prefixes checkpoint storage may use (comma-separated); none: URIs refused"
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("ray_address", "gradwire_ray_address"),
        description="the Ray cluster's Jobs API, http://head:8265 (RAY_ADDRESS); None: an embedded head",
    )
    ray_gcs_port: int | None = Field(
        None, ge=1, le=65535, description="embedded Ray head's GCS port (default: free)"
    )
    ray_dashboard_port: int | None = Field(
        None, ge=1, le=65535, description="embedded Ray head's dashboard / Jobs API port (default: free)"
    )
    ray_agent_port: int | None = Field(
        None, ge=1, le=65535, description="embedded Ray head's dashboard agent port (default: free)"
    )
    ray_client_port: int | None = Field(
        None, ge=1, le=65535, description="embedded Ray head's Ray client server port (default: free)"
    )
    job_python: str | None = Field(
        None,
        min_length=1,
        max_length=4_096,
        pattern=r"^[^\s\x00-\x1f]+$",
        description="the Python a job's driver runs on the Ray head, e.g. /opt/venv/bin/python "
        "(default: the coordinator's own interpreter, which the head must then have at the same path)",
    )
    never_fits_grace_s: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="how long a job bigger than the whole cluster waits for nodes to join before it fails",
    )
    metrics_retention_s: float = Field(
        900.0, ge=0, description="how long a finished job's Prometheus series stay visible"
    )
    telemetry_public_address: str | None = Field(
        None, description="host:port workers dial for telemetry; default 127.0.0.1:<grpc port>"
    )
    tls_cert: str | None = Field(None, description="PEM certificate: the REST API serves HTTPS only")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    grpc_tls_cert: str | None = Field(None, description="PEM certificate: the telemetry sink serves TLS only")
    grpc_tls_key: str | None = Field(None, description="PEM private key of grpc_tls_cert")
    telemetry_tls_ca: str | None = Field(
        None, description="CA file as the workers see it (their GRADWIRE_TELEMETRY_CA); default grpc_tls_cert"
    )
    telemetry_max_bytes_per_step: int = Field(
        64 << 30, ge=1, description="ceiling on a rank's reported bytes per step (telemetry bounds)"
    )
    telemetry_max_clock_skew_s: float = Field(
        300.0, ge=0, description="how far a report's wall_time may lie ahead of the coordinator's clock"
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
            entry = token.get_secret_value().lower()
            if entry.startswith(PLACEHOLDER_PREFIX) or entry.partition(":")[2].startswith(PLACEHOLDER_PREFIX):
                raise ValueError(
                    "GRADWIRE_TOKENS still holds the placeholder from .env.example "
                    f"({PLACEHOLDER_PREFIX}...), which anyone who read the repository knows. Generate a "
                    'token with python3 -c "import secrets; print(secrets.token_urlsafe(32))" and set it '
                    "in .env."
                )
        return tokens

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(os.pathsep)
        return tuple(v.strip() for v in value if v.strip()) if isinstance(value, (list, tuple)) else value

    @field_validator("checkpoint_uris", mode="before")
    @classmethod
    def _split_uris(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        return tuple(v.strip() for v in value if v.strip()) if isinstance(value, (list, tuple)) else value

    @field_validator("data_roots")
    @classmethod
    def _absolute_roots(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        for root in roots:
            if not os.path.isabs(root):
                raise ValueError(f"GRADWIRE_DATA_ROOTS: {root!r} is not an absolute path")
        return roots

    def job_policy(self, data_dir: str | Path = ".gradwire") -> JobPolicy:
        """What job specs may ask for on this coordinator (gradwire/policy.py); the checkpoint root
        defaults to ``<data_dir>/checkpoints``."""
        limits = Limits(
            max_workers=self.max_workers_per_job, max_steps=self.max_steps_per_job,
            max_epochs=self.max_epochs_per_job, max_batch_size=self.max_batch_size,
            min_cpus_per_worker=self.min_cpus_per_worker, max_cpus_per_worker=self.max_cpus_per_worker,
            max_gpus_per_worker=self.max_gpus_per_worker, max_width=self.max_param_width,
            max_depth=self.max_param_depth, max_samples=self.max_param_count,
            max_number=self.max_param_number, max_string=self.max_string_length,
            max_name=self.max_name_length, max_params_bytes=self.max_params_bytes,
            max_keep=self.max_checkpoints_kept,
        )  # fmt: skip
        return JobPolicy(
            data_roots=self.data_roots,
            checkpoint_root=self.checkpoint_root or str(Path(data_dir) / "checkpoints"),
            checkpoint_uris=self.checkpoint_uris,
            allow_import_paths=self.allow_import_paths,
            limits=limits,
        )

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("set both GRADWIRE_GRPC_TLS_CERT and GRADWIRE_GRPC_TLS_KEY, or neither")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both GRADWIRE_TLS_CERT and GRADWIRE_TLS_KEY, or neither")
        return self

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

    @field_validator("admins", mode="before")
    @classmethod
    def _split_admins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        return tuple(v.strip() for v in value if v.strip()) if isinstance(value, (list, tuple)) else value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_safe(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:  # never echo the token in the error
            value = token.get_secret_value()
            if not value or any(c.isspace() or not c.isprintable() for c in value):
                raise ValueError("GRADWIRE_METRICS_TOKEN must be non-empty, without whitespace or controls")
            if value.lower().startswith(PLACEHOLDER_PREFIX):
                raise ValueError("GRADWIRE_METRICS_TOKEN still holds a placeholder; generate a token")
        return token

    @model_validator(mode="after")
    def _principals_parse(self) -> Settings:
        _ = self.principals  # a malformed entry or an unknown admin fails here, at start-up
        return self

    @cached_property
    def principals(self) -> tuple[PrincipalToken, ...]:
        """Each configured token with its principal (server/principals.py)."""
        return parse_principals((t.get_secret_value() for t in self.tokens), self.admins)

    def telemetry_address(self, bound_port: int | None = None) -> str:
        """The ``host:port`` workers dial; ``bound_port`` is the sink's real port when it picked one."""
        if self.telemetry_public_address:
            return self.telemetry_public_address
        return f"127.0.0.1:{bound_port if bound_port is not None else self.grpc_port}"
