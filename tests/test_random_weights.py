"""Random ratios (R, U, X in block weights and elemental rules, supermerger's "Let the Dice roll"): each value
against the same CPU generator drawn by hand, seeds recorded so a merge re-runs to the same bytes."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_merge.arch import ARCHS
from lib_merge.dice import Dice, unit
from lib_merge.elemental import apply_rules, parse_rules
from lib_merge.errors import MergeError
from lib_merge.merge import merge_to_file
from lib_merge.recipe import Recipe, as_recipe

from conftest import f32, load

ROOT = Path(__file__).resolve().parent.parent
SD1, XL = ARCHS["sd1"], ARCHS["sdxl"]
IN01_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"
OUT05_ATTN2 = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
OUT05_ATTN1 = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_k.weight"


def r(seed, *where):
    """The hand-drawn number: Python's generator seeded by the text "<seed>/<what>/<where>"."""
    return random.Random("/".join((str(seed), *where))).random()


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_merge", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def meta(path):
    from lib_merge.io.sources import open_source
    with open_source(Path(path)) as s:
        return json.loads(s.metadata["blockmerge_recipe"])


def vec(*tokens):
    """A 26-value SD1 vector: BASE, IN00.. with the given tokens first and 0.5 for the rest."""
    return ",".join(list(tokens) + ["0.5"] * (26 - len(tokens)))


def test_each_token_against_the_generator():
    d = Dice(7, tuple(SD1.blocks), lower=[0.2] * 26, upper=[0.6] * 26)
    i = SD1.blocks.index("IN05")
    assert d.block("alpha", "R", i) == r(7, "alpha", "IN05")
    assert d.block("alpha", "U", i) == 1.5 - 2 * r(7, "alpha", "IN05")
    assert d.block("beta", "X", i) == 0.2 + 0.4 * r(7, "beta", "IN05")
    # elemental: one draw per key; U is [-1, 1] as supermerger's elemental U
    assert d.element(2, "rule", "U", OUT05_ATTN2, "OUT05") == 1 - 2 * r(7, "elemental", "2", OUT05_ATTN2)
    assert d.element(2, "rule", "R", OUT05_ATTN1, "OUT05") == r(7, "elemental", "2", OUT05_ATTN1)
    assert unit(7, "alpha", "IN05") == r(7, "alpha", "IN05")
    assert d.record()["seed"] == 7 and d.record()["alpha"]["IN05"] == 1.5 - 2 * r(7, "alpha", "IN05")


def test_values_cover_their_ranges():
    d = Dice(1, tuple(SD1.blocks), lower=[-0.3] * 26, upper=[0.1] * 26)
    for seed in range(200):
        d.seed = seed
        assert 0 <= d.block("alpha", "R", 3) < 1
        assert -0.5 < d.block("alpha", "U", 3) <= 1.5
        assert -0.3 <= d.block("alpha", "X", 3) < 0.1
        assert -1 < d.element(0, "t", "U", "k", "IN02") <= 1


def test_mixed_vector_merges_with_drawn_ratios(models, out_dir):
    weights = vec("0.5", "R", "U", "0.25")  # BASE 0.5, IN00 R, IN01 U, IN02 0.25
    res = merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]], weights=weights, seed=11,
                               dtype="fp32"),
                        out_dir / "o.safetensors")
    v = res.plan.alpha_vector
    assert v[:4] == [0.5, r(11, "alpha", "IN00"), 1.5 - 2 * r(11, "alpha", "IN01"), 0.25] and v[4:] == [0.5] * 22
    a, b, o = load(models["sd15_a"]), load(models["sd15_b"]), load(res.output)
    w = v[2]  # IN01
    assert torch.allclose(f32(o[IN01_KEY]), torch.lerp(f32(a[IN01_KEY]), f32(b[IN01_KEY]), w), atol=1e-6)
    m = meta(res.output)
    assert m["seed"] == 11
    assert m["resolved"]["weights_alpha"] == v
    assert m["resolved"]["random"] == {"seed": 11, "alpha": {"IN00": v[1], "IN01": v[2]}}
    assert "random weights drawn with seed 11" in res.plan.report.lines()


def test_same_seed_same_bytes_different_seed_different_numbers(models, tmp_path):
    def run(folder, seed):
        (tmp_path / folder).mkdir()
        return merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]], weights=",".join(["R"] * 26),
                                    elemental="OUT05:attn2:U", seed=seed), tmp_path / folder / "o.safetensors")
    one, two, other = run("one", 5), run("two", 5), run("other", 6)
    assert one.output.read_bytes() == two.output.read_bytes()
    assert one.plan.alpha_vector != other.plan.alpha_vector
    assert one.sha256 != other.sha256


def test_elemental_random_rule_draws_per_key(models, out_dir):
    res = merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]], alpha=0.3, elemental="OUT05:attn2:R",
                               dtype="fp32", seed=3), out_dir / "o.safetensors")
    plan = res.plan.by_key()
    hit = [k for k in plan if ".output_blocks.5." in k and "attn2" in k and plan[k].action == "merge"]
    assert len(hit) >= 4
    for k in hit:
        assert plan[k].alpha == r(3, "elemental", "0", k)
    assert len({plan[k].alpha for k in hit}) == len(hit)  # each key draws its own value
    assert plan[OUT05_ATTN1].alpha == 0.3
    a, b, o = load(models["sd15_a"]), load(models["sd15_b"]), load(res.output)
    w = r(3, "elemental", "0", OUT05_ATTN2)
    assert torch.allclose(f32(o[OUT05_ATTN2]), torch.lerp(f32(a[OUT05_ATTN2]), f32(b[OUT05_ATTN2]), w), atol=1e-6)
    rec = meta(res.output)["resolved"]["random"]
    assert rec["seed"] == 3 and rec["elemental"]["0"]["rule"] == "OUT05:attn2:R"
    assert rec["elemental"]["0"]["values"] == {k: r(3, "elemental", "0", k) for k in hit}


def test_x_draws_between_the_block_bounds(models, out_dir):
    lower = ",".join(str(i / 100) for i in range(26))
    upper = ",".join(str(i / 100 + 0.5) for i in range(26))
    res = merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]], weights=",".join(["X"] * 26),
                               random_lower=lower, random_upper=upper, seed=9), out_dir / "o.safetensors")
    for i, name in enumerate(SD1.blocks):
        assert res.plan.alpha_vector[i] == i / 100 + (i / 100 + 0.5 - i / 100) * r(9, "alpha", name)
    m = meta(res.output)
    assert (m["random_lower"], m["random_upper"]) == (lower, upper)


def test_sdxl_converts_an_sd1_vector_with_tokens(models, out_dir):
    tokens = ["0.1"] * 26
    tokens[SD1.blocks.index("OUT08")] = "R"
    tokens[SD1.blocks.index("OUT10")] = "R"  # dropped on SDXL
    res = merge_to_file(Recipe(models=[models["sdxl_a"], models["sdxl_b"]], weights=",".join(tokens), seed=4),
                        out_dir / "o.safetensors")
    v = res.plan.alpha_vector
    assert v[XL.blocks.index("OUT08")] == r(4, "alpha", "OUT08")
    assert sorted(res.plan.random["alpha"]) == ["OUT08"]


def test_no_seed_draws_prints_records_and_reproduces(models, tmp_path):
    out = tmp_path / "o.safetensors"
    res = cli("merge", models["sd15_a"], models["sd15_b"], "-o", out, "--weights", vec("0.5", "R", "U"),
              "--elemental", "OUT05:attn2:R", "-q")
    assert res.returncode == 0, res.stderr
    found = re.search(r"^note: random weights drawn with seed (\d+)$", res.stdout, re.M)
    assert found, res.stdout
    seed = int(found.group(1))
    m = meta(out)
    assert m["seed"] == seed and m["resolved"]["random"]["seed"] == seed
    assert m["resolved"]["weights_alpha"][1] == r(seed, "alpha", "IN00")
    again = cli("reproduce", out, "-q")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith("identical:")


def test_cli_seed_flag(models, tmp_path):
    out = tmp_path / "o.safetensors"
    res = cli("merge", models["sd15_a"], models["sd15_b"], "-o", out, "--weights", vec("R"), "--seed", "42", "-q")
    assert res.returncode == 0, res.stderr
    assert "note: random weights drawn with seed 42" in res.stdout
    assert meta(out)["resolved"]["weights_alpha"][0] == r(42, "alpha", "BASE")


@pytest.mark.parametrize("changes,message", [
    ({"weights": vec("X")}, r"^X needs --random-lower and --random-upper vectors \(missing --random-lower\), "
                            r"alpha weights block BASE$"),
    ({"weights": vec("X"), "random_lower": vec()}, r"missing --random-upper"),
    ({"weights": vec("X"), "random_lower": "0,1", "random_upper": vec()},
     r"^--random-lower have 2 values; SD1.x takes 26 \(BASE first\) or 25 \(BASE = alpha\)$"),
    ({"weights": vec("X"), "random_lower": vec("0.9"), "random_upper": vec("0.1")},
     r"^random lower bound 0.9 is above the upper bound 0.1 at block BASE, alpha weights block BASE$"),
    ({"weights": vec("X"), "random_lower": ",".join(["0"] * 25), "random_upper": ",".join(["1"] * 25)},
     r"^X at BASE needs BASE bounds"),
    ({"weights": vec("0.5", "r")}, r"^not a number: 'r', --weights value 2 \(a number, R, U or X\)$"),
    ({"weights": vec("0.5", "Q")}, r"^not a number: 'Q', --weights value 2 \(a number, R, U or X\)$"),
    ({"elemental": "OUT05:attn2:X"}, r"^X needs .*, elemental rule 'OUT05:attn2:X'$"),
    ({"weights": vec("R"), "seed": -1}, r"^seed must be 0 \.\. 2\*\*63-1 \(leave it out to draw one\), seed: -1$"),
])
def test_errors_are_one_line_naming_the_field(models, out_dir, changes, message):
    with pytest.raises(MergeError, match=message):
        merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]], **{"seed": 1, **changes}),
                      out_dir / "o.safetensors")
    assert not (out_dir / "o.safetensors").exists()


def test_bounds_without_x_are_a_note(models, out_dir):
    res = merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"]], weights=vec("R"), seed=1,
                               random_lower=vec(), random_upper=vec()), out_dir / "o.safetensors")
    assert "--random-lower/--random-upper have no effect: no X token drew from them" in res.plan.report.lines()


def test_recipe_fields_parse_lists_and_stay_out_when_unset():
    rec = as_recipe({"models": ["a", "b"], "weights": ["R", 0.5, "U"], "seed": 3, "random_lower": [0, 0.5]})
    assert (rec.weights, rec.seed, rec.random_lower) == ("R,0.5,U", 3, "0,0.5")
    with pytest.raises(MergeError, match=r"^seed must be a whole number \(got float 1.5\), recipe$"):
        as_recipe({"models": ["a", "b"], "seed": 1.5})
    with pytest.raises(MergeError, match=r"^weights list items must be numbers or R/U/X \(got str 'Z'\), recipe$"):
        as_recipe({"models": ["a", "b"], "weights": ["Z"]})
    plain = Recipe(models=["a", "b"]).to_dict()
    assert not {"seed", "random_lower", "random_upper"} & set(plain)


def test_apply_rules_without_a_generator_is_an_error():
    rules = parse_rules("OUT05:attn2:R", SD1)
    assert rules[0].token == "R"
    with pytest.raises(MergeError, match=r"^random ratio R needs a seed"):
        apply_rules(rules, OUT05_ATTN2, "OUT05", 0.5)
    assert apply_rules(rules, OUT05_ATTN2, "OUT05", 0.5, draw=lambda i, rule, k, b: 0.125) == 0.125


def test_live_merge_records_its_seed_and_a_file_merge_of_its_recipe_equals_it(models, sd15_listing, tmp_path):
    """A test merge without a seed draws one; the session's recipe (what infotexts and Save read) carries it,
    so the file merged from that recipe holds exactly the previewed numbers."""
    from lib_merge import synthetic as S
    from lib_merge.live import CachePolicy, LiveSession
    from test_live import ModuleTarget
    module = S.build_module(sd15_listing, dtype=torch.float32)
    S.load_into(module, models["sd15_a"])
    session = LiveSession(ModuleTarget(module), models["sd15_a"], cache=CachePolicy.CPU)
    try:
        rep = session.apply(Recipe(models=[str(models["sd15_a"]), str(models["sd15_b"])],
                                   weights=vec("R", "U", "0.5", "R"), elemental="OUT05:attn2:R"))
        seed = session.recipe.seed
        assert isinstance(seed, int) and f"random weights drawn with seed {seed}" in rep.notes
        out = tmp_path / "saved.safetensors"
        merge_to_file(Recipe(**{**session.recipe.__dict__, "dtype": "fp32"}), out)
        saved = load(out)
        for k, p in module.named_parameters():
            assert torch.equal(saved[k], p.detach()), k
    finally:
        session.close()


def test_beta_vector_without_base_draws_its_own_stream(models, out_dir):
    """25 values leave BASE out (BASE = beta); the beta draws differ from alpha's of the same seed and block."""
    res = merge_to_file(Recipe(models=[models["sd15_a"], models["sd15_b"], models["sd15_c"]], mode="triple_sum",
                               alpha=0.2, beta=0.1, weights=vec("0.2", "R"), weights_beta=",".join(["R"] * 25),
                               seed=8), out_dir / "o.safetensors")
    v = res.plan.beta_vector
    assert v[0] == 0.1 and v[1:] == [r(8, "beta", b) for b in SD1.blocks[1:]]
    assert res.plan.alpha_vector[1] == r(8, "alpha", "IN00") != v[1]


def test_cli_help_names_the_random_options():
    from lib_merge.cli import build_parser
    text = build_parser("blockmerge")._subparsers._group_actions[0].choices["merge"].format_help()
    text = " ".join(text.split())  # help lines wrap at the terminal's width
    for flag in ("--seed", "--random-lower", "--random-upper", "U = [-0.5,1.5]"):
        assert flag in text
