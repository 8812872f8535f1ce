"""The matrix policy: grammar, expansion, validation, solver; pure code, no I/O.

The solver never expands sets; ``brute_force`` below applies llama-swap's
rules literally to the expanded sets, and a hypothesis property checks that
both agree on evictions, the chosen set and the cost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trio_swap.config.matrix_dsl import (
    MAX_DEPTH,
    And,
    MatrixError,
    Model,
    Node,
    Or,
    Ref,
    compile_matrix,
    compile_sets,
    parse_set,
)
from trio_swap.policy import SwapPolicy
from trio_swap.policy.matrix import MatrixPolicy, Plan, parse_matrix

# --- the seeds: llama-swap's config.example.yaml matrix ----------------------

SEED_MODELS = (
    "gemma-model",
    "qwen-model",
    "mistral-model",
    "voxtral-model",
    "reranker-model",
    "llama-70B",
    "stable-diffusion",
    "whisper",  # in no set: runs alone
)
SEED_VARS = {
    "g": "gemma-model",
    "q": "qwen-model",
    "m": "mistral-model",
    "v": "voxtral-model",
    "e": "reranker-model",
    "L": "llama-70B",
    "sd": "stable-diffusion",
}
SEED_COSTS = {"v": 50, "L": 30}
SEED_SETS = {
    "standard": "(g | q | m) & v",  # LLM + STT/TTS
    "with_rerank": "(g | q) & v & e",  # RAG: LLM + voice + reranker
    "creative": "(g | q) & sd",
    "full": "L",  # the 70B uses every GPU: alone
}


def seed_policy() -> MatrixPolicy:
    return MatrixPolicy.build(SEED_SETS, SEED_VARS, SEED_COSTS, SEED_MODELS)


def letters(sets: Mapping[str, str], costs: Mapping[str, int] | None = None) -> MatrixPolicy:
    """A policy over models a..h with no vars."""
    return MatrixPolicy.build(sets, {}, costs or {}, "abcdefgh")


def ident(name: str) -> str | None:
    return name


def ast(text: str) -> Node:
    return parse_set("s", text, ident)


def expand(text: str, **others: str) -> list[list[str]]:
    table = compile_sets({"s": text, **others}, ident)
    return [sorted(combo) for combo in table.expand("s")]


# --- grammar -----------------------------------------------------------------


def test_grammar_and_binds_tighter_than_or() -> None:
    assert ast("a | b & c") == Or(
        (Model("a", "a", 0), And((Model("b", "b", 4), Model("c", "c", 8))))
    )


def test_grammar_parentheses_override_precedence() -> None:
    assert ast("(a | b) & c") == And(
        (Or((Model("a", "a", 1), Model("b", "b", 5))), Model("c", "c", 10))
    )


def test_grammar_operators_are_n_ary() -> None:
    tree = ast("a & b & c | d | e")
    assert isinstance(tree, Or)
    assert len(tree.children) == 3
    assert isinstance(tree.children[0], And)
    assert len(tree.children[0].children) == 3


def test_grammar_redundant_parentheses_vanish() -> None:
    assert ast("((a))") == Model("a", "a", 2)


def test_grammar_reference_is_plus_glued_to_a_name() -> None:
    assert ast("+llms & v") == And((Ref("llms", 0), Model("v", "v", 8)))


def test_grammar_whitespace_and_newlines_are_free() -> None:
    assert ast("\n  (a|b)\t&\n\n c  ") == And(
        (Or((Model("a", "a", 4), Model("b", "b", 6))), Model("c", "c", 13))
    )


def test_grammar_no_whitespace_needed() -> None:
    assert expand("(a|b)&c") == [["a", "c"], ["b", "c"]]


@pytest.mark.parametrize(
    "name", ["llama-3.1-8b", "qwen2.5_coder", "Mistral.Q4", "modèle-7b", "模型", "v2", "7b"]
)
def test_grammar_identifier_characters(name: str) -> None:
    assert ast(name) == Model(name, name, 0)


def test_grammar_resolves_var_before_model_id() -> None:
    # "g" is both a var and a model id: the var wins.
    policy = MatrixPolicy.build({"s": "g & x"}, {"g": "gemma"}, {}, ["g", "gemma", "x"])
    assert policy.expand_set("s") == [("gemma", "x")]


def test_grammar_leaf_keeps_what_was_written() -> None:
    table = compile_sets({"s": "g"}, {"g": "gemma-model"}.get)
    assert table.roots["s"] == Model("gemma-model", "g", 0)


# --- expansion ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the examples in llama-swap's config.example.yaml
        ("L", [["L"]]),
        ("a & b", [["a", "b"]]),
        ("a | b", [["a"], ["b"]]),
        ("(a | b) & c", [["a", "c"], ["b", "c"]]),
        ("(a | b) & (c | d)", [["a", "c"], ["a", "d"], ["b", "c"], ["b", "d"]]),
        # duplicates inside a combination vanish
        ("a & a", [["a"]]),
        ("(a & b) & (b & a)", [["a", "b"]]),
        # identical combinations keep the first place
        ("a | b | a", [["a"], ["b"]]),
        ("(a | b) & (b | a)", [["a", "b"], ["a"], ["b"]]),
        ("b & a | a & b | c", [["a", "b"], ["c"]]),
        # left-major: the left operand is the outer loop
        ("(c | d) & (a | b)", [["a", "c"], ["b", "c"], ["a", "d"], ["b", "d"]]),
        (
            "(a | b) & (c | d) & (e | f)",
            [
                ["a", "c", "e"],
                ["a", "c", "f"],
                ["a", "d", "e"],
                ["a", "d", "f"],
                ["b", "c", "e"],
                ["b", "c", "f"],
                ["b", "d", "e"],
                ["b", "d", "f"],
            ],
        ),
        # no subset pruning (llama-swap drops [a] here and moves [a, c] last)
        ("a | b | a & c", [["a"], ["b"], ["a", "c"]]),
    ],
)
def test_expand(text: str, expected: list[list[str]]) -> None:
    assert expand(text) == expected


def test_expand_reference_is_inlined() -> None:
    assert expand("+llms & v", llms="g | q") == [["g", "v"], ["q", "v"]]


def test_expand_reference_to_a_set_defined_later() -> None:
    table = compile_sets({"a": "+b | x", "b": "y & z"}, ident)
    assert table.expand("a") == [frozenset({"y", "z"}), frozenset({"x"})]


def test_expand_var_and_model_id_are_one_model() -> None:
    policy = MatrixPolicy.build({"s": "g & gemma"}, {"g": "gemma"}, {}, ["gemma"])
    assert policy.expand_set("s") == [("gemma",)]


def test_expand_seed_sets() -> None:
    policy = seed_policy()
    assert policy.expand_set("standard") == [
        ("gemma-model", "voxtral-model"),
        ("qwen-model", "voxtral-model"),
        ("mistral-model", "voxtral-model"),
    ]
    assert policy.expand_set("with_rerank") == [
        ("gemma-model", "reranker-model", "voxtral-model"),
        ("qwen-model", "reranker-model", "voxtral-model"),
    ]
    assert policy.expand_set("full") == [("llama-70B",)]


def test_expand_set_limit_is_a_clear_error() -> None:
    policy = letters({"big": "(a | b) & (c | d) & (e | f) & (g | h)"})
    assert len(policy.expand_set("big")) == 16
    with pytest.raises(MatrixError) as info:
        policy.expand_set("big", limit=10)
    assert info.value.set_name == "big"
    assert str(info.value) == "set 'big': expands to more than 10 combinations, too many to list"


def test_visiting_order_puts_referenced_sets_first() -> None:
    policy = letters({"a": "+c & d", "b": "e", "c": "+d2 | f", "d2": "g"})
    assert policy.set_names == ("a", "b", "c", "d2")
    assert policy.visiting_order == ("d2", "c", "a", "b")


def test_visiting_order_is_definition_order_without_forward_refs() -> None:
    policy = letters({"x": "a", "y": "+x & b", "z": "+x | +y"})
    assert policy.visiting_order == ("x", "y", "z")


def test_a_set_referenced_twice_expands_both_times() -> None:
    assert expand("+p & +p", p="a | b") == [["a"], ["a", "b"], ["b"]]


# --- validation --------------------------------------------------------------


def build_error(
    sets: Mapping[str, str],
    vars: Mapping[str, str] | None = None,
    costs: Mapping[str, int] | None = None,
    models: Sequence[str] = ("a", "b", "c", "gemma"),
) -> MatrixError:
    with pytest.raises(MatrixError) as info:
        MatrixPolicy.build(sets, vars or {}, costs or {}, models)
    return info.value


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("", None, "empty expression"),
        ("  \n\t ", None, "empty expression"),
        ("a &", 2, "operator '&' has nothing on its right"),
        ("a |", 2, "operator '|' has nothing on its right"),
        ("(a | b) &", 8, "operator '&' has nothing on its right"),
        ("a | | b", 2, "operator '|' has nothing on its right"),
        ("a && b", 2, "operator '&' has nothing on its right"),
        ("(a & ) | b", 3, "operator '&' has nothing on its right"),
        ("& a", 0, "operator '&' has nothing on its left"),
        ("(| a)", 1, "operator '|' has nothing on its left"),
        ("a b", 2, "two names without an operator between them at column 2; use & or |"),
        ("a & b c", 6, "two names without an operator between them at column 6; use & or |"),
        ("a+b", 1, "two names without an operator between them at column 1; use & or |"),
        ("(a) b", 4, "two expressions without an operator between them at column 4; use & or |"),
        (
            "a (b | c)",
            2,
            "two expressions without an operator between them at column 2; use & or |",
        ),
        ("a & @", 4, "unexpected character '@' at column 4"),
        ("a, b", 1, "unexpected character ',' at column 1"),
        ("a\n&\n*", 4, "unexpected character '*' at column 4"),
        ("a & + b", 4, "'+' at column 4 must be immediately followed by a set name"),
        ("a & +", 4, "'+' at column 4 must be immediately followed by a set name"),
        ("(a | b", 0, "'(' at column 0 is never closed"),
        ("a & ((b | c)", 4, "'(' at column 4 is never closed"),
        ("a | b)", 5, "')' at column 5 has no matching '('"),
        (")", 0, "')' at column 0 has no matching '('"),
        ("a & ()", 4, "empty parentheses at column 4"),
    ],
)
def test_syntax_errors_in_plain_words(text: str, position: int | None, message: str) -> None:
    error = build_error({"ok": "a", "bad": text})
    assert (error.set_name, error.position, error.message) == ("bad", position, message)
    assert str(error) == f"set 'bad': {message}"
    assert error.key_path == ("sets", "bad")


@pytest.mark.parametrize(
    "text",
    ["a &", "& a", "a b", "()", "(a", "a)", "a @", "+", "a | | b", "a & & b", "(a b)", "a ) ("],
)
def test_syntax_errors_never_show_lark_internals(text: str) -> None:
    shown = str(build_error({"s": text}))
    for internal in ("RPAR", "LPAR", "__ANON", "$END", "_AND", "_OR", "NAME", "Expected", "Token"):
        assert internal not in shown


def test_unknown_name() -> None:
    error = build_error({"s": "a & ghost"})
    assert (error.set_name, error.position) == ("s", 4)
    assert str(error) == "set 's': unknown name 'ghost' (not a var or a model id)"


def test_alias_is_not_a_name() -> None:
    # Aliases are not model ids; only the id (or a var) is accepted.
    error = build_error({"s": "gemma-alias"}, models=("gemma",))
    assert error.message == "unknown name 'gemma-alias' (not a var or a model id)"


def test_undefined_reference() -> None:
    error = build_error({"a": "b", "s": "a | +nope"})
    assert (error.set_name, error.position) == ("s", 4)
    assert str(error) == "set 's' refers to undefined set 'nope'"


def test_self_reference() -> None:
    error = build_error({"a": "b | +a"})
    assert (error.set_name, error.position) == ("a", 4)
    assert str(error) == "set 'a': circular reference: a -> a"


def test_longer_reference_cycle() -> None:
    error = build_error({"x": "c", "a": "+b & c", "b": "a | +c2", "c2": "(+a)"})
    assert error.message == "circular reference: a -> b -> c2 -> a"
    assert (error.set_name, error.position) == ("a", 0)


def test_cycle_reached_through_an_acyclic_set() -> None:
    error = build_error({"top": "+a", "a": "+b", "b": "c & +a"})
    assert error.message == "circular reference: a -> b -> a"


def test_first_bad_set_in_definition_order_is_reported() -> None:
    error = build_error({"one": "a", "two": "a &", "three": "ghost"})
    assert error.set_name == "two"


def test_syntax_error_comes_before_unknown_name_in_one_set() -> None:
    error = build_error({"s": "ghost & a b"})
    assert error.message.startswith("two names")


def test_no_sets() -> None:
    error = build_error({})
    assert (error.set_name, error.position) == (None, None)
    assert str(error) == "the matrix must define at least one set"
    assert error.key_path == ("sets",)


def nested(depth: int) -> str:
    """``a & (b | (a & (b | ...)))``: ``depth`` levels, alternating operators."""
    text = "a"
    for level in range(depth - 1):
        text = f"a {'&|'[level % 2]} ({text})" if level else f"a & {text}"
    return text


def test_a_set_may_nest_max_depth_levels() -> None:
    policy = letters({"s": nested(MAX_DEPTH)})
    assert policy.plan("a", ["b"]).set_name == "s"
    error = build_error({"s": nested(MAX_DEPTH + 1)})
    assert error.set_name == "s"
    assert error.message.startswith(f"nests more than {MAX_DEPTH} levels deep")


def test_ten_thousand_parentheses_are_refused_without_recursion_error() -> None:
    error = build_error({"s": "(a & " * 10_000 + "b" + ")" * 10_000})
    assert error.message.startswith(f"nests more than {MAX_DEPTH} levels deep")


def test_nesting_counts_through_refs() -> None:
    # A chain of +refs used to compile, then hit RecursionError when a request was
    # planned in the router and in `check --format json` (issue 9). Each link adds two
    # levels ("(... | y) & m"), so 3000 sets nest far too deep.
    sets = {"s0": "+s1 & x"}
    sets.update({f"s{i}": f"(+s{i + 1} | y) & m" for i in range(1, 3000)})
    sets["s3000"] = "m | z"
    error = build_error(sets, models=("m", "x", "y", "z"))
    assert error.message.startswith(f"nests more than {MAX_DEPTH} levels deep")
    assert error.key_path == ("sets", error.set_name)
    # The same chain within the limit plans and lists without trouble.
    short = {"s0": "+s1 & x"}
    short.update({f"s{i}": f"(+s{i + 1} | y) & m" for i in range(1, 45)})
    short["s45"] = "m | z"
    policy = MatrixPolicy.build(short, {}, {}, ("m", "x", "y", "z"))
    assert policy.plan("m", ["x", "z"]) == Plan(evict=(), set_name="s0", cost=0)
    assert ("m", "x", "z") in policy.expand_set("s0")


@pytest.mark.parametrize("name", ["", "a" * 33, "my_var", "g!", "two words", "é"])
def test_bad_var_name(name: str) -> None:
    error = build_error({"s": "a"}, vars={name: "a"})
    assert error.set_name is None
    assert error.message == (
        f"var name '{name}' must be 1 to 32 characters, each a letter, a digit, '.' or '-'"
    )


@pytest.mark.parametrize("name", ["a" * 32, "Q4.k-m", "7"])
def test_good_var_name(name: str) -> None:
    policy = MatrixPolicy.build({"s": f"{name} & b"}, {name: "a"}, {}, ["a", "b"])
    assert policy.expand_set("s") == [("a", "b")]


def test_var_must_point_at_a_model_id() -> None:
    error = build_error({"s": "g"}, vars={"g": "gemma-alias"})
    assert error.message == (
        "var 'g' points to 'gemma-alias', which is not a model id (aliases are not accepted)"
    )
    assert error.key_path == ("vars", "g")


def test_evict_cost_key_must_be_var_or_model() -> None:
    error = build_error({"s": "a"}, costs={"ghost": 3})
    assert error.message == "evict cost key 'ghost' is not a var or a model id"
    assert error.key_path == ("evict_costs", "ghost")


@pytest.mark.parametrize("value", [0, -5, True, 1.5, "3"])
def test_evict_cost_must_be_a_positive_integer(value: object) -> None:
    error = build_error({"s": "a"}, costs={"a": value})  # type: ignore[dict-item]
    assert error.message == f"evict cost of 'a' must be a positive integer, got {value!r}"
    assert error.key_path == ("evict_costs", "a")


def test_evict_cost_given_twice_for_one_model() -> None:
    error = build_error({"s": "g"}, vars={"g": "gemma"}, costs={"g": 3, "gemma": 4})
    assert error.message == "model 'gemma' has two evict costs (as 'g' and as 'gemma')"
    assert error.key_path == ("evict_costs", "gemma")


def test_evict_costs_by_var_and_by_model_id() -> None:
    policy = MatrixPolicy.build({"s": "g | b"}, {"g": "gemma"}, {"g": 7, "b": 2}, ["gemma", "b"])
    assert (policy.evict_cost("gemma"), policy.evict_cost("b"), policy.evict_cost("zz")) == (
        7,
        2,
        1,
    )


def test_detail_adds_the_column_once() -> None:
    assert build_error({"s": "a &"}).detail == "operator '&' has nothing on its right (column 2)"
    assert build_error({"s": "a @"}).detail == "unexpected character '@' at column 2"
    assert build_error({"s": ""}).detail == "empty expression"


def test_policy_from_a_compiled_matrix() -> None:
    matrix = compile_matrix(SEED_SETS, SEED_VARS, SEED_COSTS, SEED_MODELS)
    # Costs are keyed by model id once compiled, whatever name the file used.
    assert matrix.evict_costs == {"voxtral-model": 50, "llama-70B": 30}
    policy = MatrixPolicy(matrix)
    assert policy.set_names == tuple(SEED_SETS)
    assert policy.evict_cost("voxtral-model") == 50
    assert policy.evict_cost("gemma-model") == 1


def test_compiled_matrices_compare_by_content() -> None:
    # A reload compares configs: the same sets compile to equal configs.
    one = compile_matrix(SEED_SETS, SEED_VARS, SEED_COSTS, SEED_MODELS)
    assert one == compile_matrix(dict(SEED_SETS), dict(SEED_VARS), SEED_COSTS, SEED_MODELS)
    changed = {**SEED_SETS, "full": "L | g"}
    assert one != compile_matrix(changed, SEED_VARS, SEED_COSTS, SEED_MODELS)


def test_parse_matrix_is_build() -> None:
    assert repr(parse_matrix({"s": "a"}, {}, {}, ["a"])) == "<MatrixPolicy 1 sets over 1 models>"


# --- solver ------------------------------------------------------------------


def test_matrix_policy_is_a_swap_policy() -> None:
    policy: SwapPolicy = seed_policy()
    assert policy.evictions("qwen-model", ["gemma-model", "voxtral-model"]) == ("gemma-model",)


@pytest.mark.parametrize(
    ("target", "running", "plan"),
    [
        # STT + LLM: switching LLMs keeps the voice model (cost 50) loaded.
        ("qwen-model", ["gemma-model", "voxtral-model"], Plan(
            evict=("gemma-model",), set_name="standard", cost=1)),
        ("mistral-model", ["voxtral-model", "qwen-model"], Plan(
            evict=("qwen-model",), set_name="standard", cost=1)),
        ("voxtral-model", ["mistral-model"], Plan(evict=(), set_name="standard", cost=0)),
        # RAG: the reranker joins the running LLM and voice model.
        ("reranker-model", ["gemma-model", "voxtral-model"], Plan(
            evict=(), set_name="with_rerank", cost=0)),
        # mistral is not in with_rerank: the reranker must go (cost 1, not voxtral's 50)
        ("mistral-model", ["qwen-model", "voxtral-model", "reranker-model"], Plan(
            evict=("qwen-model", "reranker-model"), set_name="standard", cost=2)),
        # creative: image generation beside an LLM, the voice model goes
        ("stable-diffusion", ["gemma-model", "voxtral-model"], Plan(
            evict=("voxtral-model",), set_name="creative", cost=50)),
        # the 70B runs alone
        ("llama-70B", ["gemma-model", "voxtral-model"], Plan(
            evict=("gemma-model", "voxtral-model"), set_name="full", cost=51)),
        ("gemma-model", ["llama-70B"], Plan(evict=("llama-70B",), set_name="standard", cost=30)),
        # already running: nothing to do
        ("gemma-model", ["gemma-model", "voxtral-model"], Plan(evict=(), set_name=None, cost=0)),
        # nothing running
        ("llama-70B", [], Plan(evict=(), set_name="full", cost=0)),
        # a model in no set runs alone
        ("whisper", ["gemma-model", "voxtral-model"], Plan(
            evict=("gemma-model", "voxtral-model"), set_name=None, cost=51)),
        ("whisper", [], Plan(evict=(), set_name=None, cost=0)),
        # a running model in no set is always evicted
        ("gemma-model", ["whisper", "voxtral-model"], Plan(
            evict=("whisper",), set_name="standard", cost=1)),
    ],
)  # fmt: skip
def test_seed_plans(target: str, running: list[str], plan: Plan) -> None:
    assert seed_policy().plan(target, running) == plan


def test_cheapest_set_wins_over_the_first() -> None:
    policy = letters({"first": "a & b", "second": "a & c & d"}, costs={"b": 1, "c": 2})
    assert policy.plan("a", ["b", "c", "d"]) == Plan(evict=("b",), set_name="second", cost=1)


def test_tie_goes_to_the_first_set() -> None:
    policy = letters({"one": "a & b", "two": "a & c"})
    assert policy.plan("a", ["b", "c"]) == Plan(evict=("c",), set_name="one", cost=1)


def test_tie_goes_to_a_set_referenced_before_definition() -> None:
    # "late" is defined last but visited first, because "early" refers to it.
    policy = letters({"early": "(a & c) | +late", "late": "a & b"})
    assert policy.plan("a", ["c", "b"]) == Plan(evict=("c",), set_name="late", cost=1)


def test_tie_inside_a_set_goes_to_the_first_combination() -> None:
    policy = letters({"s": "a & (c | b)"})
    assert policy.plan("a", ["b", "c"]).evict == ("b",)
    policy = letters({"s": "(a & b) | (a & c)"})
    assert policy.plan("a", ["c", "b"]).evict == ("c",)


def test_tie_break_is_left_major() -> None:
    # (b & a) | ... is combination 0; the later choice of the same cost loses.
    policy = letters({"s": "(b | c) & (a | d) & (e | f)"})
    assert policy.plan("a", ["c", "e"]).evict == ()
    assert policy.plan("a", ["c", "b"]) == Plan(evict=("c",), set_name="s", cost=1)


def test_no_secondary_rule_on_fewest_evictions() -> None:
    # Evicting b+c (cost 2) ties with evicting d (cost 2): the first set wins
    # though it evicts more models.
    policy = letters({"one": "a & d", "two": "a & b & c"}, costs={"d": 2})
    assert policy.plan("a", ["b", "c", "d"]) == Plan(evict=("b", "c"), set_name="one", cost=2)


def test_evictions_follow_running_order() -> None:
    policy = letters({"s": "a & h"})
    assert policy.evictions("a", ["g", "b", "h", "c"]) == ("g", "b", "c")


def test_running_is_a_set() -> None:
    policy = letters({"s": "a & b"})
    assert policy.plan("a", ["c", "b", "c"]) == Plan(evict=("c",), set_name="s", cost=1)


def test_costs_add_up() -> None:
    policy = letters({"s": "a"}, costs={"b": 4, "c": 5})
    assert policy.plan("a", ["b", "c", "d"]) == Plan(evict=("b", "c", "d"), set_name="s", cost=10)


def test_expensive_model_is_kept_over_many_cheap_ones() -> None:
    policy = letters({"cheap": "a & b & c & d", "keep": "a & e"}, costs={"e": 10})
    assert policy.plan("a", ["b", "c", "d", "e"]) == Plan(
        evict=("b", "c", "d"), set_name="keep", cost=3
    )


def test_overlapping_alternatives_pick_the_best_union() -> None:
    # Only (b & c) keeps both b and c; they sit in different OR branches.
    policy = letters({"s": "a & ((b & d) | (c & e) | (b & c))"})
    assert policy.plan("a", ["b", "c"]) == Plan(evict=(), set_name="s", cost=0)


@pytest.mark.parametrize(
    ("target", "running", "sentence"),
    [
        (
            "qwen-model",
            ["gemma-model", "voxtral-model"],
            "qwen-model runs in set 'standard' ((g | q | m) & v) beside voxtral-model."
            " It evicts gemma-model (cost 1): total cost 1, the lowest of any set.",
        ),
        (
            "reranker-model",
            ["gemma-model", "voxtral-model"],
            "reranker-model runs in set 'with_rerank' ((g | q) & v & e) beside gemma-model,"
            " voxtral-model. Nothing has to stop.",
        ),
        (
            "llama-70B",
            ["gemma-model", "voxtral-model"],
            "llama-70B runs in set 'full' (L). It evicts gemma-model (cost 1),"
            " voxtral-model (cost 50): total cost 51, the lowest of any set.",
        ),
        ("llama-70B", [], "llama-70B runs in set 'full' (L). Nothing has to stop."),
        (
            "whisper",
            ["llama-70B"],
            "whisper is in no matrix set, so it runs alone. It evicts llama-70B (cost 30):"
            " total cost 30.",
        ),
        ("whisper", [], "whisper is in no matrix set, so it runs alone. Nothing has to stop."),
        ("gemma-model", ["gemma-model"], "gemma-model is already running; nothing has to stop."),
    ],
)
def test_explain(target: str, running: list[str], sentence: str) -> None:
    assert seed_policy().explain(target, running) == sentence


# --- solver against brute force ----------------------------------------------


def brute_force(policy: MatrixPolicy, target: str, running: Sequence[str]) -> Plan:
    """llama-swap's rules applied literally to every expanded combination."""
    if target in running:
        return Plan(evict=(), set_name=None, cost=0)
    best: tuple[int, str, tuple[str, ...]] | None = None
    for name in policy.visiting_order:
        for combo in policy.expand_set(name):
            if target in combo:
                cost = sum(policy.evict_cost(m) for m in running if m not in combo)
                if best is None or cost < best[0]:
                    best = (cost, name, combo)
    if best is None:
        evict = tuple(running)
        return Plan(evict=evict, set_name=None, cost=sum(map(policy.evict_cost, evict)))
    cost, name, combo = best
    return Plan(evict=tuple(m for m in running if m not in combo), set_name=name, cost=cost)


MODELS = ("a", "b", "c", "d", "e", "f")
VARS = {"A": "a", "b.x": "b"}  # a var naming a model, beside the model's own id


@st.composite
def matrices(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, int]]:
    """Random sets over ≤6 models; a set may +ref only sets ranked below it (no cycles)."""
    count = draw(st.integers(1, 4))
    names = [f"s{i}" for i in range(count)]
    rank = draw(st.permutations(names))

    def expression(depth: int, refs: list[str]) -> str:
        if depth == 0 or draw(st.integers(0, 2)) == 0:
            leaves = [*MODELS, *VARS] + [f"+{r}" for r in refs]
            return draw(st.sampled_from(leaves))
        op = draw(st.sampled_from(["&", "|"]))
        parts = [expression(depth - 1, refs) for _ in range(draw(st.integers(2, 3)))]
        return "(" + f" {op} ".join(parts) + ")"

    sets = {name: expression(3, list(rank[: rank.index(name)])) for name in names}
    priced = draw(st.lists(st.sampled_from([*MODELS, "A"]), unique_by=lambda k: VARS.get(k, k)))
    costs = {key: draw(st.integers(1, 4)) for key in priced}
    return sets, costs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    matrix=matrices(),
    target=st.sampled_from([*MODELS, "g"]),
    running=st.lists(st.sampled_from([*MODELS, "g"]), unique=True, max_size=6),
)
def test_solver_matches_brute_force(
    matrix: tuple[dict[str, str], dict[str, int]], target: str, running: list[str]
) -> None:
    sets, costs = matrix
    policy = MatrixPolicy.build(sets, VARS, costs, [*MODELS, "g"])
    try:
        expected = brute_force(policy, target, running)
    except MatrixError:  # too many combinations to brute-force
        assume(False)
    assert policy.plan(target, running) == expected
    assert policy.evictions(target, running) == expected.evict


@settings(max_examples=200, deadline=None)
@given(
    running=st.lists(st.sampled_from(SEED_MODELS), unique=True),
    target=st.sampled_from(SEED_MODELS),
)
def test_seed_solver_matches_brute_force(running: list[str], target: str) -> None:
    policy = seed_policy()
    assert policy.plan(target, running) == brute_force(policy, target, running)


# --- a big matrix ------------------------------------------------------------

BIG_MODELS = tuple(f"m{i:02d}" for i in range(40))


def big_sets() -> dict[str, str]:
    """The matrix of bench/matrix_bench.py: ``grid`` has 3**13 = 1,594,323 combinations,
    ``grid-wide`` twice as many."""
    groups = [BIG_MODELS[i : i + 3] for i in range(0, 39, 3)]
    return {
        "solo": "m39",
        "grid": " & ".join("(" + " | ".join(group) + ")" for group in groups),
        "grid-wide": "+grid & (m39 | first)",
        "pairs": "(m00 | m03 | m06) & last",
        "rag": "+pairs & (m10 | m11) & (m20 | m21 | m22)",
    }


def test_big_matrix_builds_and_solves() -> None:
    start = time.perf_counter()
    vars = {"last": "m39", "first": "m00"}
    policy = MatrixPolicy.build(big_sets(), vars, {"m21": 7, "first": 5}, [*BIG_MODELS, "other"])
    build_ms = (time.perf_counter() - start) * 1000
    with pytest.raises(MatrixError, match="more than 100000 combinations"):
        policy.expand_set("grid")

    cases = [
        # one model per group may stay: m09 comes before m10 in their group
        ("m04", ["m10", "m09", "m07"], Plan(evict=("m10",), set_name="grid", cost=1)),
        # m00 (cost 5) beats m01 in group 0 ...
        ("m39", ["m01", "m00", "m07"], Plan(evict=("m01",), set_name="grid-wide", cost=1)),
        # ... but grid-wide's "| first" adds m00 to any grid combination
        ("m04", ["m01", "m00", "m07"], Plan(evict=(), set_name="grid-wide", cost=0)),
        # grid-wide's "| first" lets m00 join m01's combinations
        ("m02", ["m01", "m00"], Plan(evict=("m01",), set_name="grid-wide", cost=1)),
        ("m01", ["m00", "m07"], Plan(evict=(), set_name="grid-wide", cost=0)),
        # the target's own group empties
        ("m04", ["m03", "m05", "m38"], Plan(evict=("m03", "m05"), set_name="grid", cost=2)),
        # m21 costs 7: it stays, m22 of its group goes
        ("m00", ["m22", "m21"], Plan(evict=("m22",), set_name="grid", cost=1)),
        # m39 joins the whole grid in grid-wide (solo would evict all)
        ("m39", ["m00", "m05", "m21"], Plan(evict=(), set_name="grid-wide", cost=0)),
        ("m39", ["m00", "m01"], Plan(evict=("m01",), set_name="grid-wide", cost=1)),
        # m00 (cost 5) stays beside m01 through "| first"; m39 goes
        ("m01", ["m39", "m00"], Plan(evict=("m39",), set_name="grid-wide", cost=1)),
        # rag's combinations all fit in grid-wide, which comes first
        ("m10", ["m39", "m00", "m20"], Plan(evict=(), set_name="grid-wide", cost=0)),
        # a model in no set runs alone
        ("other", ["m00", "m21"], Plan(evict=("m00", "m21"), set_name=None, cost=12)),
    ]
    timings: list[float] = []
    for target, running, plan in cases:
        start = time.perf_counter()
        got = policy.plan(target, running)
        timings.append((time.perf_counter() - start) * 1000)
        assert got == plan, (target, running)
    print(
        f"\nbig matrix: build {build_ms:.2f} ms, solve median {statistics.median(timings):.4f} ms"
    )
