"""One declaration per API route: its inputs, its answers, who may call it. Handlers get typed, validated input.

    @endpoint(
        PutItem,                                   # frozen dataclass the handler receives
        tags=["cart"], summary="Set the quantity of a product",
        path=ProductPath, body=QuantitySchema,     # marshmallow schemas, per location
        responses={200: CartSchema},
        auth=Auth(roles=("customer", "admin")),
        problems=(409,),                           # beyond the standard ones (see below)
    )
    async def put_item(request: web.Request, put: PutItem) -> web.Response: ...

The declaration is registered with aiohttp-apispec (its ``docs`` and ``*_schema`` decorators), so the OpenAPI
document is built from the same schemas that validate. The adapter validates every declared location
(path, query, headers, JSON body or form), answers a 422 problem naming each bad field (or 415/400 for a body that
is not JSON), and calls the handler with an instance of the input dataclass. Its fields are filled by name from the
validated locations; a field named ``body``/``query``/``path``/``headers``/``form`` gets that location's whole
validated mapping (a PATCH's changes), and a field named ``principal`` gets the caller's verified
:class:`~runtime.auth.Principal` (routes with ``auth``). Unknown body, query and form fields are ignored, as the
documents (no ``additionalProperties: false``) allow them.

Every operation documents, besides its own responses, the problem+json answers the host can give it: 422 when it
has inputs; 400, 413 and 415 when it takes a body; 401 and 403 when it needs a token; 404 when its path names an
entity; 503 with ``Retry-After`` always (a full mailbox, a dependency down, shutting down); and whatever else
``problems`` lists (409, 429 with ``Retry-After``, ...).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web
from aiohttp_apispec import (
    docs,
    form_schema,
    headers_schema,
    json_schema,
    match_info_schema,
    querystring_schema,
)
from marshmallow import EXCLUDE, Schema, ValidationError, fields
from marshmallow.utils import missing

from runtime.auth import authenticate, require
from runtime.errors import Problem, ValidationProblem
from runtime.web.middlewares import flatten_errors
from runtime.web.responses import PROBLEM_JSON, parse_json_body

__all__ = ["JSON", "Auth", "ProblemSchema", "Reply", "endpoint", "problem_responses"]

JSON = "application/json"
MIN_PROPERTIES = "x-body-min-properties"
FORM = "application/x-www-form-urlencoded"
_BODY_TYPES = (JSON, "application/octet-stream")  # octet-stream: clients that send JSON without saying so

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOCATIONS = ("path", "query", "headers", "body", "form")


@dataclasses.dataclass(frozen=True, slots=True)
class Auth:
    """A bearer token with one of ``roles`` (any) and every scope in ``scopes``; ``api`` adds the shop's API
    scope, as :func:`runtime.auth.require` does."""

    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    api: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A documented answer: its schema (None: no body), description and headers (Swagger 2 header objects)."""

    schema: type[Schema] | Schema | None = None
    description: str = ""
    headers: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


class ProblemErrorSchema(Schema):
    field = fields.String(metadata={"description": "dotted path of the field, e.g. lines.0.quantity"})
    message = fields.String()


class ProblemSchema(Schema):
    """RFC 9457 problem details, as every error of this API is answered (``application/problem+json``)."""

    type = fields.String(metadata={"description": "stable URI of the problem type"})
    title = fields.String()
    status = fields.Integer()
    detail = fields.String(metadata={"description": "what went wrong and what to do about it"})
    instance = fields.String(metadata={"description": "the request path"})
    errors = fields.List(fields.Nested(ProblemErrorSchema), metadata={"description": "422: each invalid field and why"})


RETRY_AFTER = {"Retry-After": {"type": "integer", "description": "seconds to wait before retrying"}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"type": "string", "description": "Bearer challenge (RFC 6750)"}}

_PROBLEMS: dict[int, Reply] = {
    400: Reply(ProblemSchema, "the body is not valid JSON (or not UTF-8, or nested too deeply)"),
    401: Reply(ProblemSchema, "no valid bearer token", WWW_AUTHENTICATE),
    403: Reply(ProblemSchema, "the token lacks a role or scope this route needs", WWW_AUTHENTICATE),
    404: Reply(ProblemSchema, "the entity the path names does not exist"),
    409: Reply(ProblemSchema, "the request conflicts with the entity's current state"),
    412: Reply(ProblemSchema, "a precondition failed"),
    413: Reply(ProblemSchema, "the body is larger than the service accepts"),
    415: Reply(ProblemSchema, "the body is not of a media type this route reads"),
    422: Reply(ProblemSchema, "invalid input: `errors` names each field (body, query, path or header) and why"),
    429: Reply(ProblemSchema, "too many requests; retry after Retry-After seconds", RETRY_AFTER),
    503: Reply(
        ProblemSchema,
        "overloaded, a dependency is unavailable, or shutting down; nothing was changed; retry after Retry-After",
        RETRY_AFTER,
    ),
}


def problem_responses(
    *, inputs: bool, body: bool, auth: bool, entity: bool, extra: Iterable[int] = ()
) -> dict[int, Reply]:
    """The problem answers of an operation with these traits (see the module docstring)."""
    codes = {503, *extra}
    if inputs:
        codes.add(422)
    if body:
        codes |= {400, 413, 415}
    if auth:
        codes |= {401, 403}
    if entity:
        codes.add(404)
    return {code: _PROBLEMS[code] for code in sorted(codes)}


# ---------------------------------------------------------------------------------------------------
# Reading and validating


def _instance(schema: type[Schema] | Schema) -> Schema:
    return schema() if isinstance(schema, type) else schema


def _wire_names(schema: Schema) -> dict[str, fields.Field]:
    return {field.data_key or name: field for name, field in schema.fields.items()}


class _Loader:
    """``schema.load(data, unknown=EXCLUDE)``, with marshmallow's machinery skipped when it has nothing to do.

    For a schema without hooks (``pre_load``, ``validates``, ``post_load``...), ``many`` or ``partial``, a valid
    input is loaded by calling each field's own ``deserialize`` (its type, ``required``, ``load_default`` and
    validators) exactly as :meth:`Schema.load` does, but without its error store, processors and per-field
    closures: a third of the cost. Any :class:`ValidationError` sends the input to ``schema.load`` itself, so an
    invalid input is answered word for word as marshmallow answers it."""

    __slots__ = ("fast", "schema", "wire")

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.wire = _wire_names(schema)  # by wire name, for picking a location's values
        self.fast: tuple[tuple[str, str, fields.Field], ...] | None = _fast_plan(schema)

    def load(self, data: Mapping[str, Any]) -> Any:
        if self.fast is not None:
            out: dict[str, Any] = {}
            try:
                for key, name, field in self.fast:
                    value = field.deserialize(data.get(name, missing), name, data, partial=False)
                    if value is not missing:
                        out[key] = value
                return out
            except ValidationError:
                pass  # marshmallow's own load names every failing field, as it always did
        return self.schema.load(data, unknown=EXCLUDE)

    def pick(self, source: Mapping[str, str], getall: Callable[[str], list[str]] | None) -> dict[str, Any]:
        """The values of ``source`` for the schema's fields only (by wire name); lists for ``List`` fields."""
        out: dict[str, Any] = {}
        for name, field in self.wire.items():
            if name not in source:
                continue
            out[name] = getall(name) if getall is not None and isinstance(field, fields.List) else source[name]
        return out


def _fast_plan(schema: Schema) -> tuple[tuple[str, str, fields.Field], ...] | None:
    """(output key, wire name, field) per loaded field, or None when the schema needs marshmallow's whole load."""
    if schema.many or schema.partial or any(schema._hooks.values()):
        return None
    plan = []
    for attr, field in schema.load_fields.items():
        key = field.attribute or attr
        if "." in key:  # marshmallow nests a dotted attribute: leave that to it
            return None
        plan.append((key, field.data_key if field.data_key is not None else attr, field))
    return tuple(plan)


def _load(loader: _Loader, data: Any, location: str, errors: dict[str, Any]) -> dict[str, Any]:
    try:
        loaded = loader.load(data)
    except ValidationError as exc:
        messages = exc.messages
        if isinstance(messages, Mapping):
            if location == "headers":  # name the header as sent, not the attribute
                wire = {attr: f.data_key or attr for attr, f in loader.schema.fields.items()}
                messages = {wire.get(str(k), k): v for k, v in messages.items()}
            errors.update(messages)
        else:
            errors["body" if location == "body" else location] = messages
        return {}
    return loaded if type(loaded) is dict else dict(loaded) if isinstance(loaded, Mapping) else {"value": loaded}


async def _json_body(request: web.Request) -> Any:
    if request.content_type not in _BODY_TYPES:
        raise Problem(
            f"the body must be application/json, not {request.content_type}",
            status=415,
            slug="unsupported-media-type",
            title="Unsupported Media Type",
        )
    raw = await request.read()
    return parse_json_body(raw) if raw else {}


async def _form_body(request: web.Request) -> Mapping[str, str]:
    if request.content_type not in (FORM, "multipart/form-data"):
        raise Problem(
            f"the body must be {FORM}, not {request.content_type}",
            status=415,
            slug="unsupported-media-type",
            title="Unsupported Media Type",
        )
    return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}


# How the input dataclass takes a field: a location's whole mapping, the principal, or one value by name.
_WHOLE, _PRINCIPAL, _VALUE = 0, 1, 2


class _Inputs:
    """The schemas of one endpoint, by location, and how to build its input dataclass (both worked out once,
    when the endpoint is declared)."""

    __slots__ = ("loaders", "model", "plan")

    def __init__(self, schemas: Mapping[str, Schema], model: type[Any] | None) -> None:
        self.loaders = tuple((location, _Loader(schema)) for location, schema in schemas.items())
        self.model = model
        plan: list[tuple[str, int]] = []
        for f in dataclasses.fields(model) if model is not None else ():
            if f.name in LOCATIONS and f.name in schemas:
                plan.append((f.name, _WHOLE))
            elif f.name == "principal":
                plan.append((f.name, _PRINCIPAL))
            else:
                plan.append((f.name, _VALUE))
        self.plan = tuple(plan)

    async def read(self, request: web.Request) -> Any:
        errors: dict[str, Any] = {}
        values: dict[str, dict[str, Any]] = {}
        for location, loader in self.loaders:
            if location == "path":
                raw: Any = loader.pick(request.match_info, None)
            elif location == "query":
                query = request.query
                raw = loader.pick(query, query.getall) if query else {}
            elif location == "headers":
                headers = request.headers
                raw = loader.pick(headers, headers.getall)
            elif location == "form":
                raw = loader.pick(await _form_body(request), None)
            else:
                raw = await _json_body(request)
                if not isinstance(raw, dict):
                    errors["body"] = "must be a JSON object"
                    continue
            values[location] = _load(loader, raw, location, errors)
        if errors:
            raise ValidationProblem(flatten_errors(errors) or {"body": "invalid"})
        if self.model is None:
            return None
        merged: dict[str, Any] = {}
        for location in LOCATIONS:
            found = values.get(location)
            if found:
                merged.update(found)
        args: dict[str, Any] = {}
        for name, how in self.plan:
            if how == _WHOLE:
                args[name] = values[name]
            elif how == _PRINCIPAL:
                args[name] = await authenticate(request)
            elif name in merged:
                args[name] = merged[name]
        return self.model(**args)


def _check_model(model: type[Any], schemas: Mapping[str, Schema], auth: Auth | None) -> None:
    """Fail at import, not at the first request, when the dataclass asks for a value no declaration supplies."""
    if not dataclasses.is_dataclass(model):
        raise TypeError(f"{model.__name__} must be a dataclass")
    supplied = {"principal"} if auth is not None else set()
    for location, schema in schemas.items():
        supplied.add(location)
        supplied |= set(schema.fields)
    for f in dataclasses.fields(model):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in supplied and required:
            raise TypeError(f"{model.__name__}.{f.name} is not supplied by any declared input of the endpoint")


# ---------------------------------------------------------------------------------------------------
# The decorator

_DOC_DECORATORS = {
    "path": match_info_schema,
    "query": querystring_schema,
    "headers": headers_schema,
    "body": json_schema,
    "form": form_schema,
}


def endpoint(
    model: type[Any] | None = None,
    *,
    tags: Sequence[str],
    summary: str,
    description: str = "",
    path: type[Schema] | None = None,
    query: type[Schema] | None = None,
    headers: type[Schema] | None = None,
    body: type[Schema] | None = None,
    form: type[Schema] | None = None,
    read_by_handler: bool = False,
    body_min_properties: int = 0,
    responses: Mapping[int, type[Schema] | Schema | Reply | str],
    auth: Auth | None = None,
    problems: Iterable[int] = (),
    produces: Sequence[str] = (JSON,),
) -> Callable[[Callable[..., Awaitable[web.StreamResponse]]], Handler]:
    """Declare an API route; see the module docstring.

    ``read_by_handler``: the query and form are documented here but read by the handler's own protocol code (the
    OAuth/OIDC endpoints, whose errors RFC 6749 and OIDC define); the adapter does not validate them.
    ``body_min_properties``: the document's ``minProperties`` of the body (a PATCH needs a field; the handler
    still checks). ``produces``: the media types of the route's successful answers; problem+json is added."""
    declared: dict[str, type[Schema]] = {
        k: v for k, v in (("path", path), ("query", query), ("headers", headers), ("body", body), ("form", form)) if v
    }
    validated = {k: _instance(v) for k, v in declared.items() if not (k in ("query", "form") and read_by_handler)}
    if model is not None:
        _check_model(model, validated, auth)
    inputs = _Inputs(validated, model)
    takes_body = body is not None or form is not None
    answers: dict[int, Reply] = {
        **problem_responses(
            inputs=bool(validated), body=takes_body, auth=auth is not None, entity=path is not None, extra=problems
        ),
        **{code: _reply(r) for code, r in responses.items()},
    }

    def decorate(handler: Callable[..., Awaitable[web.StreamResponse]]) -> Handler:
        @functools.wraps(handler)
        async def run(request: web.Request) -> web.StreamResponse:
            value = await inputs.read(request)
            return await (handler(request) if model is None else handler(request, value))

        wrapped: Handler = run
        if auth is not None:
            wrapped = require(roles=auth.roles, scopes=auth.scopes, api=auth.api)(wrapped)
        wrapped.__endpoint__ = True  # type: ignore[attr-defined]  # marks routes the legacy validation skips
        # aiohttp-apispec: inputs first (their decorators create __apispec__), then the answers and the rest
        for location, schema in declared.items():
            wrapped = _DOC_DECORATORS[location](schema, required=location == "body")(wrapped)
        extra: dict[str, Any] = {}
        for code, reply in answers.items():
            entry: dict[str, Any] = {"description": reply.description or _default_description(code)}
            if reply.headers:
                entry["headers"] = dict(reply.headers)
            if reply.schema is not None:
                entry["schema"] = _instance(reply.schema)
            extra[str(code)] = entry
        media = list(dict.fromkeys([*produces, PROBLEM_JSON]))
        options: dict[str, Any] = {"tags": list(tags), "summary": summary, "produces": media, "responses": extra}
        if description:
            options["description"] = description
        if body is not None:
            options["consumes"] = [JSON]
        elif form is not None:
            options["consumes"] = [FORM]
        if auth is not None:
            options["security"] = [{"bearer": []}]
        if body_min_properties:
            options[MIN_PROPERTIES] = body_min_properties  # applied to the body parameter by runtime.web.apidocs
        documented: Handler = docs(**options)(wrapped)
        return documented

    return decorate


def _reply(declared: type[Schema] | Schema | Reply | str) -> Reply:
    if isinstance(declared, Reply):
        return declared
    if isinstance(declared, str):
        return Reply(None, declared)
    return Reply(declared)


def _default_description(code: int) -> str:
    return {200: "OK", 201: "created", 202: "accepted", 204: "done; no body", 302: "redirect", 303: "redirect"}.get(
        code, str(code)
    )
