"""Fit by memory, the pure part: needs, the ledger's learning, and the victim choice.

The victim set is checked against brute force over every subset on small
random cases: it never leaves the running set over capacity when some set
would fit, never evicts when the target fits, and has the lowest rank
(pinned, busy, cost, size) of all sets that make room.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_swap.config.matrix_dsl import compile_matrix
from trio_swap.config.model import GroupConfig, HttpCall, ModelConfig, SleepConfig
from trio_swap.fit.ledger import (
    DEMAND_HALF_LIFE,
    FitLedger,
    Learned,
    fingerprint,
    learned_matrix_cost,
)
from trio_swap.fit.oom import exhausted_resources
from trio_swap.fit.state import encode_learned, read_learned, write_state
from trio_swap.policy import GroupsPolicy
from trio_swap.policy.base import Placement
from trio_swap.policy.fit import EXACT_LIMIT, FitPolicy
from trio_swap.policy.matrix import MatrixPolicy

MiB = 1 << 20


def model(model_id: str, cmd: str = "server", **needs: int) -> ModelConfig:
    return ModelConfig(
        id=model_id, cmd=(cmd, model_id), proxy="http://127.0.0.1:1", needs=dict(needs)
    )


def ledger_of(capacity: dict[str, int], sizes: dict[str, dict[str, int]]) -> FitLedger:
    return FitLedger(capacity, {m: model(m, **need) for m, need in sizes.items()})


# --- the effective need --------------------------------------------------------------


def test_need_is_declared_then_measured_then_estimated_then_everything() -> None:
    models = {
        "declared": model("declared", ram=100 * MiB),
        "measured": model("measured"),
        "estimated": model("estimated"),
        "unknown": model("unknown"),
    }
    ledger = FitLedger({"ram": 1024 * MiB}, models, estimates={"estimated": 200 * MiB})
    ledger.measured("measured", {"ram": 300 * MiB})
    assert ledger.need("declared") == {"ram": 100 * MiB}
    assert ledger.need("measured") == {"ram": 330 * MiB}
    assert ledger.need("estimated") == {"ram": 220 * MiB}
    assert ledger.need("unknown") == {"ram": 1024 * MiB}
    assert ledger.basis("declared") == {"ram": "declared"}
    assert ledger.basis("measured") == {"ram": "measured"}
    assert ledger.basis("estimated") == {"ram": "estimated"}
    assert ledger.basis("unknown") == {"ram": "unknown"}


def test_a_measured_overrun_beats_the_declaration() -> None:
    ledger = FitLedger({"ram": 1024 * MiB}, {"a": model("a", ram=100 * MiB)})
    assert not ledger.measured("a", {"ram": 90 * MiB})  # within: the declaration stands
    assert ledger.need("a") == {"ram": 100 * MiB}
    assert ledger.measured("a", {"ram": 250 * MiB})
    assert ledger.need("a") == {"ram": 275 * MiB}
    assert ledger.basis("a") == {"ram": "measured"}


def test_need_never_exceeds_the_resource() -> None:
    ledger = FitLedger({"ram": 100 * MiB}, {"a": model("a")})
    ledger.measured("a", {"ram": 500 * MiB})
    assert ledger.need("a") == {"ram": 100 * MiB}


def test_peak_is_kept_while_the_command_is_the_same_and_forgotten_when_it_changes() -> None:
    small = model("a", cmd="server-ctx-4k")
    ledger = FitLedger({"ram": 1024 * MiB}, {"a": small})
    ledger.measured("a", {"ram": 300 * MiB})
    ledger.loaded("a", 2.0)
    saved = ledger.learned()
    again = FitLedger({"ram": 1024 * MiB}, {"a": small}, learned=saved)
    assert again.peak("a") == {"ram": 300 * MiB}
    assert again.load_seconds("a") == 2.0
    bigger = model("a", cmd="server-ctx-32k")
    changed = FitLedger({"ram": 1024 * MiB}, {"a": bigger}, learned=saved)
    assert changed.peak("a") == {}
    assert changed.load_seconds("a") is None


def test_fingerprint_ignores_the_assigned_port_only() -> None:
    a = ModelConfig(id="a", cmd=("srv", "--port", "5800", "-c", "5800"), proxy="http://h:5800")
    b = ModelConfig(id="a", cmd=("srv", "--port", "5801", "-c", "5800"), proxy="http://h:5801")
    assert fingerprint(a, 5800) != fingerprint(b, 5801)  # -c 5800 stayed: differs after all
    c = ModelConfig(id="a", cmd=("srv", "--port", "5801", "-c", "5801"), proxy="http://h:5801")
    assert fingerprint(a, 5800) == fingerprint(c, 5801)


def test_load_time_is_a_moving_average() -> None:
    ledger = FitLedger({}, {"a": model("a")})
    ledger.loaded("a", 10.0)
    ledger.loaded("a", 20.0)
    assert ledger.load_seconds("a") == pytest.approx(13.0)
    assert learned_matrix_cost(ledger, "a") == 13


def test_demand_halves_every_half_life_of_requests_to_any_model() -> None:
    ledger = FitLedger({}, {"a": model("a"), "b": model("b")})
    ledger.requested("a", 0.0)
    ledger.requested("a", 0.0)
    assert ledger.demand("a") == pytest.approx(1.0 + 2 ** (-1 / DEMAND_HALF_LIFE))
    for _ in range(int(DEMAND_HALF_LIFE)):
        ledger.requested("b", 3600.0)  # time alone changes nothing: requests do
    assert ledger.demand("a") == pytest.approx((1.0 + 2 ** (-1 / DEMAND_HALF_LIFE)) / 2)
    assert ledger.eviction_cost("a") == pytest.approx(1.0 + ledger.demand("a"))


def test_out_of_memory_raises_the_floor_above_what_was_free() -> None:
    ledger = ledger_of({"ram": 1000}, {"a": {"ram": 300}, "b": {"ram": 400}})
    assert not ledger.out_of_memory("a", [])  # alone: more room cannot be made
    assert ledger.out_of_memory("a", ["b"], ["ram"])
    assert ledger.need("a") == {"ram": 601}  # no longer fits beside b (400)
    policy = FitPolicy(ledger)
    assert policy.evictions("a", ["b"]) == ("b",)


@pytest.mark.parametrize(
    ("lines", "reason", "expected"),
    [
        (["CUDA error: out of memory"], "exit status 1", ("vram0",)),
        (["ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9 MiB failed"], "", ("vram0",)),
        (["terminate called after throwing an instance of 'std::bad_alloc'"], "", ("ram",)),
        (["loading..."], "process exited before becoming ready (killed by SIGKILL)", ("ram",)),
        (["error: unknown argument --foo"], "exit status 1", None),
    ],
)
def test_out_of_memory_messages(
    lines: list[str], reason: str, expected: tuple[str, ...] | None
) -> None:
    assert exhausted_resources(lines, reason, {"ram": 1, "vram0": 1}) == expected


# --- the policy on fixed cases --------------------------------------------------------


def test_models_share_while_they_fit_and_the_cheapest_goes() -> None:
    ledger = ledger_of({"ram": 1000}, {"a": {"ram": 400}, "b": {"ram": 400}, "c": {"ram": 400}})
    policy = FitPolicy(ledger)
    assert policy.evictions("b", ["a"]) == ()
    for _ in range(3):
        ledger.requested("a", 0.0)
    ledger.requested("b", 0.0)
    assert policy.evictions("c", ["a", "b"]) == ("b",)  # a is asked for more often


def test_idle_victims_before_busy_ones_and_pinned_last() -> None:
    ledger = ledger_of({"ram": 10}, {m: {"ram": 5} for m in "abc"})
    ledger.loaded("a", 1.0)
    ledger.loaded("b", 100.0)  # b is far more expensive to reload...
    policy = FitPolicy(ledger)
    assert policy.evictions("c", ["a", "b"]) == ("a",)
    busy = Placement(busy=frozenset({"a"}))
    assert policy.evictions("c", ["a", "b"], busy) == ("b",)  # ...but a is busy
    pinned = Placement(pinned=frozenset({"b"}), busy=frozenset({"a"}))
    assert policy.evictions("c", ["a", "b"], pinned) == ("a",)


def test_a_model_already_stopping_costs_nothing() -> None:
    ledger = ledger_of({"ram": 10}, {m: {"ram": 5} for m in "abc"})
    ledger.loaded("b", 100.0)
    policy = FitPolicy(ledger)
    assert policy.evictions("c", ["a", "b"], Placement(stopping=frozenset({"b"}))) == ("b",)


def test_a_resident_target_evicts_nothing_for_room() -> None:
    ledger = ledger_of({"ram": 10}, {"a": {"ram": 6}, "b": {"ram": 6}, "c": {"ram": 6}})
    policy = FitPolicy(ledger)
    assert policy.evictions("a", ["b"], Placement(resident=True)) == ()
    assert policy.evictions("a", ["b"]) == ("b",)
    # even when the others alone are over (a measured overrun, a smaller reload)
    assert policy.evictions("a", ["b", "c"], Placement(resident=True)) == ()


def test_an_unknown_model_loads_beside_pinned_ones_instead_of_being_refused() -> None:
    ledger = FitLedger(
        {"ram": 1000},
        {"embed": model("embed", ram=100), "llm": model("llm"), "x": model("x", ram=50)},
    )
    policy = FitPolicy(ledger)
    pinned = Placement(pinned=frozenset({"embed"}))
    plan = policy.plan("llm", ["embed", "x"], pinned)
    assert plan.evict == ("x",)  # everything but the pinned model goes
    assert plan.need == {"ram": 900}
    assert policy.plan("llm", ["embed", "x"]).evict == ("embed", "x")  # unpinned: all


def test_fit_composes_with_groups() -> None:
    sizes = {"a": {"ram": 2}, "b": {"ram": 2}, "c": {"ram": 7}}
    ledger = ledger_of({"ram": 10}, sizes)
    groups = GroupsPolicy(
        [GroupConfig(name="g", members=("a", "b"), swap=True, exclusive=False)],
        ["a", "b", "c"],
    )
    policy = FitPolicy(ledger, groups)
    assert policy.evictions("b", ["a"]) == ("a",)  # the group swaps, though both fit
    plan = policy.plan("a", ["b", "c"])
    assert plan.inner == ("b",)
    assert plan.fit == ()  # with b gone, a fits beside c


def test_fit_composes_with_the_matrix_and_feeds_it_learned_costs() -> None:
    ledger = ledger_of({"ram": 10}, {"a": {"ram": 6}, "b": {"ram": 6}, "c": {"ram": 3}})
    matrix = MatrixPolicy(
        compile_matrix({"all": "a & b & c"}, models=["a", "b", "c"]),
        learned_cost=lambda m: learned_matrix_cost(ledger, m),
    )
    policy = FitPolicy(ledger, matrix)
    assert matrix.evictions("a", ["b", "c"]) == ()  # the matrix allows all three...
    assert policy.evictions("a", ["b", "c"]) == ("b",)  # ...memory does not
    ledger.loaded("b", 30.0)
    assert matrix.evict_cost("b") == 30
    assert matrix.evict_cost("c") == 1


# --- the policy against brute force -----------------------------------------------------

NAMES = tuple("abcdefg")


@st.composite
def cases(draw: st.DrawFn) -> tuple[FitLedger, str, list[str], Placement]:
    resources = draw(st.sampled_from([("ram",), ("ram", "vram0")]))
    capacity = {r: draw(st.integers(4, 40)) for r in resources}
    count = draw(st.integers(2, len(NAMES)))
    names = NAMES[:count]
    sizes = {m: {r: draw(st.integers(0, capacity[r])) for r in resources} for m in names}
    ledger = ledger_of(capacity, sizes)
    for name in names:
        if draw(st.booleans()):
            ledger.loaded(name, draw(st.floats(0.1, 50.0)))
        for _ in range(draw(st.integers(0, 3))):
            ledger.requested(name, 0.0)
    target = draw(st.sampled_from(names))
    others = [m for m in names if m != target]
    running = draw(st.lists(st.sampled_from(others), unique=True, max_size=len(others)))
    pick = st.sets(st.sampled_from(others), max_size=2) if others else st.just(set())
    context = Placement(
        busy=frozenset(draw(pick)), pinned=frozenset(draw(pick)), stopping=frozenset(draw(pick))
    )
    return ledger, target, running, context


def used(ledger: FitLedger, models: list[str], resource: str) -> int:
    return sum(ledger.need(m)[resource] for m in models)


@settings(max_examples=400)
@given(cases())
def test_victims_are_the_best_subset_by_brute_force(
    case: tuple[FitLedger, str, list[str], Placement],
) -> None:
    ledger, target, running, context = case
    policy = FitPolicy(ledger)
    evicted = policy.evictions(target, running, context)
    capacity = ledger.resources

    def fits(victims: tuple[str, ...]) -> bool:
        staying = [m for m in running if m not in victims]
        need = ledger.need(target)
        return all(used(ledger, staying, r) + need[r] <= capacity[r] for r in capacity)

    def rank(victims: tuple[str, ...]) -> tuple[int, int, float, int]:
        return (
            sum(1 for m in victims if m in context.pinned),
            sum(1 for m in victims if m in context.busy),
            round(
                sum(0.0 if m in context.stopping else ledger.eviction_cost(m) for m in victims), 9
            ),
            len(victims),
        )

    assert set(evicted) <= set(running)
    assert target not in evicted
    assert list(evicted) == [m for m in running if m in evicted]  # running's order
    if fits(()):
        assert evicted == ()  # never evicts when the target fits
        return
    subsets = [
        tuple(combo)
        for size in range(1, len(running) + 1)
        for combo in itertools.combinations(running, size)
    ]
    good = [s for s in subsets if fits(s)]
    if not good:  # even alone it is over (its need is capped at the resource: cannot happen)
        assert evicted == tuple(running)
        return
    assert fits(evicted)  # never over capacity
    assert rank(evicted) == min(rank(s) for s in good)  # minimal cost


@settings(max_examples=50)
@given(st.integers(EXACT_LIMIT + 1, EXACT_LIMIT + 8), st.integers(1, 6))
def test_many_running_models_use_the_greedy_search_and_still_make_room(
    count: int, target_size: int
) -> None:
    names = [f"m{i}" for i in range(count)]
    sizes = {m: {"ram": 1} for m in names}
    sizes["t"] = {"ram": target_size}
    ledger = ledger_of({"ram": count}, sizes)
    evicted = FitPolicy(ledger).evictions("t", names)
    assert len(evicted) == target_size  # exactly enough: one unit each


def test_saved_state_round_trips_and_merges_with_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "state" / "learned.json"
    ours = {"f1": Learned(fingerprint="f1", model="a", peak={"ram": 5}, updated=10.0)}
    write_state(path, encode_learned(ours))
    assert read_learned(path) == ours
    # Another instance sharing the directory learned another command, and a newer f1.
    theirs = {
        "f2": Learned(fingerprint="f2", model="b", load_seconds=2.0, updated=11.0),
        "f1": Learned(fingerprint="f1", model="a", peak={"ram": 9}, updated=12.0),
    }
    write_state(path, encode_learned(theirs))
    write_state(path, encode_learned(ours))  # our older f1 does not undo theirs
    merged = read_learned(path)
    assert set(merged) == {"f1", "f2"}
    assert merged["f1"].peak == {"ram": 9}
    path.write_text("{not json")
    assert read_learned(path) == {}  # logged and ignored: learning starts again
    assert read_learned(tmp_path / "missing.json") == {}


def test_reverting_a_command_finds_what_was_learned_for_it() -> None:
    first = model("a", cmd="server-ctx-4k")
    ledger = FitLedger({"ram": 1024 * MiB}, {"a": first}, clock=lambda: 1.0)
    ledger.measured("a", {"ram": 300 * MiB})
    ledger.reconfigure({"ram": 1024 * MiB}, {"a": model("a", cmd="server-ctx-32k")})
    assert ledger.peak("a") == {}
    ledger.reconfigure({"ram": 1024 * MiB}, {"a": first})
    assert ledger.peak("a") == {"ram": 300 * MiB}
    again = FitLedger({"ram": 1024 * MiB}, {"a": first}, learned=ledger.learned())
    assert again.peak("a") == {"ram": 300 * MiB}


def test_a_replaced_process_is_not_learned_for_the_new_command() -> None:
    old = model("a", cmd="server-big")
    ledger = FitLedger({"ram": 1024 * MiB}, {"a": old})
    ledger.reconfigure({"ram": 1024 * MiB}, {"a": model("a", cmd="server-small")})
    assert not ledger.measured("a", {"ram": 900 * MiB}, started_with=old)
    assert ledger.peak("a") == {}
    assert ledger.measured("a", {"ram": 10 * MiB}, started_with=model("a", cmd="server-small"))


def test_a_measured_zero_is_knowledge_and_unmeasured_resources_default_to_zero() -> None:
    ledger = FitLedger(
        {"ram": 100 * MiB, "vram0": 24 * 1024 * MiB, "slots": 4},
        {"cpu": model("cpu"), "counted": model("counted", slots=2)},
    )
    assert ledger.basis("cpu") == {"ram": "unknown", "vram0": "unknown", "slots": "undeclared"}
    assert ledger.need("cpu")["slots"] == 0
    ledger.measured("cpu", {"ram": 10 * MiB, "vram0": 0})
    assert ledger.need("cpu")["vram0"] == 0
    assert ledger.basis("cpu")["vram0"] == "measured"
    assert ledger.need("counted")["slots"] == 2


# --- sleeping models (``sleep:``) ----------------------------------------------------------

SLEEPS = SleepConfig(
    sleep=HttpCall(method="POST", path="/sleep"), wake=(HttpCall(method="POST", path="/wake_up"),)
)


def sleeper(model_id: str, **needs: int) -> ModelConfig:
    return msgspec.structs.replace(model(model_id, **needs), sleep=SLEEPS)


def test_a_sleeper_holds_its_measured_asleep_footprint_and_before_it_its_weights_in_ram() -> None:
    ledger = FitLedger(
        {"ram": 1024 * MiB, "vram0": 1024 * MiB},
        {"a": sleeper("a", ram=100 * MiB, vram0=300 * MiB)},
    )
    # Before a measurement asleep: its ram plus its GPU memory (level 1 moves the weights).
    assert ledger.asleep_need("a") == {"ram": 400 * MiB, "vram0": 0}
    assert ledger.measured("a", {"ram": 50 * MiB, "vram0": 10 * MiB}, asleep=True)
    assert ledger.asleep_need("a") == {"ram": 55 * MiB, "vram0": 11 * MiB}
    assert ledger.need("a") == {"ram": 100 * MiB, "vram0": 300 * MiB}  # awake: unchanged
    ledger.set_asleep(["a"])
    use = ledger.use(["a"])  # its process lives, asleep: what it holds asleep is reserved
    assert use["ram"]["reserved"] == 55 * MiB
    assert use["vram0"]["used"] == 10 * MiB
    again = FitLedger(
        {"ram": 1024 * MiB, "vram0": 1024 * MiB},
        {"a": sleeper("a", ram=100 * MiB, vram0=300 * MiB)},
        learned=ledger.learned(),
    )
    assert again.asleep_need("a") == ledger.asleep_need("a")  # kept across a restart


def test_wake_time_is_learned_and_makes_sleeping_cheaper_than_stopping() -> None:
    ledger = FitLedger({}, {"a": sleeper("a"), "b": model("b")})
    ledger.loaded("a", 20.0)
    assert ledger.sleep_cost("a") == pytest.approx(2.0)  # a tenth of a load, unmeasured
    ledger.woke("a", 1.0)
    ledger.woke("a", 2.0)
    assert ledger.wake_seconds("a") == pytest.approx(1.3)
    assert ledger.sleep_cost("a") == pytest.approx(1.3)
    assert ledger.asleep_stop_cost("a") == pytest.approx(20.0 - 1.3)
    assert ledger.eviction_cost("a") == pytest.approx(20.0)
    # The matrix's default cost of a sleep: model is its wake, in whole seconds.
    assert learned_matrix_cost(ledger, "a") == 1
    ledger.loaded("b", 20.0)
    assert learned_matrix_cost(ledger, "b") == 20


def test_a_victim_that_fits_asleep_sleeps_and_one_too_big_asleep_stops() -> None:
    gpu = {"ram": 1000, "vram0": 100}
    ledger = FitLedger(
        gpu, {"a": sleeper("a", ram=100, vram0=60), "b": model("b", ram=100, vram0=60)}
    )
    ledger.measured("a", {"ram": 200}, asleep=True)  # asleep: 220 with the margin
    policy = FitPolicy(ledger)
    plan = policy.plan("b", ["a"])
    assert plan.evict == ("a",)
    assert plan.sleep == ("a",)  # waking is cheaper than a cold start, and it fits asleep
    tight = FitLedger(
        {"ram": 300, "vram0": 100},
        {"a": sleeper("a", ram=100, vram0=60), "b": model("b", ram=100, vram0=60)},
    )
    tight.measured("a", {"ram": 250}, asleep=True)  # 275 asleep + 100 for b > 300
    plan = FitPolicy(tight).plan("b", ["a"])
    assert plan.evict == ("a",)
    assert plan.sleep == ()  # too big to sleep beside b: it stops
    assert plan.fits


def test_a_sleeper_is_stopped_when_its_host_memory_is_needed() -> None:
    ledger = FitLedger(
        {"ram": 500, "vram0": 100},
        {"a": sleeper("a", ram=100, vram0=60), "b": model("b", ram=300, vram0=60)},
    )
    ledger.measured("a", {"ram": 300, "vram0": 0}, asleep=True)  # 330 asleep
    ledger.set_asleep(["a"])
    policy = FitPolicy(ledger)
    plan = policy.plan("b", [])
    assert plan.evict == ()  # nothing runs...
    assert plan.stop_asleep == ("a",)  # ...but a's host memory is needed
    assert "asleep" in policy.explain("b", "a")
    # The target itself asleep: waking it replaces what it holds asleep.
    assert FitPolicy(ledger).plan("a", []).stop_asleep == ()


def test_a_ttl_may_put_a_model_to_sleep_only_where_it_fits_asleep() -> None:
    ledger = FitLedger(
        {"ram": 100, "vram0": 100},
        {"a": sleeper("a", ram=10, vram0=60), "b": model("b", ram=20), "c": sleeper("c", ram=30)},
    )
    # Asleep a holds 70 of ram (its GPU memory assumed moved there until measured).
    assert ledger.fits_asleep("a", ["b"], [])  # 70 + 20
    assert not ledger.fits_asleep("a", ["b"], ["c"])  # 70 + 20 + 30 asleep
    ledger.measured("a", {"ram": 5, "vram0": 0}, asleep=True)  # measured: 6 with the margin
    assert ledger.fits_asleep("a", ["b"], ["c"])
    # A resource its sleep does not grow never stops it (an overcommit is not its doing).
    crowded = FitLedger({"ram": 10}, {"a": sleeper("a", ram=50), "b": model("b", ram=50)})
    crowded.measured("a", {"ram": 1}, asleep=True)
    assert crowded.fits_asleep("a", ["b"], [])


ACTIONS = ("keep", "sleep", "stop")


@st.composite
def sleep_cases(draw: st.DrawFn) -> tuple[FitLedger, str, list[str], list[str], Placement]:
    capacity = {"ram": draw(st.integers(4, 40)), "vram0": draw(st.integers(4, 40))}
    names = NAMES[: draw(st.integers(2, 6))]
    models: dict[str, ModelConfig] = {}
    for name in names:
        need = {r: draw(st.integers(0, capacity[r])) for r in capacity}
        models[name] = sleeper(name, **need) if draw(st.booleans()) else model(name, **need)
    ledger = FitLedger(capacity, models)
    for name in names:
        if draw(st.booleans()):
            ledger.loaded(name, draw(st.floats(0.1, 50.0)))
        if models[name].sleep is not None and draw(st.booleans()):
            ledger.woke(name, draw(st.floats(0.01, 10.0)))
        if models[name].sleep is not None and draw(st.booleans()):
            ledger.measured(name, {"ram": draw(st.integers(0, capacity["ram"]))}, asleep=True)
        for _ in range(draw(st.integers(0, 3))):
            ledger.requested(name, 0.0)
    target = draw(st.sampled_from(names))
    others = [m for m in names if m != target]
    running = draw(st.lists(st.sampled_from(others), unique=True, max_size=len(others)))
    can_sleep = [m for m in others if m not in running and models[m].sleep is not None]
    asleep = draw(st.lists(st.sampled_from(can_sleep), unique=True)) if can_sleep else []
    ledger.set_asleep(asleep)
    pick = st.sets(st.sampled_from(running), max_size=2) if running else st.just(set())
    context = Placement(busy=frozenset(draw(pick)), pinned=frozenset(draw(pick)))
    return ledger, target, running, asleep, context


@settings(max_examples=400)
@given(sleep_cases())
def test_sleep_or_stop_choices_are_the_best_by_brute_force(
    case: tuple[FitLedger, str, list[str], list[str], Placement],
) -> None:
    ledger, target, running, asleep, context = case
    plan = FitPolicy(ledger).plan(target, running, context)
    capacity = ledger.resources

    def held(choice: dict[str, str]) -> dict[str, int]:
        total = dict(ledger.need(target))
        for m, action in choice.items():
            hold = {"keep": ledger.need(m), "sleep": ledger.asleep_need(m), "stop": {}}[action]
            if m in asleep:
                hold = {"keep": ledger.asleep_need(m), "stop": {}}[action]
            for r in capacity:
                total[r] += hold.get(r, 0)
        return total

    def fits(choice: dict[str, str]) -> bool:
        total = held(choice)
        return all(total[r] <= capacity[r] for r in capacity)

    def cost(m: str, action: str) -> float:
        if m in asleep:
            return ledger.asleep_stop_cost(m)
        return ledger.sleep_cost(m) if action == "sleep" else ledger.eviction_cost(m)

    def rank(choice: dict[str, str]) -> tuple[int, int, float, int]:
        gone = [m for m, action in choice.items() if action != "keep"]
        return (
            sum(1 for m in gone if m in context.pinned),
            sum(1 for m in gone if m in context.busy),
            round(sum(cost(m, choice[m]) for m in gone), 9),
            len(gone),
        )

    def ways(m: str) -> tuple[str, ...]:
        if m in asleep:
            return ("keep",) if m in context.pinned else ("keep", "stop")
        return ACTIONS if ledger.can_sleep(m) else ("keep", "stop")

    candidates = [*running, *asleep]
    everything = [
        dict(zip(candidates, combo, strict=True))
        for combo in itertools.product(*(ways(m) for m in candidates))
    ]
    chosen = {m: "keep" for m in candidates}
    for m in plan.evict:
        chosen[m] = "sleep" if m in plan.sleep else "stop"
    for m in plan.stop_asleep:
        chosen[m] = "stop"
    assert set(plan.sleep) <= set(plan.evict)
    assert all(ledger.can_sleep(m) for m in plan.sleep)
    assert set(plan.stop_asleep) <= set(asleep)
    if fits({m: "keep" for m in candidates}):
        assert plan.evict == () and plan.stop_asleep == ()  # never evicts when it fits
        return
    good = [choice for choice in everything if fits(choice)]
    if not good:  # cannot happen: stopping everything always makes room
        pytest.fail("no choice fits")
    assert fits(chosen)
    assert plan.fits
    assert rank(chosen) == min(rank(choice) for choice in good)


@settings(max_examples=50)
@given(st.integers(EXACT_LIMIT, EXACT_LIMIT + 6), st.integers(1, 6), st.integers(0, 2))
def test_many_sleepers_use_the_greedy_search_and_still_make_room(
    count: int, target_size: int, asleep_ram: int
) -> None:
    names = [f"m{i}" for i in range(count)]
    models = {m: sleeper(m, ram=2, vram0=1) for m in names}
    models["t"] = model("t", ram=2, vram0=target_size)
    ledger = FitLedger({"ram": 2 * count + 2, "vram0": count}, models)
    for m in names:
        ledger.measured(m, {"ram": asleep_ram, "vram0": 0}, asleep=True)
    plan = FitPolicy(ledger).plan("t", names)
    assert plan.fits
    assert len(plan.evict) == target_size  # exactly enough GPU memory freed
    if asleep_ram <= 1:
        assert set(plan.sleep) == set(plan.evict)  # asleep they fit in ram: all sleep
    else:  # asleep each holds 3 where it held 2 awake: a stop pays for at most two sleeps
        assert len(plan.sleep) <= 2 * (len(plan.evict) - len(plan.sleep))
