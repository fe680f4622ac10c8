"""`python experiments/analyze.py [args]` == `raycontrast analyze [args]`; a plain script, usable as a `ray job submit` target."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raycontrast.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["analyze", *sys.argv[1:]])
