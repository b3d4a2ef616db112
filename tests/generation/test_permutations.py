"""Permutation prompts and --repeat: one /imagine prompt asking for several jobs.

Expected lists are written out by hand from Midjourney's rules (first brace varies slowest,
nesting, `\\,` escapes, empty options), not produced by the code under test.
"""

from __future__ import annotations

import pytest

from generation.contract import MAX_SEED
from generation.permutations import PermutationError, count_permutations, expand_permutations
from generation.prompt import ImagineOptions, PromptError, parse_jobs, parse_prompt
from generation.settings import EngineSettings, ModelSpec

SETTINGS = EngineSettings(
    models=(ModelSpec(name="sd15", source="runwayml/stable-diffusion-v1-5", base_resolution=512),),
    default_model="sd15",
    num_candidates=8,
    num_kept=4,
    max_pixels=1024 * 1024,
)

# --- expansion --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red bird", ["a red bird"]),
        ("a {red, green, blue} bird", ["a red bird", "a green bird", "a blue bird"]),
        (
            "a {red, green} bird --ar {1:1, 16:9}",
            [
                "a red bird --ar 1:1",
                "a red bird --ar 16:9",
                "a green bird --ar 1:1",
                "a green bird --ar 16:9",
            ],
        ),
        (
            "a {big {red, blue}, small} bird",
            ["a big red bird", "a big blue bird", "a small bird"],
        ),
        (
            "{a, b{1, 2}} {x, y}",
            ["a x", "a y", "b1 x", "b1 y", "b2 x", "b2 y"],
        ),
        ("a {, red} bird", ["a bird", "a red bird"]),
        ("a {red,} bird", ["a red bird", "a bird"]),
        ("a {  red ,   dark   green } bird", ["a red bird", "a dark green bird"]),
        ("a {single} bird", ["a single bird"]),
        ("{{best quality}}, a bird", ["best quality, a bird"]),
        (
            r"a bird, {red\, green, blue} feathers",
            ["a bird, red, green feathers", "a bird, blue feathers"],
        ),
        (r"a \{curly\} sign, {red, blue}", ["a {curly} sign, red", "a {curly} sign, blue"]),
        (r"a \(painted\) bird \\ {x}", [r"a \(painted\) bird \\ x"]),
        ("commas, outside, stay", ["commas, outside, stay"]),
        (
            "{cat, dog}::2 {fog, rain}::-0.5",
            [
                "cat::2 fog::-0.5",
                "cat::2 rain::-0.5",
                "dog::2 fog::-0.5",
                "dog::2 rain::-0.5",
            ],
        ),
    ],
)
def test_expansion_order_nesting_escapes_and_whitespace(text: str, expected: list[str]) -> None:
    assert expand_permutations(text) == expected
    assert count_permutations(text) == len(expected)


def test_the_first_brace_varies_slowest_over_three_braces() -> None:
    got = expand_permutations("{1, 2} {a, b, c} {x, y}")
    assert len(got) == 12
    assert got[:3] == ["1 a x", "1 a y", "1 b x"]
    assert got[-1] == "2 c y"


def test_the_maximum_is_a_parameter_and_names_the_count() -> None:
    text = "{a, b, c} {d, e, f} {g, h, i, j, k}"  # 3 x 3 x 5
    assert len(expand_permutations(text, max_prompts=45)) == 45
    with pytest.raises(PermutationError) as caught:
        expand_permutations(text, max_prompts=40)
    assert str(caught.value) == "{}: this prompt makes 45 combinations; at most 40 are allowed"


def test_a_huge_permutation_is_refused_without_being_built() -> None:
    text = "{a, b} " * 60  # 2**60 combinations: building them would never finish
    assert count_permutations(text) == 2**60
    with pytest.raises(PermutationError, match=f"makes {2**60} combinations"):
        expand_permutations(text)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a {red, blue bird", "'{' at character 3 is never closed"),
        ("a {red, {blue} bird", "'{' at character 3 is never closed"),
        ("a red} bird", "'}' at character 6 closes no '{'"),
        ("a {red}} bird", "'}' at character 8 closes no '{'"),
        ("}{", "'}' at character 1 closes no '{'"),
    ],
)
def test_unbalanced_braces_are_refused_with_the_position(text: str, where: str) -> None:
    with pytest.raises(PermutationError) as caught:
        expand_permutations(text)
    assert str(caught.value).startswith("{}: " + where)


# --- parse_jobs: permutations, repeats, seeds, refusals as a whole -----------------------------


def jobs(text: str, **kwargs: object) -> list[tuple[str, int, int, int]]:
    """(prompt, width, height, seed) of every job, with 1000 as the drawn seed."""
    kwargs.setdefault("seed_source", lambda: 1000)
    parsed = parse_jobs(text, SETTINGS, **kwargs)  # type: ignore[arg-type]
    return [(j.request.prompt, j.request.width, j.request.height, j.request.seed) for j in parsed]


def test_each_combination_is_its_own_parsed_job() -> None:
    square = parse_prompt("x --ar 1:1", SETTINGS).request
    wide = parse_prompt("x --ar 16:9", SETTINGS).request
    assert jobs("a {red, green} bird --ar {1:1, 16:9}") == [
        ("a red bird", square.width, square.height, 1000),
        ("a red bird", wide.width, wide.height, 1000),
        ("a green bird", square.width, square.height, 1000),
        ("a green bird", wide.width, wide.height, 1000),
    ]


def test_a_plain_prompt_is_one_job_equal_to_parse_prompt() -> None:
    (job,) = parse_jobs("a red bird --ar 3:2 --v 6", SETTINGS, seed_source=lambda: 5)
    assert job == parse_prompt("a red bird --ar 3:2 --v 6", SETTINGS, seed_source=lambda: 5)


def test_combinations_share_the_seed_drawn_once() -> None:
    drawn = iter([11, 22, 33])
    got = jobs("a {red, green, blue} bird", seed_source=lambda: next(drawn))
    assert [seed for *_, seed in got] == [11, 11, 11]
    assert [seed for *_, seed in jobs("a {red, green} bird --seed 77")] == [77, 77]
    # A seed per combination, when the braces say so.
    assert [seed for *_, seed in jobs("a bird --seed {5, 6}")] == [5, 6]


def test_repeat_makes_jobs_with_seeds_a_grid_apart() -> None:
    # 8 candidates per job: repeat k uses seed + 8k, so no two jobs share a candidate seed.
    assert [seed for *_, seed in jobs("a bird --repeat 3 --seed 100")] == [100, 108, 116]
    assert [seed for *_, seed in jobs("a bird --r 2")] == [1000, 1008]
    parsed = parse_jobs("a bird --r 3 --seed 100", SETTINGS)
    assert all(job.repeat == 3 for job in parsed)
    assert parsed[0].notes[-1] == "--r 3 → 3 jobs, seeds 100, 108, 116"


def test_repeat_seeds_wrap_below_the_largest_seed() -> None:
    top = MAX_SEED - 7  # the highest seed whose 8 candidates are all valid seeds
    seeds = [seed for *_, seed in jobs(f"a bird --r 3 --seed {top}")]
    # Counted on modulo the MAX_SEED - 6 seeds that leave room for 8 candidates: top + 8
    # is 7 past the wrap.
    assert seeds == [top, 7, 15]
    for seed in seeds:
        assert 0 <= seed and seed + 7 <= MAX_SEED


def test_permutations_times_repeats_in_order() -> None:
    got = jobs("a {red, green} bird --r 2 --seed 10")
    assert [(prompt, seed) for prompt, _, _, seed in got] == [
        ("a red bird", 10),
        ("a red bird", 18),
        ("a green bird", 10),
        ("a green bird", 18),
    ]


def test_repeat_inside_braces_counts_per_combination() -> None:
    got = jobs("a bird --r {1, 3} --seed 10")
    assert [seed for *_, seed in got] == [10, 10, 18, 26]


def test_too_many_jobs_is_refused_whole_with_the_count() -> None:
    with pytest.raises(PromptError) as caught:
        parse_jobs("a {red, green, blue} bird --r 20", SETTINGS)
    assert caught.value.flag == "--r"
    assert str(caught.value) == (
        "--r: this prompt makes 60 jobs (3 combinations × --r 20); at most 40 are allowed"
    )
    with pytest.raises(PromptError) as caught:
        parse_jobs("a bird --r {30, 20}", SETTINGS)
    assert str(caught.value) == (
        "--r: this prompt makes 50 jobs (2 combinations, each with its --r); at most 40 are allowed"
    )
    with pytest.raises(PromptError) as caught:
        parse_jobs("a bird --repeat 5", SETTINGS, max_jobs=4)
    assert str(caught.value) == "--repeat: this prompt makes 5 jobs; at most 4 are allowed"
    assert len(parse_jobs("a bird --repeat 4", SETTINGS, max_jobs=4)) == 4


def test_too_many_combinations_is_refused_before_parsing() -> None:
    with pytest.raises(PromptError) as caught:
        parse_jobs("{a, b, c} {d, e} bird --sed 5", SETTINGS, max_jobs=5)
    assert caught.value.flag == "{}"
    assert "6 combinations; at most 5" in str(caught.value)


def test_one_bad_combination_refuses_the_whole_prompt_and_names_it() -> None:
    with pytest.raises(PromptError) as caught:
        parse_jobs("a bird --ar {1:1, 16:9, wide}", SETTINGS)
    assert caught.value.flag == "--ar"
    message = str(caught.value)
    assert message.startswith("combination 3 of 3 ('a bird --ar wide'): --ar: expected W:H")


def test_unbalanced_braces_through_parse_jobs() -> None:
    with pytest.raises(PromptError) as caught:
        parse_jobs("a {red, blue bird --ar 3:2", SETTINGS)
    assert caught.value.flag == "{}"
    assert "never closed" in str(caught.value)


def test_options_apply_to_every_job_and_conflicts_name_the_combination() -> None:
    got = parse_jobs(
        "a {red, green} bird", SETTINGS, options=ImagineOptions(seed=3, negative="fog")
    )
    assert [(j.request.seed, j.request.negative_prompt) for j in got] == [(3, "fog"), (3, "fog")]
    with pytest.raises(PromptError, match=r"^combination 2 of 2 .*--seed 4 conflicts"):
        parse_jobs("a bird --seed {3, 4}", SETTINGS, options=ImagineOptions(seed=3))


def test_parse_prompt_leaves_braces_and_repeat_to_parse_jobs() -> None:
    parsed = parse_prompt("a {red, green} bird --r 3", SETTINGS)
    assert parsed.request.prompt == "a {red, green} bird"
    assert parsed.repeat == 3
