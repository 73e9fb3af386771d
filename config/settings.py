"""Typed settings for every process, from an optional TOML file and ``ECOM_*`` environment variables.

Precedence: built-in defaults < TOML file named by ``ECOM_CONFIG`` < environment variables.

Every setting has exactly one environment variable, named ``ECOM_<SECTION>_<FIELD>``
(``ECOM_CATALOG_PORT``, ``ECOM_CART_DATABASE_URL``, ``ECOM_ACTORS_MAILBOX_SIZE``); the settings of the
``general`` section drop the section name (``ECOM_LOG_LEVEL``), and the bus backend is ``ECOM_BUS``.
In the TOML file the same names are ``[section] field = value``.

A bad value raises :class:`ConfigError` whose message is one line naming the setting, so start-up stops
with something a person can act on instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SERVICES: tuple[str, ...] = ("gateway", "identity", "catalog", "cart", "order")
DEFAULT_PORTS = {"gateway": 8000, "identity": 8001, "catalog": 8002, "cart": 8003, "order": 8004}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")  # runtime/logs.py
BUS_BACKENDS = ("memory", "rabbitmq", "azure")


class ConfigError(ValueError):
    """A setting has a value the program cannot use; the message names the setting."""


class StartupError(Exception):
    """Start-up cannot go on for a reason the user can fix (a port in use, a database or broker that does not
    answer); the message is one line naming the cause. ``ecom`` prints it and exits with status 1."""


class _Invalid(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


def _check(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise _Invalid(field, reason)


@dataclass(frozen=True, slots=True)
class GeneralSettings:
    log_level: str = "INFO"
    log_format: str = "json"  # JSON lines with trace and span ids, or "text"
    data_dir: str = "var"
    host: str = "127.0.0.1"
    # Admin actor endpoints: closed unless the caller proves the admin role (identity tokens).
    # ``admin_open = true`` opens them to anyone and is meant only for a local, single-user setup.
    admin_open: bool = False
    # The shop's public base URL: the gateway, the one door for browsers and apps. It is the token issuer
    # (``iss``), and every URL of discovery and of the sign-in pages starts with it. Empty: the gateway's own
    # http://<host>:<gateway port>. Behind a TLS terminator or a load balancer, set it to the outside URL.
    public_url: str = ""
    # The audience every access token must carry (the whole API is one resource server).
    audience: str = "ecom"
    # Password of the admin user created on first run; generated and printed once when empty.
    admin_password: str = ""

    def validate(self) -> None:
        _check(self.log_level.upper() in LOG_LEVELS, "log_level", f"expected one of {', '.join(LOG_LEVELS)}")
        _check(self.log_format.lower() in LOG_FORMATS, "log_format", f"expected one of {', '.join(LOG_FORMATS)}")
        if self.public_url:
            parts = urlsplit(self.public_url)
            _check(
                parts.scheme in ("http", "https") and bool(parts.hostname) and not (parts.query or parts.fragment),
                "public_url",
                "expected an http:// or https:// base URL without query or fragment",
            )
            _check(parts.path in ("", "/"), "public_url", "expected a URL without a path (the gateway serves /)")


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    port: int
    database_url: str = ""  # empty: SQLite file <data_dir>/<service>.db
    # Comma-separated base URLs of the service's instances: the gateway and the services calling this one
    # (cart -> catalog, cart -> order) spread over them and fail over. Empty: the service's own host and port.
    upstreams: str = ""

    def validate(self) -> None:
        _check(0 < self.port < 65536, "port", "expected a TCP port between 1 and 65535")
        if self.database_url:
            problem = database_url_problem(self.database_url)
            _check(problem is None, "database_url", problem or "")


@dataclass(frozen=True, slots=True)
class GatewaySettings(ServiceSettings):
    """The gateway's service settings plus its proxy, health, rate-limit and CORS options."""

    port: int = 8000
    # "fast": gateway.front serves the proxied routes and hands everything else to aiohttp on the same port;
    # "aiohttp": aiohttp's server serves everything (the reference the front's behaviour is tested against)
    front: str = "fast"
    # -- upstream hop
    connect_timeout: float = 2.0  # seconds to open a connection to an upstream instance
    timeout: float = 30.0  # seconds for one attempt: request sent and response head (and a buffered body) back
    retries: int = 2  # extra attempts for idempotent requests (and for any request that never left)
    retry_backoff: float = 0.02  # base of the jittered exponential back-off between attempts, seconds
    pool_size: int = 256  # open connections per upstream instance at most
    keepalive_timeout: float = 30.0  # idle pooled connections older than this are closed (well below the upstream server's own: aiohttp 3.14 keeps an idle connection 3630 s)
    max_body: int = 1024 * 1024  # request bodies larger than this are refused with 413
    buffer_limit: int = 256 * 1024  # bodies up to this size are buffered (one write, replayable); larger stream
    # -- instance health
    health_interval: float = 2.0  # seconds between active GET /health/ready checks of each instance
    health_timeout: float = 2.0
    health_failures: int = 2  # consecutive failed checks that take an instance out (one passing check: back in)
    breaker_failures: int = 5  # consecutive failed attempts that open an instance's circuit breaker
    breaker_cooldown: float = 5.0  # seconds an open breaker waits before letting one probe through
    # -- clients
    rate_limit: float = 50.0  # requests per second per client (token sub, else address); 0 turns limits off
    rate_burst: int = 100  # bucket size: requests a client may send at once
    redis_url: str = ""  # redis://127.0.0.1:6379/0 shares the buckets between gateway processes
    cors_origins: str = ""  # comma-separated allowed browser origins; "*" allows any
    access_log: bool = True  # one JSON line per request on the ecom.access logger
    docs_ttl: float = 60.0  # seconds the merged OpenAPI document is cached

    def validate(self) -> None:
        ServiceSettings.validate(self)
        for name in (
            "connect_timeout",
            "timeout",
            "keepalive_timeout",
            "health_interval",
            "health_timeout",
            "breaker_cooldown",
            "docs_ttl",
        ):
            _check(getattr(self, name) > 0, name, "expected a positive number of seconds")
        _check(self.front in ("fast", "aiohttp"), "front", "expected fast or aiohttp")
        _check(self.retries >= 0, "retries", "expected 0 or more")
        _check(self.retry_backoff >= 0, "retry_backoff", "expected 0 or more seconds")
        for name in ("pool_size", "breaker_failures", "health_failures", "rate_burst", "max_body"):
            _check(getattr(self, name) >= 1, name, "expected at least 1")
        _check(0 <= self.buffer_limit <= self.max_body, "buffer_limit", "expected 0 to max_body bytes")
        _check(self.rate_limit >= 0, "rate_limit", "expected 0 (off) or more requests per second")
        _check(
            not self.redis_url or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "redis_url",
            "expected a redis:// URL",
        )

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())


@dataclass(frozen=True, slots=True)
class BusSettings:
    backend: str = "memory"
    url: str = ""  # RabbitMQ AMQP URL or Azure Service Bus connection string
    namespace: str = ""  # Azure: fully qualified namespace when using an Azure identity instead
    max_attempts: int = 5  # deliveries of one message before it is dead-lettered
    redelivery_delay: float = 1.0  # seconds before a failed message is tried again (lets a blip pass)
    max_concurrent_sessions: int = 64
    partitions: int = 8  # RabbitMQ: partition queues per service queue
    outbox_poll_interval: float = 1.0

    def validate(self) -> None:
        _check(self.backend in BUS_BACKENDS, "backend", f"expected one of {', '.join(BUS_BACKENDS)}")
        _check(self.max_attempts >= 1, "max_attempts", "expected at least 1")
        _check(self.redelivery_delay >= 0, "redelivery_delay", "expected 0 or more seconds")
        _check(self.max_concurrent_sessions >= 1, "max_concurrent_sessions", "expected at least 1")
        _check(self.partitions >= 1, "partitions", "expected at least 1")
        _check(self.outbox_poll_interval > 0, "outbox_poll_interval", "expected a positive number of seconds")


@dataclass(frozen=True, slots=True)
class ActorSettings:
    mailbox_size: int = 1000
    ask_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_activations: int = 100_000
    conflict_retries: int = 5
    reminder_poll_interval: float = 1.0
    group_commit: bool = True
    max_batch: int = 256  # turns committed together at most, with group commit
    inbox_retention: float = 7 * 24 * 3600.0  # seconds a consumed message id is remembered

    def validate(self) -> None:
        for name in ("mailbox_size", "max_activations", "max_batch"):
            _check(getattr(self, name) >= 1, name, "expected at least 1")
        _check(self.conflict_retries >= 0, "conflict_retries", "expected 0 or more")
        for name in ("ask_timeout", "idle_timeout", "reminder_poll_interval", "inbox_retention"):
            _check(getattr(self, name) > 0, name, "expected a positive number of seconds")


# OWASP Password Storage Cheat Sheet, argon2id: (memory KiB, iterations) pairs of equal strength, p = 1.
# A setting is strong enough when it is at or above one of them in both memory and iterations.
OWASP_ARGON2ID: tuple[tuple[int, int], ...] = ((47104, 1), (19456, 2), (12288, 3), (9216, 4), (7168, 5))
_OWASP_TEXT = "m=19456 KiB with t=2, or m=47104/t=1, 12288/t=3, 9216/t=4, 7168/t=5"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Token issuing (identity) and checking (every service, the gateway)."""

    access_token_ttl: int = 900  # seconds
    refresh_token_ttl: int = 30 * 24 * 3600
    signing_alg: str = "ES256"  # chosen by measurement: see bench/identity_crypto.py
    key_max_age: int = 90 * 24 * 3600  # rotate signing keys older than this
    password_grant: bool = True  # first-party `storefront` client only; switch off to force PKCE
    lockout_after: int = 5  # failed logins before an account is locked for a while
    lockout_seconds: float = 30.0  # first lock-out; doubles with every further failure
    jwks_refetch_interval: float = 30.0  # an unknown kid refetches JWKS at most this often
    leeway: float = 30.0  # clock skew allowed on exp/nbf
    registrations_per_email: int = 5  # registrations a minute per email, in identity; 0 turns the limit off
    registrations_per_address: int = 20  # registrations a minute per client address, in identity; 0: off
    # Password hashing (argon2id, identity/passwords.py): OWASP's first option (19 MiB, 2 passes, 1 lane) by
    # default; anything weaker than every row of OWASP's table is refused. Stored hashes made with other
    # parameters are re-hashed at the user's next successful sign-in.
    argon2_memory_kib: int = 19 * 1024
    argon2_time_cost: int = 2
    argon2_parallelism: int = 1
    password_workers: int = 0  # argon2 threads at once; 0: one per core (at most 4)
    password_queue: int = 64  # sign-ins waiting for an argon2 thread (~0.8 s on 2 cores); more: 503 + Retry-After

    def validate(self) -> None:
        _check(self.access_token_ttl >= 30, "access_token_ttl", "expected at least 30 seconds")
        _check(self.refresh_token_ttl >= 60, "refresh_token_ttl", "expected at least 60 seconds")
        _check(self.signing_alg in ("ES256", "Ed25519", "RS256"), "signing_alg", "expected ES256, Ed25519 or RS256")
        _check(self.key_max_age >= 3600, "key_max_age", "expected at least 3600 seconds")
        _check(self.lockout_after >= 1, "lockout_after", "expected at least 1")
        _check(self.lockout_seconds > 0, "lockout_seconds", "expected a positive number of seconds")
        _check(self.jwks_refetch_interval > 0, "jwks_refetch_interval", "expected a positive number of seconds")
        _check(0 <= self.leeway <= 300, "leeway", "expected 0 to 300 seconds")
        for name in ("registrations_per_email", "registrations_per_address"):
            _check(getattr(self, name) >= 0, name, "expected 0 (no limit) or more")
        _check(1 <= self.argon2_parallelism <= 64, "argon2_parallelism", "expected 1 to 64 lanes")
        _check(self.argon2_memory_kib <= 4 * 1024 * 1024, "argon2_memory_kib", "expected at most 4 GiB (4194304)")
        if not any(self.argon2_memory_kib >= m and self.argon2_time_cost >= t for m, t in OWASP_ARGON2ID):
            field = "argon2_time_cost" if self.argon2_memory_kib >= OWASP_ARGON2ID[1][0] else "argon2_memory_kib"
            _check(False, field, f"weaker than OWASP's argon2id minimum ({_OWASP_TEXT})")
        _check(0 <= self.password_workers <= 64, "password_workers", "expected 0 (one per core) to 64")
        _check(self.password_queue >= 0, "password_queue", "expected 0 or more")


@dataclass(frozen=True, slots=True)
class ShopSettings:
    """Business rules of the shop that operators tune."""

    cart_expiry: float = 30 * 24 * 3600.0  # seconds an unchanged cart lives
    payment_timeout: float = 300.0  # seconds a payment may take before the order is cancelled
    validation_timeout: float = 900.0  # seconds from checkout until every line is reserved, else cancelled
    retry_interval: float = 30.0  # first saga re-send of a message presumed lost; doubles (with jitter) per try
    retry_max_interval: float = 300.0  # cap of the saga's re-send back-off
    max_open_orders: int = 5000  # admission: checkout answers 503 while more orders than this are in the saga
    max_outbox_backlog: int = 20000  # admission: checkout answers 503 while more messages than this wait to leave

    def validate(self) -> None:
        for name in ("cart_expiry", "payment_timeout", "validation_timeout", "retry_interval", "retry_max_interval"):
            _check(getattr(self, name) > 0, name, "expected a positive number of seconds")
        _check(self.retry_max_interval >= self.retry_interval, "retry_max_interval", "expected at least retry_interval")
        for name in ("max_open_orders", "max_outbox_backlog"):
            _check(getattr(self, name) >= 1, name, "expected at least 1")


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Several instances of one service: membership, placement of entities, forwarding to the owner."""

    enabled: str = "auto"  # "auto": on unless the bus is the in-memory one (which cannot span processes)
    heartbeat_interval: float = 1.0  # seconds between a member's heartbeats in the membership table
    member_timeout: float = 5.0  # a member whose heartbeat is older than this is declared dead
    advertise_url: str = ""  # how peers and the gateway reach this instance; default http://<host>:<port>

    def validate(self) -> None:
        _check(self.enabled in ("auto", "true", "false"), "enabled", "expected auto, true or false")
        _check(self.heartbeat_interval > 0, "heartbeat_interval", "expected a positive number of seconds")
        _check(
            self.member_timeout >= 2 * self.heartbeat_interval,
            "member_timeout",
            "expected at least two heartbeat intervals",
        )

    def active(self, bus_backend: str) -> bool:
        return self.enabled == "true" or (self.enabled == "auto" and bus_backend != "memory")


DATABASE_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg", "mssql": "aioodbc"}


def database_url_problem(url: str) -> str | None:
    """None if ``url`` is a database URL the runtime can open, else why not (one line, no password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    expected = "expected sqlite+aiosqlite:///<file>, postgresql+asyncpg://<user>@<host>/<db> or mssql+aioodbc://…"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return f"not a database URL: {expected}"
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in DATABASE_DRIVERS:
        return f"unsupported database {backend!r}: {expected}"
    if driver != DATABASE_DRIVERS[backend]:
        return f"{backend} needs the async driver: use {backend}+{DATABASE_DRIVERS[backend]}://"
    return None


def _default_services() -> dict[str, ServiceSettings]:
    return {
        name: (GatewaySettings if name == "gateway" else ServiceSettings)(port=port)
        for name, port in DEFAULT_PORTS.items()
    }


@dataclass(frozen=True, slots=True)
class Settings:
    general: GeneralSettings = field(default_factory=GeneralSettings)
    bus: BusSettings = field(default_factory=BusSettings)
    actors: ActorSettings = field(default_factory=ActorSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    shop: ShopSettings = field(default_factory=ShopSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    services: Mapping[str, ServiceSettings] = field(default_factory=_default_services)

    def service(self, name: str) -> ServiceSettings:
        return self.services[name]

    def database_url(self, service: str) -> str:
        svc = self.services.get(service)
        url = svc.database_url if svc is not None else ""
        return url or f"sqlite+aiosqlite:///{Path(self.general.data_dir) / (service + '.db')}"

    def base_url(self, service: str) -> str:
        return f"http://{self.general.host}:{self.services[service].port}"

    @property
    def public_url(self) -> str:
        """The shop's public base URL (the gateway), without a trailing slash."""
        return (self.general.public_url or self.base_url("gateway")).rstrip("/")

    @property
    def issuer(self) -> str:
        """The token issuer: the public URL, so discovery is at ``<issuer>/.well-known/openid-configuration``
        through the gateway (OpenID Connect Discovery §4) and ``iss`` names the door clients use."""
        return self.public_url

    @property
    def jwks_url(self) -> str:
        """Where services and the gateway fetch identity's signing keys: identity itself, on the internal
        network (its first upstream, else its own host and port), not the public URL. The gateway verifies
        tokens with these keys, so fetching them through the gateway would make it depend on itself; the
        fetches would also share the public rate-limit buckets of the caller's address and wait on the
        gateway's start. The keys are the same either way; ``iss`` is still compared with the public URL."""
        first = self.services["identity"].upstreams.split(",")[0].strip().rstrip("/")
        return f"{first or self.base_url('identity')}/.well-known/jwks.json"

    def replace(self, **sections: Any) -> Settings:
        return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------------------------------------------
# Loading


def env_name(section: str, name: str) -> str:
    if section == "general":
        return f"ECOM_{name.upper()}"
    if section == "bus" and name == "backend":
        return "ECOM_BUS"
    return f"ECOM_{section.upper()}_{name.upper()}"


def _convert(raw: Any, kind: Any) -> Any:
    """Turn a TOML value or an environment string into ``kind``; raise ValueError with a reason."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is int:
        if isinstance(raw, bool):
            raise ValueError("expected an integer")
        try:
            return int(str(raw).strip()) if not isinstance(raw, int) else raw
        except ValueError:
            raise ValueError("expected an integer") from None
    if kind is float:
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        try:
            return float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    if kind is str:
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw
    raise TypeError(f"unsupported setting type {kind!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, section: str, base: Any, toml: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    values: dict[str, Any] = {}
    types_ = _field_types(cls)
    unknown = set(toml) - set(types_)
    if unknown:
        name = min(unknown)
        renamed = RENAMED.get(env_name(section, name))
        raise ConfigError(f"[{section}] {name}: " + (f"replaced by {renamed}" if renamed else "unknown setting"))
    for name, kind in types_.items():
        var = env_name(section, name)
        source, raw = None, None
        if var in env:
            source, raw = var, env[var]
        elif name in toml:
            source, raw = f"[{section}] {name}", toml[name]
        if source is None:
            continue
        try:
            values[name] = _convert(raw, kind)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}, got {raw!r}") from None
    result = dataclasses.replace(base, **values)
    try:
        result.validate()
    except _Invalid as exc:
        var = env_name(section, exc.field)
        where = var if var in env else f"[{section}] {exc.field}"
        got = getattr(result, exc.field)
        if exc.field == "database_url":
            got = _hide_password(got)
        raise ConfigError(f"{where}: {exc}, got {got!r}") from None
    return result


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not parseable: show only the scheme
        return url.partition("://")[0] + "://…" if "://" in url else url


SECTIONS: dict[str, type] = {
    "general": GeneralSettings,
    "bus": BusSettings,
    "actors": ActorSettings,
    "auth": AuthSettings,
    "shop": ShopSettings,
    "cluster": ClusterSettings,
    **{name: GatewaySettings if name == "gateway" else ServiceSettings for name in SERVICES},
}

# ECOM_* variables read outside the settings: the TOML file, identity's key-encryption key file, the admin token
# of `ecom bus dead-letters` (runtime/cli_deadletters.py), the chaos switch of the fault tests; ``ECOM_TEST_*``
# variables belong to the test suite (tests/conftest.py), ``ECOM_BENCH_*`` to the benchmarks (bench/report.py).
OTHER_VARIABLES = frozenset({"ECOM_CONFIG", "ECOM_IDENTITY_KEK_FILE", "ECOM_CHAOS", "ECOM_ADMIN_TOKEN"})
# Settings that were replaced: the old name is refused with the new one named (not a guess by spelling).
RENAMED = {"ECOM_ISSUER": "ECOM_PUBLIC_URL ([general] public_url): the gateway's public URL is the issuer now"}
OTHER_PREFIXES = ("ECOM_TEST_", "ECOM_BENCH_")


def setting_variables() -> frozenset[str]:
    """Every ``ECOM_*`` variable a setting reads (built from the dataclasses)."""
    return frozenset(env_name(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls))


def known_variables() -> frozenset[str]:
    return setting_variables() | OTHER_VARIABLES


def check_variables(env: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` naming the first ``ECOM_*`` variable nothing reads (with the closest valid name)."""
    known = known_variables()
    for var in sorted(env):
        if not var.startswith("ECOM_") or var in known or var.startswith(OTHER_PREFIXES):
            continue
        if var in RENAMED:
            raise ConfigError(f"{var}: replaced by {RENAMED[var]}")
        close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else "; see the settings table in README.md"
        raise ConfigError(f"{var}: unknown setting{hint}")


def load_settings(env: Mapping[str, str] | None = None, config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings; raise :class:`ConfigError` (one line, names the setting) on any bad value."""
    env = os.environ if env is None else env
    check_variables(env)
    path = config_file if config_file is not None else env.get("ECOM_CONFIG")
    toml: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                toml = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"ECOM_CONFIG: file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"ECOM_CONFIG: {path} is not valid TOML: {exc}") from None
    for key in toml:
        if key not in SECTIONS or not isinstance(toml[key], dict):
            raise ConfigError(f"ECOM_CONFIG: unknown section [{key}] in {path}")
    defaults = Settings()
    general = _build(GeneralSettings, "general", defaults.general, toml.get("general", {}), env)
    bus = _build(BusSettings, "bus", defaults.bus, toml.get("bus", {}), env)
    actors = _build(ActorSettings, "actors", defaults.actors, toml.get("actors", {}), env)
    auth = _build(AuthSettings, "auth", defaults.auth, toml.get("auth", {}), env)
    shop = _build(ShopSettings, "shop", defaults.shop, toml.get("shop", {}), env)
    cluster = _build(ClusterSettings, "cluster", defaults.cluster, toml.get("cluster", {}), env)
    services = {
        name: _build(type(defaults.services[name]), name, defaults.services[name], toml.get(name, {}), env)
        for name in SERVICES
    }
    ports: dict[int, str] = {}
    for name, svc in services.items():
        if svc.port in ports:
            raise ConfigError(f"{env_name(name, 'port')}: port {svc.port} is already used by {ports[svc.port]}")
        ports[svc.port] = name
    return Settings(
        general=general,
        bus=bus,
        actors=actors,
        auth=auth,
        shop=shop,
        cluster=cluster,
        services=types.MappingProxyType(services),
    )
