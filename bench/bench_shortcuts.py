"""How long the worst /prefer shortcuts a member can build take to expand (figures only).

    python bench/bench_shortcuts.py [--repeats 200]

The chain: 25 shortcuts, each standing for 200 characters that name the next one as often as
they fit (the last stands for 200 plain characters). Expanded value by value, as the bot once
did, `--a` alone grew into billions of characters. Each prompt below is expanded `--repeats`
times on the event loop's thread, as /imagine does; the lines give the median, p99 and the
slowest run and what came out (its length, or the refusal).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.core.preferences import MAX_OPTION_VALUE_CHARS, MAX_OPTIONS, Preferences
from generation.flags import FLAGS_BY_NAME, PromptError
from generation.prompt import MAX_INPUT_CHARS


def worst_chain() -> Preferences:
    letters = string.ascii_lowercase
    pairs = ("".join(p) for p in itertools.product(letters, repeat=2))
    names = [n for n in itertools.chain(letters, pairs) if n not in FLAGS_BY_NAME][:MAX_OPTIONS]
    options = {}
    for name, following in zip(names, [*names[1:], None], strict=True):
        if following is None:
            options[name] = "x" * MAX_OPTION_VALUE_CHARS
        else:
            use = f"--{following} "
            options[name] = (use * (MAX_OPTION_VALUE_CHARS // len(use))).strip()
    return Preferences(user_id=1, options=options, suffix="s" * 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    prefs = worst_chain()
    first = next(iter(prefs.options))
    use = f"--{first}"
    prompts = {
        "the chain's head alone": use,
        "as many uses as fit under the cap": " ".join([use] * 30),
        f"the longest prompt ({MAX_INPUT_CHARS} chars), all uses": " ".join(
            [use] * ((MAX_INPUT_CHARS + 1) // (len(use) + 1))
        ),
    }
    print(f"{len(prefs.options)} shortcuts of {MAX_OPTION_VALUE_CHARS} chars; {args.repeats} runs")
    # expand_shortcuts is the expansion; expand adds the member's suffix, which reads the
    # prompt's flags (and refuses the unknown ones a chain leaves behind).
    for method in ("expand_shortcuts", "expand"):
        print(f"Preferences.{method}:")
        for label, text in prompts.items():
            times_ms = []
            outcome = ""
            for _ in range(args.repeats):
                started = time.perf_counter()
                try:
                    outcome = f"{len(getattr(prefs, method)(text))} chars"
                except PromptError as exc:
                    outcome = f"refused: {exc}"
                times_ms.append((time.perf_counter() - started) * 1000)
            p99 = statistics.quantiles(times_ms, n=100)[98]
            print(
                f"  {label:>46}: median {statistics.median(times_ms):.3f} ms, "
                f"p99 {p99:.3f} ms, max {max(times_ms):.3f} ms -> {outcome[:50]}"
            )


if __name__ == "__main__":
    main()
