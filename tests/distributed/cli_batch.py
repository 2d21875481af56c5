"""Runs ``launch/infer.py``'s job once per override list, all in one process per rank: the
CLI tests' cases without a process start each (one rank, or every rank of a launched job
running the same cases in the same order; a case that ends in ``llm.shutdown()`` must come
last there). Each case is composed by
Hydra from ``conf/`` as ``@hydra.main`` composes it, run by ``launch.infer.run``, and its
exit status and output recorded as ``main`` would give them. Rank 0 writes JSON: one
``{"code", "stdout", "stderr"}`` per case."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from tests.conftest import REPO


def main(cases_path: str, out_path: str) -> None:
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, os.path.join(REPO, "launch"))
    import infer  # launch/infer.py

    from seesaw_mcore.errors import SeesawError

    cases = json.load(open(cases_path))
    results = []
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        for overrides in cases:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = infer.run(compose("infer", overrides=overrides))
                except SeesawError as e:  # as infer.main reports it
                    print(f"error: {e}", file=sys.stderr)
                    code = 1
                except Exception as e:  # noqa: BLE001 - Hydra's override errors: the CLI exits 1
                    chain = []
                    while e is not None:
                        chain.append(f"{type(e).__name__}: {e}")
                        e = e.__cause__
                    print("\n".join(chain), file=sys.stderr)
                    code = 1
            results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0's output, as the CLI shows it
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
