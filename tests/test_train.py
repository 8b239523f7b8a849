"""
Guards train.py's command line: bad input gets one line naming the bad value and the valid
choices, exit code 2, no traceback; a run folder is never mixed with another run's settings;
--method M --help shows M's flags, and only those, with the values the run would use.

Run: python -m pytest tests/test_train.py
"""

import json
import re
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
    # a flag is typed by the method's own table: V-STaR's verifiers need sampled solutions
    (["--method", "vstar", "--iterations", "0"], ["--iterations", "'0'", "greater than 0"]),
    (["--method", "search", "--guides", "recheck,beam"], ["--guides", "'beam'", "prm", "oracle"]),
    # a calculator asked for on a task without one (the default falls back to off there)
    (["--method", "vstar", "--task", "addition", "--calculator", "result"],
     ["--calculator", "addition", "'result'", "off"]),
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


GOOD = '{"nums": [30, 100, 93], "target": 23}\n'
BAD_TEST_FILES = [  # (file text, other arguments, words the one-line error must contain)
    (GOOD + "{nums: [1, 2]}\n", [], ["--test-file", "line 2", "not JSON"]),
    (GOOD + '{"nums": [1, 2], "target": 1000}\n', [], ["line 2", "1 2 T: 1000",
                                                        "--skip-unsolvable"]),
    ("\n\n", [], ["--test-file", "no problem"]),
    (GOOD, ["--n-test", "5"], ["--n-test", "--test-file"]),
    (GOOD, ["--test-difficulty", "3"], ["--test-difficulty", "--test-file"]),
    (GOOD, ["--task", "addition"], ["--test-file", "addition", "--task countdown"]),
    (GOOD, ["--method", "sos", "--task", "chain"], ["--task", "chain", "countdown"]),
    (None, ["--skip-unsolvable"], ["--skip-unsolvable", "--test-file"]),
    (None, ["--numbers", "1-100+x"], ["--numbers", "1-100+x", "lo-hi"]),
    (None, ["--targets", "100-1"], ["--targets", "100-1", "lo-hi"]),
    (None, ["--numbers", "1-2", "--targets", "900-999"], ["1-2", "900-999"]),
    # a method that draws its own training lines: tried before it starts
    (GOOD, ["--method", "quiet_star", "--task", "countdown", "--numbers", "1-2", "--targets",
            "900-999"], ["1-2", "900-999"]),
    ('{"nums": [99999, 99998, 99997, 99996, 99995], "target": 499985}\n',
     ["--method", "quiet_star", "--task", "countdown"], ["--seq-len", "longer than 48"]),
]


@pytest.mark.parametrize("text,argv,words", BAD_TEST_FILES)
def test_a_bad_countdown_setting_or_test_file_is_one_line_exit_2(text, argv, words, capsys,
                                                                  tmp_path):
    f = tmp_path / "test.jsonl"
    if text is not None:
        f.write_text(text)
        argv = ["--test-file", str(f)] + argv
    argv = ["--method", "sft", "--task", "countdown"] + argv if "--method" not in argv else argv
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def test_a_test_file_is_the_test_set_and_the_summary_says_what_was_read(tmp_path):
    f, out = tmp_path / "public.jsonl", tmp_path / "run"
    f.write_text('{"nums": [30, 100, 93], "target": 23}\n'
                 '{"nums": [1, 2], "target": 1000}\n'  # unsolvable here: left out, counted
                 '{"input": "93,30,100", "output": "23"}\n'  # a repeat: left out, counted
                 '{"input": "4 7 2", "output": "30"}\n')
    train.main(["--method", "sft", "--task", "countdown", "--numbers", "1-100", "--targets",
                "1-100", "--test-file", str(f), "--skip-unsolvable", "--n-train", "4",
                "--steps", "2", "--out", str(out)])
    summary = (out / "summary.md").read_text()
    assert f"test set: 2 problems read from {f} (4 read, 1 left out as unsolvable here, 1 as " \
           "repeats)" in summary
    config = json.loads((out / "config.json").read_text())
    assert config["n_test"] == 2 and config["test_difficulty"] == [3]
    assert config["numbers"] == "1-100" and config["test_file"] == str(f)


def test_a_folder_is_refused_when_its_test_file_now_holds_other_problems(tmp_path, capsys):
    f, out = tmp_path / "public.jsonl", str(tmp_path / "run")
    argv = ["--method", "sft", "--task", "countdown", "--test-file", str(f), "--n-train", "4",
            "--steps", "2", "--out", out]
    f.write_text('{"nums": [30, 100, 93], "target": 23}\n')
    train.main(argv)
    f.write_text('{"nums": [30, 100, 92], "target": 22}\n')  # the same name, size, difficulty
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


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
    # the calculator is on by default on countdown, off on a task that has none
    for task, calculator in (("countdown", "result"), ("addition", "off")):
        args = train.get_parser().parse_args(["--method", "search", "--task", task])
        train.resolve(args, train.get_parser())
        assert args.calculator == calculator


def help_of(argv, capsys, monkeypatch):
    """train.py ARGV --help: its whole text, and {flag: that flag's help on one line}."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps nothing (it breaks at hyphens)
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    entries = [e.split("\n\n")[0] for e in re.split(r"\n  (?=-)", out)[1:]]  # "  --flag ..."
    return out, {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries}


def test_method_help_shows_its_flags_with_its_defaults(capsys, monkeypatch):
    out, flags = help_of(["--method", "vstar"], capsys, monkeypatch)
    for name, value in (("--samples", 8), ("--dpo-nll", 1.0), ("--eval-samples", 16),
                        ("--task", "countdown"), ("--train-difficulty", "2-4"),
                        ("--out", "out/vstar-countdown"), ("--compile", "off")):
        assert f"(default for vstar, preset tiny: {value})" in flags[name], (name, flags[name])
    assert "--think-steps" not in out and "--budgets" not in out  # quiet_star's, search's
    out, flags = help_of(["--method", "quiet_star", "--preset", "small"], capsys, monkeypatch)
    for name, value in (("--think-steps", 500), ("--seq-len", 64), ("--mixing", "tanh"),
                        ("--test-difficulty", "4"), ("--task", "chain")):
        assert f"(default for quiet_star, preset small: {value})" in flags[name], name
    assert "--steps" not in flags and "--checkpoint" not in flags and "--beta" not in flags


def test_help_alone_lists_the_methods(capsys, monkeypatch):
    out, flags = help_of([], capsys, monkeypatch)
    methods = out[out.index("methods:"):]
    for m in ("sft", "star", "vstar", "search", "quiet_star", "sos"):
        assert m in methods
    assert "--method M" in " ".join(methods.split())
    assert "--n-train" not in flags and "--think-steps" not in flags and "default for" not in out


@pytest.mark.parametrize("method", sorted(train.METHODS))
@pytest.mark.parametrize("preset", ["tiny", "gpu"])
def test_help_shows_the_values_the_run_uses(method, preset, capsys, monkeypatch):
    _, flags = help_of(["--method", method, "--preset", preset], capsys, monkeypatch)
    args = train.get_parser().parse_args(["--method", method, "--preset", preset])
    task = train.resolve(args, train.get_parser())
    shown = {name: text.rsplit(": ", 1)[1][:-1] for name, text in flags.items() if name != "-h"}
    assert set(shown) == {train.FLAG_OF[k] for k in
                          train.COMMON + tuple(train.METHOD_DEFAULTS[method][preset])}
    for name in ("train_difficulty", "test_difficulty"):
        flag = train.FLAG_OF[name]
        assert train.parse_difficulties(shown[flag], task, flag) == getattr(args, name)
    assert shown["--out"] == args.out and shown["--task"] == args.task
    switches = {dest: kw["const"] for dest, _, kw, _ in train.METHODS[method][1]
                if kw.get("action") == "store_const"}
    for name, value in train.METHOD_DEFAULTS[method][preset].items():
        if name in switches:  # shown "on" where the flag, given, would change nothing
            assert shown[train.FLAG_OF[name]] == ("on" if value == switches[name] else "off")
        else:
            assert shown[train.FLAG_OF[name]] == str(value), name
