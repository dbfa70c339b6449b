"""Speech benchmark: training throughput against torchaudio's Conformer, and CER/WER of the tiny config.

    python scripts/bench_speech.py [--quick] [--json PATH] [--ckpt PATH]
    python scripts/bench_speech.py --real [--quick] [--json PATH] [--recipes a,b,c,d] [--seeds 1 2] [--out DIR]
                                   [--reuse]

--real runs issue 10's four recipes on real LibriSpeech instead (scripts/bench_speech_real.py says how).

1. Throughput: seconds of audio per second of training (forward, CTC loss, backward, AdamW step) of the tiny
   config's recognizer with our Conformer and with `torchaudio.models.Conformer` of the same size in its place
   (same front end, subsampling and head, same parameter count), doing the same work: no positions (torchaudio's
   has none), and the same dropout everywhere, attention weights included (torchaudio's `dropout` also drops
   them) — once 0 on both sides, once 0.1 on both; ours as configured (RoPE) for reference. Timed in one process,
   each model once per round in a rotating order; medians and the ratios ours/torchaudio.
2. Accuracy: CER and WER of the tiny config on the synthetic test split and on the held-out-accent split.
   Without --ckpt it trains first (`polyformer fit -c configs/speech/conformer_ctc_tiny_synthetic.yaml`), on
   data/synthetic_librispeech (made when missing, >= 75 min of training audio; the run is kept under
   runs/bench_speech/runs/speech/bench); --quick uses a small corpus in a
   temporary folder and one short epoch, which checks the pipeline but does not measure the model. With --ckpt it
   only tests that checkpoint on data/synthetic_librispeech (--quick then shortens the throughput part alone), and
   train_seconds is the training time logged in that checkpoint's run (train/time in its metrics.csv: the
   training loop without validation, and for a resumed fit only its last part), not the wall clock of a fit.
--json PATH writes train_ratio_vs_torchaudio_dropout0.0 and _dropout0.1 (train_ratio_vs_torchaudio: the latter),
test_cer, test_wer, heldout_voice_cer, train_seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
import yaml
from torch import Tensor, nn

from polyformer.bench import evaluate, fit, last_values, run, run_dir
from polyformer.cli import newest_version
from polyformer.domains.speech.conformer import ConformerConfig
from polyformer.domains.speech.model import SpeechModelConfig, SpeechRecognizer
from polyformer.domains.speech.frontend import FeatureConfig, SpecAugmentConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "speech" / "conformer_ctc_tiny_synthetic.yaml"


class TorchaudioEncoder(nn.Module):
    """torchaudio.models.Conformer behind our encoder's call signature: (b n d), (b n) padding mask → (b n d)."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.conformer = torchaudio.models.Conformer(
            input_dim=config.dim, num_heads=config.heads, ffn_dim=int(config.ffn_ratio * config.dim),
            num_layers=config.depth, depthwise_conv_kernel_size=config.kernel_size, dropout=config.dropout)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor) -> Tensor:
        return self.conformer(x, (~key_padding_mask).sum(dim=1))[0]


def tiny_model_config() -> SpeechModelConfig:
    model = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model"]
    return SpeechModelConfig(
        features=FeatureConfig(), specaugment=SpecAugmentConfig(**model["specaugment"]),
        subsampling_channels=model["subsampling_channels"], head_dropout=model["head_dropout"],
        conformer=ConformerConfig(**model["conformer"]))


def throughput(quick: bool) -> dict:
    """Timed training steps of our recognizer and of the same one with torchaudio's Conformer, on one batch, doing
    the same work: the same dropout everywhere (torchaudio's `dropout` also drops attention weights, so ours gets
    attn_dropout equal to dropout), once with none on either side and once with 0.1 on both; and ours as configured
    (RoPE), for reference. Every round runs each model once, in a rotating order; medians of audio seconds per
    second."""
    torch.manual_seed(0)
    config = tiny_model_config()

    def with_dropout(rate: float, position: str) -> SpeechModelConfig:
        conformer = dataclasses.replace(config.conformer, dropout=rate, attn_dropout=rate, position=position)
        return dataclasses.replace(config, conformer=conformer)

    models = {}
    for rate in (0.0, 0.1):
        models[f"ours_dropout{rate}"] = SpeechRecognizer(with_dropout(rate, "none"), 29)  # torchaudio's computation
        models[f"torchaudio_dropout{rate}"] = SpeechRecognizer(with_dropout(rate, "none"), 29)
        models[f"torchaudio_dropout{rate}"].encoder = TorchaudioEncoder(with_dropout(rate, "none").conformer)
    models["ours_rope_as_configured"] = SpeechRecognizer(config, 29)
    counts = {name: sum(p.numel() for p in m.encoder.parameters()) for name, m in models.items()}
    if counts["ours_dropout0.0"] != counts["torchaudio_dropout0.0"]:
        raise SystemExit(f"the two encoders differ in size: {counts}")
    batch, seconds = (8, 4.0) if quick else (16, 4.0)
    waves = torch.randn(batch, int(seconds * 16_000)) * 0.1
    lengths = torch.full((batch,), waves.shape[1]) - torch.arange(batch) * 1600  # ragged, like real batches
    targets, target_lengths = torch.randint(1, 29, (batch, 40)), torch.full((batch,), 40)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        start = time.perf_counter()
        log_probs, frames = model(waves, lengths)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, frames, target_lengths, zero_infinity=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    names = list(models)
    for name in names:  # warm-up
        step(name)
    times = {name: [] for name in names}
    for r in range(3 if quick else 10):
        for name in names[r % len(names):] + names[:r % len(names)]:  # a rotating order
            times[name].append(step(name))
    audio = float(lengths.sum()) / 16_000
    rates = {name: audio / statistics.median(t) for name, t in times.items()}
    result = {f"{name}_audio_seconds_per_second": round(rate, 2) for name, rate in rates.items()}
    result["encoder_parameters"] = counts
    for rate in (0.0, 0.1):
        result[f"train_ratio_vs_torchaudio_dropout{rate}"] = round(
            rates[f"ours_dropout{rate}"] / rates[f"torchaudio_dropout{rate}"], 3)
    result["train_ratio_vs_torchaudio"] = result["train_ratio_vs_torchaudio_dropout0.1"]  # the configs' dropout
    result["train_ratio_rope_as_configured_vs_torchaudio_dropout0.1"] = round(
        rates["ours_rope_as_configured"] / rates["torchaudio_dropout0.1"], 3)
    result["throughput_batch"] = f"{batch} utterances, {audio:.1f} s of audio, {torch.get_num_threads()} threads"
    return result


def accuracy(quick: bool, ckpt: str | None, workdir: Path) -> dict:
    """Trains the tiny config (unless --ckpt), then tests it on the test and held-out splits."""
    logs = workdir / "logs"
    if quick and ckpt is None:
        corpus = workdir / "corpus"
        run([sys.executable, "scripts/make_synthetic_librispeech.py", "--out", str(corpus), "--train-utterances",
             "60", "--dev", "10", "--test", "20", "--heldout", "20", "--max-words", "8"], logs / "corpus.log")
        overrides = ["--data.init_args.root", str(corpus), "--trainer.max_epochs", "1",
                     "--data.init_args.audio.stats_utterances", "30"]
    else:
        corpus = ROOT / "data" / "synthetic_librispeech"
        if not (corpus / "LibriSpeech" / "train").is_dir():
            run([sys.executable, "scripts/make_synthetic_librispeech.py", "--out", str(corpus),
                 "--train-minutes", "80"], logs / "corpus.log")
        overrides = ["--data.init_args.root", str(corpus)]
    out = workdir if quick else ROOT / "runs" / "bench_speech"  # a full run's checkpoint is kept
    train_seconds = None
    if ckpt is None:
        fitted = fit([CONFIG], out, "bench", overrides)
        train_seconds, ckpt = fitted.seconds, str(fitted.checkpoint("last"))
    else:  # the fit's own clock: the Throughput callback's train/time in the checkpoint's run folder
        fit_metrics = Path(ckpt).resolve().parents[1] / "metrics.csv"
        if fit_metrics.is_file():
            train_seconds = last_values(fit_metrics).get("train/time")
    evaluate("test", [CONFIG], out, "bench", overrides, Path(ckpt))
    metrics = last_values(newest_version(run_dir(out, CONFIG, "bench")) / "metrics.csv")
    return {"test_cer": metrics["test/test/cer"], "test_wer": metrics["test/test/wer"],
            "heldout_voice_cer": metrics["test/heldout/cer"], "heldout_voice_wer": metrics["test/heldout/wer"],
            "train_seconds": round(train_seconds, 1) if train_seconds is not None else None, "checkpoint": ckpt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few timing steps, tiny corpus, one short epoch")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="test this tiny-config checkpoint on the benchmark corpus, no training")
    parser.add_argument("--skip-accuracy", action="store_true", help="throughput only")
    parser.add_argument("--real", action="store_true",
                        help="the recipes on real LibriSpeech: hands every other option to scripts/bench_speech_real.py")
    args, rest = parser.parse_known_args()
    if args.real:  # that benchmark's own entry point, in this interpreter
        forwarded = [arg for arg in sys.argv[1:] if arg != "--real"]
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("bench_speech_real.py")), *forwarded])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    results = throughput(args.quick)
    print(json.dumps(results, indent=2), flush=True)
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as workdir:
            results.update(accuracy(args.quick, args.ckpt, Path(workdir)))
    print(json.dumps(results, indent=2))
    if args.json is not None:
        keys = ["train_ratio_vs_torchaudio", "test_cer", "test_wer", "heldout_voice_cer", "train_seconds"]
        args.json.write_text(json.dumps({key: results.get(key) for key in keys} | results, indent=2))


if __name__ == "__main__":
    main()
