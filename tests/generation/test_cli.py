"""`python -m generation` end to end on the tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from generation.__main__ import main
from generation.images import parse_a1111_parameters, read_parameters
from tests.generation.helpers import max_diff


def _render(tmp_path: Path, tiny_cache: Path, prompt: str, *extra: str) -> int:
    return main(
        [
            "render",
            prompt,
            "--model",
            "tiny",
            "--out",
            str(tmp_path),
            "--cache-dir",
            str(tiny_cache),
            "--local-files-only",
            *extra,
        ]
    )


def test_render_writes_grid_candidates_and_json(
    tmp_path: Path, tiny_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "job"
    code = _render(
        out,
        tiny_cache,
        "a lighthouse at dusk --ar 3:2 --seed 7 --steps 4 --v 6",
        "--candidates",
        "6",
    )
    assert code == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["request"]["seed"] == 7
    assert (summary["request"]["width"], summary["request"]["height"]) == (192, 128)
    assert any("--v" in note for note in summary["notes"])
    assert [entry["file"] for entry in summary["images"]] == [
        f"candidate_{i}.png" for i in (1, 2, 3, 4)
    ]
    scores = [entry["clip_score"] for entry in summary["images"]]
    assert scores == sorted(scores, reverse=True)
    assert {"load_s", "generate_s", "rank_s", "total_s"} <= set(summary["timings_s"])

    with Image.open(out / "grid.png") as grid:
        assert grid.size == (384, 256)
    for entry in summary["images"]:
        assert entry["seed"] == 7 + entry["candidate_index"]
        params = parse_a1111_parameters(read_parameters(out / entry["file"]) or "")
        assert params["Prompt"] == "a lighthouse at dusk"
        assert params["Seed"] == str(entry["seed"])
        assert params["Size"] == "192x128"
        assert params["Steps"] == "4"

    stderr = capsys.readouterr().err
    assert "step 4/4" in stderr
    assert "note: --v 6 ignored" in stderr


def test_a_kept_candidate_is_reproduced_from_its_seed_alone(
    tmp_path: Path, tiny_cache: Path
) -> None:
    assert _render(tmp_path / "batch", tiny_cache, "a red boat --seed 20 --steps 3", "-q") == 0
    best = json.loads((tmp_path / "batch" / "result.json").read_text())["images"][0]
    seed = best["seed"]
    assert (
        _render(
            tmp_path / "alone",
            tiny_cache,
            f"a red boat --seed {seed} --steps 3",
            "-q",
            "--candidates",
            "1",
            "--kept",
            "1",
        )
        == 0
    )
    with (
        Image.open(tmp_path / "batch" / best["file"]) as a,
        Image.open(tmp_path / "alone" / "candidate_1.png") as b,
    ):
        assert max_diff(a, b) <= 2
    assert not (tmp_path / "alone" / "grid.png").exists()


def test_vary_and_upscale_start_from_a_rendered_png(tmp_path: Path, tiny_cache: Path) -> None:
    assert _render(tmp_path / "job", tiny_cache, "a castle --ar 2:3 --steps 4 --seed 1", "-q") == 0
    source = tmp_path / "job" / "candidate_1.png"
    common = ["--cache-dir", str(tiny_cache), "--local-files-only", "-q"]
    vary = ["vary", str(source), "--strong", "--seed", "5", "--out", str(tmp_path / "v"), *common]
    assert main([*vary, "--candidates", "3", "--kept", "2"]) == 0
    summary = json.loads((tmp_path / "v" / "result.json").read_text())
    assert summary["request"]["kind"] == "variation"
    assert summary["request"]["strength"] == 0.7
    assert {e["seed"] for e in summary["images"]} <= {5, 6, 7}
    with Image.open(tmp_path / "v" / "candidate_1.png") as image:
        assert image.size == (128, 192)
        assert "Denoising strength: 0.7" in image.info["parameters"]

    assert main(["upscale", str(source), "--seed", "2", "--out", str(tmp_path / "u"), *common]) == 0
    with Image.open(tmp_path / "u" / "candidate_1.png") as image:
        assert image.size == (256, 384)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # An unknown flag may be a newer Midjourney one and is ignored; a glued value is not.
        (["render", "a cat --ar16:9"], "'--ar 16:9'"),
        (["render", "a cat --seed -4"], "--seed"),
        (["render", "a cat", "--model", "sd15"], "--model-source"),
        (["render", "a cat", "--candidates", "2", "--kept", "3"], "--kept"),
        (["render", "a cat --steps 500"], "--steps"),
        (["vary", "missing.png"], "image"),
        # Links are fetched by the bot only (its fetch policy), never by the command line.
        (["render", "https://cdn.discordapp.com/a.png a cat"], "taken by the bot only"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str],
    needle: str,
    tiny_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main([*argv, "--cache-dir", str(tiny_cache), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert needle in err
    assert "\n" not in err
    assert not (tmp_path / "result.json").exists()


def test_png_without_metadata_is_refused(tmp_path: Path, tiny_cache: Path, capsys) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (64, 64)).save(plain)
    assert main(["upscale", str(plain), "--cache-dir", str(tiny_cache)]) == 2
    assert "no generation parameters" in capsys.readouterr().err
