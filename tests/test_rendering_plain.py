"""Plain templates (text and ``{{ variable }}`` only) skip Jinja at render time: the text must be
exactly Jinja's, and every case the shortcut does not cover must still go through Jinja."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duecourse.messaging import rendering
from duecourse.messaging.rendering import RenderError, _plain_parts, _render_jinja, render

NAMES = list(rendering.VARIABLES)
TEXT = st.text(alphabet=st.sampled_from(list("ab <>&'\"\n\t-%{}#é€")), max_size=12).filter(
    lambda t: "{{" not in t and "{%" not in t and "{#" not in t and not t.endswith("{"))
VALUE = st.one_of(st.text(alphabet=st.sampled_from(list("xy <>&'\"\n/é")), max_size=20), st.integers(-10**6, 10**6))


@st.composite
def plain_templates(draw):  # type: ignore[no-untyped-def]
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        parts.append(draw(TEXT))
        left, right = draw(st.sampled_from(["{{", "{{-", "{{+"])), draw(st.sampled_from(["}}", "-}}"]))
        parts.append(f"{left} {draw(st.sampled_from(NAMES))} {right}")
        if draw(st.booleans()):
            parts.append("{# a comment #}")
    parts.append(draw(TEXT))
    return "".join(parts)


@settings(max_examples=300, deadline=None)
@given(source=plain_templates(), values=st.lists(VALUE, min_size=len(NAMES), max_size=len(NAMES)), html=st.booleans())
def test_a_plain_template_renders_exactly_as_jinja_does(source, values, html):  # type: ignore[no-untyped-def]
    assert _plain_parts(source, html) is not None
    context = dict(zip(NAMES, values, strict=True))
    assert render(source, context, field="body", html=html) == _render_jinja(source, context, field="body", html=html)


@pytest.mark.parametrize("source", [
    "{{ debtor_name|upper }}", "{% if balance %}x{% endif %}", "{{ 'a' ~ currency }}", "{{ debtor_name.upper() }}",
    "{{ balance }}{{ 1 }}", "{{ range }}",
])
def test_anything_else_goes_through_jinja(source):  # type: ignore[no-untyped-def]
    # Filters, tags, expressions are not plain; a plain name that is not a variable (a global) is
    # left to Jinja when rendered.
    assert _plain_parts(source, False) is None or source == "{{ range }}"
    assert render(source, rendering.SAMPLE_CONTEXT, field="body") == _render_jinja(
        source, rendering.SAMPLE_CONTEXT, field="body")


def test_a_plain_template_still_fails_where_jinja_fails():
    context = {**rendering.SAMPLE_CONTEXT, "payment_link": rendering.unavailable("payment_link", "no payment link set")}
    with pytest.raises(RenderError, match="no payment link set"):
        render("Pay at {{ payment_link }}", context, field="body_text")
    with pytest.raises(RenderError, match="undefined"):
        render("Hello {{ debtor_name }} {{ unknown }}", rendering.SAMPLE_CONTEXT, field="body_text")
    # A long value is charged to the render's budget by Jinja, and the output limit holds.
    long = {**rendering.SAMPLE_CONTEXT, "debtor_name": "x" * 60_000}
    assert render("{{ debtor_name }}", long, field="body_text") == "x" * 60_000
    with pytest.raises(RenderError, match="output exceeds"):
        render("{{ debtor_name }}{{ debtor_name }}", long, field="body_text")
    # HTML escapes what it prints, not the template's own markup.
    html = render("<b>{{ debtor_name }}</b>", {**rendering.SAMPLE_CONTEXT, "debtor_name": "<Tom & \"Jerry's\">"},
                  field="body_html", html=True)
    assert html == "<b>&lt;Tom &amp; &#34;Jerry&#39;s&#34;&gt;</b>"
