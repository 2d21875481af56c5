"""``python -m seesaw_mcore.bench``: the plan suite (``bench/suite.py``)."""

from seesaw_mcore.bench.suite import main

if __name__ == "__main__":
    main()
