"""
Guards train.py's command line: bad input gets one line naming the bad value and the valid
choices, exit code 2, no traceback; a run folder is never mixed with another run's settings.

Run: python -m pytest tests/test_train.py
"""

import subprocess
import sys

import pytest

import train

BAD_INPUT = [  # (arguments, words the one-line error must contain)
    (["--method", "magic"], ["magic", "sft", "star"]),
    (["--task", "poetry"], ["poetry", "addition", "chain", "countdown", "expression"]),
    (["--preset", "huge"], ["huge", "tiny", "gpu"]),
    (["--n-train", "0"], ["--n-train", "'0'", "greater than 0"]),
    (["--steps", "-5"], ["--steps", "'-5'", "greater than 0"]),
    (["--n-test", "ten"], ["--n-test", "'ten'"]),
    (["--checkpoint", "no/such/model.pt"], ["--checkpoint", "no/such/model.pt"]),
    (["--train-difficulty", "0-40"], ["--train-difficulty", "0-40", "1-12"]),
    (["--temperature", "-1"], ["--temperature", "-1"]),
    # a flag the method does not use is refused, not ignored
    (["--method", "star", "--budgets", "1,2"], ["--budgets", "star", "--star-steps"]),
    (["--method", "sft", "--iterations", "2"], ["--iterations", "sft"]),
    (["--method", "quiet_star", "--checkpoint", "m.pt"], ["--checkpoint", "quiet_star"]),
    (["--method", "quiet_star", "--steps", "5"], ["--steps", "quiet_star", "--think-steps"]),
    (["--method", "search", "--no-rationalize"], ["--no-rationalize", "search"]),
    (["--method", "quiet_star", "--worked-fraction", "1.5"], ["--worked-fraction", "'1.5'"]),
    (["--method", "quiet_star", "--worked-fraction", "1"], ["--worked-fraction", "no bare"]),
    (["--method", "quiet_star", "--mixing", "relu"], ["--mixing", "relu", "tanh"]),
]


@pytest.mark.parametrize("argv,words", BAD_INPUT)
def test_bad_input_is_one_line_exit_2(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    for w in words:
        assert w in err, (w, err)


def test_bad_input_from_the_shell_has_no_traceback():
    r = subprocess.run([sys.executable, "train.py", "--method", "magic"], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_a_folder_with_other_settings_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    small = ["--method", "sft", "--out", out, "--n-train", "4", "--n-test", "4", "--steps", "2",
             "--train-difficulty", "1", "--test-difficulty", "1"]
    train.main(small)
    with pytest.raises(SystemExit) as e:
        train.main(small[:-1] + ["2"])  # same folder, another test set
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_defaults_come_from_the_methods_table_and_flags_override_them(tmp_path):
    import star
    import vstar
    for method, table in (("star", star.DEFAULTS), ("vstar", vstar.DEFAULTS)):
        args = train.get_parser().parse_args(["--method", method, "--out", str(tmp_path)])
        train.resolve(args, train.get_parser())
        for name, value in table["tiny"].items():
            assert getattr(args, name) == value, (method, name)
    args = train.get_parser().parse_args(["--method", "vstar", "--samples", "3"])
    train.resolve(args, train.get_parser())
    assert args.samples == 3 and args.iterations == vstar.DEFAULTS["tiny"]["iterations"]
