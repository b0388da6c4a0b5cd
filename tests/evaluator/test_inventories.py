"""Tests for evaluator.inventories: built-in instruments, validation messages, prompts and norms."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from typing import Any

import pytest
from pydantic import ValidationError

from big5core.prompts import INSTRUCTION_VARIANTS
from big5core.traits import TRAITS, Trait
from evaluator.inventories import (
    Inventory,
    InventoryError,
    InventoryItem,
    LikertScale,
    builtin_inventories,
    get_builtin,
    human_correlation_matrix,
    load_csv_items,
    norm_groups,
    norms_for,
)

BFI_INSTRUCTION = (
    "Here are a number of characteristics that may or may not apply to you. Please indicate the extent to "
    "which you agree or disagree with the following statement. You can only reply a single number from 1 to "
    "5, where 1 = Disagree strongly, 2 = Disagree a little, 3 = Neither agree nor disagree, 4 = Agree a "
    "little, 5 = Agree strongly. Provide your score only."
)
IPIP_INSTRUCTION = (
    "Describe yourself as you generally are now, not as you wish to be in the future. Indicate how accurately "
    "the following statement describes you. You can only reply a single number from 1 to 5, where 1 = Very "
    "inaccurate, 2 = Moderately inaccurate, 3 = Neither accurate nor inaccurate, 4 = Moderately accurate, "
    "5 = Very accurate. Provide your score only."
)
# The standard BFI key (John & Srivastava, 1999): reverse-scored item numbers.
BFI_REVERSED = {6, 21, 31, 2, 12, 27, 37, 8, 18, 23, 43, 9, 24, 34, 35, 41}


def _inventory_data(n_items: int = 8) -> dict[str, Any]:
    return {
        "name": "tiny",
        "title": "Tiny test inventory",
        "citation": "none",
        "licence": "test",
        "instruction": "Rate 1-5.",
        "statement_template": "Statement: {statement}",
        "scale": {"points": 5, "anchors": ["a", "b", "c", "d", "e"]},
        "items": [
            {"id": str(i + 1), "text": f"Item {i + 1}.", "trait": TRAITS[i % 5].code, "facet": None, "keyed": "+"}
            for i in range(n_items)
        ],
    }


# --- built-ins ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "count"), [("bfi44", 44), ("ipip_neo_120", 120), ("ipip_neo_300", 300)])
def test_builtins_load_with_ids_in_order(name: str, count: int) -> None:
    inventory = builtin_inventories()[name]
    assert inventory.name == name
    assert [i.id for i in inventory.items] == [str(n) for n in range(1, count + 1)]
    assert inventory.scale.options == ("1", "2", "3", "4", "5")


def test_builtin_names_and_fresh_dict() -> None:
    first = builtin_inventories()
    assert set(first) == {"bfi44", "ipip_neo_120", "ipip_neo_300"}
    first.pop("bfi44")
    assert "bfi44" in builtin_inventories()


def test_bfi44_counts_and_standard_key() -> None:
    bfi = get_builtin("bfi44")
    counts = Counter(i.trait.code for i in bfi.items)
    assert counts == {"E": 8, "A": 9, "C": 9, "N": 8, "O": 10}
    assert {int(i.id) for i in bfi.items if i.keyed == "-"} == BFI_REVERSED
    assert sum(i.reverse_keyed for i in bfi.items) == 16
    assert bfi.facets == ()
    assert "non-commercial" in bfi.licence.lower()


def test_ipip_neo_120_counts() -> None:
    ipip = get_builtin("ipip_neo_120")
    assert Counter(i.trait for i in ipip.items) == {t: 24 for t in TRAITS}
    assert len(ipip.facets) == 30
    assert set(Counter(i.facet for i in ipip.items).values()) == {4}
    assert Counter(i.keyed for i in ipip.items) == {"+": 65, "-": 55}
    # Johnson's rule: item i belongs to facet ((i - 1) mod 30) + 1 in the order N1, E1, O1, A1, C1, N2, ...
    assert [i.facet for i in ipip.items[:6]] == ["N1", "E1", "O1", "A1", "C1", "N2"]
    assert ipip.items[30].facet == "N1"


def test_ipip_neo_300_counts() -> None:
    ipip = get_builtin("ipip_neo_300")
    assert Counter(i.trait for i in ipip.items) == {t: 60 for t in TRAITS}
    assert set(Counter(i.facet for i in ipip.items).values()) == {10}
    assert Counter(i.keyed for i in ipip.items) == {"+": 152, "-": 148}


def test_get_builtin_unknown_name() -> None:
    with pytest.raises(InventoryError, match="unknown inventory 'nope'"):
        get_builtin("nope")


# --- prompts ------------------------------------------------------------------------------------


def test_render_bfi_item_lowercases_stem() -> None:
    bfi = get_builtin("bfi44")
    assert bfi.instruction == BFI_INSTRUCTION
    expected = BFI_INSTRUCTION + "\n\nStatement: I see myself as someone who is talkative."
    assert bfi.render_item(bfi.items[0]) == expected
    assert bfi.render_item(bfi.items[3]).endswith("someone who is depressed, blue.")


def test_render_ipip_item_keeps_stem() -> None:
    ipip = get_builtin("ipip_neo_120")
    assert ipip.render_item(ipip.items[0]) == IPIP_INSTRUCTION + "\n\nStatement: Worry about things."


def test_instruction_variants() -> None:
    ipip = get_builtin("ipip_neo_120")
    assert ipip.n_variants == 3
    rendered = {ipip.render_item(ipip.items[0], v) for v in range(3)}
    assert len(rendered) == 3
    assert all(text.endswith("\n\nStatement: Worry about things.") for text in rendered)
    with pytest.raises(InventoryError, match="variant 3"):
        ipip.render_item(ipip.items[0], 3)
    for family, anchors in (("bfi", "5 = Agree strongly"), ("ipip", "1 = Very inaccurate")):
        variants = INSTRUCTION_VARIANTS[family]
        assert len(variants) == 3 and len(set(variants)) == 3
        assert all(anchors in v and v.endswith("Provide your score only.") for v in variants)


def test_template_validation() -> None:
    data = _inventory_data()
    for template, message in (("Statement.", "must contain"), ("{statement} {who}", "unknown placeholder")):
        with pytest.raises(ValidationError, match=message):
            Inventory.model_validate({**data, "statement_template": template})
    braces = Inventory.model_validate({**data, "statement_template": "{{x}} {statement_lower}"})
    item = InventoryItem(id="1", text="Likes {curly} things", trait=Trait.OPENNESS, keyed="+")
    assert braces.render_statement(item) == "{x} likes {curly} things"


# --- validation messages ------------------------------------------------------------------------


def test_unknown_trait_names_the_row() -> None:
    data = _inventory_data()
    data["items"][7]["trait"] = "X"
    with pytest.raises(ValidationError, match=r"items\[7\] \(id 8\): unknown trait 'X'"):
        Inventory.model_validate(data)


def test_bad_keyed_names_the_row() -> None:
    data = _inventory_data()
    data["items"][2]["keyed"] = "R"
    with pytest.raises(ValidationError, match=r"items\[2\] \(id 3\): bad keyed value 'R'"):
        Inventory.model_validate(data)


def test_duplicate_id_names_the_row() -> None:
    data = _inventory_data()
    data["items"][3]["id"] = "2"
    with pytest.raises(ValidationError, match=r"items\[3\]: duplicate id '2' \(first at items\[1\]\)"):
        Inventory.model_validate(data)


def test_empty_items() -> None:
    with pytest.raises(ValidationError, match="items: empty item list"):
        Inventory.model_validate(_inventory_data(0))


def test_several_problems_reported_together_and_extra_fields_forbidden() -> None:
    data = _inventory_data()
    data["items"][0]["trait"] = "Q"
    data["items"][5]["keyed"] = "*"
    with pytest.raises(ValidationError, match=r"items\[0\] \(id 1\).*; items\[5\] \(id 6\): bad keyed"):
        Inventory.model_validate(data)
    with pytest.raises(ValidationError, match="extra"):
        Inventory.model_validate({**_inventory_data(), "colour": "red"})
    with pytest.raises(ValidationError, match=r"items\[1\] \(id 2\): colour"):
        bad = _inventory_data()
        bad["items"][1]["colour"] = "red"
        Inventory.model_validate(bad)


@pytest.mark.parametrize("name", ["A", "x", "bad name", "-lead", "a" * 65])
def test_inventory_name_slug(name: str) -> None:
    with pytest.raises(ValidationError, match="name"):
        Inventory.model_validate({**_inventory_data(), "name": name})


def test_item_trait_accepts_codes_and_names_and_checks_facet() -> None:
    def make(**fields: object) -> InventoryItem:
        return InventoryItem.model_validate({"id": "1", "text": "x", "keyed": "+", **fields})

    assert make(trait="O").trait is make(trait="openness").trait is Trait.OPENNESS
    assert make(id=7, trait="N", facet="").model_dump()["id"] == "7"
    assert make(trait="N", facet="").facet is None
    with pytest.raises(ValidationError, match="facet 'E1' does not belong to trait N"):
        make(trait="N", facet="E1")


@pytest.mark.parametrize(
    ("points", "anchors", "ok"),
    [(7, [str(i) for i in range(7)], True), (5, ["a"] * 4, False), (1, ["a"], False), (12, ["a"] * 12, False)],
)
def test_likert_scale(points: int, anchors: list[str], ok: bool) -> None:
    if ok:
        assert LikertScale(points=points, anchors=anchors).options[-1] == str(points)
    else:
        with pytest.raises(ValidationError):
            LikertScale(points=points, anchors=anchors)


# --- CSV ----------------------------------------------------------------------------------------

HEADER = "id,text,trait,facet,keyed\n"


def test_load_csv_items_parses_quotes_and_blank_lines() -> None:
    items = load_csv_items(HEADER + '1,"Is depressed, blue",N,,+\n\n2,Worry.,neuroticism,N1,-\n')
    assert [(i.id, i.text, i.trait, i.facet, i.keyed) for i in items] == [
        ("1", "Is depressed, blue", Trait.NEUROTICISM, None, "+"),
        ("2", "Worry.", Trait.NEUROTICISM, "N1", "-"),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("1,a,O,,+\n2,b,Q,,+\n", r"row 2 \(line 3, id 2\): unknown trait 'Q'"),
        ("1,a,O,,+\n2,b,O,,x\n", r"row 2 \(line 3, id 2\): bad keyed value 'x'"),
        ("1,a,O,,+\n1,b,O,,+\n", r"row 2 \(line 3, id 1\): duplicate id '1' \(first in row 1\)"),
        ("1,a,O,+\n", r"row 1 \(line 2, id 1\): 4 fields, expected 5"),
        ("", "no items"),
    ],
)
def test_load_csv_items_errors_name_the_row(body: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        load_csv_items(HEADER + body)


def test_load_csv_items_header_checks() -> None:
    with pytest.raises(InventoryError, match="expected 'id,text,trait,facet,keyed'"):
        load_csv_items("id,text,trait,keyed\n1,a,O,+\n")
    with pytest.raises(InventoryError, match="no header"):
        load_csv_items("")
    assert issubclass(InventoryError, ValueError)


# --- norms --------------------------------------------------------------------------------------


def _raw_norms() -> dict[str, Any]:
    text = resources.files("evaluator").joinpath("data", "norms.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def test_bfi_norms_are_the_unverified_psychobench_crowd() -> None:
    norms = norms_for("bfi44")
    assert norms is not None
    assert norms.source_key == "bfi44_psychobench_crowd" and norms.provenance_verified is False
    e = norms.traits[Trait.EXTRAVERSION]
    assert (e.mean, e.sd, e.n) == (3.25, 0.9, 6076)
    assert norms.traits[Trait.OPENNESS].mean == 3.92
    assert list(norms.traits) == list(TRAITS)


def test_ipip_120_single_group_values() -> None:
    norms = norms_for("ipip_neo_120", group="male:<=20")
    assert norms is not None and norms.group == "male:<=20"
    n = norms.traits[Trait.NEUROTICISM]
    assert (n.mean, n.sd) == (2.8267, 0.6596)  # 67.84 / 24 and 15.83 / 24
    assert norms.facets["N1"].mean == 2.93


def test_ipip_120_pooled_default() -> None:
    norms = norms_for("ipip_neo_120")
    assert norms is not None and norms.group == "pooled" and norms.provenance_verified
    assert len(norms.facets) == 30 and set(norms.traits) == set(TRAITS)
    groups = _raw_norms()["ipip_neo_120"]["groups"]
    means = [g["domains"]["C"]["mean_item"] for g in groups]
    sds = [g["domains"]["C"]["sd_item"] for g in groups]
    pooled = norms.traits[Trait.CONSCIENTIOUSNESS]
    assert pooled.mean == pytest.approx(sum(means) / 8)
    # Documented default: SD of the equal-weight mixture of the 8 groups,
    # sqrt(mean within-group variance + variance of the group means around the pooled mean).
    within = sum(s * s for s in sds) / 8
    between = sum((m - sum(means) / 8) ** 2 for m in means) / 8
    assert between > 0
    assert pooled.sd == pytest.approx((within + between) ** 0.5)
    assert pooled.sd > within**0.5


def test_norm_groups_and_unknowns() -> None:
    assert norm_groups("ipip_neo_120")[0] == "pooled" and len(norm_groups("ipip_neo_120")) == 9
    assert norm_groups("ipip_neo_300") == ("pooled", "male:<=20", "male:>=21", "female:<=20", "female:>=21")
    assert norm_groups("bfi44") == ("all",)
    assert norms_for("my_custom_inventory") is None and norm_groups("my_custom_inventory") == ()
    assert norms_for("intertrait_correlations") is None
    with pytest.raises(InventoryError, match="unknown norm group 'male:99'"):
        norms_for("ipip_neo_120", group="male:99")
    with pytest.raises(InventoryError, match="single table"):
        norms_for("bfi44", group="female:<=20")


def test_human_correlation_matrix() -> None:
    order, r = human_correlation_matrix()
    assert order == TRAITS
    o, c, e, a, n = range(5)
    assert (r[o][e], r[c][a], r[c][n], r[a][n], r[o][n]) == (0.26, 0.32, -0.27, -0.24, -0.07)
    assert all(r[i][i] == 1.0 for i in range(5))
    assert all(r[i][j] == r[j][i] for i in range(5) for j in range(5))
    _, rho = human_correlation_matrix("rho")
    assert rho[o][e] == 0.33
