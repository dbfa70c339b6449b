"""Leaving Python: torch.export programs (.pt2), ONNX graphs, int8 inference through onnxruntime, and the checks.

    from polyformer.deploy import export_onnx, export_program, quantize_int8, OnnxModel, max_abs_diff
    export_onnx(model, "vit.onnx", example_inputs=(images,))       # dynamic batch axis on every input
    int8 = quantize_int8("vit.onnx", "vit.int8.onnx")               # or quantize_int8(model, path, example_inputs)
    int8(images)                                                    # onnxruntime, tensors in and out

- Dynamic axes: axis 0 of every input is the batch; a model with a time or token axis declares it in its
  `export_axes` (input position → {axis: name}: the core's encoder and decoder, the speech recognizer, PatchTST's
  channels, the DT's steps); `dynamic_axes` ({input name: {axis: name}}) overrides both.
  A task's `exportable()` returns an `Exportable`: its inference module, names, dynamic axes (time where the model
  has one) and example inputs of any shape; `polyformer export` uses it.
- ONNX through torch's dynamo-based exporter, weights inside the one .onnx file.
- Int8: onnxruntime's dynamic quantization of the exported graph's nn.Linear layers (int8 weights, activations
  quantized per batch at run time; the file records which nodes they are), what PyTorch's dynamic quantization
  covers too: not convolutions, and not fixed matrices such as the speech front end's mel filterbank, whose int8
  copy ruins the features. The graph runtime also removes Python's and eager dispatch's overhead, which at small
  batches is most of a step on a CPU. Latencies are reported against eager fp32 and against onnxruntime
  fp32 (quantization alone) by scripts/bench_deploy.py.
- Errors: a forward with data-dependent Python control flow is an ExportError naming the submodule (and the line,
  when torch's traceback keeps the model's frame); an input of the wrong rank, size or type given to an OnnxModel
  is a ValueError naming the expected shapes.
"""

from __future__ import annotations

import io
import json
import linecache
import os
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from polyformer.checkpoint import write_atomically

if TYPE_CHECKING:
    import onnx


TORCH_DIR = str(Path(torch.__file__).parent)  # frames of torch itself are not where a model's control flow is
LINEAR_NODES = "polyformer.linear_nodes"  # model metadata: the graph nodes of nn.Linear layers (JSON list)


class ExportError(ValueError):
    """A model that cannot become a graph; the message names the module and why."""


@dataclass
class Exportable:
    """A task's inference model as export sees it: tensors in, tensors out."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example_inputs: Callable[[int, int], tuple[Tensor, ...]]  # (batch, length) → inputs (length: see `lengths`)
    lengths: tuple[int, int, int]  # the lengths checked, at batches 1, 3 and 8 (time, channels or steps acted)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # input → {axis: name}; default batch
    description: str = ""  # what the inputs and outputs are, for `polyformer export` and the docs

    def check_inputs(self) -> list[tuple[Tensor, ...]]:
        """Inputs of three shapes: batches 1, 3 and 8 at the three lengths."""
        return [self.example_inputs(batch, length) for batch, length in zip((1, 3, 8), self.lengths)]

    def export(self, path: str | Path, format: str) -> Callable:
        """Exports to `path` as "onnx" or "pt2" (example inputs: batch 2 at the middle length); returns the
        exported model as a callable (an OnnxModel, or the loaded program's module)."""
        example = self.example_inputs(2, self.lengths[1])
        if format == "onnx":
            return OnnxModel(export_onnx(self.module, path, example, input_names=self.input_names,
                                         output_names=self.output_names, dynamic_axes=self.dynamic_axes))
        if format == "pt2":
            export_program(self.module, path, example, input_names=self.input_names, dynamic_axes=self.dynamic_axes)
            # torch 2.14's generated input-guard function raises AttributeError ('NoneType' object has no attribute
            # 'size') on the DT acting step at batch 1, which the program itself computes exactly: it is skipped
            return torch.export.load(str(path)).module(check_guards=False)
        raise ValueError(f"format: expected 'onnx' or 'pt2', found {format!r}")


def default_axes(names: Sequence[str], dynamic_axes: dict[str, dict[int, str]] | None,
                 model: nn.Module | None = None) -> dict[str, dict[int, str]]:
    """Every input's axis 0 is the batch, unless dynamic_axes names the input; a model's `export_axes` (input
    position → {axis: name}: its time or token axes) come in between."""
    axes = {name: {0: "batch"} for name in names}
    for position, model_axes in (getattr(model, "export_axes", None) or {}).items():
        if position < len(names):
            axes[names[position]] = dict(model_axes)
    axes.update(dynamic_axes or {})
    return axes


def dynamic_shapes(names: Sequence[str], axes: dict[str, dict[int, str]]) -> tuple[dict[int, object], ...]:
    """torch.export's dynamic_shapes for inputs in order: Dim.DYNAMIC on every named axis (torch infers the ranges
    the model allows, e.g. at least a window of samples, and the axes that are one, e.g. a shared batch; an axis
    the model fixes to one size is an error, not a silent constant). The names go on the ONNX file."""
    return tuple({axis: torch.export.Dim.DYNAMIC for axis in axes.get(input_name, {})} for input_name in names)


def input_names_of(example_inputs: Sequence[Tensor], input_names: Sequence[str] | None) -> list[str]:
    names = list(input_names) if input_names is not None else [f"input_{i}" for i in range(len(example_inputs))]
    if len(names) != len(example_inputs):
        raise ValueError(f"input_names: expected one name per example input ({len(example_inputs)}), found "
                         f"{len(names)}: {names}")
    return names


def where_export_failed(model: nn.Module, error: BaseException) -> str:
    """'name (Class)' of the innermost submodule of `model` running where an export failed, with the file, line
    and code when the traceback holds the model's own frame; the model itself when no submodule was running."""
    ids = {id(module): name for name, module in model.named_modules()}
    found = f"{type(model).__name__} (the model itself)"
    for frame, line in traceback.walk_tb(error.__traceback__):
        owner, path = frame.f_locals.get("self"), frame.f_code.co_filename
        if owner is not None and id(owner) in ids:
            found = f"{ids[id(owner)] or '(the model itself)'} ({type(owner).__name__})"
            if not path.startswith(TORCH_DIR):  # the model's code, not torch's module call machinery
                found += f" at {Path(path).name}:{line}: {linecache.getline(path, line).strip()}"
    return found


def trace(model: nn.Module, example_inputs: tuple[Tensor, ...], names: list[str],
          axes: dict[str, dict[int, str]]) -> torch.export.ExportedProgram:
    """torch.export of the model in eval mode; an ExportError names the module where tracing failed."""
    model = model.eval()
    try:
        return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes(names, axes))
    except Exception as error:  # torch.export's errors come from many places: all are reported the same way
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        data_dependent = "data-dependent" in str(error) or "GuardOnDataDependent" in type(error).__name__
        why = "data-dependent Python control flow (a branch or a Python number read from a tensor's values)" \
            if data_dependent else f"{type(error).__name__}"
        raise ExportError(f"cannot export {type(model).__name__}: {why} in {where_export_failed(model, error)} — "
                          f"{first}") from error


def export_program(model: nn.Module, path: str | Path, example_inputs: tuple[Tensor, ...], *,
                   input_names: Sequence[str] | None = None,
                   dynamic_axes: dict[str, dict[int, str]] | None = None) -> torch.export.ExportedProgram:
    """torch.export of `model` saved at `path` (.pt2; load with torch.export.load(path).module())."""
    names = input_names_of(example_inputs, input_names)
    program = trace(model, example_inputs, names, default_axes(names, dynamic_axes, model))
    write_atomically(path, lambda file: torch.export.save(program, file))
    return program


def export_onnx(model: nn.Module, path: str | Path, example_inputs: tuple[Tensor, ...], *,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> Path:
    """`model` as one ONNX file at `path` (torch's dynamo-based exporter, dynamic axes declared, weights inside)."""
    names = input_names_of(example_inputs, input_names)
    axes = default_axes(names, dynamic_axes, model)
    # torch.export first, alone: untraceable code fails here, naming the module (the ONNX exporter would go on to
    # other capture strategies); the ONNX exporter then captures the module again itself
    trace(model, example_inputs, names, axes)
    quiet = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(quiet):  # the exporter prints its progress
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(model, tuple(example_inputs), dynamo=True, input_names=names,
                                         output_names=list(output_names) if output_names else None,
                                         dynamic_shapes=dynamic_shapes(names, axes), verbose=False)
        onnx_program.optimize()
    import onnx

    proto = name_dynamic_axes(onnx_program.model_proto, names, axes)
    linear = [node.name for node in proto.graph.node if node.op_type in ("MatMul", "Gemm") and
              any(prop.key == "namespace" and prop.value.split("/")[-2:-1] and  # ".../<module>: <class>/<op>: <aten>"
                  prop.value.split("/")[-2].endswith("torch.nn.modules.linear.Linear") for prop in node.metadata_props)]
    for node in proto.graph.node:  # the exporter's per-node source metadata: for debugging, most of a small file
        node.doc_string = ""
        del node.metadata_props[:]
    # the matrix products of nn.Linear layers, which int8 quantization acts on (see quantize_int8)
    proto.metadata_props.add(key=LINEAR_NODES, value=json.dumps(linear))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")  # written whole, then renamed: never half a graph at `path`
    try:
        onnx.save(proto, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def name_dynamic_axes(proto: onnx.ModelProto, names: list[str], axes: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """The graph's symbolic dimensions (s0, s77, ...) renamed to the axis names ("batch", "samples") wherever they
    appear on the graph's inputs and outputs, so that the file says what its inputs are."""
    rename: dict[str, str] = {}
    for node, name in zip(proto.graph.input, names):
        dims = node.type.tensor_type.shape.dim
        for axis, label in axes.get(name, {}).items():
            if dims[axis].dim_param:
                rename[dims[axis].dim_param] = label
    for node in [*proto.graph.input, *proto.graph.output]:
        for dim in node.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    return proto


def quantize_int8(source: nn.Module | str | Path, path: str | Path,
                  example_inputs: tuple[Tensor, ...] | None = None, *, input_names: Sequence[str] | None = None,
                  output_names: Sequence[str] | None = None,
                  dynamic_axes: dict[str, dict[int, str]] | None = None) -> OnnxModel:
    """An int8 ONNX model at `path` (onnxruntime dynamic quantization: int8 weights, activations quantized per
    batch) from an .onnx file, or from a module (exported first, with example_inputs), opened for inference."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    if isinstance(source, nn.Module):
        if example_inputs is None:
            raise ValueError("quantize_int8 of a module needs example_inputs to export it, found None")
        source = export_onnx(source, path.with_suffix(".fp32.onnx"), example_inputs, input_names=input_names,
                             output_names=output_names, dynamic_axes=dynamic_axes)
    if not Path(source).is_file():
        raise FileNotFoundError(f"quantize_int8: expected an ONNX file, found none at {source}")
    import onnx

    graph = onnx.load(str(source), load_external_data=False)
    recorded = {prop.key: prop.value for prop in graph.metadata_props}
    # the other matrix products stay fp32 (named, since onnxruntime renames the Gemms it converts); a file from
    # elsewhere records nothing: every MatMul and Gemm is quantized
    keep = [] if LINEAR_NODES not in recorded else [
        node.name for node in graph.graph.node
        if node.op_type in ("MatMul", "Gemm") and node.name not in set(json.loads(recorded[LINEAR_NODES]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=keep)
    return OnnxModel(path)


class OnnxModel:
    """An ONNX file run by onnxruntime on the CPU: torch tensors in, torch tensors out (one, or a tuple)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime

        self.path = Path(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.inputs = self.session.get_inputs()
        self.input_names = [node.name for node in self.inputs]
        self.output_names = [node.name for node in self.session.get_outputs()]

    def expected(self) -> str:
        """'name (batch, 1, 8, 8) tensor(float), ...': the inputs the graph takes."""
        return ", ".join(f"{node.name} ({', '.join(str(dim) for dim in node.shape)}) {node.type}"
                         for node in self.inputs)

    def found(self, inputs: Sequence[Tensor]) -> str:
        """'name (2, 3, 8, 8) torch.float32, ...': what a call gave (for errors alone: calls are timed)."""
        return ", ".join(f"{node.name} {tuple(tensor.shape)} {tensor.dtype}" for node, tensor in zip(self.inputs, inputs))

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.path}: expected {len(self.inputs)} inputs: {self.expected()}; found "
                             f"{len(inputs)}")
        for node, tensor in zip(self.inputs, inputs):
            if tensor.ndim != len(node.shape):
                raise ValueError(f"{self.path}: input {node.name} must have rank {len(node.shape)}; expected "
                                 f"{self.expected()}; found {self.found(inputs)}")
        feed = {node.name: tensor.detach().cpu().numpy() for node, tensor in zip(self.inputs, inputs)}
        try:
            outputs = self.session.run(None, feed)
        except Exception as error:  # onnxruntime's own exception types: re-raised naming what the graph expects
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{self.path}: onnxruntime refused the inputs; expected {self.expected()}; found "
                             f"{self.found(inputs)} ({reason})") from None
        tensors = tuple(torch.from_numpy(np.asarray(output)) for output in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


def as_tuple(outputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


@torch.no_grad()
def max_abs_diff(reference: Callable, candidate: Callable, inputs: Sequence[tuple[Tensor, ...]]) -> float:
    """Largest |reference − candidate| over every output of every input tuple (floating outputs; integer ones must
    be equal, else inf)."""
    worst = 0.0
    for example in inputs:
        for want, got in zip(as_tuple(reference(*example)), as_tuple(candidate(*example)), strict=True):
            if want.shape != got.shape:
                raise ValueError(f"output shapes differ: {tuple(want.shape)} and {tuple(got.shape)}")
            if want.is_floating_point():
                worst = max(worst, (want.float() - got.float()).abs().max().item() if want.numel() else 0.0)
            elif not torch.equal(want, got.to(want.dtype)):
                return float("inf")
    return worst


def file_megabytes(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6
