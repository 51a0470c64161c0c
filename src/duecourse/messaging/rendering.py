"""Template rendering (SPEC §7): a Jinja2 sandbox that sees only the documented variables.

Template text comes from users, so it is rendered in :class:`SandboxedEnvironment` with
``StrictUndefined`` (a misspelt variable is an error, never an empty string). At save time a
template is parsed, its variables are checked against :data:`VARIABLES`, and it is rendered once
with sample values so that errors only visible at render time are reported then, not at dispatch.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import operator
import re
import types
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sized
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import lru_cache, update_wrapper
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError, meta, nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Environment, Template
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import SandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter, SecurityError
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup, soft_str

from duecourse.errors import FieldError

VARIABLES: tuple[str, ...] = (
    "debtor_name",
    "balance",
    "currency",
    "carrying_invoice_number",
    "carrying_invoice_amount",
    "carrying_invoice_due_date",
    "days_overdue",
    "payment_link",
    "unsubscribe_link",
    "organization_name",
)

SAMPLE_CONTEXT: dict[str, Any] = {
    "debtor_name": "Jane Doe",
    "balance": "1250.00",
    "currency": "EUR",
    "carrying_invoice_number": "INV-1001",
    "carrying_invoice_amount": "800.00",
    "carrying_invoice_due_date": "2026-02-01",
    "days_overdue": 29,
    "payment_link": "https://pay.example.invalid/sample",
    "unsubscribe_link": "https://example.invalid/unsubscribe/sample",
    "organization_name": "Example Receivables",
}

# Bounds on what a template can make the renderer do; a collections message needs none of this.
# Every render (the save-time check, preview and dispatch) runs under all of them: a dispatch worker
# serves many organizations, so one template must not be able to hang it or exhaust its memory.
MAX_RANGE = 1000  # items of one range()
MAX_EXPONENT = 100  # of **
MAX_VALUE_SIZE = 100_000  # characters (strings) or items (lists, dicts, ...) of any value a template makes
MAX_SEQUENCE = MAX_VALUE_SIZE  # of 'x' * n (the older name of the same limit)
MAX_INTEGER_BITS = 4096  # of any integer a template computes (about 1,233 digits)
MAX_OUTPUT = 100_000  # characters of the rendered text
MAX_STEPS = 100_000  # loop iterations, calls, filters, tests, operators and outputs of one render
MAX_WORK = 2_000_000  # characters or items that one render's calls, filters and operators read or write


class TemplateLimitError(SecurityError):
    """A render went over one of the limits above (a :class:`TemplateError`, so it is reported like
    any other render failure: a 422 at save time or in preview, ``template_error`` at dispatch)."""


def _n(value: int) -> str:
    return f"{value:,}"


def _too_big(what: str = "a value") -> TemplateLimitError:
    return TemplateLimitError(f"{what} exceeds {_n(MAX_VALUE_SIZE)} characters or items")


class _Budget:
    """What one render may still do; lives in :data:`_BUDGET` for the duration of the render."""

    __slots__ = ("steps", "work")

    def __init__(self) -> None:
        self.steps = 0
        self.work = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateLimitError(
                f"template exceeds {_n(MAX_STEPS)} steps (loop iterations, calls, filters and operations)"
            )

    def spend(self, units: int) -> None:
        self.work += units
        if self.work > MAX_WORK:
            raise TemplateLimitError(f"template processes more than {_n(MAX_WORK)} characters or items")


_BUDGET: ContextVar[_Budget | None] = ContextVar("duecourse_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # fail closed: e.g. Template.generate(), or constant folding at compile time
        raise TemplateLimitError("templates can only be rendered through duecourse.messaging.rendering")
    return budget


_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_CONTAINERS = (list, tuple, set, frozenset, dict, deque, Namespace, *_DICT_VIEWS)
_TEXT_TYPES = (str, bytes, bytearray)


def _measure(value: Any, limit: int = MAX_VALUE_SIZE) -> int:
    """Size of ``value``: the length of a string, the items of a container counted recursively (each
    at least 1, so nesting and cycles cannot hide anything), 1 for anything else. Stops counting once
    it is over ``limit``, so the cost of measuring is bounded too."""
    if isinstance(value, _TEXT_TYPES):
        return len(value)
    if not isinstance(value, _CONTAINERS):
        return 1
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _TEXT_TYPES):
            total += max(1, len(item))
            continue
        if item is not value:
            total += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, Namespace):
            stack.extend(item._Namespace__attrs.values())  # type: ignore[attr-defined]
        elif isinstance(item, _CONTAINERS):
            stack.extend(item)
        if total > limit:
            break
    return max(total, 1)


def _take(*values: Any) -> None:
    """Charge one step and the size of the inputs of an operation; refuse inputs over the limit."""
    budget = _budget()
    budget.step()
    for value in values:
        size = _measure(value)
        if size > MAX_VALUE_SIZE:
            raise _too_big()
        budget.spend(size)


def _plumbing(value: Any) -> bool:
    return isinstance(value, (Context, EvalContext, Environment))


def _result(value: Any) -> Any:
    """Check (and charge) what an operation produced; count the items of a lazy result as steps."""
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise TemplateLimitError(f"integer result exceeds {_n(MAX_INTEGER_BITS)} bits")
    size = _measure(value)
    if size > MAX_VALUE_SIZE:
        raise _too_big("a result")
    _budget().spend(size)
    if isinstance(value, Iterator) and not isinstance(value, (Sized, _Counted)):
        return _Counted(value)
    return value


class _Counted:
    """An iterator whose every item is a step: loops, and lazy filter results consumed anywhere."""

    __slots__ = ("_iterator",)

    def __init__(self, iterable: Any) -> None:
        self._iterator = iter(iterable)

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        item = next(self._iterator)
        _budget().step()
        return item


def _require(estimate: int, what: str = "the result") -> None:
    if estimate > MAX_VALUE_SIZE:
        raise _too_big(what)


def _length(value: Any, convert: Callable[[Any], str] = str) -> int:
    try:
        return len(value) if isinstance(value, _TEXT_TYPES) and convert is str else len(convert(value))
    except Exception:  # noqa: BLE001 - the operation itself will raise the same error
        return 0


def _count(text: Any, sub: Any) -> int:
    if not isinstance(text, _TEXT_TYPES):
        return 0
    if not isinstance(sub, type(text)) or not sub:
        return len(text) + 1
    return text.count(sub)


def _replaced_size(text: Any, old: Any, new: Any, count: Any = -1) -> int:
    occurrences = _count(text, old)
    if isinstance(count, int) and count >= 0:
        occurrences = min(occurrences, count)
    return _length(text) + occurrences * max(0, _length(new) - _length(old))


def _joined_size(separator: Any, items: list[Any]) -> int:
    return max(0, len(items) - 1) * _length(separator) + sum(_length(i) if isinstance(i, _TEXT_TYPES) else 0 for i in items)


def _check_percent(fmt: Any, values: Any) -> None:
    """``fmt % values`` (the ``%`` operator and the ``format`` filter): refuse it before it runs if
    its widths, precisions and arguments add up to more than the limit (``'%020000000d' % 1``)."""
    if not isinstance(fmt, _TEXT_TYPES):
        return
    text = fmt.decode("latin-1") if isinstance(fmt, (bytes, bytearray)) else fmt
    if isinstance(values, tuple):
        positional, mapping = list(values), None
    elif isinstance(values, Mapping):
        positional, mapping = [values], values
    else:
        positional, mapping = [values], None
    estimate, i, n = len(text), 0, len(text)

    def number(value: Any) -> int:
        return abs(value) if isinstance(value, int) else 0

    while True:
        i = text.find("%", i)
        if i < 0 or i + 1 >= n:
            break
        i += 1
        key = None
        if text[i] == "(":
            depth, start = 1, i + 1
            i += 1
            while i < n and depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            key = text[start : i - 1]
        while i < n and text[i] in "-+ #0":
            i += 1
        sizes = []
        for prefix in ("", "."):
            if prefix:
                if i >= n or text[i] != ".":
                    break
                i += 1
            if i < n and text[i] == "*":
                sizes.append(number(positional.pop(0)) if positional else 0)
                i += 1
            else:
                start = i
                while i < n and text[i].isdigit():
                    i += 1
                digits = text[start:i]
                sizes.append(int(digits) if 0 < len(digits) <= 9 else (MAX_VALUE_SIZE + 1 if digits else 0))
        while i < n and text[i] in "hlL":
            i += 1
        if i >= n:
            break
        conversion = text[i]
        i += 1
        if conversion == "%":
            estimate += 1
            continue
        if key is not None and mapping is not None:
            try:
                value = mapping[key]
            except Exception:  # noqa: BLE001 - formatting fails the same way
                value = ""
        else:
            value = positional.pop(0) if positional else ""
        if conversion in "rsa":
            size = _length(value, {"r": repr, "s": str, "a": ascii}[conversion])
        else:  # numbers: a float's %f has up to 309 digits before the point
            size = 330
        estimate += sum(sizes) + size
        if estimate > MAX_VALUE_SIZE:
            raise _too_big("formatted text")


_LARGE_NUMBER = re.compile(r"\d{7,}|\d+")


def _check_format_spec(spec: str) -> None:
    """A ``str.format`` field: no width or precision over the limit (``'{:>20000000}'``)."""
    for match in _LARGE_NUMBER.finditer(spec):
        digits = match.group()
        if len(digits) > 6 or int(digits) > MAX_VALUE_SIZE:
            raise _too_big("formatted text")


class _LimitedFormatting:
    """Mixin for the sandbox's ``str.format`` formatters: limits each field and the running total."""

    _produced = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._produced = len(format_string)
        return super().vformat(format_string, args, kwargs)  # type: ignore[misc, no-any-return]

    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_format_spec(format_spec)
        rv = super().format_field(value, format_spec)  # type: ignore[misc]
        self._produced += len(rv)
        if self._produced > MAX_VALUE_SIZE:
            raise _too_big("formatted text")
        return rv


class _Formatter(_LimitedFormatting, SandboxedFormatter):
    pass


class _EscapeFormatter(_LimitedFormatting, SandboxedEscapeFormatter):
    pass


def _small_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateLimitError(f"range is limited to {MAX_RANGE} items")
    return rng


def _small_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    words = max if isinstance(max, int) and isinstance(min, int) and max > min else min
    if not (isinstance(n, int) and isinstance(words, int)) or n * abs(words) * 12 > MAX_VALUE_SIZE:
        raise _too_big("lipsum text")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


# Filters whose arguments decide how big their result is: checked before they run (with the
# filter's arguments, less the context, eval context or environment it may be passed).
def _pre_center(value: Any, width: Any = 80) -> None:
    _require(width if isinstance(width, int) else 0)


def _pre_indent(s: Any, width: Any = 4, first: Any = False, blank: Any = False) -> None:
    indent = width if isinstance(width, int) else _length(width)
    _require(_length(s) + (_count(str(s), "\n") + 1) * indent)


def _pre_format(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_percent(str(value), kwargs or args)


def _pre_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    _require(_replaced_size(str(s), str(old), str(new), -1 if count is None else count))


def _pre_wordwrap(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, *a: Any, **k: Any) -> None:
    _require(_length(s) + (_length(s) + 1) * (_length(wrapstring) if wrapstring is not None else 1))


def _pre_batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    _require(linecount if isinstance(linecount, int) else 0)


def _pre_slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    _require(slices if isinstance(slices, int) else 0)


def _pre_urlize(value: Any, trim_url_limit: Any = None, nofollow: Any = False, target: Any = None,
                rel: Any = None, extra_schemes: Any = None, *a: Any, **k: Any) -> None:
    words = len(str(value).split()) + 1
    _require(3 * _length(value) + words * (_length(target or "") + _length(rel or "") + 64))


def _pre_tojson(value: Any, indent: Any = None) -> None:
    _require(indent if isinstance(indent, int) else 0)


_PRECHECKS: dict[str, Callable[..., None]] = {
    "center": _pre_center,
    "indent": _pre_indent,
    "format": _pre_format,
    "replace": _pre_replace,
    "wordwrap": _pre_wordwrap,
    "batch": _pre_batch,
    "slice": _pre_slice,
    "urlize": _pre_urlize,
    "tojson": _pre_tojson,
}
# Filters that do much work per item in Python (charged that many times their input).
_WEIGHTS = {"pprint": 10, "wordwrap": 5, "urlize": 5, "groupby": 3, "dictsort": 3, "sort": 3, "unique": 3,
            "tojson": 3, "xmlattr": 3, "striptags": 3, "title": 2}


def _limited(name: str, func: Callable[..., Any], *, is_filter: bool) -> Callable[..., Any]:
    precheck = _PRECHECKS.get(name) if is_filter else None
    weight = _WEIGHTS.get(name, 1) if is_filter else 1

    @functools.wraps(func)  # keeps jinja_pass_arg (pass_context, pass_eval_context, ...)
    def limited(*args: Any, **kwargs: Any) -> Any:
        user = [a for a in args if not _plumbing(a)]
        _take(*user, *kwargs.values())
        if weight > 1:
            _budget().spend((weight - 1) * sum(_measure(a) for a in user))
        if is_filter and name == "join":
            args = _materialize_join(args, kwargs)
        elif is_filter and name == "sum":
            args = _check_sum(args, kwargs)
        if precheck is not None:
            try:
                bound = inspect.signature(precheck).bind(*user, **kwargs)
            except TypeError:
                pass  # the filter raises the same error when called
            else:
                try:
                    precheck(*bound.args, **bound.kwargs)
                except TemplateLimitError as exc:
                    raise TemplateLimitError(f"{name} filter: {exc}") from None
        return _result(func(*args, **kwargs))

    return limited


def _materialize_join(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    # join(eval_ctx, value, d="", attribute=None): the separator is repeated once per item.
    if len(args) < 2:
        return args
    items = list(args[1])
    size = sum(_measure(i) for i in items)
    if size > MAX_VALUE_SIZE:
        raise _too_big()
    separator = args[2] if len(args) > 2 else kwargs.get("d", "")
    _require(_joined_size(str(separator), items), "joined text")
    return (args[0], items, *args[2:])


def _check_sum(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    # sum(environment, iterable, attribute=None, start=0): adding lists or strings copies the total
    # so far each time (quadratic), so that copying is charged before it happens.
    if len(args) < 2:
        return args
    items = list(args[1])
    start = args[3] if len(args) > 3 else kwargs.get("start", 0)
    running, copied = _measure(start), 0
    for item in items:
        if isinstance(item, (*_TEXT_TYPES, list, tuple)):
            running += len(item)
            copied += running
    _budget().spend(copied)
    return (args[0], items, *args[2:])


class _LimitedCodeGenerator(CodeGenerator):
    """Routes through the environment what the standard compiler does inline: loops, ``~``,
    comparisons, slices and literal output."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        # {% for x in xs %} iterates environment.limited_iter(xs): every iteration is a step.
        for loop in node.find_all(nodes.For):
            guard = nodes.EnvironmentAttribute("limited_iter", lineno=loop.iter.lineno)
            loop.iter = nodes.Call(guard, [loop.iter], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.limited_concat({func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        if len(node.ops) == 1:
            self.write(f"environment.limited_compare({node.ops[0].op!r}, ")
            self.visit(node.expr, frame)
            self.write(", ")
            self.visit(node.ops[0].expr, frame)
            self.write(")")
            return
        # a < b < c: each operand evaluated once, and only if the comparisons before it held
        self.write("environment.limited_compare_chain(")
        self.visit(node.expr, frame)
        for op in node.ops:
            self.write(f", {op.op!r}, lambda: ")
            self.visit(op.expr, frame)
        self.write(")")

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.limited_slice(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
            self.write(", ")
        self.write("))")

    # Output at the top level of a template (not in a loop, a macro or a {% set %} block) happens
    # once per render and is bounded by the template's own text; _run counts it as it streams out.
    # Only the rest is charged as it is produced: most messages print a few variables and nothing
    # else, and charging each of them made a render three times slower.
    _top_level = False

    def visit_Output(self, node: nodes.Output, frame: Frame) -> None:
        self._top_level = frame.toplevel and frame.buffer is None
        if not self._top_level:
            super().visit_Output(node, frame)
            return
        charged, self._finalize = self._finalize, _TOP_FINALIZE
        try:  # (_make_finalize keeps its result in _finalize: the top level gets its own)
            super().visit_Output(node, frame)
        finally:
            self._finalize, self._top_level = charged, False

    def _output_const_repr(self, group: Any) -> str:
        text = super()._output_const_repr(group)
        return text if self._top_level else f"environment.limited_text({text})"


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gteq": operator.ge,
    "lt": operator.lt,
    "lteq": operator.le,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}

_SIZED_BY_WIDTH = frozenset({"center", "ljust", "rjust", "zfill"})


class _LimitedTemplate(Template):
    def render(self, *args: Any, **kwargs: Any) -> str:
        return _run(self, self.new_context(dict(*args, **kwargs)))


_FREE_TEXT = 1000  # characters of a printed string that are not charged (see _top_finalize)


def _top_finalize(value: Any) -> Any:
    """``{{ ... }}`` at the top level. A short string (a name, an amount, a link) costs nothing: the
    template's own text bounds how many there are. A longer one is charged to the work budget (a
    template printing a 100,000-character value a thousand times fails); anything else is refused
    before it is turned into a huge string."""
    if type(value) is str:
        if len(value) > _FREE_TEXT:
            _budget().spend(len(value))
        return value
    _take(value)
    return value


_TOP_FINALIZE = CodeGenerator._FinalizeInfo(None, "environment.top_finalize(")


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    """Every ``{{ ... }}``: printing a value is charged like any operation (and a huge list is
    refused before it is turned into a huge string)."""
    _take(value)
    return value


class _Sandbox(SandboxedEnvironment):
    """The standard sandbox, plus a budget per render (see the limits above): every value a call,
    filter, test or operator produces is bounded, loops and calls are counted, and so is output."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    code_generator_class = _LimitedCodeGenerator
    template_class = _LimitedTemplate

    def __init__(self, *, autoescape: bool) -> None:
        # Not optimized: the optimizer evaluates constant expressions at compile time, outside a budget.
        super().__init__(undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=True,
                         optimized=False, finalize=_finalize)
        self.globals["range"] = _small_range
        self.globals["lipsum"] = _small_lipsum
        self.filters = {name: _limited(name, f, is_filter=True) for name, f in self.filters.items()}
        self.tests = {name: _limited(name, f, is_filter=False) for name, f in self.tests.items()}
        self.policies["json.dumps_function"] = _bounded_json_dumps

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        _take(left, right)
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise TemplateLimitError(f"exponent too large (the limit is {MAX_EXPONENT})")
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if left.bit_length() * right > MAX_INTEGER_BITS:
                    raise TemplateLimitError(f"integer result exceeds {_n(MAX_INTEGER_BITS)} bits")
        elif operator_ == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (*_TEXT_TYPES, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE:
                    raise TemplateLimitError(f"repetition too large: exceeds {_n(MAX_SEQUENCE)} characters or items")
        elif operator_ == "%":
            _check_percent(left, right)
        return _result(self.binop_table[operator_](left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _take(*args, *kwargs.values())
        if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
            args = (_Counted(args[0]), *args[1:])
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (*_TEXT_TYPES, int)) and not isinstance(owner, bool):
            name = getattr(__obj, "__name__", "")
            try:
                args = _check_method(owner, name, args, kwargs)
            except TemplateLimitError as exc:
                raise TemplateLimitError(f"{name}(): {exc}") from None
        rv = SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
        if isinstance(owner, _CONTAINERS) and _measure(owner) > MAX_VALUE_SIZE:  # l.extend(l), ...
            raise _too_big()
        return _result(rv)

    def limited_iter(self, iterable: Any) -> _Counted:
        return _Counted(iterable)

    def limited_concat(self, join: Callable[[Any], Any], parts: tuple[Any, ...]) -> Any:
        _take(*parts)
        total = 0
        texts = []
        for part in parts:
            text = soft_str(part)
            total += len(text)
            _require(total, "concatenated text")
            texts.append(text)
        return _result(join(texts))

    def limited_compare(self, op: str, left: Any, right: Any) -> Any:
        _take(left, right)
        return _COMPARE[op](left, right)

    def limited_compare_chain(self, left: Any, *rest: Any) -> Any:
        result: Any = True
        for i in range(0, len(rest), 2):
            right = rest[i + 1]()
            result = self.limited_compare(rest[i], left, right)
            if not result:
                return result
            left = right
        return result

    def limited_slice(self, obj: Any, index: slice) -> Any:
        _take(obj)
        return _result(obj[index])

    top_finalize = staticmethod(_top_finalize)

    def limited_text(self, text: str) -> str:
        budget = _budget()
        budget.step()
        budget.spend(len(text))
        return text

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """As the sandbox's, with formatters that limit widths, precisions and the result."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        f_self: Any = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type: type[str] = type(f_self)
        is_format_map = value.__name__ == "format_map"
        formatter: SandboxedFormatter
        if isinstance(f_self, Markup):
            formatter = _EscapeFormatter(self, escape=f_self.escape)
        else:
            formatter = _Formatter(self)
        vformat = formatter.vformat

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            return str_type(vformat(f_self, args, kwargs))

        return update_wrapper(wrapper, value)


def _check_method(owner: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Methods of strings, bytes and integers whose arguments decide the size of the result."""
    if isinstance(owner, int):
        if name == "to_bytes":
            length = args[0] if args else kwargs.get("length", 1)
            _require(length if isinstance(length, int) else 0)
        return args
    if name in _SIZED_BY_WIDTH:
        width = args[0] if args else kwargs.get("width", 0)
        _require(width if isinstance(width, int) else 0)
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        _require(len(owner) + _count(owner, "\t" if isinstance(owner, str) else b"\t") * (tabsize if isinstance(tabsize, int) else 0))
    elif name == "replace" and len(args) >= 2:
        _require(_replaced_size(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1)))
    elif name == "join" and args:
        items = list(args[0])
        _take(items)
        _require(_joined_size(owner, items), "joined text")
        args = (items, *args[1:])
    elif name == "translate" and args:
        table = args[0]
        values = table.values() if isinstance(table, Mapping) else table if isinstance(table, (list, tuple)) else ()
        longest = max((_length(v) for v in values if isinstance(v, _TEXT_TYPES)), default=1)
        _require(len(owner) * max(1, longest))
    return args


def _bounded_json_dumps(obj: Any, **kwargs: Any) -> str:
    """``tojson``: with an indent the encoder writes piece by piece; stop once it is too long."""
    if kwargs.get("indent") is None:
        return json.dumps(obj, **kwargs)
    chunks = []
    total = 0
    for chunk in json.JSONEncoder(**kwargs).iterencode(obj):
        total += len(chunk)
        _require(total, "JSON text")
        chunks.append(chunk)
    return "".join(chunks)


_TOO_DEEP = "template recursion is too deep"


def _run(template: Template, context: Context) -> str:
    """Render under a fresh budget; refuse an output over :data:`MAX_OUTPUT`. What a render can
    write before that check is bounded: output in loops, macros and blocks is charged as it is made
    (:data:`MAX_WORK`), and the top level's by the template's own text (see :func:`_top_finalize`)."""
    token = _BUDGET.set(_Budget())
    try:
        text: str = template.environment.concat(template.root_render_func(context))  # type: ignore[attr-defined]
    finally:
        _BUDGET.reset(token)
    if len(text) > MAX_OUTPUT:
        raise TemplateLimitError(f"template output exceeds {_n(MAX_OUTPUT)} characters")
    return text


_TEXT = _Sandbox(autoescape=False)
_HTML = _Sandbox(autoescape=True)


def _env(html: bool) -> _Sandbox:
    return _HTML if html else _TEXT


def check(source: str, field: str, *, html: bool = False) -> list[FieldError]:
    """Errors that make ``source`` unusable: syntax (with its line), unknown variables, render failures."""
    env = _env(html)
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as exc:
        return [FieldError(field, f"template syntax error on line {exc.lineno}: {exc.message}")]
    unknown = sorted(meta.find_undeclared_variables(ast) - set(VARIABLES))
    if unknown:
        names = ", ".join(unknown)
        return [
            FieldError(
                field,
                f"unknown variable{'s' if len(unknown) > 1 else ''} {names} (allowed: {', '.join(VARIABLES)})",
            )
        ]
    try:
        env.from_string(source).render(SAMPLE_CONTEXT)  # under the same budget as any render
    except (TemplateError, ArithmeticError, TypeError, ValueError) as exc:
        return [FieldError(field, f"cannot be rendered: {exc}")]
    except RecursionError:
        return [FieldError(field, f"cannot be rendered: {_TOO_DEEP}")]
    return []


class RenderError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class VariableUnavailable(UndefinedError):
    """A documented variable that has no value for this organization (e.g. no payment link configured)."""


def unavailable(name: str, reason: str) -> Any:
    """A context value for a variable that cannot be filled in: a template that prints it (or tests
    it, or filters it) fails to render with ``reason``; one that does not use it renders as usual, and
    ``{{ name | default(...) }}`` / ``{% if name is defined %}`` let an author offer a fallback."""
    return StrictUndefined(hint=reason, name=name, exc=VariableUnavailable)


@lru_cache(maxsize=512)
def _compiled(source: str, html: bool) -> tuple[Any, dict[str, Any]]:
    # Compiling is most of the cost of a render; a dispatch renders the same few templates again and
    # again. With the template, its globals as a plain dict (see ``render``).
    template = _env(html).from_string(source)
    return template, dict(template.globals)


@lru_cache(maxsize=512)
def _plain_parts(source: str, html: bool) -> tuple[tuple[str, bool], ...] | None:
    """A template that is only text and ``{{ variable }}`` (most messages are): its parts in order,
    each a piece of text or a variable's name (``True``), as the parser reads them (whitespace
    control, comments and ``keep_trailing_newline`` applied). None for any other template."""
    try:
        body = _env(html).parse(source).body
    except TemplateSyntaxError:
        return None
    parts: list[tuple[str, bool]] = []
    for node in body:
        if not isinstance(node, nodes.Output):
            return None
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                parts.append((child.data, False))
            elif isinstance(child, nodes.Name) and child.ctx == "load":
                parts.append((child.name, True))
            else:
                return None
    return tuple(parts)


def _escape(value: str | int) -> str:
    """``markupsafe.escape`` of a string or an integer, as plain text (three times faster)."""
    return str(value).replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;").replace("'", "&#39;").replace(
        '"', "&#34;")


def _render_plain(parts: tuple[tuple[str, bool], ...], context: dict[str, Any], html: bool) -> str | None:
    """What Jinja writes for a plain template, when every variable it prints is a short string or an
    integer of the context (else None, and Jinja renders it: a missing or unavailable variable
    raises there, and a long value is charged to the render's budget)."""
    out = []
    for text, is_name in parts:
        if not is_name:
            out.append(text)
            continue
        value = context.get(text)
        kind = type(value)
        if kind is str:
            if len(value) > _FREE_TEXT:
                return None
        elif kind is not int:
            return None
        out.append(_escape(value) if html else str(value))
    result = "".join(out)
    return result if len(result) <= MAX_OUTPUT else None


def render(source: str, context: dict[str, Any], *, field: str, html: bool = False) -> str:
    parts = _plain_parts(source, html)
    if parts is not None:
        # Text and variables only: the same text as Jinja's, in a sixth of the time (three renders
        # per dispatched email were a tenth of a worker's time).
        text = _render_plain(parts, context, html)
        if text is not None:
            return text
    return _render_jinja(source, context, field=field, html=html)


def _render_jinja(source: str, context: dict[str, Any], *, field: str, html: bool = False) -> str:
    template, template_globals = _compiled(source, html)
    try:
        # What ``Template.render`` does, minus merging the environment's globals (a ChainMap) into a
        # new dict on every call: a dispatched message renders up to three texts, and this halves
        # the cost of each. The variables still shadow the globals, as in ``render``.
        variables = template.new_context({**template_globals, **context}, shared=True)
        return _run(template, variables)
    except VariableUnavailable as exc:
        raise RenderError(field, str(exc)) from None
    except (TemplateError, ArithmeticError, TypeError, ValueError) as exc:
        raise RenderError(field, f"cannot be rendered: {exc}") from None
    except RecursionError:
        raise RenderError(field, f"cannot be rendered: {_TOO_DEEP}") from None


@lru_cache(maxsize=512)
def variables_used(source: str, html: bool = False) -> frozenset[str]:
    """The variables a (valid) template refers to; empty if it does not parse."""
    try:
        return frozenset(meta.find_undeclared_variables(_env(html).parse(source)))
    except TemplateSyntaxError:
        return frozenset()


def amount_text(value: Decimal | None, places: int = 2) -> str:
    if value is None:
        return ""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-places)))


def account_context(
    *,
    debtor_name: str,
    balance: Decimal,
    currency: str,
    currency_places: int,
    invoice_number: str | None,
    invoice_amount: Decimal | None,
    invoice_due_date: date | None,
    today: date,
    payment_link: Any,  # a URL, or rendering.unavailable(...) when none can be given
    unsubscribe_link: str,
    organization_name: str,
) -> dict[str, Any]:
    """The variables of one account (SPEC §7). Missing values (no carrying invoice) render empty."""
    return {
        "debtor_name": debtor_name,
        "balance": amount_text(balance, currency_places),
        "currency": currency,
        "carrying_invoice_number": invoice_number or "",
        "carrying_invoice_amount": amount_text(invoice_amount, currency_places),
        "carrying_invoice_due_date": invoice_due_date.isoformat() if invoice_due_date else "",
        "days_overdue": (today - invoice_due_date).days if invoice_due_date else "",
        "payment_link": payment_link,
        "unsubscribe_link": unsubscribe_link,
        "organization_name": organization_name,
    }


# GSM 03.38: the basic character set (one septet each) and the extension table (two septets each).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")


@dataclass(frozen=True)
class SmsSize:
    encoding: str  # "GSM-7" or "UCS-2"
    characters: int  # what the person typed
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2): what the network counts
    segments: int


def sms_size(text: str) -> SmsSize:
    """Segments of an SMS: GSM-7 fits 160 septets in one message, 153 per part when split;
    anything outside GSM-7 makes the whole message UCS-2: 70 units, 67 per part."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        units = sum(2 if c in GSM7_EXTENSION else 1 for c in text)
        single, part, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part, encoding = 70, 67, "UCS-2"
    if units == 0:
        segments = 0
    elif units <= single:
        segments = 1
    else:
        segments = math.ceil(units / part)
    return SmsSize(encoding=encoding, characters=len(text), units=units, segments=segments)
