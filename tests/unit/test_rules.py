"""The routing condition language (node/rules.py): operators, missing and multi-valued
attributes, nesting, compile errors and series selection."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from node.rules import (
    PSEUDO_KEYWORDS,
    Outcome,
    RuleError,
    Selector,
    Subject,
    compile_condition,
    compile_selector,
)

IMAGE_TYPE = ["ORIGINAL", "PRIMARY", "AXIAL"]


def ev(spec: Any, attrs: dict[str, Any], study: tuple[dict[str, Any], ...] = ()) -> Outcome:
    return compile_condition(spec).evaluate(Subject(attrs, study))


def compile_error(spec: Any, path: str = "match") -> str:
    with pytest.raises(RuleError) as info:
        compile_condition(spec, path)
    return str(info.value)


# --- every operator: a passing and a failing case, with the reason -----------------------

OPERATOR_CASES = [
    # (spec, passing attrs, passing reason, failing attrs, failing reason)
    ({"Modality": {"equals": "CT"}},
     {"Modality": "CT"}, "Modality = 'CT'",
     {"Modality": "MR"}, "Modality = 'MR', expected 'CT'"),
    ({"Modality": {"in": ["CT", "PT"]}},
     {"Modality": "PT"}, "Modality = 'PT'",
     {"Modality": "MR"}, "Modality = 'MR', expected one of ['CT', 'PT']"),
    ({"SeriesDescription": {"regex": "thorax|chest"}},
     {"SeriesDescription": "ct chest w/o"}, "SeriesDescription = 'ct chest w/o'",
     {"SeriesDescription": "HEAD"},
     "SeriesDescription = 'HEAD', expected to match /thorax|chest/"),
    ({"SeriesDescription": {"regex": "thorax|chest", "ignore_case": True}},
     {"SeriesDescription": "CT CHEST"}, "SeriesDescription = 'CT CHEST'",
     {"SeriesDescription": "CT HEAD"},
     "SeriesDescription = 'CT HEAD', expected to match /thorax|chest/ (ignoring case)"),
    ({"SliceThickness": {"gt": 1}},
     {"SliceThickness": "1.25"}, "SliceThickness = '1.25'",
     {"SliceThickness": "1"}, "SliceThickness = '1', expected > 1"),
    ({"SliceThickness": {"ge": 0.5}},
     {"SliceThickness": "0.5"}, "SliceThickness = '0.5'",
     {"SliceThickness": "0.4"}, "SliceThickness = '0.4', expected >= 0.5"),
    ({"SliceThickness": {"lt": 3}},
     {"SliceThickness": 2.5}, "SliceThickness = 2.5",
     {"SliceThickness": 3}, "SliceThickness = 3, expected < 3"),
    ({"SliceThickness": {"le": 3}},
     {"SliceThickness": "3"}, "SliceThickness = '3'",
     {"SliceThickness": "5"}, "SliceThickness = '5', expected <= 3"),
    ({"ContrastBolusAgent": {"exists": True}},
     {"ContrastBolusAgent": "IODINE"}, "ContrastBolusAgent = 'IODINE'",
     {}, "ContrastBolusAgent missing, expected to be present"),
    ({"ContrastBolusAgent": {"exists": False}},
     {}, "ContrastBolusAgent is missing, as expected",
     {"ContrastBolusAgent": "IODINE"},
     "ContrastBolusAgent = 'IODINE', expected to be missing"),
    ({"ImageType": {"contains": "AXIAL"}},
     {"ImageType": IMAGE_TYPE}, "ImageType = ['ORIGINAL', 'PRIMARY', 'AXIAL']",
     {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
     "ImageType = ['ORIGINAL', 'PRIMARY', 'LOCALIZER'], expected to contain 'AXIAL'"),
    ({"SourceAddress": {"network": "10.20.0.0/16"}},
     {"SourceAddress": "10.20.3.4"}, "SourceAddress = '10.20.3.4'",
     {"SourceAddress": "192.168.1.5"},
     "SourceAddress = '192.168.1.5', expected an address in 10.20.0.0/16"),
    ({"BodyPartExamined": {"equals": "CHEST", "if_missing": True}},
     {}, "BodyPartExamined missing (if_missing = true)",
     {"BodyPartExamined": "HEAD"}, "BodyPartExamined = 'HEAD', expected 'CHEST'"),
    ({"BodyPartExamined": {"equals": "CHEST", "if_missing": False}},
     {"BodyPartExamined": "CHEST"}, "BodyPartExamined = 'CHEST'",
     {}, "BodyPartExamined missing (if_missing = false)"),
]


@pytest.mark.parametrize(("spec", "good", "good_reason", "bad", "bad_reason"), OPERATOR_CASES,
                         ids=lambda v: None)
def test_operator_passes_and_fails_with_readable_reason(
        spec: dict[str, Any], good: dict[str, Any], good_reason: str,
        bad: dict[str, Any], bad_reason: str) -> None:
    assert ev(spec, good) == Outcome(True, good_reason)
    assert ev(spec, bad) == Outcome(False, bad_reason)


def test_bare_value_means_equals_and_bare_list_means_one_of() -> None:
    assert ev({"Modality": "CT"}, {"Modality": "CT"}).ok
    assert ev({"Modality": "CT"}, {"Modality": "MR"}) == Outcome(
        False, "Modality = 'MR', expected 'CT'")
    assert ev({"Modality": ["CT", "PT"]}, {"Modality": "PT"}).ok
    assert ev({"Modality": ["CT", "PT"]}, {"Modality": "MR"}) == Outcome(
        False, "Modality = 'MR', expected one of ['CT', 'PT']")
    assert ev({"EchoNumbers": 2}, {"EchoNumbers": "2"}).ok


# --- numbers and strings --------------------------------------------------------------------

@pytest.mark.parametrize(("seen", "wanted", "ok"), [
    ("3.0", 3, True),
    (3, "3.0", True),
    ("3", "3.00", True),
    (" 3 ", 3, True),
    ("1e1", 10, True),
    ("3.5", 3, False),
    ("CT ", "CT", True),
    (" CT", "CT ", True),
    ("CT", "ct", False),        # equals is case-sensitive
    ("CT", 3, False),
])
def test_equals_compares_numbers_as_numbers_else_stripped_strings(
        seen: Any, wanted: Any, ok: bool) -> None:
    assert ev({"Modality": {"equals": wanted}}, {"Modality": seen}).ok is ok


def test_in_uses_the_same_comparison() -> None:
    assert ev({"EchoNumbers": {"in": [1, 2]}}, {"EchoNumbers": "2.0"}).ok
    assert ev({"Modality": {"in": ["CT", "PT"]}}, {"Modality": "PT  "}).ok
    assert not ev({"EchoNumbers": {"in": [1, 2]}}, {"EchoNumbers": "3"}).ok


@pytest.mark.parametrize(("value", "ok"), [
    ("0.5", True), ("1", True), ("3", True), (3.0, True),
    ("0.49", False), ("3.01", False), (10, False),
])
def test_range_with_combined_bounds(value: Any, ok: bool) -> None:
    out = ev({"SliceThickness": {"ge": 0.5, "le": 3}}, {"SliceThickness": value})
    assert out.ok is ok
    if not ok:
        assert out.reason == f"SliceThickness = {value!r}, expected >= 0.5 and <= 3"


def test_open_range_excludes_its_bounds() -> None:
    spec = {"SliceThickness": {"gt": 1, "lt": 2}}
    assert ev(spec, {"SliceThickness": "1.5"}).ok
    assert not ev(spec, {"SliceThickness": "1"}).ok
    assert not ev(spec, {"SliceThickness": "2"}).ok


def test_numeric_string_bound_is_accepted() -> None:
    assert ev({"SliceThickness": {"le": "3"}}, {"SliceThickness": 2}).ok


@pytest.mark.parametrize("value", ["thin", "nan", "inf", "-inf", "1,5", True])
def test_non_numeric_value_fails_a_range_without_raising(value: Any) -> None:
    for op in ("gt", "ge", "lt", "le"):
        out = ev({"SliceThickness": {op: 0}}, {"SliceThickness": value})
        assert not out.ok
        assert out.reason.startswith(f"SliceThickness = {value!r}, expected ")


# --- regex -------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "value", "ok"), [
    ("CHEST", "CT CHEST W/O", True),          # search, not match
    ("^CHEST", "CT CHEST", False),
    ("CHEST$", "CT CHEST", True),
    ("^CHEST$", "CHEST", True),
    ("^CHEST$", "CHEST ABDOMEN", False),
    ("chest", "CT CHEST", False),             # case-sensitive by default
    (r"^\d+(\.\d+)?$", 2.5, True),            # numbers are searched as text
])
def test_regex_search_and_anchors(pattern: str, value: Any, ok: bool) -> None:
    assert ev({"SeriesDescription": {"regex": pattern}}, {"SeriesDescription": value}).ok is ok


def test_regex_ignore_case() -> None:
    spec = {"SeriesDescription": {"regex": "^ct chest$", "ignore_case": True}}
    assert ev(spec, {"SeriesDescription": "CT Chest"}).ok
    off = {"SeriesDescription": {"regex": "^ct chest$", "ignore_case": False}}
    out = ev(off, {"SeriesDescription": "CT Chest"})
    assert out == Outcome(False, "SeriesDescription = 'CT Chest', expected to match /^ct chest$/")


# --- missing attributes -------------------------------------------------------------------

MISSING_SPECS = [
    ("Modality", {"equals": "CT"}),
    ("Modality", {"in": ["CT", "PT"]}),
    ("SeriesDescription", {"regex": "chest", "ignore_case": True}),
    ("SliceThickness", {"gt": 1}),
    ("SliceThickness", {"ge": 1}),
    ("SliceThickness", {"lt": 1}),
    ("SliceThickness", {"le": 1}),
    ("SliceThickness", {"ge": 0.5, "le": 3}),
    ("ContrastBolusAgent", {"exists": True}),
    ("ImageType", {"contains": ["AXIAL", "PRIMARY"]}),
    ("SourceAddress", {"network": "10.0.0.0/8"}),
    ("CallingAETitle", {"equals": "CT1"}),
]
MISSING_VALUES = [None, "", "   ", [], (), [None, ""], ["", "  "]]


@pytest.mark.parametrize(("keyword", "table"), MISSING_SPECS, ids=lambda v: None)
def test_missing_attribute_fails_every_operator(keyword: str, table: dict[str, Any]) -> None:
    spec = {keyword: table}
    out = ev(spec, {"Modality": "OT"} if keyword != "Modality" else {})
    assert out.ok is False
    assert out.reason.startswith(f"{keyword} missing, expected ")
    for empty in MISSING_VALUES:
        out = ev(spec, {keyword: empty})
        assert out.ok is False, empty
        assert out.reason.startswith(f"{keyword} missing"), empty


@pytest.mark.parametrize(("keyword", "table"), MISSING_SPECS, ids=lambda v: None)
@pytest.mark.parametrize("fallback", [True, False])
def test_if_missing_overrides_for_every_operator(keyword: str, table: dict[str, Any],
                                                 fallback: bool) -> None:
    spec = {keyword: {**table, "if_missing": fallback}}
    word = "true" if fallback else "false"
    for empty in MISSING_VALUES:
        assert ev(spec, {keyword: empty}) == Outcome(
            fallback, f"{keyword} missing (if_missing = {word})")
    assert ev(spec, {}).ok is fallback


def test_if_missing_does_not_change_a_present_value() -> None:
    spec = {"Modality": {"equals": "CT", "if_missing": True}}
    assert not ev(spec, {"Modality": "MR"}).ok
    spec = {"Modality": {"equals": "CT", "if_missing": False}}
    assert ev(spec, {"Modality": "CT"}).ok


@pytest.mark.parametrize("empty", MISSING_VALUES)
def test_exists_false_holds_when_missing_or_empty(empty: Any) -> None:
    spec = {"ContrastBolusAgent": {"exists": False}}
    assert ev(spec, {"ContrastBolusAgent": empty}) == Outcome(
        True, "ContrastBolusAgent is missing, as expected")
    assert ev({"ContrastBolusAgent": {"exists": True}}, {"ContrastBolusAgent": empty}).ok is False


def test_list_with_some_empty_values_keeps_the_others() -> None:
    out = ev({"ImageType": {"contains": "AXIAL"}}, {"ImageType": ["", "AXIAL", None]})
    assert out == Outcome(True, "ImageType = 'AXIAL'")


@pytest.mark.parametrize("value", [object(), b"\x00\x01", {"a": 1}, [[1, 2]], 1 + 2j, True])
def test_odd_attribute_values_never_raise(value: Any) -> None:
    for keyword, table in MISSING_SPECS:
        out = ev({keyword: table}, {keyword: value})
        assert isinstance(out.ok, bool)
        assert keyword in out.reason


# --- multi-valued attributes ----------------------------------------------------------------

@pytest.mark.parametrize(("table", "ok"), [
    ({"equals": "AXIAL"}, True),
    ({"equals": "LOCALIZER"}, False),
    ({"in": ["LOCALIZER", "PRIMARY"]}, True),
    ({"in": ["LOCALIZER", "DERIVED"]}, False),
    ({"regex": "^AX"}, True),
    ({"regex": "^ORIGINAL\\\\PRIMARY"}, False),   # values are tested one by one
    ({"contains": "PRIMARY"}, True),
    ({"contains": ["AXIAL", "ORIGINAL"]}, True),
    ({"contains": ["AXIAL", "LOCALIZER"]}, False),   # all must be present
    ({"contains": ["AXIAL", "axial"]}, False),
])
def test_multi_valued_attribute(table: dict[str, Any], ok: bool) -> None:
    out = ev({"ImageType": table}, {"ImageType": IMAGE_TYPE})
    assert out.ok is ok
    assert out.reason.startswith("ImageType = ['ORIGINAL', 'PRIMARY', 'AXIAL']")


def test_multi_valued_tuple_is_treated_like_a_list() -> None:
    spec = {"ImageType": {"contains": ["AXIAL", "PRIMARY"]}}
    assert ev(spec, {"ImageType": tuple(IMAGE_TYPE)}).ok


def test_range_on_multi_valued_holds_if_one_value_is_inside_all_bounds() -> None:
    spec = {"WindowWidth": {"gt": 100, "lt": 200}}
    assert ev(spec, {"WindowWidth": ["50", "150"]}).ok
    # 400 > 100 and 50 < 200, but no single value satisfies both bounds.
    out = ev(spec, {"WindowWidth": ["50", "400"]})
    assert out == Outcome(False, "WindowWidth = ['50', '400'], expected > 100 and < 200")
    assert ev({"PixelSpacing": {"le": 1}}, {"PixelSpacing": ["0.7", "0.7"]}).ok


def test_contains_on_a_single_value_and_with_numbers() -> None:
    assert ev({"ImageType": {"contains": "AXIAL"}}, {"ImageType": "AXIAL"}).ok
    assert ev({"EchoNumbers": {"contains": [1, 2]}}, {"EchoNumbers": ["1.0", "2", "3"]}).ok
    out = ev({"ImageType": {"contains": ["AXIAL", "PRIMARY"]}}, {"ImageType": "AXIAL"})
    assert out == Outcome(False, "ImageType = 'AXIAL', expected to contain ['AXIAL', 'PRIMARY']")


# --- pseudo keywords --------------------------------------------------------------------------

def test_pseudo_keywords() -> None:
    assert PSEUDO_KEYWORDS == {"CallingAETitle", "CalledAETitle", "SourceAddress",
                               "NumberOfInstances"}
    attrs = {"CallingAETitle": "CT_SCANNER_1", "CalledAETitle": "PACSNODE",
             "SourceAddress": "10.20.1.5", "NumberOfInstances": 120}
    assert ev({"CallingAETitle": {"regex": "^CT_"}}, attrs).ok
    assert ev({"CalledAETitle": "PACSNODE"}, attrs).ok
    assert ev({"NumberOfInstances": {"ge": 50}}, attrs).ok
    out = ev({"CallingAETitle": ["MR_1", "MR_2"]}, attrs)
    assert out == Outcome(False, "CallingAETitle = 'CT_SCANNER_1', expected one of "
                                 "['MR_1', 'MR_2']")


@pytest.mark.parametrize(("network", "address", "ok"), [
    ("10.20.0.0/16", "10.20.255.1", True),
    ("10.20.0.0/16", "10.21.0.1", False),
    ("10.20.0.0/16", " 10.20.0.7 ", True),
    ("10.20.1.5", "10.20.1.5", True),             # a single address is a /32
    ("10.20.1.5", "10.20.1.6", False),
    ("10.20.1.5/16", "10.20.9.9", True),          # host bits are tolerated
    ("fd00::/8", "fd12::1", True),
    ("fd00::/8", "10.20.1.5", False),              # IPv4 address, IPv6 network
    ("10.0.0.0/8", "fd12::1", False),
    ("10.0.0.0/8", "not-an-address", False),
    ("10.0.0.0/8", "10.1.2.3:104", False),
    ("10.0.0.0/8", "10.1.2", False),
])
def test_network(network: str, address: str, ok: bool) -> None:
    out = ev({"SourceAddress": {"network": network}}, {"SourceAddress": address})
    assert out.ok is ok
    assert out.reason.startswith(f"SourceAddress = {address!r}")


def test_network_reason_shows_the_normalised_block() -> None:
    out = ev({"SourceAddress": {"network": "10.20.1.5/16"}}, {"SourceAddress": "bogus"})
    assert out == Outcome(False, "SourceAddress = 'bogus', expected an address in 10.20.0.0/16")


def test_network_any_of_several_addresses() -> None:
    spec = {"SourceAddress": {"network": "10.0.0.0/8"}}
    assert ev(spec, {"SourceAddress": ["192.168.0.1", "10.0.0.1"]}).ok


# --- composition ---------------------------------------------------------------------------

def test_empty_table_matches_everything() -> None:
    assert ev({}, {}) == Outcome(True, "no conditions")
    assert ev({}, {"Modality": "CT"}).ok


def test_several_keys_in_one_table_all_must_hold() -> None:
    spec = {"Modality": "CT", "BodyPartExamined": "CHEST"}
    assert ev(spec, {"Modality": "CT", "BodyPartExamined": "CHEST"}) == Outcome(
        True, "Modality = 'CT'; BodyPartExamined = 'CHEST'")
    assert ev(spec, {"Modality": "CT", "BodyPartExamined": "HEAD"}) == Outcome(
        False, "BodyPartExamined = 'HEAD', expected 'CHEST'")
    assert ev(spec, {"Modality": "MR", "BodyPartExamined": "CHEST"}) == Outcome(
        False, "Modality = 'MR', expected 'CT'")


def test_several_operators_in_one_table_all_must_hold() -> None:
    spec = {"ImageType": {"contains": "AXIAL", "regex": "^DERIVED$"}}
    assert not ev(spec, {"ImageType": IMAGE_TYPE}).ok
    assert ev(spec, {"ImageType": ["DERIVED", "AXIAL"]}).ok


def test_all_and_any() -> None:
    all_spec = {"all": [{"Modality": "CT"}, {"SliceThickness": {"le": 3}}]}
    assert ev(all_spec, {"Modality": "CT", "SliceThickness": 1}).ok
    assert ev(all_spec, {"Modality": "CT", "SliceThickness": 5}) == Outcome(
        False, "SliceThickness = 5, expected <= 3")
    any_spec = {"any": [{"Modality": "CT"}, {"Modality": "PT"}]}
    assert ev(any_spec, {"Modality": "PT"}) == Outcome(True, "Modality = 'PT'")
    assert ev(any_spec, {"Modality": "MR"}) == Outcome(
        False, "none of: Modality = 'MR', expected 'CT' | Modality = 'MR', expected 'PT'")


NESTED = {"not": {"any": [
    {"all": [{"Modality": "CT"}, {"BodyPartExamined": "CHEST"}]},
    {"Modality": "PT"},
]}}


@pytest.mark.parametrize(("attrs", "ok"), [
    ({"Modality": "CT", "BodyPartExamined": "CHEST"}, False),
    ({"Modality": "CT", "BodyPartExamined": "HEAD"}, True),
    ({"Modality": "CT"}, True),
    ({"Modality": "PT", "BodyPartExamined": "HEAD"}, False),
    ({"Modality": "MR"}, True),
    ({}, True),
])
def test_all_inside_any_inside_not(attrs: dict[str, Any], ok: bool) -> None:
    out = ev(NESTED, attrs)
    assert out.ok is ok
    assert out.reason.startswith("not (")


def test_nested_reason_reads_through_the_tree() -> None:
    out = ev(NESTED, {"Modality": "CT", "BodyPartExamined": "HEAD"})
    assert out.reason == ("not (none of: BodyPartExamined = 'HEAD', expected 'CHEST' | "
                          "Modality = 'CT', expected 'PT')")
    out = ev(NESTED, {"Modality": "PT"})
    assert out == Outcome(False, "not (Modality = 'PT')")


def test_not_of_empty_table_matches_nothing_and_double_not_is_identity() -> None:
    assert ev({"not": {}}, {"Modality": "CT"}).ok is False
    spec = {"not": {"not": {"Modality": "CT"}}}
    assert ev(spec, {"Modality": "CT"}).ok
    assert not ev(spec, {"Modality": "MR"}).ok


def test_not_of_missing_attribute_holds() -> None:
    assert ev({"not": {"ContrastBolusAgent": "IODINE"}}, {}).ok


# --- has_series / no_series ------------------------------------------------------------------

CT = {"SeriesNumber": 2, "Modality": "CT", "SeriesDescription": "CT CHEST"}
PT = {"SeriesNumber": 3, "Modality": "PT", "SeriesDescription": "PET WB"}
SR = {"SeriesNumber": 99, "Modality": "SR"}


def test_has_series() -> None:
    spec = {"has_series": {"Modality": "PT"}}
    assert ev(spec, CT, (CT, PT, SR)) == Outcome(True, "series #3 PT: Modality = 'PT'")
    assert ev(spec, CT, (CT, SR)) == Outcome(
        False, "no series in the study matches (2 series looked at)")
    assert ev(spec, CT, ()) == Outcome(
        False, "no series in the study matches (0 series looked at)")


def test_no_series() -> None:
    spec = {"no_series": {"Modality": "PT"}}
    assert ev(spec, CT, (CT, SR)) == Outcome(True, "no series matches the no_series condition")
    assert ev(spec, CT, (CT, PT)) == Outcome(
        False, "series #3 PT should not exist: Modality = 'PT'")
    assert ev(spec, CT, ()).ok


def test_series_quantifier_looks_at_each_series_not_the_focus() -> None:
    # The focus is CT; the inner condition is about the other series' own attributes.
    spec = {"Modality": "CT", "has_series": {"all": [{"Modality": "PT"},
                                                     {"SeriesDescription": {"regex": "WB"}}]}}
    assert ev(spec, CT, (CT, PT)).ok
    assert not ev(spec, PT, (CT, PT)).ok
    assert not ev(spec, CT, (CT, {**PT, "SeriesDescription": "PET BRAIN"})).ok


def test_series_quantifiers_nested_in_combinators() -> None:
    spec = {"any": [{"has_series": {"Modality": "PT"}}, {"not": {"no_series": {"Modality": "SR"}}}]}
    assert ev(spec, CT, (CT, SR)).ok
    assert not ev(spec, CT, (CT,)).ok
    inner = {"has_series": {"has_series": {"Modality": "PT"}}}
    assert ev(inner, CT, (CT, PT)).ok


def test_series_label_without_number_or_modality() -> None:
    spec = {"has_series": {"SeriesDescription": "X"}}
    assert ev(spec, {}, ({"Modality": "MR", "SeriesDescription": "X"},)).reason.startswith(
        "series MR: ")
    assert ev(spec, {}, ({"SeriesDescription": "X"},)).reason.startswith("series ?: ")


def test_has_series_with_empty_table_needs_any_series() -> None:
    assert ev({"has_series": {}}, CT, (CT,)).ok
    assert not ev({"has_series": {}}, CT, ()).ok


# --- compile errors ----------------------------------------------------------------------------

def test_rule_error_is_a_value_error() -> None:
    assert issubclass(RuleError, ValueError)


def test_unknown_keyword_with_suggestion_and_path() -> None:
    msg = compile_error({"any": [{"Modality": "CT"}, {"Modalty": "CT"}]})
    assert msg == "match.any[1].Modalty: unknown DICOM keyword 'Modalty'; did you mean 'Modality'?"
    msg = compile_error({"not": {"all": [{"SliceThicknes": {"le": 3}}]}}, "routes[2].match")
    assert msg == ("routes[2].match.not.all[0].SliceThicknes: unknown DICOM keyword "
                   "'SliceThicknes'; did you mean 'SliceThickness'?")
    msg = compile_error({"has_series": {"CallingAETitel": "X"}})
    assert msg.endswith("did you mean 'CallingAETitle'?")
    assert msg.startswith("match.has_series.CallingAETitel: ")


def test_unknown_keyword_without_a_close_match_has_no_suggestion() -> None:
    msg = compile_error({"Xqzzyvw": "a"})
    assert msg == "match.Xqzzyvw: unknown DICOM keyword 'Xqzzyvw'"


def test_unknown_operator_with_suggestion() -> None:
    msg = compile_error({"SeriesDescription": {"regx": "chest"}})
    assert msg.startswith("match.SeriesDescription.regx: unknown operator; did you mean 'regex'?")
    assert "(operators: contains, equals, exists, ge, gt, if_missing, ignore_case, in, le, lt, " \
           "network, regex)" in msg
    assert "did you mean 'equals'?" in compile_error({"Modality": {"equal": "CT"}})
    assert "did you mean" not in compile_error({"Modality": {"frobnicate": "CT"}})


def test_bad_regex_quotes_the_pattern() -> None:
    msg = compile_error({"any": [{"SeriesDescription": {"regex": "(chest"}}]})
    assert msg.startswith("match.any[0].SeriesDescription.regex: invalid regular expression "
                          "'(chest': ")
    assert "missing )" in msg
    assert compile_error({"SeriesDescription": {"regex": 3}}) == (
        "match.SeriesDescription.regex: expected a regular expression string, got 3")


@pytest.mark.parametrize(("spec", "message"), [
    ({"Modality": {"in": "CT"}}, "match.Modality.in: expected a non-empty list, got 'CT'"),
    ({"Modality": {"in": []}}, "match.Modality.in: expected a non-empty list, got []"),
    ({"Modality": []}, "match.Modality.in: expected a non-empty list, got []"),
    ({"Modality": {"in": [["CT"]]}}, "match.Modality.in: expected a string or number, "
                                     "got ['CT']"),
    ({"Modality": {"equals": ["CT"]}}, "match.Modality.equals: expected a string or number, "
                                       "got ['CT']"),
    ({"Modality": True}, "match.Modality: expected a string or number, got True"),
    ({"ImageType": {"contains": [{"x": 1}]}}, "match.ImageType.contains: expected a string "
                                              "or number, got {'x': 1}"),
    ({"SliceThickness": {"le": "thin"}}, "match.SliceThickness.le: expected a number, "
                                         "got 'thin'"),
    ({"SliceThickness": {"ge": 0.5, "lt": True}}, "match.SliceThickness.lt: expected a "
                                                  "number, got True"),
    ({"SliceThickness": {"gt": "nan"}}, "match.SliceThickness.gt: expected a number, "
                                        "got 'nan'"),
    ({"SourceAddress": {"network": "10.20.0.0/33"}}, "match.SourceAddress.network: expected "
                                                     "an address or CIDR block, got "
                                                     "'10.20.0.0/33'"),
    ({"SourceAddress": {"network": "intranet"}}, "match.SourceAddress.network: expected an "
                                                 "address or CIDR block, got 'intranet'"),
    ({"Modality": {"equals": "CT", "if_missing": "yes"}}, "match.Modality.if_missing: "
                                                          "expected true or false, got 'yes'"),
    ({"SeriesDescription": {"regex": "x", "ignore_case": 1}}, "match.SeriesDescription."
                                                              "ignore_case: expected true or "
                                                              "false, got 1"),
    ({"ContrastBolusAgent": {"exists": "no"}}, "match.ContrastBolusAgent.exists: expected "
                                               "true or false, got 'no'"),
    ({"all": []}, "match.all: expected a non-empty list of condition tables"),
    ({"any": {"Modality": "CT"}}, "match.any: expected a non-empty list of condition tables"),
    ({"any": ["CT"]}, "match.any[0]: expected a table of conditions, got 'CT'"),
    ({"not": [{"Modality": "CT"}]}, "match.not: expected a table of conditions, "
                                    "got [{'Modality': 'CT'}]"),
    ({"no_series": "PT"}, "match.no_series: expected a table of conditions, got 'PT'"),
])
def test_compile_errors_name_path_and_value(spec: dict[str, Any], message: str) -> None:
    assert compile_error(spec) == message


def test_operator_table_without_a_test() -> None:
    msg = compile_error({"BodyPartExamined": {"if_missing": True}})
    assert msg.startswith("match.BodyPartExamined: no test given (use one of: equals, in, ")
    assert compile_error({"BodyPartExamined": {}}).startswith("match.BodyPartExamined: no test")


@pytest.mark.parametrize("spec", ["Modality = 'CT'", ["Modality"], None, 3])
def test_non_table_spec(spec: Any) -> None:
    assert compile_error(spec) == f"match: expected a table of conditions, got {spec!r}"
    assert compile_error(spec, "routes[0].match").startswith("routes[0].match: expected a table")


# --- not inverts: a seeded property test over random attribute dicts -----------------------------
# (hypothesis is not installed in the venv; a fixed-seed generator keeps this deterministic.)

PROPERTY_SPECS: list[dict[str, Any]] = [
    {},
    {"Modality": "CT"},
    {"Modality": ["CT", "PT"], "SliceThickness": {"ge": 0.5, "le": 3}},
    {"ImageType": {"contains": ["AXIAL", "PRIMARY"]}},
    {"SeriesDescription": {"regex": "^ct", "ignore_case": True}},
    {"ContrastBolusAgent": {"exists": False}},
    {"BodyPartExamined": {"equals": "CHEST", "if_missing": True}},
    {"SourceAddress": {"network": "10.0.0.0/8"}},
    {"any": [{"Modality": "CT"}, {"not": {"SliceThickness": {"gt": 2}}}]},
    {"has_series": {"Modality": "PT"}},
    {"no_series": {"SliceThickness": {"lt": 1}}},
]
_POOL: dict[str, list[Any]] = {
    "Modality": ["CT", "PT", "MR", " ct ", "", None, ["CT", "PT"], 3],
    "SliceThickness": ["0.4", "0.5", "3", 3.0, "5", "thin", "nan", [], ["1", "9"], True],
    "ImageType": [IMAGE_TYPE, ["ORIGINAL"], "AXIAL", [], ("PRIMARY", "AXIAL"), ""],
    "SeriesDescription": ["CT Chest", "Head", "", None, 7, ["ct a", "b"]],
    "ContrastBolusAgent": ["IODINE", "", None, []],
    "BodyPartExamined": ["CHEST", "HEAD", "", None],
    "SourceAddress": ["10.1.2.3", "192.168.0.1", "junk", "", "fd00::1", None],
}


def _random_attrs(rng: random.Random) -> dict[str, Any]:
    return {k: rng.choice(v) for k, v in _POOL.items() if rng.random() < 0.7}


@pytest.mark.parametrize("seed", range(5))
def test_not_always_inverts(seed: int) -> None:
    rng = random.Random(seed)
    for spec in PROPERTY_SPECS:
        plain, negated = compile_condition(spec), compile_condition({"not": spec})
        for _ in range(40):
            study = tuple(_random_attrs(rng) for _ in range(rng.randint(0, 3)))
            subject = Subject(_random_attrs(rng), study)
            out, neg = plain.evaluate(subject), negated.evaluate(subject)
            assert neg.ok is (not out.ok)
            assert neg.reason == f"not ({out.reason})"


# --- Selector ------------------------------------------------------------------------------

def series(number: Any, uid: str, **attrs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"SeriesInstanceUID": uid, "Modality": "CT",
                           "NumberOfInstances": 100, **attrs}
    if number is not None:
        out["SeriesNumber"] = number
    return out


def choose(spec: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    return compile_selector(spec).choose(candidates)[0]


def test_compile_selector_defaults() -> None:
    sel = compile_selector({})
    assert isinstance(sel, Selector)
    assert sel.min_instances == 1
    assert sel.prefer == ()
    a, b = series(2, "1.2"), series(1, "1.1")
    assert sel.choose([a, b]) == (b, "selected series #1 CT of 2 candidate(s)")


def test_where_and_min_instances_filter() -> None:
    scout = series(1, "1.1", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], NumberOfInstances=3)
    axial = series(2, "1.2", ImageType=IMAGE_TYPE, NumberOfInstances=40)
    thin = series(3, "1.3", ImageType=IMAGE_TYPE, NumberOfInstances="300")
    pet = series(4, "1.4", Modality="PT", NumberOfInstances=500)
    spec = {"where": {"Modality": "CT", "ImageType": {"contains": "AXIAL"}}}
    assert choose(spec, [pet, thin, axial, scout]) is axial
    assert choose({**spec, "min_instances": 41}, [pet, thin, axial, scout]) is thin
    assert choose({**spec, "min_instances": 300}, [pet, thin, axial, scout]) is thin
    assert choose({"min_instances": 301}, [pet, thin, axial, scout]) is pet


def test_no_candidate() -> None:
    sel = compile_selector({"where": {"Modality": "MR"}, "min_instances": 50})
    assert sel.choose([series(1, "1.1"), series(2, "1.2")]) == (
        None, "no series satisfies select (min_instances 50) among 2")
    assert compile_selector({}).choose([]) == (
        None, "no series satisfies select (min_instances 1) among 0")


def test_series_without_instance_count_is_not_a_candidate() -> None:
    bare = {"SeriesInstanceUID": "1.1", "SeriesNumber": 1, "Modality": "CT"}
    assert compile_selector({}).choose([bare])[0] is None


def test_where_sees_the_whole_study() -> None:
    ct, pt = series(2, "1.2"), series(3, "1.3", Modality="PT")
    spec = {"where": {"Modality": "CT", "has_series": {"Modality": "PT"}}}
    assert choose(spec, [ct, pt]) is ct
    assert choose(spec, [ct]) is None


def test_prefer_ascending_and_descending() -> None:
    a = series(1, "1.1", SliceThickness="5", NumberOfInstances=60)
    b = series(2, "1.2", SliceThickness="1.25", NumberOfInstances=240)
    c = series(3, "1.3", SliceThickness="0.625", NumberOfInstances=480)
    d = series(4, "1.4", SliceThickness="10", NumberOfInstances=30)
    everything = [a, b, c, d]
    assert choose({"prefer": ["SliceThickness"]}, everything) is c
    assert choose({"prefer": ["-SliceThickness"]}, everything) is d
    assert choose({"prefer": "-NumberOfInstances"}, everything) is c
    assert choose({"prefer": ["NumberOfInstances"]}, everything) is d
    sel = compile_selector({"prefer": ["SliceThickness", "-NumberOfInstances"]})
    assert sel.prefer == (("SliceThickness", False), ("NumberOfInstances", True))
    assert sel.choose(everything) == (
        c, "selected series #3 CT of 4 candidate(s) by SliceThickness, -NumberOfInstances")


def test_second_prefer_key_breaks_ties_of_the_first() -> None:
    a = series(1, "1.1", SliceThickness="1", NumberOfInstances=100)
    b = series(2, "1.2", SliceThickness="1.0", NumberOfInstances=300)
    c = series(3, "1.3", SliceThickness="2", NumberOfInstances=900)
    assert choose({"prefer": ["SliceThickness", "-NumberOfInstances"]}, [a, b, c]) is b


@pytest.mark.parametrize("prefer", ["SliceThickness", "-SliceThickness"])
def test_missing_prefer_value_sorts_last(prefer: str) -> None:
    missing = series(1, "1.1")
    empty = series(2, "1.2", SliceThickness="")
    thick = series(3, "1.3", SliceThickness="5")
    thin = series(4, "1.4", SliceThickness="1")
    for order in itertools.permutations([missing, empty, thick, thin]):
        chosen = choose({"prefer": [prefer]}, list(order))
        assert chosen is (thin if prefer == "SliceThickness" else thick)
    assert choose({"prefer": [prefer]}, [missing, empty]) is missing   # SeriesNumber 1 < 2


def test_missing_prefer_value_sorts_after_non_numeric_value() -> None:
    missing = series(1, "1.1")
    described = series(2, "1.2", SeriesDescription="AX 1.0")
    assert choose({"prefer": ["SeriesDescription"]}, [missing, described]) is described


def test_descending_prefer_on_text_values() -> None:
    a = series(1, "1.1", SeriesDescription="A")
    z = series(2, "1.2", SeriesDescription="Z")
    assert choose({"prefer": ["-SeriesDescription"]}, [a, z]) is z


def test_text_prefer_values_sort_ascending() -> None:
    b = series(1, "1.1", SeriesDescription="B")
    a = series(2, "1.2", SeriesDescription="A")
    assert choose({"prefer": ["SeriesDescription"]}, [b, a]) is a


def test_ties_broken_by_series_number_then_uid_regardless_of_order() -> None:
    pool = [
        series("10", "1.2.5", SliceThickness="1"),
        series(2, "1.2.9", SliceThickness="1.0"),
        series("2", "1.2.3", SliceThickness=1),       # same number, smaller UID: the winner
        series(None, "1.2.0", SliceThickness="1"),    # no SeriesNumber sorts after numbered
        series(1, "1.2.1", SliceThickness="2"),       # lower number, but worse preference
    ]
    winner = pool[2]
    rng = random.Random(1234)
    for _ in range(30):
        shuffled = pool[:]
        rng.shuffle(shuffled)
        assert choose({"prefer": ["SliceThickness"]}, shuffled) is winner
        assert choose({}, shuffled) is pool[4]
        assert choose({"where": {"SeriesNumber": {"exists": False}}}, shuffled) is pool[3]
    # numeric, not lexicographic: 2 before 10
    assert choose({}, [pool[0], pool[1]]) is pool[1]
    # equal numbers: UID decides
    twins = [series(5, "1.9"), series(5, "1.10"), series(5, "1.2")]
    for order in itertools.permutations(twins):
        assert choose({}, list(order))["SeriesInstanceUID"] == "1.10"


@pytest.mark.parametrize(("spec", "message"), [
    ("prefer SliceThickness", "select: expected a table, got 'prefer SliceThickness'"),
    ({"prefers": ["SliceThickness"]}, "select.prefers: unknown key (select takes where, "
                                      "min_instances, prefer)"),
    ({"min_instances": 0}, "select.min_instances: expected a whole number >= 1, got 0"),
    ({"min_instances": True}, "select.min_instances: expected a whole number >= 1, got True"),
    ({"min_instances": "5"}, "select.min_instances: expected a whole number >= 1, got '5'"),
    ({"min_instances": 2.5}, "select.min_instances: expected a whole number >= 1, got 2.5"),
    ({"prefer": 3}, "select.prefer: expected a list of keywords, got 3"),
    ({"prefer": ["SliceThickness", "-"]}, "select.prefer[1]: expected a keyword, got '-'"),
    ({"prefer": [""]}, "select.prefer[0]: expected a keyword, got ''"),
    ({"prefer": [3]}, "select.prefer[0]: expected a keyword, got 3"),
    ({"prefer": ["SeriesNumber", "-SliceThicknes"]},
     "select.prefer[1]: unknown DICOM keyword 'SliceThicknes'; did you mean 'SliceThickness'?"),
    ({"where": {"Modalty": "CT"}},
     "select.where.Modalty: unknown DICOM keyword 'Modalty'; did you mean 'Modality'?"),
    ({"where": "CT"}, "select.where: expected a table of conditions, got 'CT'"),
])
def test_selector_compile_errors(spec: Any, message: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_selector(spec)
    assert str(info.value) == message


def test_selector_error_uses_the_given_path() -> None:
    with pytest.raises(RuleError, match=r"^routes\[1\]\.select\.min_instances: "):
        compile_selector({"min_instances": -1}, "routes[1].select")


def test_ignore_case_applies_to_equals_in_and_contains() -> None:
    for spec, value in (({"equals": "chest", "ignore_case": True}, "CHEST"),
                        ({"in": ["head", "chest"], "ignore_case": True}, "Chest"),
                        ({"contains": "axial", "ignore_case": True}, ["ORIGINAL", "AXIAL"])):
        cond = compile_condition({"BodyPartExamined": spec})
        assert cond.evaluate(Subject({"BodyPartExamined": value})).ok, spec
    strict = compile_condition({"BodyPartExamined": {"equals": "chest"}})
    assert not strict.evaluate(Subject({"BodyPartExamined": "CHEST"})).ok


def test_empty_contains_is_refused() -> None:
    with pytest.raises(RuleError, match=r"match.ImageType.contains: expected a value or a "
                                        r"non-empty list"):
        compile_condition({"ImageType": {"contains": []}})


def test_ipv4_mapped_ipv6_source_address_is_in_an_ipv4_network() -> None:
    cond = compile_condition({"SourceAddress": {"network": "10.0.0.0/8"}})
    assert cond.evaluate(Subject({"SourceAddress": "::ffff:10.1.2.3"})).ok


def test_misspelt_combinator_gets_a_suggestion() -> None:
    with pytest.raises(RuleError, match="did you mean 'has_series'"):
        compile_condition({"has_serie": {"Modality": "CT"}})
