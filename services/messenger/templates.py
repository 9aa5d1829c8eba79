"""Message templates: per journey × channel × locale, rendered in a Jinja2 sandbox. Pure.

The only I/O is reading the packaged defaults (importlib.resources); overrides come from the
service, which keeps them in its database as ``Template.to_json()``.

Packaged defaults — ``services/messenger/default_templates/``::

    index.json                           per journey: kind (marketing | transactional),
                                         the variables the journey always supplies
                                         ("requires"), WhatsApp content variables per locale
    <journey>/<channel>.<field>.<locale>.j2
        email.subject.he.j2              one line
        email.html.he.j2                 the body only: render() adds the frame (<html dir
                                         lang>, the footer with the unsubscribe link)
        email.text.he.j2                 the plain-text part; the footer is appended likewise
        sms.text.he.j2                   must fit two segments with the sample data
        whatsapp.text.he.j2              free-form text (inside the 24-hour window)

A WhatsApp default's ``content_sid`` is the placeholder ``config:<journey>.<locale>``: the
approved template to use outside the 24-hour window is configured per deployment and passed
to ``render(..., content_sids={"win_back.he": "HX…"})``; a literal ``HX…`` SID works too.

Variables are documented in one place, ``VARIABLES``. A template is checked when saved
(``TemplateStore.put`` / ``validate_template``): unknown variables, internal attributes,
forbidden tags and anything that fails under ``StrictUndefined`` with the sample data — once
with every variable present, once with the optional ones absent — are errors naming the JSON
path. At send time (``strict=False``)
an absent optional variable renders as empty, so a saved template is never sent half-rendered.

The sandbox is ``ImmutableSandboxedEnvironment`` narrowed further: no attribute that starts
with ``_``, only read-only methods of ``str``/``dict``, a short list of filters, no macros,
blocks, includes or ``{% autoescape %}``; loops share a budget of iterations and time, ``range``
is small, ``*``/``**``/``+``/``~`` cannot build huge values, and output is capped per field.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any, Literal, TypeVar, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency
from jinja2 import ChainableUndefined, StrictUndefined, Undefined, nodes, pass_eval_context
from jinja2 import exceptions as jinja_exc
from jinja2 import runtime as jinja_runtime
from jinja2.environment import Template as JinjaTemplate
from jinja2.filters import FILTERS, do_join
from jinja2.meta import find_undeclared_variables
from jinja2.nodes import EvalContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, escape
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from shared.conditions import unknown_hint
from shared.errors import InvalidInputError, NotFoundError
from shared.events import (
    CancellationReason,
    Channel,
    MessageKind,
    ProfileSnapshot,
    TriggeringEvent,
    current_language,
)

T = TypeVar("T")

# --- Limits ------------------------------------------------------------------------------------

MAX_SOURCE_BYTES = 20_000  # per field (subject, html, text, one content variable)
MAX_OUTPUT_CHARS = 50_000  # per rendered field, and for any string built while rendering
MAX_LOOP_ITERATIONS = 1_000  # all loops of one field together
MAX_RANGE = 1_000
MAX_RENDER_SECONDS = 1.0
MAX_INT_BITS = 4_096
MAX_SMS_SEGMENTS = 2  # with the sample data, checked when a template is saved
MAX_WHATSAPP_CHARS = 1_600  # Twilio's limit for a WhatsApp body
DEFAULT_LOCALE = "en"

# --- Variables ---------------------------------------------------------------------------------

VARIABLES: dict[str, str] = {
    "first_name": "Optional. How to address the customer: the first token of the profile's name "
    "(honorifics skipped; Arabic 'عبد …'/'أبو …' kept whole). Absent when the name is unknown.",
    "name": "Optional. The full name from the profile.",
    "tier": "The loyalty tier key: none, bronze, silver, gold, platinum (or a configured one).",
    "tier_name": "The tier's display name in the message's language (זהב, الذهبي, Gold).",
    "tier_perks": "List of the tier's perks in the message's language (configuration); may be empty.",
    "last_order": "Optional. The order behind the message: .id, .amount (Babel format_currency in "
    "the locale, '' when unknown), .date (Babel format_date, long, customer's time zone).",
    "ticket_id": "Optional. The support ticket behind the message.",
    "ticket_category": "Optional. The ticket's category label as the help desk sent it.",
    "survey_url": "Optional. The feedback survey link (feedback_survey always has it).",
    "unsubscribe_url": "The one-click unsubscribe link, signed per customer and channel.",
    "opt_out": "How to opt out, in the message's language: on an SMS that takes replies, the "
    "keyword to reply (Reply STOP to unsubscribe / להסרה אפשר להשיב הסר / لإلغاء الاشتراك أرسل "
    "إلغاء), a third of the link's length; else the label and {{ unsubscribe_url }}. Either shows a "
    "marketing message's opt-out. Worded in he, ar and en; other languages get the English words "
    "(STOP works in any): write your own there, with {{ unsubscribe_url }}.",
    "churn_reason": "Optional. Why the customer left, as their cancellation said: price, service, both "
    "or other (the win-back apologises to those who left over service). Absent unless their "
    "lifecycle stage is churned (never cancelled, or came back since).",
    "offer_code": "Optional. The win-back offer code, only when the journey grants one.",
    "offer_value": "Optional. What the offer gives, in the message's language, when configured "
    "(RETAIN_MESSENGER_OFFER_VALUE, e.g. 15% הנחה); only with offer_code.",
    "offer_expires": "Optional. The offer's last day, good through its end (Babel format_date, long), "
    "when RETAIN_MESSENGER_OFFER_VALID_DAYS is set; only with offer_code.",
    "personal_contact": "Optional. Complaint escalation: .name and .phone of the customer's "
    "personal contact, only when escalated.",
    "brand_name": "The brand's name (RETAIN_MESSENGER_BRAND_NAME).",
    "support_phone": "The support phone number, as it should be shown (RETAIN_MESSENGER_SUPPORT_PHONE).",
    "response_hours": "The hours within which support answers a complaint, as digits "
    "(RETAIN_MESSENGER_COMPLAINT_RESPONSE_HOURS).",
    "can_reply": "Whether the customer can answer this message where they read it: false for an SMS "
    "from an alphanumeric sender id (RETAIN_TWILIO_SMS_FROM=Retain), which takes no replies; "
    'wrap "reply here" in {% if can_reply %}.',
}
OFFER_DETAILS = frozenset({"offer_value", "offer_expires"})  # only with offer_code, each configured apart
OPTIONAL_VARIABLES: frozenset[str] = frozenset(
    {
        "first_name",
        "name",
        "last_order",
        "ticket_id",
        "ticket_category",
        "survey_url",
        "churn_reason",
        "offer_code",
        "offer_value",
        "offer_expires",
        "personal_contact",
    }
)

Direction = Literal["rtl", "ltr"]
SmsEncoding = Literal["GSM-7", "UCS-2"]
TEMPLATE_NAME = r"^[a-z][a-z0-9_]{0,63}$"
JourneyName = Annotated[str, StringConstraints(pattern=TEMPLATE_NAME)]
_CONTENT_SID = re.compile(r"^(HX[0-9a-fA-F]{32}|config:[A-Za-z0-9_.-]{1,100})$")
_CONTENT_VARIABLE = re.compile(r"^[A-Za-z0-9_]{1,32}$")


# --- Errors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TemplateError:
    """One problem in a template, at a JSON path such as ``$.html``."""

    path: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class TemplateInvalidError(InvalidInputError):
    """A template did not validate; ``errors`` lists every problem found (HTTP 422)."""

    code = "invalid_template"

    def __init__(self, errors: Sequence[TemplateError]) -> None:
        self.errors: tuple[TemplateError, ...] = tuple(errors)
        shown = "; ".join(f"{e.path}: {e.message}" for e in self.errors[:5])
        super().__init__(f"invalid template: {shown}", details=[e.to_dict() for e in self.errors])


class TemplateNotFoundError(NotFoundError):
    code = "template_not_found"


class TemplateRenderError(InvalidInputError):
    """A template could not be rendered with these variables; nothing should be sent."""

    code = "template_render_failed"

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}", details=[{"path": path, "message": message}])


class TemplateLimitError(jinja_exc.SecurityError):
    """A template tried to do more than a message needs (loops, size, time)."""


# --- Keys and templates ------------------------------------------------------------------------


@lru_cache(maxsize=1024)  # a handful of tags, asked for many times per message
def normalize_locale(tag: str) -> str:
    """``he_il`` → ``he-IL``; subtags cased the BCP 47 way; the language by its current code
    (``iw`` → ``he``, ``tl`` → ``fil``: ``shared.events.current_language``, as events have it)."""
    parts = [p for p in re.split(r"[-_]", tag.strip()) if p]
    if not parts or not re.fullmatch(r"[A-Za-z]{2,3}", parts[0]):
        raise ValueError(f"not a BCP 47 language tag: {tag!r}, e.g. he-IL, ar, en-US")
    language = parts[0].lower()
    out = [current_language(language)]
    for part in parts[1:]:
        if not re.fullmatch(r"[A-Za-z0-9]{1,8}", part):
            raise ValueError(f"not a BCP 47 language tag: {tag!r}")
        if len(part) == 4 and part.isalpha():
            out.append(part.title())
        elif len(part) == 2 and part.isalpha():
            out.append(part.upper())
        else:
            out.append(part.lower())
    return "-".join(out)


def language_of(locale: str) -> str:
    return normalize_locale(locale).split("-")[0]


def locale_chain(locale: str | None, default_locale: str = DEFAULT_LOCALE) -> list[str]:
    """Where to look for a template: ``he-IL`` → ``he`` → the default locale."""
    chain: list[str] = []
    if locale:
        try:
            parts = normalize_locale(locale).split("-")
        except ValueError:
            parts = []
        chain = ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]
    for tag in (normalize_locale(default_locale), language_of(default_locale)):
        if tag not in chain:
            chain.append(tag)
    return chain


@lru_cache(maxsize=1024)  # Locale.parse reads CLDR data; asked once per message
def text_direction(locale: str) -> Direction:
    try:
        return "rtl" if Locale.parse(language_of(locale)).text_direction == "rtl" else "ltr"
    except (UnknownLocaleError, ValueError):
        return "ltr"


class TemplateKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    journey: JourneyName = Field(description="The journey's template name, e.g. win_back.")
    channel: Channel
    locale: str = Field(description="BCP 47: he-IL, he, ar, en …")

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str) -> str:
        tag = normalize_locale(value)
        try:
            Locale.parse(tag, sep="-")
        except (UnknownLocaleError, ValueError) as exc:
            raise ValueError(f"unknown locale {value!r}") from exc
        return tag

    def __str__(self) -> str:
        return f"{self.journey}/{self.channel.value}/{self.locale}"


class Template(BaseModel):
    """One message: email → subject + html + text; sms → text; whatsapp → text (+ content_sid).

    ``html`` is the body of the email only; ``render`` wraps it in the frame that carries
    ``dir``/``lang`` and the footer. ``content_variables`` maps the approved WhatsApp
    template's variables ("1", "2" …) to Jinja expressions over ``VARIABLES``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: TemplateKey
    kind: MessageKind = MessageKind.MARKETING
    subject: str | None = None
    html: str | None = None
    text: str
    content_sid: str | None = None
    content_variables: dict[str, str] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str | bytes) -> Template:
        """Parse a stored or posted template; ``TemplateInvalidError`` names each bad field."""
        try:
            if isinstance(data, str | bytes):
                return cls.model_validate_json(data)
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise TemplateInvalidError(
                [
                    TemplateError(
                        "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]),
                        e["msg"],
                    )
                    for e in exc.errors(include_url=False)
                ]
            ) from exc


# --- SMS segments ------------------------------------------------------------------------------

_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")  # sent as ESC + char: two septets
_GSM7_ALL = _GSM7_BASIC | _GSM7_EXTENSION


@dataclass(frozen=True, slots=True)
class SmsCount:
    encoding: SmsEncoding
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int


def count_sms(text: str) -> SmsCount:
    """Segments as carriers bill them: GSM-7 160 (153 per part), UCS-2 70 (67 per part).

    A two-septet extension character or a surrogate pair is never split across parts.
    """
    if _GSM7_ALL.issuperset(text):
        encoding: SmsEncoding = "GSM-7"
        sizes = [2 if c in _GSM7_EXTENSION else 1 for c in text]
        single, part = 160, 153
    else:
        encoding = "UCS-2"
        sizes = [2 if ord(c) > 0xFFFF else 1 for c in text]
        single, part = 70, 67
    units = sum(sizes)
    if units == 0:
        return SmsCount(encoding, 0, 0)
    if units <= single:
        return SmsCount(encoding, units, 1)
    segments, used = 1, 0
    for size in sizes:
        if used + size > part:
            segments, used = segments + 1, 0
        used += size
    return SmsCount(encoding, units, segments)


# --- The sandbox -------------------------------------------------------------------------------

_STR_METHODS = frozenset(
    {"upper", "lower", "title", "capitalize", "strip", "lstrip", "rstrip", "startswith", "endswith", "split"}
)
_MAPPING_METHODS = frozenset({"get", "items", "keys", "values"})
_FILTERS = (
    "abs", "capitalize", "count", "d", "default", "e", "escape", "first", "float", "int", "last",
    "length", "lower", "round", "string", "striptags", "title", "trim", "truncate", "upper",
    "urlencode", "wordcount",
)  # fmt: skip
_FORBIDDEN_NODES: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Macro, "macros are not allowed in message templates"),
    (nodes.CallBlock, "call blocks are not allowed in message templates"),
    (nodes.Import, "imports are not allowed in message templates"),
    (nodes.FromImport, "imports are not allowed in message templates"),
    (nodes.Include, "includes are not allowed in message templates"),
    (nodes.Extends, "extends is not allowed: the email frame is added when rendering"),
    (nodes.Block, "blocks are not allowed in message templates"),
    (nodes.AssignBlock, "{% set %}…{% endset %} blocks are not allowed; use {% set x = … %}"),
    (nodes.EvalContextModifier, "{% autoescape %} is not allowed: HTML is always escaped"),
)


@dataclass
class _Budget:
    deadline: float
    iterations: int = 0

    def spend(self) -> None:
        self.iterations += 1
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise TemplateLimitError(f"loops ran more than {MAX_LOOP_ITERATIONS} iterations")
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"rendering took longer than {MAX_RENDER_SECONDS:g} s")


_BUDGET: ContextVar[_Budget | None] = ContextVar("template_render_budget", default=None)


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple) and len(value) > MAX_OUTPUT_CHARS:
        raise TemplateLimitError(f"a value grew beyond {MAX_OUTPUT_CHARS} characters")
    return value


def _guarded(iterable: Iterable[Any], budget: _Budget) -> Iterator[Any]:
    for item in iterable:
        budget.spend()
        yield item


def _loop_guard(value: Any) -> Iterator[Any]:
    budget = _BUDGET.get() or _Budget(time.monotonic() + MAX_RENDER_SECONDS)
    return _guarded(value, budget)


def _limited_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateLimitError(f"range() of more than {MAX_RANGE} items is not allowed")
    return rng


@pass_eval_context
def _join(eval_ctx: EvalContext, value: Iterable[Any], d: str = "") -> str:
    return cast(str, _check_size(do_join(eval_ctx, value, d)))


class _Guard(NodeTransformer):
    """Refuses what a message never needs and wraps loops and concatenations in guards."""

    def __init__(self, name: str | None) -> None:
        self.name = name

    def _refuse(self, node: nodes.Node, message: str) -> jinja_exc.TemplateSyntaxError:
        return jinja_exc.TemplateSyntaxError(message, node.lineno, self.name)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        for kind, message in _FORBIDDEN_NODES:
            if isinstance(node, kind):
                raise self._refuse(node, message)
        return super().visit(node, *args, **kwargs)

    def _filtered(self, node: nodes.Node, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    # NodeTransformer dispatches on visit_<NodeClass>: the names are Jinja's.
    def visit_For(self, node: nodes.For) -> nodes.For:  # noqa: N802
        if node.recursive:
            raise self._refuse(node, "recursive loops are not allowed in message templates")
        self.generic_visit(node)
        node.iter = self._filtered(node.iter, "_loop_guard")
        return node

    def visit_Getattr(self, node: nodes.Getattr) -> nodes.Node:  # noqa: N802
        if node.attr.startswith("_"):
            raise self._refuse(node, f"access to internal attribute {node.attr!r} is not allowed")
        return self.generic_visit(node)

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:  # noqa: N802
        arg = node.arg
        if isinstance(arg, nodes.Const) and isinstance(arg.value, str) and arg.value.startswith("_"):
            raise self._refuse(node, f"access to internal attribute {arg.value!r} is not allowed")
        return self.generic_visit(node)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802
        self.generic_visit(node)
        return self._filtered(node, "_size_guard")


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *, html: bool, strict: bool) -> None:
        super().__init__(
            autoescape=html,
            undefined=StrictUndefined if strict else ChainableUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,
        )
        self.filters = {name: FILTERS[name] for name in _FILTERS}
        self.filters.update(
            join=_join, _loop_guard=_loop_guard, _size_guard=_check_size, hebrew_prefix=hebrew_prefix
        )
        self.globals = {"range": _limited_range}

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        return cast(nodes.Template, _Guard(name).visit(tree))

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if not super().is_safe_attribute(obj, attr, value):
            return False
        if isinstance(obj, Undefined | jinja_runtime.LoopContext):
            return True
        if isinstance(obj, str):
            return attr in _STR_METHODS
        if isinstance(obj, Mapping):
            return attr in _MAPPING_METHODS
        return False

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        raise jinja_exc.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} is not allowed"
        )

    def wrap_str_format(self, value: Any) -> None:
        # str.format/format_map go through is_safe_attribute like any method: refused.
        return None

    def call_binop(self, context: jinja_runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and left not in (-1, 0, 1) and abs(left).bit_length() * right > MAX_INT_BITS:
                raise TemplateLimitError("this power is too large for a message template")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(n, int)
                    and len(seq) * n > MAX_OUTPUT_CHARS
                ):
                    raise TemplateLimitError(f"repetition beyond {MAX_OUTPUT_CHARS} characters")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS
            ):
                raise TemplateLimitError("this product is too large for a message template")
        elif operator == "%" and isinstance(left, str):
            raise jinja_exc.SecurityError("'%' string formatting is not allowed; use {{ … }}")
        return _check_size(super().call_binop(context, operator, left, right))


def hebrew_prefix(word: Any, prefix: str) -> str:
    """``word`` after a Hebrew prefix letter (ב, ל, מ, ה, ו, ש, כ): joined to a Hebrew word
    (לתה ונענע), with a maqaf before anything else (ל-Retain, ב-SMS), as Hebrew is written.
    In templates: ``{{ brand_name | hebrew_prefix("ל") }}``."""
    text = str(word)
    return f"{prefix}{text}" if text[:1] and "\u05d0" <= text[0] <= "\u05ea" else f"{prefix}-{text}"


@lru_cache(maxsize=4)
def _environment(*, html: bool, strict: bool) -> _SandboxEnvironment:
    return _SandboxEnvironment(html=html, strict=strict)


@lru_cache(maxsize=1024)
def _compiled(source: str, *, html: bool, strict: bool) -> JinjaTemplate:
    return _environment(html=html, strict=strict).from_string(source)


class _Absent(StrictUndefined):
    """An optional variable that is not there (strict mode): false in ``{% if %}``, an error
    when printed or looked into, naming the variable."""

    def __bool__(self) -> bool:  # type: ignore[override]
        return False

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return iter(())


def _absent(name: str) -> _Absent:
    return _Absent(hint=f"{name!r} may be absent: guard it with {{% if {name} %}}…{{% endif %}}", name=name)


_RENDER_ERRORS = (
    jinja_exc.TemplateError,
    ArithmeticError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    RecursionError,
)


def _render_field(source: str, variables: Mapping[str, Any], *, html: bool, strict: bool) -> str:
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise TemplateLimitError(f"the template is over {MAX_SOURCE_BYTES} bytes")
    template = _compiled(source, html=html, strict=strict)
    budget = _Budget(time.monotonic() + MAX_RENDER_SECONDS)
    token = _BUDGET.set(budget)
    try:
        size, chunks = 0, []
        for chunk in template.generate(variables):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateLimitError(f"the output is over {MAX_OUTPUT_CHARS} characters")
            chunks.append(chunk)
            budget.check_time()
    finally:
        _BUDGET.reset(token)
    return "".join(chunks)


def _message(exc: BaseException) -> str:
    if isinstance(exc, jinja_exc.TemplateSyntaxError | jinja_exc.TemplateAssertionError) and exc.lineno:
        return f"line {exc.lineno}: {exc.message}"
    if isinstance(exc, jinja_exc.TemplateError):
        return exc.message or type(exc).__name__
    if isinstance(exc, RecursionError):
        return "the template is nested too deeply"
    return f"{type(exc).__name__}: {exc}"


# --- Packaged defaults -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JourneyDefaults:
    kind: MessageKind
    requires: frozenset[str]  # variables the journey always supplies (its trigger's data)
    whatsapp_content_variables: Mapping[str, Mapping[str, str]]  # locale → {"1": "{{ … }}"}


def _default_files() -> Any:
    return resources.files("services.messenger").joinpath("default_templates")


@lru_cache(maxsize=1)
def journey_defaults() -> Mapping[str, JourneyDefaults]:
    index = json.loads(_default_files().joinpath("index.json").read_text(encoding="utf-8"))
    return {
        name: JourneyDefaults(
            kind=MessageKind(spec.get("kind", "marketing")),
            requires=frozenset(spec.get("requires", ())),
            whatsapp_content_variables=spec.get("whatsapp_content_variables", {}),
        )
        for name, spec in index["journeys"].items()
    }


def required_variables(journey: str) -> frozenset[str]:
    spec = journey_defaults().get(journey)
    return spec.requires if spec else frozenset()


@lru_cache(maxsize=1)
def default_templates() -> Mapping[TemplateKey, Template]:
    """The packaged templates, read once."""
    parts: dict[tuple[str, str, str], dict[str, str]] = {}
    for journey in journey_defaults():
        folder = _default_files().joinpath(journey)
        for entry in folder.iterdir():
            match = re.fullmatch(r"(email|sms|whatsapp)\.(subject|html|text)\.([A-Za-z-]+)\.j2", entry.name)
            if match is None:
                continue
            channel, part, locale = match.groups()
            parts.setdefault((journey, channel, locale), {})[part] = entry.read_text(encoding="utf-8")
    templates: dict[TemplateKey, Template] = {}
    for (journey, channel, locale), fields in sorted(parts.items()):
        spec = journey_defaults()[journey]
        key = TemplateKey(journey=journey, channel=Channel(channel), locale=locale)
        extra: dict[str, Any] = {}
        if key.channel is Channel.WHATSAPP:
            extra["content_sid"] = f"config:{journey}.{key.locale}"
            extra["content_variables"] = dict(spec.whatsapp_content_variables.get(key.locale, {}))
        templates[key] = Template(key=key, kind=spec.kind, **fields, **extra)
    return templates


# --- Variables from a profile ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Brand:
    name: str = "Retain"
    support_phone: str = "+972-3-555-0100"
    response_hours: int = 4  # the complaint first-response target (the kpi's default for complaints)


DEFAULT_BRAND = Brand()

TIER_NAMES: dict[str, dict[str, str]] = {
    "bronze": {"he": "ארד", "ar": "البرونزي", "en": "Bronze"},
    "silver": {"he": "כסף", "ar": "الفضي", "en": "Silver"},
    "gold": {"he": "זהב", "ar": "الذهبي", "en": "Gold"},
    "platinum": {"he": "פלטינה", "ar": "البلاتيني", "en": "Platinum"},
}

# Perks per tier and language; a deployment passes its own as ``perks_config``.
DEFAULT_PERKS: dict[str, dict[str, list[str]]] = {
    "bronze": {
        "he": ["נקודות על כל קנייה", "הפתעה קטנה ביום ההולדת"],
        "ar": ["نقاط على كل عملية شراء", "مفاجأة صغيرة في عيد ميلادك"],
        "en": ["Points on every purchase", "A small surprise on your birthday"],
    },
    "silver": {
        "he": ["נקודות כפולות על כל קנייה", "משלוח חינם פעמיים בשנה", "הפתעה קטנה ביום ההולדת"],
        "ar": ["نقاط مضاعفة على كل عملية شراء", "توصيل مجاني مرتين في السنة", "مفاجأة صغيرة في عيد ميلادك"],
        "en": [
            "Double points on every purchase",
            "Free delivery twice a year",
            "A small surprise on your birthday",
        ],
    },
    "gold": {
        "he": ["נקודות כפולות על כל קנייה", "משלוח חינם בכל הזמנה", "קו שירות מועדף"],
        "ar": ["نقاط مضاعفة على كل عملية شراء", "توصيل مجاني لكل طلب", "خط خدمة بأولوية"],
        "en": ["Double points on every purchase", "Free delivery on every order", "A priority service line"],
    },
    "platinum": {
        "he": [
            "נקודות משולשות על כל קנייה",
            "משלוח אקספרס חינם בכל הזמנה",
            "איש קשר אישי בשירות הלקוחות",
            "הזמנה לאירועים סגורים",
        ],
        "ar": [
            "ثلاثة أضعاف النقاط على كل عملية شراء",
            "توصيل سريع مجاني لكل طلب",
            "مسؤول خدمة شخصي",
            "دعوات إلى فعاليات خاصة",
        ],
        "en": [
            "Triple points on every purchase",
            "Free express delivery on every order",
            "A personal contact in customer service",
            "Invitations to members-only events",
        ],
    },
}

_HONORIFICS = frozenset(
    {
        "mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "madam",
        "מר", "גב", "גברת", "דר", "פרופ", "עוד", "הרב", "רב",
        "السيد", "السيدة", "الآنسة", "الأستاذ", "الاستاذ", "الأستاذة", "د", "دكتور", "الدكتور", "الدكتورة",
        "م", "المهندس", "الشيخ", "الحاج", "الحاجة",
    }
)  # fmt: skip
# Arabic names whose first word alone is not a name ("servant of", "father of").
_JOINED_PREFIXES = frozenset({"عبد", "أبو", "ابو", "أم", "ام", "abd", "abdel", "abdul", "abu", "umm"})


_NAME_PUNCTUATION = re.compile(r"[.'\"׳״/]")
# What CRMs and forms put where they have no name.
_PLACEHOLDERS = frozenset(
    {"null", "none", "na", "unknown", "test", "customer", "guest", "לקוח", "לקוחה", "אורח", "عميل"}
)


def _placeholder(text: str) -> bool:
    """What a CRM or a form writes where it has no name (null, N/A, Guest). Na, written as a
    name is, is one (Na Li); NA, na and N/A are not."""
    bare = _NAME_PUNCTUATION.sub("", text).strip().casefold()
    if bare == "na":
        return text.strip() != "Na"
    return bare in _PLACEHOLDERS


# Hebrew given names of two words (בת שבע, בן ציון, בת אל): joined when a family name follows,
# so that "בת שבע לוי" is not greeted "בת" (daughter); "בן לוי" is Ben.
_HEBREW_JOINED = frozenset({"בת", "בן"})


def first_name_of(name: str | None) -> str | None:
    """The word to address a customer by: ``נועה לוי`` → ``נועה``; ``د. عبد الله حداد`` →
    ``عبد الله``; ``Levi, Noa`` → ``Noa``; an email address, digits or a placeholder a CRM
    filled in (``null``, ``N/A``) → None. After a title, one word left is the family name
    (``גב' כהן``, ``Mrs. Cohen``): None too, not "Hi Cohen"."""
    if not name or "@" in name or _placeholder(name):
        return None
    if "," in name:
        family, _, given = name.partition(",")
        name = given if given.strip() else family
    tokens = [t for t in name.split() if any(ch.isalpha() for ch in t)]
    titled = False
    while tokens and _NAME_PUNCTUATION.sub("", tokens[0]).lower() in _HONORIFICS:
        tokens.pop(0)
        titled = True
    if not tokens or (titled and len(tokens) == 1):
        return None
    first = tokens[0]
    bare = _NAME_PUNCTUATION.sub("", first).casefold()
    # A placeholder with more words ("Guest User", "Customer 1234", "לקוח מזדמן"), or an
    # initial ("N. Levi"): no name to greet by.
    if _placeholder(first) or (len(bare) == 1 and (first != bare or bare.isascii())):
        return None
    if (first.lower() in _JOINED_PREFIXES and len(tokens) > 1) or (
        first in _HEBREW_JOINED and len(tokens) > 2
    ):
        first = f"{first} {tokens[1]}"
    return _as_a_name(first)


def _as_a_name(name: str) -> str:
    """A name in a name's case (NOA, noa → Noa; Hebrew and Arabic have none) and length."""
    if name.isascii() and (name.islower() or name.isupper()):
        name = name.title()
    return name[:50]


def _given_name(profile: ProfileSnapshot) -> str | None:
    # A CRM that knows the given name better than "first word of the name" says so.
    given = profile.attributes.get("first_name")
    if isinstance(given, str) and given.strip():
        given = given.strip()
        # Read as a name is ("NULL", "לקוח" are none; "NOA" is Noa), kept whole ("בת שבע").
        if not _placeholder(given):
            return _as_a_name(given)
    return first_name_of(profile.name)


def tier_display_name(
    tier: str, locale: str, names_config: Mapping[str, Mapping[str, str]] | None = None
) -> str:
    """The tier's name for the customer: the deployment's (``messenger_tier_names``, in the
    message's language), else the default tiers' own, else its id spelt out ("vip_plus" is
    "Vip Plus", in any language: name your tiers)."""
    configured = in_language((names_config or {}).get(tier, {}), locale)
    if configured is not None:
        return configured
    names = TIER_NAMES.get(tier)
    if names is None:
        return "" if tier == "none" else tier.replace("_", " ").title()
    return names.get(language_of(locale), names["en"])


def in_language(per_locale: Mapping[str, T], locale: str) -> T | None:
    """The value configured for the message's language: the closest locale (he-IL → he), else
    any of the same language (a shop that configured only he-IL, for a ``he`` message); none
    rather than another language's."""
    for tag in locale_chain(locale, default_locale=locale):
        if tag in per_locale:
            return per_locale[tag]
    with contextlib.suppress(ValueError):
        language = language_of(locale)
        for tag in sorted(per_locale):
            with contextlib.suppress(ValueError):
                if language_of(tag) == language:
                    return per_locale[tag]
    return None


def tier_perks(
    tier: str, locale: str, perks_config: Mapping[str, Mapping[str, Sequence[str]]] | None = None
) -> list[str]:
    """The tier's perks in the message's language (``in_language``)."""
    perks = in_language((perks_config if perks_config is not None else DEFAULT_PERKS).get(tier, {}), locale)
    return [] if perks is None else list(perks)


def formatting_locale(customer_locale: str | None, template_locale: str) -> str:
    """Format numbers and dates in the template's language, in the customer's region when the
    languages match (he-IL with a ``he`` template → he-IL; he-IL with an ``en`` one → en)."""
    if customer_locale:
        try:
            if language_of(customer_locale) == language_of(template_locale):
                return normalize_locale(customer_locale)
        except ValueError:
            pass
    return template_locale


@lru_cache(maxsize=1024)  # Locale.parse reads CLDR data: a few tags, thousands of messages
def _babel_locale(locale: str) -> Locale:
    for tag in locale_chain(locale):
        try:
            return Locale.parse(tag, sep="-")
        except (UnknownLocaleError, ValueError):
            continue
    return Locale.parse(DEFAULT_LOCALE)


def format_money(amount: Decimal | float | str, currency: str, locale: str) -> str:
    return format_currency(Decimal(str(amount)), currency, locale=_babel_locale(locale))


def format_day(when: date | datetime | str, locale: str, timezone: str | None = None) -> str:
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if isinstance(when, datetime):
        if timezone and when.tzinfo is not None:
            with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
                when = when.astimezone(ZoneInfo(timezone))
        when = when.date()
    return format_date(when, format="long", locale=_babel_locale(locale))


# How to opt out, per language: the label before the link; and where the SMS takes replies, the
# keyword to reply instead, worded as the replies to keywords word it (stopwords._REPLIES), which
# know each keyword (Twilio itself acts on STOP). The link is ~60 characters, the sentence a third
# of that: room in a two-segment Hebrew or Arabic SMS for the brand.
STOP_KEYWORDS: dict[str, str] = {"en": "STOP", "he": "הסר", "ar": "إلغاء"}
_OPT_OUT: dict[str, tuple[str, str]] = {
    "en": ("Unsubscribe: {link}", "Reply STOP to unsubscribe"),
    "he": ("להסרה: {link}", "להסרה אפשר להשיב הסר"),
    "ar": ("لوقف الرسائل: {link}", "لإلغاء الاشتراك أرسل إلغاء"),
}


def opt_out_text(locale: str, unsubscribe_url: str, *, by_reply: bool) -> str:
    """The ``opt_out`` variable: the keyword to reply (``by_reply``, an SMS that takes replies),
    else the label and the link."""
    link_form, reply_form = _OPT_OUT.get(language_of(locale), _OPT_OUT["en"])
    return reply_form if by_reply else link_form.format(link=unsubscribe_url)


def sms_variants(variables: Mapping[str, Any], locale: str) -> list[dict[str, Any]]:
    """An SMS's variables both ways its sender may be set (RETAIN_TWILIO_SMS_FROM): a number,
    which takes replies (``opt_out`` the keyword), and an alphanumeric id, which takes none
    (``opt_out`` the link). A template is checked both ways: each way is shorter in a place."""
    link = variables["unsubscribe_url"]
    return [
        {**variables, "can_reply": True, "opt_out": opt_out_text(locale, link, by_reply=True)},
        {**variables, "can_reply": False, "opt_out": opt_out_text(locale, link, by_reply=False)},
    ]


def build_variables(
    profile: ProfileSnapshot,
    trigger_details: Mapping[str, Any] | TriggeringEvent | None,
    *,
    locale: str | None,
    unsubscribe_url: str,
    survey_url: str | None = None,
    offer_code: str | None = None,
    offer_value: str | None = None,
    offer_expires: date | None = None,
    personal_contact: Mapping[str, str] | None = None,
    perks_config: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    brand: Brand = DEFAULT_BRAND,
    timezone: str | None = None,
    tier_names: Mapping[str, Mapping[str, str]] | None = None,
    can_reply: bool = True,
    opt_out_by_reply: bool = False,
) -> dict[str, Any]:
    """The variables of ``VARIABLES`` for one customer; optional ones are left out when unknown.

    ``locale`` is the locale to format in (see ``formatting_locale``); ``trigger_details`` is
    the triggering event (order_id, amount, currency, occurred_at, ticket_id, category);
    ``timezone`` the zone dates are shown in (the customer's as quiet hours find it,
    ``quiet.customer_zone``; default the profile's): an order placed at 01:30 in Jerusalem
    was placed on that day, not the day before as UTC has it.
    """
    zone = timezone or profile.timezone
    loc = locale or profile.locale or DEFAULT_LOCALE
    try:
        loc = normalize_locale(loc)
    except ValueError:
        loc = DEFAULT_LOCALE
    if isinstance(trigger_details, TriggeringEvent):
        details: dict[str, Any] = trigger_details.model_dump()
    else:
        details = dict(trigger_details or {})
    variables: dict[str, Any] = {
        "tier": profile.tier,
        "tier_name": tier_display_name(profile.tier, loc, tier_names),
        "tier_perks": tier_perks(profile.tier, loc, perks_config),
        "brand_name": brand.name,
        "support_phone": brand.support_phone,
        "response_hours": str(brand.response_hours),
        "unsubscribe_url": unsubscribe_url,
        "opt_out": opt_out_text(loc, unsubscribe_url, by_reply=opt_out_by_reply),
        "can_reply": can_reply,
    }
    optional: dict[str, Any] = {
        "first_name": _given_name(profile),
        "name": profile.name,
        "ticket_id": details.get("ticket_id"),
        "ticket_category": details.get("category") if details.get("ticket_id") else None,
        "survey_url": survey_url,
        "offer_code": offer_code,
        # Only while they are churned: the profile keeps the last cancellation's reason for ever,
        # and one who left over service in 2023, came back and lapsed now is not owed that apology.
        "churn_reason": profile.churn_reason.value
        if profile.churn_reason is not None and profile.lifecycle_stage == "churned"
        else None,
    }
    if offer_code:  # the value and the last day say what a code gives: never without one
        optional["offer_value"] = offer_value
        with contextlib.suppress(ValueError, TypeError):
            if offer_expires is not None:
                optional["offer_expires"] = format_day(offer_expires, loc, zone)
    if details.get("order_id"):
        amount, currency, at = details.get("amount"), details.get("currency"), details.get("occurred_at")
        shown_amount = shown_date = ""
        # A detail that cannot be formatted is left out, not allowed to stop the message.
        with contextlib.suppress(InvalidOperation, ValueError, TypeError):
            if amount is not None and currency:
                shown_amount = format_money(amount, currency, loc)
        with contextlib.suppress(ValueError, TypeError):
            if at:
                shown_date = format_day(at, loc, zone)
        optional["last_order"] = {"id": str(details["order_id"]), "amount": shown_amount, "date": shown_date}
    if personal_contact and personal_contact.get("name"):
        optional["personal_contact"] = {
            "name": personal_contact["name"],
            "phone": personal_contact.get("phone") or brand.support_phone,
        }
    variables.update({k: str(v) if isinstance(v, int | float) else v for k, v in optional.items() if v})
    return variables


_SAMPLE_PEOPLE = {
    "he": ("נועה לוי", "דנה כהן", "ILS"),
    "ar": ("ليلى حداد", "سامر خوري", "ILS"),
    "en": ("Sarah Miller", "Dana Cohen", "USD"),
}
# As long as real ones (links.py), so that the two-segment check of an SMS holds for the messages
# sent: a public URL of 20 characters (a longer one eats into every SMS), the unsubscribe token of
# a customer whose id is a UUID (35 characters; an id of up to 16 ASCII characters makes no longer one),
# a message id's survey token (22). Shorter samples let templates pass that real links then broke.
SAMPLE_UNSUBSCRIBE_URL = "https://shop.example/u/UwyPcgys9EO9sLUejh5IKXg.FQ4ssICHB8k"
_SAMPLE_OFFERS = {"he": "15% הנחה", "ar": "خصم 15%", "en": "15% off"}
SAMPLE_SURVEY_URL = "https://shop.example/s/bh8qnEt9TiqfPI1bGn4MQg"
# A win-back's offer code as the sender makes it (BACK- and 8 of the message id's hex digits):
# "BACK15", 7 characters shorter, let the Hebrew win-back SMS pass at 128 UCS-2 units while
# every real one went in 3 segments (135).
SAMPLE_OFFER_CODE = "BACK-0F3A9C21"
SAMPLE_PUBLIC_URL = "https://shop.example"


def sample_variables(
    locale: str,
    *,
    brand: Brand = DEFAULT_BRAND,
    perks_config: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    public_url: str | None = None,
    tier_names: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Every variable, with realistic values in the locale's language (preview, validation);
    with ``public_url`` (RETAIN_MESSENGER_PUBLIC_URL), the links under it, as long as this
    deployment's will be."""
    base = SAMPLE_PUBLIC_URL if public_url is None else public_url.rstrip("/")
    lang = language_of(locale)
    name, contact, currency = _SAMPLE_PEOPLE.get(lang, _SAMPLE_PEOPLE["en"])
    profile = ProfileSnapshot(
        name=name,
        locale=locale,
        timezone="Asia/Jerusalem",
        lifecycle_stage="churned",
        tier="gold",
        reporting_currency=currency,
        # The longer of the win-back's two ways (an apology to those who left over service).
        churn_reason=CancellationReason.SERVICE,
    )
    details = {
        "order_id": "88412",
        "amount": "349.90",
        "currency": currency,
        "occurred_at": "2026-11-21T18:02:11+02:00",
        "ticket_id": "T-5512",
        "category": "delivery",
    }
    return build_variables(
        profile,
        details,
        locale=locale,
        unsubscribe_url=SAMPLE_UNSUBSCRIBE_URL.replace(SAMPLE_PUBLIC_URL, base, 1),
        survey_url=SAMPLE_SURVEY_URL.replace(SAMPLE_PUBLIC_URL, base, 1),
        offer_code=SAMPLE_OFFER_CODE,
        offer_value=_SAMPLE_OFFERS.get(lang, _SAMPLE_OFFERS["en"]),
        offer_expires=date(2026, 12, 21),
        personal_contact={"name": contact, "phone": "+972521234567"},
        perks_config=perks_config,
        brand=brand,
        tier_names=tier_names,
    )


# --- Rendering ---------------------------------------------------------------------------------

_FOOTER: dict[str, dict[str, str]] = {
    "he": {
        # As a customer: a buyer never joined a mailing list, and reads that as untrue.
        "why": "קיבלת את המייל הזה כלקוח/ה של {brand}.",
        "link": "להסרה מרשימת הדיוור",
    },
    "ar": {
        "why": "وصلتك هذه الرسالة لأنك من عملاء {brand}.",
        "link": "لإلغاء الاشتراك",
    },
    "en": {
        "why": "You're getting this email because you're a {brand} customer.",
        "link": "Unsubscribe",
    },
}

_FRAME = """<!DOCTYPE html>
<html dir="{dir}" lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
</head>
<body style="margin:0;padding:0;background-color:#f4f4f5;">
<div dir="{dir}" style="max-width:560px;margin:0 auto;padding:24px;background-color:#ffffff;\
font-family:Arial,Helvetica,sans-serif;font-size:16px;line-height:1.6;color:#1f2933;text-align:{align};">
{body}
</div>
<div dir="{dir}" style="max-width:560px;margin:0 auto;padding:16px 24px;\
font-family:Arial,Helvetica,sans-serif;font-size:12px;line-height:1.5;color:#6b7280;text-align:{align};">
{footer}
</div>
</body>
</html>
"""


@dataclass(frozen=True, slots=True)
class Rendered:
    key: TemplateKey  # the template used (after fallback): its locale is the message's
    kind: MessageKind
    subject: str | None
    text: str  # email: the plain-text part; sms/whatsapp: the body
    html: str | None  # email only: the whole document
    sms_segments: int | None  # sms only
    sms_encoding: SmsEncoding | None  # sms only
    direction: Direction
    lang: str
    content_sid: str | None = None  # whatsapp: the approved template, when configured
    content_variables: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "template": str(self.key),
            "kind": self.kind.value,
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "sms_segments": self.sms_segments,
            "sms_encoding": self.sms_encoding,
            "direction": self.direction,
            "lang": self.lang,
            "content_sid": self.content_sid,
            "content_variables": self.content_variables,
        }


def _context(template: Template, variables: Mapping[str, Any], *, strict: bool) -> dict[str, Any]:
    context = {k: v for k, v in variables.items() if v is not None and not isinstance(v, Undefined)}
    missing = sorted(required_variables(template.key.journey) - context.keys())
    if missing:
        raise TemplateRenderError(
            "$", f"journey {template.key.journey!r} needs {', '.join(missing)}, which were not given"
        )
    if strict:
        for name in OPTIONAL_VARIABLES - context.keys():
            context[name] = _absent(name)
    return context


def _tidy(text: str) -> str:
    """No trailing spaces, no run of blank lines left by a false ``{% if %}``."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def content_sid_key(name: str) -> str:
    """``<template>.<language>`` as the approved templates' SIDs are configured and placeholders
    name them, the language normalised (``win_back.he_il`` → ``win_back.he-IL``); ValueError
    otherwise."""
    template, dot, language = name.strip().rpartition(".")
    if not dot or not re.fullmatch(TEMPLATE_NAME, template):
        raise ValueError(f"{name!r}: a key is <template>.<language>, e.g. win_back.he")
    return f"{template}.{normalize_locale(language)}"


def _configurable(content_sid: str) -> bool:
    if not content_sid.startswith("config:"):
        return True
    try:
        content_sid_key(content_sid.removeprefix("config:"))
    except ValueError:
        return False
    return True


def approved_content_sid(template: Template, content_sids: Mapping[str, str] | None) -> str | None:
    """The Content SID of ``template``'s approved WhatsApp template: its own ``HX…``, or what
    the deployment configured for its ``config:<template>.<language>`` placeholder (None when
    nothing is: the message cannot go on WhatsApp outside the 24-hour window)."""
    content_sid = template.content_sid
    if content_sid is None or not content_sid.startswith("config:"):
        return content_sid
    try:
        key = content_sid_key(content_sid.removeprefix("config:"))
    except ValueError:  # saved before placeholders were checked
        return None
    return (content_sids or {}).get(key) or None


def render(
    template: Template,
    variables: Mapping[str, Any],
    *,
    strict: bool,
    kind: MessageKind | None = None,
    content_sids: Mapping[str, str] | None = None,
) -> Rendered:
    """Render every field of ``template``; ``TemplateRenderError`` names the field that failed.

    ``strict=False`` at send time (absent optional variables render empty), ``strict=True``
    when checking. ``kind`` overrides the template's (the journey decides); a marketing email
    gets the unsubscribe footer. ``content_sids`` resolves ``config:`` WhatsApp placeholders.
    """
    kind = kind or template.kind
    context = _context(template, variables, strict=strict)
    lang = template.key.locale
    direction = text_direction(lang)

    def field_(path: str, source: str, *, html: bool = False) -> str:
        try:
            return _render_field(source, context, html=html, strict=strict)
        except _RENDER_ERRORS as exc:
            raise TemplateRenderError(path, _message(exc)) from exc

    text = _tidy(field_("$.text", template.text))
    subject = html = None
    sms_segments = sms_encoding = None
    content_variables: dict[str, str] = {}
    channel = template.key.channel
    if channel is Channel.EMAIL:
        if template.subject is None or template.html is None:
            raise TemplateRenderError("$", "an email template needs subject, html and text")
        subject = " ".join(field_("$.subject", template.subject).split())
        body = field_("$.html", template.html, html=True).strip()
        html, footer = _frame(body, subject, context, kind=kind, lang=lang, direction=direction)
        text = f"{text}\n\n--\n{footer}"
    elif channel is Channel.SMS:
        count = count_sms(text)
        sms_segments, sms_encoding = count.segments, count.encoding
    else:
        for name, source in template.content_variables.items():
            # One line: WhatsApp refuses a template parameter with a newline or a tab in it.
            content_variables[name] = " ".join(field_(f"$.content_variables.{name}", source).split())
    return Rendered(
        key=template.key,
        kind=kind,
        subject=subject,
        text=text,
        html=html,
        sms_segments=sms_segments,
        sms_encoding=sms_encoding,
        direction=direction,
        lang=lang,
        content_sid=approved_content_sid(template, content_sids),
        content_variables=content_variables,
    )


def _frame(
    body: str, subject: str, context: Mapping[str, Any], *, kind: MessageKind, lang: str, direction: Direction
) -> tuple[str, str]:
    """The whole HTML document around ``body``, and the plain-text footer."""
    words = _FOOTER.get(language_of(lang), _FOOTER["en"])
    brand = str(context.get("brand_name") or "")
    unsubscribe = context.get("unsubscribe_url")
    footer_html = escape(brand)
    footer_text = brand
    if kind is MessageKind.MARKETING and isinstance(unsubscribe, str) and unsubscribe:
        why = words["why"].format(brand=brand)
        footer_html = Markup('{}<br><a href="{}" style="color:#6b7280;">{}</a>').format(
            why, unsubscribe, words["link"]
        )
        footer_text = f"{why}\n{words['link']}: {unsubscribe}"
    document = _FRAME.format(
        dir=direction,
        lang=escape(lang),
        align="right" if direction == "rtl" else "left",
        title=escape(subject),
        body=body,
        footer=footer_html,
    )
    return document, footer_text


# --- Validation --------------------------------------------------------------------------------


def validate_template(
    template: Template, public_url: str | None = None, brand: Brand = DEFAULT_BRAND
) -> list[TemplateError]:
    """Every problem that would make ``template`` fail or misbehave when sent; its SMS length
    with links under ``public_url`` (RETAIN_MESSENGER_PUBLIC_URL), default a 20-character one,
    and the business named as ``brand`` names it (RETAIN_MESSENGER_BRAND_NAME)."""
    errors: list[TemplateError] = []
    channel = template.key.channel
    fields: list[tuple[str, str | None, bool]] = [("$.text", template.text, False)]
    if channel is Channel.EMAIL:
        fields += [("$.subject", template.subject, False), ("$.html", template.html, True)]
        for path, value in (("$.subject", template.subject), ("$.html", template.html)):
            if not value or not value.strip():
                errors.append(TemplateError(path, "an email needs a subject, an html body and a text part"))
    else:
        for path, value in (("$.subject", template.subject), ("$.html", template.html)):
            if value is not None:
                errors.append(TemplateError(path, f"a {channel.value} template has only text"))
    if not template.text.strip():
        errors.append(TemplateError("$.text", "the text may not be empty"))
    if channel is Channel.WHATSAPP:
        sid = template.content_sid
        if sid is not None and not (_CONTENT_SID.fullmatch(sid) and _configurable(sid)):
            errors.append(
                TemplateError(
                    "$.content_sid",
                    "a Twilio Content SID (HX + 32 hex) or config:<template>.<language> "
                    "(its SID in RETAIN_MESSENGER_WHATSAPP_CONTENT_SIDS)",
                )
            )
        for name, expression in template.content_variables.items():
            if not _CONTENT_VARIABLE.fullmatch(name):
                errors.append(TemplateError(f"$.content_variables.{name}", "a content variable is 1, 2, …"))
            fields.append((f"$.content_variables.{name}", expression, False))
    elif template.content_sid is not None or template.content_variables:
        errors.append(TemplateError("$.content_sid", "only WhatsApp templates have a content_sid"))
    if template.html and re.search(r"<\s*(html|body|head)\b", template.html, re.IGNORECASE):
        errors.append(
            TemplateError("$.html", "html is the body only; <html dir lang> and the footer are added")
        )

    allowed = set(VARIABLES) | set(_environment(html=False, strict=True).globals)
    for path, source, html in fields:
        if source is None:
            continue
        size = len(source.encode())
        if size > MAX_SOURCE_BYTES:
            errors.append(TemplateError(path, f"{size} bytes; a template field may have {MAX_SOURCE_BYTES}"))
            continue
        try:
            undeclared = find_undeclared_variables(_environment(html=html, strict=True).parse(source))
        except (jinja_exc.TemplateError, RecursionError) as exc:  # syntax, forbidden, unknown filters
            errors.append(TemplateError(path, _message(exc)))
            continue
        for name in sorted(undeclared - allowed):
            hint = unknown_hint(name, list(allowed), "variables")
            errors.append(TemplateError(path, f"unknown variable {name!r}{hint}"))
    if errors:
        return errors
    return _check_rendering(template, public_url, brand)


def _check_rendering(
    template: Template, public_url: str | None = None, brand: Brand = DEFAULT_BRAND
) -> list[TemplateError]:
    full = sample_variables(template.key.locale, public_url=public_url, brand=brand)
    required = required_variables(template.key.journey)
    sparse = {k: v for k, v in full.items() if k not in OPTIONAL_VARIABLES or k in required}
    # A code alone, as it goes while no offer value or validity is configured (the default).
    code_alone = {k: v for k, v in full.items() if k not in OFFER_DETAILS}
    errors: list[TemplateError] = []

    def add(found: Iterable[TemplateError]) -> None:
        errors.extend(e for e in found if e not in errors)

    for base in (full, sparse, code_alone):
        ways = sms_variants(base, template.key.locale) if template.key.channel is Channel.SMS else [base]
        rendered: list[tuple[dict[str, Any], Rendered]] = []
        for variables in ways:
            try:
                rendered.append((variables, render(template, variables, strict=True)))
            except TemplateRenderError as exc:
                add([TemplateError(exc.path, exc.details[0]["message"])])
        by_sender = len({r.text for _, r in rendered}) > 1  # named only where it changes the text
        for variables, output in rendered:
            add(_check_output(template, output, variables, by_sender=by_sender))
    return errors


OPT_OUT_REQUIRED = "a marketing message must show how to opt out: {{ opt_out }} or {{ unsubscribe_url }}"


def shows_opt_out(text: str, variables: Mapping[str, Any]) -> bool:
    """Whether a message's text tells how to opt out: the link, or the keyword to reply."""
    return variables["unsubscribe_url"] in text or variables["opt_out"] in text


def _check_output(
    template: Template, rendered: Rendered, variables: Mapping[str, Any], *, by_sender: bool = False
) -> list[TemplateError]:
    errors: list[TemplateError] = []
    channel = template.key.channel
    if rendered.subject is not None and not rendered.subject:
        errors.append(TemplateError("$.subject", "the subject renders empty"))
    if not rendered.text:
        errors.append(TemplateError("$.text", "the text renders empty"))
    if (
        template.kind is MessageKind.MARKETING
        and channel is not Channel.EMAIL
        and not shows_opt_out(rendered.text, variables)
    ):
        errors.append(TemplateError("$.text", OPT_OUT_REQUIRED))
    if channel is Channel.SMS and (rendered.sms_segments or 0) > MAX_SMS_SEGMENTS:
        count = count_sms(rendered.text)
        sender = ""
        if by_sender:
            sender = (
                ", from a sender that takes replies (a number)"
                if variables["can_reply"]
                else ", from a sender that takes none (an alphanumeric id)"
            )
        errors.append(
            TemplateError(
                "$.text",
                f"{count.segments} SMS segments ({count.encoding}, {count.units} characters) with the "
                f"sample data and this deployment's links{sender}; keep it within {MAX_SMS_SEGMENTS}",
            )
        )
    if channel is Channel.WHATSAPP and len(rendered.text) > MAX_WHATSAPP_CHARS:
        errors.append(TemplateError("$.text", f"over {MAX_WHATSAPP_CHARS} characters"))
    return errors


# --- The store ---------------------------------------------------------------------------------


_RESOLVED_MAX = 4096


class TemplateStore:
    """The packaged defaults plus the overrides the service keeps in its database.

    Overrides given to the constructor are trusted (they were validated by ``put`` when
    saved); ``put`` validates.
    """

    def __init__(
        self,
        overrides: Iterable[Template] = (),
        *,
        default_locale: str = DEFAULT_LOCALE,
        defaults: Mapping[TemplateKey, Template] | None = None,
        public_url: str | None = None,
        brand: Brand = DEFAULT_BRAND,
    ) -> None:
        self.default_locale = normalize_locale(default_locale)
        # The links' base and the business's name, for the SMS length (validate): a brand of
        # 18 characters, written into most SMS, overflowed what "Retain" fitted.
        self.public_url = public_url
        self.brand = brand
        self._defaults = dict(default_templates() if defaults is None else defaults)
        self._overrides = {t.key: t for t in overrides}
        # resolve's answers until the next put or remove: every decision asks whether its
        # template has an approved WhatsApp one, and a lookup validates a key per tag of the
        # locale's chain (37 µs for he-IL, 56 µs for ru-RU).
        self._resolved: dict[tuple[str, Channel, str | None], Template | None] = {}

    def resolve(self, journey: str, channel: Channel | str, locale: str | None) -> Template:
        """The template for a customer's locale: exact (he-IL) → language (he) → default."""
        try:
            channel = Channel(channel)
        except ValueError as exc:
            raise TemplateNotFoundError(f"no channel {channel!r}") from exc
        key = (journey, channel, locale)
        if key in self._resolved:
            found = self._resolved[key]
        else:
            chain = locale_chain(locale, self.default_locale)
            found = next((t for tag in chain if (t := self._lookup(journey, channel, tag)) is not None), None)
            if len(self._resolved) >= _RESOLVED_MAX:  # locales come from profiles: bounded
                self._resolved.clear()
            self._resolved[key] = found
        if found is None:
            raise TemplateNotFoundError(f"no {channel.value} template for {journey!r} in {locale or '-'}")
        return found

    def _lookup(self, journey: str, channel: Channel, locale: str) -> Template | None:
        try:
            key = TemplateKey(journey=journey, channel=channel, locale=locale)
        except ValidationError:
            return None
        return self.get(key)

    def get(self, key: TemplateKey) -> Template | None:
        """Exactly this key: the override, else the default."""
        return self._overrides.get(key) or self._defaults.get(key)

    def default(self, key: TemplateKey) -> Template | None:
        return self._defaults.get(key)

    def is_overridden(self, key: TemplateKey) -> bool:
        return key in self._overrides

    def keys(self) -> list[TemplateKey]:
        return sorted(self._defaults.keys() | self._overrides.keys(), key=str)

    def journeys(self) -> set[str]:
        """Template names a journey may refer to."""
        return {k.journey for k in self.keys()}

    def validate(self, template: Template) -> list[TemplateError]:
        return validate_template(template, self.public_url, self.brand)

    def long_sms(self) -> list[tuple[TemplateKey, SmsCount]]:
        """The SMS templates (defaults and overrides) that go in more than MAX_SMS_SEGMENTS
        with the sample data, this deployment's links and its brand: a public URL longer than
        the 20 characters the defaults were written for, or a name longer than "Retain", eats
        into every SMS."""
        found = []
        for key in self.keys():
            template = self.get(key)
            if template is None or key.channel is not Channel.SMS:
                continue
            sample = sample_variables(key.locale, public_url=self.public_url, brand=self.brand)
            with contextlib.suppress(TemplateRenderError):
                # The longer way: the store does not know the sender (a saved template fits both).
                longest = max(
                    (
                        count_sms(render(template, way, strict=False).text)
                        for way in sms_variants(sample, key.locale)
                    ),
                    key=lambda c: (c.segments, c.units),
                )
                if longest.segments > MAX_SMS_SEGMENTS:
                    found.append((key, longest))
        return found

    def put(self, template: Template) -> None:
        """Add or replace an override; ``TemplateInvalidError`` when it does not validate."""
        errors = self.validate(template)
        if errors:
            raise TemplateInvalidError(errors)
        self._overrides[template.key] = template
        self._resolved.clear()

    def remove(self, key: TemplateKey) -> bool:
        """Drop an override (the default, if any, applies again)."""
        self._resolved.clear()
        return self._overrides.pop(key, None) is not None


__all__ = [
    "DEFAULT_BRAND",
    "DEFAULT_PERKS",
    "OPTIONAL_VARIABLES",
    "VARIABLES",
    "Brand",
    "Rendered",
    "SmsCount",
    "Template",
    "TemplateError",
    "TemplateInvalidError",
    "TemplateKey",
    "TemplateNotFoundError",
    "TemplateRenderError",
    "TemplateStore",
    "build_variables",
    "count_sms",
    "default_templates",
    "first_name_of",
    "formatting_locale",
    "locale_chain",
    "render",
    "required_variables",
    "sample_variables",
    "validate_template",
]
