"""Typed tool requests: one pydantic model per tool, every bound and choice declared once, in its field.

A tool's published input schema is its request model's schema, so an agent sees the bounds and choices.
The MCP SDK only checks that the required arguments are there; the request model checks the rest, so a
bad argument is reported in the project's words (field, bad value, allowed values) together with every
other problem the tool finds, instead of alone.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, PrivateAttr, ValidationError

from llm_mcp.core.errors import InvalidArgumentError

RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _lower_case(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def choice(*values: str) -> Any:
    """An enum argument that also accepts other letter cases ('LoRA' for 'lora'): the schema lists `values`."""
    return Annotated[Literal[values], BeforeValidator(_lower_case)]  # type: ignore[valid-type]


class Request(BaseModel):
    """A tool's arguments. `parse` turns the raw arguments into the request and the problems with them."""

    model_config = ConfigDict(extra="forbid")
    # True: the tool reports bad arguments together with the problems its own checks find (a bad argument then
    # counts as not given); False: bad arguments are refused before the tool runs.
    deferred_problems: ClassVar[bool] = False
    # Fields that name a file or folder of the user's: outside the allowed roots, the tool asks the user to
    # allow its folder (llm_mcp.tools.common), where the client can be asked.
    path_fields: ClassVar[tuple[str, ...]] = ()
    _problems: list[str] = PrivateAttr(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """The argument problems `parse` found (only ever non-empty for deferred_problems requests)."""
        return self._problems

    def check(self) -> list[str]:
        """Problems between arguments that need nothing but the request (e.g. 'give one of a or b')."""
        return []

    @classmethod
    def parse(cls, args: dict[str, Any], tool: str) -> Self:
        """The typed request.

        Raises:
            InvalidArgumentError: bad arguments (all of them), unless the request defers them to the tool.
        """
        given = {k: v for k, v in args.items() if v is not None}
        problems: list[str] = []
        try:
            request = cls.model_validate(given)
        except ValidationError as exc:
            problems = describe_errors(cls.model_json_schema(), exc)
            bad = {e["loc"][0] for e in exc.errors() if e["loc"]}
            try:
                request = cls.model_validate({k: v for k, v in given.items() if k not in bad})
            except ValidationError:  # a required argument is bad: nothing to go on
                raise InvalidArgumentError(_with_next_step(problems, tool)) from None
        problems += request.check()
        if problems and not cls.deferred_problems:
            raise InvalidArgumentError(_with_next_step(problems, tool))
        request._problems = problems
        return request

    @classmethod
    def tool_parameters(cls) -> list[tuple[str, Any, Any, str]]:
        """(name, loose annotation, default, description) of each field, for the tool function's signature: the
        SDK checks presence and JSON shape only; `parse` checks the rest."""
        out = []
        for name, field in cls.model_fields.items():
            default = ... if field.is_required() else field.get_default(call_default_factory=True)
            out.append((name, loose(field.annotation), default, field.description or ""))
        return out


def loose(annotation: Any) -> Any:
    """`annotation` without its bounds, choices and nested models: what the SDK's argument check accepts."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return loose(get_args(annotation)[0])
    if origin is Literal:
        return str
    if origin in (Union, types.UnionType):
        return Union[tuple(loose(a) for a in get_args(annotation))]  # noqa: UP007
    if origin is list:
        return list[loose(get_args(annotation)[0])]  # type: ignore[misc]
    if origin is dict:
        return dict
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return dict
    return annotation


def _with_next_step(problems: list[str], tool: str) -> list[str]:
    return [
        *problems[:-1],
        f"{problems[-1]}\nFix the argument{'s' if len(problems) > 1 else ''} and call {tool} again.",
    ]


def _property(schema: dict[str, Any], loc: tuple[Any, ...]) -> dict[str, Any]:
    """The JSON-schema property at a pydantic error location (through $ref, anyOf and array items)."""
    defs = schema.get("$defs", {})
    node: dict[str, Any] = schema
    for key in loc:
        node = _deref(node, defs)
        if isinstance(key, int):
            node = node.get("items") or next(
                (o["items"] for o in (_deref(o, defs) for o in node.get("anyOf", [])) if "items" in o), {}
            )
            continue
        props: dict[str, Any] = node.get("properties") or next(  # type: ignore[assignment]
            (o.get("properties") for o in (_deref(o, defs) for o in node.get("anyOf", [])) if "properties" in o), {}
        )
        node = props.get(key, {})
    return _deref(node, defs)


def _deref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return defs.get(node["$ref"].rsplit("/", 1)[-1], {})
    return node


def allowed(prop: dict[str, Any]) -> str:
    """What a JSON-schema property accepts, in words."""
    options = [prop, *prop.get("anyOf", [])]
    enums = [v for o in options for v in o.get("enum", [])] + [o["const"] for o in options if "const" in o]
    if enums:
        return f"one of {enums}"
    for o in options:
        lo = o.get("minimum", o.get("exclusiveMinimum"))
        hi = o.get("maximum", o.get("exclusiveMaximum"))
        if lo is not None or hi is not None:
            kind = "an integer" if o.get("type") == "integer" else "a number"
            return f"{kind} from {lo if lo is not None else '-inf'} to {hi if hi is not None else 'inf'}"
        if "maxLength" in o:
            return f"a string of at most {o['maxLength']} characters"
        if "pattern" in o:
            return f"a string matching {o['pattern']}"
    types_ = [o["type"] for o in options if "type" in o and o["type"] != "null"]
    return " or ".join(types_) or "see the tool's schema"


def describe_errors(schema: dict[str, Any], exc: ValidationError) -> list[str]:
    """Pydantic's errors in the project's words: the field, the bad value, what is allowed."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(arguments)"
        prop = _property(schema, loc) if loc else {}
        value = err.get("input")
        if err["type"] == "missing":
            desc = prop.get("description", "")
            problems.append(f"{field} is required ({allowed(prop)}){': ' + desc if desc else ''}")
        elif err["type"] == "extra_forbidden":
            problems.append(f"{field} is not an argument here; allowed: {sorted(schema.get('properties', {}))}")
        elif err["type"] in RANGE_ERRORS:
            problems.append(f"{field}={value!r} is out of range ({err['msg'].lower()}); allowed: {allowed(prop)}")
        elif err["type"] in ("literal_error", "enum"):
            problems.append(f"{field}={value!r}; allowed: {allowed(prop).removeprefix('one of ')}")
        else:
            problems.append(f"{field}={value!r:.200} is not allowed: {err['msg'].lower()}; allowed: {allowed(prop)}")
    return problems


def field_default(model: type[BaseModel], name: str) -> Any:
    """A model field's default (the job config's defaults are what a request's unset arguments mean)."""
    return model.model_fields[name].get_default(call_default_factory=True)


__all__ = ["Request", "allowed", "choice", "describe_errors", "field_default", "loose"]
