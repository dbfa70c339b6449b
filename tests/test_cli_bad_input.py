"""The CLI's configuration under bad input, tried systematically (hypothesis) on the core config and one config of
each domain: misspelt keys at every level, values of the wrong type, out-of-range values. Each case ends before any
training in a parser error (SystemExit), a ValueError, or Lightning's MisconfigurationException for its own Trainer
arguments, and the message names the field; docs/reliability.md lists the cases and what each gives."""

from __future__ import annotations

import contextlib
import io
import math
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.exceptions import MisconfigurationException

from polyformer.cli import PolyformerCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"core": "core/sort_tiny.yaml", "vision": "vision/vit_tiny_digits.yaml",
           "timeseries": "timeseries/patchtst_co2_demo.yaml", "rl": "rl/dt_cartpole.yaml",
           "speech": "speech/conformer_ctc_tiny_synthetic.yaml"}
# deterministic runs of a stated size: the counts in docs/reliability.md are these max_examples
BAD_INPUT = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CORE_EXAMPLES, DOMAIN_EXAMPLES = {"misspelt": 25, "wrong_type": 25, "out_of_range": 60}, \
    {"misspelt": 8, "wrong_type": 8, "out_of_range": 20}

NAN = float("nan")
positive_int_bad = st.integers(-10**6, 0)
positive_float_bad = st.floats(max_value=0) | st.just(NAN)
fraction_bad = st.floats(min_value=1) | st.floats(max_value=-1e-9) | st.just(NAN)  # outside [0, 1)
open_fraction_bad = st.floats(min_value=1) | st.floats(max_value=0) | st.just(NAN)  # outside (0, 1)
# field → values it must refuse; only fields whose owner checks them (docs/reliability.md lists the others)
OUT_OF_RANGE = {
    "core": {
        "model.init_args.vocab": st.integers(-100, 1), "model.init_args.encoder.dim": positive_int_bad,
        "model.init_args.encoder.depth": positive_int_bad, "model.init_args.encoder.heads": positive_int_bad,
        "model.init_args.encoder.mlp_ratio": st.floats(max_value=0.015) | st.just(NAN),
        "model.init_args.encoder.max_len": positive_int_bad, "model.init_args.encoder.window": positive_int_bad,
        "model.init_args.encoder.dropout": fraction_bad, "model.init_args.encoder.attn_dropout": fraction_bad,
        "model.init_args.encoder.drop_path": fraction_bad, "model.init_args.optimizer.lr": positive_float_bad,
        "model.init_args.optimizer.weight_decay": st.floats(max_value=-1e-9) | st.just(NAN),
        "model.init_args.optimizer.warmup_steps": st.integers(-10**6, -1),
        "model.init_args.optimizer.min_lr_ratio": st.floats(min_value=1.0001) | st.floats(max_value=-1e-9),
        "model.init_args.optimizer.total_steps": positive_int_bad,
        "model.init_args.optimizer.eps": st.floats(max_value=-1e-12),
        "model.init_args.optimizer.betas": st.tuples(st.floats(1, 10) | st.floats(-10, -1e-9), st.floats(0, 0.999)),
        "data.init_args.length": st.integers(-100, 1), "data.init_args.vocab": st.integers(-100, 1),
        "data.init_args.train_size": positive_int_bad, "data.init_args.val_size": positive_int_bad,
        "data.init_args.batch_size": positive_int_bad, "trainer.max_epochs": st.integers(-10**6, -2),
    },
    "vision": {
        "data.init_args.img_size": positive_int_bad, "data.init_args.val_fraction": open_fraction_bad,
        "data.init_args.test_fraction": open_fraction_bad,
        "data.init_args.max_shift": st.floats(max_value=-1e-9) | st.floats(min_value=1.001),
        "data.init_args.max_rotation": st.floats(max_value=-1e-9), "data.init_args.max_scale": fraction_bad,
        "data.init_args.label_fraction": st.floats(max_value=0) | st.floats(min_value=1.001),
        "model.init_args.model.depth": positive_int_bad,
    },
    "timeseries": {
        "data.init_args.lookback": positive_int_bad, "data.init_args.horizon": positive_int_bad,
        "data.init_args.eval_batch_size": positive_int_bad,
        "model.init_args.model.patch_len": positive_int_bad, "model.init_args.model.stride": positive_int_bad,
        "model.init_args.model.encoder.dropout": fraction_bad,
    },
    "rl": {
        "data.init_args.segment": positive_int_bad, "data.init_args.reward_scale": positive_float_bad,
        "data.init_args.val_fraction": fraction_bad, "model.init_args.model.context": positive_int_bad,
        "model.init_args.model.encoder.heads": positive_int_bad,
    },
    "speech": {
        "data.init_args.audio.max_duration": positive_float_bad, "data.init_args.audio.sample_rate": positive_int_bad,
        "data.init_args.audio.stats_utterances": positive_int_bad,
        "data.init_args.loader.batch_seconds": positive_float_bad,
        "data.init_args.loader.eval_batch_seconds": positive_float_bad,
        "data.init_args.loader.num_buckets": positive_int_bad,
        "data.init_args.loader.num_workers": st.integers(-100, -1),
        "model.init_args.model.conformer.kernel_size": st.integers(-50, 50).filter(lambda k: k < 1 or k % 2 == 0),
    },
}
# field → its type: an int, a float, a bool or one of some words
TYPED = {
    "core": {"model.init_args.encoder.dim": int, "model.init_args.encoder.mlp_ratio": float,
             "model.init_args.encoder.causal": bool, "model.init_args.encoder.position": "none sinusoidal learned "
             "rope alibi", "model.init_args.encoder.attention": "full local linear",
             "model.init_args.optimizer.lr": float, "model.init_args.optimizer.warmup_steps": int,
             "model.init_args.optimizer.schedule": "cosine constant", "data.init_args.batch_size": int,
             "data.init_args.train_size": int, "trainer.max_epochs": int, "trainer.gradient_clip_val": float,
             "seed_everything": int},
    "vision": {"model.init_args.model.dim": int, "model.init_args.model.mlp_ratio": float,
               "model.init_args.model.global_pool": "token avg", "data.init_args.img_size": int,
               "data.init_args.augment": bool, "data.init_args.val_fraction": float},
    "timeseries": {"model.init_args.model.patch_len": int, "model.init_args.model.encoder.norm":
                   "layernorm rmsnorm batchnorm",
                   "data.init_args.fill": "error ffill interpolate", "data.init_args.lookback": int,
                   "data.init_args.features": "M S", "data.init_args.name": "co2 sunspots"},
    "rl": {"model.init_args.model.context": int, "model.init_args.evaluation.sample": bool,
           "data.init_args.segment": int, "data.init_args.reward_scale": float},
    "speech": {"model.init_args.tokenizer.kind": "char unigram", "model.init_args.decoding": "greedy beam",
               "data.init_args.audio.max_duration": float, "data.init_args.loader.num_buckets": int,
               "data.init_args.audio.skip_bad": bool},
}
WORD = st.text("qxzkjvw", min_size=1, max_size=6)  # never a number, a bool or a choice


def sections(domain: str) -> list[str]:
    """Every mapping of the config that a key can be added to: '', 'trainer.', 'model.init_args.encoder.', ..."""
    def walk(node: dict, prefix: str):
        yield prefix
        for key, value in node.items():
            if isinstance(value, dict) and key != "class_path":
                yield from walk(value, f"{prefix}{key}.")

    return list(walk(yaml.safe_load((ROOT / "configs" / CONFIGS[domain]).read_text()), ""))


def fields_of(domain: str, section: str) -> list[str]:
    node = yaml.safe_load((ROOT / "configs" / CONFIGS[domain]).read_text())
    for key in filter(None, section.split(".")):
        node = node[key]
    return [key for key, value in node.items() if not isinstance(value, dict)]


def wrong_value(kind) -> st.SearchStrategy[str]:
    if kind is int:
        return WORD | st.floats(-1e6, 1e6).filter(lambda x: x != int(x)).map(repr)
    if kind is bool:
        return WORD | st.sampled_from(["2", "maybe", "truee"])
    if kind is float:
        return WORD | st.sampled_from(["1,5", "1.5.2", "--1"])
    return WORD.filter(lambda w: w not in kind.split())  # one of some words


def cli_outcome(domain: str, override: str) -> tuple[str, str]:
    """(how the CLI ended, its message): parse and instantiate, then for the core config set the data up and make
    the training loader (where make_loader checks batch_size)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            cli = PolyformerCLI(args=["-c", str(ROOT / "configs" / CONFIGS[domain]), override], run=False)
            if domain == "core":
                cli.datamodule.setup("fit")
                cli.datamodule.train_dataloader()
    except (SystemExit, ValueError, MisconfigurationException) as error:
        text = stderr.getvalue()
        return type(error).__name__, str(error) + (text[text.rfind("error:"):] if "error:" in text else text)
    return "accepted", ""


def examples(domain: str, kind: str) -> int:
    return (CORE_EXAMPLES if domain == "core" else DOMAIN_EXAMPLES)[kind]


def misspelt_keys(domain: str) -> st.SearchStrategy[str]:
    """A real key of the config with one letter doubled, dropped or swapped for another, at any level."""
    @st.composite
    def key(draw):
        section = draw(st.sampled_from([s for s in sections(domain) if fields_of(domain, s)]))
        real = draw(st.sampled_from(fields_of(domain, section)))
        i = draw(st.integers(0, len(real) - 1))
        typo = draw(st.sampled_from([real[:i] + real[i] + real[i:], real[:i] + "x" + real[i + 1:],
                                     real + draw(st.sampled_from(string.ascii_lowercase))]))
        if typo in fields_of(domain, section) or typo == real:
            typo = real + "_zz"
        return f"{section}{typo}"
    return key()


def run_examples(domain: str, kind: str, strategy, check) -> int:
    tried = []

    @settings(max_examples=examples(domain, kind), **BAD_INPUT)
    @given(case=strategy)
    def each(case):
        tried.append(case)
        check(case)

    each()
    return len(tried)


@pytest.mark.parametrize("domain", sorted(CONFIGS))
def test_misspelt_keys_are_refused_naming_the_key(domain):
    def check(key):
        how, message = cli_outcome(domain, f"--{key}=1")
        assert how == "SystemExit", (key, how, message)
        assert key.rpartition(".")[2] in message, (key, message)

    assert run_examples(domain, "misspelt", misspelt_keys(domain), check) == examples(domain, "misspelt")


@pytest.mark.parametrize("domain", sorted(CONFIGS))
def test_values_of_the_wrong_type_are_refused_naming_the_field(domain):
    @st.composite
    def case(draw):
        field = draw(st.sampled_from(sorted(TYPED[domain])))
        return field, draw(wrong_value(TYPED[domain][field]))

    def check(field_value):
        field, value = field_value
        how, message = cli_outcome(domain, f"--{field}={value}")
        assert how == "SystemExit", (field, value, how, message)
        assert f'Parser key "{field.rpartition(".")[2]}"' in message or f'"{field}"' in message, (field, message)

    assert run_examples(domain, "wrong_type", case(), check) == examples(domain, "wrong_type")


def as_argument(value) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(repr(v) for v in value) + "]"
    return repr(value) if not (isinstance(value, float) and math.isnan(value)) else "nan"


@pytest.mark.parametrize("domain", sorted(CONFIGS))
def test_out_of_range_values_are_refused_naming_the_field(domain):
    @st.composite
    def case(draw):
        field = draw(st.sampled_from(sorted(OUT_OF_RANGE[domain])))
        return field, draw(OUT_OF_RANGE[domain][field])

    def check(field_value):
        field, value = field_value
        how, message = cli_outcome(domain, f"--{field}={as_argument(value)}")
        assert how != "accepted", f"--{field}={as_argument(value)} was accepted"
        assert field.rpartition(".")[2] in message, (field, value, message)

    assert run_examples(domain, "out_of_range", case(), check) == examples(domain, "out_of_range")
