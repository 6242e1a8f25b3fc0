"""Model calls per kept region on an input (issue #10): how many prompts the caption/region VLM and the
refine LLM answer, divided by the regions written to the shards.

    python bench/model_calls.py --config configs/fixture.yaml --input tests/fixtures/fixture100 \\
        --output /tmp/calls-out

Counts prompts (one per image or region question), not batched forward passes: batching changes speed,
not the number of questions asked. Runs the sequential executor in this process so counters see every call.
Prints last: `vlm_calls=.. llm_calls=.. kept_regions=.. calls_per_kept_region=..`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count_calls(counter: Counter) -> None:
    """Wrap the two chat model classes so every prompt they answer is counted by kind."""
    from stages.llm import ChatLM
    from stages.vlm import ChatVLM

    def wrap(cls: type, method: str, kind: str, arg: int) -> None:
        original = getattr(cls, method)

        def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            counter[kind] += len(args[arg])
            return original(self, *args, **kwargs)

        setattr(cls, method, counted)

    wrap(ChatVLM, "generate", "vlm", 1)
    original_shared = ChatVLM.generate_shared

    def shared(self, groups, *args, **kwargs):  # type: ignore[no-untyped-def]
        counter["vlm"] += sum(len(prompts) for _, prompts in groups)  # one prompt per region
        return original_shared(self, groups, *args, **kwargs)

    ChatVLM.generate_shared = shared
    wrap(ChatLM, "generate", "llm_generate", 0)
    wrap(ChatLM, "yes_probability", "llm_yes_no", 0)


def main(argv: list[str] | None = None) -> int:
    from pipelines.rexverse2m import load_job_config as load_config
    from pipelines.rexverse2m import run_job as run

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--input", required=True, action="append")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    counter: Counter = Counter()
    count_calls(counter)
    result = run(
        load_config(args.config, args.overrides), args.input, args.output, overwrite=True, use_ray=False
    )
    kept = sum(s["units_out"] for name, s in result.manifest["stages"].items() if name == "filter")
    llm = counter["llm_generate"] + counter["llm_yes_no"]
    print(dict(counter))
    print(
        f"vlm_calls={counter['vlm']} llm_calls={llm} records={result.records} kept_regions={kept} "
        f"calls_per_kept_region={(counter['vlm'] + llm) / max(kept, 1):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
