"""Password hashing and the failed-login limiter; the slice strip's markup."""

from __future__ import annotations

import pytest

from triaged.db.views import SliceView
from triaged.web.passwords import LoginLimiter, hash_password, verify_password
from triaged.web.strip import slice_strip


def test_argon2_hash_verifies_only_the_right_password() -> None:
    hashed = hash_password("correct horse battery")
    assert hashed.startswith("$argon2id$") and "correct" not in hashed
    assert verify_password(hashed, "correct horse battery")
    assert not verify_password(hashed, "correct horse battery!")
    assert not verify_password("not-a-hash", "anything")
    with pytest.raises(ValueError, match="too short"):
        hash_password("short")


def test_limiter_blocks_after_the_attempts_and_forgets_after_the_window() -> None:
    now = [1000.0]
    limiter = LoginLimiter(attempts=3, window_seconds=60, clock=lambda: now[0])
    for expected in (1, 2, 3):
        assert limiter.retry_after("client:a") == 0
        assert limiter.failed("client:a") == expected
    assert limiter.retry_after("client:a") == pytest.approx(60)
    assert limiter.retry_after("client:b") == 0  # per key
    now[0] += 30
    assert limiter.retry_after("client:a") == pytest.approx(30)
    now[0] += 30.5
    assert limiter.retry_after("client:a") == 0  # the oldest failure left the window
    limiter.failed("client:a")
    limiter.succeeded("client:a")
    assert limiter.retry_after("client:a") == 0


def _slice(index: int, p: float, *, key: bool = False, in_brain: bool = True) -> SliceView:
    return SliceView(
        slice_index=index,
        sop_instance_uid=f"1.2.{index}",
        frame_number=None,
        probabilities=[p, 0.0, 1 - p, 0.0],
        tumour_probability=p,
        in_brain=in_brain,
        is_key=key,
        cam_path=None,
    )


def test_strip_has_a_bar_per_slice_key_markers_and_the_threshold() -> None:
    svg = str(slice_strip([_slice(0, 0.1, in_brain=False), _slice(1, 0.99, key=True), _slice(2, 0.5)], 0.9))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="bar ') == 3
    assert svg.count("bar-key") == 1 and svg.count("bar-out") == 1 and svg.count("key-marker") == 1
    assert 'class="threshold"' in svg
    assert "slice 2: p(tumour) 0.990 — key slice" in svg
    assert 'class="threshold"' not in str(slice_strip([_slice(0, 0.2)], None))
