"""lm-evaluation-harness tasks on this engine, on one rank or many:

    deepspeed --no_local_rank --num_gpus 2 launch/eval.py plan=P2:T2 \
        model.path=/models/llama eval.tasks=[hellaswag,gsm8k] eval.output=results.json

A Megatron checkpoint the same way: ``model.format=megatron model.path=/ckpts/run1
model.tokenizer=/models/llama`` (a save root or one ``iter_*`` folder).

Why a launcher script and not ``lm_eval --model seesaw``: lm-eval's CLI runs one process and
finds only the backends it ships, while this engine is SPMD (every rank runs the same calls)
and is configured like ``launch/infer.py``; this script takes the same engine overrides
(``plan=``, ``cache.*``, ``dtype=`` ...) plus ``eval.*``, runs ``lm_eval.simple_evaluate`` on
every rank with the ``seesaw`` backend, and rank 0 prints the table and writes the results.
In Python, ``lm_eval.simple_evaluate(model=SeesawLM(...))`` does the same.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from seesaw_mcore.config import EngineConfig  # noqa: E402
from seesaw_mcore.config.sections import resolve_model_paths  # noqa: E402
from seesaw_mcore.errors import SeesawError, exit_status  # noqa: E402


@dataclass
class EvalOptions:
    """What lm-eval runs."""

    tasks: list[str] = field(default_factory=list)  # task or group names
    include_path: str | None = None  # a folder of extra task YAMLs
    num_fewshot: int | None = None
    limit: float | None = None  # documents per task (a fraction if < 1)
    max_gen_toks: int = 256  # generate_until's default budget
    log_samples: bool = False  # keep every document's requests and responses
    output: str | None = None  # results JSON (rank 0)
    seed: int = 0


@dataclass
class EvalConfig(EngineConfig):
    """The engine's configuration plus ``eval``."""

    eval: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:  # checked by EngineConfig.from_mapping, once merged
        pass


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def run(cfg: DictConfig) -> int:
    from seesaw_mcore import quiet

    quiet.configure(bool(cfg.runtime.verbose))
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from seesaw_mcore.eval_harness import SeesawLM

    raw = OmegaConf.to_container(cfg, resolve=True)
    opts = EvalOptions(**raw["eval"])
    if not opts.tasks:
        raise SeesawError("eval.tasks is empty: name at least one lm-eval task")
    resolve_model_paths(raw["model"], REPO)  # relative: else the repo's
    engine = EngineConfig.from_mapping(raw)
    manager = TaskManager(include_path=opts.include_path)
    unknown = [t for t in opts.tasks if t not in manager.all_tasks]
    if unknown:  # before the model loads
        raise SeesawError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    lm = SeesawLM(config=engine, max_gen_toks=opts.max_gen_toks)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=opts.tasks, num_fewshot=opts.num_fewshot, limit=opts.limit,
        task_manager=manager, log_samples=opts.log_samples, random_seed=opts.seed,
        numpy_random_seed=opts.seed, torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed)
    if lm.llm.is_driver:
        print(make_table(results))
        if opts.output:
            with open(opts.output, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2, default=str)
            print(f"results: {opts.output}")
    lm.llm.shutdown()
    return 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    sys.exit(exit_status(lambda: run(cfg)))


if __name__ == "__main__":
    main()
