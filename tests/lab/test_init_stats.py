"""The init-statistics study: arm labels, the grid's table, CSV and plot, and its command."""

from __future__ import annotations

import pytest

from attention_jax.lab.ablate_scale import init_stats


@pytest.mark.parametrize("label,parsed", [("none", ("none", False)), ("sqrt+qknorm", ("sqrt", True))])
def test_parse_arm(label, parsed):
    assert init_stats.parse_arm(label) == parsed
    assert init_stats.arm_label(*parsed) == label


@pytest.mark.parametrize("bad", ["sqrtt", "sqrt+norm"])
def test_parse_arm_rejects_unknown(bad):
    with pytest.raises(ValueError):
        init_stats.parse_arm(bad)


@pytest.mark.slow
def test_attention_stats_entry_point_writes_table_csv_and_plot(tmp_path):
    from attention_jax.lab.commands import attention_stats as main

    text = tmp_path / "text.txt"
    text.write_text("the king and the queen shall not be my lord. good night.\n" * 40)
    out = tmp_path / "out"
    rc = main(
        [
            "--config", "configs/attention_stats.py:smoke", "--outdir", str(out),
            "--config.head_sizes=4", "--config.arms=none,sqrt+qknorm", f"--config.model.dataset={text}",
        ]
    )  # fmt: skip
    assert rc == 0
    table = (out / "attention_stats.md").read_text()
    assert table.count("| gaussian |") == 2 and table.count("| model |") == 2
    assert (out / "attention_stats.csv").read_text().count("\n") == 5  # header + 4 rows
    assert (out / "attention_stats.png").stat().st_size > 1000


def test_attention_stats_bad_arm_is_one_line_exit_2(capsys):
    from attention_jax.lab.commands import attention_stats as main

    assert main(["--config", "configs/attention_stats.py:smoke", "--config.arms=none,sqrtt"]) == 2
    assert "unknown attention scale" in capsys.readouterr().err
