"""The planner's command line: ``python -m seesaw_mcore.planner --model DIR --num-gpus N``."""

from __future__ import annotations

import argparse
import json
import sys

from seesaw_mcore.errors import SeesawError
from seesaw_mcore.planner.auto import plan
from seesaw_mcore.planner.cost_model import PRESETS, WORKLOADS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seesaw_mcore.planner",
                                 description="Rank Seesaw plans with the paper's cost model.")
    ap.add_argument("--model", required=True, help="HF config.json (or its folder)")
    ap.add_argument("--gpu", default="a10", help=f"{', '.join(PRESETS)} or measure")
    ap.add_argument("--num-gpus", type=int, required=True)
    ap.add_argument("--workload", default="sharegpt", help=", ".join(WORKLOADS))
    ap.add_argument("--prompt-len", type=float, help="mean prompt tokens (overrides workload)")
    ap.add_argument("--output-len", type=float, help="mean output tokens (overrides workload)")
    ap.add_argument("--top", type=int, default=15, help="rows in the table")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    try:
        result = plan(args.model, args.gpu, args.num_gpus, args.workload, args.prompt_len,
                      args.output_len)
    except SeesawError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    wl, hw = result["workload"], result["hardware"]
    print(f"{args.num_gpus} x {hw['name']}, workload {wl['name']} (prompt {wl['prompt_len']:g}, "
          f"output {wl['output_len']:g} tokens); best first:")
    print(f"{'prefill':>8} {'decode':>8} {'req/s':>9} {'tok/s':>10} {'prefill tok/s':>14} "
          f"{'decode tok/s':>13} {'batch':>6}")
    for r in result["ranking"][:args.top]:
        print(f"{r['prefill']:>8} {r['decode']:>8} {r['requests_per_s']:9.2f} "
              f"{r['tokens_per_s']:10.0f} {r['prefill_tokens_per_s']:14.0f} "
              f"{r['decode_tokens_per_s']:13.0f} {r['decode_batch']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
