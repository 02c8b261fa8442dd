"""The benchmark scripts' CPU-side logic: turn order, summaries, tables, argument errors.

The timings themselves need a GPU (bench/, run by hand on the device); what decides which figure
lands in which row, and what a bad flag says, does not.
"""
import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import _measure  # noqa: E402
import conv_block_ab  # noqa: E402
import gated_head_ab  # noqa: E402


def test_turns_alternate_their_order_every_round():
    calls, entered = [], []

    @contextlib.contextmanager
    def around(key):
        entered.append(key)
        yield

    turns = {k: (lambda k=k: calls.append(k) or len(calls)) for k in "abc"}
    per_round = _measure.take_turns(turns, 3, around=around)
    assert calls == list("abccbaabc") and entered == calls
    assert per_round == {"a": [1, 6, 7], "b": [2, 5, 8], "c": [3, 4, 9]}
    assert _measure.summary([3.0, 1.0, 2.0]) == {"us_per_call": 2.0, "round_min": 1.0, "round_max": 3.0,
                                                 "per_round": [3.0, 1.0, 2.0]}


def test_paired_ratios_follow_the_rounds_not_the_medians():
    # both sides slowed alike in round 2, the twin ran in a lull in round 3: the medians' ratio
    # says the op loses, two rounds of three say it wins by 1.1x
    ours, twin = _measure.summary([10.0, 30.0, 12.0]), _measure.summary([11.0, 33.0, 10.0])
    assert round(twin["us_per_call"] / ours["us_per_call"], 2) == 0.92
    assert _measure.paired_cell(ours, twin) == "1.10x (2/3)"
    assert _measure.paired_cell(_measure.summary([10.0, 10.0, 10.0]), _measure.summary([9.0, 12.0, 10.0])) \
        == "1.00x (1/3)"  # a tie is not a win
    assert _measure.paired_cell({"us_per_call": 1.0}, twin) == "-"  # a result from before per_round


def _result(keys, us):
    return {"card": "Card", "torch": "t", "date": "d", "commit": "abc1234", "rounds": 3, "reps": 5,
            "results": [dict(zip(keys, k), us_per_call=us(k), round_min=1.0, round_max=9.0,
                                         per_round=[us(k), 2 * us(k), us(k)]) for k in _product(keys)]}


def _product(keys):
    spaces = {"pass": conv_block_ab.PASSES, "block": (1, 3), "B": (1, 84), "impl": ("compiled", "twin"),
              "pdl": (True, False), "op": gated_head_ab.OPS}
    if "mode" in keys:  # gated_head_ab: its (pass, mode) cases, not every pairing
        return [(pdl, p, op, m, B, impl) for pdl in (True, False) for p, m in gated_head_ab.CASES
                for op in gated_head_ab.OPS for B in (1, 84) for impl in ("fused", "twin")]
    out = [()]
    for k in keys:
        out = [o + (v,) for o in out for v in spaces[k]]
    return out


def test_conv_block_table_puts_each_figure_in_its_row():
    keys = ("pass", "block", "B", "impl")
    result = _result(keys, lambda k: 10.0 if k[3] == "compiled" else 10.0 * (k[1] + k[2]))
    lines = conv_block_ab.table(result)
    assert "at abc1234" in lines[0] and "5 calls" in lines[2]
    rows = [line for line in lines if line.startswith("| backward ")]
    assert rows == ["| backward | 1 | 1 | 10.0 (1.0-9.0) | 20.0 (1.0-9.0) | 2.00x | 2.00x (3/3) |",
                    "| backward | 1 | 84 | 10.0 (1.0-9.0) | 850.0 (1.0-9.0) | 85.00x | 85.00x (3/3) |",
                    "| backward | 3 | 1 | 10.0 (1.0-9.0) | 40.0 (1.0-9.0) | 4.00x | 4.00x (3/3) |",
                    "| backward | 3 | 84 | 10.0 (1.0-9.0) | 870.0 (1.0-9.0) | 87.00x | 87.00x (3/3) |"]
    assert len([line for line in lines if line.startswith("| ") and "---" not in line]) == 1 + 3 * 4


def test_gated_head_table_puts_each_figure_in_its_row():
    keys = ("pdl", "pass", "op", "mode", "B", "impl")
    result = _result(keys, lambda k: (5.0 if k[5] == "fused" else (15.0 if k[0] else 10.0)) * k[4])
    lines = gated_head_ab.table(result)
    assert "Gated head" in lines[0] and "at abc1234" in lines[0]
    assert "| 1 | backward | ce | eager | on | 5.0 (1.0-9.0) | 15.0 (1.0-9.0) | 3.00x | 3.00x (3/3) |" in lines
    assert "| 84 | forward_backward | logits | graph20 | off | 420.0 (1.0-9.0) | 840.0 (1.0-9.0) | 2.00x | " \
        "2.00x (3/3) |" in lines
    assert not any("add_" in line for line in lines)  # a result without the floor
    result["floor"] = _measure.summary([12.0, 11.0, 13.0])
    assert "replayed the same way in the same rounds: 12.0 (11.0-13.0) us" in "\n".join(gated_head_ab.table(result))
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2 * len(gated_head_ab.CASES) * 2 * 2  # batches x cases x ops x PDL
    assert rows[0].startswith("| 1 ") and rows[-1].startswith("| 84 ")


@pytest.mark.parametrize("flag, value, says", [("--blocks", "1,x", "comma-separated integers"),
                                               ("--blocks", "4", r"--blocks: expected some of \[1, 2, 3\]"),
                                               ("--batches", "0", "--batches: expected batch sizes of at least 1"),
                                               ("--rounds", "0", "at least 1")])
def test_conv_block_ab_names_the_bad_flag(flag, value, says):
    with pytest.raises(SystemExit, match=says):
        conv_block_ab.main([flag, value])


def test_gated_head_ab_names_a_bad_flag():
    with pytest.raises(SystemExit, match="--batches: expected batch sizes of at least 1"):
        gated_head_ab.main(["--batches", "1,0"])
    with pytest.raises(SystemExit, match="--rounds and --reps must be at least 1"):
        gated_head_ab.main(["--reps", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
def test_the_turn_taking_scripts_say_they_need_a_gpu(tmp_path):
    for script in (conv_block_ab, gated_head_ab):
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            script.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_results_are_written_whole(tmp_path):
    _measure.write_result(tmp_path / "out", "x-card", {"a": 1}, ["# t", "| r |"])
    assert (tmp_path / "out" / "x-card.json").read_text() == '{\n "a": 1\n}\n'
    assert (tmp_path / "out" / "x-card.md").read_text() == "# t\n| r |\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x-card.json", "x-card.md"]
