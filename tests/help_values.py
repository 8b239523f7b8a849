"""
Every method's --help at every preset as JSON, {"method/preset": {flag: the value shown}}, for
checking that a change to the command line changes no flag or value: run it in two checkouts
and compare. Not collected by pytest.

  python tests/help_values.py before.json      (and in the other checkout: ... after.json)
  python -c "import json; print(json.load(open('before.json')) == json.load(open('after.json')))"
"""

import contextlib
import io
import json
import os
import re
import sys

os.environ["COLUMNS"] = "1000"  # argparse wraps nothing
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

out = {}
for method in sorted(train.METHODS):
    for preset in ("tiny", "small", "gpu"):
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            train.main(["--method", method, "--preset", preset, "--help"])
        entries = [" ".join(e.split("\n\n")[0].split())
                   for e in re.split(r"\n  (?=-)", text.getvalue())[1:]]
        out[f"{method}/{preset}"] = {e.split()[0].rstrip(","): e.rsplit(": ", 1)[1][:-1]
                                     for e in entries if "default for" in e}
json.dump(out, open(sys.argv[1], "w"), indent=1, sort_keys=True)
