"""R2Gen cleaning rules on tricky strings; expected outputs worked out by hand from the rules in
docs/METHOD.md#report-cleaning."""

from __future__ import annotations

import pytest

from mambaxray_ctl.data.cleaning import (
    clean_report,
    clean_report_iu_xray,
    clean_report_mimic_cxr,
    is_empty_report,
)

TRICKY = (
    'Comparison: XXXX... Stable 2-cm "nodule" in the right/left base (unchanged) [see note]. '
    "Heart's size normal."
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # numbered list: "1. " deleted, ". 2. " / ". 3. " become sentence breaks
        (
            "1. The heart is normal. 2. No effusion. 3. Lungs clear.",
            "the heart is normal . no effusion . lungs clear .",
        ),
        # "..." collapses to "."; colon removed; digits and hyphens kept; quotes, slash, brackets removed
        (
            TRICKY,
            "comparison xxxx . stable 2-cm nodule in the rightleft base unchanged see note . "
            "hearts size normal .",
        ),
        # the ":".."[" range also removes < = > @ (and ; ? from the class)
        ("Size <5 mm = stable @ site; ok?", "size 5 mm  stable  site ok ."),
        # quirk 1: the empty sentence is kept
        ("Normal. . Clear.", "normal .  . clear ."),
        # quirk 2: "1. " also hits a year
        ("Compared to 2011. Stable.", "compared to 201stable ."),
        # " 2. " inside a sentence becomes a break
        ("Findings include 2. small nodules", "findings include . small nodules ."),
        # backslash, ! % & * + { } ^ removed
        ("No acute disease!!! 50% better & stable* +{x}^2\\y", "no acute disease 50 better  stable x2y ."),
        ("", " ."),
    ],
)
def test_iu_xray_rule(raw: str, expected: str) -> None:
    assert clean_report_iu_xray(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # colons kept as their own token
        (
            TRICKY,
            "comparison : xxxx . stable 2-cm nodule in the rightleft base unchanged see note . "
            "hearts size normal .",
        ),
        # < = > @ survive, ; ? do not
        ("Size <5 mm = stable @ site; ok?", "size <5 mm = stable @ site ok ."),
        # newlines to spaces, "___" collapsed then removed, double spaces collapsed
        (
            "FINDINGS:\nHeart  size ___ normal.\n\nLungs: clear.",
            "findings : heart size  normal . lungs : clear .",
        ),
        ("1. Tubes in place. 2. No pneumothorax.", "tubes in place . no pneumothorax ."),
        ("Normal. . Clear.", "normal .  . clear ."),
    ],
)
def test_mimic_cxr_rule(raw: str, expected: str) -> None:
    assert clean_report_mimic_cxr(raw) == expected


def test_clean_report_dispatch_and_empty() -> None:
    assert clean_report("  A. B.  ", "none") == "A. B."
    assert clean_report("A. B.", "iu_xray") == "a . b ."
    with pytest.raises(ValueError, match="unknown cleaning rule"):
        clean_report("x", "r2gen")  # type: ignore[arg-type]
    assert is_empty_report(clean_report_iu_xray("... ,;"))
    assert is_empty_report(clean_report_mimic_cxr(""))
    assert not is_empty_report(clean_report_iu_xray("XXXX."))
