"""Template render limits (SPEC §7): every render (save-time check, preview, dispatch) runs under a
budget that no filter, method or operator gets around.

Each case is sized so that, without the limits, it renders a result just over them quickly instead of
failing (the tests then fail, they do not hang); the unbounded forms from the review follow only
once the small form has been refused.
"""

from __future__ import annotations

import time

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from duecourse.messaging import rendering

API = "/api/v1"
LIMIT = "100,000"


def _refused(source: str, *words: str, **context: object) -> str:
    started = time.monotonic()
    with pytest.raises(rendering.RenderError) as info:
        rendering.render(source, {**rendering.SAMPLE_CONTEXT, **context}, field="body_text")
    assert time.monotonic() - started < 5, "a refused template must fail fast"
    message = info.value.message
    assert info.value.field == "body_text" and message.startswith("cannot be rendered: "), message
    for word in words:
        assert word in message, message
    return message


def test_center_width_is_limited():
    assert "center filter" in _refused("{{ debtor_name|center(20000000) }}", LIMIT)
    assert rendering.check("{{ debtor_name|center(20000000) }}", "body_text")[0].message.startswith(
        "cannot be rendered: center filter: the result exceeds 100,000"
    )


def test_percent_operator_width_is_limited():
    _refused("{{ '%020000000d' % 1 }}", "formatted text exceeds", LIMIT)
    _refused("{{ '%0*d' % (20000000, 1) }}", "formatted text exceeds", LIMIT)


def test_str_format_width_is_limited():
    _refused("{{ '{:>20000000}'.format(1) }}", "formatted text exceeds", LIMIT)
    _refused("{{ '{:>{}}'.format(1, 20000000) }}", "formatted text exceeds", LIMIT)


def test_format_filter_width_is_limited():
    _refused("{{ '%20000000s'|format('a') }}", "format filter", LIMIT)


def test_concatenation_is_limited():
    _refused("{% set a = 'x' * 100000 %}{% set b = a ~ a ~ a ~ a %}{{ b|length }}", "concatenated text", LIMIT)


def test_replace_result_is_limited():
    # 'x' * 1000 with every x replaced by 1000 characters: 1,000,000 characters without the limit.
    _refused("{{ ('x' * 1000)|replace('x', 'y' * 1000)|length }}", "replace filter", LIMIT)
    _refused("{{ ('x' * 100000)|replace('x', 'y' * 1000)|length }}", "replace filter", LIMIT)
    _refused("{{ ('x' * 1000).replace('x', 'y' * 1000)|length }}", "replace()", LIMIT)


def test_indent_width_is_limited():
    _refused("{{ ('x\n' * 1000)|indent(1000)|length }}", "indent filter", LIMIT)


def test_nested_loops_share_one_budget():
    steps = "100,000 steps"
    # 1,000,000 iterations in total, each level well under the range limit.
    loops = "{% for i in range(100) %}{% for j in range(100) %}{% for k in range(100) %}{% endfor %}{% endfor %}{% endfor %}"
    _refused(loops, steps)
    _refused(loops.replace("100", "1000"), steps)  # 10**9 iterations: minutes without the budget


def test_integer_results_are_limited():
    bits = "4,096 bits"
    _refused("{{ ((9 ** 100) ** 100) ** 10 > 0 }}", bits)  # 317,000 bits, a few milliseconds unbounded
    _refused("{{ (((9 ** 100) ** 100) ** 100) ** 100 }}", bits)
    _refused("{{ ('9' * 4000)|int * ('9' * 4000)|int > 0 }}", bits)


def test_output_is_limited():
    _refused("{% for i in range(200) %}{{ 'x' * 1000 }}{% endfor %}", "template output exceeds 100,000 characters")
    _refused("{% for i in range(200) %}" + "y" * 1000 + "{% endfor %}", "template output exceeds 100,000 characters")


def test_a_branch_the_sample_values_skip_is_still_bounded_at_dispatch():
    expensive = "{% for i in range(100) %}{% for j in range(100) %}{% for k in range(100) %}{% endfor %}{% endfor %}{% endfor %}"
    source = "{% if debtor_name != 'Jane Doe' %}" + expensive + "{% endif %}Hello {{ debtor_name }}"
    # The save-time check renders the sample values, which skip the branch ...
    assert rendering.check(source, "body_text") == []
    assert rendering.render(source, dict(rendering.SAMPLE_CONTEXT), field="body_text") == "Hello Jane Doe"
    # ... but any render of it (preview, dispatch) is under the same budget: a quick RenderError,
    # which dispatch records as a non-retryable template_error.
    _refused(source, "100,000 steps", debtor_name="Bob Debtor")
    _refused(source.replace("100", "1000"), "100,000 steps", debtor_name="Bob Debtor")


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{% set a = 'x' * 100000 %}{{ [a, a]|join|length }}", ("a value exceeds",)),  # literal list of big values
        ("{{ ('x' * 1000)|join('y' * 1000)|length }}", ("joined text",)),
        ("{{ ('y' * 1000).join('x' * 1000)|length }}", ("join()",)),
        ("{% set l = [1] %}{% for i in range(18) %}{{ l.extend(l) }}{% endfor %}{{ l|length }}", ("a value exceeds",)),
        ("{{ (1).to_bytes(200000, 'big')|length }}", ("to_bytes()",)),
        ("{{ ('\t' * 1000).expandtabs(1000)|length }}", ("expandtabs()",)),
        ("{{ 'x'.ljust(200000)|length }}", ("ljust()",)),
        ("{{ lipsum(300)|length }}", ("lipsum",)),
        ("{{ ('a b ' * 500)|wordwrap(1, wrapstring='y' * 1000)|length }}", ("wordwrap filter",)),
        ("{{ [1]|batch(200000, 0)|list|length }}", ("batch filter",)),
        ("{{ {'a': 'x' * 50000}|tojson(200000)|length }}", ("tojson filter",)),
        ("{% for i in range(1000) %}{% for c in ('x' * 1000)|list %}{% endfor %}{% endfor %}", ("steps",)),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ("recursion",)),
    ],
)
def test_other_ways_to_grow_a_value_are_limited(source, words):
    _refused(source, *words)


NORMAL = [
    # the demo templates (src/duecourse/demo.py)
    "Hello {{ debtor_name }},\n\nInvoice {{ carrying_invoice_number }} for {{ carrying_invoice_amount }} "
    "{{ currency }} was due on {{ carrying_invoice_due_date }}. You can pay here: {{ payment_link }}\n\n"
    "Unsubscribe: {{ unsubscribe_link }}",
    "Dear {{ debtor_name }},\n\nYour balance of {{ balance }} {{ currency }} "
    "{% if days_overdue and days_overdue > 0 %}is {{ days_overdue }} days overdue"
    "{% else %}falls due on {{ carrying_invoice_due_date }}{% endif %}. "
    "Please pay today: {{ payment_link }}\n\nUnsubscribe: {{ unsubscribe_link }}",
    "{{ organization_name }}: {{ balance }} {{ currency }} is overdue. Pay: {{ payment_link }}",
    # loops, filters, macros, blocks, comparisons, slices, formatting
    "{% for w in debtor_name.split() %}{{ loop.index }}:{{ w|upper }}{% if not loop.last %}, {% endif %}{% endfor %}",
    "{% macro line(k, v) %}<li>{{ k }}={{ v }}</li>{% endmacro %}"
    "<ul>{% for k, v in {'a': debtor_name, 'b': '<x>'}|dictsort %}{{ line(k, v) }}{% endfor %}</ul>",
    "{% set ns = namespace(total=0) %}{% for i in range(5) %}{% set ns.total = ns.total + i %}{% endfor %}"
    "{{ ns.total }} {{ 0 < days_overdue < 30 }} {{ 1 < 2 > 5 }} {{ 'Jane' in debtor_name }}",
    "{% set x %}Block {{ debtor_name }} & co{% endset %}{{ x|trim }} {{ x|length }} {{ x[2:5] }} {{ debtor_name[::-1] }}",
    "{% filter upper %}filtered {{ balance }}{% endfilter %} {{ '%s owes %.2f'|format(debtor_name, balance|float) }} "
    "{{ '{} {}'.format(currency, balance) }} {{ '%5s|%-5s|%05.1f' % ('a', 'b', 3.14159) }}",
    "{{ debtor_name ~ ' <' ~ currency ~ '>' }} {{ [1, 2, 3]|join('|') }} {{ {'k': debtor_name}|tojson }} "
    "{{ [3, 1, 2]|sort|list }} {{ [1, 2, 2, 3]|unique|list }} {{ [1, 2, 3, 4]|select('odd')|list }} {{ 2 ** 10 }}",
    "{% macro card(title) %}<div>{{ title }}: {{ caller() }}</div>{% endmacro %}{% call card('T<') %}"
    "body {{ balance }}{% endcall %}{% for i in range(3) %}{{ loop.cycle('a', 'b') }}{{ loop.length }}{% endfor %}",
    "{{ balance|float|round(1) }} {{ days_overdue|string|center(9) }}|{{ 'x\ny'|indent(2, true) }} "
    "{{ 'a b c'|wordwrap(3) }} {{ 'hello world'|truncate(9, leeway=0) }} {{ debtor_name|replace('J', 'j') }}",
]


@pytest.mark.parametrize("html", [False, True])
def test_normal_templates_render_exactly_as_before(html):
    plain = SandboxedEnvironment(undefined=StrictUndefined, autoescape=html, keep_trailing_newline=True)
    for source in NORMAL:
        expected = plain.from_string(source).render(rendering.SAMPLE_CONTEXT)
        assert rendering.render(source, dict(rendering.SAMPLE_CONTEXT), field="body_text", html=html) == expected
        assert rendering.check(source, "body_text", html=html) == []
    looped = "{% for w in debtor_name.split() %}{{ loop.index }}:{{ w|upper }}{% if not loop.last %}, {% endif %}{% endfor %}"
    assert rendering.render(looped, {"debtor_name": "Jane Q Doe"}, field="body_text") == "1:JANE, 2:Q, 3:DOE"


def test_preview_reports_a_limit_as_a_validation_error(org):
    # The sample organization name is "Example Receivables"; the preview uses the real one.
    body = (
        "{% if organization_name != 'Example Receivables' %}"
        "{% for i in range(100) %}{% for j in range(100) %}{% for k in range(100) %}{% endfor %}{% endfor %}{% endfor %}"
        "{% endif %}{{ organization_name }}"
    )
    created = org.post(f"{API}/templates", json={"name": "Sneaky", "channel": "sms", "body_text": body})
    assert created.status_code == 201, created.text
    r = org.post(f"{API}/templates/{created.json()['id']}/preview", json={})
    assert r.status_code == 422, r.text
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["body_text"]
    assert "100,000 steps" in r.json()["error"]["message"], r.text
