"""The webhook filter model (webhookd/filters.py): parsing and validation, the matcher, and
`lies_within` for scoped tokens. Table-driven; hostile input included."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhookd import filters
from webhookd.filters import (
    EMPTY_FILTER,
    MAX_DOMAINS,
    MAX_METADATA,
    MAX_TAGS,
    FilterError,
    WebhookFilter,
    address_domain,
    lies_within,
    normalise_domain,
)


def matches(filter_json: dict[str, Any] | None, data: Any) -> bool:
    m = WebhookFilter.parse(filter_json).compile()
    return True if m is None else m.matches(data)


# -- addresses ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "domain"), [
    ("a@shop.example", "shop.example"),
    ("A@SHOP.Example", "shop.example"),
    ("Name <a@shop.example>", "shop.example"),
    ('"Shop, Inc." <orders@Shop.Example>', "shop.example"),
    ('"x@evil.example" <a@shop.example>', "shop.example"),  # an address in the display name is a name
    ("a@shop.example (Shop)", "shop.example"),
    ("a@shop.example.", "shop.example"),  # the root's dot
    ("Name <a@shop.example>, ", "shop.example"),  # a stray list separator
    ("bob@bücher.example", "xn--bcher-kva.example"),  # IDN: compared in its ASCII form
    ("bob@BÜCHER.example", "xn--bcher-kva.example"),
    ("bob@xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("=?utf-8?q?Caf=C3=A9?= <a@shop.example>", "shop.example"),  # an encoded word stays a name
    ("", None),
    ("garbage", None),  # no @
    ("<>", None),  # the null sender
    ('"Joe" <>', None),
    ("@shop.example", None),  # no local part
    ("a@", None),
    ("a@b@c", None),
    ("a@shop..example", None),
    ("a@-shop.example", None),
    ("a@shop_example.com", None),
    ("a@[192.0.2.1]", None),  # an address literal has no domain
    ("a@evil.example <a@shop.example>", None),  # two addresses: ambiguous, no domain
    ("a@x.example, b@y.example", None),
    ("grp: a@x.example, b@y.example;", None),
    ("undisclosed-recipients:;", None),
    ("a@shop.example\x00", None),
    ("a@" + "x" * 64 + ".example", None),  # a label longer than 63
    ("a@" + ".".join(["abcdefgh"] * 40), None),  # longer than 253
    ("x" * 5000 + "@shop.example", None),  # longer than MAX_ADDRESS_CHARS
    (None, None), (42, None), (["a@shop.example"], None), ({"a": 1}, None),
])
def test_address_domain(value: Any, domain: str | None) -> None:
    assert address_domain(value) == domain


ADDRESS_BITS = st.sampled_from([
    "a", "B", "x.y", "shop.example", "eu.shop.example", "SHOP.EXAMPLE", "bücher.example", "@", "<", ">", " ", '"',
    "\\", ",", ";", ":", "(", ")", "[", "]", ".", "-", "Name", "=?utf-8?q?x?=", "\t", "\x00",
])


SHAPED = st.builds(
    lambda name, local, domain, form: form.format(name=name, local=local, domain=domain),
    st.lists(ADDRESS_BITS, max_size=4).map("".join), st.lists(ADDRESS_BITS, min_size=1, max_size=3).map("".join),
    st.lists(ADDRESS_BITS, min_size=1, max_size=4).map("".join),
    st.sampled_from(["{local}@{domain}", "{name} <{local}@{domain}>", '"{name}" <{local}@{domain}>',
                     " {name}<{local}@{domain}> ", "{name}{local}@{domain}"]),
)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.lists(ADDRESS_BITS, max_size=12).map("".join), SHAPED))
def test_the_fast_address_path_agrees_with_the_email_package(value: str) -> None:
    """`Name <a@b>` and bare addresses skip getaddresses (30 µs each); whatever they take must
    read exactly as getaddresses reads it."""
    if filters._SIMPLE.fullmatch(value) is not None:
        assert address_domain(value) == filters._parsed_domain(value), value


# -- parsing and validation -------------------------------------------------------------------
@pytest.mark.parametrize(("text", "stored"), [
    ("shop.example", "shop.example"),
    ("  Shop.EXAMPLE.  ", "shop.example"),
    ("*.shop.example", "*.shop.example"),
    ("*.Bücher.example", "*.xn--bcher-kva.example"),
    ("localhost", "localhost"),
    ("123.example", "123.example"),
])
def test_domains_are_normalised(text: str, stored: str) -> None:
    assert normalise_domain(text) == stored


@pytest.mark.parametrize("text", [
    "", " ", "*", "*.", "**.shop.example", "shop.*.example", "shop.example*", "a b.example", "shop..example",
    ".shop.example", "-a.example", "a-.example", "shop_x.example", "[192.0.2.1]", "a@shop.example",
    "x" * 64 + ".example", "http://shop.example", "shop.example/", "\x00.example", "a" * 300,
])
def test_bad_domains_are_refused(text: str) -> None:
    with pytest.raises(FilterError, match="is not a domain name"):
        normalise_domain(text, "filter.from_domains[0]")


def test_parse_normalises_dedupes_and_keeps_order() -> None:
    f = WebhookFilter.parse({"from_domains": ["B.example", "a.example", "b.example."], "to_domains": None,
                             "tags": ["vip", "eu", "vip"], "metadata": {"plan": "gold", "region": "eu"}})
    assert f == WebhookFilter(from_domains=("b.example", "a.example"), tags=("vip", "eu"),
                              metadata=(("plan", "gold"), ("region", "eu")))
    assert f.to_json() == {"from_domains": ["b.example", "a.example"], "to_domains": [], "tags": ["vip", "eu"],
                           "metadata": {"plan": "gold", "region": "eu"}}
    assert WebhookFilter.parse(f.to_json()) == f  # the JSON shape round-trips


@pytest.mark.parametrize("obj", [None, {}, {"from_domains": [], "to_domains": [], "tags": [], "metadata": {}},
                                 {"from_domains": None, "tags": None, "metadata": None}])
def test_empty_filters(obj: Any) -> None:
    f = WebhookFilter.parse(obj)
    assert f is EMPTY_FILTER and f.empty and f.compile() is None and f.summary() == ""


@pytest.mark.parametrize(("obj", "error"), [
    ([], "filter must be an object"),
    ("shop.example", "filter must be an object"),
    ({"from_domain": ["a.example"]}, "unknown field 'from_domain'"),
    ({"from_domains": "shop.example"}, "filter.from_domains must be a list"),
    ({"from_domains": [1]}, r"filter.from_domains\[0\] must be a string"),
    ({"to_domains": ["ok.example", "not a domain"]}, r"filter.to_domains\[1\]: 'not a domain' is not a domain"),
    ({"from_domains": [f"d{i}.example" for i in range(MAX_DOMAINS + 1)]}, "at most 100 domains, got 101"),
    ({"tags": "vip"}, "filter.tags must be a list"),
    ({"tags": [""]}, r"filter.tags\[0\] must be a non-empty string"),
    ({"tags": ["ok", 3]}, r"filter.tags\[1\] must be"),
    ({"tags": ["x" * 129]}, r"filter.tags\[0\] must be"),
    ({"tags": [str(i) for i in range(MAX_TAGS + 1)]}, "at most 50 tags, got 51"),
    ({"metadata": ["plan=gold"]}, "filter.metadata must be an object"),
    ({"metadata": {"": "x"}}, "keys must be non-empty"),
    ({"metadata": {"plan": 1}}, "filter.metadata.plan: the value must be a string"),
    ({"metadata": {"plan": None}}, "filter.metadata.plan: the value must be a string"),
    ({"metadata": {"plan": ["gold"]}}, "filter.metadata.plan: the value must be a string"),
    ({"metadata": {"k": "v" * 1025}}, "at most 1024 characters"),
    ({"metadata": {"k" * 129: "v"}}, "keys must be non-empty strings of at most 128"),
    ({"metadata": {f"k{i}": "v" for i in range(MAX_METADATA + 1)}}, "at most 20 pairs, got 21"),
])
def test_bad_filters_are_refused_naming_the_field(obj: Any, error: str) -> None:
    with pytest.raises(FilterError, match=error):
        WebhookFilter.parse(obj)


def test_a_huge_bad_domain_is_shortened_in_the_error() -> None:
    with pytest.raises(FilterError) as info:
        WebhookFilter.parse({"from_domains": ["x" * 100_000]})
    assert len(str(info.value)) < 300


def test_summary() -> None:
    f = WebhookFilter.parse({"from_domains": ["a.example", "*.b.example", "c.example", "d.example"],
                             "tags": ["vip"], "metadata": {"plan": "gold"}})
    assert f.summary() == "from a.example, *.b.example, c.example +1; tag vip; metadata plan=gold"


# -- matching ----------------------------------------------------------------------------------
SHOP = {"from_domains": ["shop.example"]}
SHOP_AND_SUBS = {"from_domains": ["shop.example", "*.shop.example"]}
SUBS_ONLY = {"from_domains": ["*.shop.example"]}


@pytest.mark.parametrize(("filter_json", "data", "expected"), [
    # the empty filter: everything, even garbage
    (None, {"message_id": "m"}, True),
    ({}, {}, True),
    # sender domains
    (SHOP, {"from": "orders@shop.example"}, True),
    (SHOP, {"from": "Shop <orders@SHOP.example>"}, True),
    (SHOP, {"from": "orders@eu.shop.example"}, False),  # no subdomains unless asked
    (SHOP, {"from": "orders@notshop.example"}, False),
    (SHOP, {"from": "orders@shop.example.evil"}, False),
    (SHOP, {"from": "shop.example"}, False),  # no @
    (SHOP, {"from": "orders@evil.example <orders@shop.example>"}, False),  # ambiguous
    (SHOP, {"to": "x@shop.example"}, False),  # no data.from at all (an open, a click)
    (SHOP, {"from": ""}, False),
    (SHOP, {"from": None}, False),
    (SHOP, {"from": ["orders@shop.example"]}, False),
    (SHOP, {"from": {"address": "orders@shop.example"}}, False),
    (SHOP_AND_SUBS, {"from": "a@shop.example"}, True),
    (SHOP_AND_SUBS, {"from": "a@eu.shop.example"}, True),
    (SHOP_AND_SUBS, {"from": "a@x.y.eu.shop.example"}, True),
    (SHOP_AND_SUBS, {"from": "a@eushop.example"}, False),
    (SUBS_ONLY, {"from": "a@shop.example"}, False),
    (SUBS_ONLY, {"from": "a@mail.shop.example"}, True),
    ({"from_domains": ["bücher.example"]}, {"from": "a@xn--bcher-kva.example"}, True),
    ({"from_domains": ["xn--bcher-kva.example"]}, {"from": "Bücher <a@BÜCHER.example>"}, True),
    # recipient domains
    ({"to_domains": ["gmail.example"]}, {"to": "User <u@Gmail.Example>"}, True),
    ({"to_domains": ["gmail.example"]}, {"to": "u@mail.gmail.example"}, False),
    ({"to_domains": ["*.gmail.example"]}, {"to": "u@mail.gmail.example"}, True),
    ({"to_domains": ["gmail.example"]}, {"from": "u@gmail.example"}, False),
    # tags: any of, exact
    ({"tags": ["vip", "eu"]}, {"tags": ["eu"]}, True),
    ({"tags": ["vip", "eu"]}, {"tags": ["x", "y", "vip"]}, True),
    ({"tags": ["vip"]}, {"tags": ["VIP"]}, False),  # case-sensitive
    ({"tags": ["vip"]}, {"tags": []}, False),
    ({"tags": ["vip"]}, {}, False),
    ({"tags": ["vip"]}, {"tags": "vip"}, False),  # not a list
    ({"tags": ["vip"]}, {"tags": [["vip"]], "x": 1}, False),
    ({"tags": ["vip"]}, {"tags": [{"vip": 1}, 1, None, "vip"]}, True),  # unhashable neighbours don't break it
    ({"tags": ["t4999"]}, {"tags": [f"t{i}" for i in range(5000)]}, True),
    # metadata: every pair, exact strings
    ({"metadata": {"plan": "gold"}}, {"metadata": {"plan": "gold", "x": "y"}}, True),
    ({"metadata": {"plan": "gold", "region": "eu"}}, {"metadata": {"plan": "gold"}}, False),
    ({"metadata": {"plan": "gold"}}, {"metadata": {"plan": "Gold"}}, False),
    ({"metadata": {"id": "123"}}, {"metadata": {"id": 123}}, False),  # a number never equals a string
    ({"metadata": {"on": "true"}}, {"metadata": {"on": True}}, False),
    ({"metadata": {"k": ""}}, {"metadata": {"k": None}}, False),
    ({"metadata": {"k": ""}}, {"metadata": {"k": ""}}, True),
    ({"metadata": {"k": "v"}}, {"metadata": {"k": ["v"]}}, False),
    ({"metadata": {"k": "v"}}, {"metadata": {"k": {"v": "v"}}}, False),
    ({"metadata": {"k": "v"}}, {"metadata": "k=v"}, False),
    ({"metadata": {"k": "v"}}, {}, False),
    # fields combine with AND
    ({**SHOP, "tags": ["vip"]}, {"from": "a@shop.example", "tags": ["vip"]}, True),
    ({**SHOP, "tags": ["vip"]}, {"from": "a@shop.example", "tags": ["other"]}, False),
    ({**SHOP, "tags": ["vip"]}, {"from": "a@other.example", "tags": ["vip"]}, False),
    ({**SHOP, "to_domains": ["gmail.example"]}, {"from": "a@shop.example", "to": "u@other.example"}, False),
    # data that is not an object
    (SHOP, None, False), (SHOP, [], False), (SHOP, "a@shop.example", False),
])
def test_matcher(filter_json: dict[str, Any] | None, data: Any, expected: bool) -> None:
    assert matches(filter_json, data) is expected


def test_a_filter_with_many_domains_matches_by_set() -> None:
    many = {"from_domains": [f"tenant{i}.example" for i in range(MAX_DOMAINS - 1)] + ["*.big.example"]}
    m = WebhookFilter.parse(many).compile()
    assert m is not None
    assert m.matches({"from": "a@tenant98.example"})
    assert m.matches({"from": "a@" + "x." * 100 + "big.example"})
    assert not m.matches({"from": "a@tenant100.example"})


# -- scoped tokens: does a filter lie within a set of sender domains? ---------------------------
@pytest.mark.parametrize(("from_domains", "scope", "expected"), [
    (["shop.example"], ["shop.example"], True),
    (["shop.example", "eu.shop.example"], ["shop.example", "eu.shop.example"], True),
    (["eu.shop.example"], ["shop.example"], False),  # an exact scope covers only itself
    (["*.shop.example"], ["shop.example"], False),
    (["*.shop.example"], ["*.shop.example"], True),
    (["eu.shop.example"], ["*.shop.example"], True),
    (["*.eu.shop.example"], ["*.shop.example"], True),
    (["shop.example"], ["*.shop.example"], False),  # a wildcard does not cover its apex
    (["shop.example", "other.example"], ["shop.example"], False),
    ([], ["shop.example"], False),  # no sender filter: every sender's events
    (["shop.example"], [], False),
    (["evilshop.example"], ["*.shop.example"], False),
])
def test_lies_within(from_domains: list[str], scope: list[str], expected: bool) -> None:
    f = WebhookFilter.parse({"from_domains": from_domains, "tags": ["any"]})
    assert lies_within(f, [normalise_domain(s) for s in scope]) is expected
