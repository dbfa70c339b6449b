"""Issue 10's recipes on real LibriSpeech, end to end (also `python scripts/bench_speech.py --real ...`).

    python scripts/bench_speech_real.py [--quick] [--json PATH] [--recipes a,b,c,d] [--seeds 1 2] [--out DIR]
                                   [--reuse]

Stages, each a `polyformer fit` whose minutes count toward every recipe that uses it:
- synthetic: configs/speech/conformer_ctc_tiny_synthetic.yaml on data/synthetic_librispeech (made when missing);
- bestrq: configs/speech/bestrq_tiny_real.yaml — BEST-RQ on the real training audio, the real unlabelled audio and the
  synthetic training audio (no transcripts);
- bestrq_synthetic: the synthetic config started from the BEST-RQ encoder (recipe d's middle stage).
Recipes, each ending with configs/speech/conformer_ctc_tiny_real.yaml on the real sample's train split:
(a) from scratch; (b) from the synthetic model; (c) from the BEST-RQ encoder; (d) from bestrq_synthetic.
A BEST-RQ start leaves its prediction head out (finetune.exclude model.head.) and keeps the loaded weights frozen
for the first 100 steps (the new CTC head learns first); every fine-tuning decays the learning rate by 0.75 per layer
below the top (layer-wise decay). Each recipe's last checkpoint is tested on the dev split: greedy CER and WER,
and WER with beam search over a lexicon with a 3-gram Witten–Bell language model (lm.py) estimated on the fortunes
sentences and the real training transcripts — no dev transcript among them (checked).
--quick: a small synthetic corpus and a few batches of every stage (checks the script, not a result).
--seeds 1 2: the best recipe's last fine-tuning again at these seeds (seed_everything; its earlier stages are the
seed-0 ones, reused), for dev figures as mean ± std over seed 0 and these.
--reuse: stages already fitted in DIR (their DIR/stages/<name>.json) and dev tests already run (DIR/tests/) are read,
not redone, so the recipes can run over several sittings or side by side (`--recipes b` and `--recipes c` in two
processes, then all four with --reuse).
--json: real_dev_cer, real_dev_wer, real_dev_wer_lm, real_train_minutes (dicts recipe → value), best_recipe (lowest
dev CER), best_checkpoint, best_config; with --seeds, best_dev_{cer,wer,wer_lm} (means) with _std and _runs (seed →
value) siblings. The best recipe's seed-0 checkpoint is written weights-only to DIR/weights/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path


from polyformer.bench import (QUICK, bench_parser, evaluate, fit, last_value, recorded, run, run_dir, summarise,
                              write_json)
from polyformer.data import PROJECT_ROOT as ROOT
from polyformer.data import shared_data_dir
from polyformer.domains.speech.data import read_split
from polyformer.domains.speech.lm import lexicon_lines, witten_bell_arpa
from polyformer.domains.speech.text import read_sources, sentences_from
from polyformer.checkpoint import save_weights

CONFIGS = ROOT / "configs" / "speech"
REAL = shared_data_dir() / "speech" / "librispeech-sample"
RECIPES = {"a": [], "b": ["synthetic"], "c": ["bestrq"], "d": ["bestrq", "bestrq_synthetic"]}
RECIPE_CONFIGS = CONFIGS / "recipes"  # the fine-tuning and decoding choices as YAML, added after a stage's config
LAYER_DECAY = ["-c", str(RECIPE_CONFIGS / "finetune_layer_decay.yaml")]
NEW_HEAD = ["-c", str(RECIPE_CONFIGS / "finetune_new_head.yaml")]


def language_model(out: Path) -> tuple[Path, Path]:
    """lm.arpa and lexicon.txt from the fortunes sentences and the real training transcripts, no dev transcript."""
    dev = {u.transcript for u in read_split(REAL, "dev")}
    text = sentences_from(read_sources([Path("/usr/share/games/fortunes")]), 3, 30)
    text += [u.transcript for u in read_split(REAL, "train")]
    kept = [s for s in dict.fromkeys(text) if s not in dev]
    print(f"language model: {len(kept)} sentences ({len(text) - len(kept)} dropped as dev transcripts)", flush=True)
    sentences = [s.split() for s in kept]
    out.mkdir(parents=True, exist_ok=True)
    files = {"lm.arpa": witten_bell_arpa(sentences, 3),
             "lexicon.txt": "\n".join(lexicon_lines({w for s in sentences for w in s})) + "\n"}
    for name, text in files.items():  # replaced whole: another process of the benchmark may be decoding with them
        (out / f"{name}.tmp{os.getpid()}").write_text(text)
        os.replace(out / f"{name}.tmp{os.getpid()}", out / name)
    return out / "lm.arpa", out / "lexicon.txt"


class Pipeline:
    def __init__(self, out: Path, quick: bool, reuse: bool = False):
        self.out, self.quick, self.reuse = out, quick, reuse
        self.stages: dict[str, dict] = {}  # stage name → its minutes and last checkpoint
        self.limits = QUICK if quick else []
        self.corpus = out / "synthetic_corpus" if quick else ROOT / "data" / "synthetic_librispeech"
        if not (self.corpus / "LibriSpeech" / "train").is_dir():
            size = ["--train-utterances", "40", "--dev", "8", "--test", "8", "--heldout", "8", "--max-words", "8"] \
                if quick else ["--train-minutes", "80", "--dev", "200", "--test", "300", "--heldout", "300"]
            run([sys.executable, str(ROOT / "scripts" / "make_synthetic_librispeech.py"), "--out", str(self.corpus),
                 *size, "--seed", "0"], out / "logs" / "corpus.log")

    def fit(self, name: str, config: str, extra: list[str]) -> Path:
        """A `polyformer fit` (once per stage name; with --reuse, read from its record DIR/stages/<name>.json);
        returns its last checkpoint and records its minutes."""
        def train() -> dict:
            fitted = fit([CONFIGS / config], self.out, name, [*extra, *self.limits])
            return {"minutes": fitted.seconds / 60, "checkpoint": str(fitted.checkpoint("last"))}

        if name not in self.stages:
            self.stages[name] = recorded(self.out / "stages" / f"{name}.json", self.reuse, train)
        return Path(self.stages[name]["checkpoint"])

    def stage(self, name: str) -> Path:
        synthetic = [f"--data.init_args.root={self.corpus}"]
        if name == "synthetic":
            return self.fit(name, "conformer_ctc_tiny_synthetic.yaml", synthetic)
        if name == "bestrq":
            unlabelled = shared_data_dir() / "speech" / "librispeech-unlabelled"
            folders = f"[{unlabelled}, {self.corpus / 'LibriSpeech' / 'train'}]"
            return self.fit(name, "bestrq_tiny_real.yaml", [f"--data.init_args.root={REAL}",
                                                            f"--data.init_args.audio_folders={folders}"])
        if name == "bestrq_synthetic":
            return self.fit(name, "conformer_ctc_tiny_synthetic.yaml",
                            [*synthetic, f"--model.init_args.init_from={self.stage('bestrq')}", *NEW_HEAD,
                             *LAYER_DECAY])
        raise ValueError(f"unknown stage {name!r}")

    def recipe(self, recipe: str, seed: int = 0) -> tuple[str, Path]:
        """The recipe's last fine-tuning (run name real_<recipe>, real_<recipe>_seed<S> at another seed) after its
        stages; (run name, last checkpoint)."""
        stages = [self.stage(name) for name in RECIPES[recipe]]
        start = []
        if stages:
            start = [f"--model.init_args.init_from={stages[-1]}", *LAYER_DECAY]
            if RECIPES[recipe][-1] == "bestrq":
                start += NEW_HEAD
        name = f"real_{recipe}" if seed == 0 else f"real_{recipe}_seed{seed}"
        seeded = [f"--seed_everything={seed}"] if seed else []
        return name, self.fit(name, "conformer_ctc_tiny_real.yaml",
                              [f"--data.init_args.root={REAL}", *start, *seeded])

    def test(self, name: str, checkpoint: Path, decoding: list[str], tag: str) -> dict:
        """Dev CER and WER of a run's checkpoint (with --reuse, read from DIR/tests/<name>_<tag>.json)."""
        def dev_error_rates() -> dict:
            config = CONFIGS / "conformer_ctc_tiny_real.yaml"
            evaluate("test", [config], self.out, name, [f"--data.init_args.root={REAL}",
                     "--data.init_args.test_splits=[dev]", *decoding, *self.limits], checkpoint, tag=tag)
            folder = run_dir(self.out, config, name)
            return {"cer": last_value(folder, "test/cer"), "wer": last_value(folder, "test/wer"),
                    "checkpoint": str(checkpoint)}

        return recorded(self.out / "tests" / f"{name}_{tag}.json", self.reuse, dev_error_rates)


def real_benchmark(out: Path, recipes: list[str], quick: bool, json_path: Path | None, reuse: bool = False,
                   seeds: Sequence[int] = ()) -> dict:
    """The recipes at seed 0, then the best one's last fine-tuning again at each of `seeds` (its stages reused)."""
    pipeline = Pipeline(out, quick, reuse)
    lm, lexicon = language_model(out / "lm")
    lm_decoding = ["-c", str(RECIPE_CONFIGS / "lm_beam.yaml"), f"--model.init_args.lexicon={lexicon}",
                   f"--model.init_args.lm={lm}"]

    def measure(recipe: str, seed: int) -> tuple[Path, float, float, float]:
        name, checkpoint = pipeline.recipe(recipe, seed)
        greedy = pipeline.test(name, checkpoint, [], "greedy")
        return checkpoint, greedy["cer"], greedy["wer"], pipeline.test(name, checkpoint, lm_decoding, "lm")["wer"]

    figures = {"real_dev_cer": {}, "real_dev_wer": {}, "real_dev_wer_lm": {}, "real_train_minutes": {}}
    checkpoints = {}
    for recipe in recipes:
        checkpoints[recipe], cer, wer, wer_lm = measure(recipe, 0)
        minutes = sum(pipeline.stages[stage]["minutes"] for stage in [*RECIPES[recipe], f"real_{recipe}"])
        figures["real_dev_cer"][recipe], figures["real_dev_wer"][recipe] = cer, wer
        figures["real_dev_wer_lm"][recipe], figures["real_train_minutes"][recipe] = wer_lm, minutes
    best = min(figures["real_dev_cer"], key=figures["real_dev_cer"].get)
    print(f"\n{'recipe':<8}{'minutes':>9}{'dev CER':>9}{'dev WER':>9}{'WER + LM':>10}")
    for recipe in recipes:
        print(f"{recipe:<8}" + "".join(f"{figures[key][recipe]:>{width}.{digits}f}" for key, width, digits in [
            ("real_train_minutes", 9, 1), ("real_dev_cer", 9, 3), ("real_dev_wer", 9, 3), ("real_dev_wer_lm", 10, 3)]))
    digest = save_weights(checkpoints[best], out / "weights" / "conformer_ctc_tiny_real.ckpt")
    print(f"best recipe {best}: {out / 'weights' / 'conformer_ctc_tiny_real.ckpt'} sha256 {digest}")
    figures.update({"best_recipe": best, "best_checkpoint": "weights/speech/conformer_ctc_tiny_real.ckpt",
                    "best_config": "configs/speech/conformer_ctc_tiny_real.yaml", "quick": quick})
    if seeds:
        runs = {0: (figures["real_dev_cer"][best], figures["real_dev_wer"][best], figures["real_dev_wer_lm"][best])}
        runs |= {seed: measure(best, seed)[1:] for seed in seeds if seed != 0}
        for column, key in enumerate(["best_dev_cer", "best_dev_wer", "best_dev_wer_lm"]):
            values = {seed: run_figures[column] for seed, run_figures in sorted(runs.items())}
            mean, std = summarise(values)
            figures |= {key: mean, f"{key}_std": std, f"{key}_runs": values}
        print(f"best recipe {best} over seeds {sorted(runs)} (its last fine-tuning): dev CER "
              f"{figures['best_dev_cer']:.3f} ± {figures['best_dev_cer_std']:.3f}, WER {figures['best_dev_wer']:.3f} "
              f"± {figures['best_dev_wer_std']:.3f}, WER + LM {figures['best_dev_wer_lm']:.3f} ± "
              f"{figures['best_dev_wer_lm_std']:.3f}")
    write_json(json_path, figures)
    return figures


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], ROOT / "bench_out" / "speech_real")
    parser.add_argument("--recipes", default="a,b,c,d", help="which recipes, comma-separated")
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="the best recipe's last fine-tuning again at these seeds (the recipes run at 0)")
    args = parser.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes or set(recipes) - RECIPES.keys():
        raise SystemExit(f"--recipes: expected some of {sorted(RECIPES)}, found {args.recipes!r}")
    real_benchmark(args.out, recipes, args.quick, args.json, args.reuse, args.seeds)


if __name__ == "__main__":
    main()
