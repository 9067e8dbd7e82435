"""Acceptance measurements of a trained default VLM; writes acceptance.json + MODEL_CARD.md.

python scripts/evaluate_vlm.py                       # the shipped parts (src/taskvec/data/vlm)
python scripts/evaluate_vlm.py --parts runs/vlm/parts --limit 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from taskvec.models import load_model
from taskvec.tasks import PAPER_TASKS, load_task
from taskvec.vlm.acceptance import measure_acceptance
from taskvec.vlm.artifacts import read_card
from taskvec.vlm.card import ACCEPTANCE_FILE, write_model_card
from taskvec.vlm.data import entity_images
from taskvec.vlm.recipe import SHIPPED_PARTS_DIR, load_vlm_from_parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=Path, default=SHIPPED_PARTS_DIR)
    parser.add_argument("--limit", type=int, default=None, help="test items per task (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    held_out = read_card(args.parts)["training"]["config"]["held_out"]
    base = load_model("default")
    vlm = load_vlm_from_parts(args.parts)
    tasks = [load_task(name) for name in PAPER_TASKS]
    results = measure_acceptance(base, vlm, tasks, entity_images(), held_out, limit=args.limit)
    results["seconds"] = time.monotonic() - started
    (args.parts / ACCEPTANCE_FILE).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"wrote {write_model_card(args.parts)}")


if __name__ == "__main__":
    main()
