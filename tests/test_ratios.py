"""Weight strings, presets and elemental rules."""

import re

import pytest

from lib_merge import presets
from lib_merge.arch import ARCHS
from lib_merge.elemental import apply_rules, parse_rules, subtarget_rule
from lib_merge.errors import MergeError
from lib_merge.weights import parse_weights

SD1, XL = ARCHS["sd1"], ARCHS["sdxl"]
V26 = ",".join(str(i / 100) for i in range(26))


def test_vector_lengths_sd1():
    assert parse_weights(V26, SD1, 0.5) == [i / 100 for i in range(26)]
    v25 = ",".join(str(i / 100) for i in range(1, 26))
    assert parse_weights(v25, SD1, 0.7) == [0.7] + [i / 100 for i in range(1, 26)]


def test_vector_lengths_sdxl_and_conversion():
    v = parse_weights(V26, XL, 0.5)
    # BASE, IN00-IN08, M00 (index 13), OUT00-OUT08 (indices 14-22)
    assert v == [i / 100 for i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
    v20 = ",".join(str(i) for i in range(20))
    assert parse_weights(v20, XL, 0.5) == [float(i) for i in range(20)]
    v19 = ",".join(str(i) for i in range(1, 20))
    assert parse_weights(v19, XL, 0.25) == [0.25] + [float(i) for i in range(1, 20)]


@pytest.mark.parametrize("text,arch,msg", [
    ("1,2,3", SD1, "weights have 3 values; SD1.x takes 26"),
    (",".join(["1"] * 20), SD1, "weights have 20 values"),
    (",".join(["1"] * 21), XL, "weights have 21 values; SDXL takes 20"),
    ("0.5," * 25 + "abc", SD1, "not a number: 'abc', --weights value 26"),
    ("0.5,,0.5", SD1, "empty value at position 2"),
    ("0.5," * 25 + "nan", SD1, "not a finite number: 'nan'"),
])
def test_bad_weight_strings(text, arch, msg):
    with pytest.raises(MergeError, match=msg):
        parse_weights(text, arch, 0.5)


def test_shipped_presets():
    sd1 = presets.table("sd1")
    xl = presets.table("sdxl")
    assert len(sd1) == 38 and len(xl) == 34
    assert list(sd1)[:3] == ["GRAD_V", "GRAD_A", "FLAT_25"]
    assert sd1["GRAD_V"].values[:3] == (0.0, 1.0, 0.9166666667)
    assert sd1["GRAD_V"].values[13] == 0.0 and sd1["GRAD_V"].values[-1] == 1.0
    assert sd1["ALL_B"].values == (1.0,) * 26
    assert sd1["SMOOTHSTEP*2"].values[13] == 1.0  # written as "1." in the shipped file
    assert xl["COSINE"].values[10] == 1.0 and len(xl["COSINE"].values) == 20


def test_preset_on_sdxl_native_or_converted():
    assert presets.resolve("GRAD_V", XL) == list(presets.table("sdxl")["GRAD_V"].values)
    # ALL_B has no native SDXL preset: converted from SD1
    assert presets.resolve("ALL_B", XL) == [1.0] * 20
    # TRUE_CUBIC_HERMITE exists only for SD1: converted by dropping IN09-IN11, OUT09-OUT11
    sd1 = presets.resolve("TRUE_CUBIC_HERMITE", SD1)
    assert presets.resolve("TRUE_CUBIC_HERMITE", XL) == sd1[:10] + sd1[13:23]


def test_unknown_preset():
    with pytest.raises(MergeError, match="unknown preset, 'NOPE'"):
        presets.resolve("NOPE", SD1)


def test_user_presets_override_and_formats(tmp_path):
    user = presets.user_presets_path()
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_bytes(b"GRAD_V\t" + b",".join([b"1."] * 26) + b"\r\nMINE:" + b",".join([b"0.5"] * 20) + b"\r\n")
    assert presets.resolve("GRAD_V", SD1) == [1.0] * 26
    assert presets.resolve("MINE", XL) == [0.5] * 20
    assert presets.table("sd1")["GRAD_V"].source == "user"


def test_user_preset_bad_line_reported_with_line_number_and_skipped():
    user = presets.user_presets_path()
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text("OK\t" + ",".join(["1"] * 26) + "\nBAD\t1,2,3\nNOSEP 1,2\n")
    found, problems = presets.load_all_checked()
    assert presets.resolve("OK", SD1) == [1.0] * 26  # the good user line works
    assert presets.resolve("GRAD_V", SD1)[1] == 1.0  # shipped presets keep working
    assert "BAD" not in presets.names("sd1")
    assert len(problems) == 2 and problems == presets.user_problems()
    assert re.fullmatch(r"preset BAD has 3 values, expected 26 or 20, .*user.tsv line 2; line skipped", problems[0])
    assert re.fullmatch(r"preset line has no TAB or ':' between name and values, .*user.tsv line 3; line skipped",
                        problems[1])


def test_shipped_presets_stay_strict():
    with pytest.raises(MergeError, match=r"preset X has 2 values, expected 26, sd1.tsv line 1"):
        presets.parse_preset_text("X\t1,2\n", "sd1.tsv", 26)


def test_preset_name_in_another_case_resolves():
    assert presets.resolve("grad_v", SD1) == presets.resolve("GRAD_V", SD1)
    assert presets.lookup("flat_25", XL).name == "FLAT_25"
    with pytest.raises(MergeError, match=r"unknown preset, 'GRAD_X' \(did you mean GRAD_V\?\)"):
        presets.resolve("GRAD_X", SD1)


def test_preset_names_differing_only_in_case_must_be_exact():
    presets.save_user_preset("Mine", [0.1] * 26)
    presets.save_user_preset("MINE", [0.2] * 26)
    assert presets.resolve("Mine", SD1) == [0.1] * 26 and presets.resolve("MINE", SD1) == [0.2] * 26
    with pytest.raises(MergeError, match="preset name matches Mine, MINE in different case: write it exactly, 'mine'"):
        presets.resolve("mine", SD1)


def test_semicolon_separated_weights_say_so():
    with pytest.raises(MergeError, match="weights are separated by commas, not ';', --weights"):
        parse_weights(";".join(["0.5"] * 26), SD1, 0.5)


def test_save_and_delete_user_preset():
    presets.save_user_preset("MY_CURVE", [0.25] * 26)
    assert presets.resolve("MY_CURVE", SD1) == [0.25] * 26
    presets.save_user_preset("MY_CURVE", [0.75] * 26)
    assert presets.resolve("MY_CURVE", SD1) == [0.75] * 26
    assert presets.delete_user_preset("MY_CURVE")
    with pytest.raises(MergeError, match="unknown preset"):
        presets.resolve("MY_CURVE", SD1)
    with pytest.raises(MergeError, match="shipped presets are read-only, GRAD_V"):
        presets.delete_user_preset("GRAD_V")
    shipped = (presets.shipped_dir() / "sd1.tsv").read_text()
    assert "MY_CURVE" not in shipped


KEY_ATTN2 = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
KEY_ATTN1 = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
KEY_RES = "model.diffusion_model.output_blocks.4.0.in_layers.2.weight"


def test_elemental_last_match_wins():
    rules = parse_rules("OUT04:attn:0.5,OUT04:attn2.to_k:0.2", SD1)
    assert apply_rules(rules, KEY_ATTN2, "OUT04", 0.9) == 0.2
    assert apply_rules(rules, KEY_ATTN1, "OUT04", 0.9) == 0.5
    assert apply_rules(rules, KEY_RES, "OUT04", 0.9) == 0.9
    rules = parse_rules("OUT04:attn2.to_k:0.2\nOUT04:attn:0.5", SD1)
    assert apply_rules(rules, KEY_ATTN2, "OUT04", 0.9) == 0.5


def test_elemental_not_and_ranges():
    rules = parse_rules("NOT OUT04:attn:1", SD1)
    assert apply_rules(rules, KEY_ATTN1, "OUT04", 0.3) == 0.3
    assert apply_rules(rules, KEY_ATTN1.replace("output_blocks.4", "output_blocks.5"), "OUT05", 0.3) == 1.0
    rules = parse_rules("OUT04:NOT attn proj:0.2", SD1)
    assert apply_rules(rules, KEY_RES, "OUT04", 0.9) == 0.2
    assert apply_rules(rules, KEY_ATTN1, "OUT04", 0.9) == 0.9
    rules = parse_rules("OUT03-OUT05::0.1", SD1)
    assert [apply_rules(rules, KEY_RES, b, 0.9) for b in ("OUT02", "OUT03", "OUT04", "OUT05", "OUT06")] == \
        [0.9, 0.1, 0.1, 0.1, 0.9]
    rules = parse_rules(" : attn1 : 0 ", SD1)  # blank blocks = every block, BASE included
    assert apply_rules(rules, "cond_stage_model.x.attn1.y", "BASE", 0.9) == 0.0


def test_elemental_sdxl_names():
    rules = parse_rules("OUT08:attn2:0.3", XL)
    assert apply_rules(rules, "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.attn2.to_q.weight",
                       "OUT08", 1.0) == 0.3


@pytest.mark.parametrize("text,arch,msg", [
    ("OUT04:attn", SD1, "exactly two ':'"),
    ("OUT04:attn:0.5:1", SD1, "exactly two ':'"),
    ("OUT44:attn:0.5", SD1, "unknown block 'OUT44'"),
    ("IN10:attn:0.5", XL, "block IN10 does not exist on SDXL"),
    ("OUT04:attn:abc", SD1, "ratio 'abc' is not a number"),
    ("OUT04:attn:inf", SD1, "ratio 'inf' is not a finite number"),
    ("OUT04:attn:Q", SD1, r"ratio 'Q' is not a number \(nor R, U, X\), elemental rule 'OUT04:attn:Q'"),
    ("OUT05-IN02:attn:0.5", SD1, r"reversed block range 'OUT05-IN02' \(write IN02-OUT05\), elemental rule "
                                 r"'OUT05-IN02:attn:0.5'"),
])
def test_elemental_errors_name_rule_and_token(text, arch, msg):
    with pytest.raises(MergeError, match=msg):
        parse_rules(text, arch)


def test_subtarget_rule():
    assert subtarget_rule(["all"], 0.5) is None
    rule = subtarget_rule(["attn1", "ff"], 0.5)
    rules = parse_rules(rule, SD1)
    assert apply_rules(rules, KEY_ATTN1, "OUT04", 0.9) == 0.9
    assert apply_rules(rules, KEY_RES, "OUT04", 0.9) == 0.5


def test_saving_keeps_the_user_file_lines_it_does_not_replace():
    user = presets.user_presets_path()
    user.parent.mkdir(parents=True, exist_ok=True)
    bad = "BAD\t1,2,3"
    kept = "# my curves\r\nKEEP:" + ",".join(["1."] * 20)
    user.write_text(bad + "\n" + kept + "\n")
    presets.save_user_preset("NEW", [0.5] * 26)
    presets.save_user_preset("NEW", [0.25] * 26)
    assert user.read_text().splitlines() == [bad, "# my curves", "KEEP:" + ",".join(["1."] * 20),
                                             "NEW\t" + ",".join(["0.25"] * 26)]
    assert presets.resolve("NEW", SD1) == [0.25] * 26 and presets.resolve("KEEP", XL) == [1.0] * 20
    assert presets.delete_user_preset("NEW")
    assert user.read_text().splitlines() == [bad, "# my curves", "KEEP:" + ",".join(["1."] * 20)]
