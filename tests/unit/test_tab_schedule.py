"""TAB schedules: curve values, windows, keyframes, progress from the host's real sigma schedules."""

import math

import numpy as np
import pytest
import torch
from customvideox.cvx_core.plots import tab_curves_image
from customvideox.cvx_core.tab_schedule import (
    TABSchedule,
    parse_keyframes,
    progress_from_sigmas,
    reference_bias,
    strength_to_bias,
)

# --- strength -------------------------------------------------------------------------------------


def test_strength_to_bias():
    assert strength_to_bias(0) == -math.inf
    assert strength_to_bias(1) == 0.0
    assert strength_to_bias(2.0) == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match=r"-0\.5.*expected a number >= 0"):
        strength_to_bias(-0.5)


def test_reference_bias_adds_log_strength_and_zero_strength_is_off():
    s = TABSchedule(curve="fixed", b_max=0.5)
    assert reference_bias(s, 0.3, strength=2.0) == pytest.approx(math.log(2.0) + 0.5)
    assert reference_bias(s, 0.3, strength=0.0) == -math.inf


# --- curves ---------------------------------------------------------------------------------------


def test_parabolic_ends_peak_symmetry_and_monotone_halves():
    s = TABSchedule(b_min=-0.5, b_max=1.5)
    assert s.curve == "parabolic"
    assert s.bias_at(0.0) == pytest.approx(-0.5)
    assert s.bias_at(0.5) == pytest.approx(1.5)
    assert s.bias_at(1.0) == pytest.approx(-0.5)
    xs = [i / 200 for i in range(201)]
    for x in xs:
        assert s.bias_at(x) == pytest.approx(s.bias_at(1 - x), abs=1e-12)
    first = [s.bias_at(x) for x in xs[:101]]
    second = [s.bias_at(x) for x in xs[100:]]
    assert all(a < b for a, b in zip(first, first[1:]))
    assert all(a > b for a, b in zip(second, second[1:]))


def test_fixed_and_linear_ramps():
    fixed = TABSchedule(curve="fixed", b_min=-3.0, b_max=0.7)
    assert {fixed.bias_at(x) for x in (0, 0.3, 1)} == {0.7}
    up = TABSchedule(curve="linear_up", b_min=0.0, b_max=2.0)
    down = TABSchedule(curve="linear_down", b_min=0.0, b_max=2.0)
    for x in (0.0, 0.25, 0.5, 1.0):
        assert up.bias_at(x) == pytest.approx(2.0 * x)
        assert down.bias_at(x) == pytest.approx(2.0 * (1 - x))


def test_window_renormalises_the_curve_and_outside_modes():
    base = TABSchedule(b_min=0.0, b_max=1.0, start_percent=0.2, end_percent=0.6, outside="base")
    off = TABSchedule(b_min=0.0, b_max=1.0, start_percent=0.2, end_percent=0.6, outside="off")
    for s in (base, off):
        assert s.bias_at(0.2) == pytest.approx(0.0)
        assert s.bias_at(0.4) == pytest.approx(1.0)  # the peak sits in the window's middle
        assert s.bias_at(0.6) == pytest.approx(0.0, abs=1e-12)
    for x in (0.0, 0.1, 0.61, 1.0):
        assert base.bias_at(x) == 0.0
        assert off.bias_at(x) == -math.inf
    assert reference_bias(base, 0.9, strength=3.0) == pytest.approx(math.log(3.0))
    assert reference_bias(off, 0.9, strength=3.0) == -math.inf


def test_keyframes_interpolate_and_hold_beyond_the_ends():
    s = TABSchedule(curve="keyframes", keyframes="0:0, 0.5:1.2, 1:0")
    assert s.bias_at(0.25) == pytest.approx(0.6)
    assert s.bias_at(0.5) == pytest.approx(1.2)
    assert s.bias_at(0.75) == pytest.approx(0.6)
    held = TABSchedule(curve="keyframes", keyframes=((0.2, 1.0), (0.8, 2.0)))
    assert held.bias_at(0.0) == 1.0 and held.bias_at(0.5) == pytest.approx(1.5) and held.bias_at(1.0) == 2.0
    gated = TABSchedule(curve="keyframes", keyframes="0:off; 0.5:1\n1:1")
    assert gated.bias_at(0.0) == -math.inf
    assert gated.bias_at(0.25) == -math.inf  # a segment touching "off" stays off, never NaN
    assert gated.bias_at(0.5) == 1.0 and gated.bias_at(0.9) == 1.0


def test_parse_keyframes_separators_whitespace_and_order():
    assert parse_keyframes(" 1 : 0 ;\n 0:0.5 ,0.5:-inf,") == ((0.0, 0.5), (0.5, -math.inf), (1.0, 0.0))
    assert parse_keyframes("0.3:off") == ((0.3, -math.inf),)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0:0, 0.5-1, 1:0", ['keyframe 2 "0.5-1"', '"progress:bias"', "expected e.g."]),
        ("0:0, x:1", ['keyframe 2 "x:1"', 'progress "x"', "not a number", "expected"]),
        ("0:0, 1.5:1", ['keyframe 2 "1.5:1"', "outside 0..1", "expected"]),
        ("0:abc", ['keyframe 1 "0:abc"', 'bias "abc"', "not a finite number", "expected"]),
        ("0:inf", ['keyframe 1 "0:inf"', 'bias "inf"', "not a finite number"]),
        ("0:nan", ['keyframe 1 "0:nan"', 'bias "nan"']),
        ("0:1, 0.5:1, 0.5:2", ["progress 0.5 twice", "expected each progress value once"]),
        (" , ;\n", ["contain no point", "expected e.g."]),
    ],
)
def test_parse_keyframes_errors_say_what_where_and_what_is_expected(text, words):
    with pytest.raises(ValueError) as info:
        parse_keyframes(text)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"curve": "cosine"}, ['"cosine"', "parabolic", "keyframes"]),
        (
            {"start_percent": 0.6, "end_percent": 0.6},
            ["start_percent=0.6", "0 <= start_percent < end_percent <= 1"],
        ),
        ({"end_percent": 1.2}, ["end_percent=1.2", "expected"]),
        ({"b_max": math.nan}, ["b_max", "finite"]),
        ({"b_min": -math.inf}, ["b_min", "finite"]),
        ({"outside": "zero"}, ['"zero"', '"base"', '"off"']),
        ({"curve": "keyframes"}, ["needs keyframes", "expected e.g."]),
        ({"curve": "keyframes", "keyframes": ((0.5,),)}, ["keyframe 1", "(progress, bias) pair"]),
    ],
)
def test_schedule_validation_errors(kwargs, words):
    with pytest.raises(ValueError) as info:
        TABSchedule(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_curve_points_and_plot():
    s = TABSchedule(b_min=0.0, b_max=1.0, start_percent=0.25, end_percent=0.75, outside="off")
    xs, ys = s.curve_points(5)
    assert xs == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert ys[0] == -math.inf and ys[2] == pytest.approx(1.0) and ys[4] == -math.inf
    img = tab_curves_image([("window", s), ("fixed", TABSchedule(curve="fixed", b_max=0.3))], strength=2.0)
    assert img.shape == (320, 640, 3) and img.dtype == np.uint8
    assert (img == 255).all(axis=-1).mean() > 0.5  # mostly white background

    def columns(rgb: tuple[int, int, int]) -> np.ndarray:
        return np.nonzero((img == np.array(rgb, dtype=np.uint8)).all(axis=-1).any(axis=0))[0]

    window, fixed = columns((0x1F, 0x77, 0xB4)), columns((0xFF, 0x7F, 0x0E))  # matplotlib's C0, C1
    shade = columns((0xDD, 0xE5, 0xF2))
    assert len(fixed) > 300 and len(shade) > 100
    # The fixed curve spans progress 0..1, the shaded window 0.25..0.75: half its width, centred.
    span = fixed.max() - fixed.min()
    assert (shade.max() - shade.min()) / span == pytest.approx(0.5, abs=0.03)
    assert (shade.min() - fixed.min()) / span == pytest.approx(0.25, abs=0.03)
    # The windowed curve is finite inside the window only; outside it is drawn as "off" markers.
    inside = window[(window >= shade.min()) & (window <= shade.max())]
    assert len(inside) > 0.9 * len(shade)


# --- progress from sigmas -------------------------------------------------------------------------


def test_progress_from_a_simple_schedule():
    # Model calls happen at 10, 5 and 1 (the last step denoises to 0): they span the curve.
    sigmas = [10.0, 5.0, 1.0, 0.0]
    assert progress_from_sigmas(20.0, sigmas) == 0.0
    assert progress_from_sigmas(10.0, sigmas) == 0.0
    assert progress_from_sigmas(5.0, sigmas) == 1 / 2
    assert progress_from_sigmas(1.0, sigmas) == 1.0
    assert progress_from_sigmas(0.5, sigmas) == 1.0
    assert progress_from_sigmas(0.0, sigmas) == 1.0
    assert progress_from_sigmas(math.sqrt(50.0), sigmas) == pytest.approx(0.5 / 2)  # log-sigma midpoint
    assert progress_from_sigmas(torch.tensor([5.0, 5.0]), torch.tensor(sigmas)) == 1 / 2
    with pytest.raises(ValueError, match="1 value.*steps \\+ 1"):
        progress_from_sigmas(1.0, [1.0])
    with pytest.raises(ValueError, match="descending"):
        progress_from_sigmas(1.0, [0.0, 1.0, 2.0])






