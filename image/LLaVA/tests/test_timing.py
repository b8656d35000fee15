"""The shared timing module: spreads, noise flags, interleaved rounds and one-line command-line errors."""

import pytest

from llava.vtr import timing
from llava.vtr.config import VTRConfig


def test_timings_report_median_and_range_of_the_samples():
    t = timing.Timings((120.0, 100.0, 110.0, 131.2, 118.0))
    assert (t.median, t.low, t.high) == (118.0, 100.0, 131.2)
    assert t.format() == "118.0 [100.0-131.2]"
    with pytest.raises(ValueError):
        timing.Timings(())


def test_a_clear_speedup_is_not_flagged():
    s = timing.Speedup.of([100.0, 104.0, 98.0], [50.0, 50.0, 51.0])  # paired by round: 2.0, 2.08, 1.92
    assert s.samples == (2.0, 2.08, 98.0 / 51.0)
    assert not s.within_noise
    assert s.format() == "2.00x [1.92-2.08]"


def test_a_range_holding_one_or_wider_than_the_effect_is_flagged():
    holds_one = timing.Speedup((0.97, 1.02, 1.01))
    assert holds_one.within_noise and holds_one.format() == "~1.01x [0.97-1.02]"
    # all above 1.00x, but the middle of the rounds spreads over 0.24 for an effect of 0.10
    wide = timing.Speedup((1.02, 1.10, 1.50))
    assert wide.low > 1.0 and wide.within_noise and wide.format().startswith("~1.10x")
    assert timing.Speedup((3.0,)).within_noise  # one round: no spread known


def test_one_disturbed_round_does_not_hide_a_clear_effect():
    # four rounds agree on ~1.9x; in one the unpruned run was hit by another process
    s = timing.Speedup((1.86, 1.90, 5.77, 1.88, 1.93))
    assert s.high - s.low > s.median - 1.0 and s.spread == pytest.approx(0.05)
    assert not s.within_noise and s.format() == "1.90x [1.86-5.77]"
    # every round slower by a few percent is a real cost, not noise
    assert not timing.Speedup((0.61, 0.95, 0.96, 0.97, 0.98)).within_noise
    with pytest.raises(ValueError, match="pair them by round"):
        timing.Speedup.of([1.0, 2.0], [1.0])


def test_rounds_start_with_a_named_warm_up_and_rotate_the_order(capsys):
    visits = list(timing.rounds(2, 3))
    assert visits == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 0), (2, 2), (2, 0), (2, 1)]
    progress = capsys.readouterr().err.splitlines()
    assert progress[0] == "warm-up round (not timed), 3 settings"
    assert [line.split(" (")[0] for line in progress[1:]] == ["timed round 1/2", "timed round 2/2"]


class SlowingMachine:
    """A fake model on a machine that gets 5% slower with every prefill: unpruned and keep-all cost the same,
    `half` half of it."""

    COST = {"none": 100.0, "keep-all": 100.0, "half": 50.0}

    def __init__(self):
        self.calls, self.config = 0, None

    def set_vtr_config(self, config):
        self.config = config

    def prefill(self, model, inputs):
        self.calls += 1
        return self.COST[self.config] * (1 + 0.05 * self.calls)


def test_interleaved_rounds_cancel_drift_and_keep_all_reads_as_noise(monkeypatch, capsys):
    machine = SlowingMachine()
    monkeypatch.setattr(timing, "prefill_ms", machine.prefill)
    times = timing.measure_prefill(machine, {}, ["none", "keep-all", "half"], repeats=5)
    assert machine.calls == 3 * 6 and all(len(t.samples) == 5 for t in times)  # the warm-up round is dropped
    keep_all = timing.Speedup.of(times[0].samples, times[1].samples)
    half = timing.Speedup.of(times[0].samples, times[2].samples)
    # measured one after the other, half would read 1.6x here (the machine slowed down meanwhile)
    assert half.median == pytest.approx(2.0, abs=0.1) and not half.within_noise
    assert keep_all.within_noise and keep_all.low < 1.0 < keep_all.high
    cells = timing.speed_cells(times)
    assert cells[0][1] == "reference" and cells[1][1].startswith("~") and cells[2][1] == half.format()
    assert cells[2][0] == times[2].format()


def test_noise_note_counts_the_flagged_speedups():
    note = timing.noise_note(["~1.01x [0.97-1.02]", "2.00x [1.92-2.08]"], 5)
    assert "over 5 timed rounds" in note and "1 of 2 speedups are inside the noise" in note
    assert "speedups are inside the noise" not in timing.noise_note(["2.00x [1.92-2.08]"], 5)
    one = timing.noise_note(["~3.00x [3.00-3.00]"], 1, "--rounds", "LLM speedups")
    assert "over 1 timed round (" in one and "1 of 1 LLM speedups are inside the noise" in one and "--rounds" in one


@pytest.mark.parametrize(
    "text, message",
    [
        ("abc", "'abc' is not a whole number"),
        ("-5", "-5 must be >= 1"),
        ("", "is empty"),
        (" , ", "is empty"),
        ("8,,64", "has an empty item"),
    ],
)
def test_bad_lists_are_usage_errors_naming_the_flag(text, message):
    with pytest.raises(timing.UsageError, match=message) as err:
        timing.parse_list("--budgets", text, int, minimum=1)
    assert str(err.value).startswith(f"--budgets {text!r}")


def test_duplicates_run_once_with_a_note(capsys):
    assert timing.parse_list("--budgets", "8, 64,8", int, minimum=1) == [8, 64]
    assert timing.parse_list("--strategies", "fastv,FastV,random", str.lower) == ["fastv", "random"]
    err = capsys.readouterr().err
    assert "--budgets lists 8 more than once; it runs once" in err and "--strategies lists FastV" in err


def test_demo_settings_put_the_reference_and_keep_all_first_and_refuse_bad_strategies():
    parser = timing.Parser()
    timing.add_demo_arguments(parser, budgets="192,64")
    args = parser.parse_args(["--strategies", "fastv,random", "--budgets", "64"])
    settings = timing.demo_settings(args, VTRConfig)
    assert [(name, budget) for name, budget, _ in settings] == [
        ("none (unpruned)", "-"),
        ("keep-all", "K=2 all"),
        ("fastv", "K=2 keep=64"),
        ("random", "K=2 keep=64"),
    ]
    assert not settings[0][2].enabled and settings[1][2].keep_ratio == 1.0
    for argv, message in [
        (["--strategies", "nosuch"], "--strategies nosuch: unknown strategy 'nosuch'"),
        (["--strategies", "none"], "unpruned reference"),
        (["--strategies", "fastv", "--prune-layer", "0"], "--strategies fastv: VTRConfig.prune_layer=0"),
        (["--repeats", "0"], "--repeats 0: must be >= 1"),
    ]:
        with pytest.raises(timing.UsageError, match=message):
            timing.demo_settings(parser.parse_args(argv), VTRConfig)


def test_run_cli_turns_usage_errors_and_ctrl_c_into_one_line(capsys):
    def bad(argv):
        parser = timing.Parser(prog="x")
        parser.add_argument("--n", type=int)
        parser.parse_args(argv)

    assert timing.run_cli("prog", bad, ["--n", "abc"]) == 2
    err = capsys.readouterr().err
    assert err == "prog: error: argument --n: invalid int value: 'abc' (see --help)\n"

    def interrupted(argv):
        raise KeyboardInterrupt

    assert timing.run_cli("prog", interrupted, []) == 130
    assert capsys.readouterr().err.strip() == "prog: interrupted (Ctrl-C); nothing more was run"


def test_missing_files_and_model_folders_are_named(tmp_path):
    with pytest.raises(timing.UsageError, match="--image .*bad.png: no such file"):
        timing.open_image(tmp_path / "bad.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(timing.UsageError, match="text.png: not an image that can be read"):
        timing.open_image(tmp_path / "text.png")
    with pytest.raises(timing.UsageError, match="--model: model folder '.*nosuch' does not exist"):
        timing.check_model(str(tmp_path / "nosuch"))
    assert timing.check_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # a hub id passes
