"""Issue 10's recipes on real LibriSpeech, end to end (run through `python scripts/bench_speech.py --real`).

    python scripts/bench_speech.py --real [--quick] [--json PATH] [--recipes a,b,c,d] [--out DIR] [--reuse]

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
--reuse: stages already fitted in DIR (their DIR/stages/<name>.json) are read, not refitted, so the recipes can run
over several sittings or side by side (`--recipes b` and `--recipes c` in two processes, then all four with --reuse).
--json: real_dev_cer, real_dev_wer, real_dev_wer_lm, real_train_minutes (dicts recipe → value), best_recipe (lowest
dev CER), best_checkpoint, best_config; the best recipe's checkpoint is written weights-only to DIR/weights/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_pretrain import QUICK, ROOT, last_value, polyformer, run, write_json
from make_synthetic_librispeech import read_sources, sentences_from

from polyformer.cli import newest_version
from polyformer.data import shared_data_dir
from polyformer.domains.speech.data import read_split
from polyformer.domains.speech.lm import lexicon_lines, witten_bell_arpa
from polyformer.finetune import save_weights

CONFIGS = ROOT / "configs" / "speech"
REAL = shared_data_dir() / "speech" / "librispeech-sample"
RECIPES = {"a": [], "b": ["synthetic"], "c": ["bestrq"], "d": ["bestrq", "bestrq_synthetic"]}
LAYER_DECAY = ["--model.init_args.finetune.layer_decay=0.75"]
NEW_HEAD = ["--model.init_args.finetune.exclude=[model.head.]", "--model.init_args.finetune.freeze_steps=100"]


def language_model(out: Path) -> tuple[Path, Path]:
    """lm.arpa and lexicon.txt from the fortunes sentences and the real training transcripts, no dev transcript."""
    dev = {u.transcript for u in read_split(REAL, "dev")}
    text = sentences_from(read_sources([Path("/usr/share/games/fortunes")]), 3, 30)
    text += [u.transcript for u in read_split(REAL, "train")]
    kept = [s for s in dict.fromkeys(text) if s not in dev]
    print(f"language model: {len(kept)} sentences ({len(text) - len(kept)} dropped as dev transcripts)", flush=True)
    sentences = [s.split() for s in kept]
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm.arpa").write_text(witten_bell_arpa(sentences, 3))
    (out / "lexicon.txt").write_text("\n".join(lexicon_lines({w for s in sentences for w in s})) + "\n")
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
        """A `polyformer fit` (once per stage name; with --reuse, a stage whose record DIR/stages/<name>.json exists
        is read instead); returns its last checkpoint and records its minutes."""
        record = self.out / "stages" / f"{name}.json"
        if name not in self.stages and self.reuse and record.is_file():
            self.stages[name] = json.loads(record.read_text())
            print(f"reusing stage {name}: {self.stages[name]['checkpoint']} ({self.stages[name]['minutes']:.1f} min)",
                  flush=True)
        if name not in self.stages:
            where = [f"--run.root={self.out / 'runs'}", "--run.domain=speech", f"--run.name={name}"]
            seconds = run(polyformer("fit", "-c", str(CONFIGS / config), *where, *extra, *self.limits),
                          self.out / "logs" / f"{name}.fit.log")
            checkpoint = newest_version(self.out / "runs" / "speech" / name) / "checkpoints" / "last.ckpt"
            self.stages[name] = {"minutes": seconds / 60, "checkpoint": str(checkpoint)}
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(self.stages[name]) + "\n")
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

    def recipe(self, recipe: str) -> Path:
        stages = [self.stage(name) for name in RECIPES[recipe]]
        start = []
        if stages:
            start = [f"--model.init_args.init_from={stages[-1]}", *LAYER_DECAY]
            if RECIPES[recipe][-1] == "bestrq":
                start += NEW_HEAD
        return self.fit(f"real_{recipe}", "conformer_ctc_tiny_real.yaml", [f"--data.init_args.root={REAL}", *start])

    def test(self, recipe: str, checkpoint: Path, decoding: list[str], tag: str) -> tuple[float, float]:
        name = f"real_{recipe}"
        where = [f"--run.root={self.out / 'runs'}", "--run.domain=speech", f"--run.name={name}"]
        run(polyformer("test", "-c", str(CONFIGS / "conformer_ctc_tiny_real.yaml"), *where, f"--ckpt_path={checkpoint}",
                       f"--data.init_args.root={REAL}", "--data.init_args.test_splits=[dev]", *decoding, *self.limits),
            self.out / "logs" / f"{name}.test_{tag}.log")
        run_dir = self.out / "runs" / "speech" / name
        return last_value(run_dir, "test/dev/cer"), last_value(run_dir, "test/dev/wer")


def real_benchmark(out: Path, recipes: list[str], quick: bool, json_path: Path | None, reuse: bool = False) -> dict:
    pipeline = Pipeline(out, quick, reuse)
    lm, lexicon = language_model(out / "lm")
    lm_decoding = ["--model.init_args.decoding=lexicon", f"--model.init_args.lexicon={lexicon}",
                   f"--model.init_args.lm={lm}", "--model.init_args.beam_size=50"]
    figures = {"real_dev_cer": {}, "real_dev_wer": {}, "real_dev_wer_lm": {}, "real_train_minutes": {}}
    checkpoints = {}
    for recipe in recipes:
        checkpoints[recipe] = pipeline.recipe(recipe)
        cer, wer = pipeline.test(recipe, checkpoints[recipe], [], "greedy")
        _, wer_lm = pipeline.test(recipe, checkpoints[recipe], lm_decoding, "lm")
        minutes = sum(pipeline.stages[stage]["minutes"] for stage in [*RECIPES[recipe], f"real_{recipe}"])
        figures["real_dev_cer"][recipe], figures["real_dev_wer"][recipe] = cer, wer
        figures["real_dev_wer_lm"][recipe], figures["real_train_minutes"][recipe] = wer_lm, minutes
        print(f"recipe {recipe}: {minutes:.1f} min, dev CER {cer:.3f} WER {wer:.3f}, WER with LM {wer_lm:.3f}",
              flush=True)
    best = min(figures["real_dev_cer"], key=figures["real_dev_cer"].get)
    digest = save_weights(checkpoints[best], out / "weights" / "conformer_ctc_tiny_real.ckpt")
    print(f"best recipe {best}: {out / 'weights' / 'conformer_ctc_tiny_real.ckpt'} sha256 {digest}")
    figures.update({"best_recipe": best, "best_checkpoint": "weights/speech/conformer_ctc_tiny_real.ckpt",
                    "best_config": "configs/speech/conformer_ctc_tiny_real.yaml", "quick": quick})
    write_json(json_path, figures)
    return figures
