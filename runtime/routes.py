"""The route table's vocabulary: which service serves a path, who may call it, and which requests name one entity.

A :class:`Route` is a path prefix owned by one service. Its :class:`Rule` list is tried in order against the
method and the rest of the path (the *tail*, ``""`` or ``"/..."``); the first match decides

* the :class:`Access` policy: ``PUBLIC`` (not checked here: identity's own endpoints, which take client
  credentials in ``Authorization``), ``OPTIONAL`` (a token is verified when one is sent), or a required token with
  roles and/or scopes (``CUSTOMER``, ``ADMIN``: either role and the ``ecom`` API scope; :func:`scopes`);
* the affinity key: ``SUB`` (the token's subject: a customer's cart), ``PATH`` (the rule's ``key`` group: an
  order or product id), or none (balanced). Requests with a key always go to the instance that owns it on the
  hash ring, so each actor lives in one process.

A path under a prefix that no rule matches is refused at the gateway (404): new endpoints get a policy before
they are reachable.

This module holds the vocabulary, shared by the gateway (which routes and checks by it) and the services'
instances (which forward a request naming an entity to its owner by it: :func:`runtime.cluster.route_key_of`).
Each service declares its own entries next to its code, in a light ``public.py`` (``actors/cart/public.py``:
``ROUTES``); :data:`gateway.routes.ROUTES` is their union in service order.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field


class Kind(enum.Enum):
    PUBLIC = "public"
    OPTIONAL = "optional"
    TOKEN = "token"


@dataclass(frozen=True, slots=True)
class Access:
    kind: Kind
    roles: tuple[str, ...] = ()  # any one of them
    scopes: tuple[str, ...] = ()  # all of them

    @property
    def checks_claims(self) -> bool:
        return bool(self.roles or self.scopes)


PUBLIC = Access(Kind.PUBLIC)
OPTIONAL = Access(Kind.OPTIONAL)
AUTHENTICATED = Access(Kind.TOKEN)
API_SCOPE = "ecom"  # the scope of the shop's API: first-party tokens carry it (identity grants it)
# As the services' own CUSTOMER requirement, plus the API scope: a token lacking it gets 403 insufficient_scope.
CUSTOMER = Access(Kind.TOKEN, roles=("customer", "admin"), scopes=(API_SCOPE,))
ADMIN = Access(Kind.TOKEN, roles=("admin",), scopes=(API_SCOPE,))


def scopes(*names: str, roles: Collection[str] = ()) -> Access:
    """A required token carrying every one of ``names`` (and one of ``roles`` when given)."""
    return Access(Kind.TOKEN, roles=tuple(roles), scopes=tuple(names))


class Affinity(enum.Enum):
    NONE = "none"
    SUB = "sub"
    PATH = "path"


READS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY_TAIL = r"(/.*)?"


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: re.Pattern[str]
    access: Access
    methods: frozenset[str] | None = None  # None: every method
    affinity: Affinity = Affinity.NONE


def rule(
    pattern: str,
    access: Access,
    *,
    methods: Iterable[str] | None = None,
    affinity: Affinity = Affinity.NONE,
) -> Rule:
    compiled = re.compile(pattern)
    if affinity is Affinity.PATH and "key" not in compiled.groupindex:
        raise ValueError(f"rule {pattern!r}: PATH affinity needs a (?P<key>...) group")
    if affinity is Affinity.SUB and access.kind is not Kind.TOKEN:
        raise ValueError(f"rule {pattern!r}: SUB affinity needs a required token")
    return Rule(compiled, access, frozenset(m.upper() for m in methods) if methods is not None else None, affinity)


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str  # "/api/catalog": matches "/api/catalog" and "/api/catalog/...", never "/api/catalogue"
    service: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def resolve(self, method: str, tail: str) -> tuple[Rule, re.Match[str]] | None:
        for r in self.rules:
            if r.methods is not None and method not in r.methods:
                continue
            m = r.pattern.fullmatch(tail)
            if m is not None:
                return r, m
        return None


def admin_rules() -> tuple[Rule, ...]:
    """The host's admin actor endpoints: admin only; one actor's page goes to the process that holds the actor."""
    return (
        rule(r"/admin/actors/[^/]+/(?P<key>[^/]+)", ADMIN, affinity=Affinity.PATH),
        rule(r"/admin(/.*)?", ADMIN),
    )


def services_of(routes: Sequence[Route]) -> list[str]:
    """Service names in table order, each once."""
    return list(dict.fromkeys(r.service for r in routes))
