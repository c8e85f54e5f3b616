"""The frontier's pure logic on made-up variants: Pareto marking, the constrained choice and its explanations, and
the budget manager's pick from a stored frontier. No model is loaded."""
import json

import pytest

from edgeinfer.errors import BudgetError, InvalidArgument
from edgeinfer.frontier.choose import Constraints, choose, parse_size, variant_for_machine
from edgeinfer.frontier.pareto import dominates, mark_pareto, pareto_flags, staircase


def row(label, kl, tok_s, rss_mb, energy=None, threads=2, path="/m.gguf"):
    return {"label": label, "kl": kl, "decode_tok_s": tok_s, "peak_rss_bytes": int(rss_mb * 1e6),
            "energy_j_per_token": energy, "n_threads": threads, "kv_type": "f16", "path": path}


# F16: best quality, slow, big. Q8: a bit worse, faster, smaller. Q4: worst quality, fastest, smallest.
# Q5_bad: worse than Q8 on all three (dominated). Q4_t1: Q4 at one thread (slower, same KL and memory: dominated).
POINTS = [row("F16", 0.0, 10, 1100), row("Q8_0", 0.01, 20, 700), row("Q4_0", 0.10, 35, 450),
          row("Q5_bad", 0.02, 18, 800), row("Q4_t1", 0.10, 20, 450)]


def test_pareto_marks_exactly_the_undominated_points():
    assert pareto_flags(POINTS) == [True, True, True, False, False]
    assert dominates(POINTS[1], POINTS[3]) and not dominates(POINTS[3], POINTS[1])
    assert not dominates(POINTS[0], POINTS[1]) and not dominates(POINTS[1], POINTS[0])  # a trade-off


def test_pareto_equal_points_both_stay_and_incomplete_rows_are_off_and_harmless():
    twins = [row("a", 0.1, 10, 500), row("b", 0.1, 10, 500)]
    assert pareto_flags(twins) == [True, True]
    # a row with no KL (interrupted) is not on the frontier and does not push the others off it
    missing = row("gone", None, 1000, 1)
    rows = mark_pareto([*POINTS, missing])
    assert [r["pareto"] for r in rows] == [True, True, True, False, False, False]


def test_staircase_is_the_two_objective_front_sorted_by_speed():
    front = staircase(POINTS + [row("big_fast", 0.5, 40, 5000)])
    assert [r["label"] for r in front] == ["F16", "Q8_0", "Q4_0", "big_fast"]


@pytest.mark.parametrize("text, expected", [("600MB", 600_000_000), ("1.5GB", 1_500_000_000),
                                            ("512MiB", 512 * 2**20), ("123456", 123456), ("2 gib", 2 * 2**30)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["6XB", "", "MB", "-5MB", "0", "1.2.3GB"])
def test_parse_size_refuses_naming_the_option(text):
    with pytest.raises(InvalidArgument, match="--max-memory"):
        parse_size(text)


def test_choice_takes_the_best_quality_that_meets_every_constraint_and_says_why_others_lost():
    choice = choose(POINTS, Constraints(max_memory=parse_size("800MB"), min_tok_s=15, max_kl=0.05))
    assert choice.best["label"] == "Q8_0"
    why = {r["label"]: reason for r, reason in choice.lost}
    assert "peak RSS 1100 MB > --max-memory 800 MB" in why["F16"]
    assert "KL 0.1 > --max-kl 0.05" in why["Q4_0"]
    assert "better than" not in why["Q5_bad"] and "KL 0.02 is worse than Q8_0's 0.01" in why["Q5_bad"]
    assert choice.commands == ['edgeinfer run /m.gguf "PROMPT" --kv-type f16 --threads 2',
                               "edgeinfer serve /m.gguf --kv-type f16 --threads 2"]
    assert choice.binding == []


def test_choice_prefer_speed_and_any_subset_of_constraints():
    assert choose(POINTS, Constraints(max_kl=0.05), prefer="speed").best["label"] == "Q8_0"
    assert choose(POINTS, Constraints(), prefer="speed").best["label"] == "Q4_0"
    assert choose(POINTS, Constraints()).best["label"] == "F16"
    assert choose(POINTS, Constraints(max_memory=500e6)).best["label"] == "Q4_0"  # Q4_0 beats Q4_t1 on speed


def test_no_variant_meets_them_names_the_binding_constraint_and_its_relaxation():
    choice = choose(POINTS, Constraints(max_memory=parse_size("600MB"), max_kl=0.05))
    assert choice.best is None and choice.commands == []
    # Q4_0 and Q4_t1 fail only --max-kl; F16, Q8_0 and Q5_bad fail only --max-memory
    assert choice.binding == ["--max-memory 600 MB binds: --max-memory 700 MB would admit Q8_0",
                              "--max-kl 0.05 binds: --max-kl 0.1 would admit Q4_0"]
    choice = choose(POINTS, Constraints(min_tok_s=100))
    assert choice.binding == ["--min-tok-s 100.0 tok/s binds: --min-tok-s 35.0 tok/s would admit Q4_0"]


def test_when_every_variant_fails_two_constraints_each_is_counted():
    choice = choose(POINTS, Constraints(max_memory=100e6, min_tok_s=100))
    assert choice.binding == ["--max-memory 100 MB excludes 5 of 5 variants",
                              "--min-tok-s 100.0 tok/s excludes 5 of 5 variants",
                              "no single constraint binds alone: every variant fails two or more"]


def test_a_missing_figure_fails_its_constraint():
    choice = choose([row("x", None, 50, 100)], Constraints(max_kl=1))
    assert choice.best is None and "KL not measured" in choice.lost[0][1]


def test_bad_preference_is_refused():
    with pytest.raises(InvalidArgument, match="prefer"):
        choose(POINTS, Constraints(), prefer="fastest")


def test_variant_for_machine_fits_memory_and_follows_the_power_state(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    rows = [row("F16", 0.0, 10, 1100, energy=2.0, path=str(model)),
            row("Q8_0", 0.01, 20, 700, energy=1.0, path=str(model)),
            row("Q4_0", 0.10, 35, 450, energy=0.5, path=str(model)),
            row("Q4_0/t1", 0.10, 20, 450, energy=0.4, threads=1, path=str(model)),
            row("gone", 0.0, 99, 1, energy=0.1, path=str(tmp_path / "deleted.gguf"))]
    stored = tmp_path / "frontier.json"
    stored.write_text(json.dumps({"variants": rows}))
    assert variant_for_machine(stored, 2e9, "performance")[0]["label"] == "F16"
    best, why = variant_for_machine(stored, 800e6, "performance")
    assert best["label"] == "Q8_0" and "800 MB usable" in why and "performance" in why
    assert variant_for_machine(stored, 800e6, "saver")[0]["label"] == "Q4_0/t1"
    assert variant_for_machine(stored, 2e9, "balanced", max_threads=1)[0]["label"] == "Q4_0/t1"
    with pytest.raises(BudgetError, match="smallest, Q4_0, peaks at 450 MB"):
        variant_for_machine(stored, 300e6, "performance")
    with pytest.raises(InvalidArgument, match="power_state"):
        variant_for_machine(stored, 1e9, "turbo")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidArgument, match="cannot read it as JSON"):
        variant_for_machine(tmp_path / "bad.json", 1e9, "saver")
