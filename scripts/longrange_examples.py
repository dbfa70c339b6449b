"""A trained long-range classifier on a few validation examples (excerpt, prediction, truth) and its accuracy on the
whole validation split, with the data module its configs define (configs/longrange/<task>.yaml + cpu/<task>.yaml).

    python scripts/longrange_examples.py --task text --weights weights/longrange/text.ckpt [--examples 3]

Prints one summary line last: `val acc <accuracy> on <n> examples`.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import torch
import yaml

from polyformer.checkpoint import from_plain, import_class
from polyformer.data import PROJECT_ROOT as ROOT
from polyformer.domains.longrange import listops
from polyformer.domains.longrange.data import BYTE_OFFSET, SequenceDataModule
from polyformer.training import eval_mode, load_task

CONFIGS = ROOT / "configs" / "longrange"


def merged(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def data_module(task: str) -> SequenceDataModule:
    """The data module of the task's config with its CPU cut, as `polyformer` would build it."""
    data = merged(*((yaml.safe_load(f.read_text()) or {}).get("data", {}) for f in
                    (CONFIGS / f"{task}.yaml", CONFIGS / "cpu" / f"{task}.yaml")))
    cls = import_class(data["class_path"])
    hints = typing.get_type_hints(cls.__init__)
    return cls(**{key: from_plain(hints.get(key), value) for key, value in data.get("init_args", {}).items()})


def show(task: str, tokens: torch.Tensor) -> str:
    ids = tokens[tokens != 0].tolist()
    if task == "text":
        text = bytes(i - BYTE_OFFSET for i in ids).decode("utf-8", errors="replace").replace("<br />", " ")
        return repr(text[:90] + ("…" if len(text) > 90 else ""))
    symbols = {i: s for s, i in listops.VOCAB.items()}
    text = " ".join(symbols[i] for i in ids)
    return f"{text[:70]}… ({len(ids)} tokens)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("text", "listops"), required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=3)
    args = parser.parse_args()
    model = load_task(args.weights)
    data = data_module(args.task)
    data.prepare_data()
    data.setup("validate")
    names = {"text": ("negative", "positive")}.get(args.task)
    correct = total = 0
    with eval_mode(model), torch.inference_mode():
        for batch in data.val_dataloader():
            predictions = model(batch["tokens"], batch["padding"]).argmax(-1)
            if total == 0:
                for i in range(min(args.examples, len(predictions))):
                    predicted, truth = int(predictions[i]), int(batch["labels"][i])
                    print(f"{show(args.task, batch['tokens'][i])}  predicted "
                          f"{names[predicted] if names else predicted}, truth {names[truth] if names else truth}")
            correct += int((predictions == batch["labels"]).sum())
            total += len(predictions)
    print(f"val acc {correct / total:.3f} on {total} examples")


if __name__ == "__main__":
    main()
