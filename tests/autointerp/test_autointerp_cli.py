"""`spd-ray autointerp` flags are bounded when parsed: a bad value exits 2 naming the flag before
anything is read or any request is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from spd_ray.cli import main


@pytest.mark.parametrize(
    ("flag", "value", "bad"),
    [
        ("--actors", "0", "0 is not >= 1"),
        ("--concurrency", "-2", "-2 is not >= 1"),
        ("--rpm", "0", "0 is not a finite number >= 1.0"),
        ("--budget-usd", "-0.5", "-0.5 is not a finite number >= 0.0"),
        ("--budget-usd", "inf", "inf is not a finite number >= 0.0"),
        ("--price-in", "-1", "-1 is not a finite number >= 0.0"),
        ("--price-out", "nan", "nan is not a finite number >= 0.0"),
        ("--timeout", "0", "0 is not a finite number > 0.0"),
        ("--max-retries", "-1", "-1 is not between 0 and 100"),
        ("--limit", "0", "0 is not >= 1"),
        ("--min-density", "2", "2 is not a finite number >= 0.0 and <= 1.0"),
        ("--dry-run", "0", "0 is not >= 1"),
    ],
)
def test_autointerp_flags_are_bounded_when_parsed(
    flag: str, value: str, bad: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["autointerp", str(tmp_path), "--base-url", "http://127.0.0.1:1/v1", "--model", "m"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {bad}" in err, err
