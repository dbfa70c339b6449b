"""polyformer.deploy and `polyformer export`: every domain's inference model exported to ONNX and .pt2 agrees with
eager PyTorch within 1e-4 on inputs of three shapes; int8 graphs; clear errors for untraceable models and wrong
inputs; the fixed-size KV cache of the core equals the growing one."""

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from polyformer.cli import main
from polyformer.deploy import ExportError, OnnxModel, export_onnx, export_program, max_abs_diff, quantize_int8
from polyformer.domains.rl.model import DecisionTransformerConfig
from polyformer.domains.rl.task import DecisionTransformerTask
from polyformer.domains.speech import SpeechRecognitionTask
from polyformer.domains.speech.conformer import ConformerConfig
from polyformer.domains.speech.model import SpeechModelConfig
from polyformer.domains.timeseries import PatchTSTConfig, PatchTSTTask
from polyformer.domains.vision import DigitsDataModule, ImageClassificationTask, ViTConfig
from polyformer.transformer import TransformerConfig, TransformerEncoder

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, depth=2, heads=2, mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def one_thread_seeded(one_torch_thread):
    torch.manual_seed(0)
    yield


def tasks() -> dict:
    from polyformer.transformer import TransformerConfig as Encoder

    return {
        "vision": ImageClassificationTask(model=TINY_VIT),
        "speech": SpeechRecognitionTask(model=SpeechModelConfig(
            subsampling_channels=8, conformer=ConformerConfig(dim=32, depth=1, heads=2, kernel_size=5))),
        "timeseries": PatchTSTTask(model=PatchTSTConfig(lookback=64, horizon=16, patch_len=8, stride=8,
                                                        encoder=Encoder(dim=16, depth=2, heads=2))),
        "rl": DecisionTransformerTask(model=DecisionTransformerConfig(context=4, max_ep_len=500,
                                                                encoder=Encoder(dim=16, depth=2, heads=2))),
    }


@pytest.mark.parametrize("domain", ["vision", "speech", "timeseries", "rl"])
def test_every_domain_exports_to_onnx_and_pt2_within_1e4_on_three_shapes(domain, tmp_path):
    exportable = tasks()[domain].eval().exportable()
    checks = exportable.check_inputs()
    assert len({tuple(tuple(t.shape) for t in example) for example in checks}) == 3  # three different shapes
    for fmt in ("onnx", "pt2"):
        exported = exportable.export(tmp_path / f"model.{fmt}", fmt)
        assert max_abs_diff(exportable.module, exported, checks) <= 1e-4, fmt
    onnx_model = OnnxModel(tmp_path / "model.onnx")
    assert onnx_model.input_names == exportable.input_names
    assert onnx_model.inputs[exportable.input_names.index("timestep") if domain == "rl" else 0].shape[0] == "batch"
    if domain == "speech":  # batch and time are both dynamic, and the frame counts come out exact
        assert onnx_model.inputs[0].shape == ["batch", "samples"]
        waveforms, lengths = checks[2]
        assert torch.equal(onnx_model(waveforms, lengths)[1], exportable.module(waveforms, lengths)[1])


def test_polyformer_export_command_from_a_checkpoint(tmp_path, capsys):
    task = ImageClassificationTask(model=TINY_VIT)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(tmp_path / "vit.ckpt")
    config = ROOT / "configs" / "vision" / "vit_tiny_digits.yaml"
    main(["export", "-c", str(config), "--ckpt_path", str(tmp_path / "vit.ckpt"), "--format", "onnx",
          "--out", str(tmp_path / "vit.onnx")])
    printed = capsys.readouterr().out
    diff = float(printed.split("max |eager − exported| = ")[1].split()[0])
    assert diff <= 1e-4 and (tmp_path / "vit.onnx").is_file()
    with pytest.raises(SystemExit, match="expected a checkpoint|neither a torch.save"):
        (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
        main(["export", "-c", str(config), "--ckpt_path", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "x")])


def test_int8_graph_is_smaller_and_close(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    x = torch.randn(32, 64)
    int8 = quantize_int8(model, tmp_path / "mlp.int8.onnx", example_inputs=(x,))
    fp32 = tmp_path / "mlp.int8.fp32.onnx"  # the export quantize_int8 made first
    assert int8.path.stat().st_size * 3 < fp32.stat().st_size
    with torch.no_grad():
        reference = model(x)
    error = (int8(x) - reference).abs().max().item()
    assert 0 < error < 0.05 * reference.abs().max().item()  # quantized (not equal), yet close


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_data_dependent_control_flow_is_an_error_naming_the_module(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), Branchy())
    with pytest.raises(ExportError, match=r"data-dependent.*1 \(Branchy\)"):
        export_onnx(model, tmp_path / "m.onnx", (torch.randn(2, 4),))
    with pytest.raises(ExportError, match=r"1 \(Branchy\)"):
        export_program(model, tmp_path / "m.pt2", (torch.randn(2, 4),))
    assert not (tmp_path / "m.onnx").exists()


def test_wrong_inputs_to_an_exported_model_name_the_expected_shapes(tmp_path):
    model = ImageClassificationTask(model=TINY_VIT).model.eval()
    onnx_model = OnnxModel(export_onnx(model, tmp_path / "vit.onnx", (torch.randn(2, 1, 8, 8),),
                                       input_names=["images"]))
    with pytest.raises(ValueError, match=r"rank 4.*images \(batch, 1, 8, 8\).*found images \(2, 8, 8\)"):
        onnx_model(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match=r"expected images \(batch, 1, 8, 8\).*found images \(2, 3, 8, 8\)"):
        onnx_model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="expected 1 inputs"):
        onnx_model(torch.randn(2, 1, 8, 8), torch.randn(2))


@pytest.mark.parametrize("prenorm", [True, False])
def test_fixed_size_cache_equals_the_growing_kv_cache(prenorm):
    torch.manual_seed(0)
    encoder = TransformerEncoder(TransformerConfig(dim=16, depth=2, heads=2, causal=True, window=6,
                                                   prenorm=prenorm)).eval()
    cache = encoder.new_cache()
    keys, values, valid = encoder.new_fixed_cache(batch=2)
    with torch.no_grad():
        for chunk in (1, 3, 2, 3, 1, 4):  # a growing cache past the window, in chunks of varying size
            x = torch.randn(2, chunk, 16)
            expected = encoder(x, cache=cache)
            out, keys, values, valid = encoder.forward_fixed_cache(x, keys, values, valid,
                                                                   torch.ones(2, chunk, dtype=torch.bool))
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert valid.all() and keys.shape == (2, 2, 2, 6, 8)


def test_core_encoder_exports_with_dynamic_batch_and_token_axes(tmp_path):
    encoder = TransformerEncoder(TransformerConfig(dim=16, depth=2, heads=2, position="rope")).eval()
    onnx_model = OnnxModel(export_onnx(encoder, tmp_path / "encoder.onnx", (torch.randn(2, 7, 16),),
                                       input_names=["x"]))
    assert onnx_model.inputs[0].shape[:2] == ["batch", "tokens"]
    inputs = [(torch.randn(batch, tokens, 16),) for batch, tokens in ((1, 3), (4, 7), (2, 33))]
    assert max_abs_diff(encoder, onnx_model, inputs) <= 1e-4


class FixedMatrixThenLinear(nn.Module):
    """A fixed matrix (a buffer, like the speech front end's mel filterbank) before a learned nn.Linear."""

    def __init__(self):
        super().__init__()
        self.register_buffer("filterbank", torch.rand(64, 16))
        self.linear = nn.Linear(16, 8)

    def forward(self, x):
        return self.linear(torch.log(x @ self.filterbank + 1e-6))


def test_int8_quantizes_the_linear_layers_and_leaves_fixed_matrices_in_fp32(tmp_path):
    import onnx

    int8 = quantize_int8(FixedMatrixThenLinear().eval(), tmp_path / "m.int8.onnx", example_inputs=(torch.rand(4, 64),))
    ops = [node.op_type for node in onnx.load(str(int8.path)).graph.node]
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 1  # the nn.Linear alone
    assert "MatMul" in ops  # the filterbank product, in fp32
